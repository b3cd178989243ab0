//! Browsers as phones (issue 22), with real peers only: headless Chromium (Debian's, driven
//! by playwright-core) runs JsSIP in tests/js/phone.html behind a Linux NAT in a network
//! namespace, registers over `wss:` and calls baresip, a plain RTP phone on the WAN side,
//! and is called by it. pinhole is the browser's ICE-lite and DTLS-SRTP peer and hands
//! baresip plain RTP. Each side plays its own tone (the browser 440 Hz through Chromium's
//! fake microphone, baresip 660 Hz) and each must hear the other's: the page with a
//! WebAudio analyser, baresip in its recording. Needs root (network namespaces).

mod common;

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Stdio};
use std::time::{Duration, Instant};

use common::baresip::Phone;
use common::netns::{NatKind, NatLab, WAN_SERVER};
use common::{repo, self_signed, tone_share, tone_wav, wait_for, Bg, TempDir};

const WSS_PORT: u16 = 8443;

/// JsSIP in Chromium in namespace `ns`, registered as `user`, playing `tone`; its event
/// lines go to `log`, commands to its stdin.
struct Browser {
    _proc: Bg,
    stdin: ChildStdin,
    log: PathBuf,
}

impl Browser {
    fn start(ns: &str, dir: &Path, user: &str, hz: f64) -> Browser {
        Browser::start_at(ns, dir, user, hz, &format!("wss://{WAN_SERVER}:{WSS_PORT}"))
    }

    /// A browser whose SIP goes to WebSocket `url`.
    fn start_at(ns: &str, dir: &Path, user: &str, hz: f64, url: &str) -> Browser {
        let js = repo().join("tests/js");
        assert!(
            js.join("node_modules/jssip").exists() && js.join("node_modules/playwright-core").exists(),
            "JsSIP and playwright-core are not installed: cargo xtask test installs them (npm ci in tests/js)"
        );
        let tone = dir.join(format!("{user}-tone.wav"));
        tone_wav(&tone, hz);
        let log = dir.join(format!("{user}-browser.log"));
        let mut child = NatLab::command(ns, "node")
            .arg(js.join("browser_call.mjs"))
            .args([url, user, "pinhole.test", &format!("{user}-pw")])
            .arg(&tone)
            .current_dir(&js)
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(std::fs::File::create(log.with_extension("err")).expect("log"))
            .process_group(0)
            .spawn()
            .expect("node (package nodejs) must be installed");
        let stdin = child.stdin.take().expect("stdin");
        Browser { _proc: Bg(Some(child)), stdin, log }
    }

    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").expect("browser stdin");
        self.stdin.flush().expect("flush");
    }

    fn text(&self) -> String {
        let err = std::fs::read_to_string(self.log.with_extension("err")).unwrap_or_default();
        format!("{}{err}", std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    fn wait(&self, line: &str, within: Duration) -> bool {
        wait_for(&self.log, line, within)
    }

    /// Waits until the page has heard `hz` (±30 Hz) as the loudest tone, above -70 dB, in
    /// `n` measurements after the first `skip` lines of its log.
    fn hears(&self, hz: f64, n: usize, skip: usize, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let good = text
                .lines()
                .skip(skip)
                .filter_map(|l| l.strip_prefix("PEAK "))
                .filter_map(|v| {
                    let mut it = v.split_whitespace().map(|x| x.parse::<f64>().ok());
                    Some((it.next()??, it.next()??))
                })
                .filter(|(f, db)| (f - hz).abs() <= 30.0 && *db > -70.0)
                .count();
            if good >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn lines(&self) -> usize {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().count()
    }
}

fn lab_pinhole(lab: &NatLab, dir: &Path) -> (Bg, PathBuf) {
    let (cert, key) = self_signed(dir);
    lab.start_pinhole(
        dir,
        &format!(
            "[sip]\nlisten = [\"udp:{WAN_SERVER}:5060\", \"wss:{WAN_SERVER}:{WSS_PORT}\"]\ndomain = \"pinhole.test\"\n\
             [sip.tls]\ncert = \"{}\"\nkey = \"{}\"\n\
             [auth]\nrealm = \"pinhole.test\"\nusers = [{{ user = \"alice\", password = \"alice-pw\" }}, {{ user = \"bob\", password = \"bob-pw\" }}]\n\
             [registrar]\nstore = \"\"\n[nat]\nkeepalive = \"options\"\nkeepalive_interval = 5\n\
             [media]\nmode = \"relay\"\ninterfaces = [{{ name = \"wan\", bind = \"{WAN_SERVER}\" }}]\nport_min = 30000\nport_max = 30199\n[metrics]\n",
            cert.display(),
            key.display()
        ),
    )
}

fn logs(browser: &Browser, bob: &Phone, pinhole: &Path) -> String {
    format!(
        "--- browser ---\n{}\n--- bob ---\n{}\n--- pinhole ---\n{}",
        browser.text(),
        bob.log(),
        std::fs::read_to_string(pinhole).unwrap_or_default()
    )
}

/// The browser (after line `mark` of its log) hears bob's 660 Hz, and bob's recording of
/// the call holds the browser's 440 Hz.
fn both_hear(browser: &Browser, bob: &Phone, mark: usize, logs: impl Fn() -> String) {
    assert!(browser.hears(660.0, 4, mark, Duration::from_secs(20)), "the browser never heard bob\n{}", logs());
    recorded(bob, 2, &logs);
    let share = tone_share(&bob.heard(), 440.0);
    assert!(share > 0.3, "bob does not hear the browser's 440 Hz (share {share:.3})\n{}", logs());
}

/// The browser says `event`, and hears bob's 660 Hz again after line `mark` of its log.
fn sound_goes_on(browser: &Browser, mark: usize, event: &str, logs: impl Fn() -> String) {
    assert!(browser.wait(event, Duration::from_secs(10)), "no {event}\n{}", logs());
    assert!(browser.hears(660.0, 4, mark, Duration::from_secs(15)), "no sound after {event}\n{}", logs());
}

/// Waits until `bob` has recorded `secs` seconds of the current call.
fn recorded(bob: &Phone, secs: usize, what: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while bob.heard().len() < secs * 8000 {
        assert!(Instant::now() < deadline, "bob's recording did not grow\n{}", what());
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_browser_behind_a_nat_and_baresip_call_each_other_hold_resume_and_hang_up_from_each_side() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("webrtc");
    let lab = NatLab::with_lans(&[NatKind::PortRestricted, NatKind::Open]);
    let (_pinhole, ph_log) = lab_pinhole(&lab, dir.path());
    let mut bob = Phone::start(&lab.lans[1].lan, dir.path(), "bob", &lab.lans[1].host, 660.0, None);
    let mut browser = Browser::start(&lab.lans[0].lan, dir.path(), "alice", 440.0);
    let all = |b: &Browser, p: &Phone| logs(b, p, &ph_log);
    assert!(browser.wait("REGISTERED", Duration::from_secs(30)), "{}", all(&browser, &bob));
    assert!(wait_for(&ph_log, "aor=bob@pinhole.test", Duration::from_secs(15)), "{}", all(&browser, &bob));

    // 1. The browser calls baresip; each hears the other.
    browser.send("call sip:bob@pinhole.test");
    assert!(browser.wait("CONFIRMED", Duration::from_secs(20)), "{}", all(&browser, &bob));
    both_hear(&browser, &bob, 0, || all(&browser, &bob));

    // The browser holds and resumes (two re-INVITEs, same ICE and DTLS): sound comes back.
    browser.send("hold");
    assert!(browser.wait("HOLD local", Duration::from_secs(10)), "{}", all(&browser, &bob));
    let mark = browser.lines();
    browser.send("unhold");
    sound_goes_on(&browser, mark, "UNHOLD local", || all(&browser, &bob));
    // An ICE restart: new credentials both ways, the DTLS session and sound go on.
    let mark = browser.lines();
    browser.send("restart");
    sound_goes_on(&browser, mark, "RENEGOTIATED", || all(&browser, &bob));
    // baresip hangs up: the browser's call ends from the remote side.
    bob.command("/hangup");
    assert!(browser.wait("ENDED remote", Duration::from_secs(10)), "{}", all(&browser, &bob));

    // 2. baresip calls the browser, which answers (pinhole offers it WebRTC: actpass, ICE-lite).
    bob.clear_recordings();
    let mark = browser.lines();
    bob.command(&format!("/dial sip:alice@{WAN_SERVER}"));
    assert!(browser.wait("INCOMING bob", Duration::from_secs(15)), "{}", all(&browser, &bob));
    both_hear(&browser, &bob, mark, || all(&browser, &bob));
    // baresip holds and resumes.
    bob.command("x");
    assert!(browser.wait("HOLD remote", Duration::from_secs(10)), "{}", all(&browser, &bob));
    let mark = browser.lines();
    bob.command("X");
    sound_goes_on(&browser, mark, "UNHOLD remote", || all(&browser, &bob));
    // The browser hangs up.
    let closed = bob.log().matches("session closed").count();
    browser.send("hangup");
    let deadline = Instant::now() + Duration::from_secs(10);
    while bob.log().matches("session closed").count() == closed {
        assert!(Instant::now() < deadline, "bob's call did not end\n{}", all(&browser, &bob));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every handshake pinhole made was with the certificate each browser announced.
    let log = std::fs::read_to_string(&ph_log).unwrap_or_default();
    assert!(log.contains("relay session released"), "{log}");
}

#[test]
fn two_browsers_behind_two_nats_call_each_other_through_pinhole_and_hear_each_other() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("webrtc2");
    let lab = NatLab::with_lans(&[NatKind::PortRestricted, NatKind::SymmetricRandom]);
    let (_pinhole, ph_log) = lab_pinhole(&lab, dir.path());
    let mut alice = Browser::start(&lab.lans[0].lan, dir.path(), "alice", 440.0);
    let bob = Browser::start(&lab.lans[1].lan, dir.path(), "bob", 660.0);
    let all = |alice: &Browser| {
        format!(
            "--- alice ---\n{}\n--- bob ---\n{}\n--- pinhole ---\n{}",
            alice.text(),
            bob.text(),
            std::fs::read_to_string(&ph_log).unwrap_or_default()
        )
    };
    assert!(
        alice.wait("REGISTERED", Duration::from_secs(30)) && bob.wait("REGISTERED", Duration::from_secs(30)),
        "{}",
        all(&alice)
    );
    alice.send("call sip:bob@pinhole.test");
    assert!(bob.wait("INCOMING alice", Duration::from_secs(15)), "{}", all(&alice));
    // Each page hears the other's tone: two DTLS-SRTP legs with keys of their own.
    assert!(alice.hears(660.0, 4, 0, Duration::from_secs(20)), "alice never heard bob\n{}", all(&alice));
    assert!(bob.hears(440.0, 4, 0, Duration::from_secs(20)), "bob never heard alice\n{}", all(&alice));
    alice.send("hangup");
    assert!(bob.wait("ENDED remote", Duration::from_secs(10)), "{}", all(&alice));
}

#[test]
fn behind_kamailios_websocket_front_pinhole_is_the_browsers_media_relay_over_ng_with_the_webrtc_flag() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("webrtc-kam");
    let lab = NatLab::with_lans(&[NatKind::PortRestricted, NatKind::Open]);
    // pinhole as a pure media relay, on ng only, as rtpengine would be.
    let (_pinhole, ph_log) = lab.start_pinhole_until(
        dir.path(),
        &format!(
            "[sip]\nlisten = []\ndomain = \"relay.test\"\n[registrar]\nstore = \"\"\n\
             [media]\nmode = \"relay\"\ninterfaces = [{{ name = \"wan\", bind = \"{WAN_SERVER}\" }}]\nport_min = 30000\nport_max = 30199\n\
             [ng]\nlisten = \"127.0.0.1:2223\"\n"
        ),
        "ng control listening",
    );
    let cfg = std::fs::read_to_string(repo().join("config/kamailio/webrtc.cfg"))
        .expect("webrtc.cfg")
        .replace("__UDP__", &format!("udp:{WAN_SERVER}:5060"))
        .replace("__WS__", &format!("tcp:{WAN_SERVER}:8080"))
        .replace("__NG__", "udp:127.0.0.1:2223");
    let cfg_path = dir.path().join("kamailio.cfg");
    std::fs::write(&cfg_path, cfg).expect("cfg");
    let kam_log = dir.path().join("kamailio.log");
    let _kamailio = Bg(Some(
        NatLab::command(&lab.wan, "kamailio")
            .arg("-f")
            .arg(&cfg_path)
            .args(["-DD", "-E", "-m", "64", "-M", "16", "-Y"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&kam_log).expect("log"))
            .process_group(0)
            .spawn()
            .expect("kamailio must be installed"),
    ));
    let mut bob = Phone::start(&lab.lans[1].lan, dir.path(), "bob", &lab.lans[1].host, 660.0, None);
    let mut browser =
        Browser::start_at(&lab.lans[0].lan, dir.path(), "alice", 440.0, &format!("ws://{WAN_SERVER}:8080"));
    let all = |b: &Browser, p: &Phone| {
        format!("{}\n--- kamailio ---\n{}", logs(b, p, &ph_log), std::fs::read_to_string(&kam_log).unwrap_or_default())
    };
    assert!(browser.wait("REGISTERED", Duration::from_secs(30)), "{}", all(&browser, &bob));
    assert!(wait_for(&bob.log, "200 OK", Duration::from_secs(15)), "{}", all(&browser, &bob));

    // The browser calls baresip through Kamailio; pinhole bridges the media.
    browser.send("call sip:bob@pinhole.test");
    assert!(browser.wait("CONFIRMED", Duration::from_secs(20)), "{}", all(&browser, &bob));
    both_hear(&browser, &bob, 0, || all(&browser, &bob));
    browser.send("hangup");
    assert!(wait_for(&bob.log, "session closed", Duration::from_secs(10)), "{}", all(&browser, &bob));

    // And baresip calls the browser: Kamailio's offer to it carries the WebRTC flag.
    bob.clear_recordings();
    let mark = browser.lines();
    bob.command(&format!("/dial sip:alice@{WAN_SERVER}"));
    assert!(browser.wait("INCOMING bob", Duration::from_secs(15)), "{}", all(&browser, &bob));
    both_hear(&browser, &bob, mark, || all(&browser, &bob));
    bob.command("/hangup");
    assert!(browser.wait("ENDED remote", Duration::from_secs(10)), "{}", all(&browser, &bob));
}

#[test]
fn a_softphone_speaking_sdes_srtp_calls_the_browser_and_they_hear_each_other() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("webrtc-sdes");
    let lab = NatLab::with_lans(&[NatKind::PortRestricted, NatKind::Open]);
    let (_pinhole, ph_log) = lab_pinhole(&lab, dir.path());
    // baresip insisting on SDES-SRTP (RTP/SAVP with a=crypto).
    let mut bob = Phone::start_with(
        &lab.lans[1].lan,
        dir.path(),
        "bob",
        &lab.lans[1].host,
        660.0,
        "mediaenc=srtp-mand;",
        "module srtp.so\n",
    );
    let browser = Browser::start(&lab.lans[0].lan, dir.path(), "alice", 440.0);
    let all = |b: &Browser, p: &Phone| logs(b, p, &ph_log);
    assert!(browser.wait("REGISTERED", Duration::from_secs(30)), "{}", all(&browser, &bob));
    assert!(wait_for(&ph_log, "aor=bob@pinhole.test", Duration::from_secs(15)), "{}", all(&browser, &bob));
    bob.command(&format!("/dial sip:alice@{WAN_SERVER}"));
    assert!(browser.wait("INCOMING bob", Duration::from_secs(15)), "{}", all(&browser, &bob));
    // SRTP with SDES keys on bob's leg, DTLS-SRTP on the browser's: pinhole re-keys between.
    both_hear(&browser, &bob, 0, || all(&browser, &bob));
    let log = bob.log();
    assert!(log.contains("SRTP is Enabled"), "bob's call was not SRTP\n{log}");
    assert!(!log.contains("drop incoming RTCP packet on RTP port"), "RTCP went to bob's RTP port\n{log}");
    bob.command("/hangup");
    assert!(browser.wait("ENDED remote", Duration::from_secs(10)), "{}", all(&browser, &bob));
}
