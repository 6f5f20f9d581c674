//! `cargo xtask kernels`: the root-only tests on the kernels users run, not only this machine's.
//!
//! Debian's kernels boot in qemu (`<shared>/tools/kernel-matrix`: `fetch.sh`, `run.sh`) with this
//! machine's root filesystem shared in, so the test binaries built here run there as root.
//! Emulated CPUs are slow, so each kernel runs what it is there to show:
//! - Debian 12 (6.1) and 13 (6.12): `ebpf_load`, and `node_e2e`'s cases shared out between them
//!   (1 emulated CPU each: Debian's 6.12 panics at boot under TCG with more);
//! - Debian 11 (5.10, no lookup-and-delete on LRU maps): the agent refuses to attach and pods'
//!   traffic to mesh Services keeps flowing through ordinary Service routing; and the node
//!   harness cleans up without `cgroup.kill` (5.14+).
//!
//! A kernel that cannot be fetched is a recorded skip with its reason (`$GAMMA_SKIP_LOG`), as is
//! a test the guest itself skipped; neither passes.

use crate::util::{self, step};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// One test binary (of `tests/tests/`) and the tests of it to run; none: all.
struct TestRun {
    binary: &'static str,
    filters: &'static [&'static str],
}

struct Kernel {
    /// Debian suite whose default kernel this is.
    suite: &'static str,
    /// The kernel release's start, to match fetch.sh's output to the suite.
    release: &'static str,
    cpus: u32,
    runs: &'static [TestRun],
}

const EBPF_LOAD: TestRun = TestRun {
    binary: "ebpf_load",
    filters: &[],
};
/// The refusal test checks the agent against the kernel's abilities on every kernel.
const REFUSAL: &str = "redirect_follows_what_the_kernel_supports";

/// `--local-sockets` leans on the kernel's sockmap code, which changed much between releases: on
/// both kernels that run the redirect.
const LOCAL_SOCKETS: &str = "local_sockets_move_the_bytes_of_connections_through_the_agent";

/// Emulated, one scenario of `node_e2e` takes about a minute (a node of a dozen namespaces and
/// processes): its cases are spread over the kernels rather than all run on each, and the
/// refusal check runs on all three.
const MATRIX: &[Kernel] = &[
    Kernel {
        suite: "bookworm",
        release: "6.1.",
        cpus: 1,
        runs: &[
            EBPF_LOAD,
            TestRun {
                binary: "node_e2e",
                // Not `agent_down_fails_open_and_restart_resumes`: emulated, its first call can beat
                // the agent's update of the kernel map (the harness waits for the route table
                // only), and it asserts a fall-back within 1 s.
                filters: &[
                    "mesh_vip_is_redirected_with_destination_caller_and_peer",
                    "vip_without_routes_is_left_to_kube_proxy",
                    LOCAL_SOCKETS,
                    REFUSAL,
                ],
            },
        ],
    },
    Kernel {
        suite: "trixie",
        release: "6.12.",
        cpus: 1,
        runs: &[
            EBPF_LOAD,
            TestRun {
                binary: "node_e2e",
                filters: &[
                    "a_process_using_another_pods_ip_gets_no_consumer_routes",
                    // connect6, IPv6 records and getpeername6 with a real agent behind them.
                    "an_ipv6_cluster_ip_is_steered_to_the_agents_ipv6_listener",
                    LOCAL_SOCKETS,
                    REFUSAL,
                ],
            },
        ],
    },
    Kernel {
        suite: "bullseye",
        release: "5.10.",
        cpus: 1,
        runs: &[
            TestRun {
                binary: "node_e2e",
                filters: &[REFUSAL],
            },
            TestRun {
                binary: "node_harness",
                filters: &["a_dropped_node_leaves_nothing_behind"],
            },
        ],
    },
];

/// Bound on one boot-and-test in the emulator (a hung guest must not stall the run).
const VM_TIMEOUT: Duration = Duration::from_secs(600);

/// How much longer the harness waits in a guest (an emulated CPU is several times slower, more
/// when guests share the cores): its commands and the agent's start, not the tests' assertions.
const GUEST_TIMEOUT_SCALE: u32 = 6;

/// The outcome of one test binary on one kernel.
enum Cell {
    Passed {
        passed: u32,
        took: Duration,
    },
    Failed {
        passed: u32,
        failed: u32,
        took: Duration,
    },
    Skipped(String),
}

impl std::fmt::Display for Cell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cell::Passed { passed, took } => {
                write!(f, "pass {passed}/{passed} ({}s)", took.as_secs())
            }
            Cell::Failed {
                passed,
                failed,
                took,
            } => write!(f, "FAIL {passed}/{} ({}s)", passed + failed, took.as_secs()),
            Cell::Skipped(reason) => write!(f, "skip: {reason}"),
        }
    }
}

/// `cargo xtask kernels [--no-host]`: the matrix, then its table. `--no-host` leaves out this
/// machine's kernel (`cargo xtask test` has just run every test on it).
pub fn run(args: &[String]) -> Result<()> {
    let with_host = !args.iter().any(|a| a == "--no-host");
    if let Some(unknown) = args.iter().find(|a| *a != "--no-host") {
        bail!("unknown argument `{unknown}`: cargo xtask kernels [--no-host]");
    }
    let started = Instant::now();
    let mut rows: Vec<(String, Vec<(&'static str, Cell)>)> = Vec::new();
    if !util::is_root() {
        let reason = "needs root (qemu guests run the tests as root; eBPF, namespaces)";
        util::record_skip("kernel matrix", reason);
        rows.push((
            "all kernels".into(),
            vec![("-", Cell::Skipped(reason.into()))],
        ));
        print_table(&rows, started.elapsed());
        return Ok(());
    }
    let binaries = step("build the test binaries and what they run", build)?;
    if with_host {
        let host = format!("host {}", host_release());
        let cells = [EBPF_LOAD.binary, "node_e2e"]
            .into_iter()
            .map(|binary| {
                // Its skips are read from its output, like a guest's: not logged twice.
                let mut tests = Command::new(&binaries[binary]);
                tests
                    .args(["--color", "never", "--test-threads=1"])
                    .env_remove("GAMMA_SKIP_LOG");
                let cell = run_tests(&host, binary, &mut tests);
                (binary, cell)
            })
            .collect();
        rows.push((host, cells));
    }
    let tools = kernel_matrix_dir();
    let fetched = step("fetch Debian's kernels (kernel-matrix/fetch.sh)", || {
        Ok(fetch(&tools))
    })?;
    // Guests whose emulated CPUs fit on this machine's cores together run side by side.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    for batch in batches(cores) {
        let batch_rows: Vec<_> = std::thread::scope(|scope| {
            let running: Vec<_> = batch
                .iter()
                .map(|kernel| scope.spawn(|| kernel_row(kernel, &fetched, &tools, &binaries)))
                .collect();
            running
                .into_iter()
                .map(|row| row.join().expect("a kernel's thread panicked"))
                .collect()
        });
        rows.extend(batch_rows);
    }
    print_table(&rows, started.elapsed());
    let failed = rows
        .iter()
        .flat_map(|(_, cells)| cells)
        .any(|(_, cell)| matches!(cell, Cell::Failed { .. }));
    if failed {
        bail!("a test failed on a kernel of the matrix (see above)");
    }
    Ok(())
}

/// The matrix in batches of kernels whose guests' CPUs add up to at most `cores` (a bigger
/// guest alone).
fn batches(cores: u32) -> Vec<Vec<&'static Kernel>> {
    let mut batches: Vec<(u32, Vec<&'static Kernel>)> = Vec::new();
    for kernel in MATRIX {
        match batches
            .iter_mut()
            .find(|(cpus, _)| cpus + kernel.cpus <= cores)
        {
            Some((cpus, batch)) => {
                *cpus += kernel.cpus;
                batch.push(kernel);
            }
            None => batches.push((kernel.cpus, vec![kernel])),
        }
    }
    batches.into_iter().map(|(_, batch)| batch).collect()
}

/// One kernel's row: each of its test runs in a guest, or skips when it could not be fetched.
fn kernel_row(
    kernel: &Kernel,
    fetched: &Result<Vec<String>, String>,
    tools: &Path,
    binaries: &std::collections::HashMap<&'static str, PathBuf>,
) -> (String, Vec<(&'static str, Cell)>) {
    let wanted = format!(
        "Debian {} {}",
        kernel.suite,
        kernel.release.trim_end_matches('.')
    );
    let release = match fetched {
        Err(reason) => return (wanted.clone(), skip_all(&wanted, kernel, reason)),
        Ok(releases) => releases.iter().find(|r| r.starts_with(kernel.release)),
    };
    let Some(release) = release else {
        let reason = format!(
            "fetch.sh found no {} kernel for {}",
            kernel.release, kernel.suite
        );
        return (wanted.clone(), skip_all(&wanted, kernel, &reason));
    };
    let row = format!("Debian {} {release}", kernel.suite);
    let cells = kernel
        .runs
        .iter()
        .map(|run| {
            let cell = in_vm(tools, release, kernel.cpus, binaries, run, &row);
            (run.binary, cell)
        })
        .collect();
    (row, cells)
}

fn skip_all(row: &str, kernel: &Kernel, reason: &str) -> Vec<(&'static str, Cell)> {
    kernel
        .runs
        .iter()
        .map(|run| {
            util::record_skip(&format!("{} on {row}", run.binary), reason);
            (run.binary, Cell::Skipped(reason.to_string()))
        })
        .collect()
}

/// Builds the binaries the tests start and the test binaries; their paths by test name.
fn build() -> Result<std::collections::HashMap<&'static str, PathBuf>> {
    util::cargo(&["build", "--bins"])?;
    // Workspace-wide like `cargo xtask test`, so that both resolve features alike (no rebuild).
    let mut args = vec!["test", "--no-run", "--message-format=json"];
    let names: Vec<&'static str> = MATRIX
        .iter()
        .flat_map(|k| k.runs.iter().map(|r| r.binary))
        .chain(["node_e2e"])
        .collect();
    for name in &names {
        args.extend(["--test", name]);
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = util::output(Command::new(cargo).args(&args))?;
    let mut binaries = std::collections::HashMap::new();
    for line in out.lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) else {
            continue;
        };
        if let Some(known) = names.iter().find(|n| **n == name) {
            binaries.insert(*known, PathBuf::from(exe));
        }
    }
    for name in &names {
        if !binaries.contains_key(name) {
            bail!("cargo built no test binary `{name}` (tests/tests/{name}.rs)");
        }
    }
    Ok(binaries)
}

/// `<shared>/tools/kernel-matrix`: `$GAMMA_SHARED`, else `shared/` beside the workspace.
fn kernel_matrix_dir() -> PathBuf {
    std::env::var_os("GAMMA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| util::workspace_root().join("../shared"))
        .join("tools/kernel-matrix")
}

/// The kernel releases fetch.sh has ready, or why none could be had.
fn fetch(tools: &Path) -> Result<Vec<String>, String> {
    let script = tools.join("fetch.sh");
    if !script.exists() {
        return Err(format!(
            "{} not found: set GAMMA_SHARED to the shared folder",
            script.display()
        ));
    }
    // virtme-ng builds an initramfs for Debian's kernels (their 9p and virtio drivers are
    // modules) from busybox, which fetch.sh does not install.
    let has_busybox = Command::new("busybox").arg("true").output().is_ok();
    if !has_busybox {
        util::run(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "busybox-static"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .map_err(|e| format!("virtme-ng needs busybox to boot Debian's kernels: {e:#}"))?;
    }
    let out = Command::new("bash")
        .arg(&script)
        .args(MATRIX.iter().map(|k| k.suite))
        .output()
        .map_err(|e| format!("could not run {}: {e}", script.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // fetch.sh goes on past a suite without a kernel; its message is the reason for that suite.
    for line in stderr.lines().filter(|l| l.starts_with("no kernel found")) {
        util::warn(line);
    }
    if !out.status.success() {
        let last = stderr.lines().last().unwrap_or("no output");
        return Err(format!("fetch.sh failed ({}): {last}", out.status));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// Boots `release` and runs one test binary in it (`run.sh`).
fn in_vm(
    tools: &Path,
    release: &str,
    cpus: u32,
    binaries: &std::collections::HashMap<&'static str, PathBuf>,
    run: &TestRun,
    row: &str,
) -> Cell {
    // The guest's /tmp is its own: a skip is read from the output (tests print `SKIPPED: `).
    let mut command = format!(
        "env RUST_BACKTRACE=1 GAMMA_TIMEOUT_SCALE={GUEST_TIMEOUT_SCALE} {} --color never \
         --test-threads=1",
        binaries[run.binary].display()
    );
    if !run.filters.is_empty() {
        command.push_str(" --exact ");
        command.push_str(&run.filters.join(" "));
    }
    let mut vm = Command::new("bash");
    vm.arg(tools.join("run.sh"))
        .arg(release)
        .arg(command)
        .current_dir(util::workspace_root())
        .env("VM_CPUS", cpus.to_string())
        .env("VM_TIMEOUT", VM_TIMEOUT.as_secs().to_string());
    run_tests(row, run.binary, &mut vm)
}

/// Runs a test binary (directly or in a guest), shows its output and reads libtest's summary.
fn run_tests(row: &str, binary: &str, command: &mut Command) -> Cell {
    eprintln!("==> {binary} on {row}");
    let cell = run_and_read(row, binary, command);
    eprintln!("    {binary} on {row}: {cell}");
    cell
}

fn run_and_read(row: &str, binary: &str, command: &mut Command) -> Cell {
    let started = Instant::now();
    let out = match command.output() {
        Ok(out) => out,
        Err(e) => {
            util::warn(&format!("{binary} on {row}: could not start: {e}"));
            return Cell::Failed {
                passed: 0,
                failed: 1,
                took: started.elapsed(),
            };
        }
    };
    let took = started.elapsed();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The whole output of a failure (one write: guests may run side by side); a pass is its row.
    let show_output = || {
        let quoted: String = text.lines().map(|l| format!("    {row} | {l}\n")).collect();
        eprint!("{quoted}");
    };
    let mut skipped = Vec::new();
    for line in text.lines() {
        if let Some(skip) = line.trim().strip_prefix("SKIPPED: ") {
            util::record_skip(&format!("{row}: {skip}"), "skipped in the guest");
            skipped.push(skip.to_string());
        }
    }
    let Some((passed, failed)) = summary(&text) else {
        show_output();
        util::warn(&format!(
            "{binary} on {row}: no test summary (the guest crashed or timed out?)"
        ));
        return Cell::Failed {
            passed: 0,
            failed: 1,
            took,
        };
    };
    if failed == 0 && !out.status.success() {
        // run.sh judges by a marker the guest prints last, which its console sometimes loses
        // at power-off; libtest's summary above is the tests' own verdict.
        util::warn(&format!(
            "{binary} on {row}: the tests passed but the runner exited with {}",
            out.status
        ));
    }
    if failed > 0 {
        show_output();
        return Cell::Failed {
            passed,
            failed,
            took,
        };
    }
    if !skipped.is_empty() {
        return Cell::Skipped(format!(
            "{} test(s) skipped: {}",
            skipped.len(),
            skipped.join("; ")
        ));
    }
    Cell::Passed { passed, took }
}

/// libtest's `... 3 passed; 0 failed; ...` → (3, 0); several summaries add up. Matched anywhere in
/// a line: a guest's console may put kernel messages before it.
fn summary(output: &str) -> Option<(u32, u32)> {
    let mut found = None;
    for line in output
        .lines()
        .filter(|l| l.contains(" passed; ") && l.contains(" failed;"))
    {
        let count = |what: &str| -> u32 {
            line.split(';')
                .find_map(|part| {
                    part.trim()
                        .strip_suffix(what)?
                        .rsplit(' ')
                        .next()?
                        .parse()
                        .ok()
                })
                .unwrap_or(0)
        };
        let (passed, failed) = found.unwrap_or((0, 0));
        found = Some((passed + count(" passed"), failed + count(" failed")));
    }
    found
}

fn host_release() -> String {
    util::output(Command::new("uname").arg("-r"))
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|_| "(unknown)".into())
}

fn print_table(rows: &[(String, Vec<(&'static str, Cell)>)], took: Duration) {
    let mut columns: Vec<&str> = Vec::new();
    for (_, cells) in rows {
        for (binary, _) in cells {
            if !columns.contains(binary) {
                columns.push(binary);
            }
        }
    }
    let kernel_width = rows.iter().map(|(r, _)| r.len()).max().unwrap_or(6).max(6);
    let text_of = |cells: &[(&str, Cell)], column: &str| {
        cells
            .iter()
            .find(|(b, _)| *b == column)
            .map_or_else(|| "-".to_string(), |(_, c)| c.to_string())
    };
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| {
            rows.iter()
                .map(|(_, cells)| text_of(cells, c).len())
                .chain([c.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    eprintln!("\nkernel matrix ({}s):", took.as_secs());
    let mut header = format!("  {:kernel_width$}", "kernel");
    for (c, w) in columns.iter().zip(&widths) {
        header.push_str(&format!(" | {c:w$}"));
    }
    eprintln!("{header}");
    for (row, cells) in rows {
        let mut line = format!("  {row:kernel_width$}");
        for (c, w) in columns.iter().zip(&widths) {
            line.push_str(&format!(" | {:w$}", text_of(cells, c)));
        }
        eprintln!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries_of_each_binary_add_up() {
        let output = "running 3 tests\n\
            test result: ok. 3 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 5.1s\n\
            [ 38.3] eth0: up test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured\n";
        assert_eq!(summary(output), Some((4, 2)));
        assert_eq!(summary("kernel panic"), None);
    }

    #[test]
    fn every_kernel_runs_something_and_5_10_checks_the_refusal() {
        assert!(MATRIX.iter().all(|k| !k.runs.is_empty()));
        let old = MATRIX.iter().find(|k| k.release == "5.10.").unwrap();
        assert!(old.runs.iter().any(|r| r.filters.contains(&REFUSAL)));
    }

    #[test]
    fn guests_share_the_cores_they_fit_on() {
        let cpus = |batch: &Vec<&Kernel>| batch.iter().map(|k| k.cpus).sum::<u32>();
        let two = batches(2);
        assert_eq!(two.iter().map(Vec::len).sum::<usize>(), MATRIX.len());
        assert!(two.iter().all(|b| cpus(b) <= 2));
        assert_eq!(
            batches(1).len(),
            MATRIX.len(),
            "one core: one guest at a time"
        );
    }
}
