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
