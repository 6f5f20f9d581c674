//! The node harness itself (root only; otherwise each test records its skip and passes):
//! pods reach each other through the node, the simulated kube-proxy DNATs a VIP to its endpoints,
//! processes land in the right netns and cgroup, and a dropped node, also one dropped by a panic,
//! leaves nothing behind.

// The node kills and reaps every process it spawned when it drops.
#![allow(clippy::zombie_processes)]

use std::fs;
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use gamma_tests::node::{require_root, Footprint, Node, Pod};

const ECHO: &str = env!("CARGO_BIN_EXE_gamma-echo");
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);
const CURL_TIMEOUT: Duration = Duration::from_secs(5);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);

macro_rules! skip_unless_root {
    () => {
        if let Some(reason) = require_root() {
            gamma_tests::skip(concat!(file!(), ":", line!()), &reason);
            return;
        }
    };
}

/// A node with pods `a`, `b`, `c` (namespace `demo`) at 10.244.0.1{0,1,2}.
fn node_with_pods(run_name: &str) -> (Node, Vec<Pod>) {
    let mut node = Node::new(run_name).expect("creating the node");
    let pods = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let uid = format!("00000000-0000-4000-8000-00000000000{i}");
            node.add_pod("demo", name, &uid, Ipv4Addr::new(10, 244, 0, 10 + i as u8))
                .expect("adding a pod")
        })
        .collect();
    (node, pods)
}

/// `gamma-echo` in `pod` on its address and `port`, listening when this returns.
fn start_echo(pod: &Pod, port: u16) -> Child {
    let mut cmd = Command::new(ECHO);
    cmd.args(["--name", &pod.name, &format!("{}:{port}", pod.ip)])
        .stdout(Stdio::null());
    let child = pod.spawn(&mut cmd).expect("starting gamma-echo");
    pod.wait_for_port(port, LISTEN_TIMEOUT)
        .expect("gamma-echo listening");
    child
}

/// GET `url` with curl from `pod`; the name of the echo pod that answered.
fn curl(pod: &Pod, url: &str) -> Result<String> {
    curl_with(|cmd, timeout| pod.run_output(cmd, timeout), url)
}

/// GET `url` with curl run by `run_output` (a pod's or the node's); the echo pod that answered.
fn curl_with(
    run_output: impl FnOnce(&mut Command, Duration) -> Result<Output>,
    url: &str,
) -> Result<String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "2", url]);
    let output = run_output(&mut cmd, CURL_TIMEOUT)?;
    ensure!(
        output.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let answer: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("echo answer")?;
    Ok(answer["pod"].as_str().unwrap_or_default().to_string())
}

#[test]
fn a_pod_reaches_another_pod_through_the_node() {
    skip_unless_root!();
    let (_node, pods) = node_with_pods("pod-to-pod");
    let (a, b) = (&pods[0], &pods[1]);
    let _echo = start_echo(b, 8080);

    assert_eq!(curl(a, &format!("http://{}:8080/", b.ip)).unwrap(), "b");
}

#[test]
fn processes_are_placed_in_their_netns_and_cgroup() {
    skip_unless_root!();
    let (node, pods) = node_with_pods("placement");
    let b = &pods[1];
    let in_pod = b.spawn(Command::new("sleep").arg("30")).unwrap();
    let on_node = node.spawn(Command::new("sleep").arg("30")).unwrap();

    let pod_cgroup = b
        .cgroup()
        .strip_prefix(node.pods_cgroup().parent().unwrap())
        .unwrap();
    assert_eq!(
        cgroup_of(in_pod.id()),
        Path::new("/").join(pod_cgroup).to_str().unwrap()
    );
    assert_eq!(netns_inode_of(in_pod.id()), netns_inode(b.netns()));
    assert!(
        !cgroup_of(on_node.id()).contains(node.prefix()),
        "a node process is outside the pods' cgroups"
    );
    assert_eq!(netns_inode_of(on_node.id()), netns_inode(node.netns()));
    // The node's own traffic reaches a pod directly.
    let _echo = start_echo(b, 8080);
    let url = format!("http://{}:8080/", b.ip);
    assert_eq!(
        curl_with(|cmd, timeout| node.run_output(cmd, timeout), &url).unwrap(),
        "b"
    );
}

#[test]
fn a_vip_is_dnated_to_its_endpoints_like_kube_proxy() {
    skip_unless_root!();
    let (mut node, pods) = node_with_pods("kube-proxy");
    let (a, b, c) = (&pods[0], &pods[1], &pods[2]);
    let _echoes = [start_echo(b, 8080), start_echo(c, 8080)];
    node.dnat_service(VIP, 80, &[(b.ip, 8080), (c.ip, 8080)])
        .unwrap();
    let url = format!("http://{VIP}/");

    // From a pod (nat PREROUTING): every call answered, by both endpoints (all 20 from one has
    // probability 2^-19).
    let answers: Vec<String> = (0..20).map(|_| curl(a, &url).unwrap()).collect();
    assert!(
        answers.iter().any(|p| p == "b") && answers.iter().any(|p| p == "c"),
        "{answers:?}"
    );
    // From the node itself (nat OUTPUT).
    curl_with(|cmd, timeout| node.run_output(cmd, timeout), &url).expect("from the node");

    // Redefined with one endpoint; that endpoint reaching itself through the VIP is hairpin
    // traffic, which works because it is masqueraded.
    node.dnat_service(VIP, 80, &[(c.ip, 8080)]).unwrap();
    assert!((0..5).all(|_| curl(a, &url).unwrap() == "c"));
    assert_eq!(curl(c, &url).expect("hairpin through the VIP"), "c");

    // Removed: the VIP is blackholed again.
    node.remove_service(VIP, 80).unwrap();
    assert!(curl(a, &url).is_err(), "a removed service still answers");
}

#[test]
fn a_dropped_node_leaves_nothing_behind() {
    skip_unless_root!();
    let (footprint, pids) = {
        let (mut node, pods) = node_with_pods("cleanup");
        let pids = busy_node(&node, &pods);
        // Fails at the cgroup (same uid), after its netns and veth were made: those go too.
        let duplicate = node.add_pod("demo", "dup", &pods[0].uid, Ipv4Addr::new(10, 244, 0, 99));
        assert!(duplicate.is_err());
        (node.footprint(), pids)
    };
    assert_eq!(footprint.remaining(), Vec::<String>::new());
    let left: Vec<u32> = pids
        .into_iter()
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
        .collect();
    assert!(left.is_empty(), "processes (or zombies) left: {left:?}");
}

#[test]
fn a_node_dropped_by_a_panic_leaves_nothing_behind() {
    skip_unless_root!();
    let mut footprint: Option<Footprint> = None;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (node, pods) = node_with_pods("panic");
        busy_node(&node, &pods);
        footprint = Some(node.footprint());
        panic!("deliberate panic with the node alive");
    }));
    assert!(outcome.is_err());
    assert_eq!(
        footprint.expect("the node was built").remaining(),
        Vec::<String>::new()
    );
}

/// Leaves processes running in pods (also a grandchild nobody tracks) and on the node, and checks
/// that the footprint sees the node while it lives, so that an empty one after the drop means
/// something. The pids of the processes it spawned.
fn busy_node(node: &Node, pods: &[Pod]) -> Vec<u32> {
    let pids = vec![
        start_echo(&pods[1], 8080).id(),
        pods[0]
            .spawn(Command::new("sh").args(["-c", "sleep 60 & sleep 60"]))
            .unwrap()
            .id(),
        node.spawn(Command::new("sleep").arg("60")).unwrap().id(),
    ];
    let alive = node.footprint().remaining();
    for seen in ["is listed", "is still held by a process", "cgroup"] {
        assert!(
            alive.iter().any(|line| line.contains(seen)),
            "{seen:?} missing from {alive:?}"
        );
    }
    pids
}

/// This process's cgroup v2 path, from /proc/<pid>/cgroup ("0::<path>").
fn cgroup_of(pid: u32) -> String {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_default()
        .to_string()
}

fn netns_inode_of(pid: u32) -> u64 {
    fs::metadata(format!("/proc/{pid}/ns/net")).unwrap().ino()
}

fn netns_inode(name: &str) -> u64 {
    fs::metadata(Path::new("/run/netns").join(name))
        .unwrap()
        .ino()
}
