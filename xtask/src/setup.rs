//! `cargo xtask setup`: everything the build, the demo and the tests need, installed idempotently.
//!
//! A second run checks each piece and rebuilds nothing.

use crate::check_deploy;
use crate::util::{self, output, run as run_command, step};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian packages the tests, the demo and the benchmarks call.
const PACKAGES: &[&str] = &[
    "iproute2",   // ip netns / link / route: the node harness
    "iptables",   // the simulated kube-proxy (DNAT) in the node netns
    "bpftool",    // inspecting loaded programs when a test fails
    "wrk",        // load for benchmarks and soaks
    "procps",     // ps/pgrep in scripts
    "util-linux", // nsenter
    "curl",
    "nginx", // a strict HTTP/1.1 upstream in the real-peer tests; a peer in `bench peers`
];

pub fn run() -> Result<()> {
    if !util::is_root() {
        bail!("setup installs Debian packages and loads nothing else: run it as root (sudo -E cargo xtask setup)");
    }
    step("Debian packages", install_packages)?;
    step(
        "kubectl with kustomize (for `cargo xtask check-deploy`)",
        kubectl_kustomize,
    )?;
    step(
        "nightly toolchain with rust-src (for the eBPF crate)",
        nightly_rust_src,
    )?;
    step("bpf-linker built against nightly's LLVM", bpf_linker)?;
    step("cargo-fuzz (for `cargo xtask fuzz`)", cargo_fuzz)?;
    step(
        "Python peers: grpcio (gRPC C-core) and h2, in a venv (for the real-peer tests)",
        peers_venv,
    )?;
    step(
        "a real Kubernetes API server for the Gateway API kinds (for the real-API-server tests)",
        real_apiserver,
    )?;
    eprintln!("setup complete: `cargo build` now builds the agent with its eBPF object embedded");
    Ok(())
}

fn install_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !package_installed(pkg))
        .collect();
    if missing.is_empty() {
        eprintln!("    all present: {}", PACKAGES.join(" "));
        return Ok(());
    }
    eprintln!("    installing: {}", missing.join(" "));
    apt_install(&missing)
        .context("apt-get install failed: install the packages above by hand and run setup again")
}

fn apt_install(packages: &[&str]) -> Result<()> {
    run_command(Command::new("apt-get").arg("update").arg("-q"))
        .context("apt-get update failed: check the machine's Debian mirror settings")?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// What to install when neither the machine nor its package sources have a working kubectl.
const KUBECTL_HINT: &str = "install kubectl 1.27 or newer (its `kubectl kustomize` is kustomize \
                            v5) from the Kubernetes project's packages and run setup again";

/// check-deploy renders deploy/ with `kubectl kustomize`: kubectl must run and render a
/// kustomization, which a generated ConfigMap shows.
fn kubectl_kustomize() -> Result<()> {
    let kubectl_version = || output(Command::new("kubectl").args(["version", "--client"]));
    if kubectl_version().is_err() {
        apt_install(&["kubectl"]).with_context(|| {
            format!("kubectl is missing and `apt-get install kubectl` failed: {KUBECTL_HINT}")
        })?;
    }
    let version =
        kubectl_version().with_context(|| format!("kubectl does not run: {KUBECTL_HINT}"))?;
    let probe = std::env::temp_dir().join(format!("xtask-kustomize-probe-{}", std::process::id()));
    std::fs::create_dir_all(&probe).with_context(|| format!("creating {}", probe.display()))?;
    std::fs::write(
        probe.join("kustomization.yaml"),
        "configMapGenerator: [{name: probe, literals: [key=value]}]\n",
    )
    .with_context(|| format!("writing a kustomization in {}", probe.display()))?;
    let rendered = check_deploy::kustomize(&probe);
    let _ = std::fs::remove_dir_all(&probe);
    match rendered {
        Ok(yaml) if yaml.contains("kind: ConfigMap") => {}
        Ok(yaml) => bail!(
            "`kubectl kustomize` rendered no ConfigMap from its generator: {yaml}\n{KUBECTL_HINT}"
        ),
        Err(e) => bail!("{e}\n{KUBECTL_HINT}"),
    }
    eprintln!("    {}", version.lines().collect::<Vec<_>>().join(", "));
    Ok(())
}

fn package_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .map(|status| status.contains("install ok installed"))
        .unwrap_or(false)
}

fn nightly_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run_command(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context(
            "could not install the nightly toolchain: check network access to rustup's servers",
        )?;
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("    rust-src already installed for nightly");
        return Ok(());
    }
    run_command(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

/// What nightly's rustc says about its LLVM: the major version picks bpf-linker's `llvm-NN` feature,
/// and the shared library is what bpf-linker links against (prebuilt binaries can't be fetched here).
struct NightlyLlvm {
    major: u32,
    /// `rustc +nightly -vV` in full: a changed toolchain means bpf-linker must be rebuilt.
    fingerprint: String,
    library: PathBuf,
}

fn nightly_llvm() -> Result<NightlyLlvm> {
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    let major: u32 = llvm
        .split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .with_context(|| format!("can't read the LLVM major version from `{llvm}`"))?;
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let library = std::fs::read_dir(&lib_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: reinstall the nightly toolchain",
                lib_dir.display()
            )
        })?;
    Ok(NightlyLlvm {
        major,
        fingerprint: version,
        library,
    })
}

/// The version `cargo xtask fuzz` is known to work with; a different one installed is replaced.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn cargo_fuzz() -> Result<()> {
    let installed = output(Command::new(cargo_home().join("bin/cargo-fuzz")).arg("--version"))
        .unwrap_or_default();
    if installed.trim() == format!("cargo-fuzz {CARGO_FUZZ_VERSION}") {
        eprintln!("    {} already installed", installed.trim());
        return Ok(());
    }
    run_command(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
    .context("cargo install cargo-fuzz failed: check access to crates.io")
}

/// The real-peer tests' Python packages, pinned; `tests/src/peers.rs` finds the venv.
const PEER_PACKAGES: &[&str] = &["grpcio==1.85.3", "h2==4.4.1"];
const PEERS_VENV: &str = "/var/cache/gamma-node/peers-venv";

fn peers_venv() -> Result<()> {
    let venv = Path::new(PEERS_VENV);
    let python = venv.join("bin/python");
    let pinned = || {
        let frozen =
            output(Command::new(&python).args(["-m", "pip", "freeze"])).unwrap_or_default();
        PEER_PACKAGES
            .iter()
            .all(|p| frozen.lines().any(|l| l.eq_ignore_ascii_case(p)))
    };
    if pinned() {
        eprintln!("    {} already in {PEERS_VENV}", PEER_PACKAGES.join(" "));
        return Ok(());
    }
    if !python.exists() {
        std::fs::create_dir_all(venv.parent().context("venv parent")?)?;
        run_command(Command::new("python3").args(["-m", "venv", PEERS_VENV]))
            .context("python3 -m venv failed: install Debian's python3-venv and run setup again")?;
    }
    run_command(
        Command::new(&python)
            .args(["-m", "pip", "install", "-q"])
            .args(PEER_PACKAGES),
    )
    .context("pip install failed: check access to PyPI")
}

/// Where the real API server is built and cached (`tests/src/real_apiserver.rs` reads it there).
const REAL_APISERVER: &str = "/var/cache/gamma-node/real-apiserver";

/// Builds `../shared/tools/real-apiserver/` once per machine. Its sources come from Debian's
/// unstable suite, which moves: a failed build does not fail setup, it is recorded in
/// `build-failed` and the tests report their tier as skipped with that reason.
fn real_apiserver() -> Result<()> {
    let dir = Path::new(REAL_APISERVER);
    let failed = dir.join("build-failed");
    if dir.join("crdserver").exists() && dir.join("gort/root/usr/bin/etcd").exists() {
        eprintln!("    already built in {REAL_APISERVER}");
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let script = util::workspace_root().join("../shared/tools/real-apiserver/build.sh");
    match run_command(Command::new("bash").arg(&script).env("W", dir)) {
        Ok(()) => {
            let _ = std::fs::remove_file(&failed);
            Ok(())
        }
        Err(e) => {
            let reason = format!(
                "[external] {} failed: {e:#} (Debian's unstable packages may have moved; see target/xtask/setup.log)",
                script.display()
            );
            std::fs::write(&failed, &reason)?;
            util::warn(&format!(
                "the real API server tier will be skipped: {reason}"
            ));
            Ok(())
        }
    }
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo")
        })
}

fn bpf_linker() -> Result<()> {
    let llvm = nightly_llvm()?;
    let stamp = cargo_home().join("bpf-linker.toolchain");
    let installed = cargo_home().join("bin/bpf-linker");
    let up_to_date = installed.exists()
        && std::fs::read_to_string(&stamp).is_ok_and(|s| s == llvm.fingerprint)
        && Command::new(&installed)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if up_to_date {
        eprintln!(
            "    bpf-linker already built for nightly's LLVM {}",
            llvm.major
        );
        return Ok(());
    }

    // llvm-sys wants an LLVM "prefix": a folder whose lib/ holds libLLVM.so and its soname.
    let prefix = cargo_home().join(format!("bpf-linker-llvm-{}", llvm.major));
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    let soname = llvm.library.file_name().expect("a file").to_owned();
    for name in [std::ffi::OsStr::new("libLLVM.so"), soname.as_os_str()] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm.library, &link)
            .with_context(|| format!("could not create {}", link.display()))?;
    }
    let feature = format!("llvm-{}", llvm.major);
    eprintln!(
        "    building bpf-linker with feature {feature} against {}",
        llvm.library.display()
    );
    let out = Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--force",
            "--no-default-features",
            "--features",
            &feature,
        ])
        .env("LLVM_PREFIX", &prefix)
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::piped())
        .output()
        .context("could not run cargo install")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{stderr}");
        if stderr.contains("does not have") && stderr.contains(&feature) {
            bail!(
                "bpf-linker has no feature `{feature}` for nightly's LLVM {}: pin a nightly whose LLVM \
                 bpf-linker supports (`rustup toolchain install nightly-YYYY-MM-DD`) or wait for a \
                 bpf-linker release with `{feature}`",
                llvm.major
            );
        }
        bail!("cargo install bpf-linker failed (output above)");
    }
    Command::new(&installed)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .with_context(|| {
            format!(
                "{} was built but does not run: check that {} is readable",
                installed.display(),
                llvm.library.display()
            )
        })?;
    std::fs::write(&stamp, &llvm.fingerprint)?;
    Ok(())
}
