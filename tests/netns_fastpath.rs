//! The kernel fast path (issue 24) in a network-namespace lab: a relay namespace with two
//! veth pairs, one to phone A (192.0.2.0/24) and one to phone B (198.51.100.0/24; B
//! reaches the relay's address 192.0.2.1 through its other interface). pinhole relays on
//! 192.0.2.1, driven over ng; the phones are UDP sockets made in their namespaces.
//!
//! What must hold: two-way RTP goes through the TC program (its flows' counters grow while
//! the relay process reads nothing); a stranger's packets are never forwarded; a phone whose
//! source moves falls back to userspace and is offloaded again; a delete removes the flows;
//! after kill -9 nothing is forwarded, and nothing is attached; `fastpath = "off"` relays in
//! userspace. Needs root.

mod common;

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{ns_exec, NatLab, PREFIX};
use common::{http_get, in_ns, wait_for, wait_until, Bg, TempDir};
use pinhole_media::ng::{split_cookie, Bencode};
use pinhole_media::sdp::Sdp;

const RELAY_A: &str = "192.0.2.1";
const PHONE_A: &str = "192.0.2.2";
const RELAY_B: &str = "198.51.100.1";
const PHONE_B: &str = "198.51.100.2";

/// Three namespaces: relay, phone A, phone B.
struct Lab {
    relay: String,
    a: String,
    b: String,
}

impl Lab {
    fn new() -> Lab {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = format!("{PREFIX}{}f{}", std::process::id(), SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let lab = Lab { relay: format!("{id}r"), a: format!("{id}a"), b: format!("{id}b") };
        for ns in [&lab.relay, &lab.a, &lab.b] {
            let st = Command::new("ip").args(["netns", "add", ns]).status().expect("ip");
            assert!(st.success(), "ip netns add {ns}");
            ns_exec(ns, &["ip", "link", "set", "lo", "up"]);
        }
        for (phone, dev, relay_ip, phone_ip) in [(&lab.a, "ra", RELAY_A, PHONE_A), (&lab.b, "rb", RELAY_B, PHONE_B)] {
            let st = Command::new("ip")
                .args(["link", "add", dev, "netns", &lab.relay, "type", "veth", "peer", "name", "eth0", "netns", phone])
                .status()
                .expect("ip");
            assert!(st.success(), "veth {dev}");
            ns_exec(&lab.relay, &["ip", "addr", "add", &format!("{relay_ip}/24"), "dev", dev]);
            ns_exec(&lab.relay, &["ip", "link", "set", dev, "up"]);
            ns_exec(phone, &["ip", "addr", "add", &format!("{phone_ip}/24"), "dev", "eth0"]);
            ns_exec(phone, &["ip", "link", "set", "eth0", "up"]);
            ns_exec(phone, &["ip", "route", "add", "default", "via", relay_ip]);
        }
        lab
    }

    fn pinhole(&self, dir: &TempDir, name: &str, fastpath: &str) -> (Bg, std::path::PathBuf) {
        self.pinhole_as(dir, name, fastpath, &[])
    }

    /// [`Lab::pinhole`] run under `wrapper` (a command that execs the rest, such as
    /// setpriv dropping capabilities).
    fn pinhole_as(&self, dir: &TempDir, name: &str, fastpath: &str, wrapper: &[&str]) -> (Bg, std::path::PathBuf) {
        let cfg = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[sip]\nlisten = []\ndomain = \"relay.test\"\n[registrar]\nstore = \"\"\n\
                 [media]\nmode = \"relay\"\nfastpath = \"{fastpath}\"\ninterfaces = [{{ name = \"a\", bind = \"{RELAY_A}\" }}]\n\
                 port_min = 30000\nport_max = 30099\n[ng]\nlisten = \"127.0.0.1:2223\"\n[metrics]\nlisten = \"127.0.0.1:9090\"\n"
            ),
        )
        .expect("config");
        let log = dir.path().join(format!("{name}.log"));
        let program = wrapper.first().copied().unwrap_or(env!("CARGO_BIN_EXE_pinhole"));
        let mut command = NatLab::command(&self.relay, program);
        if !wrapper.is_empty() {
            command.args(&wrapper[1..]).arg(env!("CARGO_BIN_EXE_pinhole"));
        }
        let child = command
            .args(["server", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("pinhole");
        assert!(wait_for(&log, "ng control listening", Duration::from_secs(10)), "pinhole did not start");
        (Bg(Some(child)), log)
    }

    fn metric(&self, name: &str) -> f64 {
        let name = name.to_owned();
        in_ns(&self.relay, move || {
            http_get("127.0.0.1:9090", "/metrics")?
                .lines()
                .find_map(|l| l.strip_prefix(&name)?.strip_prefix(' ')?.trim().parse().ok())
        })
        .unwrap_or(-1.0)
    }

    fn ng(&self, cookie: &str, pairs: Vec<(&str, Bencode)>) -> Bencode {
        let mut msg = format!("{cookie} ").into_bytes();
        Bencode::dict(pairs).encode(&mut msg);
        in_ns(&self.relay, move || {
            let sock = UdpSocket::bind("127.0.0.1:0").ok()?;
            sock.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            sock.send_to(&msg, "127.0.0.1:2223").ok()?;
            let mut buf = vec![0u8; 65536];
            let n = sock.recv(&mut buf).ok()?;
            Bencode::decode(split_cookie(&buf[..n]).ok()?.1).ok()
        })
        .expect("ng reply")
    }

    /// A UDP socket bound in `ns`.
    fn socket(ns: &str, addr: &str) -> UdpSocket {
        let addr = addr.to_owned();
        let s = in_ns(ns, move || UdpSocket::bind(&addr).expect("bind"));
        s.set_read_timeout(Some(Duration::from_millis(20))).expect("timeout");
        s
    }

    /// The fast path's programs loaded in the kernel (bpftool; programs are not per
    /// namespace, and only this binary's first test loads one). A TCX link holds its
    /// program, so a program that is gone is attached nowhere.
    fn attached(&self) -> String {
        let out = Command::new("bpftool").args(["prog", "show", "name", "pinhole_fwd"]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b, &self.relay] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn sdp(ip: &str, port: u16) -> String {
    format!("v=0\r\no=- 1 1 IN IP4 {ip}\r\ns=-\r\nc=IN IP4 {ip}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\n")
}

/// Sets up call `id` over ng: A at PHONE_A:4000 offers, B at PHONE_B:5000 answers. Returns
/// the relay ports A and B send to.
fn call(lab: &Lab, id: &str) -> (u16, u16) {
    let port =
        |r: &Bencode| Sdp::parse(r.get("sdp").and_then(Bencode::as_bytes).expect("sdp")).expect("sdp").media[0].port;
    // Cookies are per command: the ng server answers a repeated cookie from its cache.
    let offer = lab.ng(
        &format!("o-{id}"),
        vec![
            ("command", Bencode::str("offer")),
            ("call-id", Bencode::str(id)),
            ("from-tag", Bencode::str("a")),
            ("sdp", Bencode::str(&sdp(PHONE_A, 4000))),
        ],
    );
    let answer = lab.ng(
        &format!("a-{id}"),
        vec![
            ("command", Bencode::str("answer")),
            ("call-id", Bencode::str(id)),
            ("from-tag", Bencode::str("a")),
            ("to-tag", Bencode::str("b")),
            ("sdp", Bencode::str(&sdp(PHONE_B, 5000))),
        ],
    );
    (port(&answer), port(&offer))
}

fn rtp(ssrc: u32, seq: u16) -> Vec<u8> {
    let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 0];
    p[2..4].copy_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&ssrc.to_be_bytes());
    p.extend_from_slice(&[0xd5; 160]);
    p
}

/// Packets of each SSRC a socket has waiting.
fn drain(s: &UdpSocket) -> std::collections::HashMap<u32, usize> {
    let mut got = std::collections::HashMap::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = s.recv(&mut buf) {
        if n >= 12 {
            *got.entry(u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]])).or_insert(0) += 1;
        }
    }
    got
}

const SSRC_A: u32 = 0xa;
const SSRC_B: u32 = 0xb;
const SSRC_STRANGER: u32 = 0x5;

/// `n` packets each way, 10 ms apart, from `a` (SSRC_A, sequence from `seq`) and `b`.
fn talk(a: &UdpSocket, b: &UdpSocket, to_a: u16, to_b: u16, seq: &mut u16, n: usize) {
    for _ in 0..n {
        *seq = seq.wrapping_add(1);
        a.send_to(&rtp(SSRC_A, *seq), (RELAY_A, to_a)).expect("send");
        b.send_to(&rtp(SSRC_B, *seq), (RELAY_A, to_b)).expect("send");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_metric(lab: &Lab, name: &str, want: f64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if lab.metric(name) == want {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn latched_rtp_is_forwarded_in_the_kernel_and_userspace_stays_the_authority() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("fastpath");
    let lab = Lab::new();
    let (pinhole, log) = lab.pinhole(&dir, "pinhole", "auto");
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text().contains("kernel fast path on"), "{}", text());
    assert!(lab.attached().contains("pinhole_fwd"), "{}", lab.attached());
    let (to_a, to_b) = call(&lab, "fp-1");
    let a = Lab::socket(&lab.a, &format!("{PHONE_A}:4000"));
    let b = Lab::socket(&lab.b, &format!("{PHONE_B}:5000"));
    assert_eq!(lab.metric("pinhole_fastpath_flows"), 0.0);

    // Both latch through userspace; then both directions go into the kernel.
    let mut seq = 0;
    talk(&a, &b, to_a, to_b, &mut seq, 20);
    assert!(wait_metric(&lab, "pinhole_fastpath_flows", 2.0, Duration::from_secs(3)), "no flows\n{}", text());
    drain(&a);
    drain(&b);
    let (u0, f0) = (lab.metric("pinhole_relay_userspace_packets_total"), lab.metric("pinhole_fastpath_packets_total"));
    talk(&a, &b, to_a, to_b, &mut seq, 100);
    std::thread::sleep(Duration::from_millis(700)); // the counters are read every 500 ms
    let (u1, f1) = (lab.metric("pinhole_relay_userspace_packets_total"), lab.metric("pinhole_fastpath_packets_total"));
    let (got_a, got_b) = (drain(&a), drain(&b));
    eprintln!("kernel {} userspace {} A got {got_a:?} B got {got_b:?}", f1 - f0, u1 - u0);
    assert!(got_b.get(&SSRC_A).copied().unwrap_or(0) >= 95, "B heard {got_b:?}");
    assert!(got_a.get(&SSRC_B).copied().unwrap_or(0) >= 95, "A heard {got_a:?}");
    assert!(f1 - f0 >= 190.0, "the kernel forwarded {} of 200", f1 - f0);
    assert!(u1 - u0 <= 4.0, "userspace read {} packets meanwhile", u1 - u0);

    // A stranger (A's host, another port) sending to A's relay port reaches nobody.
    let stranger = Lab::socket(&lab.a, &format!("{PHONE_A}:4002"));
    for i in 0..20 {
        stranger.send_to(&rtp(SSRC_STRANGER, 1000 + i), (RELAY_A, to_a)).expect("send");
    }
    talk(&a, &b, to_a, to_b, &mut seq, 10);
    let got_b = drain(&b);
    assert_eq!(got_b.get(&SSRC_STRANGER), None, "a stranger's packets were forwarded: {got_b:?}");
    assert!(got_b.contains_key(&SSRC_A));

    // A's source moves (a NAT rebind: the same stream from a new port): the latch follows
    // in userspace, the kernel's flows are replaced, and B's packets reach A's new port.
    let moved = Lab::socket(&lab.a, &format!("{PHONE_A}:4004"));
    for _ in 0..20 {
        seq = seq.wrapping_add(1);
        moved.send_to(&rtp(SSRC_A, seq), (RELAY_A, to_a)).expect("send");
        b.send_to(&rtp(SSRC_B, seq), (RELAY_A, to_b)).expect("send");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        wait_metric(&lab, "pinhole_fastpath_flows", 2.0, Duration::from_secs(3)),
        "not offloaded again\n{}",
        text()
    );
    drain(&moved);
    drain(&a);
    let f2 = lab.metric("pinhole_fastpath_packets_total");
    for _ in 0..50 {
        seq = seq.wrapping_add(1);
        moved.send_to(&rtp(SSRC_A, seq), (RELAY_A, to_a)).expect("send");
        b.send_to(&rtp(SSRC_B, seq), (RELAY_A, to_b)).expect("send");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(700));
    assert!(drain(&moved).get(&SSRC_B).copied().unwrap_or(0) >= 45, "B's packets do not reach A's new source");
    assert!(lab.metric("pinhole_fastpath_packets_total") - f2 >= 95.0, "the new flows are not in the kernel");
    assert_eq!(drain(&a).get(&SSRC_B), None, "B's packets still go to A's old source");

    // A delete takes the flows out: nothing is forwarded after it.
    let d = lab.ng("d", vec![("command", Bencode::str("delete")), ("call-id", Bencode::str("fp-1"))]);
    assert_eq!(d.get("result").and_then(Bencode::as_str), Some("ok"), "{d}");
    assert!(wait_metric(&lab, "pinhole_fastpath_flows", 0.0, Duration::from_secs(2)));
    drain(&b);
    talk(&moved, &b, to_a, to_b, &mut seq, 10);
    assert_eq!(drain(&b).get(&SSRC_A), None, "forwarded after the delete");

    // A new call, offloaded, then kill -9: the kernel forwards nothing more and nothing
    // stays attached; a restart restores nothing.
    let (to_a, to_b) = call(&lab, "fp-2");
    talk(&a, &b, to_a, to_b, &mut seq, 20);
    assert!(
        wait_metric(&lab, "pinhole_fastpath_flows", 2.0, Duration::from_secs(3)),
        "flows {} (ports {to_a} {to_b}) b {:?} a {:?}\n{}",
        lab.metric("pinhole_fastpath_flows"),
        drain(&b),
        drain(&a),
        text()
    );
    drop(pinhole); // SIGKILL by PID (Bg)
    let deadline = Instant::now() + Duration::from_secs(3);
    while lab.attached().contains("pinhole_fwd") {
        assert!(Instant::now() < deadline, "still attached after kill -9:\n{}", lab.attached());
        std::thread::sleep(Duration::from_millis(50));
    }
    drain(&b);
    talk(&a, &b, to_a, to_b, &mut seq, 10);
    assert_eq!(drain(&b).get(&SSRC_A), None, "forwarded after kill -9");
    let (_again, _) = lab.pinhole(&dir, "restarted", "auto");
    talk(&a, &b, to_a, to_b, &mut seq, 10);
    assert_eq!(drain(&b).get(&SSRC_A), None, "forwarded by a restart that restored no call");
    assert_eq!(lab.metric("pinhole_fastpath_flows"), 0.0);
}

#[test]
fn with_fastpath_off_the_same_call_is_relayed_in_userspace() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("fastpath-off");
    let lab = Lab::new();
    let (_pinhole, log) = lab.pinhole(&dir, "pinhole", "off");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("kernel fast path off"), "{text}");
    assert_eq!(lab.metric("pinhole_fastpath_on"), 0.0);
    relayed_in_userspace(&lab, "off-1");
}

/// A call whose 50 packets each way reach the other phone, all read by the relay process.
fn relayed_in_userspace(lab: &Lab, id: &str) {
    let (to_a, to_b) = call(lab, id);
    let a = Lab::socket(&lab.a, &format!("{PHONE_A}:4000"));
    let b = Lab::socket(&lab.b, &format!("{PHONE_B}:5000"));
    let mut seq = 0;
    talk(&a, &b, to_a, to_b, &mut seq, 50);
    let (mut at_b, mut at_a) = (0, 0);
    let arrived = wait_until(Duration::from_secs(2), || {
        at_b += drain(&b).get(&SSRC_A).copied().unwrap_or(0);
        at_a += drain(&a).get(&SSRC_B).copied().unwrap_or(0);
        at_b >= 45 && at_a >= 45
    });
    assert!(arrived, "reached the phones: {at_b} of A's, {at_a} of B's");
    assert!(lab.metric("pinhole_relay_userspace_packets_total") >= 95.0);
    assert_eq!(lab.metric("pinhole_fastpath_flows"), 0.0);
}

#[test]
fn where_the_kernel_refuses_the_program_the_relay_says_so_and_works_in_userspace() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("fastpath-refused");
    let lab = Lab::new();
    // Root without CAP_BPF and CAP_SYS_ADMIN (raw sockets still allowed): bpf() says EPERM.
    let drop_bpf = ["setpriv", "--bounding-set", "-bpf,-sys_admin", "--inh-caps", "-bpf,-sys_admin", "--"];
    let (_pinhole, log) = lab.pinhole_as(&dir, "pinhole", "auto", &drop_bpf);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("kernel fast path unavailable"), "{text}");
    assert!(text.contains("raw range socket"), "{text}");
    assert_eq!(lab.metric("pinhole_fastpath_on"), 0.0);
    relayed_in_userspace(&lab, "refused-1");
}
