//! Trunk mode with real peers on loopback: sipp as the phone (127.0.0.2) and as carriers
//! (127.0.0.3, 127.0.0.4), pinhole's B2BUA on 127.0.0.1 between them, media anchored on its
//! relay.

mod common;

use std::net::UdpSocket;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// pinhole with a relay and the trunks given (TOML of `[[trunk]]` tables), routing
/// 1555xxxxxxx to them in order.
fn trunk_pinhole(dir: &TempDir, trunks: &str, route: &str) -> Pinhole {
    trunk_pinhole_with(dir, trunks, route, "")
}

/// As [`trunk_pinhole`], with extra lines for the [media] table.
fn trunk_pinhole_with(dir: &TempDir, trunks: &str, route: &str, media_extra: &str) -> Pinhole {
    let cdr = dir.path().join("calls.jsonl");
    let extra = format!(
        "{trunks}\n[[route]]\nmatch = \"^\\\\+?1?555\\\\d{{7}}$\"\ntrunks = [{route}]\n[cdr]\npath = \"{}\"\n",
        cdr.display()
    );
    let media_extra = media_extra.to_owned();
    Pinhole::start(dir, PinholeOptions { relay_ports: Some(relay_range()), extra, media_extra, ..Default::default() })
}

/// The call records written so far, once there are `count` of them (within 5 s).
fn records(dir: &TempDir, count: usize) -> Vec<serde_json::Value> {
    let path = dir.path().join("calls.jsonl");
    let read = || -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        text.lines().map(|l| serde_json::from_str(l).expect("each record is a JSON line")).collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while read().len() < count && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    read()
}

fn trunk(name: &str, ip: &str, port: u16, max_calls: u32) -> String {
    format!(
        "[[trunk]]\nname = \"{name}\"\naddress = \"udp:{ip}:{port}\"\nusername = \"acct1\"\npassword = \"trunk-secret\"\nmax_calls = {max_calls}\n"
    )
}

/// A sipp carrier answering one call with `scenario` on `ip:port` (echoing RTP).
fn carrier(dir: &Path, scenario: &str, ip: &str, port: u16) -> Bg {
    let mp = media_ports().to_string();
    let port = port.to_string();
    let err = dir.join(format!("carrier-{ip}.err"));
    let mut c = sipp_command(
        &[
            "-sf",
            scenario,
            "-i",
            ip,
            "-p",
            &port,
            "-m",
            "1",
            "-au",
            "acct1",
            "-ap",
            "trunk-secret",
            "-rtp_echo",
            "-mp",
            &mp,
            "-trace_err",
            "-trace_msg",
            "-message_file",
            &err.with_extension("msg").to_string_lossy(),
            "-error_file",
        ],
        &err.with_extension("out"),
    );
    c.arg(&err);
    use std::os::unix::process::CommandExt;
    Bg(Some(c.process_group(0).spawn().expect("sipp (package sip-tester) must be installed")))
}

/// The phone (sipp on 127.0.0.2) calls `number` once; returns (ok, output).
fn phone_calls(dir: &Path, ph: &Pinhole, number: &str) -> (bool, String) {
    sipp_calls(dir, ph, "trunk_phone.xml", "127.0.0.2", "phonecall", number)
}

/// sipp on `ip` runs `scenario` once against pinhole for `number`, its Call-IDs starting
/// with `cid`; returns (ok, output).
fn sipp_calls(dir: &Path, ph: &Pinhole, scenario: &str, ip: &str, cid: &str, number: &str) -> (bool, String) {
    let mp = media_ports().to_string();
    let port = free_port().to_string();
    let err = dir.join(format!("{cid}.err"));
    let cid_str = format!("{cid}-%u-%p@%s");
    let messages = err.with_extension("msg").to_string_lossy().into_owned();
    #[rustfmt::skip]
    let args = [
        "-sf", scenario, "-s", number, "-i", ip, "-p", &port, "-m", "1", "-mp", &mp, "-timeout", "150s",
        "-cid_str", &cid_str, "-trace_msg", "-message_file", &messages, "-trace_err", "-error_file",
    ];
    let mut c = sipp_command(&args, &err.with_extension("out"));
    c.arg(&err).arg(ph.sip());
    use std::os::unix::process::CommandExt;
    let out = Bg(Some(c.process_group(0).spawn().expect("sipp"))).wait_output(Duration::from_secs(150));
    let text = std::fs::read_to_string(err.with_extension("out")).unwrap_or_default();
    let errors = std::fs::read_to_string(&err).unwrap_or_default();
    (out.status.success(), format!("{text}\n--- errors ---\n{errors}"))
}

fn carrier_done(c: Bg, dir: &Path, ip: &str) -> (bool, String) {
    let out = c.wait_output(Duration::from_secs(15));
    let err = dir.join(format!("carrier-{ip}.err"));
    let text = std::fs::read_to_string(err.with_extension("out")).unwrap_or_default();
    let errors = std::fs::read_to_string(&err).unwrap_or_default();
    (out.status.success(), format!("{text}\n--- errors ---\n{errors}"))
}

#[test]
fn an_outbound_call_is_challenged_answered_and_hidden_with_audio_anchored_both_ways() {
    let dir = TempDir::new("trunk-out");
    let port = free_port();
    let ph = trunk_pinhole(&dir, &trunk("carrier1", "127.0.0.3", port, 10), "\"carrier1\"");
    let c = carrier(dir.path(), "trunk_carrier.xml", "127.0.0.3", port);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, text) = phone_calls(dir.path(), &ph, "15551230001");
    assert!(ok, "the phone's call failed: {text}\n{}\n{}", ph.log_text(), ph.metrics().unwrap_or_default());
    let (ok, ctext) = carrier_done(c, dir.path(), "127.0.0.3");
    assert!(ok, "the carrier saw something it should not (or bad credentials): {ctext}\n{}", ph.log_text());
    // g711a.pcap holds 100+ packets; the echo doubles them. One direction alone cannot pass.
    let packets = ph.metric("pinhole_relay_packets_total").expect("packets counted");
    assert!(packets >= 180.0, "relayed {packets} packets");
    assert!(ph.wait_metric("pinhole_relay_sessions", 0.0, Duration::from_secs(5)), "session released");
    assert_eq!(ph.metric("pinhole_b2bua_calls{trunk=\"carrier1\"}"), Some(0.0));
    assert_eq!(ph.metric("pinhole_b2bua_calls_total{outcome=\"answered\"}"), Some(1.0));
    assert_eq!(ph.metric("pinhole_b2bua_challenges_answered_total"), Some(1.0));
    let r = records(&dir, 1);
    assert_eq!(r.len(), 1, "one call, one record: {r:?}");
    assert_eq!(
        (r[0]["trunk"].as_str(), r[0]["code"].as_u64(), r[0]["hangup"].as_str()),
        (Some("carrier1"), Some(200), Some("caller"))
    );
    assert_eq!((r[0]["caller"].as_str(), r[0]["callee"].as_str()), (Some("alice"), Some("15551230001")));
    assert!(r[0]["a_call_id"].as_str().is_some_and(|c| c.starts_with("phonecall-")), "{r:?}");
    assert!(r[0]["b_call_id"] != r[0]["a_call_id"]);
    assert!(r[0]["packets"].as_u64().is_some_and(|p| p >= 180), "{r:?}");
    assert!(
        r[0]["answer_ms"].as_u64() <= r[0]["end_ms"].as_u64()
            && r[0]["start_ms"].as_u64() <= r[0]["answer_ms"].as_u64()
    );
}

#[test]
fn a_carrier_503_fails_over_to_the_second_trunk_and_the_call_completes() {
    let dir = TempDir::new("trunk-failover");
    let (p1, p2) = (free_port(), free_port());
    let trunks = trunk("carrier1", "127.0.0.3", p1, 10) + &trunk("carrier2", "127.0.0.4", p2, 10);
    let ph = trunk_pinhole(&dir, &trunks, "\"carrier1\", \"carrier2\"");
    let c1 = carrier(dir.path(), "trunk_503.xml", "127.0.0.3", p1);
    let c2 = carrier(dir.path(), "trunk_carrier_401.xml", "127.0.0.4", p2);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, text) = phone_calls(dir.path(), &ph, "15551230002");
    assert!(ok, "the call did not complete on the second trunk: {text}\n{}", ph.log_text());
    let (ok1, t1) = carrier_done(c1, dir.path(), "127.0.0.3");
    assert!(ok1, "the first carrier got its INVITE and the ACK of its 503: {t1}");
    let (ok2, t2) = carrier_done(c2, dir.path(), "127.0.0.4");
    assert!(ok2, "{t2}");
    assert_eq!(ph.metric("pinhole_b2bua_failovers_total"), Some(1.0));
    let r = records(&dir, 1);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!((r[0]["trunk"].as_str(), r[0]["code"].as_u64()), (Some("carrier2"), Some(200)), "{r:?}");
}

#[test]
fn the_call_over_a_trunks_max_calls_gets_503() {
    let dir = TempDir::new("trunk-limit");
    // A carrier that never answers: two calls ring there, the third is refused.
    let carrier = UdpSocket::bind("127.0.0.3:0").expect("bind");
    let port = carrier.local_addr().expect("addr").port();
    let ph = trunk_pinhole(&dir, &trunk("carrier1", "127.0.0.3", port, 2), "\"carrier1\"");
    let phone = common::sip::Phone::bind("127.0.0.2");
    let invite = |n: u32| {
        format!(
            "INVITE sip:1555123000{n}@pinhole.test SIP/2.0\r\nVia: SIP/2.0/UDP {};branch=z9hG4bKlim{n}\r\nMax-Forwards: 70\r\nFrom: <sip:alice@pinhole.test>;tag=l{n}\r\nTo: <sip:1555123000{n}@pinhole.test>\r\nCall-ID: limit-{n}\r\nCSeq: 1 INVITE\r\nContact: <sip:alice@{}>\r\nContent-Length: 0\r\n\r\n",
            phone.addr(),
            phone.addr()
        )
    };
    carrier.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let mut buf = [0u8; 4096];
    for n in 1..=2 {
        phone.send(&ph.sip(), &invite(n));
        let (len, _) = carrier.recv_from(&mut buf).expect("the carrier gets the call");
        assert!(buf[..len].starts_with(b"INVITE "));
    }
    phone.send(&ph.sip(), &invite(3));
    let refused = phone.recv_where(Duration::from_secs(3), |m| m.starts_with("SIP/2.0 503"));
    assert!(refused.is_some_and(|r| r.contains("Trunks Busy")), "{}", ph.log_text());
    assert_eq!(ph.metric("pinhole_b2bua_calls{trunk=\"carrier1\"}"), Some(2.0));
    assert_eq!(ph.metric("pinhole_b2bua_calls_total{outcome=\"limited\"}"), Some(1.0));
    let r = records(&dir, 1);
    assert_eq!(r.len(), 1, "only the refused call has ended: {r:?}");
    assert_eq!((r[0]["a_call_id"].as_str(), r[0]["code"].as_u64()), (Some("limit-3"), Some(503)));
}

#[test]
fn pinhole_registers_to_the_carrier_after_a_503_answers_its_401_and_refreshes_before_expiry() {
    let dir = TempDir::new("trunk-register");
    let port = free_port();
    let registrar = carrier(dir.path(), "trunk_registrar.xml", "127.0.0.3", port);
    std::thread::sleep(Duration::from_millis(300));
    let start = std::time::Instant::now();
    let t = trunk("carrier1", "127.0.0.3", port, 10) + "register = true\nregister_expires = 10\noptions_interval = 0\n";
    let ph = trunk_pinhole(&dir, &t, "\"carrier1\"");
    assert!(
        ph.wait_metric("pinhole_trunk_registered{trunk=\"carrier1\"}", 1.0, Duration::from_secs(10)),
        "not registered after the 503's backoff and the 401\n{}",
        ph.log_text()
    );
    let (ok, text) = carrier_done(registrar, dir.path(), "127.0.0.3");
    let took = start.elapsed();
    assert!(ok, "the registrar scenario failed: {text}\n{}", ph.log_text());
    // 2 s of backoff after the 503, then the refresh at 80 % of the 10 s granted.
    assert!(took >= Duration::from_secs(9) && took < Duration::from_secs(14), "refresh after {took:?}");
    assert!(ph.log_text().contains("trunk registration failed"), "the 503 was logged");
    assert_eq!(ph.metric("pinhole_trunk_registered{trunk=\"carrier1\"}"), Some(1.0));
}

#[test]
fn a_carrier_calls_a_did_and_the_mapped_phone_answers_with_the_topology_hidden_both_ways() {
    let dir = TempDir::new("trunk-in");
    let t =
        trunk("carrier1", "127.0.0.3", free_port(), 10) + "dids = [{ number = \"15551230001\", user = \"alice\" }]\n";
    let ph = trunk_pinhole(&dir, &t, "\"carrier1\"");
    let mp = media_ports().to_string();
    let phone_err = dir.path().join("alice.err");
    let phone = sipp_callee_via(
        &ph.sip(),
        None,
        "alice",
        free_port(),
        "u1",
        "trunk_answer.xml",
        10_000,
        &phone_err,
        &["-rtp_echo", "-mp", &mp],
    );
    assert!(ph.wait_metric("pinhole_registrar_bindings", 1.0, Duration::from_secs(10)), "alice did not register");
    let (ok, text) = sipp_calls(dir.path(), &ph, "trunk_carrier_call.xml", "127.0.0.3", "carriercall", "15551230001");
    assert!(ok, "the carrier's call failed: {text}\n{}", ph.log_text());
    drop(phone);
    let phone_errors = std::fs::read_to_string(&phone_err).unwrap_or_default();
    assert!(
        !phone_errors.contains("Aborting") && !phone_errors.contains("ereg"),
        "the phone saw the carrier: {phone_errors}"
    );
    assert!(ph.metric("pinhole_relay_packets_total").is_some_and(|p| p >= 180.0), "audio both ways");
    assert!(ph.wait_metric("pinhole_relay_sessions", 0.0, Duration::from_secs(5)));
    let r = records(&dir, 1);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(
        (r[0]["trunk"].as_str(), r[0]["callee"].as_str(), r[0]["code"].as_u64()),
        (Some("carrier1"), Some("15551230001"), Some(200))
    );
    assert_eq!((r[0]["caller"].as_str(), r[0]["hangup"].as_str()), (Some("+14155550100"), Some("caller")));
}

#[test]
fn a_cancel_crossing_the_carriers_200_ends_with_a_bye_and_leaves_nothing_behind() {
    let dir = TempDir::new("trunk-race");
    let port = free_port();
    let ph = trunk_pinhole(&dir, &trunk("carrier1", "127.0.0.3", port, 10), "\"carrier1\"");
    let c = carrier(dir.path(), "trunk_carrier_cancel_race.xml", "127.0.0.3", port);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, text) = sipp_calls(dir.path(), &ph, "uac_cancel.xml", "127.0.0.2", "phonecall", "15551230003");
    assert!(ok, "the phone's CANCEL did not end with 487: {text}\n{}", ph.log_text());
    let (ok, ctext) = carrier_done(c, dir.path(), "127.0.0.3");
    assert!(ok, "the carrier's answer was not acknowledged and hung up: {ctext}\n{}", ph.log_text());
    assert!(ph.wait_metric("pinhole_relay_sessions", 0.0, Duration::from_secs(5)));
    assert_eq!(ph.metric("pinhole_b2bua_calls{trunk=\"carrier1\"}"), Some(0.0));
    assert_eq!(ph.metric("pinhole_b2bua_calls_total{outcome=\"cancelled\"}"), Some(1.0));
    let r = records(&dir, 1);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!((r[0]["code"].as_u64(), r[0]["hangup"].as_str()), (Some(487), Some("caller")));
}

#[test]
fn a_carrier_that_vanishes_mid_call_is_cleared_by_the_session_timer() {
    let dir = TempDir::new("trunk-vanish");
    let port = free_port();
    // The relay's own media timeout is put out of the way: the session timer must act.
    let ph = trunk_pinhole_with(&dir, &trunk("carrier1", "127.0.0.3", port, 10), "\"carrier1\"", "timeout = 600");
    let c = carrier(dir.path(), "trunk_carrier_vanish.xml", "127.0.0.3", port);
    std::thread::sleep(Duration::from_millis(300));
    // The refresh at 45 s goes unanswered (Timer B, 32 s): the phone gets a BYE at ~77 s.
    let (ok, text) = sipp_calls(dir.path(), &ph, "trunk_phone_until_bye.xml", "127.0.0.2", "phonecall", "15551230004");
    assert!(ok, "the phone was not hung up on: {text}\n{}", ph.log_text());
    let (ok, ctext) = carrier_done(c, dir.path(), "127.0.0.3");
    assert!(ok, "{ctext}");
    assert!(ph.wait_metric("pinhole_relay_sessions", 0.0, Duration::from_secs(5)));
    assert_eq!(ph.metric("pinhole_b2bua_calls{trunk=\"carrier1\"}"), Some(0.0));
    let r = records(&dir, 1);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!((r[0]["code"].as_u64(), r[0]["hangup"].as_str()), (Some(200), Some("session-timer")));
    assert!(r[0]["end_ms"].as_u64().zip(r[0]["answer_ms"].as_u64()).is_some_and(|(e, a)| e - a >= 70_000), "{r:?}");
}

/// sngrep listening for HEP on 127.0.0.1:`port`, writing what it receives to `pcap`; ready
/// once its socket is bound.
fn sngrep_hep(dir: &Path, port: u16, pcap: &Path) -> Bg {
    use std::os::unix::process::CommandExt;
    let listen = format!("udp:127.0.0.1:{port}");
    let child = std::process::Command::new("sngrep")
        .args(["-N", "-q", "-F", "-L", &listen, "-O"])
        .arg(pcap)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("sngrep.err")).expect("sngrep log"))
        .process_group(0)
        .spawn()
        .expect("sngrep (package sngrep) must be installed");
    let bound = || {
        let hex = format!(":{port:04X} ");
        std::fs::read_to_string("/proc/net/udp").is_ok_and(|t| t.lines().any(|l| l.contains(&hex)))
    };
    assert!(wait_until(Duration::from_secs(5), bound), "sngrep never bound its HEP socket");
    Bg(Some(child))
}

/// The SIP messages in a pcap (as sngrep writes them): (start line, Call-ID, CSeq).
fn pcap_messages(path: &Path) -> Vec<(String, String, String)> {
    let b = std::fs::read(path).unwrap_or_default();
    if b.len() < 24 {
        return Vec::new();
    }
    let le = b[..4] == [0xd4, 0xc3, 0xb2, 0xa1];
    let u32_at = |i: usize| {
        let w = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(w)
        } else {
            u32::from_be_bytes(w)
        }
    };
    let link_skip = match u32_at(20) {
        1 => 14,
        113 => 16,
        276 => 20,
        _ => 0,
    };
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= b.len() {
        let len = u32_at(at + 8) as usize;
        let Some(frame) = b.get(at + 16..at + 16 + len) else { break };
        at += 16 + len;
        let Some(ip) = frame.get(link_skip..) else { continue };
        let payload = match ip.first().map(|v| v >> 4) {
            Some(4) => {
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                let l4 =
                    if ip.get(9) == Some(&6) { ip.get(ihl + 12).map_or(20, |o| usize::from(o >> 4) * 4) } else { 8 };
                ip.get(ihl + l4..)
            }
            _ => None,
        };
        if let Some(text) = payload.map(String::from_utf8_lossy) {
            out.push(sip_key(&text));
        }
    }
    out
}

/// A SIP message's start line, Call-ID and CSeq.
fn sip_key(text: &str) -> (String, String, String) {
    let header = |name: &str| {
        text.lines()
            .take_while(|l| !l.trim().is_empty())
            .find_map(|l| l.split_once(':').filter(|(n, _)| n.trim().eq_ignore_ascii_case(name)).map(|(_, v)| v))
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    (text.lines().next().unwrap_or("").trim().to_owned(), header("Call-ID"), header("CSeq"))
}

/// Every SIP message in a sipp message trace (`-trace_msg`), sent or received.
fn traced_messages(path: &Path) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split("----------------------------------------------- ")
        .filter_map(|block| {
            let (_, msg) = block.split_once("\n\n")?;
            let msg = msg.trim_start();
            msg.starts_with(|c: char| c.is_ascii_uppercase()).then(|| sip_key(msg))
        })
        .collect()
}

#[test]
fn every_sip_message_of_a_trunk_call_reaches_a_homer_receiver_over_hep_on_both_legs() {
    let dir = TempDir::new("trunk-hep");
    let (hep_port, port) = (free_port(), free_port());
    let pcap = dir.path().join("hep.pcap");
    let sngrep = sngrep_hep(dir.path(), hep_port, &pcap);
    let hep = format!("[hep]\naddress = \"udp:127.0.0.1:{hep_port}\"\ncapture_id = 2001\n");
    let ph = trunk_pinhole(&dir, &format!("{}{hep}", trunk("carrier1", "127.0.0.3", port, 10)), "\"carrier1\"");
    let c = carrier(dir.path(), "trunk_carrier.xml", "127.0.0.3", port);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, text) = phone_calls(dir.path(), &ph, "15551230001");
    assert!(ok, "the phone's call failed: {text}\n{}", ph.log_text());
    let (ok, ctext) = carrier_done(c, dir.path(), "127.0.0.3");
    assert!(ok, "the carrier: {ctext}\n{}", ph.log_text());
    // A SIP message on the wire that pinhole never took: the capture must not hold it (it
    // holds only what came over HEP).
    let wire = UdpSocket::bind("127.0.0.2:0").expect("bind");
    let stray = "OPTIONS sip:x@127.0.0.9 SIP/2.0\r\nCall-ID: not-through-pinhole\r\nCSeq: 1 OPTIONS\r\n\r\n";
    wire.send_to(stray.as_bytes(), ("127.0.0.9", port)).expect("send");

    let phone = traced_messages(&dir.path().join("phonecall.msg"));
    let carrier = traced_messages(&dir.path().join("carrier-127.0.0.3.msg"));
    assert!(phone.len() >= 6 && carrier.len() >= 6, "sipp traced {} and {} messages", phone.len(), carrier.len());
    assert!(
        carrier.iter().all(|m| !phone.iter().any(|p| p.1 == m.1)),
        "the legs have Call-IDs of their own (topology hidden)"
    );
    let want: Vec<_> = phone.iter().chain(&carrier).collect();
    let holds_all = || {
        let got = pcap_messages(&pcap);
        want.iter().all(|m| got.contains(m))
    };
    let all = wait_until(Duration::from_secs(5), holds_all);
    let got = pcap_messages(&pcap);
    let missing: Vec<_> = want.iter().filter(|m| !got.contains(m)).collect();
    assert!(all, "the capture lacks {missing:?}\ncapture: {got:?}\n{}", ph.log_text());
    assert!(!got.iter().any(|m| m.1 == "not-through-pinhole"), "the capture holds wire traffic: {got:?}");
    // pinhole counted what it sent, including the call's quality report (not SIP, so
    // sngrep keeps no copy of it), and dropped nothing.
    let sent = ph.metric("pinhole_hep_sent_total").unwrap_or(0.0);
    assert!(sent > want.len() as f64, "sent {sent} for {} messages", want.len());
    assert_eq!(ph.metric("pinhole_hep_dropped_total{reason=\"queue_full\"}"), Some(0.0));
    drop(sngrep);
    // The call's quality went to its record and the log.
    let r = records(&dir, 1);
    assert!(r[0]["mos"].as_f64().is_some_and(|m| (3.0..=4.5).contains(&m)), "{r:?}");
    assert!(ph.log_text().contains("call media released"), "{}", ph.log_text());

    // The Grafana dashboard names only metrics this server serves (histograms by their
    // series), all of them read.
    let text = std::fs::read_to_string(repo().join("grafana/pinhole.json")).expect("grafana/pinhole.json");
    let _: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut names: Vec<&str> = text
        .match_indices("pinhole_")
        .map(|(i, _)| {
            let end = text[i..].find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
            &text[i..i + end.unwrap_or(text.len() - i)]
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() >= 15, "the dashboard's metrics: {names:?}");
    // A request the proxy answers itself, so its response counters are served too.
    let me = wire.local_addr().expect("addr");
    let options = format!(
        "OPTIONS sip:pinhole.test SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKdash1\r\nMax-Forwards: 70\r\nTo: <sip:pinhole.test>\r\nFrom: <sip:x@{me}>;tag=d1\r\nCall-ID: dashboard-1\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
    );
    wire.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    wire.send_to(options.as_bytes(), ph.sip()).expect("send");
    assert!(wire.recv_from(&mut [0u8; 4096]).is_ok(), "OPTIONS unanswered");
    let served = ph.metrics().expect("metrics");
    let missing: Vec<_> = names
        .iter()
        .filter(|n| !served.lines().any(|l| l.strip_prefix(**n).is_some_and(|rest| rest.starts_with(['{', ' ']))))
        .collect();
    assert!(missing.is_empty(), "the dashboard names metrics pinhole does not serve: {missing:?}");
}
