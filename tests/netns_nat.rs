//! Tier 4: a real softphone (baresip) behind the Linux kernel's NAT registers to pinhole on
//! the WAN side, and a sipp caller on the WAN side calls it through pinhole.
//! Needs root (network namespaces); `cargo xtask test` runs it as root.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::Duration;

use common::netns::{NatKind, NatLab, LAN_HOST, NAT_WAN, WAN_SERVER};
use common::{sipp_dir, tone_wav, wait_for, Bg, TempDir};

#[test]
fn baresip_behind_masquerade_nat_registers_and_answers_a_call_from_the_wan() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("netns");
    let lab = NatLab::new(NatKind::PortRestricted);

    // pinhole on the WAN side. Only the sipp box address is trusted; the phone authenticates.
    let (_pinhole, ph_log) = lab.start_pinhole(dir.path(), &format!(
            "[sip]\nlisten = [\"udp:{WAN_SERVER}:5060\", \"tcp:{WAN_SERVER}:5060\"]\ndomain = \"pinhole.test\"\n\
             [auth]\nrealm = \"pinhole.test\"\nusers = [{{ user = \"alice\", password = \"alice-pw\" }}]\ntrusted = [\"{WAN_SERVER}/32\"]\n\
             [registrar]\nstore = \"{}\"\n[nat]\nkeepalive = \"options\"\nkeepalive_interval = 2\n[metrics]\nlisten = \"127.0.0.1:9090\"\n",
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
            .process_group(0)
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

    // Keepalive OPTIONS (every 2 s here) cross the NAT and baresip answers them.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while lab_metric(&lab.wan, 9090, "pinhole_nat_keepalives_total{result=\"answered\"}").unwrap_or(0.0) < 2.0 {
        assert!(std::time::Instant::now() < deadline, "keepalives were not answered through the NAT");
        std::thread::sleep(Duration::from_millis(200));
    }

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

/// Reads one metric from a pinhole serving /metrics on 127.0.0.1:`port` inside `ns`.
fn lab_metric(ns: &str, port: u16, name: &str) -> Option<f64> {
    let script = format!("exec 3<>/dev/tcp/127.0.0.1/{port}; printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3");
    let out = NatLab::command(ns, "bash").args(["-c", &script]).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(name).filter(|r| r.starts_with(' ')).and_then(|r| r.trim().parse().ok()))
}

/// A phone behind a NAT that drops idle UDP mappings after 20 s (Linux conntrack tuned as
/// cheap routers and CGNATs behave) registers once and stays silent for 70 s. With the
/// default keepalives a call from the WAN still rings it; the same phone behind the same
/// NAT, registered to a pinhole with keepalives off, is unreachable by then — so the NAT
/// really forgets, and the keepalives are what keep the phone.
#[test]
fn phone_behind_a_nat_that_forgets_after_20s_still_rings_after_70s_idle() {
    if !common::netns::have_root() {
        return;
    }
    let dir = TempDir::new("netns-fastnat");
    let lab = NatLab::with_lans(&[NatKind::PortRestricted, NatKind::PortRestricted]);
    for lan in &lab.lans {
        common::netns::ns_exec(
            &lan.nat,
            &[
                "sysctl",
                "-q",
                "net.netfilter.nf_conntrack_udp_timeout=20",
                "net.netfilter.nf_conntrack_udp_timeout_stream=20",
            ],
        );
    }
    let alternate = common::netns::WAN_ALTERNATE;
    let config = |ip: &str, nat: &str, metrics: u16| {
        let trusted: Vec<String> = lab.lans.iter().map(|l| format!("\"{}/32\"", l.nat_wan)).collect();
        format!(
            "[sip]\nlisten = [\"udp:{ip}:5060\"]\ndomain = \"pinhole.test\"\n\
             [auth]\ntrusted = [\"{WAN_SERVER}/32\", \"{alternate}/32\", {}]\n{nat}\n[media]\nmode = \"off\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n",
            trusted.join(", ")
        )
    };
    let (with_dir, without_dir) = (dir.path().join("with"), dir.path().join("without"));
    std::fs::create_dir_all(&with_dir).expect("dir");
    std::fs::create_dir_all(&without_dir).expect("dir");
    // Defaults for [nat]: the point is that they are enough.
    let (_kept, kept_log) = lab.start_pinhole(&with_dir, &config(WAN_SERVER, "", 9090));
    let (_bare, _) = lab.start_pinhole(&without_dir, &config(alternate, "[nat]\nkeepalive = \"off\"", 9091));

    // One sipp phone per LAN: REGISTER once (Expires 300), then silence; pinhole's OPTIONS
    // are answered and an INVITE is answered by the out-of-call scenario.
    let phone = |i: usize, server: &str| {
        let host = lab.lans[i].host.clone();
        Bg(Some(
            NatLab::command(&lab.lans[i].lan, "sipp")
                .current_dir(sipp_dir())
                .args(["-sf", "register_and_answer.xml", "-oocsf", "uas_keepalive.xml", "-s", "alice", "-m", "1"])
                .args(["-d", "200000", "-p", "5060", "-i", &host, "-nostdin", &format!("{server}:5060")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("sipp"),
        ))
    };
    let _p1 = phone(0, WAN_SERVER);
    let _p2 = phone(1, alternate);
    assert!(wait_for(&kept_log, "registered", Duration::from_secs(10)), "phone 1 never registered");
    assert!(
        wait_for(&without_dir.join("pinhole.log"), "registered", Duration::from_secs(10)),
        "phone 2 never registered"
    );

    let idle = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(70)); // the scenario: 70 s of silence from the phones
    let answered = lab_metric(&lab.wan, 9090, "pinhole_nat_keepalives_total{result=\"answered\"}").expect("served");
    let per_minute = 2.0 * answered / idle.elapsed().as_secs_f64() * 60.0;
    eprintln!("keepalive packets per binding per minute (OPTIONS + 200): {per_minute:.1}");
    assert!(answered >= 4.0, "keepalives crossed the NAT and were answered: {answered}");

    let call = |server: &str, port: &str, tag: &str| {
        let out_file = dir.path().join(format!("uac-{tag}.out"));
        let child = NatLab::command(&lab.wan, "sipp")
            .current_dir(sipp_dir())
            .args(["-sf", "uac.xml", "-s", "alice", "-m", "1", "-p", port, "-i", server, "-timeout", "45s", "-nostdin"])
            .arg(format!("{server}:5060"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out_file).expect("out"))
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("sipp");
        (Bg(Some(child)), out_file)
    };
    let (kept_call, kept_out) = call(WAN_SERVER, "5070", "kept");
    let (bare_call, _) = call(alternate, "5071", "bare");
    let kept = kept_call.wait_output(Duration::from_secs(50));
    let bare = bare_call.wait_output(Duration::from_secs(50));
    assert!(
        kept.status.success(),
        "the kept-alive phone did not answer\n{}\n{}",
        std::fs::read_to_string(&kept_out).unwrap_or_default(),
        std::fs::read_to_string(&kept_log).unwrap_or_default()
    );
    assert!(!bare.status.success(), "without keepalives the NAT forgot the phone (or this test proves nothing)");
    assert_eq!(lab_metric(&lab.wan, 9090, "pinhole_nat_keepalives_total{result=\"unanswered\"}"), Some(0.0));
}
