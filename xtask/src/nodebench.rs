//! `cargo xtask bench node`: the user-space cost of a proxied call, without sockets. The
//! sans-IO node gets the datagrams `cargo xtask bench sip` makes sipp send (INVITE, 180,
//! 200, ACK, BYE, 200 along the Record-Route) and its timers, in virtual time, on one
//! thread; the time spent inside the node per call is what pinhole's own code costs, apart from the
//! kernel's. Stable to a few percent where the sipp bench is not, so it is the one to
//! steer optimisations of the SIP path by.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pinhole_core::{Node, NodeConfig, Output};
use pinhole_sip::message::{HeaderName, Message};
use pinhole_sip::{Cidr, Flow, Interface, Keepalive, ProxyConfig, RegistrarConfig, Transport};

use crate::bench::arg;

const PROXY: &str = "127.0.0.1:5060";
const CALLER: &str = "127.0.0.1:6001";
const CALLEE: &str = "127.0.0.1:6002";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// The configuration of `cargo xtask bench sip`: trusted loopback, no media, no keepalives.
fn config() -> anyhow::Result<NodeConfig> {
    Ok(NodeConfig {
        proxy: ProxyConfig {
            domain: "bench.test".into(),
            interfaces: vec![Interface { transport: Transport::Udp, bind: addr(PROXY), advertise: "127.0.0.1".into() }],
            realm: "bench.test".into(),
            users: vec![],
            auth_algorithms: vec![pinhole_sip::auth::Algorithm::Md5],
            trusted: vec![Cidr::parse("127.0.0.0/8").ok_or_else(|| anyhow::anyhow!("bad CIDR"))?],
            registrar: RegistrarConfig { default_expires: 3600, min_expires: 60, max_expires: 7200 },
            keepalive: Keepalive::Off,
            keepalive_interval: Duration::from_secs(30),
            keepalive_min: Duration::from_secs(5),
            max_body: 16384,
            max_message: 65535,
            secret: [7; 32],
            punch: Default::default(),
            faketcp_port: None,
            record_users: Vec::new(),
            b2bua: Default::default(),
        },
        relay: None,
        fleet: vec![],
    })
}

struct Driver {
    node: Node,
    now: Instant,
    /// Where the callee is (parsed once: the time of anything but the node is not counted).
    callee: SocketAddr,
    /// Time spent inside the node (wall clock: one thread, no I/O).
    spent: Duration,
    /// What the node sent to the callee and to the caller since the last look.
    to_callee: Vec<Vec<u8>>,
    to_caller: Vec<Vec<u8>>,
}

impl Driver {
    fn input(&mut self, from: &str, text: String) -> anyhow::Result<()> {
        let flow = Flow { transport: Transport::Udp, local: addr(PROXY), remote: addr(from), conn: None };
        let data = Bytes::from(text);
        let t = Instant::now();
        let res = self.node.handle_sip(self.now, flow, data);
        self.spent += t.elapsed();
        res.map_err(|e| anyhow::anyhow!("{e:?}"))?;
        self.drain();
        Ok(())
    }

    fn drain(&mut self) {
        let t = Instant::now();
        loop {
            match self.node.poll_output(self.now) {
                Output::Transmit(t) if t.flow.remote == self.callee => self.to_callee.push(t.payload),
                Output::Transmit(t) => self.to_caller.push(t.payload),
                Output::Timeout(at, _) if at <= self.now => self.node.handle_timeout(self.now),
                Output::Timeout(..) | Output::Idle => break,
                _ => {}
            }
        }
        self.spent += t.elapsed();
    }

    fn tick(&mut self, by: Duration) {
        self.now += by;
        let t = Instant::now();
        self.node.handle_timeout(self.now);
        self.spent += t.elapsed();
        self.drain();
    }

    /// The last request the callee got, parsed.
    fn at_callee(&mut self, what: &str) -> anyhow::Result<Message> {
        let raw = self.to_callee.pop().ok_or_else(|| anyhow::anyhow!("no {what} reached the callee"))?;
        self.to_callee.clear();
        Message::parse(Bytes::from(raw)).map_err(|e| anyhow::anyhow!("{what}: {e:?}"))
    }

    fn caller_got(&mut self, status: &str) -> anyhow::Result<Vec<u8>> {
        let found = self.to_caller.iter().rposition(|m| m.starts_with(format!("SIP/2.0 {status}").as_bytes()));
        let m =
            found.map(|i| self.to_caller.swap_remove(i)).ok_or_else(|| anyhow::anyhow!("caller got no {status}"))?;
        self.to_caller.clear();
        Ok(m)
    }
}

fn call(d: &mut Driver, n: u64) -> anyhow::Result<()> {
    let (c, u) = (CALLER, CALLEE);
    let from = format!("From: <sip:caller@{c}>;tag=uac{n}\r\n");
    let call_id = format!("Call-ID: {n}-bench@127.0.0.1\r\n");
    let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";
    d.input(
        c,
        format!(
            "INVITE sip:bench@{PROXY} SIP/2.0\r\nVia: SIP/2.0/UDP {c};branch=z9hG4bK-{n}-1\r\n{from}To: <sip:bench@{PROXY}>\r\n{call_id}\
             CSeq: 1 INVITE\r\nContact: <sip:caller@{c};transport=UDP>\r\nMax-Forwards: 70\r\nContent-Type: application/sdp\r\n\
             Content-Length: {}\r\n\r\n{sdp}",
            sdp.len()
        ),
    )?;
    d.caller_got("100")?;
    let invite = d.at_callee("INVITE")?;
    let rr: Vec<String> =
        invite.value_texts(HeaderName::RecordRoute).iter().map(|v| format!("Record-Route: {v}")).collect();
    let mut extra = rr.clone();
    extra.push(format!("Contact: <sip:bench@{u};transport=UDP>"));
    for (code, reason) in [(180, "Ringing"), (200, "OK")] {
        let resp = String::from_utf8(invite.response(code, reason, Some(&format!("uas{n}")), &extra))?;
        d.input(u, resp)?;
        d.caller_got(&code.to_string())?;
    }
    // The caller's dialog: Route from the Record-Route in reverse, to the callee's Contact.
    let routes: String = rr.iter().rev().map(|r| r.replacen("Record-Route", "Route", 1) + "\r\n").collect();
    let to = format!("To: <sip:bench@{PROXY}>;tag=uas{n}\r\n");
    for (k, method, cseq) in [(2, "ACK", 1), (3, "BYE", 2)] {
        d.input(
            c,
            format!(
                "{method} sip:bench@{u};transport=UDP SIP/2.0\r\nVia: SIP/2.0/UDP {c};branch=z9hG4bK-{n}-{k}\r\n{routes}{from}{to}\
                 {call_id}CSeq: {cseq} {method}\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
            ),
        )?;
        let req = d.at_callee(method)?;
        if method == "BYE" {
            d.input(u, String::from_utf8(req.response(200, "OK", None, &[]))?)?;
            d.caller_got("200")?;
        }
    }
    Ok(())
}

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        // The code measured is compiled into this binary: measure an optimised one.
        return crate::run(
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(crate::root())
                .args(["run", "--release", "--quiet", "--package", "xtask", "--", "bench", "node"])
                .args(args),
        );
    }
    let calls = u64::from(arg(args, "--calls", 20_000));
    let rounds = arg(args, "--rounds", 5);
    let warm_up = arg(args, "--warm-up", 40);
    let mut best = f64::MAX;
    for round in 0..rounds {
        let start = Instant::now();
        let mut d = Driver {
            node: Node::new(config()?, start, 1_700_000_000, 7),
            now: start,
            callee: addr(CALLEE),
            spent: Duration::ZERO,
            to_callee: vec![],
            to_caller: vec![],
        };
        let register = format!(
            "REGISTER sip:bench.test SIP/2.0\r\nVia: SIP/2.0/UDP {CALLEE};branch=z9hG4bK-reg\r\nFrom: <sip:bench@bench.test>;tag=r\r\n\
             To: <sip:bench@bench.test>\r\nCall-ID: reg@bench\r\nCSeq: 1 REGISTER\r\nContact: <sip:bench@{CALLEE}>\r\n\
             Expires: 3600\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n"
        );
        d.input(CALLEE, register)?;
        let registered = d.to_callee.pop().is_some_and(|m| m.starts_with(b"SIP/2.0 200"));
        anyhow::ensure!(registered, "REGISTER not answered 200");
        // 500 calls/s in virtual time, so transactions end as they would. The first 40 s
        // (`--warm-up`) of calls fill the tables to their steady size (transactions
        // linger 32 s after their final response) and are not measured.
        let warm = u64::from(warm_up) * 500;
        for n in 0..warm + calls {
            if n == warm {
                d.spent = Duration::ZERO;
            }
            d.tick(Duration::from_millis(2));
            call(&mut d, n)?;
        }
        let per_call = d.spent.as_secs_f64() * 1e6 / calls as f64;
        println!("round {round}: {calls} calls, {per_call:.1} µs per call inside the node");
        best = best.min(per_call);
    }
    println!("\nbest of {rounds}: {best:.1} µs per call in the sans-IO node (INVITE…BYE, no sockets)");
    Ok(())
}
