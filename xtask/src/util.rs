//! Small helpers for running commands with visible steps.

use anyhow::{bail, Context, Result};
use std::process::Command;
use std::time::Instant;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions. Declared here to keep xtask free of a libc dependency.
    extern "C" {
        fn geteuid() -> u32;
    }
    unsafe { geteuid() == 0 }
}

pub fn warn(message: &str) {
    eprintln!("xtask: warning: {message}");
}

/// Runs `body` as a named step, printing its start, end and duration.
pub fn step<T>(name: &str, body: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("==> {name}");
    let started = Instant::now();
    let result = body().with_context(|| format!("step `{name}` failed"));
    match &result {
        Ok(_) => eprintln!("    {name}: ok ({:.1}s)", started.elapsed().as_secs_f64()),
        Err(_) => eprintln!(
            "    {name}: FAILED after {:.1}s",
            started.elapsed().as_secs_f64()
        ),
    }
    result
}

/// Runs a command with inherited stdio and fails with the command line if it exits non-zero.
pub fn run(command: &mut Command) -> Result<()> {
    let line = format!("{command:?}");
    let status = command
        .status()
        .with_context(|| format!("could not start {line}"))?;
    if !status.success() {
        bail!("{line} exited with {status}");
    }
    Ok(())
}

/// Runs a command and returns its standard output, or an error naming it.
pub fn output(command: &mut Command) -> Result<String> {
    let line = format!("{command:?}");
    let out = command
        .output()
        .with_context(|| format!("could not start {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} exited with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo <args>` with the cargo that runs xtask.
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args))
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}
