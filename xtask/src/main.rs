//! `cargo xtask <command>`: the project's setup, tests, demo and benchmarks.
//! Every command prints the steps it runs; a failure names the step and what to do.

mod setup;
mod util;

use anyhow::{bail, Result};

const USAGE: &str = "\
usage: cargo xtask <command>

  setup          install what the build, demo and tests need (idempotent; run as root)
  test           every test: unit, integration, root-only (netns, eBPF) and conformance
  demo           the seed scenario on one machine: a node made of network namespaces
  conformance    the GAMMA mesh conformance cases end to end [--cases DIR] [--test NAME]
  bench [what]   criterion benchmarks (engine), `bench peers`, `bench redirect`
";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first() else {
        eprint!("{USAGE}");
        std::process::exit(2);
    };
    let rest = &args[1..];
    match command.as_str() {
        "setup" => setup::run(),
        "test" => test(rest),
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command `{other}`\n{USAGE}"),
    }
}

/// Runs every test of the workspace. Root-only tests decide for themselves whether they can run and
/// print `SKIPPED: <reason>` when they cannot; this command reports that they were skipped.
fn test(extra: &[String]) -> Result<()> {
    if !util::is_root() {
        util::warn(
            "not root: the network-namespace and eBPF tests will report themselves as SKIPPED; \
             run as root to run them",
        );
    }
    let mut args = vec!["test", "--workspace", "--all-targets"];
    args.extend(extra.iter().map(String::as_str));
    util::step("unit and integration tests", || util::cargo(&args))?;
    Ok(())
}
