//! baresip as a test phone: its own config directory, a tone file it plays as its
//! microphone, and the decoded audio it heard, recorded by sndfile.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use super::netns::{NatLab, WAN_SERVER};
use super::{tone_wav, wav_samples};

pub struct Phone {
    child: Child,
    pub log: PathBuf,
    recordings: PathBuf,
}

impl Phone {
    /// baresip `name` in `ns`, listening on `host`:5060, playing a tone of `hz`, and when
    /// `outbound` is set using it as its outbound proxy (an agent).
    pub fn start(ns: &str, dir: &Path, name: &str, host: &str, hz: f64, outbound: Option<&str>) -> Phone {
        let account = outbound.map(|o| format!("outbound=\"sip:{o}\";")).unwrap_or_default();
        Phone::start_with(ns, dir, name, host, hz, &account, "")
    }

    /// [`Phone::start`] with `account` added to the account line's parameters (each ending in
    /// `;`) and `config` to its config file (e.g. ICE: `medianat=ice;stunserver=…;` and the
    /// stun, turn and ice modules).
    pub fn start_with(ns: &str, dir: &Path, name: &str, host: &str, hz: f64, account: &str, config: &str) -> Phone {
        let home = dir.join(name);
        let recordings = home.join("rec");
        std::fs::create_dir_all(&recordings).expect("dirs");
        let wav = home.join("tone.wav");
        tone_wav(&wav, hz);
        std::fs::write(
            home.join("config"),
            format!(
                "poll_method epoll\nsip_listen {host}:5060\nmodule_path /usr/lib/baresip/modules\n\
                 module stdio.so\nmodule g711.so\nmodule aufile.so\nmodule alsa.so\nmodule sndfile.so\n\
                 module_app account.so\nmodule_app menu.so\nrtp_ports 10000-10999\n\
                 audio_player alsa,null\naudio_alert alsa,null\naudio_source aufile,{}\nsnd_path {}\n{config}",
                wav.display(),
                recordings.display()
            ),
        )
        .expect("config");
        std::fs::write(
            home.join("accounts"),
            format!(
                "<sip:{name}@{WAN_SERVER}>;{account}auth_pass={name}-pw;regint=60;answermode=auto;audio_codecs=PCMU\n"
            ),
        )
        .expect("accounts");
        let log = dir.join(format!("{name}.log"));
        let child = NatLab::command(ns, "baresip")
            .arg("-f")
            .arg(&home)
            .args(["-t", "60"])
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&log).expect("log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("baresip must be installed");
        Phone { child, log, recordings }
    }

    /// UDP datagrams received so far in the phone's network namespace (RFC 4113
    /// udpInDatagrams, from /proc/PID/net/snmp): during a call, mostly its RTP.
    pub fn udp_received(&self) -> Option<u64> {
        let snmp = std::fs::read_to_string(format!("/proc/{}/net/snmp", self.child.id())).ok()?;
        let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
        let (names, values) = (udp.next()?, udp.next()?);
        let i = names.split_whitespace().position(|w| w == "InDatagrams")?;
        values.split_whitespace().nth(i)?.parse().ok()
    }

    pub fn command(&mut self, cmd: &str) {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = stdin.write_all(format!("{cmd}\n").as_bytes());
            let _ = stdin.flush();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Forgets what was recorded, before a new call (sndfile writes a file per call).
    pub fn clear_recordings(&self) {
        let _ = std::fs::remove_dir_all(&self.recordings);
        std::fs::create_dir_all(&self.recordings).expect("recordings");
    }

    /// The decoded audio this phone received (sndfile's dump-…-dec.wav).
    pub fn heard(&self) -> Vec<f64> {
        let file = std::fs::read_dir(&self.recordings)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with("-dec.wav"));
        file.map(|f| wav_samples(&f)).unwrap_or_default()
    }
}

impl Drop for Phone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
