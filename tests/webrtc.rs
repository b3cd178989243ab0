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
            .args([&format!("wss://{WAN_SERVER}:{WSS_PORT}"), user, "pinhole.test", &format!("{user}-pw")])
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

#[test]
fn a_browser_behind_a_nat_and_baresip_call_each_other_and_hear_each_other() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("webrtc");
    let lab = NatLab::with_lans(&[NatKind::PortRestricted, NatKind::Open]);
    let (_pinhole, ph_log) = lab_pinhole(&lab, dir.path());
    let bob = Phone::start(&lab.lans[1].lan, dir.path(), "bob", &lab.lans[1].host, 660.0, None);
    let mut browser = Browser::start(&lab.lans[0].lan, dir.path(), "alice", 440.0);
    assert!(browser.wait("REGISTERED", Duration::from_secs(30)), "{}", logs(&browser, &bob, &ph_log));
    assert!(
        wait_for(&ph_log, "aor=bob@pinhole.test", Duration::from_secs(15)),
        "{}",
        logs(&browser, &bob, &ph_log)
    );

    // The browser calls baresip.
    browser.send("call sip:bob@pinhole.test");
    assert!(browser.wait("CONFIRMED", Duration::from_secs(20)), "{}", logs(&browser, &bob, &ph_log));
    assert!(browser.hears(660.0, 4, 0, Duration::from_secs(20)), "the browser never heard bob\n{}", logs(&browser, &bob, &ph_log));
    let deadline = Instant::now() + Duration::from_secs(20);
    while bob.heard().len() < 16_000 {
        assert!(Instant::now() < deadline, "bob's recording did not grow\n{}", logs(&browser, &bob, &ph_log));
        std::thread::sleep(Duration::from_millis(200));
    }
    browser.send("hangup");
    assert!(wait_for(&bob.log, "session closed", Duration::from_secs(10)), "{}", logs(&browser, &bob, &ph_log));
    let heard = bob.heard();
    let share = tone_share(&heard, 440.0);
    eprintln!("bob hears the browser's 440 Hz at {share:.3}");
    assert!(share > 0.3, "bob does not hear the browser's 440 Hz (share {share:.3})");
}
