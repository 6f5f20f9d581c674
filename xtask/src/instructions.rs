//! `cargo xtask bench instructions`: user-space instructions per request, kept alive and with a
//! new connection each, and over HTTP/2 (prior knowledge, one stream at a time), counted by
//! callgrind, for the agent (unlogged as in `bench peers`, and as
//! the DaemonSet runs it, an access log line per request) beside the two floors of `bench peers`
//! and nginx (if installed).
//!
//! Why: the peers run measures CPU time on a shared machine, whose noise moves its ratios by more
//! than most changes of the request path; an instruction count is nearly the same for the same
//! binary and load whatever else the machine does. It counts only user space (the kernel's part,
//! two thirds of a request's CPU on loopback, is what `bench peers` shows), and instructions, not
//! time (a cache miss costs more than an add): a ratio of code paths, not of speed.
//!
//! Each forwarder runs alone under `valgrind --tool=callgrind`, before two echo backends (the
//! agent with the peers' manifests, nginx with the peers' configuration in one process); `wrk
//! -t1 -c1` warms it up, then for each mode callgrind's counters are zeroed, `wrk` (or for HTTP/2
//! `gamma-load`) runs for a fixed time, and the count since the zero is divided by the requests
//! it made.

use crate::util::{self, step};
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One forwarder measured: its name, the port it listens on, the one for HTTP/2 callers (if it
/// takes them), its command line, and its `RUST_LOG`.
struct Forwarder {
    name: &'static str,
    port: u16,
    h2_port: Option<u16>,
    command: Vec<String>,
    log: &'static str,
}

/// The echo backends' addresses, as in `bench/peers/manifests` and the floors' arguments.
const BACKENDS: [&str; 2] = ["127.0.0.1:18080", "127.0.0.1:18081"];

pub fn run() -> Result<()> {
    for tool in ["valgrind", "callgrind_control", "wrk"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .map_or(true, |s| !s.success())
        {
            bail!("`{tool}` is not installed: apt-get install valgrind wrk");
        }
    }
    crate::bench::build_forwarders(&["gamma-echo", "gamma-load"])?;
    let root = util::workspace_root();
    let release = root.join("target/release");
    let work = root.join("target/bench-instructions");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let bin = |name: &str| release.join(name).display().to_string();
    let floor = |name: &str, port: u16| {
        let mut command = vec![bin(name), format!("127.0.0.1:{port}")];
        command.extend(BACKENDS.map(String::from));
        command
    };
    let agent = |extra: &[&str]| {
        let mut command = vec![
            bin("proxy-agent"),
            "--manifests".into(),
            root.join("bench/peers/manifests").display().to_string(),
            "--listen".into(),
            "127.0.0.1:18184=bench/echo:80".into(),
            "--admin".into(),
            "127.0.0.1:15990".into(),
            "--workers".into(),
            "2".into(),
        ];
        command.extend(extra.iter().map(|arg| arg.to_string()));
        command
    };
    let mut forwarders = vec![
        Forwarder {
            name: "ours",
            port: 18184,
            h2_port: Some(18184),
            command: agent(&[]),
            log: "warn",
        },
        // As the DaemonSet runs it: `RUST_LOG=info`, JSON lines, an access log line per request.
        Forwarder {
            name: "ours, access log as deployed",
            port: 18184,
            h2_port: Some(18184),
            command: agent(&["--log-format=json"]),
            log: "info",
        },
        Forwarder {
            name: "floor",
            port: 18185,
            h2_port: Some(18187),
            command: {
                let mut command = floor("gamma-hyper-floor", 18185);
                command.push("127.0.0.1:18187".into());
                command
            },
            log: "warn",
        },
        Forwarder {
            name: "codec",
            port: 18186,
            h2_port: None,
            command: floor("gamma-codec-floor", 18186),
            log: "warn",
        },
    ];
    match nginx(&work)? {
        Some(command) => forwarders.push(Forwarder {
            name: "nginx",
            port: 18181,
            h2_port: Some(NGINX_H2_PORT),
            command,
            log: "warn",
        }),
        None => util::warn("nginx is not installed: measured without it"),
    }
    let echo = Processes::start(
        BACKENDS
            .iter()
            .map(|addr| vec![bin("gamma-echo"), (*addr).to_string()])
            .collect(),
        &work,
        "warn",
    )?;
    for addr in BACKENDS {
        wait_answering(addr, Duration::from_secs(10))?;
    }
    let mut rows = Vec::new();
    for forwarder in &forwarders {
        let counted = step(&format!("{} under callgrind", forwarder.name), || {
            count(forwarder, &work)
        })?;
        rows.push((forwarder.name, counted));
    }
    drop(echo);
    let nginx = rows.iter().find(|(name, _)| *name == "nginx");
    let cell = |counted: Option<&Counted>, nginx: Option<&Counted>| {
        let Some(counted) = counted else {
            return "–".to_string();
        };
        let ratio = nginx.map_or(String::new(), |n| {
            format!(" ({:.2}×)", counted.per_request() / n.per_request())
        });
        format!("{:.0}{ratio}", counted.per_request())
    };
    println!(
        "\n| user-space instructions per request (against nginx) | kept alive | a new connection each | HTTP/2 |"
    );
    println!("|---|---|---|---|");
    for (name, modes) in &rows {
        let cells: Vec<String> = (0..MODES.len())
            .map(|i| cell(modes[i].as_ref(), nginx.and_then(|(_, n)| n[i].as_ref())))
            .collect();
        println!("| {name} | {} |", cells.join(" | "));
    }
    Ok(())
}

/// Where nginx takes HTTP/2 callers (prior knowledge): a server of its own, as nginx speaks
/// either HTTP/1.1 or HTTP/2 on a plain-text port.
const NGINX_H2_PORT: u16 = 18191;

/// nginx's command line, in one process with the peers' configuration (and the same location on
/// `NGINX_H2_PORT` for HTTP/2), if nginx is installed.
fn nginx(work: &Path) -> Result<Option<Vec<String>>> {
    let Some(nginx) = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        return Ok(None);
    };
    let prefix = work.join("nginx");
    for dir in ["logs", "tmp", "run"] {
        std::fs::create_dir_all(prefix.join(dir))?;
    }
    let [a, b] = BACKENDS;
    let location = "    location / {\n      proxy_pass http://backends;\n\
         proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n\
         proxy_set_header Host $http_host;\n      proxy_set_header x-perf-added proxy;\n    }\n";
    // The HTTP/2 server's `listen … http2`, as Debian's nginx 1.22 takes it (1.25 warns and reads
    // it the same).
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid run/nginx.pid;\n\
         error_log logs/error.log warn;\nevents {{ worker_connections 1024; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path tmp/client_body;\n  proxy_temp_path tmp/proxy;\n\
         keepalive_timeout 65s;\n  keepalive_requests 1000000;\n\
         upstream backends {{ server {a} weight=9; server {b} weight=1; keepalive 128; \
         keepalive_requests 1000000; keepalive_timeout 60s; }}\n\
         server {{\n    listen 127.0.0.1:18181;\n{location}  }}\n\
         server {{\n    listen 127.0.0.1:{NGINX_H2_PORT} http2;\n{location}  }}\n}}\n"
    );
    std::fs::write(prefix.join("nginx.conf"), conf)?;
    Ok(Some(vec![
        nginx.into(),
        "-p".into(),
        prefix.display().to_string(),
        "-c".into(),
        "nginx.conf".into(),
    ]))
}

/// What one forwarder counted: requests made and instructions since the zero.
struct Counted {
    requests: u64,
    instructions: u64,
}

impl Counted {
    fn per_request(&self) -> f64 {
        self.instructions as f64 / self.requests.max(1) as f64
    }
}

/// How the requests are made: HTTP/1.1 kept alive, HTTP/1.1 with a new connection each, HTTP/2.
#[derive(Clone, Copy)]
enum Mode {
    KeptAlive,
    NewConnections,
    Http2,
}

/// The table's columns, in the order they are measured.
const MODES: [Mode; 3] = [Mode::KeptAlive, Mode::NewConnections, Mode::Http2];

/// Runs `forwarder` under callgrind and counts its instructions over a timed run of each mode it
/// takes (not HTTP/2 without an `h2_port`).
fn count(forwarder: &Forwarder, work: &Path) -> Result<[Option<Counted>; 3]> {
    let out = work.join(forwarder.name.replace([' ', ','], "-"));
    std::fs::create_dir_all(&out)?;
    let mut command = vec![
        "valgrind".to_string(),
        "--tool=callgrind".into(),
        format!("--callgrind-out-file={}/callgrind.%p", out.display()),
    ];
    command.extend(forwarder.command.iter().cloned());
    let running = Processes::start(vec![command], &out, forwarder.log)?;
    let pid = running.pids()[0];
    let addr = format!("127.0.0.1:{}", forwarder.port);
    let url = format!("http://{addr}/");
    // Under callgrind a process starts some 50 times slower.
    wait_answering(&addr, Duration::from_secs(60))?;
    wrk(&url, Duration::from_secs(3), false)?;
    // Per mode, the requests made and callgrind's dump of their count (numbered from 1).
    let mut made = [None; MODES.len()];
    let mut dumps = 0;
    for (i, mode) in MODES.into_iter().enumerate() {
        let run = |duration: Duration| match (mode, forwarder.h2_port) {
            (Mode::KeptAlive, _) => wrk(&url, duration, false).map(Some),
            (Mode::NewConnections, _) => wrk(&url, duration, true).map(Some),
            (Mode::Http2, Some(port)) => h2_load(port, duration).map(Some),
            (Mode::Http2, None) => Ok(None),
        };
        if let Mode::Http2 = mode {
            // Its own warm-up: the first HTTP/2 connection sets up what the others reuse.
            run(Duration::from_secs(2))?;
        }
        callgrind_control("-z", pid)?;
        let Some(requests) = run(Duration::from_secs(8))? else {
            continue;
        };
        callgrind_control("-d", pid)?;
        dumps += 1;
        made[i] = Some((requests, dumps));
    }
    drop(running);
    let mut counted = [None, None, None];
    for (slot, made) in counted.iter_mut().zip(made) {
        if let Some((requests, dump)) = made {
            let instructions = instructions_in(&out, dump)?;
            *slot = Some(Counted {
                requests,
                instructions,
            });
        }
    }
    Ok(counted)
}

/// The instructions callgrind counted in its dump number `dump` (1: the first) in `dir`.
fn instructions_in(dir: &Path, dump: u32) -> Result<u64> {
    let suffix = format!(".{dump}");
    let path = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.display().to_string().ends_with(&suffix))
        .with_context(|| format!("no callgrind dump {dump} in {}", dir.display()))?;
    std::fs::read_to_string(&path)?
        .lines()
        .find_map(|l| l.strip_prefix("summary: ").or(l.strip_prefix("totals: ")))
        .and_then(|n| n.trim().parse().ok())
        .with_context(|| format!("no instruction total in {}", path.display()))
}

/// `wrk -t1 -c1 -d<duration> url`, with `Connection: close` if `close`; the requests it made. One
/// connection at a time: each request takes a whole turn of the event loop, so that the count
/// repeats (within 1 % for the agent, to the instruction for nginx; with four, 2 %).
fn wrk(url: &str, duration: Duration, close: bool) -> Result<u64> {
    let mut wrk = Command::new("wrk");
    wrk.args(["-t1", "-c1", "-d", &format!("{}s", duration.as_secs())]);
    if close {
        wrk.args(["-H", "Connection: close"]);
    }
    let out = util::output(wrk.arg(url))?;
    if out.contains("Non-2xx") || out.contains("Socket errors") {
        bail!("wrk saw failures against {url}:\n{out}");
    }
    out.lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no request count in wrk's output:\n{out}"))
}

/// `gamma-load` with one HTTP/2 client (prior knowledge, one stream at a time, as `wrk -c1`)
/// against 127.0.0.1:`port` for `duration`; the requests it made.
fn h2_load(port: u16, duration: Duration) -> Result<u64> {
    let load = util::workspace_root().join("target/release/gamma-load");
    let spec = serde_json::json!({
        "target": format!("127.0.0.1:{port}"),
        "host": "echo.bench",
        "path": "/",
        "duration_ms": duration.as_millis() as u64,
        "keep_alive": 0,
        "idle_keep_alive": 0,
        "idle_pause_ms": 0,
        "new_connection": 0,
        "http2": 1,
    });
    let out = util::output(Command::new(load).args(["--json", &spec.to_string()]))?;
    let report: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("gamma-load's report: {out}"))?;
    let (ok, failed) = (report["ok"].as_u64(), report["failed"].as_u64());
    match (ok, failed) {
        (Some(ok), Some(0)) if ok > 0 => Ok(ok),
        _ => bail!("gamma-load saw failures over HTTP/2 against 127.0.0.1:{port}: {out}"),
    }
}

fn callgrind_control(option: &str, pid: u32) -> Result<()> {
    util::output(Command::new("callgrind_control").args([option, &pid.to_string()])).map(drop)
}

/// Waits until `addr` answers an HTTP/1.1 request.
fn wait_answering(addr: &str, patience: Duration) -> Result<()> {
    use std::io::{Read, Write};
    let until = Instant::now() + patience;
    loop {
        let answered = std::net::TcpStream::connect(addr).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head)?;
            Ok(head.starts_with(b"HTTP/1.1 200"))
        });
        if let Ok(true) = answered {
            return Ok(());
        }
        if Instant::now() > until {
            bail!("{addr} did not answer 200 within {patience:?}: {answered:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Processes started for the benchmark, their output in files of `dir`; stopped when dropped.
struct Processes(Vec<Child>);

impl Processes {
    fn start(commands: Vec<Vec<String>>, dir: &Path, rust_log: &str) -> Result<Self> {
        let mut started = Processes(Vec::new());
        for (i, command) in commands.iter().enumerate() {
            let log = std::fs::File::create(dir.join(format!("process-{i}.log")))?;
            let child = Command::new(&command[0])
                .args(&command[1..])
                .env("RUST_LOG", rust_log)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", command.join(" ")))?;
            started.0.push(child);
        }
        Ok(started)
    }

    fn pids(&self) -> Vec<u32> {
        self.0.iter().map(Child::id).collect()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // SIGTERM first: callgrind writes its last dump on a clean exit.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
        }
        let until = Instant::now() + Duration::from_secs(10);
        for child in &mut self.0 {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
