//! `gamma-echo --name POD ADDR...`: the echo backend as a process (for pods in the node harness).

use std::sync::Arc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut name = String::from("echo");
    let mut addrs = Vec::new();
    while let Some(arg) = args.next() {
        if arg == "--name" {
            name = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("--name needs a value"))?;
        } else {
            addrs.push(arg);
        }
    }
    anyhow::ensure!(
        !addrs.is_empty(),
        "usage: gamma-echo --name POD ADDR [ADDR...]"
    );
    let mut tasks = Vec::new();
    for addr in addrs {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        tasks.push(tokio::spawn(gamma_tests::echo::serve(
            listener,
            name.clone(),
            Arc::new(Default::default()),
        )));
    }
    for t in tasks {
        t.await?;
    }
    Ok(())
}
