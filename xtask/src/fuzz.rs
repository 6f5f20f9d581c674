//! `cargo xtask fuzz [--seconds N] [--dev] [TARGET...]`: every cargo-fuzz target of `fuzz/` (or the
//! ones named) for a bounded time each, starting from the committed seed corpus, with a summary of
//! executions per target. A crash fails the command and names the input libFuzzer saved. `--dev`
//! builds without optimizations: about 4 minutes on 2 cores instead of 10-20, for fewer executions
//! per second (what `cargo xtask test` uses for its short run).
//!
//! New inputs go to `target/fuzz-corpus/<target>/` (kept between runs, never committed); the
//! committed seeds in `fuzz/corpus/<target>/` are only read. Keep a crash's input as a
//! regression seed there once it is fixed.

use crate::util::{self, step};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

/// The targets in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "manifest",
    "route_match",
    "http1",
    "http1_framing",
    "upstream_answer",
    "index_ops",
];

const DEFAULT_SECONDS: u64 = 20;

pub fn run(args: &[String]) -> Result<()> {
    let mut seconds = DEFAULT_SECONDS;
    let mut dev = false;
    let mut targets = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = args.next().context("--seconds needs a number")?;
                seconds = value
                    .parse()
                    .with_context(|| format!("--seconds {value}: not a number of seconds"))?;
            }
            "--dev" => dev = true,
            name if TARGETS.contains(&name) => targets.push(name),
            other => bail!(
                "unknown fuzz argument `{other}`: expected --seconds N, --dev and target names ({})",
                TARGETS.join(", ")
            ),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.to_vec();
    }
    let root = util::workspace_root();
    if util::output(nightly_fuzz().arg("--version")).is_err() {
        bail!("cargo-fuzz is not installed: run `cargo xtask setup`");
    }
    let profile: &[&str] = if dev { &["--dev"] } else { &[] };
    let what = if dev { "unoptimized" } else { "release" };
    step(
        &format!("build the fuzz targets (nightly, AddressSanitizer, {what})"),
        || util::run(nightly_fuzz().arg("build").args(profile).current_dir(&root)),
    )?;
    let mut results = Vec::new();
    for target in &targets {
        let stats = step(&format!("fuzz {target} for {seconds} s"), || {
            fuzz_one(&root, target, seconds, profile)
        })?;
        results.push((target, stats));
    }
    eprintln!("fuzzing: {seconds} s per target, no crash");
    eprintln!(
        "    {:<12} {:>12} {:>10} {:>8}",
        "target", "executions", "per s", "corpus"
    );
    for (target, s) in &results {
        eprintln!(
            "    {target:<12} {:>12} {:>10} {:>8}",
            s.executions,
            s.executions / s.seconds.max(1),
            s.corpus
        );
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Stats {
    executions: u64,
    seconds: u64,
    /// Inputs in the corpus at the end (seeds included).
    corpus: u64,
}

/// Runs one target; its libFuzzer output goes to `target/fuzz-logs/<target>.log`, and on a
/// crash the end of it is printed.
fn fuzz_one(root: &Path, target: &str, seconds: u64, profile: &[&str]) -> Result<Stats> {
    let work = root.join("target/fuzz-corpus").join(target);
    let seeds = root.join("fuzz/corpus").join(target);
    let logs = root.join("target/fuzz-logs");
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&logs)?;
    let log_path = logs.join(format!("{target}.log"));
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut child = nightly_fuzz()
        .args(["run", target])
        .args(profile)
        .arg(&work)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        // A single input taking this long is a hang: the agent must answer or close promptly.
        .arg("-timeout=30")
        .arg("-print_final_stats=1")
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting cargo fuzz run")?;
    // libFuzzer reports on stderr; cargo's own output is short. Keep both in the log.
    let stdout = child.stdout.take().expect("piped");
    let copier = std::thread::spawn(move || lossy_lines(stdout).collect::<Vec<_>>());
    let mut stats = Stats {
        seconds,
        ..Stats::default()
    };
    let mut tail = std::collections::VecDeque::new();
    for line in lossy_lines(child.stderr.take().expect("piped")) {
        writeln!(log, "{line}")?;
        if let Some(n) = stat(&line, "stat::number_of_executed_units:") {
            stats.executions = n;
        }
        if let Some(n) = line
            .strip_prefix('#')
            .and_then(|l| l.split_once(" corp: ")?.1.split('/').next()?.parse().ok())
        {
            stats.corpus = n;
        }
        tail.push_back(line);
        if tail.len() > 60 {
            tail.pop_front();
        }
    }
    for line in copier.join().unwrap_or_default() {
        writeln!(log, "{line}")?;
    }
    let status = child.wait()?;
    if !status.success() {
        for line in &tail {
            eprintln!("    | {line}");
        }
        bail!(
            "fuzz target `{target}` failed ({status}); the input that crashed is under fuzz/artifacts/{target}/ \
             (reproduce: cargo +nightly fuzz run {target} fuzz/artifacts/{target}/<file>); whole log: {}",
            log_path.display()
        );
    }
    Ok(stats)
}

/// `cargo +nightly fuzz`, through rustup's `cargo`: not the stable cargo running xtask, whose
/// variables (`CARGO`, `RUSTC`) would otherwise reach cargo-fuzz's own cargo and rustc calls.
fn nightly_fuzz() -> Command {
    let mut command = Command::new("cargo");
    command
        .args(["+nightly", "fuzz"])
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN");
    command
}

/// Every line of a child's output, read to the end: a line that is not UTF-8 (inputs echoed in
/// a crash report) must not stop the reading, or the child dies of SIGPIPE on its next write.
fn lossy_lines(output: impl std::io::Read) -> impl Iterator<Item = String> {
    let mut reader = BufReader::new(output);
    std::iter::from_fn(move || {
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(String::from_utf8_lossy(&line).trim_end().to_string()),
        }
    })
}

fn stat(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?.trim().parse().ok()
}
