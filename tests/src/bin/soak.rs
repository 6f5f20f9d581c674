//! `gamma-soak restart [--restarts N] [--seconds S] [--fresh-programs-every K] [--cold]`: the
//! restart soak of `gamma_tests::soak` (run by `cargo xtask soak restart`, as root). Prints
//! requests sent, failed and reset, and the restarts done; exits non-zero if anything was lost.
//! `--cold` restarts the old way (SIGTERM, then a fresh start): the baseline, which loses.
//!
//! `gamma-soak churn [--seconds S] [--changes-per-second N] [--outages K] [--outage-seconds D]`:
//! the churn soak of `gamma_tests::churn` (run by `cargo xtask soak churn`; loopback, no root).
//! Prints requests sent and failed, changes made and published, each outage and the agent's RSS
//! over time; exits non-zero if a request failed or the agent did not catch up.
//!
//! `gamma-soak leak [--connections N] [--concurrency C]`: the leak soak of `gamma_tests::leak`
//! (run by `cargo xtask soak leak`; loopback, no root). Prints the agent's descriptors, RSS,
//! threads and tasks idle, at the peak and after; exits non-zero if they did not come back.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use gamma_tests::churn::{self, ChurnConfig};
use gamma_tests::leak::{self, LeakConfig};
use gamma_tests::soak::{self, SoakConfig};
use std::time::Duration;

#[derive(Parser)]
#[command(about = "gamma-node's soaks (run them through `cargo xtask soak`)")]
struct Cli {
    #[command(subcommand)]
    soak: Soak,
}

/// Unset flags keep `ChurnConfig`'s and `SoakConfig`'s defaults.
#[derive(Subcommand)]
enum Soak {
    /// Takeovers (or cold restarts) of the agent under load, on a node of network namespaces.
    Restart {
        #[arg(long)]
        restarts: Option<usize>,
        #[arg(long)]
        seconds: Option<u64>,
        /// Every Kth takeover swaps the eBPF programs.
        #[arg(long)]
        fresh_programs_every: Option<usize>,
        /// SIGTERM then a fresh start: the baseline, which loses.
        #[arg(long)]
        cold: bool,
    },
    /// Routes, EndpointSlices and Pods changed under load through the Kubernetes source, with
    /// API server outages.
    Churn {
        #[arg(long)]
        seconds: Option<u64>,
        #[arg(long)]
        changes_per_second: Option<u32>,
        #[arg(long)]
        outages: Option<usize>,
        #[arg(long)]
        outage_seconds: Option<u64>,
    },
    /// Connections of every kind opened and closed in churn (some vanish without a FIN, some
    /// half-close); the agent's descriptors and tasks must return to their idle level.
    Leak {
        #[arg(long, default_value_t = 100_000)]
        connections: usize,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
}

fn main() -> Result<()> {
    match Cli::parse().soak {
        Soak::Leak {
            connections,
            concurrency,
        } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let config = LeakConfig {
                connections,
                concurrency,
            };
            let report = runtime.block_on(leak::run(&config))?;
            print!("{report}");
            if !report.clean() {
                bail!("the leak soak failed: see above");
            }
            Ok(())
        }
        Soak::Restart {
            restarts,
            seconds,
            fresh_programs_every,
            cold,
        } => {
            let mut config = SoakConfig {
                cold,
                ..SoakConfig::default()
            };
            config.restarts = restarts.unwrap_or(config.restarts);
            config.duration = seconds.map_or(config.duration, Duration::from_secs);
            config.fresh_programs_every =
                fresh_programs_every.unwrap_or(config.fresh_programs_every);
            restart(config)
        }
        Soak::Churn {
            seconds,
            changes_per_second,
            outages,
            outage_seconds,
        } => {
            let mut config = ChurnConfig::default();
            config.duration = seconds.map_or(config.duration, Duration::from_secs);
            config.changes_per_second = changes_per_second.unwrap_or(config.changes_per_second);
            config.outages = outages.unwrap_or(config.outages);
            config.outage = outage_seconds.map_or(config.outage, Duration::from_secs);
            churn(config)
        }
    }
}

fn churn(config: ChurnConfig) -> Result<()> {
    let spacing = config.duration / (config.outages as u32 + 1);
    if config.outages > 0 && spacing <= config.outage + Duration::from_secs(2) {
        bail!(
            "{} outages of {:?} in {:?} leave no time between them: give more --seconds",
            config.outages,
            config.outage,
            config.duration
        );
    }
    eprintln!(
        "churn soak: {} changes/s for {:?} under load, {} API server outages of {:?}",
        config.changes_per_second, config.duration, config.outages, config.outage
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(churn::run(&config))?;
    print!("{report}");
    let problems = report.problems(&config);
    if !problems.is_empty() {
        bail!(
            "the churn soak found problems:\n  {}",
            problems.join("\n  ")
        );
    }
    println!("PASS: zero failed requests; every outage caught up; the final state served");
    Ok(())
}

fn restart(config: SoakConfig) -> Result<()> {
    if let Some(reason) = gamma_tests::node::require_root() {
        bail!("{reason}");
    }
    // A restart needs a moment: starting the agent and its first sync, then the old one's drain.
    let spacing = config.duration / (config.restarts as u32 + 1);
    if spacing < Duration::from_secs(2) {
        bail!(
            "{} restarts in {:?} leaves {spacing:?} between them: give more --seconds (at least 2 s per restart)",
            config.restarts,
            config.duration
        );
    }
    if config.cold {
        eprintln!(
            "restart soak, baseline: {} cold restarts (SIGTERM, then a fresh start) over {:?} of load",
            config.restarts, config.duration
        );
    } else {
        eprintln!(
            "restart soak: {} takeovers over {:?} of load (every {}th swaps the programs)",
            config.restarts, config.duration, config.fresh_programs_every
        );
    }
    let report = soak::run("soak", &config)?;
    print!("{report}");
    if !report.clean(&config) {
        bail!("the soak lost something (see above)");
    }
    println!("PASS: zero failed requests, zero reset connections");
    Ok(())
}
