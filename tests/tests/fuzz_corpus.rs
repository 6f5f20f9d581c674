//! The committed fuzz seeds (`fuzz/corpus/<target>/`, the `regression-*` findings included)
//! replayed through the fuzz targets' own bodies, built here on stable: every test run checks
//! them without building the cargo-fuzz targets (nightly and sanitizers: `cargo xtask fuzz`).

#[path = "../../fuzz/src/lib.rs"]
mod targets;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = gamma_tests::workspace_root()
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seed in {}", dir.display());
    for file in files {
        let data = std::fs::read(&file).expect("a readable seed");
        // Printed first, so that a panic below names its input.
        eprintln!("{target}: {}", file.display());
        run(&data);
    }
}

#[test]
fn manifest_seeds() {
    replay("manifest", targets::manifest);
}

#[test]
fn route_match_seeds() {
    replay("route_match", targets::route_match);
}

#[test]
fn http1_seeds() {
    replay("http1", targets::http_connection);
}

#[test]
fn index_ops_seeds() {
    replay("index_ops", targets::index_ops);
}

#[test]
fn http1_framing_seeds() {
    replay("http1_framing", targets::http1_framing);
}

#[test]
fn upstream_answer_seeds() {
    replay("upstream_answer", targets::upstream_answer);
}
