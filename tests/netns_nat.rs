//! Tier 4: a real softphone (baresip) behind the Linux kernel's NAT registers to pinhole on
//! the WAN side, and a sipp caller on the WAN side calls it through pinhole.
//! Needs root (network namespaces); `cargo xtask test` runs it as root.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::netns::{NatKind, NatLab, LAN_HOST, NAT_WAN, WAN_SERVER};
use common::{sipp_dir, tone_wav, wait_for, Bg, TempDir};

#[test]
fn baresip_behind_masquerade_nat_registers_and_answers_a_call_from_the_wan() {
    let dir = TempDir::new("netns");
    let lab = NatLab::new(NatKind::PortRestricted);

    // pinhole on the WAN side. Only the sipp box address is trusted; the phone authenticates.
    let (_pinhole, ph_log) = lab.start_pinhole(dir.path(), &format!(
            "[sip]\nlisten = [\"udp:{WAN_SERVER}:5060\", \"tcp:{WAN_SERVER}:5060\"]\ndomain = \"pinhole.test\"\n\
             [auth]\nrealm = \"pinhole.test\"\nusers = [{{ user = \"alice\", password = \"alice-pw\" }}]\ntrusted = [\"{WAN_SERVER}/32\"]\n\
             [registrar]\nstore = \"{}\"\n[nat]\nkeepalive = \"options\"\nkeepalive_interval = 2\n[metrics]\n",
            dir.path().join("store.json").display()
        ));

    // baresip on the LAN, auto-answering.
    let bdir = dir.path().join("baresip");
    std::fs::create_dir_all(&bdir).expect("dir");
    let wav = bdir.join("tone.wav");
    tone_wav(&wav, 440.0);
    std::fs::write(
        bdir.join("config"),
        format!(
            "poll_method epoll\nsip_listen {LAN_HOST}:5060\nmodule_path /usr/lib/baresip/modules\n\
             module g711.so\nmodule aufile.so\nmodule alsa.so\nmodule_app account.so\n\
             audio_player alsa,null\naudio_alert alsa,null\naudio_source aufile,{}\n",
            wav.display()
        ),
    )
    .expect("config");
    std::fs::write(
        bdir.join("accounts"),
        format!("<sip:alice@{WAN_SERVER}>;auth_pass=alice-pw;regint=60;answermode=auto;audio_codecs=PCMU\n"),
    )
    .expect("accounts");
    let b_log = dir.path().join("baresip.log");
    let _baresip = Bg(Some(
        NatLab::command(&lab.lan, "baresip")
            .arg("-f")
            .arg(&bdir)
            .args(["-t", "60", "-v"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&b_log).expect("log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("baresip must be installed"),
    ));

    // Registered, and from the NAT's public address, not the phone's private one.
    assert!(
        wait_for(&ph_log, "registered", Duration::from_secs(15)),
        "baresip never registered\n{}\n{}",
        std::fs::read_to_string(&ph_log).unwrap_or_default(),
        std::fs::read_to_string(&b_log).unwrap_or_default()
    );
    let log = std::fs::read_to_string(&ph_log).unwrap_or_default();
    let reg_line = log.lines().find(|l| l.contains("registered")).unwrap_or_default().to_owned();
    assert!(reg_line.contains(&format!("{NAT_WAN}:")), "binding is on the NAT mapping: {reg_line}");

    // Keepalive OPTIONS cross the NAT and are answered, so the binding stays.
    std::thread::sleep(Duration::from_secs(5));

    // sipp on the WAN calls alice; baresip answers; sipp hangs up.
    let err = dir.path().join("uac.err");
    let out_file = dir.path().join("uac.out");
    let status = NatLab::command(&lab.wan, "sipp")
        .current_dir(sipp_dir())
        .args([
            "-sf", "uac.xml", "-s", "alice", "-m", "1", "-p", "5070", "-i", WAN_SERVER, "-timeout", "20s", "-nostdin",
        ])
        .args(["-trace_err", "-error_file"])
        .arg(&err)
        .arg(format!("{WAN_SERVER}:5060"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_file).expect("out"))
        .stderr(Stdio::null())
        .status()
        .expect("sipp");
    let sipp_out = std::fs::read_to_string(&out_file).unwrap_or_default();
    assert!(
        status.success(),
        "call through the NAT failed\n{sipp_out}\n{}\n--- pinhole ---\n{}\n--- baresip ---\n{}",
        std::fs::read_to_string(&err).unwrap_or_default(),
        std::fs::read_to_string(&ph_log).unwrap_or_default(),
        std::fs::read_to_string(&b_log).unwrap_or_default()
    );
    // baresip saw the call established and then closed by the BYE.
    assert!(
        wait_for(&b_log, "Call established", Duration::from_secs(5)),
        "{}",
        std::fs::read_to_string(&b_log).unwrap_or_default()
    );
    // libre reports a BYE from the far end as "session closed: Connection reset by peer".
    assert!(
        wait_for(&b_log, "session closed", Duration::from_secs(5)),
        "{}",
        std::fs::read_to_string(&b_log).unwrap_or_default()
    );
    assert!(
        !std::fs::read_to_string(&ph_log).unwrap_or_default().contains("binding expired"),
        "keepalives kept the binding"
    );
}
