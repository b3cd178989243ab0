//! `cargo xtask bench relay`: N calls set up over ng, each with 50 packets/s of 172-byte
//! G.711 RTP per leg in both directions, through pinhole and through rtpengine 10.5
//! (userspace, --delete-delay=0) in the same run, driven by the same load generator.
//! Reports relay CPU per relayed packet (from /proc), loss, added latency and RSS per call.
//!
//! With `--srtp` the A leg speaks SDES-SRTP (RTP/SAVP, `AES_CM_128_HMAC_SHA1_80`) and B plain
//! RTP (the offer's `transport-protocol=RTP/AVP`): each relay unprotects A's packets and
//! protects B's, with keys it chose for its answer to A. The generator protects A's packets
//! (150 bytes of payload, so they are 172 on the wire too) before the clock starts on them.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pinhole_media::ng::{split_cookie, Bencode};
use pinhole_media::sdes::{Crypto, Suite};
use pinhole_media::sdp::Sdp;
use pinhole_media::srtp::{Srtp, TAG_LEN};

use crate::bench::{arg, cpu_ticks, free_port, ticks_per_sec, Proc};
use crate::mmsg::{realtime_ns, stamp_arrivals, RecvMany, SendMany, PACKET};

/// The sender's time slices: 200 per 20 ms packet interval.
const SLICES: usize = 200;
const SLICE: Duration = Duration::from_micros(100);
/// How often the receiver reads its sockets.
const RX_PERIOD: Duration = Duration::from_micros(200);

#[derive(Debug, Clone, Copy)]
struct Outcome {
    calls: usize,
    sent: u64,
    received: u64,
    /// The relay process's CPU per packet relayed in the window (0 for a direct run).
    cpu_us_per_packet: f64,
    /// The whole machine's busy time in the window (/proc/stat: user, nice, system, irq,
    /// softirq, steal), and the packets received in it.
    machine_busy_us: f64,
    /// The generator's own process CPU in the window (on loopback, the kernel's delivery
    /// and a TC program's forwarding run in the sender's context).
    generator_us: f64,
    /// The same three from the scheduler's own clock (/proc/PID/task/*/schedstat, in ns,
    /// exact) rather than 250 Hz tick sampling: the generator's threads, the relay's, and
    /// the ksoftirqd threads (softirq work the kernel deferred from whoever raised it).
    task_generator_us: f64,
    task_relay_us: f64,
    task_softirqd_us: f64,
    window_packets: u64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    max_us: u64,
    /// Latency to the kernel's arrival stamp on the generator's socket rather than to the
    /// generator's read: the receiver's own scheduling left out.
    arrival_p50_us: u64,
    arrival_p99_us: u64,
    rss_kb_per_1000: f64,
}

/// `--record`: every call recorded (ng `record call`), pinhole into `[recording] dir`,
/// rtpengine with `--recording-method=pcap`; the directory each writes to.
static RECORD: AtomicBool = AtomicBool::new(false);

fn recording_dir(dir: &std::path::Path, relay: &str) -> std::path::PathBuf {
    dir.join(format!("recordings-{relay}"))
}

/// Bytes of every file under `dir`.
fn disk_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// `--pin`: the generator's threads on CPU 0, the relay's on CPU 1.
static PIN: AtomicBool = AtomicBool::new(false);

/// Pins the calling thread (tid 0) or the given thread to one CPU.
#[allow(unsafe_code)]
fn pin_thread(tid: libc::pid_t, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Pins every thread of a process (threads it starts later inherit it).
fn pin_process(pid: u32, cpu: usize) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return };
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|s| s.parse().ok()) {
            pin_thread(tid, cpu);
        }
    }
}

/// Nanoseconds the threads of `pid` have run, from the scheduler's accounting.
fn task_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The ksoftirqd threads, one per CPU.
fn softirqd_pids() -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return Vec::new() };
    procs
        .flatten()
        .filter_map(|p| p.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with("ksoftirqd/")))
        .collect()
}

fn rss_kb(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn ng(sock: &UdpSocket, target: SocketAddr, n: u64, msg: &Bencode) -> anyhow::Result<Bencode> {
    let mut out = format!("b{n} ").into_bytes();
    msg.encode(&mut out);
    let mut buf = vec![0u8; 65536];
    for _ in 0..5 {
        sock.send_to(&out, target)?;
        if let Ok((len, _)) = sock.recv_from(&mut buf) {
            let (_, payload) = split_cookie(&buf[..len]).map_err(|e| anyhow::anyhow!("{e}"))?;
            return Bencode::decode(payload).map_err(|e| anyhow::anyhow!("{e}"));
        }
    }
    anyhow::bail!("no ng reply from {target}")
}

/// An endpoint's SDP: plain RTP, or SDES-SRTP keyed by `crypto`.
fn sdp(addr: SocketAddr, crypto: Option<&Crypto>) -> String {
    let (proto, line) = match crypto {
        Some(c) => ("RTP/SAVP", format!("a=crypto:{}\r\n", c.value())),
        None => ("RTP/AVP", String::new()),
    };
    format!(
        "v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} {proto} 0\r\na=rtpmap:0 PCMU/8000\r\n{line}",
        ip = addr.ip(),
        port = addr.port()
    )
}

/// Sets up call `call_id` over ng (offer from `sa`, answer from `sb`), A speaking SDES-SRTP
/// under `crypto` when given (B plain RTP); returns the relay ports A and B send to.
pub(crate) fn set_up_call(
    ctl: &UdpSocket,
    ng_addr: SocketAddr,
    n: u64,
    call_id: &str,
    (sa, sb): (SocketAddr, SocketAddr),
    crypto: Option<&Crypto>,
) -> anyhow::Result<(u16, u16)> {
    let mut offer = vec![
        ("command", Bencode::str("offer")),
        ("call-id", Bencode::str(call_id)),
        ("from-tag", Bencode::str("a")),
        ("sdp", Bencode::str(&sdp(sa, crypto))),
    ];
    if crypto.is_some() {
        offer.push(("transport-protocol", Bencode::str("RTP/AVP")));
    }
    if RECORD.load(Ordering::Relaxed) {
        offer.push(("record call", Bencode::str("yes")));
    }
    let offer = ng(ctl, ng_addr, n * 2, &Bencode::dict(offer))?;
    let answer = ng(
        ctl,
        ng_addr,
        n * 2 + 1,
        &Bencode::dict(vec![
            ("command", Bencode::str("answer")),
            ("call-id", Bencode::str(call_id)),
            ("from-tag", Bencode::str("a")),
            ("to-tag", Bencode::str("b")),
            ("sdp", Bencode::str(&sdp(sb, None))),
        ]),
    )?;
    if crypto.is_some() {
        let text = answer.get("sdp").and_then(Bencode::as_str).unwrap_or_default();
        anyhow::ensure!(text.contains("RTP/SAVP") && text.contains("a=crypto:"), "no SDES answer: {text}");
        let to_b = offer.get("sdp").and_then(Bencode::as_str).unwrap_or_default();
        anyhow::ensure!(to_b.contains("RTP/AVP") && !to_b.contains("a=crypto"), "B was not offered plain RTP: {to_b}");
    }
    Ok((relayed_port(&answer)?, relayed_port(&offer)?))
}

fn relayed_port(reply: &Bencode) -> anyhow::Result<u16> {
    let body =
        reply.get("sdp").and_then(Bencode::as_bytes).ok_or_else(|| anyhow::anyhow!("no sdp in reply: {reply}"))?;
    let parsed = Sdp::parse(body)?;
    parsed.media.first().map(|m| m.port).ok_or_else(|| anyhow::anyhow!("no m= line"))
}

/// The whole machine's busy jiffies so far (the first line of /proc/stat, idle and iowait
/// left out).
fn machine_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    [0, 1, 2, 5, 6, 7].iter().filter_map(|i| f.get(*i)).sum()
}

/// Where the generator's legs send: through a relay (its ng address and process), or
/// straight to each other (the baseline a relay's whole-machine cost is measured against).
#[derive(Clone, Copy)]
enum Through {
    Relay(SocketAddr, u32),
    Direct,
}

fn load(through: Through, calls: usize, seconds: u64, srtp: bool) -> anyhow::Result<Outcome> {
    let pid = match through {
        Through::Relay(_, pid) => pid,
        Through::Direct => 0,
    };
    let ctl = UdpSocket::bind("127.0.0.1:0")?;
    ctl.set_read_timeout(Some(Duration::from_millis(500)))?;
    let bind = || -> anyhow::Result<UdpSocket> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
        let _ = s.set_recv_buffer_size(16 << 20);
        let _ = s.set_send_buffer_size(16 << 20);
        // The endpoints sit on another loopback address than the relays, as phones sit on
        // other hosts: a relay's own receive path then never sees the packets it sends.
        s.bind(&"127.0.0.2:0".parse::<SocketAddr>()?.into())?;
        s.set_nonblocking(true)?;
        let s: UdpSocket = s.into();
        stamp_arrivals(&s);
        Ok(s)
    };
    // One socket for every call's A leg and one for every B leg: each call still has its
    // own pair of relay ports, and the generator can send a time slice's packets in one
    // sendmmsg and read them back in few syscalls.
    let (a, b) = (bind()?, bind()?);
    let (sa, sb) = (a.local_addr()?, b.local_addr()?);
    // Call i: A sends to pa[i] (from the answer), B sends to pb[i] (from the offer).
    let mut targets = Vec::with_capacity(calls);
    let mut keys: Vec<Srtp> = Vec::new();
    let mut rss_half = 0;
    let mut seed = std::process::id();
    let mut random = move || {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
        (seed >> 16) as u8
    };
    for i in 0..calls {
        if i == calls / 2 {
            rss_half = rss_kb(pid);
        }
        let call_id = format!("bench-{i}-{}", std::process::id());
        let crypto = srtp.then(|| Crypto::generate(1, Suite::AesCm128HmacSha1_80, &mut random));
        let (pa, pb) = match through {
            Through::Relay(ng_addr, _) => set_up_call(&ctl, ng_addr, i as u64, &call_id, (sa, sb), crypto.as_ref())?,
            // A sends to B's socket and B to A's: the same packets, no relay.
            Through::Direct => (sb.port(), sa.port()),
        };
        if let Some(tx) = crypto.as_ref().and_then(Crypto::contexts) {
            keys.push(tx.0);
        }
        let ip = match through {
            Through::Relay(..) => Ipv4Addr::LOCALHOST,
            Through::Direct => Ipv4Addr::new(127, 0, 0, 2),
        };
        targets.push((SocketAddrV4::new(ip, pa), SocketAddrV4::new(ip, pb)));
    }

    // Memory per call: the slope between half and all calls set up, so fixed costs
    // (allocator arenas, thread stacks, the reply cache's first pages) do not count.
    let rss_full = rss_kb(pid);
    let epoch = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_rx = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<u32>::with_capacity(4_000_000)));
    let arrivals = Arc::new(std::sync::Mutex::new(Vec::<u32>::with_capacity(4_000_000)));
    let pin = PIN.load(Ordering::Relaxed);
    if pin {
        pin_process(pid, 1);
    }

    // Receiver: reads both sockets every RX_PERIOD and sleeps in between, never in a
    // wait on the sockets. A receiver asleep on its socket is woken by whoever delivers
    // to it, and on loopback that is the relay's own send: the wakeup of the "phone" would
    // be charged to the relay, which on a network it never is. Both relays get the same
    // receiver.
    let rx = {
        let socks = [a.try_clone()?, b.try_clone()?];
        let (stop, received, latencies, arrivals) =
            (stop_rx.clone(), received.clone(), latencies.clone(), arrivals.clone());
        std::thread::spawn(move || {
            if pin {
                pin_thread(0, 0);
            }
            let mut batch = RecvMany::new();
            let mut local = Vec::with_capacity(1 << 16);
            let mut local_arrivals = Vec::with_capacity(1 << 16);
            while !stop.load(Ordering::Relaxed) {
                for (k, s) in socks.iter().enumerate() {
                    // With --srtp what reaches A is SRTP: its timestamp is sealed.
                    let timed = !(srtp && k == 0);
                    loop {
                        let n = batch.recv(s);
                        let now = epoch.elapsed().as_nanos() as u64;
                        for (pkt, arrival) in batch.stamped(n) {
                            if timed && pkt.len() >= 28 {
                                let t = u64::from_be_bytes(pkt[12..20].try_into().unwrap_or([0; 8]));
                                local.push((now.saturating_sub(t) / 1000) as u32);
                                let sent_at = u64::from_be_bytes(pkt[20..28].try_into().unwrap_or([0; 8]));
                                if let Some(arrival) = arrival {
                                    local_arrivals.push((arrival.saturating_sub(sent_at) / 1000) as u32);
                                }
                            }
                        }
                        received.fetch_add(n as u64, Ordering::Relaxed);
                        if n < RecvMany::SIZE {
                            break;
                        }
                    }
                }
                if local.len() >= 1 << 16 {
                    latencies.lock().map(|mut l| l.append(&mut local)).ok();
                    arrivals.lock().map(|mut l| l.append(&mut local_arrivals)).ok();
                }
                std::thread::sleep(RX_PERIOD);
            }
            latencies.lock().map(|mut l| l.append(&mut local)).ok();
            arrivals.lock().map(|mut l| l.append(&mut local_arrivals)).ok();
        })
    };

    // Sender: every 20 ms one packet per leg per call, spread evenly over the 20 ms (as
    // independent calls are) in 0.1 ms slices: call i sends in slice i % SLICES. A slice's
    // packets leave in one sendmmsg per leg, so the generator keeps up at 1000 calls.
    let tx = {
        let (stop, sent) = (stop.clone(), sent.clone());
        let mut keys = keys;
        std::thread::spawn(move || {
            if pin {
                pin_thread(0, 0);
            }
            let mut seq = vec![0u16; targets.len()];
            let mut sealed = Vec::with_capacity(PACKET);
            let mut next = Instant::now();
            let mut slice = 0usize;
            let mut legs = [SendMany::default(), SendMany::default()];
            while !stop.load(Ordering::Relaxed) {
                for i in (slice..targets.len()).step_by(SLICES) {
                    seq[i] = seq[i].wrapping_add(1);
                    let t = epoch.elapsed().as_nanos() as u64;
                    for (leg, dst) in [targets[i].0, targets[i].1].into_iter().enumerate() {
                        let mut pkt = [0u8; PACKET];
                        pkt[0] = 0x80;
                        pkt[2..4].copy_from_slice(&seq[i].to_be_bytes());
                        pkt[4..8].copy_from_slice(&(u32::from(seq[i]) * 160).to_be_bytes());
                        pkt[8..12].copy_from_slice(&((i * 2 + leg) as u32).to_be_bytes());
                        pkt[12..20].copy_from_slice(&t.to_be_bytes());
                        pkt[20..28].copy_from_slice(&realtime_ns().to_be_bytes());
                        if let (0, Some(key)) = (leg, keys.get_mut(i)) {
                            // SRTP of the same size on the wire: 10 bytes less payload.
                            sealed.clear();
                            sealed.extend_from_slice(&pkt[..PACKET - TAG_LEN]);
                            if key.protect(&mut sealed).is_ok() && sealed.len() == PACKET {
                                pkt.copy_from_slice(&sealed);
                            }
                        }
                        legs[leg].push(pkt, dst);
                    }
                }
                for (leg, sock) in legs.iter_mut().zip([&a, &b]) {
                    sent.fetch_add(leg.send(sock) as u64, Ordering::Relaxed);
                }
                slice = (slice + 1) % SLICES;
                next += SLICE;
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                } else if now - next > Duration::from_millis(20) {
                    // Fell far behind (a stall): start again from now rather than burst.
                    next = now;
                }
            }
        })
    };

    // Warm up (latching), then measure.
    std::thread::sleep(Duration::from_secs(2));
    let me = std::process::id();
    let softirqd = softirqd_pids();
    let softirq_ns = || softirqd.iter().map(|p| task_ns(*p)).sum::<u64>();
    let (t0, tr0, ts0) = (task_ns(me), if pid == 0 { 0 } else { task_ns(pid) }, softirq_ns());
    let (c0, r0, m0, g0) = (cpu_ticks(pid), received.load(Ordering::Relaxed), machine_ticks(), cpu_ticks(me));
    for l in [&latencies, &arrivals] {
        if let Ok(mut l) = l.lock() {
            l.clear();
        }
    }
    std::thread::sleep(Duration::from_secs(seconds));
    let (c1, r1, m1, g1) = (cpu_ticks(pid), received.load(Ordering::Relaxed), machine_ticks(), cpu_ticks(me));
    let (t1, tr1, ts1) = (task_ns(me), if pid == 0 { 0 } else { task_ns(pid) }, softirq_ns());
    stop.store(true, Ordering::Relaxed);
    let _ = tx.join();
    // Let what is in flight arrive, then compare all sent with all received.
    std::thread::sleep(Duration::from_millis(1500));
    let (sent_all, received_all) = (sent.load(Ordering::Relaxed), received.load(Ordering::Relaxed));
    stop_rx.store(true, Ordering::Relaxed);
    let _ = rx.join();
    let sorted = |l: &std::sync::Mutex<Vec<u32>>| {
        let mut v = l.lock().map(|l| l.clone()).unwrap_or_default();
        v.sort_unstable();
        v
    };
    let (lat, arr) = (sorted(&latencies), sorted(&arrivals));
    let at =
        |v: &[u32], p: f64| v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1))).copied().unwrap_or(0);
    let pct = |p: f64| at(&lat, p);
    let cpu_us = if pid == 0 { 0.0 } else { (c1.saturating_sub(c0)) as f64 / ticks_per_sec() * 1e6 };
    let relayed = r1 - r0;
    Ok(Outcome {
        calls,
        sent: sent_all,
        received: received_all,
        // CPU in the window over packets relayed in the same window.
        cpu_us_per_packet: cpu_us / relayed.max(1) as f64,
        machine_busy_us: (m1.saturating_sub(m0)) as f64 / ticks_per_sec() * 1e6,
        generator_us: (g1.saturating_sub(g0)) as f64 / ticks_per_sec() * 1e6,
        task_generator_us: t1.saturating_sub(t0) as f64 / 1e3,
        task_relay_us: tr1.saturating_sub(tr0) as f64 / 1e3,
        task_softirqd_us: ts1.saturating_sub(ts0) as f64 / 1e3,
        window_packets: relayed,
        p50_us: u64::from(pct(0.50)),
        p90_us: u64::from(pct(0.90)),
        p99_us: u64::from(pct(0.99)),
        max_us: u64::from(lat.last().copied().unwrap_or(0)),
        arrival_p50_us: u64::from(at(&arr, 0.50)),
        arrival_p99_us: u64::from(at(&arr, 0.99)),
        rss_kb_per_1000: rss_full.saturating_sub(rss_half) as f64 / (calls - calls / 2) as f64 * 1000.0,
    })
}

/// pinhole's userspace relay (the kernel fast path off).
pub(crate) fn start_pinhole(dir: &std::path::Path, ng_port: u16) -> anyhow::Result<Proc> {
    start_pinhole_with(dir, ng_port, "off")
}

/// pinhole with the kernel fast path (`auto`), which must come on.
fn start_pinhole_fast(dir: &std::path::Path, ng_port: u16) -> anyhow::Result<Proc> {
    let p = start_pinhole_with(dir, ng_port, "auto")?;
    let log = std::fs::read_to_string(dir.join("pinhole-relay-bench.log")).unwrap_or_default();
    anyhow::ensure!(!log.contains("fast path unavailable"), "the kernel fast path did not come on: {log}");
    Ok(p)
}

fn start_pinhole_with(dir: &std::path::Path, ng_port: u16, fastpath: &str) -> anyhow::Result<Proc> {
    crate::bench::spawn_pinhole(
        dir,
        "pinhole-relay-bench",
        &format!(
            "[sip]\nlisten = []\ndomain = \"bench.test\"\n[registrar]\nstore = \"\"\n[nat]\nkeepalive = \"off\"\n\
             [media]\nmode = \"relay\"\nfastpath = \"{fastpath}\"\ninterfaces = [{{ name = \"lo\", bind = \"127.0.0.1\" }}]\nport_min = 30000\nport_max = 39999\n\
             [ng]\nlisten = \"127.0.0.1:{ng_port}\"\n[metrics]\n{}",
            if RECORD.load(Ordering::Relaxed) {
                format!("[recording]\ndir = \"{}\"\nmax_bytes = 0\n", recording_dir(dir, "pinhole").display())
            } else {
                String::new()
            }
        ),
    )
}

pub(crate) fn start_rtpengine(dir: &std::path::Path, ng_port: u16) -> anyhow::Result<Proc> {
    let child = Command::new("rtpengine")
        .args([
            "--table=-1",
            "--interface=127.0.0.1",
            &format!("--listen-ng=127.0.0.1:{ng_port}"),
            "--port-min=30000",
            "--port-max=39999",
            "--foreground",
            "--log-stderr",
            "--log-level=3",
            "--delete-delay=0",
        ])
        .args(if RECORD.load(Ordering::Relaxed) {
            let rec = recording_dir(dir, "rtpengine");
            std::fs::create_dir_all(&rec)?;
            vec![format!("--recording-dir={}", rec.display()), "--recording-method=pcap".to_owned()]
        } else {
            Vec::new()
        })
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("rtpengine.log"))?)
        .process_group(0)
        .spawn()?;
    std::thread::sleep(Duration::from_millis(1000));
    Ok(Proc(child))
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if !crate::have("rtpengine") {
        anyhow::bail!("rtpengine is not installed (package rtpengine-daemon); run `cargo xtask install-peers` as root");
    }
    let seconds = u64::from(arg(args, "--seconds", 10));
    let srtp = args.iter().any(|a| a == "--srtp");
    let record = args.iter().any(|a| a == "--record");
    RECORD.store(record, Ordering::Relaxed);
    if args.iter().any(|a| a == "--fastpath") {
        return fastpath(args);
    }
    let calls_list: Vec<usize> = match arg(args, "--calls", 0) {
        0 => vec![250, 500, 1000],
        n => vec![n as usize],
    };
    let dir = std::env::temp_dir().join(format!("pinhole-relay-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut rows = Vec::new();
    for &calls in &calls_list {
        for (name, start) in [
            ("pinhole", start_pinhole as fn(&std::path::Path, u16) -> anyhow::Result<Proc>),
            ("rtpengine", start_rtpengine),
        ] {
            let port = free_port();
            let relay = start(&dir, port)?;
            let ng_addr = SocketAddr::from(([127, 0, 0, 1], port));
            let o = load(Through::Relay(ng_addr, relay.0.id()), calls, seconds, srtp)?;
            let loss = 1.0 - o.received as f64 / o.sent.max(1) as f64;
            if record {
                // Deleting the calls finishes their recordings (pinhole writes its WAVs then).
                let ctl = UdpSocket::bind("127.0.0.1:0")?;
                ctl.set_read_timeout(Some(Duration::from_millis(500)))?;
                for i in 0..calls {
                    let del = Bencode::dict(vec![
                        ("command", Bencode::str("delete")),
                        ("call-id", Bencode::str(&format!("bench-{i}-{}", std::process::id()))),
                    ]);
                    ng(&ctl, ng_addr, 50_000_000 + i as u64, &del)?;
                }
                let rec = recording_dir(&dir, if name == "pinhole" { "pinhole" } else { "rtpengine" });
                let mut last = u64::MAX;
                // Settled: the size stops changing for a second.
                for _ in 0..30 {
                    std::thread::sleep(Duration::from_secs(1));
                    let now = disk_bytes(&rec);
                    if now == last {
                        break;
                    }
                    last = now;
                }
                println!(
                    "{name:9} recording {calls} calls: {:.0} KB on disk per call ({:.1} s of media), {} files",
                    last as f64 / calls as f64 / 1024.0,
                    seconds as f64 + 2.0,
                    std::fs::read_dir(&rec).map_or(0, |d| d.count())
                );
            }
            println!(
                "{name:9} calls {:5}  {:8} pkts sent {:8} relayed  loss {:6.3}%  cpu {:6.2} us/pkt (task clock {:5.2})  latency p50 {:4} p90 {:5} p99 {:6} max {:6} us  rss {:7.0} KB/1000 calls",
                o.calls,
                o.sent,
                o.received,
                loss * 100.0,
                o.cpu_us_per_packet,
                o.task_relay_us / o.window_packets.max(1) as f64,
                o.p50_us,
                o.p90_us,
                o.p99_us,
                o.max_us,
                o.rss_kb_per_1000
            );
            rows.push((name, o, loss));
            drop(relay);
        }
    }
    let what = if srtp { "SDES-SRTP <-> RTP" } else { "RTP <-> RTP" };
    println!("\nsummary ({what}: relay CPU per relayed packet, same generator, same run):");
    for &calls in &calls_list {
        let get = |n: &str| rows.iter().find(|(name, o, _)| *name == n && o.calls == calls).copied();
        if let (Some((_, p, pl)), Some((_, r, rl))) = (get("pinhole"), get("rtpengine")) {
            println!(
                "  {calls:5} calls  pinhole {:6.2} us/pkt (loss {:.3}%)  rtpengine {:6.2} us/pkt (loss {:.3}%)  ratio {:.2}x",
                p.cpu_us_per_packet,
                pl * 100.0,
                r.cpu_us_per_packet,
                rl * 100.0,
                r.cpu_us_per_packet / p.cpu_us_per_packet
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `cargo xtask bench relay --fastpath [--calls N] [--runs R] [--seconds S]`: whole-machine
/// CPU per relayed packet (docs/DESIGN.md, "Measuring CPU honestly") of pinhole's kernel fast
/// path, pinhole's userspace relay and rtpengine's, at each load, each run against a direct
/// run of the same generator (legs sending straight to each other) just before it:
/// (busy µs with the relay − busy µs direct) / packets relayed. The method is checked on
/// rtpengine: its whole-machine figure must be at least its own process's CPU per packet,
/// and the spread over the runs is reported.
fn fastpath(args: &[String]) -> anyhow::Result<()> {
    let seconds = u64::from(arg(args, "--seconds", 5));
    let runs = arg(args, "--runs", 5) as usize;
    PIN.store(args.iter().any(|a| a == "--pin"), Ordering::Relaxed);
    let calls_list: Vec<usize> = match arg(args, "--calls", 0) {
        0 => vec![250, 500, 1000, 2000],
        n => vec![n as usize],
    };
    let dir = std::env::temp_dir().join(format!("pinhole-fastpath-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    type Start = fn(&std::path::Path, u16) -> anyhow::Result<Proc>;
    let relays: [(&str, Start); 3] =
        [("pinhole kernel", start_pinhole_fast), ("pinhole user", start_pinhole), ("rtpengine", start_rtpengine)];
    println!("whole-machine CPU per relayed packet (relay run minus a direct run of the same generator), {runs} runs of {seconds} s");
    for &calls in &calls_list {
        for (name, start) in relays {
            let (mut costs, mut procs, mut lat, mut gens) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut arrival, mut tasks, mut task_procs) = (Vec::new(), Vec::new(), Vec::new());
            let (mut sent, mut received) = (0u64, 0u64);
            for _ in 0..runs {
                let direct = load(Through::Direct, calls, seconds, false)?;
                let port = free_port();
                let relay = start(&dir, port)?;
                let o = load(
                    Through::Relay(SocketAddr::from(([127, 0, 0, 1], port)), relay.0.id()),
                    calls,
                    seconds,
                    false,
                )?;
                drop(relay);
                let n = o.window_packets.max(1) as f64;
                costs.push((o.machine_busy_us - direct.machine_busy_us) / n);
                // The generator's extra CPU with the relay (the kernel's forwarding charged
                // to the sender) plus the relay process's own.
                gens.push((o.generator_us - direct.generator_us) / n + o.cpu_us_per_packet);
                procs.push(o.cpu_us_per_packet);
                // The same by the scheduler's exact clock, with what ksoftirqd did.
                let around = |x: &Outcome| x.task_generator_us + x.task_softirqd_us;
                tasks.push((around(&o) - around(&direct) + o.task_relay_us) / n);
                task_procs.push(o.task_relay_us / n);
                lat.push((o.p50_us.saturating_sub(direct.p50_us), o.p99_us.saturating_sub(direct.p99_us)));
                arrival.push((
                    o.arrival_p50_us.saturating_sub(direct.arrival_p50_us),
                    o.arrival_p99_us.saturating_sub(direct.arrival_p99_us),
                ));
                sent += o.sent;
                received += o.received;
            }
            let stats = |v: &[f64]| {
                let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
                let (min, max) = v.iter().fold((f64::MAX, f64::MIN), |(a, b), c| (a.min(*c), b.max(*c)));
                let runs = v.iter().map(|c| format!("{c:.2}")).collect::<Vec<_>>().join(" ");
                (mean, (max - min) / mean.abs().max(1e-9) * 100.0, runs)
            };
            let (mean, spread, runs_text) = stats(&costs);
            let (gmean, gspread, gruns) = stats(&gens);
            let proc_mean = procs.iter().sum::<f64>() / procs.len() as f64;
            let (tmean, tspread, truns) = stats(&tasks);
            let tproc = task_procs.iter().sum::<f64>() / task_procs.len().max(1) as f64;
            let p99 = lat.iter().map(|l| l.1).max().unwrap_or(0);
            let p50 = lat.iter().map(|l| l.0).max().unwrap_or(0);
            let arrival_p99 = arrival.iter().map(|l| l.1).max().unwrap_or(0);
            let arrival_p50 = arrival.iter().map(|l| l.0).max().unwrap_or(0);
            println!(
                "{name:15} calls {calls:5}  task clock {tmean:6.2} us/pkt (runs {truns}; spread {tspread:.0}%; relay's own {tproc:5.2})  \
                 whole machine {mean:6.2} us/pkt (runs {runs_text}; spread {spread:.0}%)  \
                 generator+relay {gmean:6.2} us/pkt (runs {gruns}; spread {gspread:.0}%)  relay process {proc_mean:5.2} us/pkt  \
                 added latency p50 {p50} p99 {p99} us (to arrival: p50 {arrival_p50} p99 {arrival_p99} us)  loss {:.3}%",
                (1.0 - received as f64 / sent.max(1) as f64) * 100.0
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
