//! Shared test support: a simulated cluster built from manifests, the conformance case format,
//! loopback backends and the network-namespace node harness.

pub mod cluster;
pub mod conformance;
pub mod echo;
pub mod loopback;

/// The workspace root (tests/ is one level below it).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("inside the workspace").to_path_buf()
}

/// The conformance folder: `$GAMMA_CONFORMANCE_DIR`, else `../shared/conformance` beside the
/// workspace.
pub fn conformance_dir() -> std::path::PathBuf {
    std::env::var_os("GAMMA_CONFORMANCE_DIR")
        .map(Into::into)
        .unwrap_or_else(|| workspace_root().join("../shared/conformance"))
}
