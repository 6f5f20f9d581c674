//! `cargo xtask bench [engine|peers|alloc|conns|pump|redirect|instructions]`: benchmarks, never timed tests.
//!
//! - `engine`: criterion benchmarks of the route engine (lookup, publish, memory per route), with
//!   linkerd2-proxy's route matcher over the same routes as the lookup's anchor
//!   (`vendor/linkerd-http-route`).
//! - `peers`: `../shared/bench/peers/run.sh` with our agent in the same run as a direct
//!   connection, nginx, haproxy and envoy, and two forwarders in our layout, in slots added to a
//!   copy of the script: a bare hyper one (`floor`, `tests/src/bin/hyper_floor.rs`: what hyper
//!   alone costs) and one on `httparse` with reused buffers (`codec`,
//!   `tests/src/bin/codec_floor.rs`: what an HTTP/1.1 codec of our own could cost at least)
//!   (knobs: ROUNDS, DURATION, WARMUP, WITH_ENVOY). As root, two more, on the path pods take
//!   (wrk dials a Service address that the programs steer to the agent; see [`LocalSlot`]):
//!   `local`, through the kernel redirect with `--local-sockets`, and `steered`, without.
//! - `alloc`: heap allocations per request on the agent's request path, HTTP/1.1 (keep-alive, and
//!   a new connection per request, and keep-alive with the access log on) and HTTP/2
//!   (`tests/src/bin/bench_alloc.rs`;
//!   `GAMMA_ALLOC_TRACE=1` says where they come from).
//! - `conns`: the agent's resident memory idle and per idle keep-alive connection, HTTP/1.1 and
//!   HTTP/2 (`tests/src/bin/bench_conns.rs`).
//! - `pump`: an opaque connection's bytes through the agent's pump, splice(2) against copying:
//!   throughput and CPU per GiB (`tests/src/bin/bench_pump.rs`).
//! - `redirect`: connection setup and keep-alive through the kernel redirect against direct,
//!   and iptables REDIRECT, on a node of network namespaces (`tests/src/bin/bench_redirect.rs`).
//! - `instructions`: user-space instructions per kept-alive request, counted by callgrind: the
//!   agent, the floors and nginx, free of the machine's noise (`instructions.rs`).

use crate::util::{self, run_shown, step};
use anyhow::{bail, Result};
use std::process::Command;

pub fn run_bench(args: &[String]) -> Result<()> {
    match args.first().map(String::as_str).unwrap_or("engine") {
        "engine" => step("criterion: route engine", || {
            util::cargo_shown(&["bench", "-p", "gamma-engine", "--bench", "engine"])
        }),
        "peers" => peers(),
        "redirect" => redirect(),
        "alloc" => release_bin("gamma-bench-alloc", "allocations per request", &[]),
        // It runs the agent binary too.
        "conns" => release_bin(
            "gamma-bench-conns",
            "memory per idle connection",
            &["--bins"],
        ),
        "pump" => release_bin("gamma-bench-pump", "splice against copy", &[]),
        "instructions" => crate::instructions::run(),
        other => bail!(
            "unknown benchmark `{other}`: engine, peers, redirect, alloc, conns, pump or \
             instructions"
        ),
    }
}

fn shared_dir() -> std::path::PathBuf {
    std::env::var_os("GAMMA_SHARED")
        .map(Into::into)
        .unwrap_or_else(|| util::workspace_root().join("../shared"))
}

/// The line of `run.sh` after which more proxies of ours are started: the floors.
const OURS_ADDED: &str = "  TARGETS=\"$TARGETS ours=$OURPROXY_URL=$PID_ours\"\nfi\n";

/// A slot started like `ours` and listed as `name` (the script knows one proxy of ours; this
/// adds one), from `<NAME>_CMD` and `<NAME>_URL`.
fn slot(name: &str) -> String {
    let var = name.to_uppercase();
    format!(
        r#"if [ -n "${{{var}_CMD:-}}" ]; then
  start {name} bash -c "exec ${var}_CMD"
  wait_http "${var}_URL" "$PID_{name}" || {{ cat "$RUN/{name}.log"; exit 1; }}
  TARGETS="$TARGETS {name}=${var}_URL=$PID_{name}"
fi
"#
    )
}

/// Builds (release) the agent and the two floors of `bench peers`, and the `more` binaries of
/// `tests`.
pub fn build_forwarders(more: &[&str]) -> Result<()> {
    let mut args = vec![
        "build",
        "--release",
        "-p",
        "proxy-agent",
        "-p",
        "gamma-tests",
        "--bin",
        "proxy-agent",
        "--bin",
        "gamma-hyper-floor",
        "--bin",
        "gamma-codec-floor",
    ];
    for bin in more {
        args.extend(["--bin", bin]);
    }
    step("build the agent and the floors (release)", || {
        util::cargo(&args)
    })
}

fn peers() -> Result<()> {
    let root = util::workspace_root();
    build_forwarders(&[])?;
    let script = shared_dir().join("bench/peers/run.sh");
    let original = std::fs::read_to_string(&script).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e}: set GAMMA_SHARED to the shared folder",
            script.display()
        )
    })?;
    if !original.contains(OURS_ADDED) {
        bail!(
            "{} no longer starts `ours` the way this benchmark extends it (slots for the floors \
             after `{}`): update OURS_ADDED in xtask/src/bench.rs",
            script.display(),
            OURS_ADDED.trim()
        );
    }
    let extended = root.join("target/peers-run.sh");
    let local = if util::is_root() {
        Some(LocalSlot::prepare()?)
    } else {
        util::warn("not root: no `local` and `steered` slots (the kernel redirect)");
        None
    };
    let slots = format!(
        "{OURS_ADDED}{}{}{}",
        slot("floor"),
        slot("codec"),
        if local.is_some() {
            slot("local") + &slot("steered")
        } else {
            String::new()
        }
    );
    std::fs::write(&extended, original.replacen(OURS_ADDED, &slots, 1))?;
    let agent = root.join("target/release/proxy-agent");
    let floor = |bin: &str, port: u16| {
        let bin = root.join("target/release").join(bin);
        format!(
            "{} 127.0.0.1:{port} 127.0.0.1:18080 127.0.0.1:18081",
            bin.display()
        )
    };
    let manifests = root.join("bench/peers/manifests");
    // Like the peers: no access log, two worker threads (2 cores), upstream keep-alive pools.
    let command = format!(
        "env RUST_LOG=warn {} --manifests {} --listen 127.0.0.1:18184=bench/echo:80 --admin 127.0.0.1:15990 --workers 2",
        agent.display(),
        manifests.display()
    );
    let mut script = Command::new("bash");
    script.arg(&extended);
    if let Some(local) = &local {
        // The whole run in the cgroup the programs attach to, so that wrk's connects are steered.
        script = Command::new("sh");
        script.arg("-c").arg(format!(
            "echo $$ > {}/cgroup.procs && exec bash {}",
            local.run.display(),
            extended.display()
        ));
        script
            .env("LOCAL_CMD", local.command(&agent))
            .env("LOCAL_URL", format!("http://{LOCAL_VIP}/"))
            .env("STEERED_CMD", local.steered_command(&agent))
            .env("STEERED_URL", format!("http://{STEERED_VIP}/"));
    }
    let result = step(
        "peer proxies side by side (run.sh, with the hyper and codec floors)",
        || {
            run_shown(
                script
                    .env("OURPROXY_CMD", command)
                    .env("OURPROXY_URL", "http://127.0.0.1:18184/")
                    .env("FLOOR_CMD", floor("gamma-hyper-floor", 18185))
                    .env("FLOOR_URL", "http://127.0.0.1:18185/")
                    .env("CODEC_CMD", floor("gamma-codec-floor", 18186))
                    .env("CODEC_URL", "http://127.0.0.1:18186/"),
            )
        },
    );
    if let Some(local) = local {
        local.remove();
    }
    result
}

/// The Service address of the `local` slot: in 127.0.0.0/8, so that a connect the programs do
/// not steer (the agent not up yet, or gone) is refused on loopback, never routed off the machine.
const LOCAL_VIP: &str = "127.0.200.10:80";

/// The Service address of the `steered` slot, as [`LOCAL_VIP`].
const STEERED_VIP: &str = "127.0.200.11:80";

/// The pod the whole run is, for the `local` and `steered` slots: wrk, the echo backends and the
/// peers share 127.0.0.1 as a pod's containers share its address, and run in its cgroup
/// (`pod<uid>`, as the kubelet names them). The agent then knows the backends as pods of its
/// node, which its connections to pair with, and the callers as that pod.
const LOCAL_POD_UID: &str = "6a3d0c52-7f1e-4b9a-9c2d-5e8f1a2b3c4d";

/// The slots on the kernel redirect, each an agent with programs of its own on an ancestor of
/// the run's cgroup (under the cgroup v2 mount: `gamma-peers-bench/local/{pod<uid>,agent}` and
/// `gamma-peers-bench/steered-agent`; the whole run in the pod's, as on a node where the agent is
/// a pod among pods), each with a copy of the bench manifests with the Service at its own address
/// and the run's Pod at 127.0.0.1:
/// - `local`: with `--local-sockets`, the Pod opted in ([`LOCAL_VIP`]);
/// - `steered`: the path a pod takes by default, without them ([`STEERED_VIP`]): a port that
///   declares HTTP goes to the client-first listener.
///
/// The programs of one pass the other's connects (their Service address is not theirs, and the
/// other agent's address is no Service).
struct LocalSlot {
    outer: std::path::PathBuf,
    parent: std::path::PathBuf,
    run: std::path::PathBuf,
    agent: std::path::PathBuf,
    steered_agent: std::path::PathBuf,
    manifests: std::path::PathBuf,
    steered_manifests: std::path::PathBuf,
}

impl LocalSlot {
    fn prepare() -> Result<Self> {
        let mount = cgroup2_mount()?;
        let outer = mount.join("gamma-peers-bench");
        let parent = outer.join("local");
        let target = util::workspace_root().join("target");
        let slot = LocalSlot {
            run: parent.join(format!("pod{LOCAL_POD_UID}")),
            agent: parent.join("agent"),
            steered_agent: outer.join("steered-agent"),
            parent,
            outer,
            manifests: target.join("peers-local-manifests"),
            steered_manifests: target.join("peers-steered-manifests"),
        };
        slot.remove(); // what an interrupted run left
        for dir in [
            &slot.outer,
            &slot.parent,
            &slot.run,
            &slot.agent,
            &slot.steered_agent,
            &slot.manifests,
            &slot.steered_manifests,
        ] {
            std::fs::create_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("creating {}: {e}", dir.display()))?;
        }
        let bench = std::fs::read_to_string(
            util::workspace_root().join("bench/peers/manifests/bench.yaml"),
        )?;
        let original = "clusterIP: 10.96.200.10";
        if !bench.contains(original) {
            bail!("bench/peers/manifests/bench.yaml no longer has `{original}`: update LocalSlot");
        }
        for (dir, vip, opted_in) in [
            (&slot.manifests, LOCAL_VIP, true),
            (&slot.steered_manifests, STEERED_VIP, false),
        ] {
            let vip = vip.split(':').next().unwrap_or_default();
            let pod = format!(
                "\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: loopback, namespace: bench, uid: \
                 {LOCAL_POD_UID}, annotations: {{gamma-node.io/local-sockets: \"{opted_in}\"}}}}\nspec: {{containers: [{{name: run, image: none}}]}}\nstatus: \
                 {{phase: Running, podIP: 127.0.0.1}}\n"
            );
            std::fs::write(
                dir.join("bench.yaml"),
                bench.replacen(original, &format!("clusterIP: {vip}"), 1) + &pod,
            )?;
        }
        Ok(slot)
    }

    /// Like `ours` (two workers, no access log), but in the agent's cgroup, on the redirect.
    fn command(&self, agent: &std::path::Path) -> String {
        Self::agent_command(
            agent,
            (&self.agent, &self.parent),
            &self.manifests,
            "--redirect 127.0.0.1:18187 --local-sockets --admin 127.0.0.1:15991",
        )
    }

    /// As [`Self::command`], without local sockets, its programs on the outer cgroup.
    fn steered_command(&self, agent: &std::path::Path) -> String {
        Self::agent_command(
            agent,
            (&self.steered_agent, &self.outer),
            &self.steered_manifests,
            "--redirect 127.0.0.1:18189 --admin 127.0.0.1:15992",
        )
    }

    /// `agent` in cgroup `runs_in`, its programs on `attached_to`, with `manifests` and `args`.
    fn agent_command(
        agent: &std::path::Path,
        (runs_in, attached_to): (&std::path::Path, &std::path::Path),
        manifests: &std::path::Path,
        args: &str,
    ) -> String {
        format!(
            "sh -c 'echo $$ > {}/cgroup.procs && exec env RUST_LOG=warn {} --manifests {} \
             --cgroup {} {args} --workers 2'",
            runs_in.display(),
            agent.display(),
            manifests.display(),
            attached_to.display()
        )
    }

    /// Removes the cgroups (run.sh has stopped its processes; they may take a moment to exit).
    fn remove(&self) {
        for _ in 0..50 {
            for dir in [
                &self.run,
                &self.agent,
                &self.parent,
                &self.steered_agent,
                &self.outer,
            ] {
                let _ = std::fs::remove_dir(dir);
            }
            if !self.outer.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        util::warn(&format!("could not remove {}", self.outer.display()));
    }
}

/// The cgroup v2 mount point (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on hybrid systems).
fn cgroup2_mount() -> Result<std::path::PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            (fs.split_whitespace().next() == Some("cgroup2"))
                .then(|| mount.split_whitespace().nth(4).map(Into::into))?
        })
        .ok_or_else(|| anyhow::anyhow!("no cgroup v2 mount in /proc/self/mountinfo"))
}

fn redirect() -> Result<()> {
    if !util::is_root() {
        bail!("the redirect benchmark builds a node of network namespaces and loads eBPF: run it as root");
    }
    // It runs the agent binary too.
    release_bin("gamma-bench-redirect", "redirect benchmark", &["--bins"])
}

/// Builds (release) and runs one of the benchmark binaries of `tests`. `build`: the build's
/// targets when the binary needs more than itself (`--bins`: the agent too); empty: that binary.
fn release_bin(name: &str, what: &str, build: &[&str]) -> Result<()> {
    let only = ["-p", "gamma-tests", "--bin", name];
    let targets = if build.is_empty() { &only[..] } else { build };
    step("build (release)", || {
        util::cargo(&[&["build", "--release"][..], targets].concat())
    })?;
    step(what, || {
        run_shown(&mut Command::new(
            util::workspace_root().join("target/release").join(name),
        ))
    })
}
