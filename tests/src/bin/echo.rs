//! `gamma-echo --name POD ADDR...`: the echo backend as a process (for pods in the node harness).

use clap::Parser;
use std::sync::Arc;

#[derive(Parser)]
#[command(about = "The echo backend: answers every request with what it saw")]
struct Cli {
    /// The pod name it reports.
    #[arg(long, default_value = "echo")]
    name: String,
    /// The namespace it reports.
    #[arg(long, default_value = "")]
    namespace: String,
    /// Addresses to listen on.
    #[arg(required = true, value_name = "ADDR")]
    addrs: Vec<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let Cli {
        name,
        namespace,
        addrs,
    } = Cli::parse();
    let mut tasks = Vec::new();
    for addr in addrs {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        tasks.push(tokio::spawn(gamma_tests::echo::serve_in(
            listener,
            name.clone(),
            namespace.clone(),
            Arc::new(Default::default()),
        )));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}
