//! `gamma-client --json '<ClientRequest>'`: runs inside a pod; prints one JSON answer per line.

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let request = match (args.next().as_deref(), args.next()) {
        (Some("--json"), Some(json)) => {
            serde_json::from_str::<gamma_tests::client::ClientRequest>(&json)?
        }
        _ => anyhow::bail!(
            "usage: gamma-client --json '{{\"url\": ..., \"method\": \"GET\", \"count\": 1, ...}}'"
        ),
    };
    for answer in gamma_tests::client::run(&request).await {
        println!("{}", serde_json::to_string(&answer)?);
    }
    Ok(())
}
