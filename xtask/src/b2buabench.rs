//! `cargo xtask bench b2bua`: CPU per trunk call (INVITE challenged with 407 by the carrier,
//! answered, media anchored, BYE), pinhole's B2BUA against Kamailio 5.6 with topos
//! (topology hiding), uac (trunk authentication) and rtpengine, in the same run. sipp is the
//! phone (`uac_bench_anchored.xml` on 127.0.0.1: the answer must be anchored) and the
//! carrier (`bench_carrier.xml` on 127.0.0.3: a trunk is known by its address).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use std::os::unix::process::CommandExt;

use crate::bench::{arg, cpu_ticks, finish_caller, free_port, sipp, spawn_pinhole, ticks_per_sec, Proc};
use crate::root;

fn start_pinhole(dir: &Path, port: u16, carrier: u16, metrics: u16) -> anyhow::Result<Vec<Proc>> {
    let config = format!(
        "[sip]\nlisten = [\"udp:127.0.0.1:{port}\"]\ndomain = \"bench.test\"\n[auth]\ntrusted = [\"127.0.0.0/8\"]\n\
         [registrar]\nstore = \"\"\n[nat]\nkeepalive = \"off\"\n[ng]\nlisten = \"\"\n[stun]\nlisten = []\n\
         [media]\nmode = \"relay\"\ninterfaces = [{{ name = \"lo\", bind = \"127.0.0.1\" }}]\nport_min = 30000\nport_max = 39999\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
         [[trunk]]\nname = \"carrier\"\naddress = \"udp:127.0.0.3:{carrier}\"\nusername = \"acct1\"\npassword = \"trunk-secret\"\n\
         max_calls = 100000\noptions_interval = 0\n[[route]]\nmatch = \"^bench\"\ntrunks = [\"carrier\"]\n"
    );
    Ok(vec![spawn_pinhole(dir, "pinhole-b2bua", &config)?])
}

/// A port free on 127.0.0.1 that none of `taken` is (they may not be bound yet).
fn pick(taken: &mut Vec<u16>) -> u16 {
    let p = (41000..42000u16)
        .find(|p| !taken.contains(p) && std::net::UdpSocket::bind(("127.0.0.1", *p)).is_ok())
        .unwrap_or_else(free_port);
    taken.push(p);
    p
}

fn start_kamailio(dir: &Path, port: u16, carrier: u16, ng: u16) -> anyhow::Result<Vec<Proc>> {
    let rtpengine = crate::relaybench::start_rtpengine(dir, ng)?;
    // topos keeps its records in db_text: the schema Debian ships, in a directory of its own.
    let db = dir.join("topos-db");
    std::fs::create_dir_all(&db)?;
    for table in ["version", "topos_d", "topos_t"] {
        std::fs::copy(Path::new("/usr/share/kamailio/dbtext/kamailio").join(table), db.join(table))?;
    }
    let text = std::fs::read_to_string(root().join("config/kamailio/trunk.cfg"))?
        .replace("__LISTEN__", &format!("udp:127.0.0.1:{port}"))
        .replace("__NG__", &format!("udp:127.0.0.1:{ng}"))
        .replace("__CARRIER__", &format!("127.0.0.3:{carrier}"))
        .replace("__DBDIR__", &db.display().to_string());
    let cfg = dir.join("kamailio-trunk.cfg");
    std::fs::write(&cfg, text)?;
    let kamailio = Command::new("kamailio")
        .arg("-f")
        .arg(&cfg)
        .args(["-DD", "-E", "-m", "512", "-M", "32", "-w"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("kamailio-trunk.log"))?)
        .process_group(0)
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1500));
    Ok(vec![Proc(kamailio), rtpengine])
}

struct Row {
    name: &'static str,
    ok: u32,
    failed: u32,
    us_per_call: f64,
}

fn one(name: &'static str, dir: &Path, rate: u32, calls: u32) -> anyhow::Result<Row> {
    let mut taken = Vec::new();
    let (carrier_port, port, ng, uac_port, metrics) =
        (pick(&mut taken), pick(&mut taken), pick(&mut taken), pick(&mut taken), pick(&mut taken));
    let carrier_port_s = carrier_port.to_string();
    let calls_s = calls.to_string();
    let carrier_mp = "20000".to_string();
    let carrier = sipp(
        &[
            "-sf",
            "bench_carrier.xml",
            "-i",
            "127.0.0.3",
            "-p",
            &carrier_port_s,
            "-m",
            &calls_s,
            "-max_socket",
            "60000",
            "-mp",
            &carrier_mp,
        ],
        &dir.join(format!("carrier-{name}.log")),
    )?;
    let _carrier = Proc(carrier);
    let system = match name {
        "pinhole" => start_pinhole(dir, port, carrier_port, metrics)?,
        _ => start_kamailio(dir, port, carrier_port, ng)?,
    };
    let pids: Vec<u32> = system.iter().map(|p| p.0.id()).collect();
    let t0: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
    let uac_log = dir.join(format!("phone-{name}.log"));
    let (rate_s, uac_port, target) = (rate.to_string(), uac_port.to_string(), format!("127.0.0.1:{port}"));
    let err = dir.join(format!("phone-{name}.err")).display().to_string();
    let mut uac = sipp(
        &[
            "-sf",
            "uac_bench_anchored.xml",
            "-s",
            "bench1",
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
            "-mp",
            "22000",
            "-timeout",
            "90s",
            "-trace_err",
            "-error_file",
            &err,
            &target,
        ],
        &uac_log,
    )?;
    let (ok, failed) = finish_caller(&mut uac, &uac_log, calls, rate)?;
    let t1: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
    let us_per_call = t1.saturating_sub(t0) as f64 / ticks_per_sec() * 1e6 / f64::from(ok.max(1));
    drop(system);
    Ok(Row { name, ok, failed, us_per_call })
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    for cmd in ["sipp", "kamailio", "rtpengine"] {
        if !crate::have(cmd) {
            anyhow::bail!("{cmd} is not installed; run `cargo xtask install-peers` as root");
        }
    }
    let rate = arg(args, "--rate", 200);
    let seconds = arg(args, "--seconds", 10);
    let calls = rate * seconds;
    let dir = std::env::temp_dir().join(format!("pinhole-b2bua-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut rows = Vec::new();
    for name in ["pinhole", "kamailio"] {
        let r = one(name, &dir, rate, calls)?;
        println!(
            "{:9} rate {rate}/s calls {calls:6} ok {:6} failed {:4} cpu {:7.1} us/call",
            r.name, r.ok, r.failed, r.us_per_call
        );
        rows.push(r);
    }
    if let [p, k] = &rows[..] {
        println!(
            "\nsummary at {rate}/s (INVITE with a 407 from the carrier, answer, anchored media, BYE): pinhole B2BUA {:.1} us/call \
             ({} failed), Kamailio topos+uac + rtpengine {:.1} us/call ({} failed); pinhole uses {:.2} of Kamailio's CPU ({:.2}x less)",
            p.us_per_call,
            p.failed,
            k.us_per_call,
            k.failed,
            p.us_per_call / k.us_per_call,
            k.us_per_call / p.us_per_call
        );
    }
    if std::env::var_os("KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
