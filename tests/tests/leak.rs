//! The leak soak, shortened (`cargo xtask soak leak` runs 100,000 connections): 7,000 connections
//! of seven kinds through the agent, a thousand of each, some vanishing without a FIN and some
//! half-closed; the agent's descriptors and tasks return to their idle level and no connection
//! stays open.

use gamma_tests::leak::{self, LeakConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_in_churn_leave_nothing_behind() {
    let config = LeakConfig {
        connections: 7_000,
        concurrency: 32,
    };
    let report = leak::run(&config).await.unwrap();
    eprint!("{report}");
    assert_eq!(report.failed, 0, "{report}");
    assert!(report.settled_in.is_some(), "{report}");
    assert_eq!(report.after.connections_open, 0, "{report}");
    assert!(
        report.peak.fds > report.baseline.fds,
        "the churn did not show in the agent at all: {report}"
    );
}

/// Past `--max-connections`, a new connection is closed as soon as accepted, and counted; the
/// ones open are unaffected, and once one closes a new one is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_and_counted() {
    use gamma_tests::loopback::{echo_backend, Agent, AgentOptions, Manifests};
    use std::io::{Read, Write};
    let echo = echo_backend([127, 0, 0, 1], "echo").await;
    let world = Manifests::front_routed_to(echo.addr);
    let agent = Agent::start(
        &world,
        AgentOptions {
            listeners: vec![("ns/front", 80)],
            caller_namespace: None,
            extra_args: vec!["--max-connections".into(), "2".into()],
        },
    )
    .unwrap();
    let metric = |name: &str| gamma_tests::probe::metric(&agent, name).unwrap() as u64;
    tokio::task::block_in_place(|| {
        let connect = || {
            let s = std::net::TcpStream::connect(agent.listen[0]).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
            s
        };
        let request = b"GET / HTTP/1.1\r\nHost: front\r\n\r\n";
        // One whole answer (head, then Content-Length bytes), so the next starts clean.
        let answered = |s: &mut std::net::TcpStream| {
            if s.write_all(request).is_err() {
                return false;
            }
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match s.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => return false,
                }
            }
            let head = String::from_utf8_lossy(&head).to_lowercase();
            let length = gamma_tests::probe::content_length(&head).unwrap_or(0);
            let mut body = vec![0u8; length];
            head.starts_with("http/1.1 200") && s.read_exact(&mut body).is_ok()
        };
        // The start's probes of the listener count until the agent sees them closed. One may
        // still wait in the accept queue on a busy machine (then the count read 0 too soon, and
        // counted it against the cap later): a connection answered after them, accepted in
        // queue order, tells they were all accepted.
        assert!(answered(&mut connect()), "served below the cap");
        gamma_tests::eventually_within(
            std::time::Duration::from_secs(5),
            "the start's probe connections are closed",
            || (metric("gamma_connections_open") == 0).then_some(()),
        );
        let (mut a, mut b) = (connect(), connect());
        assert!(answered(&mut a) && answered(&mut b));
        let mut third = connect();
        let _ = third.write_all(request);
        let mut buf = [0u8; 1];
        assert!(
            matches!(third.read(&mut buf), Ok(0) | Err(_)),
            "the third connection is closed"
        );
        assert_eq!(metric("gamma_connections_refused_at_cap_total"), 1);
        assert!(answered(&mut a), "open connections are unaffected");
        drop(b);
        gamma_tests::eventually_within(
            std::time::Duration::from_secs(5),
            "a connection is served again below the cap",
            || answered(&mut connect()).then_some(()),
        );
    });
}
