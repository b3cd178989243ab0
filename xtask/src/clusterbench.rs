//! `cargo xtask bench cluster`: three pinhole nodes sharing registrations in one
//! redis-server, at operator scale, for today's change-driven design and the polling one
//! it replaced (built from git, `--baseline REV`), and three Kamailio 5.6 nodes
//! replicating usrloc with DMQ (config/kamailio/dmq.cfg) as the yardstick, in the same run.
//!
//! Per design: N AORs registered by sipp through the three nodes (a third each), the
//! nodes left to converge (each holds copies of the others') and to finish the
//! registrations' transactions, ten idle seconds, then calls
//! at `--rate`/s entering every node for a phone registered through the next one, with
//! refreshes (re-REGISTERs) at 100/s; then 100 phones each registered through one node and
//! called through the next at once (registration to reachable). CPU from /proc (each
//! node with its worker processes, and redis-server), memory as PSS (a Kamailio node is
//! several processes sharing memory), Redis's own counters (`INFO stats`) for its
//! commands and bytes.

use std::net::UdpSocket;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::bench::{arg, build_release, cpu_ticks, finish_caller, sipp, ticks_per_sec, Proc};
use crate::{have, root};

/// The design before change-driven sharing (each node read the whole store every 0.5 s).
const BASELINE: &str = "456e6f1^";
/// Refreshes per second during the call load.
const REFRESH_RATE: u32 = 100;
/// Phones registered through one node and called through the next.
const REACH_SAMPLES: usize = 100;

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    for cmd in ["sipp", "redis-server", "redis-cli", "git"] {
        if !have(cmd) {
            anyhow::bail!("{cmd} is not installed; run `cargo xtask install-peers` as root");
        }
    }
    let aors = arg(args, "--aors", 200_000);
    let rate = arg(args, "--rate", 200);
    let seconds = arg(args, "--seconds", 20);
    let baseline = args.iter().position(|a| a == "--baseline").and_then(|i| args.get(i + 1)).cloned();
    let baseline =
        if args.iter().any(|a| a == "--no-baseline") { None } else { Some(baseline.unwrap_or(BASELINE.into())) };
    let dir = std::env::temp_dir().join(format!("pinhole-cluster-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut designs = vec![("changes".to_owned(), Design::Pinhole(build_release()?))];
    if let Some(rev) = baseline {
        designs.push((format!("polling ({rev})"), Design::Pinhole(build_at(&rev)?)));
    }
    if have("kamailio") && have("kamcmd") && !args.iter().any(|a| a == "--no-kamailio") {
        designs.push(("kamailio+dmq".to_owned(), Design::Kamailio));
    }
    println!("{aors} AORs over 3 nodes, calls {rate}/s for {seconds} s, refreshes {REFRESH_RATE}/s\n");
    let mut results = Vec::new();
    for (name, bin) in &designs {
        println!("--- {name}");
        let r = one_design(bin, &dir, aors, rate, seconds)?;
        r.print(name);
        results.push((name.clone(), r));
    }
    println!("\n| design | phase | node CPU ms/s (each) | node PSS MB (each) | Redis cmds/s | Redis bytes/s | Redis CPU ms/s |");
    println!("|---|---|---|---|---|---|---|");
    for (name, r) in &results {
        for (phase, m) in [("idle", &r.idle), ("load", &r.load)] {
            println!(
                "| {name} | {phase} | {} | {} | {:.0} | {:.0} | {:.1} |",
                m.node_cpu.iter().map(|c| format!("{c:.1}")).collect::<Vec<_>>().join(" / "),
                m.node_mem_mb.iter().map(|c| format!("{c:.0}")).collect::<Vec<_>>().join(" / "),
                m.redis_cmds,
                m.redis_bytes,
                m.redis_cpu
            );
        }
    }
    println!("\n| design | registered | converged after | calls ok / failed | reachable p50 / p99 / never (of {REACH_SAMPLES}) |");
    println!("|---|---|---|---|---|");
    for (name, r) in &results {
        println!(
            "| {name} | {} in {:.1} s | {} | {} / {} | {} / {} / {} |",
            r.registered,
            r.register_secs,
            r.converged.map_or("not within 120 s".to_owned(), |s| format!("{s:.1} s")),
            r.calls_ok,
            r.calls_failed,
            ms(r.reach_p50),
            ms(r.reach_p99),
            r.reach_missed
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A port nothing listens on now (the kernel's pick; each call a new one).
fn port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).map_or(0, |a| a.port())
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1000.0))
}

/// The pinhole binary at git revision `rev`, built in a worktree of its own under target/.
fn build_at(rev: &str) -> anyhow::Result<PathBuf> {
    let tree = root().join("target/bench-baseline");
    let target = root().join("target/bench-baseline-target");
    if !tree.exists() {
        crate::run(Command::new("git").current_dir(root()).args(["worktree", "add", "--detach"]).arg(&tree).arg(rev))?;
    } else {
        crate::run(Command::new("git").current_dir(&tree).args(["checkout", "--quiet", "--detach", rev]))?;
    }
    crate::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&tree)
            .env("CARGO_TARGET_DIR", &target)
            .args(["build", "--release", "--quiet", "--bin", "pinhole"]),
    )?;
    Ok(target.join("release/pinhole"))
}

#[derive(Debug, Default)]
struct Window {
    node_cpu: Vec<f64>,
    node_mem_mb: Vec<f64>,
    redis_cmds: f64,
    redis_bytes: f64,
    redis_cpu: f64,
}

#[derive(Debug, Default)]
struct Outcome {
    registered: u32,
    register_secs: f64,
    converged: Option<f64>,
    idle: Window,
    load: Window,
    calls_ok: u32,
    calls_failed: u32,
    reach_p50: Option<Duration>,
    reach_p99: Option<Duration>,
    reach_missed: usize,
}

impl Outcome {
    fn print(&self, name: &str) {
        println!(
            "{name}: {} registered in {:.1} s, converged {:?} s, calls {} ok {} failed, reach p50 {} p99 {} missed {}",
            self.registered,
            self.register_secs,
            self.converged,
            self.calls_ok,
            self.calls_failed,
            ms(self.reach_p50),
            ms(self.reach_p99),
            self.reach_missed
        );
    }
}

/// What runs the three nodes: a pinhole binary, or Kamailio with DMQ.
enum Design {
    Pinhole(PathBuf),
    Kamailio,
}

struct Node {
    proc: Proc,
    sip: u16,
    /// Where its state is read: pinhole's metrics port, or Kamailio's binrpc socket.
    probe: Probe,
}

enum Probe {
    Metrics(u16),
    Ctl(String),
}

impl Node {
    /// Registrations it can route to now: its own and the copies of the others'.
    fn holds(&self) -> Option<f64> {
        match &self.probe {
            Probe::Metrics(m) => {
                Some(metric(*m, "pinhole_cluster_local_bindings")? + metric(*m, "pinhole_cluster_remote_bindings")?)
            }
            Probe::Ctl(ctl) => kamcmd(ctl, &["stats.get_statistics", "registered_users"])
                .lines()
                .find_map(|l| l.split_once('=').and_then(|(_, v)| v.trim().parse().ok())),
        }
    }

    /// Transactions it still holds.
    fn transactions(&self) -> Option<f64> {
        match &self.probe {
            Probe::Metrics(m) => metric(*m, "pinhole_sip_transactions"),
            Probe::Ctl(ctl) => kamcmd(ctl, &["tm.stats"])
                .lines()
                .find_map(|l| l.trim().strip_prefix("current:").and_then(|v| v.trim().parse().ok())),
        }
    }
}

fn kamcmd(ctl: &str, args: &[&str]) -> String {
    let out = Command::new("kamcmd").arg("-s").arg(ctl).args(args).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

fn start_node(design: &Design, dir: &Path, i: usize, redis_port: u16, first_sip: Option<u16>) -> anyhow::Result<Node> {
    let sip = port();
    match design {
        Design::Pinhole(bin) => {
            let metrics = port();
            let cfg = dir.join(format!("node-{i}.toml"));
            std::fs::write(
                &cfg,
                format!(
                    "[sip]\nlisten = [\"udp:127.0.0.1:{sip}\"]\ndomain = \"bench.test\"\n[auth]\ntrusted = [\"127.0.0.0/8\"]\n[registrar]\nstore = \"\"\n[nat]\nkeepalive = \"off\"\n[media]\nmode = \"off\"\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n[cluster]\nredis = \"redis://127.0.0.1:{redis_port}\"\nnode = \"node-{i}\"\n"
                ),
            )?;
            let child = Command::new(bin)
                .args(["server", "--config"])
                .arg(&cfg)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("node-{i}.log")))?)
                .process_group(0)
                .spawn()?;
            let node = Node { proc: Proc(child), sip, probe: Probe::Metrics(metrics) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while metric(metrics, "pinhole_cluster_redis_up") != Some(1.0) {
                anyhow::ensure!(Instant::now() < deadline, "node {i} never reached Redis; see {}", dir.display());
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(node)
        }
        Design::Kamailio => {
            let ctl = format!("unix:{}", dir.join(format!("kamailio-{i}.ctl")).display());
            let notify = first_sip.unwrap_or(sip);
            let text = std::fs::read_to_string(root().join("config/kamailio/dmq.cfg"))?
                .replace("__LISTEN__", &format!("udp:127.0.0.1:{sip}"))
                .replace("__DMQ_SELF__", &format!("sip:127.0.0.1:{sip}"))
                .replace("__DMQ_NOTIFY__", &format!("sip:127.0.0.1:{notify}"))
                .replace("__CTL__", &ctl);
            let cfg = dir.join(format!("kamailio-{i}.cfg"));
            std::fs::write(&cfg, text)?;
            let child = Command::new("kamailio")
                .arg("-f")
                .arg(&cfg)
                .args(["-DD", "-E", "-m", "2048", "-M", "64", "-w"])
                .arg(dir)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("kamailio-{i}.log")))?)
                .process_group(0)
                .spawn()?;
            let node = Node { proc: Proc(child), sip, probe: Probe::Ctl(ctl) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while node.holds().is_none() {
                anyhow::ensure!(Instant::now() < deadline, "Kamailio {i} did not start; see {}", dir.display());
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(node)
        }
    }
}

fn metric(port: u16, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))?.rsplit(' ').next()?.parse().ok()
}

fn redis_info(port: u16, name: &str) -> f64 {
    let out = Command::new("redis-cli").args(["-p", &port.to_string(), "INFO", "stats"]).output();
    out.ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}:")).and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0.0)
}

/// Proportional set size of `pid` and its direct children (shared memory counted once
/// over them), in MB.
fn pss_mb(pid: u32) -> f64 {
    let pss = |p: u32| -> f64 {
        let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")) else { return 0.0 };
        s.lines()
            .find(|l| l.starts_with("Pss:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let children: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|st| {
                st.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok()) == Some(pid)
            })
        })
        .collect();
    (pss(pid) + children.into_iter().map(pss).sum::<f64>()) / 1024.0
}

/// Measures what `during` costs the nodes and Redis (when there is one, on `redis.1`), per
/// second of its duration.
fn measure(nodes: &[Node], redis: Option<(&Proc, u16)>, during: impl FnOnce()) -> Window {
    let pids: Vec<u32> = nodes.iter().map(|n| n.proc.0.id()).collect();
    let t0: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let stats = |name: &str| redis.map_or(0.0, |(_, port)| redis_info(port, name));
    let bytes = || stats("total_net_input_bytes") + stats("total_net_output_bytes");
    let r0 = redis.map_or(0, |(p, _)| cpu_ticks(p.0.id()));
    let (c0, b0) = (stats("total_commands_processed"), bytes());
    let start = Instant::now();
    during();
    let secs = start.elapsed().as_secs_f64();
    let ms_per_s = |ticks: u64| ticks as f64 / ticks_per_sec() * 1000.0 / secs;
    let (c1, b1) = (stats("total_commands_processed"), bytes());
    Window {
        node_cpu: pids.iter().zip(&t0).map(|(p, t)| ms_per_s(cpu_ticks(*p).saturating_sub(*t))).collect(),
        node_mem_mb: pids.iter().map(|p| pss_mb(*p)).collect(),
        redis_cmds: (c1 - c0) / secs,
        redis_bytes: (b1 - b0) / secs,
        redis_cpu: redis.map_or(0.0, |(p, _)| ms_per_s(cpu_ticks(p.0.id()).saturating_sub(r0))),
    }
}

fn one_design(design: &Design, dir: &Path, aors: u32, rate: u32, seconds: u32) -> anyhow::Result<Outcome> {
    let redis_port = port();
    let redis = match design {
        Design::Kamailio => None,
        Design::Pinhole(_) => Some(Proc(
            Command::new("redis-server")
                .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()?,
        )),
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..3 {
        let first = nodes.first().map(|n| n.sip);
        nodes.push(start_node(design, dir, i, redis_port, first)?);
    }
    if matches!(design, Design::Kamailio) {
        // DMQ: every node announced to the first and learnt of the others.
        std::thread::sleep(Duration::from_secs(3));
    }
    let redis_at = redis.as_ref().map(|r| (r, redis_port));
    let mut out = Outcome::default();

    // N AORs, a third through each node.
    let per = aors / 3;
    let started = Instant::now();
    let mut regs = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let csv = dir.join(format!("users-{i}.csv"));
        let users: String = (0..per).map(|k| format!("u{i}x{k}\n")).collect();
        std::fs::write(&csv, format!("SEQUENTIAL\n{users}"))?;
        let (csv, m, target) = (csv.display().to_string(), per.to_string(), format!("127.0.0.1:{}", n.sip));
        let port = port().to_string();
        let log = dir.join(format!("register-{i}.log"));
        let args = ["-sf", "register_many.xml", "-inf", &csv, "-r", "1500", "-m", &m, "-p", &port, "-i", "127.0.0.1"];
        let args: Vec<&str> = args.into_iter().chain(["-timeout", "600s", &target]).collect();
        regs.push((sipp(&args, &log)?, log));
    }
    for (mut child, log) in regs {
        let (ok, _) = finish_caller(&mut child, &log, per, 1500)?;
        out.registered += ok;
    }
    out.register_secs = started.elapsed().as_secs_f64();
    // Converged: each node can route to every registration (its own and copies).
    let want = f64::from(out.registered) * 0.999;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if nodes.iter().all(|n| n.holds().is_some_and(|v| v >= want)) {
            out.converged = Some(started.elapsed().as_secs_f64() - out.register_secs);
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Idle means after the registrations' transactions are gone too (Timer J, 32 s).
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !nodes.iter().all(|n| n.transactions().is_some_and(|t| t < 10.0)) {
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(2));
    out.idle = measure(&nodes, redis_at, || std::thread::sleep(Duration::from_secs(10)));

    // Calls entering every node for a phone registered through the next, and refreshes.
    let hold = ((seconds + 20) * 1000).to_string();
    let mut callees = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let port = port().to_string();
        let (user, target) = (format!("callee{i}"), format!("127.0.0.1:{}", n.sip));
        let args = [
            "-sf",
            "register_and_answer.xml",
            "-oocsf",
            "uas.xml",
            "-s",
            &user,
            "-m",
            "1",
            "-d",
            &hold,
            "-p",
            &port,
            "-i",
            "127.0.0.1",
            "-max_socket",
            "60000",
            &target,
        ];
        callees.push(Proc(sipp(&args, &dir.join(format!("callee-{i}.log")))?));
    }
    std::thread::sleep(Duration::from_secs(2));
    let per_node = (rate / 3).max(1);
    let mut callers = Vec::new();
    let mut refresh = None;
    let load = measure(&nodes, redis_at, || {
        for i in 0..3 {
            let (user, target) = (format!("callee{i}"), format!("127.0.0.1:{}", nodes[(i + 1) % 3].sip));
            let (r, m, port) = (per_node.to_string(), (per_node * seconds).to_string(), port().to_string());
            let log = dir.join(format!("caller-{i}.log"));
            let args = ["-sf", "uac_bench.xml", "-s", &user, "-r", &r, "-m", &m, "-p", &port, "-i", "127.0.0.1"];
            let args: Vec<&str> =
                args.into_iter().chain(["-max_socket", "60000", "-timeout", "90s", &target]).collect();
            if let Ok(c) = sipp(&args, &log) {
                callers.push((c, log));
            }
        }
        let csv = dir.join("users-0.csv").display().to_string();
        let (r, m, port) = (REFRESH_RATE.to_string(), (REFRESH_RATE * seconds).to_string(), port().to_string());
        let target = format!("127.0.0.1:{}", nodes[0].sip);
        let args =
            ["-sf", "register_many.xml", "-inf", &csv, "-r", &r, "-m", &m, "-p", &port, "-i", "127.0.0.1", &target];
        refresh = sipp(&args, &dir.join("refresh.log")).ok().map(Proc);
        std::thread::sleep(Duration::from_secs(u64::from(seconds)));
    });
    out.load = load;
    for (mut c, log) in callers {
        let (ok, failed) = finish_caller(&mut c, &log, per_node * seconds, per_node)?;
        out.calls_ok += ok;
        out.calls_failed += failed;
    }
    drop(refresh);
    drop(callees);

    // Registration to reachable through another node.
    let (mut waits, missed) = reach(&nodes)?;
    waits.sort();
    out.reach_missed = missed;
    let pick = |q: f64| waits.get(((waits.len() as f64 * q) as usize).min(waits.len().saturating_sub(1))).copied();
    out.reach_p50 = pick(0.5);
    out.reach_p99 = pick(0.99);
    drop(nodes);
    drop(redis);
    Ok(out)
}

/// Phones registered through node i and at once called through node i+1: how long from
/// the 200 OK until the phone hears the INVITE (a caller turned away with 4xx tries again
/// 10 ms later, as a user would; never: not within 2 s).
fn reach(nodes: &[Node]) -> anyhow::Result<(Vec<Duration>, usize)> {
    let caller = UdpSocket::bind("127.0.0.1:0")?;
    caller.set_nonblocking(true)?;
    let c = caller.local_addr()?;
    let mut waits = Vec::new();
    let mut missed = 0;
    let mut buf = [0u8; 4096];
    for k in 0..REACH_SAMPLES {
        let (a, b) = (&nodes[k % 3], &nodes[(k + 1) % 3]);
        let phone = UdpSocket::bind("127.0.0.1:0")?;
        phone.set_read_timeout(Some(Duration::from_millis(5)))?;
        let at = phone.local_addr()?;
        let user = format!("reach{k}");
        let register = format!(
            "REGISTER sip:bench.test SIP/2.0\r\nVia: SIP/2.0/UDP {at};branch=z9hG4bKr{k};rport\r\nMax-Forwards: 70\r\nTo: <sip:{user}@bench.test>\r\nFrom: <sip:{user}@bench.test>;tag=r{k}\r\nCall-ID: reach-{k}\r\nCSeq: 1 REGISTER\r\nContact: <sip:{user}@{at}>\r\nExpires: 600\r\nContent-Length: 0\r\n\r\n"
        );
        phone.send_to(register.as_bytes(), ("127.0.0.1", a.sip))?;
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut registered = false;
        while !registered && Instant::now() < deadline {
            registered = phone.recv(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"SIP/2.0 200"));
        }
        anyhow::ensure!(registered, "{user} was not registered");
        let ok_at = Instant::now();
        let mut heard = None;
        let mut attempt = 0;
        while heard.is_none() && ok_at.elapsed() < Duration::from_secs(2) {
            attempt += 1;
            let invite = format!(
                "INVITE sip:{user}@bench.test SIP/2.0\r\nVia: SIP/2.0/UDP {c};branch=z9hG4bKi{k}a{attempt};rport\r\nMax-Forwards: 70\r\nTo: <sip:{user}@bench.test>\r\nFrom: <sip:caller@bench.test>;tag=i{k}a{attempt}\r\nCall-ID: reach-call-{k}-{attempt}\r\nCSeq: 1 INVITE\r\nContact: <sip:caller@{c}>\r\nContent-Length: 0\r\n\r\n"
            );
            caller.send_to(invite.as_bytes(), ("127.0.0.1", b.sip))?;
            let sent = Instant::now();
            let mut turned_away = false;
            while heard.is_none() && !turned_away && sent.elapsed() < Duration::from_secs(1) {
                if phone.recv(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"INVITE ")) {
                    heard = Some(ok_at.elapsed());
                }
                while let Ok(n) = caller.recv(&mut buf) {
                    turned_away |= buf[..n].starts_with(b"SIP/2.0 4");
                }
            }
            if turned_away {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        match heard {
            Some(d) => waits.push(d),
            None => missed += 1,
        }
    }
    Ok((waits, missed))
}
