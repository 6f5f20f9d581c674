//! `gamma-load --json '<LoadSpec>'`: runs inside a pod (see `gamma_tests::load`); prints one JSON
//! `LoadReport` when its duration is over.

use clap::Parser;

#[derive(Parser)]
#[command(about = "Bounded load from inside a pod of the node harness")]
struct Cli {
    /// The load, as JSON: {"target": "10.96.0.10:80", "duration_ms": 10000, ...}
    #[arg(long, value_name = "LOAD_SPEC", value_parser = parse_json)]
    json: gamma_tests::load::LoadSpec,
}

fn parse_json(text: &str) -> Result<gamma_tests::load::LoadSpec, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let report = gamma_tests::load::run(Cli::parse().json).await;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
