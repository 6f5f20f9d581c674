//! Compiles the eBPF programs (`proxy-ebpf`, nightly, bpfel-unknown-none) so the agent can embed the
//! object with `include_bytes_aligned!`. `cargo xtask setup` installs what this needs.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("proxy-agent is inside the workspace")?;
    let ebpf_dir = workspace.join("proxy-ebpf");
    let common_dir = workspace.join("proxy-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    let ebpf_dir = ebpf_dir.to_str().context("workspace path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "proxy-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context(
        "building the eBPF programs failed: run `cargo xtask setup` (nightly with rust-src and \
         bpf-linker), then build again",
    )
}
