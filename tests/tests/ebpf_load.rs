//! The kernel redirect against the real kernel (root only; otherwise each test prints
//! `SKIPPED: <reason>` and passes):
//! - the kernel has every feature the redirect probes for before attaching;
//! - the embedded eBPF object loads and the verifier accepts every program in it;
//! - end to end in a private network namespace and a child cgroup: a client in the cgroup that
//!   dials a mesh VIP reaches the agent, which learns the VIP and the caller's cgroup and netns;
//!   the client sees the VIP as its peer; non-mesh ports, the exempt cgroup and a closed agent
//!   listener are left alone (fail open); a second attach replaces the first; the programs'
//!   counters say what they did;
//! - with local sockets on, the agent's dials join the socket pairs only for this node's pods.
//!
//! Nothing outside the namespace and cgroup this file creates is touched: the root network
//! namespace keeps its routes and addresses. Both are removed by name when the test ends, also
//! when it fails.
//!
//! The client runs in a child process (a process, not a thread, is what belongs to a cgroup): this
//! test binary itself, re-run with `client_helper` as the only test and the target in an
//! environment variable; it joins the namespace and the cgroup between fork and exec.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{
        fd::{AsRawFd as _, RawFd},
        unix::process::CommandExt as _,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use proxy_agent::redirect::{self, AgentListener, Redirect, Redirected};

/// The programs the object must contain (the kernel keeps 15 bytes of a name; all fit).
const PROGRAMS: [&str; 5] = [
    "gamma_connect4",
    "gamma_connect6",
    "gamma_peername4",
    "gamma_peername6",
    "gamma_sockops",
];

/// Why these tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    if let Some(reason) = gamma_tests::root_required() {
        return Some(reason);
    }
    if let Err(e) = redirect::cgroup2_mount() {
        return Some(e.to_string());
    }
    None
}

macro_rules! skip_unless_root {
    () => {
        if let Some(reason) = skip_reason() {
            gamma_tests::skip(concat!(file!(), ":", line!()), &reason);
            return;
        }
    };
}

#[test]
fn the_kernel_has_every_feature_the_redirect_needs() {
    skip_unless_root!();
    redirect::check_kernel().unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn verifier_accepts_every_program() {
    skip_unless_root!();
    let names = redirect::verify_programs().unwrap_or_else(|e| panic!("{e}"));
    // The cgroup programs and the sk_msg program of local sockets (attached to its map).
    let mut expected = PROGRAMS.to_vec();
    expected.insert(2, "gamma_local_msg");
    assert_eq!(names, expected);
}

const VIP4: &str = "10.96.0.10:80";
const VIP6: &str = "[fd00:96::10]:80";
const VIP4_MAPPED: &str = "[::ffff:10.96.0.10]:80";
const NON_MESH: &str = "10.96.0.10:81";

#[test]
fn redirects_mesh_services_and_fails_open() {
    skip_unless_root!();
    let sandbox = Sandbox::create();
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();

    // The "kube-proxy" path: backends on the VIPs themselves, so a connection the kernel leaves
    // alone still gets an answer, and the answer says who gave it.
    let backend4 = sandbox.bind(VIP4);
    let backend6 = sandbox.bind(VIP6);
    let other = sandbox.bind(NON_MESH);
    let agent4 = sandbox.bind("127.0.0.1:0");
    let agent6 = sandbox.bind("[::1]:0");
    let cgroup_id = redirect::cgroup_id(&sandbox.cgroup).unwrap();
    let netns_cookie = netns_cookie(&agent4);

    let redirect = attach(&sandbox.cgroup, &agent4, &agent6);
    assert_attached_once(&sandbox.cgroup);
    let change = redirect
        .set_mesh_services([(addr(VIP4), false), (addr(VIP6), false)])
        .unwrap();
    assert_eq!((change.written, change.removed), (2, 0));

    let servers = [
        Server::new("agent4", &agent4),
        Server::new("agent6", &agent6),
        Server::new("backend4", &backend4),
        Server::new("backend6", &backend6),
        Server::new("other", &other),
    ];
    let expect_redirect = |target: &str, agent: &str, original: &str| {
        let seen = exchange(&sandbox, addr(target), &servers, &redirect);
        assert_eq!(seen.server, agent, "{target} should reach the agent");
        assert_eq!(
            seen.client_peer,
            addr(target),
            "getpeername should show the VIP"
        );
        let record = seen
            .original
            .unwrap_or_else(|| panic!("no record for {target}"));
        assert_eq!(
            record,
            Redirected {
                original_dst: addr(original),
                netns_cookie,
                cgroup_id,
                socket_cookie: record.socket_cookie
            },
        );
        assert_eq!(
            redirect.take_original(seen.agent_peer, seen.agent_port),
            None,
            "a record is taken once"
        );
    };
    let expect_untouched = |target: &str, server: &str| {
        let seen = exchange(&sandbox, addr(target), &servers, &redirect);
        assert_eq!(seen.server, server, "{target} should not be redirected");
        assert_eq!(seen.client_peer, addr(target));
        assert_eq!(seen.original, None);
    };

    expect_redirect(VIP4, "agent4", VIP4);
    expect_redirect(VIP6, "agent6", VIP6);
    // A dual-stack socket dialling the IPv4 VIP v4-mapped: same Service, IPv4 agent.
    expect_redirect(VIP4_MAPPED, "agent4", VIP4);
    expect_untouched(NON_MESH, "other");
    // The programs counted what they did, and nothing else.
    let counted = redirect.kernel_counters().unwrap();
    assert_eq!(
        (counted.steered, counted.agent_gone, counted.record_failed),
        (3, 0, 0)
    );
    assert!(counted.peername_rewrites >= 3, "{counted:?}");

    // The agent's own cgroup is exempt (here: make the client's cgroup the exempt one).
    redirect.set_exempt_cgroup(cgroup_id).unwrap();
    expect_untouched(VIP4, "backend4");
    redirect
        .set_exempt_cgroup(redirect::own_cgroup_id().unwrap())
        .unwrap();

    // Reconciliation removes what is no longer meshed.
    let change = redirect.set_mesh_services([(addr(VIP6), false)]).unwrap();
    assert_eq!((change.written, change.removed), (0, 1));
    expect_untouched(VIP4, "backend4");
    expect_redirect(VIP6, "agent6", VIP6);

    // A second agent on the same cgroup replaces the first: still one program per hook, and
    // connections go to the newcomer.
    let agent4b = sandbox.bind("127.0.0.1:0");
    let agent6b = sandbox.bind("[::1]:0");
    let successor = attach(&sandbox.cgroup, &agent4b, &agent6b);
    assert_attached_once(&sandbox.cgroup);
    successor.set_mesh_services([(addr(VIP4), false)]).unwrap();
    let seen = exchange(
        &sandbox,
        addr(VIP4),
        &[
            Server::new("agent4b", &agent4b),
            Server::new("backend4", &backend4),
        ],
        &successor,
    );
    assert_eq!(seen.server, "agent4b");
    assert_eq!(seen.original.map(|r| r.original_dst), Some(addr(VIP4)));
    drop(redirect);
    assert_attached_once(&sandbox.cgroup);

    // Fail open: with the agent's listener closed, the kernel drops it from the sockmap and
    // connections go to the VIP as if there were no mesh.
    drop(agent4b);
    let seen = exchange(
        &sandbox,
        addr(VIP4),
        &[Server::new("backend4", &backend4)],
        &successor,
    );
    assert_eq!(seen.server, "backend4");
    assert_eq!(seen.client_peer, addr(VIP4));
    assert_eq!(seen.original, None);
    let counted = successor.kernel_counters().unwrap();
    assert_eq!(
        (counted.steered, counted.agent_gone),
        (1, 1),
        "the newcomer's programs count from zero; the fail-open connect is counted"
    );
}

#[test]
fn with_local_sockets_the_agents_dials_join_only_for_this_nodes_pods() {
    skip_unless_root!();
    let sandbox = Sandbox::create();
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
    // Servers outside the sandbox's cgroup: their sockets never join, so a dial that joins finds
    // no peer at its first send and keeps TCP, which the programs count.
    let pod4 = sandbox.bind("10.96.0.10:0");
    let pod6 = sandbox.bind("[fd00:96::10]:0");
    let elsewhere = sandbox.bind("127.0.0.1:0");
    let agent4 = sandbox.bind("127.0.0.1:0");
    let agent6 = sandbox.bind("[::1]:0");
    let redirect = attach(&sandbox.cgroup, &agent4, &agent6);
    // The client in the sandbox's cgroup plays the agent: its connections are the agent's dials.
    redirect
        .set_exempt_cgroup(redirect::cgroup_id(&sandbox.cgroup).unwrap())
        .unwrap();
    redirect.set_local_sockets(true).unwrap();
    assert!(redirect.local_sockets().unwrap());
    let change = redirect
        .set_local_pods([addr("10.96.0.10:0").ip(), addr("[fd00:96::10]:0").ip()])
        .unwrap();
    // And the marker that some pod is (`ANY_POD_OPTED_IN`).
    assert_eq!((change.written, change.removed, change.size), (3, 0, 2));
    let servers = [
        Server::new("pod4", &pod4),
        Server::new("pod6", &pod6),
        Server::new("elsewhere", &elsewhere),
    ];
    let joined_after = |refused_first: Option<SocketAddr>, target: SocketAddr, server: &str| {
        let before = redirect.kernel_counters().unwrap().local_kept_tcp;
        let seen = exchange_after(&sandbox, refused_first, target, &servers, &redirect);
        assert_eq!(seen.server, server);
        redirect.kernel_counters().unwrap().local_kept_tcp - before
    };
    let joined = |target: SocketAddr, server: &str| joined_after(None, target, server);
    let port = |listener: &TcpListener| listener.local_addr().unwrap().port();
    let pod4_mapped = addr(&format!("[::ffff:10.96.0.10]:{}", port(&pod4)));
    assert_eq!(joined(elsewhere.local_addr().unwrap(), "elsewhere"), 0);
    assert_eq!(joined(pod4.local_addr().unwrap(), "pod4"), 1);
    assert_eq!(joined(pod6.local_addr().unwrap(), "pod6"), 1);
    assert_eq!(
        joined(pod4_mapped, "pod4"),
        1,
        "an IPv4 pod dialled v4-mapped"
    );
    // A socket that dialled a pod in vain, then connects elsewhere, does not keep the pod's mark.
    let closed_pod_port = addr("10.96.0.10:1");
    assert_eq!(
        joined_after(
            Some(closed_pod_port),
            elsewhere.local_addr().unwrap(),
            "elsewhere"
        ),
        0
    );
    // A pod gone from the node: dials to its address no longer join.
    let change = redirect
        .set_local_pods([addr("[fd00:96::10]:0").ip()])
        .unwrap();
    assert_eq!((change.written, change.removed), (0, 1));
    assert_eq!(joined(pod4.local_addr().unwrap(), "pod4"), 0);
    // Local sockets off: nothing joins.
    redirect.set_local_sockets(false).unwrap();
    assert_eq!(joined(pod6.local_addr().unwrap(), "pod6"), 0);
}

#[test]
fn with_local_sockets_a_callers_connection_joins_only_if_its_pod_opted_in() {
    skip_unless_root!();
    let sandbox = Sandbox::create();
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
    let backend4 = sandbox.bind(VIP4);
    let backend6 = sandbox.bind(VIP6);
    // The agent's listeners are the test's, outside the sandbox's cgroup: its accepted sockets
    // never join, so a caller's connection that joins finds no peer at its first send and keeps
    // TCP, which the programs count.
    let agent4 = sandbox.bind("127.0.0.1:0");
    let agent6 = sandbox.bind("[::1]:0");
    let redirect = attach(&sandbox.cgroup, &agent4, &agent6);
    redirect
        .set_mesh_services([(addr(VIP4), false), (addr(VIP6), false)])
        .unwrap();
    redirect.set_local_sockets(true).unwrap();
    let servers = [
        Server::new("agent4", &agent4),
        Server::new("agent6", &agent6),
        Server::new("backend4", &backend4),
        Server::new("backend6", &backend6),
    ];
    let joined = |target: &str, agent: &str| {
        let before = redirect.kernel_counters().unwrap().local_kept_tcp;
        let seen = exchange(&sandbox, addr(target), &servers, &redirect);
        assert_eq!(seen.server, agent, "{target} should reach the agent");
        redirect.kernel_counters().unwrap().local_kept_tcp - before
    };
    // Callers dial the agent from loopback: their pod's addresses here are 127.0.0.1 and ::1.
    assert_eq!(joined(VIP4, "agent4"), 0, "no pod opted in");
    redirect
        .set_local_pods([addr("127.0.0.1:0").ip(), addr("[::1]:0").ip()])
        .unwrap();
    assert_eq!(joined(VIP4, "agent4"), 1);
    assert_eq!(joined(VIP6, "agent6"), 1);
    assert_eq!(
        joined(VIP4_MAPPED, "agent4"),
        1,
        "a dual-stack socket dialling IPv4 (its address v4-mapped)"
    );
    redirect.set_local_pods([addr("[::1]:0").ip()]).unwrap();
    assert_eq!(joined(VIP4, "agent4"), 0, "the IPv4 pod opted out");
    assert_eq!(joined(VIP4_MAPPED, "agent4"), 0);
    assert_eq!(joined(VIP6, "agent6"), 1);
}

/// A port whose clients speak first goes to the agent's client-first listener while it is open,
/// and to the family's other listener when the port may carry any protocol or that listener is
/// gone; a port of either kind is steered once, with its record.
#[test]
fn client_first_ports_go_to_their_own_listener() {
    skip_unless_root!();
    let sandbox = Sandbox::create();
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
    let backend4 = sandbox.bind(VIP4);
    let agent4 = sandbox.bind("127.0.0.1:0");
    let first4 = sandbox.bind("127.0.0.1:0");
    let redirect = attach_with_client_first(&sandbox.cgroup, &agent4, &first4);
    let reached = |servers: &[Server<'_>]| {
        let seen = exchange(&sandbox, addr(VIP4), servers, &redirect);
        assert_eq!(seen.client_peer, addr(VIP4), "getpeername shows the VIP");
        assert_eq!(seen.original.map(|r| r.original_dst), Some(addr(VIP4)));
        seen.server
    };
    let all = [
        Server::new("agent4", &agent4),
        Server::new("first4", &first4),
        Server::new("backend4", &backend4),
    ];
    redirect.set_mesh_services([(addr(VIP4), true)]).unwrap();
    assert_eq!(reached(&all), "first4");
    let change = redirect.set_mesh_services([(addr(VIP4), false)]).unwrap();
    assert_eq!(
        (change.written, change.removed),
        (1, 0),
        "the value changed"
    );
    assert_eq!(reached(&all), "agent4");
    redirect.set_mesh_services([(addr(VIP4), true)]).unwrap();
    assert_eq!(reached(&all), "first4");
    // While pods may pair their sockets with the agent's, whose end the client-first listener
    // makes only with the first bytes (too late for the caller's first send): the other one.
    redirect.set_local_sockets(true).unwrap();
    assert_eq!(reached(&all), "first4", "no pod opted in");
    redirect.set_local_pods([addr("10.0.0.9:0").ip()]).unwrap();
    assert_eq!(reached(&all), "agent4", "a pod opted in");
    redirect.set_local_pods([]).unwrap();
    assert_eq!(reached(&all), "first4", "none any more");
    redirect.set_local_sockets(false).unwrap();
    drop(first4);
    let without_it = [
        Server::new("agent4", &agent4),
        Server::new("backend4", &backend4),
    ];
    assert_eq!(reached(&without_it), "agent4", "its listener closed");
    let counted = redirect.kernel_counters().unwrap();
    assert_eq!(
        (
            counted.steered,
            counted.steered_client_first,
            counted.agent_gone
        ),
        (7, 4, 0)
    );
}

/// Two connections from one caller address (a bound socket's port, which Linux also gives
/// connects to different destinations), to a client-first port and to another, steered to the
/// agent's two listeners at once: each keeps its own record. Keyed by the caller's address
/// alone, the second's record replaced the first's, and the first went to the second's Service.
#[test]
fn two_connections_from_one_caller_address_keep_their_own_records() {
    skip_unless_root!();
    const OPAQUE: &str = "10.96.0.10:5432";
    let sandbox = Sandbox::create();
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
    let agent4 = sandbox.bind("127.0.0.1:0");
    let first4 = sandbox.bind("127.0.0.1:0");
    let redirect = attach_with_client_first(&sandbox.cgroup, &agent4, &first4);
    redirect
        .set_mesh_services([(addr(VIP4), true), (addr(OPAQUE), false)])
        .unwrap();
    let accept = |listener: &TcpListener, client: &mut std::process::Child| {
        // A connection steered elsewhere fails the test rather than hang it.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(accepted) = listener.accept() {
                break accepted;
            }
            assert!(client.try_wait().unwrap().is_none(), "the client exited");
            if Instant::now() > deadline {
                let _ = client.kill();
                panic!("nothing reached this listener within 10 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    };
    const SOURCE_PORT: u16 = 47123;
    let mut http = spawn_client(&sandbox, None, Some(SOURCE_PORT), addr(VIP4));
    let (http_stream, http_peer) = accept(&first4, &mut http);
    // Its record not taken yet (a client-first listener holds a connection until its bytes).
    let mut opaque = spawn_client(&sandbox, None, Some(SOURCE_PORT), addr(OPAQUE));
    let (opaque_stream, opaque_peer) = accept(&agent4, &mut opaque);
    assert_eq!(http_peer, opaque_peer, "one caller address");
    let original = |peer: SocketAddr, listener: &TcpListener| {
        let port = listener.local_addr().unwrap().port();
        redirect.take_original(peer, port).map(|r| r.original_dst)
    };
    assert_eq!(original(http_peer, &first4), Some(addr(VIP4)));
    assert_eq!(original(opaque_peer, &agent4), Some(addr(OPAQUE)));
    for (stream, client) in [(http_stream, http), (opaque_stream, opaque)] {
        stream.set_nonblocking(false).unwrap();
        (&stream).write_all(b"agent\n").unwrap();
        let output = client.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// A record the agent never took (the caller reset before the agent accepted, or gave up in a
/// full accept queue) goes with the caller's socket: left, a later connection from the same
/// address made straight to the agent's port would take it, with its original destination and
/// its cgroup's identity. A caller that writes and closes in order before the agent accepts
/// keeps its record: the agent's side of the connection waits to be accepted, with its bytes.
#[test]
fn a_record_the_agent_never_took_goes_with_its_connection_if_reset() {
    skip_unless_root!();
    let sandbox = Sandbox::create();
    let agent4 = sandbox.bind("127.0.0.1:0");
    let agent6 = sandbox.bind("[::1]:0");
    let redirect = attach(&sandbox.cgroup, &agent4, &agent6);
    redirect
        .set_mesh_services([(VIP4.parse().unwrap(), false)])
        .unwrap();
    let port = agent4.local_addr().unwrap().port();
    for (source_port, ends, kept) in [
        (47125, ClientEnd::ResetAtOnce, false),
        (47126, ClientEnd::WriteAndClose, true),
    ] {
        let client = spawn_client_with(
            &sandbox,
            ClientOptions {
                source_port: Some(source_port),
                ends: Some(ends),
                ..ClientOptions::default()
            },
            VIP4.parse().unwrap(),
        );
        let output = client.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // The caller's socket runs its course: gone (reset), or, closed in order, its FIN
        // acknowledged and the socket itself gone, a time-wait one in its place (`ss` shows its
        // timer): the close the program sees has happened either way.
        let settled = || {
            let sockets = Command::new("ip")
                .args(["netns", "exec", &sandbox.name, "ss", "-Htano"])
                .args(["sport", "=", &format!(":{source_port}")])
                .output()
                .expect("running ss (iproute2)");
            let sockets = String::from_utf8_lossy(&sockets.stdout).into_owned();
            sockets.lines().all(|l| l.contains("timewait"))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !settled() {
            assert!(
                Instant::now() < deadline,
                "{ends:?}: the caller's socket never closed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let caller = SocketAddr::from(([127, 0, 0, 1], source_port));
        let original = redirect.take_original(caller, port).map(|r| r.original_dst);
        let expected = kept.then(|| VIP4.parse().unwrap());
        assert_eq!(original, expected, "{ends:?}");
    }
}

/// The redirect attached with `agent4` for any port and `first4` for ports whose clients speak
/// first.
fn attach_with_client_first(cgroup: &Path, agent4: &TcpListener, first4: &TcpListener) -> Redirect {
    attach_listeners(cgroup, [(agent4, false), (first4, true)])
}

/// The redirect attached with `agent4` and `agent6`, each for any port of its family.
fn attach(cgroup: &Path, agent4: &TcpListener, agent6: &TcpListener) -> Redirect {
    attach_listeners(cgroup, [(agent4, false), (agent6, false)])
}

/// The redirect attached with these listeners, each for ports whose clients speak first or not.
fn attach_listeners(cgroup: &Path, listeners: [(&TcpListener, bool); 2]) -> Redirect {
    let listeners = listeners.map(|(listener, client_first)| AgentListener {
        listener,
        addr: listener.local_addr().unwrap(),
        client_first,
    });
    Redirect::attach(cgroup, &listeners).unwrap_or_else(|e| panic!("{e}"))
}

fn assert_attached_once(cgroup: &Path) {
    let mut names: Vec<String> = redirect::attached_programs(cgroup)
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    names.sort();
    assert_eq!(names, PROGRAMS, "each program attached exactly once");
}

/// SO_NETNS_COOKIE of a socket: the cookie of the namespace it lives in.
fn netns_cookie(socket: &TcpListener) -> u64 {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid socket and an out-buffer of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    assert_eq!(
        rc,
        0,
        "SO_NETNS_COOKIE: {}",
        std::io::Error::last_os_error()
    );
    cookie
}

/// Every sandbox name starts with this, then the pid of the test run that created it.
const SANDBOX_PREFIX: &str = "gamma-ebpf-";

/// A network namespace (`/run/netns/<name>`, loopback up, the test VIPs on lo) and a cgroup
/// (`<cgroup2 mount>/<name>`) of this test run; both removed by name on drop.
struct Sandbox {
    name: String,
    netns: PathBuf,
    cgroup: PathBuf,
}

impl Sandbox {
    fn create() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        Self::sweep_dead_runs();
        let id = COUNTER.fetch_add(1, Ordering::Relaxed);
        // Named first, so that whatever part gets created is removed, even if a later step fails.
        let sandbox = Self::named(format!("{SANDBOX_PREFIX}{}-{id}", std::process::id()));
        ip(&["netns", "add", &sandbox.name]);
        let in_netns = |args: &[&str]| ip(&[&["-n", sandbox.name.as_str()], args].concat());
        in_netns(&["link", "set", "lo", "up"]);
        in_netns(&["addr", "add", "10.96.0.10/32", "dev", "lo"]);
        in_netns(&["addr", "add", "fd00:96::10/128", "dev", "lo", "nodad"]);
        fs::create_dir(&sandbox.cgroup).unwrap();
        sandbox
    }

    /// The sandbox called `name` (creates nothing; dropping it removes whatever exists).
    fn named(name: String) -> Self {
        Self {
            netns: PathBuf::from("/run/netns").join(&name),
            cgroup: redirect::cgroup2_mount().unwrap().join(&name),
            name,
        }
    }

    /// Removes the sandboxes of runs that were killed before they could clean up (their pid is
    /// gone), so that an interrupted run does not leave namespaces and cgroups behind for good.
    fn sweep_dead_runs() {
        let dirs = [
            PathBuf::from("/run/netns"),
            redirect::cgroup2_mount().unwrap(),
        ];
        let names: std::collections::BTreeSet<String> = dirs
            .iter()
            .filter_map(|dir| fs::read_dir(dir).ok())
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|name| name.starts_with(SANDBOX_PREFIX))
            .collect();
        for name in names {
            let pid = name[SANDBOX_PREFIX.len()..]
                .split('-')
                .next()
                .unwrap_or_default();
            if !pid.is_empty() && !Path::new("/proc").join(pid).exists() {
                drop(Self::named(name));
            }
        }
    }

    /// A listener bound inside the namespace (from a thread that joins it; the socket stays there).
    fn bind(&self, addr: &str) -> TcpListener {
        let netns = File::open(&self.netns).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on a namespace fd; affects only this short-lived thread.
                let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                let listener =
                    TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
                listener.set_nonblocking(true).unwrap();
                listener
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.netns.exists() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
        if self.cgroup.exists() {
            // A test that failed may have left a client in it: a cgroup with a process is not
            // removed.
            let _ = fs::write(self.cgroup.join("cgroup.kill"), "1");
            std::thread::sleep(Duration::from_millis(50));
            if let Err(e) = fs::remove_dir(&self.cgroup) {
                eprintln!("could not remove {}: {e}", self.cgroup.display());
            }
        }
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .expect("running ip (iproute2)");
    assert!(status.success(), "ip {} failed", args.join(" "));
}

/// A listener of the test and the name it answers with.
#[derive(Clone, Copy)]
struct Server<'a> {
    name: &'static str,
    listener: &'a TcpListener,
}

impl<'a> Server<'a> {
    fn new(name: &'static str, listener: &'a TcpListener) -> Self {
        Self { name, listener }
    }
}

/// What one client connection showed on both ends.
#[derive(Debug)]
struct Exchange {
    /// Which server accepted it.
    server: &'static str,
    /// The client's getpeername().
    client_peer: SocketAddr,
    /// The peer address the server saw.
    agent_peer: SocketAddr,
    /// The port of the server that accepted it.
    agent_port: u16,
    /// `take_original` for that peer.
    original: Option<Redirected>,
}

/// Runs a client in the sandbox's netns and cgroup that dials `target`, serves its connection on
/// whichever of `servers` gets it, and reports what each side saw.
fn exchange(
    sandbox: &Sandbox,
    target: SocketAddr,
    servers: &[Server<'_>],
    redirect: &Redirect,
) -> Exchange {
    exchange_after(sandbox, None, target, servers, redirect)
}

/// [`exchange`], the client's socket having first dialled `refused_first` (nothing listens).
fn exchange_after(
    sandbox: &Sandbox,
    refused_first: Option<SocketAddr>,
    target: SocketAddr,
    servers: &[Server<'_>],
    redirect: &Redirect,
) -> Exchange {
    let mut client = spawn_client(sandbox, refused_first, None, target);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (server, stream, peer, port) = loop {
        if let Some(accepted) = servers.iter().find_map(|s| {
            let port = s.listener.local_addr().unwrap().port();
            s.listener.accept().ok().map(|(c, p)| (s.name, c, p, port))
        }) {
            break accepted;
        }
        if let Some(status) = client.try_wait().unwrap() {
            let output = client.wait_with_output().unwrap();
            panic!(
                "client for {target} exited ({status}) before any server accepted: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        assert!(
            Instant::now() < deadline,
            "no server accepted the connection to {target}"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    let original = redirect.take_original(peer, port);
    stream.set_nonblocking(false).unwrap();
    let mut reader = BufReader::new(&stream);
    let mut hello = String::new();
    reader.read_line(&mut hello).unwrap();
    (&stream)
        .write_all(format!("{server}\n").as_bytes())
        .unwrap();

    let output = client.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "client failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // libtest prints "test client_helper ... " before the test's own output, on the same line.
    let field = |prefix: &str| -> String {
        stdout
            .lines()
            .find_map(|l| l.split_once(prefix).map(|(_, value)| value))
            .unwrap_or_else(|| panic!("client printed no {prefix}: {stdout}"))
            .to_owned()
    };
    assert_eq!(
        field(REPLY),
        server,
        "the client heard from another server than accepted"
    );
    Exchange {
        server,
        client_peer: field(PEER).parse().unwrap(),
        agent_peer: peer,
        agent_port: port,
        original,
    }
}

const CLIENT_TARGET: &str = "GAMMA_EBPF_TEST_CLIENT_TARGET";
/// Set: the client's socket first dials this address, where nothing listens, then the target.
const CLIENT_REFUSED_FIRST: &str = "GAMMA_EBPF_TEST_CLIENT_REFUSED_FIRST";
/// Set: the client's socket is bound to this port (shared with other sockets: SO_REUSEADDR).
const CLIENT_SOURCE_PORT: &str = "GAMMA_EBPF_TEST_CLIENT_SOURCE_PORT";
/// Set (a [`ClientEnd`]): how the client ends its connection once connected.
const CLIENT_ENDS: &str = "GAMMA_EBPF_TEST_CLIENT_ENDS";
const PEER: &str = "client-peer=";
const REPLY: &str = "client-reply=";

/// connect(2) of `fd` to the IPv4 `addr`.
fn raw_connect(fd: RawFd, addr: SocketAddr) -> std::io::Result<()> {
    let SocketAddr::V4(v4) = addr else {
        panic!("{addr}: IPv4 only")
    };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `sa` is a valid sockaddr_in for the call's duration.
    let rc = unsafe {
        libc::connect(
            fd,
            (&raw const sa).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A new IPv4 TCP socket, and the stream that owns it.
fn ipv4_socket() -> (RawFd, TcpStream) {
    use std::os::fd::FromRawFd as _;
    // SAFETY: a plain socket call; the descriptor is owned by the stream made below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new socket nothing else owns.
    (fd, unsafe { TcpStream::from_raw_fd(fd) })
}

/// One IPv4 socket connect()ed twice: to `refused` (nothing listens there), then to `target`.
fn connect_after_refused(refused: SocketAddr, target: SocketAddr) -> TcpStream {
    let (fd, stream) = ipv4_socket();
    let refusal = raw_connect(fd, refused).expect_err("nothing listens there");
    assert_eq!(
        refusal.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{refusal}"
    );
    raw_connect(fd, target).unwrap_or_else(|e| panic!("connect {target} after {refused}: {e}"));
    stream
}

/// An IPv4 socket bound to `source_port` (with SO_REUSEADDR, so that another such socket may
/// share it) and connect()ed to `target`.
fn connect_from(source_port: u16, target: SocketAddr) -> TcpStream {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    let stream = runtime.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_reuseaddr(true).unwrap();
        socket
            .bind(SocketAddr::from(([0, 0, 0, 0], source_port)))
            .unwrap_or_else(|e| panic!("bind :{source_port}: {e}"));
        socket
            .connect(target)
            .await
            .unwrap_or_else(|e| panic!("connect {target} from :{source_port}: {e}"))
    });
    let stream = stream.into_std().unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
}

/// How a client run by [`spawn_client_with`] connects.
#[derive(Default)]
struct ClientOptions {
    /// Its socket first dials this address, where nothing listens.
    refused_first: Option<SocketAddr>,
    /// Its socket is bound to this port.
    source_port: Option<u16>,
    /// How it ends its connection once connected, instead of an exchange with the server.
    ends: Option<ClientEnd>,
}

#[derive(Clone, Copy, Debug)]
enum ClientEnd {
    /// A reset (SO_LINGER 0) without a byte.
    ResetAtOnce,
    /// A byte, then an orderly close.
    WriteAndClose,
}

/// This binary again, running only `client_helper`, inside the sandbox's netns and cgroup.
fn spawn_client(
    sandbox: &Sandbox,
    refused_first: Option<SocketAddr>,
    source_port: Option<u16>,
    target: SocketAddr,
) -> std::process::Child {
    let options = ClientOptions {
        refused_first,
        source_port,
        ends: None,
    };
    spawn_client_with(sandbox, options, target)
}

/// [`spawn_client`], told how to connect.
fn spawn_client_with(
    sandbox: &Sandbox,
    options: ClientOptions,
    target: SocketAddr,
) -> std::process::Child {
    let ClientOptions {
        refused_first,
        source_port,
        ends,
    } = options;
    let netns = File::open(&sandbox.netns).unwrap();
    let procs = OpenOptions::new()
        .write(true)
        .open(sandbox.cgroup.join("cgroup.procs"))
        .unwrap();
    let (netns_fd, procs_fd): (RawFd, RawFd) = (netns.as_raw_fd(), procs.as_raw_fd());
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "client_helper",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CLIENT_TARGET, target.to_string())
        .envs(refused_first.map(|a| (CLIENT_REFUSED_FIRST, a.to_string())))
        .envs(source_port.map(|p| (CLIENT_SOURCE_PORT, p.to_string())))
        .envs(ends.map(|end| (CLIENT_ENDS, format!("{end:?}"))))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only async-signal-safe syscalls on fds opened beforehand (kept
    // alive by `netns` and `procs` until spawn returns).
    unsafe {
        command.pre_exec(move || {
            // "0" moves the writing process: the child joins the cgroup before it runs any code.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1
                || libc::setns(netns_fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command.spawn().unwrap();
    drop((netns, procs));
    child
}

/// Not a test of its own: the client side of [`exchange`], run in a child process. Does nothing
/// when run as part of the suite.
#[test]
fn client_helper() {
    let Ok(target) = std::env::var(CLIENT_TARGET) else {
        return;
    };
    let target: SocketAddr = target.parse().unwrap();
    let refused_first = std::env::var(CLIENT_REFUSED_FIRST).ok();
    let source_port = std::env::var(CLIENT_SOURCE_PORT).ok();
    let stream = match (refused_first, source_port) {
        (Some(refused), _) => connect_after_refused(refused.parse().unwrap(), target),
        (None, Some(port)) => connect_from(port.parse().unwrap(), target),
        (None, None) => TcpStream::connect_timeout(&target, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {target}: {e}")),
    };
    let ends = std::env::var(CLIENT_ENDS).ok();
    if ends.as_deref() == Some("WriteAndClose") {
        (&stream).write_all(b"x").unwrap();
        return;
    }
    if ends.as_deref() == Some("ResetAtOnce") {
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: a setsockopt of a linger struct that lives through the call, on an open socket.
        let rc = unsafe {
            libc::setsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&raw const linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
        return;
    }
    println!("{PEER}{}", stream.peer_addr().unwrap());
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (&stream).write_all(b"hello\n").unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    println!("{REPLY}{}", reply.trim());
}

/// A successor that adopts the running agent's programs (the same binary) changes their config
/// (its exempt cgroup, local sockets turned on) only once the running agent has stopped
/// accepting: before, a successor started with `--local-sockets` turned pairing on at once, and
/// the running agent, which did not know, spliced the sockets the kernel paired (their bytes sat
/// where splice(2) does not read), for good if the successor went away before Stop.
#[test]
fn an_adopting_successor_changes_the_programs_config_only_at_stop() {
    skip_unless_root!();
    let sandbox = Sandbox::create();
    let agent4 = sandbox.bind("127.0.0.1:0");
    let agent6 = sandbox.bind("[::1]:0");
    let running = attach(&sandbox.cgroup, &agent4, &agent6);
    assert!(!running.local_sockets().unwrap());
    let successor = |running: &Redirect| {
        let (offer, fds) = running.offer().unwrap();
        let listeners = [&agent4, &agent6].map(|listener| AgentListener {
            listener,
            addr: listener.local_addr().unwrap(),
            client_first: false,
        });
        Redirect::take_over(
            &sandbox.cgroup,
            &listeners,
            redirect::Predecessor::new(offer, fds).unwrap(),
            false,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let gone_before_stop = successor(&running);
    gone_before_stop.set_local_sockets(true).unwrap();
    assert!(!running.local_sockets().unwrap(), "pairing waits for Stop");
    drop(gone_before_stop);
    assert!(!running.local_sockets().unwrap(), "nor came after it went");
    let next = successor(&running);
    next.set_local_sockets(true).unwrap();
    assert!(!running.local_sockets().unwrap());
    assert_eq!(
        next.complete_takeover().unwrap(),
        redirect::TakeoverKind::Adopted
    );
    assert!(
        running.local_sockets().unwrap() && next.local_sockets().unwrap(),
        "at Stop the programs pair (their config is shared)"
    );
    next.set_local_sockets(false).unwrap();
}
