//! For unit tests: a folder of its own for one test, and a table built from manifests.

use std::path::{Path, PathBuf};

/// `<tmp>/gamma-<test>-<pid>`, made empty on creation (a failed run's leftovers go) and removed
/// when dropped (also when the test fails).
pub struct TestDir(PathBuf);

impl TestDir {
    pub fn new(test: &str) -> TestDir {
        let dir = std::env::temp_dir().join(format!("gamma-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TestDir(dir)
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `ns/front`, one HTTP port (80), no endpoints.
pub const FRONT: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: front, namespace: ns}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80}]\n";

/// Waits until `done`, checking every 20 ms; fails the test after 5 s.
pub async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The published table of the objects in one manifest text.
pub fn snapshot_of(manifests: &str) -> std::sync::Arc<gamma_engine::routes::Snapshot> {
    let mut index = gamma_engine::Index::new();
    let parsed = gamma_engine::manifests::parse(Path::new("test.yaml"), manifests);
    for object in parsed.objects {
        index.apply(object);
    }
    index.publish();
    index.snapshot()
}
