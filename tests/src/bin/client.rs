//! `gamma-client --json '<ClientRequest>'`: runs inside a pod; prints one JSON answer per line.

use clap::Parser;

#[derive(Parser)]
#[command(about = "Sends requests from inside a pod of the node harness")]
struct Cli {
    /// The request, as JSON: {"url": ..., "method": "GET", "count": 1, ...}
    #[arg(long, value_name = "CLIENT_REQUEST", value_parser = parse_json::<gamma_tests::client::ClientRequest>)]
    json: gamma_tests::client::ClientRequest,
}

fn parse_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let request = Cli::parse().json;
    for answer in gamma_tests::client::run(&request).await {
        println!("{}", serde_json::to_string(&answer)?);
    }
    Ok(())
}
