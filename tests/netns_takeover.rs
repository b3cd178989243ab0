//! Relay takeover through a real redis-server, in network namespaces: a SIP edge drives a
//! relay at a virtual address over ng; the active relay writes its calls to Redis, a
//! standby mirrors them. During a call with RTP flowing both ways the active relay is
//! killed with -9 and its address moved to the standby: RTP resumes through the standby,
//! the gap is measured, ng `query` on the new node matches the old. Then the new active
//! relay is killed too and restarted in place: it takes the call back from Redis and RTP
//! resumes again. The call ends with a BYE. Needs root.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::netns::{ns_exec, NatLab, Segment, WAN_SERVER};
use common::sip::{header, register_with_password, status, Phone};
use common::{http_get, in_ns, wait_for, wait_until, Bg, TempDir};
use pinhole_media::ng::{split_cookie, Bencode};

const VIP: &str = "203.0.113.21";
const RELAY_A: &str = "203.0.113.11";
const RELAY_B: &str = "203.0.113.12";
const ALICE: &str = "203.0.113.30";
const BOB: &str = "203.0.113.40";

fn spawn(ns: &str, dir: &Path, name: &str, program: &str, args: &[&str]) -> Bg {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    let child = NatLab::command(ns, program)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    Bg(Some(child))
}

fn pinhole(ns: &str, dir: &Path, name: &str, config: &str) -> Bg {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).expect("config");
    let path = path.display().to_string();
    spawn(ns, dir, name, env!("CARGO_BIN_EXE_pinhole"), &["server", "--config", &path])
}

fn relay_config(address: &str, node: &str, role: &str) -> String {
    format!(
        "[sip]\nlisten = []\ndomain = \"relay.test\"\n\
         [media]\ninterfaces = [{{ name = \"vip\", bind = \"{VIP}\" }}]\nport_min = 30000\nport_max = 30199\n\
         [ng]\nlisten = \"{VIP}:2223\"\n\
         [metrics]\nlisten = \"{address}:9090\"\n\
         [cluster]\nredis = \"redis://{WAN_SERVER}:6379\"\nnode = \"{node}\"\ncalls = \"{role}\"\n"
    )
}

fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

/// One metric of the pinhole whose metrics listen on `addr` inside `ns`.
fn metric(ns: &str, addr: &str, name: &str) -> Option<f64> {
    let (addr, name) = (addr.to_owned(), name.to_owned());
    in_ns(ns, move || {
        http_get(&addr, "/metrics")?.lines().find_map(|l| l.strip_prefix(&name)?.strip_prefix(' ')?.trim().parse().ok())
    })
}

/// An ng command sent from the hub to the relay's virtual address; the decoded reply.
fn ng(hub: &str, cookie: &str, pairs: Vec<(&str, Bencode)>) -> Option<Bencode> {
    let mut msg = format!("{cookie} ").into_bytes();
    Bencode::dict(pairs).encode(&mut msg);
    in_ns(hub, move || {
        let sock = UdpSocket::bind((WAN_SERVER, 0)).ok()?;
        sock.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
        sock.send_to(&msg, (VIP, 2223)).ok()?;
        let mut buf = vec![0u8; 65536];
        let n = sock.recv(&mut buf).ok()?;
        Bencode::decode(split_cookie(&buf[..n]).ok()?.1).ok()
    })
}

/// What a query says that must survive a takeover: per tag, each stream's local port and
/// endpoint; and when the call was created.
fn query_summary(q: &Bencode) -> (Vec<String>, Option<i64>) {
    let mut out = Vec::new();
    if let Some(Bencode::Dict(tags)) = q.get("tags") {
        for (tag, t) in tags {
            let Some(Bencode::List(medias)) = t.get("medias") else { continue };
            for m in medias {
                let Some(Bencode::List(streams)) = m.get("streams") else { continue };
                for s in streams {
                    let port = match s.get("local port") {
                        Some(Bencode::Int(p)) => *p,
                        _ => -1,
                    };
                    let ep = s.get("endpoint").and_then(|e| e.get("address")).and_then(Bencode::as_str).unwrap_or("-");
                    out.push(format!("{}:{port}:{ep}", String::from_utf8_lossy(tag)));
                }
            }
        }
    }
    let created = match q.get("created") {
        Some(Bencode::Int(c)) => Some(*c),
        _ => None,
    };
    (out, created)
}

/// A phone's media: sends 20 ms RTP to `to` and records when each packet from the relay
/// arrives.
struct Media {
    heard: Arc<Mutex<Vec<Instant>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Media {
    fn start(sock: UdpSocket, to: SocketAddr) -> Media {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (rx, h, s) = (sock.try_clone().expect("clone"), heard.clone(), stop.clone());
        rx.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                if rx.recv(&mut buf).is_ok() {
                    h.lock().expect("lock").push(Instant::now());
                }
            }
        });
        let s = stop.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut seq: u16 = 0;
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                let mut p = vec![0x80, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34, 0x56, 0x78];
                p[2..4].copy_from_slice(&seq.to_be_bytes());
                p[4..8].copy_from_slice(&(u32::from(seq) * 160).to_be_bytes());
                p.extend_from_slice(&[0xd5; 160]);
                let _ = sock.send_to(&p, to);
                seq = seq.wrapping_add(1);
                let next = start + Duration::from_millis(20) * u32::from(seq);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        Media { heard, stop }
    }

    fn count_after(&self, t: Instant) -> usize {
        self.heard.lock().expect("lock").iter().filter(|a| **a > t).count()
    }

    /// The longest silence between arrivals after `from`.
    fn longest_gap_after(&self, from: Instant) -> Duration {
        let h = self.heard.lock().expect("lock");
        let after: Vec<Instant> = h.iter().copied().filter(|a| *a >= from).collect();
        let first = after.first().map_or(Duration::MAX, |f| f.duration_since(from));
        after.windows(2).map(|w| w[1].duration_since(w[0])).fold(first, Duration::max)
    }
}

impl Drop for Media {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn sdp(private: &str, port: u16) -> String {
    format!("v=0\r\no=- 1 1 IN IP4 {private}\r\ns=-\r\nc=IN IP4 {private}\r\nt=0 0\r\nm=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
}

fn media_target(msg: &str) -> SocketAddr {
    let body = msg.split("\r\n\r\n").nth(1).unwrap_or("");
    let ip = body.lines().find_map(|l| l.strip_prefix("c=IN IP4 ")).expect("c=").trim();
    let port = body.lines().find_map(|l| l.strip_prefix("m=audio ")).and_then(|l| l.split(' ').next()).expect("m=");
    format!("{ip}:{port}").parse().expect("media address")
}

fn request_in_dialog(method: &str, cseq: u32, ok: &str, branch: &str) -> String {
    let route = header(ok, "Record-Route").expect("record-route");
    let contact = header(ok, "Contact").expect("contact");
    let target = contact.trim_start_matches('<').split('>').next().unwrap_or(contact);
    let (from, to) = (header(ok, "From").expect("from"), header(ok, "To").expect("to"));
    format!(
        "{method} {target} SIP/2.0\nVia: SIP/2.0/UDP {ALICE}:5060;branch=z9hG4bK{branch};rport\nMax-Forwards: 70\nRoute: {route}\nFrom: {from}\nTo: {to}\nCall-ID: takeover-call\nCSeq: {cseq} {method}\nContent-Length: 0\n\n"
    )
}

#[test]
fn a_relay_killed_mid_call_is_taken_over_by_its_standby_and_media_resumes() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("takeover");
    let d = dir.path();
    let seg = Segment::new(&[RELAY_A, RELAY_B, ALICE, BOB]);
    let (hub, relay_a_ns, relay_b_ns) = (seg.hub.clone(), seg.hosts[0].clone(), seg.hosts[1].clone());
    ns_exec(&relay_a_ns, &["ip", "addr", "add", &format!("{VIP}/24"), "dev", "eth0"]);
    // The standby binds the virtual address before it has it.
    ns_exec(&relay_b_ns, &["sysctl", "-q", "net.ipv4.ip_nonlocal_bind=1"]);

    let _redis = spawn(
        &hub,
        d,
        "redis",
        "redis-server",
        &["--port", "6379", "--bind", WAN_SERVER, "--save", "", "--appendonly", "no", "--protected-mode", "no"],
    );
    assert!(
        wait_until(Duration::from_secs(5), || in_ns(&hub, || std::net::TcpStream::connect((WAN_SERVER, 6379)).is_ok())),
        "redis-server did not start: {}",
        log(d, "redis")
    );
    let mut relay_a = pinhole(&relay_a_ns, d, "relay-a", &relay_config(RELAY_A, "relay-a", "active"));
    let mut relay_b = pinhole(&relay_b_ns, d, "relay-b", &relay_config(RELAY_B, "relay-b", "standby"));
    let _edge = pinhole(
        &hub,
        d,
        "edge",
        &format!(
            "[sip]\nlisten = [\"udp:{WAN_SERVER}:5060\"]\ndomain = \"pinhole.test\"\n\
             [auth]\nrealm = \"pinhole.test\"\nusers = [{{ user = \"bob\", password = \"bob-pw\" }}]\ntrusted = [\"{ALICE}/32\"]\n\
             [registrar]\nstore = \"\"\n[media]\nrelays = [\"ng:{VIP}:2223\"]\n[metrics]\nlisten = \"{WAN_SERVER}:9090\"\n"
        ),
    );
    let edge_metrics = format!("{WAN_SERVER}:9090");
    // Set only from the relay's statistics reply.
    let heard = format!("pinhole_fleet_relay_sessions{{relay=\"{VIP}:2223\"}}");
    assert!(
        wait_until(Duration::from_secs(10), || metric(&hub, &edge_metrics, &heard) == Some(0.0)),
        "the edge never heard the relay\n{}\n{}",
        log(d, "edge"),
        log(d, "relay-a")
    );
    assert!(wait_for(&d.join("relay-b.log"), "role=\"standby\"", Duration::from_secs(10)), "{}", log(d, "relay-b"));

    // Bob registers; alice (trusted) calls him; both sides' SDP say private addresses, as
    // phones behind NAT do.
    let server = format!("{WAN_SERVER}:5060");
    let bob = Phone { sock: in_ns(&seg.hosts[3], || UdpSocket::bind((BOB, 5060)).expect("bob sip")) };
    let alice = Phone { sock: in_ns(&seg.hosts[2], || UdpSocket::bind((ALICE, 5060)).expect("alice sip")) };
    let bob_rtp = in_ns(&seg.hosts[3], || UdpSocket::bind((BOB, 5000)).expect("bob rtp"));
    let alice_rtp = in_ns(&seg.hosts[2], || UdpSocket::bind((ALICE, 4000)).expect("alice rtp"));
    let reg = register_with_password(&bob, &server, "bob", "bob-pw", "tk");
    assert_eq!(status(&reg), Some(200), "{reg}");

    let offer = sdp("198.51.100.10", 4000);
    alice.send(
        &server,
        &format!(
            "INVITE sip:bob@pinhole.test SIP/2.0\nVia: SIP/2.0/UDP {ALICE}:5060;branch=z9hG4bKtk1;rport\nMax-Forwards: 70\nFrom: <sip:alice@pinhole.test>;tag=alice1\nTo: <sip:bob@pinhole.test>\nCall-ID: takeover-call\nCSeq: 1 INVITE\nContact: <sip:alice@{ALICE}:5060>\nContent-Type: application/sdp\nContent-Length: {}\n\n{offer}",
            offer.len()
        ),
    );
    let invite = bob.recv_where(Duration::from_secs(5), |m| m.starts_with("INVITE ")).unwrap_or_else(|| {
        panic!("bob got no INVITE\n{}\n{}", log(d, "edge"), log(d, "relay-a"));
    });
    let to_relay_from_bob = media_target(&invite);
    assert_eq!(to_relay_from_bob.ip().to_string(), VIP, "anchored on the relay's virtual address");
    let answer = sdp("198.51.100.138", 5000);
    let copy = |h: &str| header(&invite, h).unwrap_or("").to_owned();
    let vias: Vec<&str> =
        invite.lines().take_while(|l| !l.is_empty()).filter(|l| l.to_ascii_lowercase().starts_with("via:")).collect();
    bob.send(
        &server,
        &format!(
            "SIP/2.0 200 OK\n{}\nRecord-Route: {}\nFrom: {}\nTo: {};tag=bob1\nCall-ID: takeover-call\nCSeq: 1 INVITE\nContact: <sip:bob@{BOB}:5060>\nContent-Type: application/sdp\nContent-Length: {}\n\n{answer}",
            vias.join("\n"),
            copy("Record-Route"),
            copy("From"),
            copy("To"),
            answer.len()
        ),
    );
    let ok = alice.recv_where(Duration::from_secs(5), |m| m.starts_with("SIP/2.0 200")).expect("alice's 200");
    let to_relay_from_alice = media_target(&ok);
    alice.send(&server, &request_in_dialog("ACK", 1, &ok, "tk2"));

    let alice_media = Media::start(alice_rtp, to_relay_from_alice);
    let bob_media = Media::start(bob_rtp, to_relay_from_bob);
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || alice_media.count_after(started) > 50
            && bob_media.count_after(started) > 50),
        "no media through the active relay\n{}",
        log(d, "relay-a")
    );

    // The active relay wrote the call with both latched sources; the standby mirrors it.
    let key = "pinhole:call:203.0.113.21:takeover-call";
    assert!(
        wait_until(Duration::from_secs(5), || {
            let v = ns_exec(&hub, &["redis-cli", "-h", WAN_SERVER, "GET", key]);
            let v = String::from_utf8_lossy(&v.stdout);
            v.contains(&format!("{ALICE}:4000")) && v.contains(&format!("{BOB}:5000"))
        }),
        "the call state in Redis lacks the latched sources: {}",
        String::from_utf8_lossy(&ns_exec(&hub, &["redis-cli", "-h", WAN_SERVER, "GET", key]).stdout)
    );
    // Each change also names the call in the stream the standby tails.
    let xlen = ns_exec(&hub, &["redis-cli", "-h", WAN_SERVER, "XLEN", "pinhole:calllog:203.0.113.21"]);
    let changes: u64 = String::from_utf8_lossy(&xlen.stdout).trim().parse().unwrap_or(0);
    assert!(changes >= 1, "the call's changes are not in the stream");
    let b_metrics = format!("{RELAY_B}:9090");
    assert!(
        wait_until(Duration::from_secs(5), || metric(&relay_b_ns, &b_metrics, "pinhole_takeover_mirrored_calls")
            == Some(1.0)),
        "the standby does not mirror the call\n{}",
        log(d, "relay-b")
    );
    // Let the standby see the latched version (it reads every 250 ms).
    std::thread::sleep(Duration::from_millis(600));
    let before = ng(&hub, "q1", vec![("command", Bencode::str("query")), ("call-id", Bencode::str("takeover-call"))])
        .expect("query on the active relay");

    // The active relay dies; its address moves to the standby.
    relay_a.0.as_mut().map(|c| c.kill()).transpose().expect("kill -9");
    let killed = Instant::now();
    seg.move_address(VIP, 0, 1);
    assert!(
        wait_until(Duration::from_secs(5), || alice_media.count_after(killed + Duration::from_millis(1)) > 25
            && bob_media.count_after(killed + Duration::from_millis(1)) > 25),
        "media did not resume through the standby\n{}",
        log(d, "relay-b")
    );
    let (gap_to_alice, gap_to_bob) = (alice_media.longest_gap_after(killed), bob_media.longest_gap_after(killed));
    eprintln!("takeover gap: {} ms towards alice, {} ms towards bob", gap_to_alice.as_millis(), gap_to_bob.as_millis());
    assert!(gap_to_alice < Duration::from_secs(2) && gap_to_bob < Duration::from_secs(2), "gap over 2 s");

    // ng on the new node: the same call, tags, ports, endpoints and age.
    let after = ng(&hub, "q2", vec![("command", Bencode::str("query")), ("call-id", Bencode::str("takeover-call"))])
        .expect("query on the standby");
    let (b, a) = (query_summary(&before), query_summary(&after));
    assert!(!b.0.is_empty(), "{before}");
    assert_eq!(a.0, b.0, "tags, ports or endpoints differ after the takeover\nbefore {before}\nafter {after}");
    // Each node turns its own clock into wall time, to the second.
    let (ca, cb) = (a.1.expect("created after"), b.1.expect("created before"));
    assert!((ca - cb).abs() <= 1, "created {cb} before, {ca} after");
    assert!(
        wait_for(&d.join("relay-b.log"), "taking over the relay's calls", Duration::from_secs(5)),
        "{}",
        log(d, "relay-b")
    );
    // The new active relay dies too and is restarted in place (no standby this time): it
    // takes the call back from Redis (as the first node last wrote it: nothing changed
    // since) before anything else, and media resumes.
    relay_b.0.as_mut().map(|c| c.kill()).transpose().expect("kill -9");
    drop(relay_b);
    let killed = Instant::now();
    let _relay_b2 = pinhole(&relay_b_ns, d, "relay-b-again", &relay_config(RELAY_B, "relay-b", "active"));
    assert!(
        wait_until(Duration::from_secs(10), || alice_media.count_after(killed + Duration::from_millis(1)) > 25
            && bob_media.count_after(killed + Duration::from_millis(1)) > 25),
        "media did not resume after the restart in place\n{}",
        log(d, "relay-b-again")
    );
    assert!(log(d, "relay-b-again").contains("calls taken back from Redis at start"), "{}", log(d, "relay-b-again"));
    let restart_gap = alice_media.longest_gap_after(killed).max(bob_media.longest_gap_after(killed));
    eprintln!("restart in place: media back after {} ms", restart_gap.as_millis());
    assert!(restart_gap < Duration::from_secs(2), "restart gap over 2 s");

    // The call ends cleanly: BYE through the edge, 200 back, the call gone from the new
    // relay and from Redis.
    alice.send(&server, &request_in_dialog("BYE", 2, &ok, "tk3"));
    let bye = bob.recv_where(Duration::from_secs(5), |m| m.starts_with("BYE ")).expect("bob's BYE");
    let bye_vias: Vec<&str> =
        bye.lines().take_while(|l| !l.is_empty()).filter(|l| l.to_ascii_lowercase().starts_with("via:")).collect();
    bob.send(
        &server,
        &format!(
            "SIP/2.0 200 OK\n{}\nFrom: {}\nTo: {}\nCall-ID: takeover-call\nCSeq: 2 BYE\nContent-Length: 0\n\n",
            bye_vias.join("\n"),
            header(&bye, "From").unwrap_or(""),
            header(&bye, "To").unwrap_or("")
        ),
    );
    let done = alice.recv_where(Duration::from_secs(5), |m| m.starts_with("SIP/2.0 ") && m.contains("BYE"));
    assert_eq!(done.as_deref().and_then(status), Some(200), "the BYE was not answered\n{}", log(d, "edge"));
    assert!(
        wait_until(Duration::from_secs(5), || metric(&relay_b_ns, &b_metrics, "pinhole_relay_sessions") == Some(0.0)),
        "the call is still on the new relay\n{}",
        log(d, "relay-b")
    );
    assert!(
        wait_until(Duration::from_secs(5), || {
            String::from_utf8_lossy(&ns_exec(&hub, &["redis-cli", "-h", WAN_SERVER, "EXISTS", key]).stdout).trim()
                == "0"
        }),
        "the ended call is still in Redis"
    );
}
