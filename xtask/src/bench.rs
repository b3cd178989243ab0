//! `cargo xtask bench sip`: sipp UAC → proxy → sipp UAS at fixed rates, through pinhole and
//! through Kamailio 5.6 in the same run. CPU time is read from /proc for the proxy's
//! processes only, so the figure is CPU per call, not wall time.

use std::net::{TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{have, root};

/// A peer the bench started in a process group of its own; dropping it stops the whole
/// group (Kamailio's forked workers included).
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug, Clone, Copy)]
struct Outcome {
    rate: u32,
    calls: u32,
    ok: u32,
    failed: u32,
    cpu_us_per_call: f64,
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("sip") => sip(&args[1..]),
        Some("relay") => crate::relaybench::run(&args[1..]),
        Some("ng") => ng(&args[1..]),
        Some("punch") => punch(),
        Some("faketcp") => crate::faketcpbench::run(&args[1..]),
        Some("b2bua") => crate::b2buabench::run(&args[1..]),
        Some("node") => crate::nodebench::run(&args[1..]),
        Some("cluster") => crate::clusterbench::run(&args[1..]),
        Some("store") => store(&args[1..]),
        Some("dtls") => crate::dtlsbench::run(&args[1..]),
        other => {
            anyhow::bail!(
                "unknown benchmark {other:?}; available: sip, node, relay [--srtp], ng, punch, faketcp, b2bua, cluster, store, dtls"
            )
        }
    }
}

/// `cargo xtask bench punch` (root): the NAT-pair matrix with pinhole's agents and with
/// baresip's own ICE (coturn as STUN), side by side; the lab code lives with the punch
/// tests (tests/netns_punch.rs), run here as its ignored benchmark.
fn punch() -> anyhow::Result<()> {
    crate::run(
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(crate::root())
            .args(["test", "--release", "--test", "netns_punch", "--", "--ignored", "--nocapture", "bench_punch"]),
    )
}

pub(crate) fn arg(args: &[String], name: &str, default: u32) -> u32 {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

pub(crate) fn free_port() -> u16 {
    for p in 41000..42000u16 {
        if UdpSocket::bind(("127.0.0.1", p)).is_ok() && TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
    40999
}

/// utime + stime of `pid` and its direct children, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(p) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // Fields after the ")" of comm: state ppid ... utime(14) stime(15), 1-based overall.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid: u32 = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        if p == pid || ppid == pid {
            let ut: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
            let st: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
            total += ut + st;
        }
    }
    total
}

pub(crate) fn ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// sipp in config/sipp with `args`, its screen to `log`, in a process group of its own.
pub(crate) fn sipp(args: &[&str], log: &Path) -> anyhow::Result<Child> {
    let f = std::fs::File::create(log)?;
    Ok(Command::new("sipp")
        .current_dir(root().join("config/sipp"))
        .args(args)
        .arg("-nostdin")
        .stdout(f.try_clone()?)
        .stderr(f)
        .process_group(0)
        .spawn()?)
}

/// Waits for a sipp caller placing `calls` at `rate` (killed if it overruns by 70 s), lets the
/// last transactions settle, and reads its (successful, failed) counts.
pub(crate) fn finish_caller(uac: &mut Child, log: &Path, calls: u32, rate: u32) -> anyhow::Result<(u32, u32)> {
    let deadline = Instant::now() + Duration::from_secs(u64::from(calls / rate.max(1)) + 70);
    while uac.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = uac.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = uac.wait();
    std::thread::sleep(Duration::from_millis(300));
    let text = std::fs::read_to_string(log).unwrap_or_default();
    match (sipp_count(&text, "Successful call"), sipp_count(&text, "Failed call")) {
        (Some(ok), Some(failed)) => Ok((ok, failed)),
        _ => anyhow::bail!("sipp printed no call counts; see {}", log.display()),
    }
}

/// A cumulative count from sipp's statistics screen (`None` when it printed none).
pub(crate) fn sipp_count(text: &str, label: &str) -> Option<u32> {
    text.lines().find(|l| l.trim_start().starts_with(label)).and_then(|l| l.split('|').nth(2))?.trim().parse().ok()
}

/// One run at `rate` calls/s against a proxy at `target` whose CPU is read from `pid`.
fn load(target: &str, pid: u32, rate: u32, calls: u32, user: &str, dir: &Path) -> anyhow::Result<Outcome> {
    load_with(target, &[pid], rate, calls, user, dir, ("uas.xml", "uac_bench.xml")).map(|(o, _)| o)
}

/// Runs sipp callee `scenarios.0` and caller `scenarios.1` through `target`; returns the
/// outcome (CPU summed over `pids`) and the CPU per call of each pid.
fn load_with(
    target: &str,
    pids: &[u32],
    rate: u32,
    calls: u32,
    user: &str,
    dir: &Path,
    scenarios: (&str, &str),
) -> anyhow::Result<(Outcome, Vec<f64>)> {
    let uas_port = free_port().to_string();
    let hold = ((calls / rate.max(1)) * 1000 + 8000).to_string();
    let uas = sipp(
        &[
            "-sf",
            "register_and_answer.xml",
            "-oocsf",
            scenarios.0,
            "-s",
            user,
            "-m",
            "1",
            "-d",
            &hold,
            "-p",
            &uas_port,
            "-i",
            "127.0.0.1",
            "-max_socket",
            "60000",
            target,
        ],
        &dir.join(format!("uas-{user}.log")),
    )?;
    let _uas = Proc(uas);
    std::thread::sleep(Duration::from_millis(800));
    let uac_log = dir.join(format!("uac-{user}.log"));
    let t0: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let rate_s = rate.to_string();
    let calls_s = calls.to_string();
    let uac_port = free_port().to_string();
    let mut uac = sipp(
        &[
            "-sf",
            scenarios.1,
            "-s",
            user,
            "-r",
            &rate_s,
            "-m",
            &calls_s,
            "-p",
            &uac_port,
            "-i",
            "127.0.0.1",
            "-max_socket",
            "60000",
            "-timeout",
            "60s",
            "-trace_err",
            "-error_file",
            &dir.join(format!("uac-{user}.err")).display().to_string(),
            target,
        ],
        &uac_log,
    )?;
    let (ok, failed) = finish_caller(&mut uac, &uac_log, calls, rate)?;
    let t1: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let per_call: Vec<f64> = t0
        .iter()
        .zip(&t1)
        .map(|(a, b)| b.saturating_sub(*a) as f64 / ticks_per_sec() * 1e6 / f64::from(ok.max(1)))
        .collect();
    Ok((Outcome { rate, calls, ok, failed, cpu_us_per_call: per_call.iter().sum() }, per_call))
}

/// Builds the release binary; its path. `PINHOLE_BENCH_BIN` names another build to run
/// instead (another commit's, for a before/after comparison in one sitting).
pub(crate) fn build_release() -> anyhow::Result<std::path::PathBuf> {
    if let Some(bin) = std::env::var_os("PINHOLE_BENCH_BIN") {
        return Ok(bin.into());
    }
    crate::run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).current_dir(root()).args([
        "build",
        "--release",
        "--quiet",
        "--bin",
        "pinhole",
    ]))?;
    Ok(root().join("target/release/pinhole"))
}

/// Builds the release binary and runs it with `config` (written to `dir/name.toml`).
pub(crate) fn spawn_pinhole(dir: &Path, name: &str, config: &str) -> anyhow::Result<Proc> {
    let bin = build_release()?;
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, config)?;
    let child = Command::new(bin)
        .args(["server", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log")))?)
        .process_group(0)
        .spawn()?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(Proc(child))
}

fn start_pinhole(dir: &Path, port: u16) -> anyhow::Result<Proc> {
    spawn_pinhole(
        dir,
        "pinhole-bench",
        &format!(
            "[sip]\nlisten = [\"udp:127.0.0.1:{port}\"]\ndomain = \"bench.test\"\n[auth]\ntrusted = [\"127.0.0.0/8\"]\n[registrar]\nstore = \"\"\n[nat]\nkeepalive = \"off\"\n[media]\nmode = \"off\"\n[metrics]\n"
        ),
    )
}

/// Kamailio 5.6 with `config/kamailio/<file>`, its placeholders replaced.
fn spawn_kamailio(dir: &Path, file: &str, listen_port: u16, ng_port: Option<u16>) -> anyhow::Result<Proc> {
    let mut text = std::fs::read_to_string(root().join("config/kamailio").join(file))?
        .replace("__LISTEN__", &format!("udp:127.0.0.1:{listen_port}"));
    if let Some(ng) = ng_port {
        text = text.replace("__NG__", &format!("udp:127.0.0.1:{ng}"));
    }
    let cfg = dir.join(format!("kamailio-{listen_port}.cfg"));
    std::fs::write(&cfg, text)?;
    let child = Command::new("kamailio")
        .args(["-f"])
        .arg(&cfg)
        .args(["-DD", "-E", "-m", "512", "-M", "32", "-w"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("kamailio-{listen_port}.log")))?)
        .process_group(0)
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1500));
    Ok(Proc(child))
}

fn start_kamailio(dir: &Path, port: u16) -> anyhow::Result<Proc> {
    spawn_kamailio(dir, "proxy.cfg", port, None)
}

fn sip(args: &[String]) -> anyhow::Result<()> {
    for cmd in ["sipp", "kamailio"] {
        if !have(cmd) {
            anyhow::bail!("{cmd} is not installed; run `cargo xtask install-peers` as root");
        }
    }
    let seconds = arg(args, "--seconds", 6);
    let rates: Vec<u32> = match arg(args, "--rate", 0) {
        0 => vec![250, 500, 1000, 1500, 2000],
        r => vec![r],
    };
    let dir = std::env::temp_dir().join(format!("pinhole-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut rows = Vec::new();
    for (name, start) in
        [("pinhole", start_pinhole as fn(&Path, u16) -> anyhow::Result<Proc>), ("kamailio", start_kamailio)]
    {
        for &rate in &rates {
            let port = free_port();
            let proxy = start(&dir, port)?;
            let o = load(&format!("127.0.0.1:{port}"), proxy.0.id(), rate, rate * seconds, &format!("b{rate}"), &dir)?;
            println!(
                "{name:9} rate {:5}/s calls {:6} ok {:6} failed {:4} cpu {:7.1} us/call",
                o.rate, o.calls, o.ok, o.failed, o.cpu_us_per_call
            );
            rows.push((name, o));
            drop(proxy);
        }
    }
    println!("\nsummary (CPU µs per call INVITE…BYE, same machine, same run):");
    for &rate in &rates {
        let get = |n: &str| rows.iter().find(|(name, o)| *name == n && o.rate == rate).map(|(_, o)| *o);
        if let (Some(p), Some(k)) = (get("pinhole"), get("kamailio")) {
            println!(
                "  {rate:5}/s  pinhole {:7.1} µs ({} failed)  kamailio {:7.1} µs ({} failed)  ratio kamailio/pinhole {:.2}x",
                p.cpu_us_per_call,
                p.failed,
                k.cpu_us_per_call,
                k.failed,
                k.cpu_us_per_call / p.cpu_us_per_call
            );
        }
    }
    for n in ["pinhole", "kamailio"] {
        let best =
            rows.iter().filter(|(name, o)| *name == n && o.failed == 0 && o.ok == o.calls).map(|(_, o)| o.rate).max();
        println!("  highest clean rate {n}: {}", best.map_or("none".into(), |r| format!("{r}/s")));
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `bench ng` (b): setup cost of anchored calls, Kamailio + pinhole vs Kamailio + rtpengine.
fn ng(args: &[String]) -> anyhow::Result<()> {
    for cmd in ["sipp", "kamailio", "rtpengine"] {
        if !have(cmd) {
            anyhow::bail!("{cmd} is not installed; run `cargo xtask install-peers` as root");
        }
    }
    let rate = arg(args, "--rate", 500);
    let seconds = arg(args, "--seconds", 10);
    let dir = std::env::temp_dir().join(format!("pinhole-ng-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut rows = Vec::new();
    for relay in ["pinhole", "rtpengine"] {
        let ng_port = free_port();
        let relay_proc = match relay {
            "pinhole" => crate::relaybench::start_pinhole(&dir, ng_port)?,
            _ => crate::relaybench::start_rtpengine(&dir, ng_port)?,
        };
        let kport = free_port();
        let kam = spawn_kamailio(&dir, "kamailio.cfg", kport, Some(ng_port))?;
        let (o, per) = load_with(
            &format!("127.0.0.1:{kport}"),
            &[kam.0.id(), relay_proc.0.id()],
            rate,
            rate * seconds,
            &format!("n{relay}"),
            &dir,
            ("uas_relay.xml", "uac_bench_anchored.xml"),
        )?;
        println!(
            "kamailio+{relay:9} rate {rate}/s calls {:6} ok {:6} failed {:4}  kamailio {:7.1} us/call  {relay} {:7.1} us/call",
            o.calls, o.ok, o.failed, per[0], per[1]
        );
        rows.push((relay, o, per));
        drop(kam);
        drop(relay_proc);
    }
    if let [(_, po, pp), (_, ro, rp)] = &rows[..] {
        println!(
            "\nsummary at {rate}/s: relay share per anchored call pinhole {:.1} us vs rtpengine {:.1} us (ratio {:.2}x); \
             whole call kamailio+pinhole {:.1} us vs kamailio+rtpengine {:.1} us; failed {} vs {}",
            pp[1],
            rp[1],
            rp[1] / pp[1],
            po.cpu_us_per_call,
            ro.cpu_us_per_call,
            po.failed,
            ro.failed
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `bench store`: calls through a proxy whose callee's registration lives in the embedded
/// store (a snapshot file) and in Redis (`[cluster]`), same load, same run. The Redis run
/// counts redis-server's CPU too.
fn store(args: &[String]) -> anyhow::Result<()> {
    for cmd in ["sipp", "redis-server"] {
        if !have(cmd) {
            anyhow::bail!("{cmd} is not installed; run `cargo xtask install-peers` as root");
        }
    }
    let rate = arg(args, "--rate", 500);
    let seconds = arg(args, "--seconds", 10);
    let dir = std::env::temp_dir().join(format!("pinhole-cluster-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let redis_port = free_port();
    let redis = Proc(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(500));
    let store = dir.join("store.json");
    let variants = [
        ("embedded", format!("[registrar]\nstore = \"{}\"\n", store.display()), None),
        (
            "redis",
            format!(
                "[registrar]\nstore = \"\"\n[cluster]\nredis = \"redis://127.0.0.1:{redis_port}\"\nnode = \"bench\"\n"
            ),
            Some(redis.0.id()),
        ),
    ];
    let mut rows = Vec::new();
    for (name, registrar, extra_pid) in variants {
        let port = free_port();
        let config = format!(
            "[sip]\nlisten = [\"udp:127.0.0.1:{port}\"]\ndomain = \"bench.test\"\n[auth]\ntrusted = [\"127.0.0.0/8\"]\n{registrar}[nat]\nkeepalive = \"off\"\n[media]\nmode = \"off\"\n[metrics]\n"
        );
        let proxy = spawn_pinhole(&dir, &format!("pinhole-{name}"), &config)?;
        let pids: Vec<u32> = std::iter::once(proxy.0.id()).chain(extra_pid).collect();
        let (o, per) = load_with(
            &format!("127.0.0.1:{port}"),
            &pids,
            rate,
            rate * seconds,
            &format!("c{name}"),
            &dir,
            ("uas.xml", "uac_bench.xml"),
        )?;
        println!(
            "{name:9} rate {rate}/s calls {:6} ok {:6} failed {:4} cpu {:7.1} us/call (pinhole {:.1}{})",
            o.calls,
            o.ok,
            o.failed,
            o.cpu_us_per_call,
            per[0],
            per.get(1).map_or(String::new(), |r| format!(", redis-server {r:.1}"))
        );
        rows.push(o);
        drop(proxy);
    }
    if let [e, r] = &rows[..] {
        println!(
            "\nsummary at {rate}/s: Redis-backed registrations {:.1} us/call vs embedded store {:.1} us/call: {:+.0}% CPU per call \
             (target ≤ +20%); failed {} vs {}",
            r.cpu_us_per_call,
            e.cpu_us_per_call,
            (r.cpu_us_per_call / e.cpu_us_per_call - 1.0) * 100.0,
            r.failed,
            e.failed
        );
    }
    drop(redis);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
