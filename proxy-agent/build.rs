//! Compiles the eBPF programs (`proxy-ebpf`, nightly, bpfel-unknown-none) so the agent can embed the
//! object with `include_bytes_aligned!`. `cargo xtask setup` installs what this needs.
//!
//! Without the `kernel-programs` feature (on by default) nothing is compiled and the embedded
//! object is empty: the agent then refuses `--redirect` with a clear error. The fuzz targets build
//! that way, so they need neither nightly's eBPF target nor bpf-linker.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("proxy-agent is inside the workspace")?;
    let ebpf_dir = workspace.join("proxy-ebpf");
    let common_dir = workspace.join("proxy-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    if std::env::var_os("CARGO_FEATURE_KERNEL_PROGRAMS").is_none() {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        std::fs::write(out.join("proxy-ebpf"), [])?;
        return Ok(());
    }
    let ebpf_dir = ebpf_dir.to_str().context("workspace path is not UTF-8")?;
    // aya-build relays every line its nested cargo prints as a `warning:` of this build: keep that
    // cargo quiet, so that only real compiler warnings and errors of the programs show.
    std::env::set_var("CARGO_TERM_QUIET", "true");
    // Debug builds of the agent get the programs' debug logging (aya-log); release builds not.
    let features: &[&str] = if std::env::var("PROFILE").as_deref() == Ok("debug") {
        &["log"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: ebpf_dir,
            features,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context(
        "building the eBPF programs failed: run `cargo xtask setup` (nightly with rust-src and \
         bpf-linker), then build again",
    )
}
