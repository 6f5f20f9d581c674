//! `gamma-load --json '<LoadSpec>'`: runs inside a pod (see `gamma_tests::load`); prints one JSON
//! `LoadReport` when its duration is over.

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let spec = match (args.next().as_deref(), args.next()) {
        (Some("--json"), Some(json)) => serde_json::from_str::<gamma_tests::load::LoadSpec>(&json)?,
        _ => anyhow::bail!(
            "usage: gamma-load --json '{{\"target\": \"10.96.0.10:80\", \"duration_ms\": 10000, ...}}'"
        ),
    };
    let report = gamma_tests::load::run(spec).await;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
