//! Tier 4 for the media relay: two unchanged softphones (baresip), each behind its own
//! Linux NAT — one `masquerade`, one `masquerade random` — register to pinhole on the WAN
//! side and call each other. Each plays its own tone and records what it hears; both
//! recordings must hold the other side's tone (a one-way-audio check that can fail).
//! Needs root (network namespaces).

mod common;

use std::time::Duration;

use common::baresip::Phone;
use common::netns::{NatKind, NatLab, WAN_SERVER};
use common::{tone_share, wait_for, TempDir};

#[test]
fn phones_behind_two_different_nats_hear_each_other_through_the_relay() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("media");
    let lab = NatLab::with_lans(&[NatKind::PortRestricted, NatKind::SymmetricRandom]);

    let (_pinhole, ph_log) = lab.start_pinhole(dir.path(), &format!(
            "[sip]\nlisten = [\"udp:{WAN_SERVER}:5060\"]\ndomain = \"pinhole.test\"\n\
             [auth]\nrealm = \"pinhole.test\"\nusers = [{{ user = \"alice\", password = \"alice-pw\" }}, {{ user = \"bob\", password = \"bob-pw\" }}]\n\
             [registrar]\nstore = \"\"\n[nat]\nkeepalive = \"options\"\nkeepalive_interval = 5\n\
             [media]\nmode = \"relay\"\ninterfaces = [{{ name = \"wan\", bind = \"{WAN_SERVER}\" }}]\nport_min = 30000\nport_max = 30199\n[metrics]\n"
        ));

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
}
