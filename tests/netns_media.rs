//! Tier 4 for the media relay: two unchanged softphones (baresip), each behind its own
//! Linux NAT — one `masquerade`, one `masquerade random` — register to pinhole on the WAN
//! side and call each other. Each plays its own tone and records what it hears; both
//! recordings must hold the other side's tone (a one-way-audio check that can fail).
//! Needs root (network namespaces).

mod common;

use std::time::Duration;

use common::baresip::Phone;
use common::netns::{NatKind, NatLab, WAN_SERVER};
use common::{tone_share, wait_for, wait_until, TempDir};

/// The server on the WAN with its relay, alice and bob as users, and `extra` tables.
fn server_config(extra: &str) -> String {
    format!(
        "[sip]\nlisten = [\"udp:{WAN_SERVER}:5060\"]\ndomain = \"pinhole.test\"\n\
         [auth]\nrealm = \"pinhole.test\"\nusers = [{{ user = \"alice\", password = \"alice-pw\" }}, {{ user = \"bob\", password = \"bob-pw\" }}]\n\
         [registrar]\nstore = \"\"\n[nat]\nkeepalive = \"options\"\nkeepalive_interval = 5\n\
         [media]\nmode = \"relay\"\ninterfaces = [{{ name = \"wan\", bind = \"{WAN_SERVER}\" }}]\nport_min = 30000\nport_max = 30199\n[metrics]\n{extra}"
    )
}

#[test]
fn phones_behind_two_different_nats_hear_each_other_through_the_relay() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("media");
    let lab = NatLab::with_lans(&[NatKind::PortRestricted, NatKind::SymmetricRandom]);
    // Alice's calls are recorded.
    let recordings = dir.path().join("recordings");

    let recording = format!("[recording]\ndir = \"{}\"\nusers = [\"alice\"]\n", recordings.display());
    let (_pinhole, ph_log) = lab.start_pinhole(dir.path(), &server_config(&recording));

    let mut alice = Phone::start(&lab.lans[0].lan, dir.path(), "alice", &lab.lans[0].host, 440.0, None);
    let bob = Phone::start(&lab.lans[1].lan, dir.path(), "bob", &lab.lans[1].host, 660.0, None);
    let registered = |who: &str| {
        wait_for(
            &ph_log,
            &format!(
                "aor={who}@pinhole.test remote={}",
                if who == "alice" { &lab.lans[0].nat_wan } else { &lab.lans[1].nat_wan }
            ),
            Duration::from_secs(15),
        )
    };
    assert!(
        registered("alice") && registered("bob"),
        "registrations\n{}\n{}",
        std::fs::read_to_string(&ph_log).unwrap_or_default(),
        alice.log()
    );

    alice.command(&format!("/dial sip:bob@{WAN_SERVER}"));
    assert!(
        wait_for(&dir.path().join("bob.log"), "Call established", Duration::from_secs(15)),
        "bob never answered\n--- alice ---\n{}\n--- bob ---\n{}\n--- pinhole ---\n{}",
        alice.log(),
        bob.log(),
        std::fs::read_to_string(&ph_log).unwrap_or_default()
    );
    // Let both tones flow until each side has recorded 3 s, then hang up cleanly so the
    // recordings are complete.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while bob.heard().len() < 24_000 || alice.heard().len() < 24_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "recordings did not grow
{}
{}",
            alice.log(),
            bob.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    alice.command("/hangup");
    assert!(wait_for(&dir.path().join("bob.log"), "session closed", Duration::from_secs(10)), "{}", bob.log());
    std::thread::sleep(Duration::from_millis(500));

    let (bob_heard, alice_heard) = (bob.heard(), alice.heard());
    assert!(bob_heard.len() > 8000, "bob recorded {} samples\n{}", bob_heard.len(), bob.log());
    assert!(alice_heard.len() > 8000, "alice recorded {} samples\n{}", alice_heard.len(), alice.log());
    let (b440, a660) = (tone_share(&bob_heard, 440.0), tone_share(&alice_heard, 660.0));
    eprintln!("tone shares: bob hears 440 Hz at {b440:.3}, alice hears 660 Hz at {a660:.3}");
    assert!(b440 > 0.3, "bob does not hear alice's 440 Hz (share {b440:.3})");
    assert!(a660 > 0.3, "alice does not hear bob's 660 Hz (share {a660:.3})");
    // And not their own tone echoed back.
    assert!(tone_share(&bob_heard, 660.0) < 0.05 && tone_share(&alice_heard, 440.0) < 0.05);
    // The relay anchored the call and released it.
    let log = std::fs::read_to_string(&ph_log).unwrap_or_default();
    assert!(log.contains("relay session released"), "{log}");

    // The recording: named by the Call-ID, a pcap of both ways and a stereo WAV with
    // alice (the caller, side A) on the left and bob on the right.
    let wav = |ext: &str| {
        std::fs::read_dir(&recordings)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == ext))
    };
    assert!(wait_until(Duration::from_secs(10), || wav("wav").is_some()), "no WAV in {}\n{log}", recordings.display());
    let (wav, pcap) = (wav("wav").expect("wav"), wav("pcap").expect("pcap"));
    let bytes = std::fs::read(&wav).expect("read wav");
    assert_eq!(u16::from_le_bytes([bytes[22], bytes[23]]), 2, "stereo");
    let frames: Vec<(f64, f64)> = bytes[44..]
        .chunks_exact(4)
        .map(|c| (f64::from(i16::from_le_bytes([c[0], c[1]])), f64::from(i16::from_le_bytes([c[2], c[3]]))))
        .collect();
    let (left, right): (Vec<f64>, Vec<f64>) = frames.into_iter().unzip();
    assert!(left.len() > 16_000, "{} frames", left.len());
    let (l440, r660) = (tone_share(&left, 440.0), tone_share(&right, 660.0));
    eprintln!("recording: left 440 Hz {l440:.3}, right 660 Hz {r660:.3}");
    assert!(l440 > 0.3 && r660 > 0.3, "the channels hold each phone's tone: {l440:.3} {r660:.3}");
    assert!(tone_share(&left, 660.0) < 0.05 && tone_share(&right, 440.0) < 0.05, "and not the other's");
    let call_id = wav.file_stem().and_then(|s| s.to_str()).unwrap_or("").to_owned();
    assert!(
        wait_for(&ph_log, &format!("call media released call_id={call_id} "), Duration::from_secs(5)),
        "the recording is named by the Call-ID pinhole released: {call_id}\n{log}"
    );
    // Every packet both ways: at least the 2 × 150 RTP of three seconds.
    let pcap_len = std::fs::metadata(&pcap).map_or(0, |m| m.len());
    assert!(pcap_len > 300 * (16 + 28 + 172), "the pcap holds {pcap_len} bytes");
}

/// The MOS of each direction in pinhole's release line ("A#0: mos 4.39 loss 0.00% …").
fn released_mos(log: &str) -> Option<[(f64, f64); 2]> {
    let line = log.lines().find(|l| l.contains("call media released"))?;
    let dirs = line.split_once("directions=")?.1;
    let figure = |side: &str| -> Option<(f64, f64)> {
        let d = dirs.split("; ").find(|d| d.starts_with(side))?;
        let word_after = |w: &str| d.split_once(w)?.1.split_whitespace().next()?.trim_end_matches('%').parse().ok();
        Some((word_after("mos ")?, word_after("loss ")?))
    };
    Some([figure("A#")?, figure("B#")?])
}

/// Loss injected where the kernel drops it: alice's NAT box loses a tenth of what she sends
/// to the relay (nftables `numgen`; this machine's kernel has no netem). The relay must see
/// it on her direction only, and score it lower.
#[test]
fn a_lossy_leg_scores_a_lower_mos_than_the_clean_one() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("media-mos");
    let lab = NatLab::with_lans(&[NatKind::PortRestricted, NatKind::PortRestricted]);
    let (_pinhole, ph_log) = lab.start_pinhole(dir.path(), &server_config(""));
    let mut alice = Phone::start(&lab.lans[0].lan, dir.path(), "alice", &lab.lans[0].host, 440.0, None);
    let bob = Phone::start(&lab.lans[1].lan, dir.path(), "bob", &lab.lans[1].host, 660.0, None);
    for (who, lan) in [("alice", &lab.lans[0]), ("bob", &lab.lans[1])] {
        let line = format!("aor={who}@pinhole.test remote={}", lan.nat_wan);
        assert!(wait_for(&ph_log, &line, Duration::from_secs(15)), "{who} never registered");
    }
    common::netns::nft(
        &lab.lans[0].nat,
        &format!(
            "table inet lossy {{\n  counter dropped {{ }}\n  chain lose {{\n    type filter hook forward priority -10;\n    \
             ip daddr {WAN_SERVER} udp dport 30000-30199 numgen random mod 10 == 0 counter name \"dropped\" drop\n  }}\n}}\n"
        ),
    );
    alice.command(&format!("/dial sip:bob@{WAN_SERVER}"));
    assert!(
        wait_for(&dir.path().join("bob.log"), "Call established", Duration::from_secs(15)),
        "bob never answered\n{}\n{}",
        alice.log(),
        bob.log()
    );
    // Six seconds of media: 300 packets each way, about 30 of alice's lost.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while bob.heard().len() < 48_000 || alice.heard().len() < 48_000 {
        assert!(std::time::Instant::now() < deadline, "recordings did not grow\n{}\n{}", alice.log(), bob.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let dropped = common::netns::nft_counter(&lab.lans[0].nat, "lossy", "dropped");
    alice.command("/hangup");
    assert!(wait_for(&ph_log, "call media released", Duration::from_secs(10)), "no release line");
    let log = std::fs::read_to_string(&ph_log).unwrap_or_default();
    let [(a_mos, a_loss), (b_mos, b_loss)] = released_mos(&log).unwrap_or_else(|| panic!("no figures in\n{log}"));
    eprintln!("alice→bob MOS {a_mos} loss {a_loss}%, bob→alice MOS {b_mos} loss {b_loss}% ({dropped} dropped)");
    assert!(dropped > 10, "the NAT box dropped {dropped} packets");
    assert!((4.0..=20.0).contains(&a_loss), "alice's direction lost {a_loss}%");
    assert!(b_loss < 1.0, "bob's direction lost {b_loss}%");
    assert!(a_mos < b_mos - 0.3, "the lossy direction scores {a_mos}, the clean one {b_mos}");
}
