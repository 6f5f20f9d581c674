//! Hitless restart in the node harness (root only; otherwise each test prints `SKIPPED` and
//! passes):
//! - the agent is taken over three times under load from the client pod, adopting the running
//!   programs and once swapping its own in, with zero failed requests, zero reset connections,
//!   nothing routed around the mesh, and long-lived upgraded connections (through the kernel
//!   redirect) handed over each time, not one byte lost; bounded in time;
//! - a running agent that does not answer on the takeover socket is given up on: the new agent
//!   starts as without one.

use gamma_tests::client::ClientRequest;
use gamma_tests::cluster::{AddressPlan, SimCluster};
use gamma_tests::probe::sample;
use gamma_tests::scenario::Scenario;
use gamma_tests::soak::{self, SoakConfig};
use std::time::{Duration, Instant};

fn skipped(test: &str) -> bool {
    match gamma_tests::node::require_root() {
        Some(reason) => {
            gamma_tests::skip(test, &reason);
            true
        }
        None => false,
    }
}

#[test]
fn restarts_under_load_lose_nothing() {
    if skipped("restarts_under_load_lose_nothing") {
        return;
    }
    let started = Instant::now();
    let config = SoakConfig {
        restarts: 3,
        duration: Duration::from_secs(12),
        fresh_programs_every: 2,
        processes: 1,
        ..SoakConfig::default()
    };
    let report = soak::run("restart", &config).unwrap();
    eprint!("{report}");
    assert_eq!(report.restarts.len(), 3);
    assert_eq!(
        report.load.failed, 0,
        "failed requests: {:?}",
        report.load.errors
    );
    assert_eq!(report.load.resets, 0, "reset connections");
    assert!(report.load.long_lived_opened > 0, "{report}");
    assert_eq!(
        report.load.long_lived_kept, report.load.long_lived_opened,
        "long-lived connections broken by a takeover: {report}"
    );
    assert_eq!(report.load.unmeshed, 0, "requests routed around the mesh");
    assert!(
        report.load.sent > 100,
        "too little load to mean anything: {report}"
    );
    assert!(
        report.attached_as_expected,
        "each program attached once after the last restart (it adopted): {:?}",
        report.attached
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

/// The same soak with `--local-sockets`: the client pod's connections to the agent and the
/// agent's to the backend pods move their bytes socket to socket; upgraded connections are copied
/// by the agent and handed over like the others.
#[test]
fn restarts_under_load_lose_nothing_with_local_sockets() {
    if skipped("restarts_under_load_lose_nothing_with_local_sockets") {
        return;
    }
    let config = SoakConfig {
        restarts: 3,
        duration: Duration::from_secs(12),
        fresh_programs_every: 2,
        processes: 1,
        local_sockets: true,
        ..SoakConfig::default()
    };
    let report = soak::run("restart-local", &config).unwrap();
    eprint!("{report}");
    assert!(report.clean(&config), "{report}");
    assert!(report.load.long_lived_opened > 0, "{report}");
    // The last restart adopts the running programs (the third, with a swap every second): the
    // pairing must outlive the agent that attached them.
    assert!(
        report.local_moved_after_last_restart > 10,
        "bytes moved socket to socket after the last takeover: {report}"
    );
    // And the agent's dials to the backend pods still join: the node's pods (all opted in) are in
    // the set.
    assert_eq!(report.local_pods_at_end, report.pods, "{report}");
    // The upgraded connections, paired when they opened under the first agent's programs, are
    // copied by every agent after it, also after a swap of programs made their records the
    // predecessor's: none is spliced.
    assert_eq!(report.pumped_at_end.0, 0, "{report}");
    assert!(
        report.pumped_at_end.1 >= report.load.long_lived_kept,
        "{report}"
    );
}

#[test]
fn an_unresponsive_running_agent_is_given_up_on() {
    if skipped("an_unresponsive_running_agent_is_given_up_on") {
        return;
    }
    let sockets = gamma_tests::loopback::TempDir::new("mute");
    let socket = sockets.0.join("agent.sock");
    // Accepts connections (the kernel does, into the backlog) and never answers.
    let _mute = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let demo = gamma_tests::workspace_root().join("demo");
    let cluster =
        SimCluster::from_manifests(&demo.join("cluster.yaml"), AddressPlan::default()).unwrap();
    let args = [
        "--takeover-socket",
        &socket.display().to_string(),
        "--takeover-timeout-ms",
        "500",
    ]
    .map(String::from)
    .to_vec();
    let started = Instant::now();
    let scenario = Scenario::start_with("mute", cluster, args).unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    scenario
        .apply(
            "consumer.yaml",
            &std::fs::read_to_string(demo.join("step1-consumer-route.yaml")).unwrap(),
        )
        .unwrap();
    let vip = scenario.cluster.resolve("catalog", "products").unwrap();
    let client = scenario
        .cluster
        .client("ui-backend", "app=client")
        .unwrap()
        .clone();
    let answers = scenario
        .request(
            &client,
            &ClientRequest {
                url: format!("http://{vip}:80/"),
                method: "GET".into(),
                count: 3,
                ..Default::default()
            },
        )
        .unwrap();
    assert!(
        answers.iter().all(|a| a.status == 200
            && a.headers_at_backend
                .iter()
                .any(|(n, v)| n == "x-dev-feature" && v == "enabled")),
        "the fresh agent serves through the redirect: {answers:?}"
    );
}

/// In a pod, a taken-over agent that exited would be restarted by the kubelet and take over back:
/// with `--after-takeover wait` it drains, holds nothing, and waits for SIGTERM. Loopback, no
/// root: the listeners are handed over without the kernel redirect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_over_agent_can_wait_for_sigterm() {
    taken_over_agent_waits_for_sigterm(false).await;
}

/// The kubelet's SIGTERM may come while the taken-over agent still drains (its new pod became
/// ready meanwhile): it must end the agent once drained, not be lost so that the agent waits
/// for a SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_while_a_taken_over_agent_drains_is_not_lost() {
    taken_over_agent_waits_for_sigterm(true).await;
}

/// `sigterm_mid_drain`: a slow request holds the old agent's drain, and SIGTERM comes during it.
async fn taken_over_agent_waits_for_sigterm(sigterm_mid_drain: bool) {
    use gamma_tests::loopback::{
        agent_binary, echo_backend, free_port, http_get, Manifests, TempDir,
    };
    use gamma_tests::KillOnDrop;
    use std::process::{Child, Command, Stdio};

    let echo = echo_backend([127, 0, 0, 1], "front-pod").await;
    let dir = TempDir::new("after-takeover");
    Manifests::default()
        .service("shop", "front", 80, &[echo.addr], None)
        .write(&dir.0, "world.yaml");
    let socket = dir.0.join("agent.sock");
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let metrics_only = format!("127.0.0.1:{}", free_port());
    let spawn = |log: &str| -> KillOnDrop {
        Command::new(agent_binary())
            .arg("--manifests")
            .arg(&dir.0)
            .args([
                "--admin",
                &admin,
                "--metrics",
                &metrics_only,
                "--listen",
                &format!("{listen}=shop/front:80"),
            ])
            .arg("--takeover-socket")
            .arg(&socket)
            .args(["--after-takeover", "wait", "--drain-timeout-s", "20"])
            .arg("--ready-file")
            .arg(dir.0.join(format!("{log}.ready")))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join(log)).unwrap())
            .spawn()
            .map(KillOnDrop)
            .expect("start proxy-agent")
    };
    let answered = || {
        tokio::task::block_in_place(|| http_get(listen.parse().unwrap(), "/"))
            .is_ok_and(|body| body.contains("front-pod"))
    };
    use gamma_tests::eventually_within as within;
    let seconds = Duration::from_secs;

    // Each pod's readiness is its own file: the old one's stays while it hands over, the new
    // one's comes once it took over, and the old one's goes then.
    let ready = |log: &str| dir.0.join(format!("{log}.ready")).exists();
    let mut old = spawn("old.log");
    within(seconds(10), "the first agent serves", || {
        answered().then_some(())
    });
    within(seconds(5), "the first agent's pod is ready", || {
        ready("old.log").then_some(())
    });
    // In flight on the old agent across the takeover: its drain (20 s at most) lasts until
    // this is answered, 8 s after it came: longer than a takeover on a busy machine.
    let requests_before = echo
        .stats
        .requests
        .load(std::sync::atomic::Ordering::Relaxed);
    let slow = sigterm_mid_drain.then(|| {
        let addr = listen.parse().unwrap();
        std::thread::spawn(move || {
            let request = b"GET /delay/8000 HTTP/1.1\r\nHost: front\r\nConnection: close\r\n\r\n";
            gamma_tests::probe::raw_exchange(addr, request, Duration::from_secs(20))
        })
    });
    if slow.is_some() {
        within(seconds(5), "the slow request reaches the backend", || {
            let now = echo
                .stats
                .requests
                .load(std::sync::atomic::Ordering::Relaxed);
            (now > requests_before).then_some(())
        });
    }
    let mut new = spawn("new.log");
    let old_log = || std::fs::read_to_string(dir.0.join("old.log")).unwrap_or_default();
    within(seconds(10), "the new agent takes over", || {
        old_log().contains("taken over").then_some(())
    });
    // SAFETY: kill(2) on our own child.
    let sigterm = |child: &Child| unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    match slow {
        Some(slow) => {
            assert!(
                !slow.is_finished(),
                "the request is still in flight when the SIGTERM comes (the takeover took 8 s)"
            );
            sigterm(&old);
            let answer = tokio::task::block_in_place(|| slow.join().unwrap());
            assert!(
                answer
                    .as_ref()
                    .is_ok_and(|a| a.text.starts_with("HTTP/1.1 200")),
                "the request in flight is answered: {answer:?}"
            );
        }
        None => {
            assert!(answered(), "the new agent serves");
            within(seconds(5), "the new pod is ready, the old one not", || {
                (ready("new.log") && !ready("old.log")).then_some(())
            });
            // The admin port too, and the `--metrics` one: every scrape is the new agent's (its
            // metrics report the takeover it started with; the old agent's say none), so the
            // kubelet's probes are answered by it alone.
            for scraped in [&admin, &metrics_only].repeat(20) {
                let scraped = scraped.parse().unwrap();
                let metrics =
                    tokio::task::block_in_place(|| http_get(scraped, "/metrics")).unwrap();
                let total = sample(&metrics, "gamma_takeover_duration_seconds{phase=\"total\"}")
                    .expect("the takeover duration is exported");
                assert!(
                    total > 0.0,
                    "a scrape answered by the old agent:\n{metrics}"
                );
            }
            std::thread::sleep(Duration::from_secs(2));
            assert!(
                old.try_wait().unwrap().is_none(),
                "the taken-over agent waits instead of exiting"
            );
            assert_eq!(
                tcp_sockets_of(old.id()),
                0,
                "the waiting agent holds no listener and no upstream connection"
            );
            sigterm(&old);
        }
    }
    within(
        seconds(5),
        "the taken-over agent exits on the SIGTERM it got",
        || old.try_wait().unwrap().map(|_| ()),
    );
    assert!(old.wait().unwrap().success());
    assert!(
        answered(),
        "the new agent still serves after the old one exited"
    );
    let _ = new.kill();
    let _ = new.wait();
}

/// Opaque TCP and upgraded (WebSocket) connections opened before a takeover keep exchanging data
/// after it, across 10 takeovers in a row: each agent hands its live connections, mid-stream, to
/// the next. Every byte sent is echoed back once, in order. Loopback, no root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_lived_connections_survive_ten_takeovers() {
    use gamma_tests::loopback::{agent_binary, echo_backend, free_port, http_get, TempDir};
    use gamma_tests::KillOnDrop;
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};

    const TAKEOVERS: usize = 10;
    let ws_backend = echo_backend([127, 0, 0, 1], "ws").await;
    let tcp_addr = gamma_tests::loopback::tcp_echo().await;
    let dir = TempDir::new("long-lived");
    gamma_tests::loopback::Manifests::default()
        .service("ns", "ws", 80, &[ws_backend.addr], None)
        .service("ns", "raw", 80, &[tcp_addr], Some("tcp"))
        .write(&dir.0, "world.yaml");
    let socket = dir.0.join("agent.sock");
    let ws_listen = format!("127.0.0.1:{}", free_port());
    let raw_listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let spawn = |log: &str| -> KillOnDrop {
        Command::new(agent_binary())
            .arg("--manifests")
            .arg(&dir.0)
            .args(["--admin", &admin])
            .args(["--listen", &format!("{ws_listen}=ns/ws:80")])
            .args(["--listen", &format!("{raw_listen}=ns/raw:80")])
            .arg("--takeover-socket")
            .arg(&socket)
            .args(["--drain-timeout-s", "2"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join(log)).unwrap())
            .spawn()
            .map(KillOnDrop)
            .expect("start proxy-agent")
    };
    let metric = |name: &str| -> Option<u64> {
        let metrics = http_get(admin.parse().unwrap(), "/metrics").ok()?;
        sample(&metrics, name).map(|n| n as u64)
    };
    let handed_over = || metric("gamma_takeover_connections");
    use gamma_tests::eventually_within as within;
    let mut agents = vec![spawn("agent-0.log")];
    within(Duration::from_secs(10), "the first agent serves", || {
        http_get(admin.parse().unwrap(), "/ready").ok().map(drop)
    });

    tokio::task::block_in_place(|| {
        let connect = |addr: &str| {
            let s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s
        };
        let mut ws = connect(&ws_listen);
        ws.write_all(
            b"GET /ws HTTP/1.1\r\nHost: ws\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .unwrap();
        let mut head = [0u8; 512];
        let n = ws.read(&mut head).unwrap();
        assert!(
            head[..n].starts_with(b"HTTP/1.1 101"),
            "{:?}",
            String::from_utf8_lossy(&head[..n])
        );
        let mut raw = connect(&raw_listen);
        let mut sent = 0u64;
        // Each round: a message on each connection, echoed back whole and in order.
        let mut exchange = |round: usize, sent: &mut u64| {
            for (name, stream) in [("websocket", &mut ws), ("opaque", &mut raw)] {
                let message = format!("{name} round {round} {}\n", "x".repeat(round * 100));
                stream.write_all(message.as_bytes()).unwrap();
                let mut echoed = vec![0u8; message.len()];
                stream
                    .read_exact(&mut echoed)
                    .unwrap_or_else(|e| panic!("{name} after takeover {round}: {e}"));
                assert_eq!(echoed, message.as_bytes(), "{name} after takeover {round}");
                *sent += message.len() as u64;
            }
        };
        exchange(0, &mut sent);
        for round in 1..=TAKEOVERS {
            agents.push(spawn(&format!("agent-{round}.log")));
            // Taken over and drained of its connections, the previous agent exits; then only
            // the new one answers on the admin port.
            let previous = &mut agents[round - 1];
            within(
                Duration::from_secs(20),
                "the previous agent is taken over and exits",
                || previous.try_wait().unwrap().map(drop),
            );
            assert_eq!(
                handed_over(),
                Some(2),
                "both connections handed over at {round}"
            );
            // Served on the data plane, and counted as open there (balancing, the cap); before,
            // they ran on the control thread, uncounted.
            assert_eq!(
                metric("gamma_connections_open"),
                Some(2),
                "both connections open at {round}"
            );
            exchange(round, &mut sent);
        }
        eprintln!("{TAKEOVERS} takeovers, 2 connections kept, {sent} bytes echoed");
        for agent in &mut agents {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    });
}

/// A running agent that dies while its successor waits for its first sync (here an API server
/// that never answers) is noticed at once: the successor lets its programs go, so that steered
/// connects fall back to ordinary Service routing instead of queueing on a listener nobody
/// accepts on until the sync, however long (that the programs detach is the kernel's part: they
/// live only while a process holds their links). Loopback, no root.
///
/// Until then the running agent alone answers on the admin socket both hold: the successor
/// answered every other scrape, its counters alternating with the running agent's. Once it is
/// gone, the successor answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_predecessor_that_dies_mid_takeover_is_let_go_of() {
    use gamma_tests::loopback::{
        agent_binary, echo_backend, free_port, http_get, http_get_full, Manifests, TempDir,
    };
    use gamma_tests::KillOnDrop;
    use std::process::{Command, Stdio};

    let echo = echo_backend([127, 0, 0, 1], "front-pod").await;
    let dir = TempDir::new("dies-mid-takeover");
    Manifests::default()
        .service("shop", "front", 80, &[echo.addr], None)
        .write(&dir.0, "world.yaml");
    // Accepts connections (the kernel does) and never answers one.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let kubeconfig =
        gamma_tests::fake_apiserver::kubeconfig_for(silent.local_addr().unwrap(), &dir.0, "t");
    let socket = dir.0.join("agent.sock");
    let listen: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let ready = || http_get_full(admin, "/ready").map(|(_, body)| body);
    let ready_file = |log: &str| dir.0.join(format!("{log}.ready"));
    let spawn = |log: &str, source: &[&str]| -> KillOnDrop {
        Command::new(agent_binary())
            .args(source)
            .arg("--ready-file")
            .arg(ready_file(log))
            .args(["--admin", &admin.to_string()])
            .args(["--listen", &format!("{listen}=shop/front:80")])
            .arg("--takeover-socket")
            .arg(&socket)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join(log)).unwrap())
            .spawn()
            .map(KillOnDrop)
            .expect("start proxy-agent")
    };
    use gamma_tests::eventually_within as within;
    let manifests = dir.0.to_str().unwrap().to_string();
    let mut old = spawn("old.log", &["--manifests", &manifests]);
    within(Duration::from_secs(10), "the first agent serves", || {
        tokio::task::block_in_place(|| http_get(listen, "/"))
            .ok()
            .map(drop)
    });
    let mut new = spawn(
        "new.log",
        &[
            "--kube",
            "--node-name",
            "node-a",
            "--pod-name",
            "agent-b",
            "--lease-namespace",
            "gamma-system",
        ],
    );
    let new_log = || std::fs::read_to_string(dir.0.join("new.log")).unwrap_or_default();
    within(
        Duration::from_secs(10),
        "the new agent holds the sockets",
        || {
            new_log()
                .contains("offered the running agent's sockets")
                .then_some(())
        },
    );
    for _ in 0..20 {
        let answer = ready().expect("the admin server answers");
        assert!(
            answer.contains("handing over to a successor"),
            "the running agent answers alone: {answer}"
        );
    }
    // The pods' own readiness: the old one stays ready while it hands over (a DaemonSet deletes
    // an old pod not ready beside its successor), the new one is not before it serves.
    within(Duration::from_secs(5), "the old pod is ready", || {
        ready_file("old.log").exists().then_some(())
    });
    assert!(!ready_file("new.log").exists(), "the new pod is not");
    let _ = old.kill();
    let _ = old.wait();
    within(Duration::from_secs(5), "the new agent notices", || {
        new_log()
            .contains("the running agent went before this one could take over")
            .then_some(())
    });
    let answer = ready().expect("the successor answers on the socket");
    assert!(
        answer.contains("the first sync of the sources has not completed"),
        "{answer}"
    );
    // And goes on waiting for its sync (the wait for its predecessor, polled again once it
    // resolved, panicked).
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        new.try_wait().unwrap().is_none() && !new_log().contains("panicked"),
        "the new agent waits for its sync: {}",
        new_log()
    );
    let _ = new.kill();
    let _ = new.wait();
    drop(silent);
}

/// How many TCP sockets process `pid` holds (its descriptors' socket inodes found in its network
/// namespace's TCP tables).
fn tcp_sockets_of(pid: u32) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .filter_map(|line| line.split_whitespace().nth(9).map(str::to_string))
                .collect::<Vec<_>>()
        })
        .filter(|inode| inodes.contains(inode))
        .count()
}
