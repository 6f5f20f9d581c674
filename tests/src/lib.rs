//! Shared test support: a simulated cluster built from manifests, the conformance case format,
//! loopback backends and the network-namespace node harness.

pub mod churn;
pub mod client;
pub mod cluster;
pub mod conformance;
pub mod echo;
pub mod fake_apiserver;
pub mod floor;
pub mod kube_world;
pub mod leak;
pub mod load;
pub mod loopback;
pub mod node;
pub mod peers;
pub mod probe;
pub mod raw_h2;
pub mod real_apiserver;
pub mod scenario;
pub mod soak;

/// Polls `check` every 20 ms until it gives a value; panics after `limit`. Returns the value and
/// how long it took.
pub fn eventually_within<T>(
    limit: std::time::Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> (T, std::time::Duration) {
    let started = std::time::Instant::now();
    loop {
        if let Some(value) = check() {
            return (value, started.elapsed());
        }
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A bound of the harness (a command, an agent's start), stretched by `$GAMMA_TIMEOUT_SCALE`
/// (default 1): on an emulated CPU (`cargo xtask kernels`) everything takes several times longer.
/// Timing assertions of the tests themselves are not stretched.
pub fn harness_timeout(limit: std::time::Duration) -> std::time::Duration {
    let scale = std::env::var("GAMMA_TIMEOUT_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    limit * scale
}

/// The workspace root (tests/ is one level below it).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("inside the workspace")
        .to_path_buf()
}

/// The shared folder (upstream conformance data, peer benchmarks): `$GAMMA_SHARED`, else
/// `shared/` beside the workspace (where the project keeps it).
pub fn shared_dir() -> std::path::PathBuf {
    std::env::var_os("GAMMA_SHARED")
        .map(Into::into)
        .unwrap_or_else(|| workspace_root().join("../shared"))
}

/// The conformance folder: `$GAMMA_CONFORMANCE_DIR`, else `conformance/` in the shared folder.
pub fn conformance_dir() -> std::path::PathBuf {
    std::env::var_os("GAMMA_CONFORMANCE_DIR")
        .map(Into::into)
        .unwrap_or_else(|| shared_dir().join("conformance"))
}

/// Reports a test as skipped: on stderr, and in the file `$GAMMA_SKIP_LOG` (when set) so that
/// `cargo xtask test` can list every skipped test with its reason at the end of the run.
pub fn skip(test: &str, reason: &str) {
    eprintln!("SKIPPED: {test}: {reason}");
    if let Some(path) = std::env::var_os("GAMMA_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(file, "{test}: {reason}");
        }
    }
}

/// `None` when running as root; otherwise why root-only tests are skipped.
pub fn root_required() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    (unsafe { libc::geteuid() } != 0).then(|| {
        "needs root (network namespaces, cgroups, eBPF); run `sudo cargo xtask test`".to_string()
    })
}

/// Counts answers per Deployment (the pod name minus its two hash segments, as upstream does).
pub fn deployment_tally<'a>(
    pods: impl Iterator<Item = &'a str>,
) -> std::collections::BTreeMap<String, usize> {
    let mut tally = std::collections::BTreeMap::new();
    for pod in pods {
        *tally
            .entry(conformance::deployment_of(pod).to_string())
            .or_default() += 1;
    }
    tally
}

/// A child process killed (and reaped) when dropped, also when the test holding it fails: an
/// agent left running would hold its ports and its takeover socket.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;

    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
