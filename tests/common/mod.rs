//! Helpers shared by the integration tests: a pinhole process with its own config and
//! ports, real sipp runs, and small raw-socket clients. Every process a test starts is
//! stopped by PID when its handle drops.

#![allow(dead_code, unreachable_pub)]

pub mod baresip;
pub mod netns;
pub mod sip;

impl netns::NatLab {
    /// Starts pinhole in the WAN namespace with `config` (written to `dir`), logging to
    /// `dir/pinhole.log`, and waits until it listens. Returns the process and the log path.
    pub fn start_pinhole(&self, dir: &Path, config: &str) -> (Bg, PathBuf) {
        self.start_pinhole_until(dir, config, "SIP listening")
    }

    /// [`Self::start_pinhole`], ready once its log has `ready` (a relay without SIP
    /// listeners: `ng control listening`).
    pub fn start_pinhole_until(&self, dir: &Path, config: &str, ready: &str) -> (Bg, PathBuf) {
        let cfg = dir.join("pinhole.toml");
        std::fs::write(&cfg, config).expect("config");
        let log = dir.join("pinhole.log");
        let child = netns::NatLab::command(&self.wan, env!("CARGO_BIN_EXE_pinhole"))
            .args(["server", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info,pinhole_sip=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .process_group(0)
            .spawn()
            .expect("pinhole");
        let bg = Bg(Some(child));
        assert!(wait_for(&log, ready, Duration::from_secs(10)), "pinhole did not start");
        (bg, log)
    }
}

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// One ng command to the relay at 127.0.0.1:`port` (cookie `cookie`), its reply decoded.
pub fn ng(port: u16, cookie: &str, msg: pinhole_media::ng::Bencode) -> pinhole_media::ng::Bencode {
    use pinhole_media::ng::{split_cookie, Bencode};
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let mut out = format!("{cookie} ").into_bytes();
    msg.encode(&mut out);
    s.send_to(&out, ("127.0.0.1", port)).expect("send");
    let mut buf = vec![0u8; 65536];
    let (n, _) = s.recv_from(&mut buf).expect("ng reply");
    let (c, payload) = split_cookie(&buf[..n]).expect("cookie");
    assert_eq!(c, cookie.as_bytes());
    Bencode::decode(payload).expect("bencode reply")
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn sipp_dir() -> PathBuf {
    repo().join("config/sipp")
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A port free for both UDP and TCP on 127.0.0.1, distinct across tests in this process.
pub fn free_port() -> u16 {
    if NEXT_PORT.load(Ordering::Relaxed) == 0 {
        let base = 20000 + (std::process::id() % 400) as u16 * 20;
        let _ = NEXT_PORT.compare_exchange(0, base, Ordering::Relaxed, Ordering::Relaxed);
    }
    loop {
        let p = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let p = if p > 29990 { 20000 + p % 1000 } else { p };
        if UdpSocket::bind(("127.0.0.1", p)).is_ok() && TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// A base port for sipp's media sockets: sipp binds base, base+1, base+2 and base+3
/// (audio and video RTP/RTCP), so four consecutive free ports are reserved.
pub fn media_ports() -> u16 {
    loop {
        let base = NEXT_PORT.fetch_add(4, Ordering::Relaxed);
        if base < 29990 && (base..base + 4).all(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
        free_port();
    }
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("pinhole-test-{tag}-{}-{}", std::process::id(), free_port()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `pinhole server`.
pub struct Pinhole {
    child: Option<Child>,
    pub config: PathBuf,
    pub sip_port: u16,
    pub tls_port: u16,
    pub metrics_port: u16,
    log: PathBuf,
}

pub struct PinholeOptions {
    pub tls: bool,
    /// Extra lines for the [auth] table.
    pub auth_extra: String,
    pub trusted: Vec<String>,
    pub listen_ip: String,
    pub store: Option<PathBuf>,
    pub keepalive: &'static str,
    /// Extra lines for the [sip] table.
    pub sip_extra: String,
    /// Relay media on this port range (`None`: media.mode = "off").
    pub relay_ports: Option<(u16, u16)>,
    /// Whole tables appended to the config ([ng], [stun], …).
    pub extra: String,
    /// Extra lines for the [media] table (with `relay_ports`).
    pub media_extra: String,
    /// More `[sip] listen` entries (`"ws:127.0.0.1:PORT"`, …).
    pub listen_extra: Vec<String>,
}

impl Default for PinholeOptions {
    fn default() -> Self {
        PinholeOptions {
            tls: false,
            auth_extra: String::new(),
            trusted: vec!["127.0.0.0/8".into()],
            listen_ip: "127.0.0.1".into(),
            store: None,
            keepalive: "off",
            sip_extra: String::new(),
            relay_ports: None,
            extra: String::new(),
            media_extra: String::new(),
            listen_extra: Vec::new(),
        }
    }
}

impl Pinhole {
    pub fn start(dir: &TempDir, opts: PinholeOptions) -> Pinhole {
        let sip_port = free_port();
        let tls_port = free_port();
        let metrics_port = free_port();
        let ip = &opts.listen_ip;
        let mut listen = vec![format!("\"udp:{ip}:{sip_port}\""), format!("\"tcp:{ip}:{sip_port}\"")];
        listen.extend(opts.listen_extra.iter().map(|l| format!("\"{l}\"")));
        let mut tls = String::new();
        if opts.tls {
            let (cert, key) = self_signed(dir.path());
            listen.push(format!("\"tls:{ip}:{tls_port}\""));
            tls = format!("[sip.tls]\ncert = \"{}\"\nkey = \"{}\"\n", cert.display(), key.display());
        }
        let store = opts.store.clone().unwrap_or_else(|| dir.path().join("store.json"));
        let trusted: Vec<String> = opts.trusted.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "[sip]\nlisten = [{}]\ndomain = \"pinhole.test\"\n{}\n{tls}\n[auth]\nrealm = \"pinhole.test\"\nusers = [{{ user = \"alice\", password = \"alice-pw\" }}, {{ user = \"bob\", password = \"bob-pw\" }}]\ntrusted = [{}]\n{}\n[registrar]\nstore = \"{}\"\n[nat]\nkeepalive = \"{}\"\nkeepalive_interval = 5\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
            listen.join(", "),
            opts.sip_extra,
            trusted.join(", "),
            opts.auth_extra,
            store.display(),
            opts.keepalive,
        );
        let media = match opts.relay_ports {
            None => "[media]\nmode = \"off\"\n".to_owned(),
            Some((lo, hi)) => format!(
                "[media]\nmode = \"relay\"\ninterfaces = [{{ name = \"lo\", bind = \"127.0.0.1\" }}]\nport_min = {lo}\nport_max = {hi}\n{}\n",
                opts.media_extra
            ),
        };
        let config = config + &media + "\n" + &opts.extra;
        let path = dir.path().join(format!("pinhole-{sip_port}.toml"));
        std::fs::write(&path, config).expect("write config");
        let log = dir.path().join(format!("pinhole-{sip_port}.log"));
        let mut p = Pinhole { child: None, config: path, sip_port, tls_port, metrics_port, log };
        p.spawn();
        p
    }

    /// Starts pinhole with a config of the caller's (its [metrics] table is added here).
    pub fn with_config(dir: &TempDir, config: &str) -> Pinhole {
        let metrics_port = free_port();
        let path = dir.path().join(format!("pinhole-{metrics_port}.toml"));
        std::fs::write(&path, format!("{config}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n")).expect("config");
        let mut p = Pinhole {
            child: None,
            config: path,
            sip_port: 0,
            tls_port: 0,
            metrics_port,
            log: dir.path().join(format!("pinhole-{metrics_port}.log")),
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_pinhole"))
            .args(["server", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,pinhole_sip=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn pinhole");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.metrics().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("pinhole did not start:\n{}", self.log_text());
    }

    pub fn sip(&self) -> String {
        format!("127.0.0.1:{}", self.sip_port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The server's process id, while it runs.
    #[allow(dead_code)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// The /metrics text, or None if it is not being served.
    pub fn metrics(&self) -> Option<String> {
        http_get(&format!("127.0.0.1:{}", self.metrics_port), "/metrics")
    }

    /// The value of one metric line (exact name with labels); `None` when the server does
    /// not answer or does not have that metric, so a dead server never reads as 0.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics()?.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?;
            rest.starts_with(' ').then(|| rest.trim().parse().ok()).flatten()
        })
    }

    /// Waits until a metric is served with the value `want`.
    pub fn wait_metric(&self, name: &str, want: f64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.metric(name) == Some(want) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Pinhole {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// A self-signed certificate for 127.0.0.1 made with Debian's openssl.
pub fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let st = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(st.success(), "openssl failed");
    (cert, key)
}

/// A background process stopped by PID on drop.
pub struct Bg(pub Option<Child>);

impl Bg {
    pub fn wait_output(mut self, timeout: Duration) -> Output {
        let mut child = self.0.take().expect("child");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return child.wait_with_output().expect("output");
            }
            if Instant::now() > deadline {
                stop(&mut child);
                return child.wait_with_output().expect("output");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            stop(&mut c);
        }
    }
}

/// Stops a child we started and, when it leads a process group of its own (spawned with
/// `process_group(0)`), everything in that group: Kamailio's forked workers die with it.
pub fn stop(c: &mut Child) {
    let pid = c.id();
    let pgrp = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| {
        s.rsplit(')').next().and_then(|r| r.split_whitespace().nth(2)).and_then(|g| g.parse::<u32>().ok())
    });
    if pgrp == Some(pid) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).stderr(Stdio::null()).status();
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// A sipp command whose screen output goes to `out` (a pipe nobody reads would fill and
/// stall sipp).
pub fn sipp_command(args: &[&str], out: &Path) -> Command {
    let mut c = Command::new("sipp");
    let f = std::fs::File::create(out).expect("sipp output file");
    let f2 = f.try_clone().expect("clone");
    c.current_dir(sipp_dir()).arg("-nostdin").args(args).stdout(f).stderr(f2);
    c
}

/// The tail every sipp run shares: error file, extra arguments, media ports of its own,
/// the optional -rsa hop, and the target.
fn finish_sipp(c: &mut Command, err_file: &Path, extra: &[&str], via: Option<&str>, target: &str) {
    c.arg(err_file).args(extra);
    if !extra.contains(&"-mp") {
        c.args(["-mp", &media_ports().to_string()]);
    }
    if let Some(v) = via {
        c.args(["-rsa", v]);
    }
    c.arg(target);
}

/// Starts a sipp callee that registers `user` and answers with the out-of-call scenario.
pub fn sipp_callee(
    target: &str,
    user: &str,
    port: u16,
    transport: &str,
    ooc: &str,
    hold_ms: u32,
    err_file: &Path,
) -> Bg {
    sipp_callee_via(target, None, user, port, transport, ooc, hold_ms, err_file, &[])
}

/// Like [`sipp_callee`], but sending through `via` (sipp's -rsa) while addressing `target`.
#[allow(clippy::too_many_arguments)]
pub fn sipp_callee_via(
    target: &str,
    via: Option<&str>,
    user: &str,
    port: u16,
    transport: &str,
    ooc: &str,
    hold_ms: u32,
    err_file: &Path,
    extra: &[&str],
) -> Bg {
    let hold = hold_ms.to_string();
    let port = port.to_string();
    let mut c = sipp_command(
        &[
            "-sf",
            "register_and_answer.xml",
            "-oocsf",
            ooc,
            "-s",
            user,
            "-m",
            "1",
            "-d",
            &hold,
            "-p",
            &port,
            "-i",
            "127.0.0.1",
            "-t",
            transport,
            "-max_socket",
            "100",
            "-trace_err",
            "-error_file",
        ],
        &err_file.with_extension("out"),
    );
    finish_sipp(&mut c, err_file, extra, via, target);
    Bg(Some(c.process_group(0).spawn().expect("sipp (package sip-tester) must be installed")))
}

/// Runs a sipp caller to completion and returns (exit status ok, successful, failed, output).
pub fn sipp_caller(
    target: &str,
    user: &str,
    scenario: &str,
    calls: u32,
    transport: &str,
    err_file: &Path,
) -> (bool, u32, u32, String) {
    sipp_caller_via(target, None, user, scenario, calls, transport, err_file, &[])
}

#[allow(clippy::too_many_arguments)]
pub fn sipp_caller_via(
    target: &str,
    via: Option<&str>,
    user: &str,
    scenario: &str,
    calls: u32,
    transport: &str,
    err_file: &Path,
    extra: &[&str],
) -> (bool, u32, u32, String) {
    let port = free_port().to_string();
    let calls_s = calls.to_string();
    let mut c = sipp_command(
        &[
            "-sf",
            scenario,
            "-s",
            user,
            "-m",
            &calls_s,
            "-r",
            "20",
            "-p",
            &port,
            "-i",
            "127.0.0.1",
            "-t",
            transport,
            "-timeout",
            "30s",
            "-trace_err",
            "-error_file",
        ],
        &err_file.with_extension("out"),
    );
    finish_sipp(&mut c, err_file, extra, via, target);
    let out = Bg(Some(c.process_group(0).spawn().expect("sipp"))).wait_output(Duration::from_secs(40));
    let text = std::fs::read_to_string(err_file.with_extension("out")).unwrap_or_default();
    let count = |label: &str| -> u32 {
        text.lines()
            .find(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split('|').nth(2))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let errors = std::fs::read_to_string(err_file).unwrap_or_default();
    (out.status.success(), count("Successful call"), count("Failed call"), format!("{text}\n--- errors ---\n{errors}"))
}

/// Sends one datagram and collects the replies that arrive within `wait`.
pub fn udp_exchange(target: &str, payload: &[u8], wait: Duration) -> Vec<String> {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.send_to(payload, target).expect("send");
    s.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let mut out = Vec::new();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline {
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    out
}

pub fn local(addr: &str) -> SocketAddr {
    addr.parse().expect("addr")
}

/// Reads lines of a child's stderr until one contains `needle`.
pub fn wait_for_line(r: impl Read, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut br = BufReader::new(r);
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        match br.read_line(&mut line) {
            Ok(0) => return false,
            Ok(_) if line.contains(needle) => return true,
            _ => {}
        }
    }
    false
}

static NEXT_RELAY: AtomicU16 = AtomicU16::new(0);

/// A relay port range of 100 ports for one test, distinct within this test process.
pub fn relay_range() -> (u16, u16) {
    if NEXT_RELAY.load(Ordering::Relaxed) == 0 {
        let base = 30000 + (std::process::id() % 50) as u16 * 200;
        let _ = NEXT_RELAY.compare_exchange(0, base, Ordering::Relaxed, Ordering::Relaxed);
    }
    let lo = NEXT_RELAY.fetch_add(100, Ordering::Relaxed);
    let lo = if lo > 39800 { 30000 + lo % 9000 } else { lo };
    (lo, lo + 99)
}

/// Writes an 8 kHz mono 16-bit WAV tone of `hz`, twenty seconds long, longer than any test call (baresip's aufile source).
pub fn tone_wav(path: &Path, hz: f64) {
    use std::io::Write;
    let rate = 8000u32;
    let samples: Vec<i16> = (0..rate * 20)
        .map(|i| (8000.0 * (2.0 * std::f64::consts::PI * hz * f64::from(i) / f64::from(rate)).sin()) as i16)
        .collect();
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        out.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::File::create(path).and_then(|mut f| f.write_all(&out)).expect("write wav");
}

/// Reads 16-bit mono samples past a 44-byte WAV header (sizes may be unset).
pub fn wav_samples(path: &Path) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes.get(44..).unwrap_or(&[]).chunks_exact(2).map(|c| f64::from(i16::from_le_bytes([c[0], c[1]]))).collect()
}

/// The share of a signal's energy at `hz` (Goertzel), in 0..1; 8 kHz samples. Measured in
/// blocks of 250 ms, so a jump in phase (audio lost in a dropout and never recorded) does
/// not cancel the tone out.
pub fn tone_share(samples: &[f64], hz: f64) -> f64 {
    let (mut power, mut energy) = (0.0, 0.0);
    for block in samples.chunks(2000).filter(|b| b.len() >= 400) {
        let n = block.len() as f64;
        let k = (n * hz / 8000.0).round();
        let w = 2.0 * std::f64::consts::PI * k / n;
        let coeff = 2.0 * w.cos();
        let (mut s1, mut s2) = (0.0, 0.0);
        for &x in block {
            let s0 = x + coeff * s1 - s2;
            s2 = s1;
            s1 = s0;
        }
        // A pure tone puts energy·n/2 into its bin.
        power += (s1 * s1 + s2 * s2 - coeff * s1 * s2) / (n / 2.0);
        energy += block.iter().map(|x| x * x).sum::<f64>();
    }
    if energy == 0.0 {
        0.0
    } else {
        (power / energy).min(1.0)
    }
}

/// Polls `f` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Waits until some socket listens on TCP `port` (read from /proc/net/tcp, without
/// connecting to it).
pub fn wait_listening(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let needle = format!(":{port:04X} ");
    while Instant::now() < deadline {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        // Fields: sl local_address rem_address st …; st 0A is LISTEN.
        if table.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && format!("{} ", f[1]).ends_with(&needle) && f[3] == "0A"
        }) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Waits until a file contains `needle`.
pub fn wait_for(path: &Path, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::read_to_string(path).unwrap_or_default().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Runs `f` on a thread that has entered network namespace `ns` (a socket it opens stays in
/// that namespace whichever thread uses it later).
#[allow(unsafe_code)]
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsRawFd;
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a namespace file we hold open; it changes only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("namespace thread")
}

#[cfg(test)]
mod audio_tests {
    #[test]
    fn goertzel_tells_tones_apart() {
        let dir = super::TempDir::new("tone");
        let p = dir.path().join("t.wav");
        super::tone_wav(&p, 440.0);
        let s = super::wav_samples(&p);
        assert!(super::tone_share(&s, 440.0) > 0.9);
        assert!(super::tone_share(&s, 660.0) < 0.01);
        // Audio lost in a dropout (a phase jump) does not hide the tone.
        let gapped: Vec<f64> = s[..7_900].iter().chain(&s[9_037..]).copied().collect();
        assert!(super::tone_share(&gapped, 440.0) > 0.8);
    }
}
