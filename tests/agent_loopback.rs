//! `pinhole agent` on loopback between a phone and a real pinhole server: the phone's
//! REGISTER (digest end to end) and a call to it pass through the agent, and the agent
//! answers OPTIONS itself even with the server gone.

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::sip::{answer, header, register, status, with_header, Phone};
use common::{free_port, wait_for, Bg, Pinhole, PinholeOptions, TempDir};

const AGENT_IP: &str = "127.0.0.2";

fn agent_config(server: &str, port: u16, stun: &str) -> String {
    // The server's STUN stands in for a relay's: the agent measures its round trip too.
    format!(
        "[agent]\nserver = \"{server}\"\nstun = \"{stun}\"\nrelays = [\"{stun}\"]\n[sip]\nlisten = [\"udp:{AGENT_IP}:{port}\"]\n\
         [media]\ninterfaces = [{{ name = \"lan\", bind = \"{AGENT_IP}\" }}]\nport_min = 31000\nport_max = 31999\n"
    )
}

fn start_agent(dir: &TempDir, server: &str, port: u16, stun: &str) -> Bg {
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, agent_config(server, port, stun)).expect("config");
    let log = dir.path().join("agent.log");
    let child = Command::new(env!("CARGO_BIN_EXE_pinhole"))
        .args(["agent", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .process_group(0)
        .spawn()
        .expect("pinhole agent");
    let bg = Bg(Some(child));
    assert!(wait_for(&log, "agent listening", Duration::from_secs(10)), "agent did not start");
    bg
}

#[test]
fn a_phone_behind_the_agent_registers_with_its_own_digest_and_receives_calls_through_it() {
    let dir = TempDir::new("agent");
    let stun = format!("127.0.0.1:{}", free_port());
    let extra = format!("[stun]\nlisten = [\"{stun}\"]\n");
    let mut ph = Pinhole::start(&dir, PinholeOptions { trusted: vec![], extra, ..Default::default() });
    let port = free_port();
    let _agent = start_agent(&dir, &ph.sip(), port, &stun);
    // The agent measures its NAT against the server's STUN before reporting it.
    assert!(wait_for(&dir.path().join("agent.log"), "NAT profile", Duration::from_secs(30)), "no NAT profile");
    assert!(
        wait_for(&dir.path().join("agent.log"), &format!("relay round trips rtts={stun}="), Duration::from_secs(10)),
        "no round trip to the relay's STUN measured"
    );
    let agent = format!("{AGENT_IP}:{port}");
    let route = format!("Route: <sip:{agent};lr>\nMax-Forwards: 70");

    // alice's phone names the agent as outbound proxy; the server's challenge comes back
    // through it and her answer passes through untouched.
    let alice = Phone::bind("127.0.0.3");
    let contact = format!("sip:alice@{}", alice.addr());
    let reg = |branch: &str, cseq: u32| {
        register("pinhole.test", "alice", alice.addr(), &contact, branch, cseq).replace("Max-Forwards: 70", &route)
    };
    alice.send(&agent, &reg("ag1", 1));
    let challenge = alice.response().expect("401 through the agent");
    assert_eq!(status(&challenge), Some(401), "{challenge}");
    let creds = answer(&challenge, "alice", "alice-pw", "REGISTER", "sip:pinhole.test", 1);
    alice.send(&agent, &with_header(&reg("ag2", 2), &creds));
    let ok = alice.response().expect("200 through the agent");
    assert_eq!(status(&ok), Some(200), "{ok}");
    assert!(ph.wait_metric("pinhole_registrar_bindings", 1.0, Duration::from_secs(3)));
    // The profile rode on the authenticated REGISTER and is kept with the binding.
    assert!(wait_for(&dir.path().join("store.json"), "\"nat_profile\":\"", Duration::from_secs(3)), "profile stored");
    // So are its round trips to the relays, for the fleet to pick the nearest.
    let rtts = format!("\"relay_rtts\":\"{stun}=");
    assert!(wait_for(&dir.path().join("store.json"), &rtts, Duration::from_secs(3)), "round trips not stored");

    // bob calls alice: the server sends to the agent's flow, the agent to alice's phone.
    let bob = Phone::bind("127.0.0.4");
    let invite = format!(
        "INVITE sip:alice@pinhole.test SIP/2.0\nVia: SIP/2.0/UDP {};branch=z9hG4bKagb1;rport\nMax-Forwards: 70\nTo: <sip:alice@pinhole.test>\nFrom: <sip:bob@pinhole.test>;tag=b1\nCall-ID: agent-call\nCSeq: 1 INVITE\nContact: <sip:bob@{}>\nContent-Length: 0\n\n",
        bob.addr(),
        bob.addr()
    );
    bob.send(&ph.sip(), &invite);
    let challenge = bob.response().expect("407");
    let creds = answer(&challenge, "bob", "bob-pw", "INVITE", "sip:alice@pinhole.test", 1);
    bob.send(
        &ph.sip(),
        &with_header(&invite.replace("z9hG4bKagb1", "z9hG4bKagb2").replace("CSeq: 1", "CSeq: 2"), &creds),
    );
    let got = alice.recv_where(Duration::from_secs(3), |m| m.starts_with("INVITE ")).expect("alice is called");
    assert!(got.starts_with(&format!("INVITE {contact} SIP/2.0")), "{got}");
    assert!(header(&got, "Via").is_some_and(|v| v.contains(&agent)), "the agent's Via on top:\n{got}");
    assert_eq!(header(&got, "Record-Route"), Some(format!("<sip:{agent};lr>").as_str()), "{got}");

    // OPTIONS to the agent itself is answered, even with the server gone.
    ph.kill9();
    let ping = format!(
        "OPTIONS sip:{agent} SIP/2.0\nVia: SIP/2.0/UDP {};branch=z9hG4bKagp\nMax-Forwards: 70\nTo: <sip:{agent}>\nFrom: <sip:alice@pinhole.test>;tag=p\nCall-ID: agent-ping\nCSeq: 1 OPTIONS\nContent-Length: 0\n\n",
        alice.addr()
    );
    alice.send(&agent, &ping);
    assert_eq!(alice.response().and_then(|r| status(&r)), Some(200));
}

#[test]
fn check_config_accepts_an_agent_file_and_names_a_wrong_key() {
    let dir = TempDir::new("agent-cfg");
    let good = dir.path().join("agent.toml");
    std::fs::write(&good, agent_config("203.0.113.10:5060", 5060, "203.0.113.10:3478")).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_pinhole")).arg("check-config").arg(&good).output().expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("agent configuration"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        agent_config("203.0.113.10:5060", 5060, "203.0.113.10:3478").replace("[agent]\n", "[agent]\nsever = 1\n"),
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_pinhole")).arg("check-config").arg(&bad).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml:2:1:") && err.contains("sever"), "{err}");
}

/// A sipp caller that uses the agent as its outbound proxy calls a sipp callee registered
/// on the server; RTP flows caller ↔ agent's LAN relay ↔ server relay ↔ callee and back.
#[test]
fn a_call_through_the_agent_has_its_media_anchored_on_the_agent_and_relayed_both_ways() {
    use common::{media_ports, relay_range, sipp_callee_via, sipp_caller_via};
    let dir = TempDir::new("agent-rtp");
    let stun = format!("127.0.0.1:{}", free_port());
    let ph = Pinhole::start(
        &dir,
        PinholeOptions {
            relay_ports: Some(relay_range()),
            extra: format!("[stun]\nlisten = [\"{stun}\"]\n"),
            ..Default::default()
        },
    );
    let port = free_port();
    let _agent = start_agent(&dir, &ph.sip(), port, &stun);
    let agent = format!("{AGENT_IP}:{port}");
    let mp = media_ports().to_string();
    let _callee = sipp_callee_via(
        &ph.sip(),
        None,
        "ruth",
        free_port(),
        "u1",
        "uas.xml",
        6000,
        &dir.path().join("uas.err"),
        &["-rtp_echo", "-mp", &mp],
    );
    assert!(ph.wait_metric("pinhole_registrar_bindings", 1.0, Duration::from_secs(10)), "callee did not register");
    let mp2 = media_ports().to_string();
    let msgs = dir.path().join("uac.msg");
    let (ok, good, _, text) = sipp_caller_via(
        &ph.sip(),
        Some(&agent),
        "ruth",
        "uac_rtp.xml",
        1,
        "u1",
        &dir.path().join("uac.err"),
        &["-mp", &mp2, "-trace_msg", "-message_file", &msgs.display().to_string()],
    );
    assert!(ok && good == 1, "{text}\n{}", ph.log_text());
    let trace = std::fs::read_to_string(&msgs).unwrap_or_default();
    assert!(trace.contains(&format!("c=IN IP4 {AGENT_IP}")), "the caller's answer names the agent:\n{trace}");
    let packets = ph.metric("pinhole_relay_packets_total").expect("packets counted");
    assert!(packets >= 180.0, "the server relayed {packets} packets: both ways, through the agent");
}
