//! Small helpers for running commands as named steps, their output in a log file.

use anyhow::{bail, Context, Result};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
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

/// Where the commands a step runs write their output: one file per xtask command
/// (`target/xtask/<command>.log`), so that the terminal shows one line per step.
static LOG: OnceLock<PathBuf> = OnceLock::new();
/// Lines of the log shown when a command fails.
const TAIL_LINES: usize = 40;

/// Sends the output of logged commands to `target/xtask/<command>.log` from now on (truncated).
pub fn log_to(command: &str) -> Result<()> {
    let dir = workspace_root().join("target/xtask");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{command}.log"));
    std::fs::write(&path, "").with_context(|| format!("creating {}", path.display()))?;
    let _ = LOG.set(path);
    Ok(())
}

/// Runs `body` as a named step: one line with its outcome and duration. What its commands print
/// goes to the log (see [`run`]); a failed command's last lines are shown.
pub fn step<T>(name: &str, body: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("==> {name}");
    let started = Instant::now();
    let result = body().with_context(|| format!("step `{name}` failed"));
    let took = started.elapsed().as_secs_f64();
    match &result {
        Ok(_) => eprintln!("    ok ({took:.1}s)"),
        Err(_) => eprintln!("    FAILED after {took:.1}s"),
    }
    result
}

/// Runs a command with its output appended to the log (inherited when no log is set); fails with
/// the command line, the log's last lines and its path if it exits non-zero.
pub fn run(command: &mut Command) -> Result<()> {
    let Some(log) = LOG.get() else {
        return run_shown(command);
    };
    let line = format!("{command:?}");
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut header = file.try_clone()?;
    writeln!(header, "\n$ {line}")?;
    let status = command
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("could not start {line}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        eprintln!("    --- last lines of {} ---", log.display());
        for l in &lines[lines.len().saturating_sub(TAIL_LINES)..] {
            eprintln!("    {l}");
        }
        bail!(
            "{line} exited with {status} (whole output: {})",
            log.display()
        );
    }
    Ok(())
}

/// Runs a command whose output is the point (tests, the demo, benchmarks) on the terminal, and
/// fails with the command line if it exits non-zero.
pub fn run_shown(command: &mut Command) -> Result<()> {
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

/// `cargo <args>` with the cargo that runs xtask, its output in the log.
pub fn cargo(args: &[&str]) -> Result<()> {
    run(&mut cargo_command(args))
}

/// `cargo <args>` with its output on the terminal.
pub fn cargo_shown(args: &[&str]) -> Result<()> {
    run_shown(&mut cargo_command(args))
}

fn cargo_command(args: &[&str]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(args);
    command
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Records a skip in `$GAMMA_SKIP_LOG` (`cargo xtask test` lists them at its end) and on stderr.
pub fn record_skip(what: &str, reason: &str) {
    eprintln!("SKIPPED: {what}: {reason}");
    if let Some(path) = std::env::var_os("GAMMA_SKIP_LOG") {
        if let Ok(mut log) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(log, "{what}: {reason}");
        }
    }
}
