//! The command line: bad input gets a clear error and a non-zero exit. (Also makes `cargo test`
//! build the binary that the loopback and node tests run.)

use std::process::Command;

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_proxy-agent"))
}

#[test]
fn rejects_a_malformed_listen_flag() {
    let out = agent()
        .args(["--manifests", "/tmp", "--listen", "127.0.0.1:1=echo"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ADDR=NAMESPACE/SERVICE:PORT"), "{stderr}");
}

#[test]
fn rejects_a_missing_manifest_folder() {
    let out = agent()
        .args([
            "--manifests",
            "/nonexistent/gamma",
            "--admin",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a directory"), "{stderr}");
}
