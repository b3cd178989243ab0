//! Tier 4 for punching: the NAT-pair matrix. In each cell two unchanged softphones
//! (baresip), each on its own LAN behind its own Linux NAT box and next to a `pinhole
//! agent` it uses as outbound proxy, register to the pinhole server on the WAN and call
//! each other. Each plays its own tone and must hear the other's. "Direct" is proven on the
//! NAT boxes themselves: nftables counters on each box's forward path count the UDP going
//! straight to the other NAT's public address and the UDP going to the server; a direct
//! cell must keep sending straight to the peer at media rate until the call ends.
//! Needs root (network namespaces).

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::baresip::Phone;
use common::netns::{nft, nft_counter, ns_exec, Lan, NatKind, NatLab, WAN_ALTERNATE, WAN_SERVER};
use common::{tone_share, wait_for, wait_until, Bg, TempDir};
use std::os::unix::process::CommandExt;

const AGENT_PORT: u16 = 5070;

fn server_config(extra: &str) -> String {
    format!(
        "[sip]\nlisten = [\"udp:{WAN_SERVER}:5060\", \"tcp:{WAN_SERVER}:5060\"]\ndomain = \"pinhole.test\"\n\
         [auth]\nrealm = \"pinhole.test\"\nusers = [{{ user = \"alice\", password = \"alice-pw\" }}, {{ user = \"bob\", password = \"bob-pw\" }}]\n\
         [registrar]\nstore = \"\"\n[nat]\nkeepalive = \"options\"\nkeepalive_interval = 5\n\
         [media]\nmode = \"relay\"\ninterfaces = [{{ name = \"wan\", bind = \"{WAN_SERVER}\" }}]\nport_min = 30000\nport_max = 30199\ntimeout = 4\n\
         [stun]\nlisten = [\"{WAN_SERVER}:3478\", \"{WAN_SERVER}:3479\"]\nalternate = \"{WAN_ALTERNATE}\"\n{extra}"
    )
}

/// A `pinhole agent` on `lan`'s host, port 5070, media on 31000-31999; waits for its NAT
/// profile.
fn start_agent(dir: &Path, name: &str, lan: &Lan) -> (Bg, std::path::PathBuf) {
    start_agent_with(dir, name, lan, "", "NAT profile")
}

/// [`start_agent`] with `extra` in its `[agent]` table, waiting for `ready` in its log.
fn start_agent_with(dir: &Path, name: &str, lan: &Lan, extra: &str, ready: &str) -> (Bg, std::path::PathBuf) {
    let cfg = dir.join(format!("{name}-agent.toml"));
    let host = &lan.host;
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nserver = \"{WAN_SERVER}:5060\"\n{extra}[sip]\nlisten = [\"udp:{host}:{AGENT_PORT}\"]\n\
             [media]\ninterfaces = [{{ name = \"lan\", bind = \"{host}\" }}]\nport_min = 31000\nport_max = 31999\n"
        ),
    )
    .expect("agent config");
    let log = dir.join(format!("{name}-agent.log"));
    let child = NatLab::command(&lan.lan, env!("CARGO_BIN_EXE_pinhole"))
        .args(["agent", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .process_group(0)
        .spawn()
        .expect("pinhole agent");
    let bg = Bg(Some(child));
    let ready = wait_for(&log, ready, Duration::from_secs(30));
    assert!(ready, "{name}'s agent is not ready\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    (bg, log)
}

/// Counters on a NAT box's forward path: LAN → the other NAT's public address (direct) and
/// LAN → the server (relayed), UDP only.
fn count_paths(lan: &Lan, peer_wan: &str) {
    let rules = format!(
        "table inet phcount {{\n  counter direct {{}}\n  counter relayed {{}}\n  chain paths {{\n    type filter hook forward priority 10; policy accept;\n    iifname \"lan0\" ip daddr {peer_wan} meta l4proto udp counter name direct\n    iifname \"lan0\" ip daddr {WAN_SERVER} meta l4proto udp counter name relayed\n  }}\n}}\n"
    );
    nft(&lan.nat, &rules);
}

/// Packets counted so far by counter `name` on `lan`'s NAT box.
fn counted(lan: &Lan, name: &str) -> u64 {
    nft_counter(&lan.nat, "phcount", name)
}

/// What one cell showed.
#[derive(Debug)]
struct Cell {
    name: String,
    /// Each phone's share of the other's tone in what it heard.
    heard: [f64; 2],
    /// Packets each NAT box sent straight to the other NAT, during the last two seconds of
    /// the call.
    direct_late: [u64; 2],
    /// All packets each NAT box sent straight to the other NAT.
    direct_total: [u64; 2],
    /// Packets each NAT box sent to the server during the last two seconds of the call.
    relayed_late: [u64; 2],
    method: String,
    /// Agents that logged losing their direct path.
    fell_back: usize,
    /// The server relay's view of the call's path when it ended (`relay`, `direct`, …).
    server_path: String,
    /// After the answer, when each phone's incoming RTP was established (baresip's log).
    media_after_ms: [Option<u64>; 2],
    /// The longest each phone went without a datagram in the 1.5 s after that.
    switch_gap_ms: [u64; 2],
    /// From the agents' logs: after how long each went direct.
    direct_after_ms: Vec<u64>,
    /// The MOS each agent reported to the server for the call (signed, in its report).
    agent_mos: Vec<f64>,
}

/// A call from alice (LAN 0) to bob (LAN 1) through both agents, held `hold` after answer.
fn run_cell(a: NatKind, b: NatKind, server_extra: &str, hold: Duration) -> Cell {
    run_cell_with(a, b, server_extra, hold, |_, _| {})
}

/// [`run_cell`], doing `midway` to the lab halfway through the call.
fn run_cell_with(
    a: NatKind,
    b: NatKind,
    server_extra: &str,
    hold: Duration,
    midway: impl FnOnce(&NatLab, &[Ear; 2]),
) -> Cell {
    run_cell_as(Mode::Agents, a, b, server_extra, hold, midway)
}

/// Who makes the direct path: pinhole's agents, or the phones' own ICE (baresip's, with
/// coturn as its STUN server and pinhole proxying SIP with media untouched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Agents,
    /// Agents, with the phones started as soon as the agents listen (before their NAT
    /// profiles are measured); the call waits until the server has taken both profiles.
    AgentsJustStarted,
    Ice,
}

/// What a phone receives on its RTP ports (10000-10999), as tcpdump in its namespace sees
/// it, with arrival times; the agent on the same host hands packets over on `lo`.
struct Ear {
    _tcpdump: Bg,
    out: std::path::PathBuf,
}

impl Ear {
    /// Returns once tcpdump captures: under a loaded suite it can take over a second to
    /// start, and a call answered meanwhile would read as silence.
    fn start(dir: &Path, lan: &Lan) -> Ear {
        let out = dir.join(format!("{}-heard.txt", lan.lan));
        let err = dir.join(format!("{}-tcpdump.err", lan.lan));
        let child = NatLab::command(&lan.lan, "tcpdump")
            .args(["-i", "any", "-n", "-tt", "-l", "-q", "udp and dst portrange 10000-10999"])
            .stdout(std::fs::File::create(&out).expect("tcpdump output"))
            .stderr(std::fs::File::create(&err).expect("tcpdump errors"))
            .process_group(0)
            .spawn()
            .expect("tcpdump must be installed");
        assert!(wait_for(&err, "listening on", Duration::from_secs(10)), "tcpdump did not start capturing");
        Ear { _tcpdump: Bg(Some(child)), out }
    }

    /// Arrival times (Unix seconds) in `from..=until`.
    fn arrivals(&self, from: f64, until: f64) -> Vec<f64> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse::<f64>().ok())
            .filter(|t| *t >= from && *t <= until)
            .collect()
    }

    /// The longest stretch without a packet in `from..from + window` (Unix seconds), counted
    /// from the first packet in it.
    fn longest_silence(&self, from: f64, window: Duration) -> Duration {
        let until = from + window.as_secs_f64();
        let times = self.arrivals(from, until);
        let Some(first) = times.first() else { return window };
        let last_gap = until - times.last().copied().unwrap_or(*first);
        let gaps = times.windows(2).map(|w| w[1] - w[0]).fold(last_gap, f64::max);
        Duration::from_secs_f64(gaps.max(0.0))
    }

    /// The three longest silences in `from..from + window`: (offset from `from`, length).
    fn worst(&self, from: f64, window: Duration) -> Vec<(Duration, Duration)> {
        let times = self.arrivals(from, from + window.as_secs_f64());
        let mut gaps: Vec<(Duration, Duration)> = times
            .windows(2)
            .map(|w| (Duration::from_secs_f64(w[0] - from), Duration::from_secs_f64(w[1] - w[0])))
            .collect();
        gaps.sort_by_key(|g| std::cmp::Reverse(g.1));
        gaps.truncate(3);
        gaps
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// How long after `since` `needle` first shows in `path` (polled every 10 ms).
fn seen_after(path: &Path, needle: &str, since: Instant, timeout: Duration) -> Option<Duration> {
    while since.elapsed() < timeout {
        if std::fs::read_to_string(path).unwrap_or_default().contains(needle) {
            return Some(since.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

fn run_cell_as(
    mode: Mode,
    a: NatKind,
    b: NatKind,
    server_extra: &str,
    hold: Duration,
    midway: impl FnOnce(&NatLab, &[Ear; 2]),
) -> Cell {
    let name = format!("{a:?} × {b:?}");
    let dir = TempDir::new("punch");
    let lab = NatLab::with_lans(&[a, b]);
    let mut config = server_config(server_extra);
    let mut _coturn = None;
    if mode == Mode::Ice {
        config = config.replace("mode = \"relay\"", "mode = \"off\"");
        let child = NatLab::command(&lab.wan, "turnserver")
            .args(["-n", "--stun-only", "--no-cli", "-L", WAN_ALTERNATE, "--listening-port", "3478"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("coturn must be installed");
        _coturn = Some(Bg(Some(child)));
    }
    let (_server, ph_log) = lab.start_pinhole(dir.path(), &config);
    for (i, lan) in lab.lans.iter().enumerate() {
        count_paths(lan, &lab.lans[1 - i].nat_wan);
    }
    let (mut agents, mut logs_at) = (Vec::new(), Vec::new());
    let phone = |i: usize, name: &str, hz: f64| {
        let l = &lab.lans[i];
        match mode {
            Mode::Agents | Mode::AgentsJustStarted => {
                Phone::start(&l.lan, dir.path(), name, &l.host, hz, Some(&format!("{}:{AGENT_PORT}", l.host)))
            }
            Mode::Ice => Phone::start_with(
                &l.lan,
                dir.path(),
                name,
                &l.host,
                hz,
                &format!("medianat=ice;stunserver=stun:{WAN_ALTERNATE}:3478;"),
                "module stun.so\nmodule turn.so\nmodule ice.so\n",
            ),
        }
    };
    let started = Instant::now();
    if mode != Mode::Ice {
        // Ready when profiled, or (just started) as soon as it listens.
        let ready = if mode == Mode::Agents { "NAT profile" } else { "agent listening" };
        for (i, who) in ["alice", "bob"].into_iter().enumerate() {
            let (bg, log) = start_agent_with(dir.path(), who, &lab.lans[i], "", ready);
            agents.push(bg);
            logs_at.push(log);
        }
    }
    let mut alice = phone(0, "alice", 440.0);
    let bob = phone(1, "bob", 660.0);
    let ears = [Ear::start(dir.path(), &lab.lans[0]), Ear::start(dir.path(), &lab.lans[1])];
    let pinhole = || std::fs::read_to_string(&ph_log).unwrap_or_default();
    for who in ["alice", "bob"] {
        let registered = wait_for(&ph_log, &format!("aor={who}@pinhole.test"), Duration::from_secs(15));
        assert!(registered, "{name}: {who} did not register\n{}", pinhole());
    }
    if mode == Mode::AgentsJustStarted {
        eprintln!("{name}: both phones registered {:?} after their agents started", started.elapsed());
        // Each agent pushes its profile once measured; the server takes it for the phone
        // registered through it.
        let taken = wait_until(Duration::from_secs(40), || pinhole().matches("agent profile updated").count() >= 2);
        assert!(taken, "{name}: the agents' profiles never reached the server\n{}", pinhole());
        eprintln!("{name}: both profiles taken {:?} after the agents started", started.elapsed());
    }
    alice.command(&format!("/dial sip:bob@{WAN_SERVER}"));
    let answered = wait_for(&bob.log, "Call established", Duration::from_secs(15));
    assert!(answered, "{name}: bob never answered\n{}\n{}", alice.log(), pinhole());
    let (t_answer, unix_answer) = (Instant::now(), unix_now());
    // Time to first audio: both phones say their incoming RTP is established.
    let media_after_ms = [&alice.log, &bob.log]
        .map(|l| seen_after(l, "incoming rtp for 'audio' established", t_answer, hold))
        .map(|d| d.map(|d| d.as_millis() as u64));
    std::thread::sleep((hold / 2).saturating_sub(t_answer.elapsed()));
    midway(&lab, &ears);
    std::thread::sleep((hold / 2).saturating_sub(Duration::from_secs(2)));
    let count = |name| [counted(&lab.lans[0], name), counted(&lab.lans[1], name)];
    let (direct_before, relayed_before) = (count("direct"), count("relayed"));
    std::thread::sleep(Duration::from_secs(2));
    let (direct_after, relayed_after) = (count("direct"), count("relayed"));
    alice.command("/hangup");
    assert!(wait_for(&bob.log, "session closed", Duration::from_secs(10)), "{name}: {}", bob.log());
    std::thread::sleep(Duration::from_millis(500));
    // Each agent tells the server what it measured of the call it carried.
    let reported = || pinhole().matches("agent reported call quality").count();
    wait_until(Duration::from_secs(5), || reported() >= 2);
    let agent_mos: Vec<f64> = pinhole()
        .lines()
        .filter(|l| l.contains("agent reported call quality"))
        .filter_map(|l| l.split(" mos=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    let (alice_heard, bob_heard) = (alice.heard(), bob.heard());
    // Across the switch to the direct path (within 1.5 s of the answer, from the first
    // packet on): the longest either phone went without one.
    let switch_gap_ms =
        ears.each_ref().map(|e| e.longest_silence(unix_answer, Duration::from_millis(1500)).as_millis() as u64);
    let logs: Vec<String> = logs_at.iter().map(|l| std::fs::read_to_string(l).unwrap_or_default()).collect();
    drop(agents);
    if std::env::var_os("PUNCH_VERBOSE").is_some() {
        for (who, e) in ["alice", "bob"].iter().zip(&ears) {
            eprintln!("{name}: {who}'s worst silences (after answer, length): {:?}", e.worst(unix_answer, hold));
        }
        eprintln!("{}", logs.join("\n"));
    }
    let method = pinhole()
        .lines()
        .find(|l| l.contains("punch plan"))
        .and_then(|l| l.split("method=").nth(1))
        .map(|m| m.split_whitespace().next().unwrap_or("").trim_matches('"').to_owned())
        .unwrap_or_else(|| "none".into());
    let direct_after_ms = logs
        .iter()
        .filter_map(|l| l.lines().find(|l| l.contains("media direct")))
        .filter_map(|l| l.split("after_ms=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    Cell {
        name,
        heard: [tone_share(&alice_heard, 660.0), tone_share(&bob_heard, 440.0)],
        direct_late: [direct_after[0] - direct_before[0], direct_after[1] - direct_before[1]],
        relayed_late: [relayed_after[0] - relayed_before[0], relayed_after[1] - relayed_before[1]],
        direct_total: [counted(&lab.lans[0], "direct"), counted(&lab.lans[1], "direct")],
        method,
        fell_back: logs.iter().filter(|l| l.contains("direct path lost")).count(),
        server_path: pinhole()
            .lines()
            .find(|l| l.contains("relay session released"))
            .and_then(|l| l.split("path=").nth(1))
            .and_then(|p| p.split_whitespace().next())
            .unwrap_or("none")
            .trim_matches('"')
            .to_owned(),
        media_after_ms,
        switch_gap_ms,
        direct_after_ms,
        agent_mos,
    }
}

const KINDS: [NatKind; 5] =
    [NatKind::FullCone, NatKind::Restricted, NatKind::PortRestricted, NatKind::SymmetricSeq, NatKind::SymmetricRandom];

/// Cells run this many at a time (each is two NAT boxes, two agents, two baresips and a
/// server; the machine has two cores).
const PARALLEL: usize = 4;

/// `cell` for each of the 15 unordered pairs of [`KINDS`], [`PARALLEL`] at a time; the
/// results in matrix order.
fn every_pair<T: Send>(cell: impl Fn(NatKind, NatKind) -> T + Sync) -> Vec<T> {
    let pairs: Vec<(NatKind, NatKind)> = (0..5).flat_map(|i| (i..5).map(move |j| (KINDS[i], KINDS[j]))).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some((a, b)) = pairs.get(i).copied() else { return };
                let r = cell(a, b);
                done.lock().unwrap_or_else(|e| e.into_inner()).push((i, r));
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    done.sort_by_key(|d| d.0);
    done.into_iter().map(|d| d.1).collect()
}

#[test]
fn the_nat_pair_matrix_has_two_way_audio_in_15_of_15_cells_and_direct_media_in_13() {
    if !common::netns::have_root() {
        return;
    }
    let results = every_pair(|a, b| {
        let r = std::panic::catch_unwind(|| run_cell(a, b, "", Duration::from_secs(6)));
        (
            (a, b),
            r.map_err(|e| e.downcast_ref::<String>().cloned().unwrap_or_else(|| format!("{a:?} × {b:?} panicked"))),
        )
    });
    let mut table =
        vec!["| cell | method | audio (shares) | direct | first audio (ms) | direct after (ms) | longest silence at the switch (ms) | direct pkts/2 s | relayed pkts/2 s | server saw |"
            .to_owned()];
    let mut failures = Vec::new();
    let mut direct_cells = 0;
    for ((a, b), r) in &results {
        let c = match r {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{a:?} × {b:?}: {e}"));
                continue;
            }
        };
        let relay_only = matches!(a, NatKind::SymmetricRandom | NatKind::SymmetricSeq)
            && matches!(b, NatKind::SymmetricRandom | NatKind::SymmetricSeq)
            && (*a == NatKind::SymmetricRandom || *b == NatKind::SymmetricRandom);
        let direct = c.direct_late.iter().all(|n| *n >= 80);
        direct_cells += usize::from(direct);
        table.push(format!(
            "| {} | {} | {:.2} / {:.2} | {} | {:?} | {:?} | {:?} | {:?} | {:?} | {} |",
            c.name,
            c.method,
            c.heard[0],
            c.heard[1],
            if direct { "yes" } else { "no" },
            c.media_after_ms,
            c.direct_after_ms,
            c.switch_gap_ms,
            c.direct_late,
            c.relayed_late,
            c.server_path
        ));
        if !c.heard.iter().all(|h| *h > 0.3) {
            failures.push(format!("{}: no two-way audio", c.name));
        }
        // The server relay (media timeout 4 s, the call 6 s) saw the same: only keepalives
        // on a direct call's RTP ports, RTP on a relayed one's, and it ended neither.
        let want = if relay_only { "relay" } else { "direct" };
        if c.server_path != want {
            failures.push(format!("{}: the server saw path {}, not {want}", c.name, c.server_path));
        }
        if c.switch_gap_ms.iter().any(|ms| *ms > 100) {
            failures.push(format!("{}: a {:?} ms silence around the switch (limit 100)", c.name, c.switch_gap_ms));
        }
        if c.media_after_ms.iter().any(|ms| ms.is_none_or(|ms| ms > 500)) {
            failures.push(format!("{}: first audio {:?} ms after the answer (limit 500)", c.name, c.media_after_ms));
        }
        let limit = if c.method == "birthday" || c.method == "prediction" || c.method == "lockstep-shotgun" {
            2000
        } else {
            1000
        };
        // A direct call is no blind spot: both agents reported what they measured.
        if !relay_only && (c.agent_mos.len() != 2 || c.agent_mos.iter().any(|m| *m < 3.5)) {
            failures.push(format!("{}: the agents reported MOS {:?}", c.name, c.agent_mos));
        }
        match relay_only {
            true if c.direct_total != [0, 0] => failures.push(format!("{}: relay-only cell sent to the peer", c.name)),
            false if !direct => failures.push(format!("{}: not direct at media rate", c.name)),
            false if c.direct_after_ms.len() != 2 || c.direct_after_ms.iter().any(|ms| *ms > limit) => {
                failures.push(format!("{}: direct after {:?} ms (limit {limit})", c.name, c.direct_after_ms))
            }
            _ => {}
        }
    }
    eprintln!("{}", table.join("\n"));
    assert!(failures.is_empty(), "{}\n{}", failures.join("\n"), table.join("\n"));
    assert_eq!((results.len(), direct_cells), (15, 13));
}

#[test]
fn phones_registering_as_their_agents_start_go_direct_once_the_agents_push_their_profiles() {
    if !common::netns::have_root() {
        return;
    }
    let c = run_cell_as(
        Mode::AgentsJustStarted,
        NatKind::PortRestricted,
        NatKind::PortRestricted,
        "",
        Duration::from_secs(6),
        |_, _| {},
    );
    eprintln!("{c:?}");
    assert!(c.heard.iter().all(|h| *h > 0.3), "two-way audio: {c:?}");
    assert_eq!(c.method, "simultaneous-open");
    assert!(c.direct_late.iter().all(|n| *n >= 80), "direct at media rate: {c:?}");
}

#[test]
fn a_denied_user_gets_two_way_audio_and_not_one_direct_packet() {
    if !common::netns::have_root() {
        return;
    }
    let deny = "[punch]\ndeny_users = [\"alice\"]\n";
    let c = run_cell(NatKind::PortRestricted, NatKind::FullCone, deny, Duration::from_secs(5));
    eprintln!("{c:?}");
    assert!(c.heard.iter().all(|h| *h > 0.3), "two-way audio: {c:?}");
    assert_eq!(c.direct_total, [0, 0], "nothing straight to the peer: {c:?}");
    assert!(c.relayed_late.iter().all(|n| *n >= 80), "all of it relayed: {c:?}");
    assert_eq!(c.method, "denied");
    assert_eq!(c.server_path, "relay");
}

#[test]
fn a_direct_path_cut_on_a_nat_box_falls_back_to_the_relay_and_audio_goes_on() {
    if !common::netns::have_root() {
        return;
    }
    let dropout = std::sync::Mutex::new([Duration::MAX; 2]);
    let cut = |lab: &NatLab, ears: &[Ear; 2]| {
        let cut_at = unix_now();
        // Both directions between the two NATs, dropped on alice's NAT box.
        let (lan, peer) = (&lab.lans[0], &lab.lans[1].nat_wan);
        for rule in [format!("ip daddr {peer} meta l4proto udp drop"), format!("ip saddr {peer} meta l4proto udp drop")]
        {
            let mut args = vec!["nft", "insert", "rule", "inet", "phcount", "paths"];
            args.extend(rule.split(' '));
            ns_exec(&lan.nat, &args);
        }
        // The longest stretch either phone then goes without a packet, over 3 s.
        std::thread::sleep(Duration::from_secs(3));
        let longest = ears.each_ref().map(|e| e.longest_silence(cut_at, Duration::from_secs(3)));
        *dropout.lock().unwrap_or_else(|e| e.into_inner()) = longest;
    };
    let c = run_cell_with(NatKind::PortRestricted, NatKind::PortRestricted, "", Duration::from_secs(8), cut);
    eprintln!("{c:?}");
    assert!(c.heard.iter().all(|h| *h > 0.3), "two-way audio: {c:?}");
    assert_eq!(c.direct_after_ms.len(), 2, "it was direct before the cut: {c:?}");
    assert_eq!(c.fell_back, 2, "both agents noticed: {c:?}");
    assert!(c.direct_total.iter().all(|n| *n >= 80), "{c:?}");
    // After the cut, media goes to the server again at media rate, from both sides.
    assert!(c.relayed_late.iter().all(|n| *n >= 80), "relayed after the cut: {c:?}");
    assert_eq!(c.server_path, "relay", "and the server relay saw the RTP come back");
    let dropout = *dropout.lock().unwrap_or_else(|e| e.into_inner());
    eprintln!("longest silence at each phone after the cut: {dropout:?}");
    assert!(dropout.iter().all(|d| *d <= Duration::from_secs(1)), "a dropout over 1 s: {dropout:?}");
}

/// `cargo xtask bench punch`: every cell twice, with pinhole's agents and with the phones'
/// own ICE (baresip, coturn as STUN), side by side: audio, direct, time to first audio and
/// to direct. Not a pass/fail test.
#[test]
#[ignore = "a benchmark: cargo xtask bench punch"]
fn bench_punch_matrix_against_baresip_ice() {
    if !common::netns::have_root() {
        return;
    }
    let mut rows = vec![
        "| cell | pinhole: method | audio | direct | first audio (ms after answer) | direct (ms after start = answer + 200) | ICE: audio | direct | first audio (ms) |"
            .to_owned(),
        "|---|---|---|---|---|---|---|---|---|".to_owned(),
    ];
    // Both runs of a cell on one worker.
    let done = every_pair(|a, b| {
        let run =
            |mode| std::panic::catch_unwind(|| run_cell_as(mode, a, b, "", Duration::from_secs(12), |_, _| {})).ok();
        (a, b, run(Mode::Agents), run(Mode::Ice))
    });
    for (a, b, ours, ice) in done {
        let audio = |c: &Option<Cell>| c.as_ref().is_some_and(|c| c.heard.iter().all(|h| *h > 0.3));
        let direct = |c: &Option<Cell>| c.as_ref().is_some_and(|c| c.direct_late.iter().all(|n| *n >= 80));
        let first = |c: &Option<Cell>| {
            c.as_ref()
                .and_then(|c| c.media_after_ms.iter().copied().collect::<Option<Vec<u64>>>())
                .and_then(|v| v.into_iter().max())
        };
        let yn = |b: bool| if b { "yes" } else { "no" };
        rows.push(format!(
            "| {a:?} × {b:?} | {} | {} | {} | {:?} | {:?} | {} | {} | {:?} |",
            ours.as_ref().map_or("-", |c| c.method.as_str()),
            yn(audio(&ours)),
            yn(direct(&ours)),
            first(&ours),
            ours.as_ref().and_then(|c| c.direct_after_ms.iter().max().copied()),
            yn(audio(&ice)),
            yn(direct(&ice)),
            first(&ice),
        ));
    }
    println!("{}", rows.join("\n"));
}

/// One cell by hand: `PUNCH_CELL=PortRestricted,SymmetricRandom PUNCH_VERBOSE=1 cargo test
/// --test netns_punch -- --ignored --nocapture one_cell`.
#[test]
#[ignore = "by hand: PUNCH_CELL=KIND,KIND"]
fn one_cell() {
    let cell = std::env::var("PUNCH_CELL").unwrap_or_else(|_| "PortRestricted,PortRestricted".into());
    let kind = |k: &str| KINDS.into_iter().find(|x| format!("{x:?}") == k).expect("a NatKind name");
    let (a, b) = cell.split_once(',').map(|(a, b)| (kind(a), kind(b))).expect("KIND,KIND");
    eprintln!("{:?}", run_cell(a, b, "", Duration::from_secs(6)));
}

/// Counters on a UDP-blocking NAT box, ahead of its own drop rule: UDP to the server's relay
/// ports (RTP and RTCP) the LAN tries to send, TCP to the forwarder, TCP straight to the
/// other NAT box (a direct fake-TCP path), RSTs on anything but SIP's own TCP (every RST is
/// also listed in the `rsts` set, printed with the results) and packets conntrack calls
/// INVALID.
fn watch_blocked(lan: &Lan) {
    let rules = format!(
        "table inet phft {{\n  counter tried {{}}\n  set seen {{ type ipv4_addr . inet_service; flags dynamic; counter; }}\n  counter forwarder {{}}\n  counter direct {{}}\n  counter rst {{}}\n  counter invalid {{}}\n  set rsts {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; flags dynamic; }}\n  chain watch {{\n    type filter hook forward priority -10; policy accept;\n    udp dport 30000-30199 counter name tried\n    udp dport 30000-30199 add @seen {{ ip daddr . udp dport }}\n    ip daddr {WAN_SERVER} tcp dport 4443 counter name forwarder\n    oifname \"wan0\" ip daddr != {WAN_SERVER} meta l4proto tcp counter name direct\n    tcp flags & rst == rst add @rsts {{ ip saddr . tcp sport . ip daddr . tcp dport }}\n    tcp sport != 5060 tcp dport != 5060 tcp flags & rst == rst counter name rst\n    ct state invalid counter name invalid\n  }}\n}}\n"
    );
    nft(&lan.nat, &rules);
}

fn ft_counter(lan: &Lan, name: &str) -> u64 {
    nft_counter(&lan.nat, "phft", name)
}

/// A UDP-blocking NAT box's counts: RTP/RTCP tried over UDP, TCP segments to the forwarder
/// and TCP segments straight to the other NAT box (these three in the last 2 s of a
/// call), RSTs and INVALID packets (in all).
#[derive(Debug, Clone, Copy)]
struct BoxCounts {
    udp: u64,
    forwarder: u64,
    direct: u64,
    rst: u64,
    invalid: u64,
}

/// alice behind a NAT that drops all UDP calls bob behind `bob_nat`; both next to agents,
/// signalling over TCP from a blocked network. Returns what each heard of the other's tone,
/// and the counts of every UDP-blocking box.
fn blocked_call(alice_nat: NatKind, bob_nat: NatKind) -> ([f64; 2], Vec<BoxCounts>) {
    tunnelled_call([alice_nat, bob_nat], [true, bob_nat.drops_udp()], false)
}

/// A call from alice to bob, each behind a NAT of `kinds` and next to an agent (signalling
/// over TCP where `tcp_agents`); with `block_relay`, alice's NAT box lets UDP out but not
/// to the server's relay ports. The boxes watched are the UDP-blocking ones and, with
/// `block_relay`, alice's. When both NATs drop UDP, the agents are introduced to each
/// other and the counts are taken once both have settled (a direct path up or given up).
/// Returns what each heard, and each watched box's counts.
fn tunnelled_call(kinds: [NatKind; 2], tcp_agents: [bool; 2], block_relay: bool) -> ([f64; 2], Vec<BoxCounts>) {
    let dir = TempDir::new("blocked");
    let lab = NatLab::with_lans(&kinds);
    let (_server, ph_log) =
        lab.start_pinhole(dir.path(), &server_config(&format!("[faketcp]\nlisten = \"{WAN_SERVER}:4443\"\n")));
    let blocked: Vec<&Lan> = lab
        .lans
        .iter()
        .enumerate()
        .filter(|(i, _)| kinds[*i].drops_udp() || (*i == 0 && block_relay))
        .map(|(_, l)| l)
        .collect();
    for lan in &blocked {
        watch_blocked(lan);
    }
    if block_relay {
        let rule = "table inet phblock {\n  chain relay {\n    type filter hook forward priority -5; policy accept;\n    udp dport 30000-30199 drop\n  }\n}\n";
        nft(&lab.lans[0].nat, rule);
    }
    let agent = |i: usize, who: &str| {
        if tcp_agents[i] {
            start_agent_with(
                dir.path(),
                who,
                &lab.lans[i],
                "transport = \"tcp\"\n",
                "signalling to the server over TCP",
            )
        } else {
            start_agent(dir.path(), who, &lab.lans[i])
        }
    };
    let (_a, a_log) = agent(0, "alice");
    let (_b, b_log) = agent(1, "bob");
    let outbound = |l: &Lan| format!("{}:{AGENT_PORT}", l.host);
    let mut alice =
        Phone::start(&lab.lans[0].lan, dir.path(), "alice", &lab.lans[0].host, 440.0, Some(&outbound(&lab.lans[0])));
    let bob =
        Phone::start(&lab.lans[1].lan, dir.path(), "bob", &lab.lans[1].host, 660.0, Some(&outbound(&lab.lans[1])));
    let logs = || {
        format!(
            "--- pinhole ---\n{}\n--- alice's agent ---\n{}\n--- bob's agent ---\n{}",
            std::fs::read_to_string(&ph_log).unwrap_or_default(),
            std::fs::read_to_string(&a_log).unwrap_or_default(),
            std::fs::read_to_string(&b_log).unwrap_or_default()
        )
    };
    for who in ["alice", "bob"] {
        let registered = wait_for(&ph_log, &format!("aor={who}@pinhole.test"), Duration::from_secs(20));
        assert!(registered, "{who} did not register\n{}", logs());
    }
    alice.command(&format!("/dial sip:bob@{WAN_SERVER}"));
    assert!(wait_for(&bob.log, "Call established", Duration::from_secs(15)), "bob never answered\n{}", logs());
    let up = wait_for(&a_log, "phase=Up", Duration::from_secs(8));
    assert!(up, "alice's leg never went over fake TCP\n{}", logs());
    if kinds.iter().all(|k| k.drops_udp()) {
        // Introduced: each agent's direct path ends up (or is given up within 5 s).
        let introduced = wait_for(&ph_log, "introduced for a direct path", Duration::from_secs(8));
        assert!(introduced, "the forwarder never introduced the legs\n{}", logs());
        for log in [&a_log, &b_log] {
            let settled = |l: &std::path::Path| {
                let text = std::fs::read_to_string(l).unwrap_or_default();
                text.contains("direct=Some(Up)") || text.contains("direct=Some(Failed)")
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            while !settled(log) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(settled(log), "the direct path never settled\n{}", logs());
        }
        std::thread::sleep(Duration::from_secs(1));
    } else {
        std::thread::sleep(Duration::from_secs(3));
    }
    let names = ["tried", "forwarder", "direct"];
    let before: Vec<Vec<u64>> = blocked.iter().map(|l| names.iter().map(|n| ft_counter(l, n)).collect()).collect();
    std::thread::sleep(Duration::from_secs(2));
    let counters = blocked
        .iter()
        .zip(&before)
        .map(|(l, b)| BoxCounts {
            udp: ft_counter(l, "tried") - b[0],
            forwarder: ft_counter(l, "forwarder") - b[1],
            direct: ft_counter(l, "direct") - b[2],
            rst: ft_counter(l, "rst"),
            invalid: ft_counter(l, "invalid"),
        })
        .collect();
    for l in &blocked {
        let seen = ns_exec(&l.nat, &["nft", "list", "set", "inet", "phft", "seen"]);
        eprintln!("UDP to the relay ports tried from {}:\n{}", l.lan, String::from_utf8_lossy(&seen.stdout));
        let rsts = ns_exec(&l.nat, &["nft", "list", "set", "inet", "phft", "rsts"]);
        eprintln!("RSTs forwarded by {}:\n{}", l.nat, String::from_utf8_lossy(&rsts.stdout));
    }
    let conntrack =
        String::from_utf8_lossy(&ns_exec(&lab.lans[0].nat, &["conntrack", "-L", "-p", "tcp"]).stdout).into_owned();
    eprintln!("conntrack (TCP) on alice's NAT box during the call:\n{conntrack}");
    let to_forwarder = conntrack.lines().find(|l| l.contains("dport=4443"));
    assert!(to_forwarder.is_some_and(|l| l.contains("ESTABLISHED")), "{conntrack}");
    if std::fs::read_to_string(&a_log).unwrap_or_default().contains("direct=Some(Up)") {
        let to_bob = format!("dst={}", lab.lans[1].nat_wan);
        let direct = conntrack.lines().find(|l| l.contains(&to_bob));
        assert!(direct.is_some_and(|l| l.contains("ESTABLISHED")), "the direct flow is tracked\n{conntrack}");
    }
    alice.command("/hangup");
    let closed = wait_for(&bob.log, "session closed", Duration::from_secs(20));
    assert!(closed, "bob never heard the hangup\n--- bob ---\n{}\n{}", bob.log(), logs());
    std::thread::sleep(Duration::from_millis(500));
    ([tone_share(&alice.heard(), 660.0), tone_share(&bob.heard(), 440.0)], counters)
}

#[test]
fn a_phone_whose_nat_drops_udp_talks_through_fake_tcp_to_a_phone_behind_a_cone() {
    if !common::netns::have_root() {
        return;
    }
    let (heard, counters) = blocked_call(NatKind::UdpBlocked, NatKind::PortRestricted);
    carried_by_the_forwarder(heard, &counters, 1);
}

/// Two-way audio, and each of the `boxes` blocking NAT boxes carried its RTP as TCP to the
/// forwarder at media rate, tried none over UDP, and saw no RST or INVALID packet.
fn carried_by_the_forwarder(heard: [f64; 2], counters: &[BoxCounts], boxes: usize) {
    eprintln!("heard {heard:?}, blocked boxes {counters:?}");
    assert!(heard.iter().all(|h| *h > 0.3), "two-way audio: {heard:?}");
    assert_eq!(counters.len(), boxes);
    for c in counters {
        assert_eq!(c.udp, 0, "RTP and RTCP do not even try UDP any more");
        assert!(c.forwarder >= 80, "media rate over TCP to the forwarder: {c:?}");
        assert_eq!((c.rst, c.invalid), (0, 0));
    }
}

#[test]
fn two_phones_whose_nats_both_drop_udp_meet_at_the_forwarder_and_talk_over_a_direct_fake_tcp_path() {
    if !common::netns::have_root() {
        return;
    }
    let (heard, counters) = blocked_call(NatKind::UdpBlocked, NatKind::UdpBlocked);
    eprintln!("heard {heard:?}, blocked boxes {counters:?}");
    assert!(heard.iter().all(|h| *h > 0.3), "two-way audio: {heard:?}");
    assert_eq!(counters.len(), 2);
    for c in counters {
        assert_eq!(c.udp, 0, "nothing tried over UDP");
        assert!(c.direct >= 80, "media rate straight to the other NAT box: {c:?}");
        assert!(c.forwarder <= 10, "only keepalives to the forwarder: {c:?}");
        assert_eq!((c.rst, c.invalid), (0, 0), "a clean simultaneous open through strict conntrack");
    }
}

#[test]
fn two_phones_whose_nats_drop_udp_and_change_ports_fall_back_to_the_forwarder_on_both_legs() {
    if !common::netns::have_root() {
        return;
    }
    // The direct path is tried (the forwarder introduces the legs) and fails: each NAT maps
    // the direct flow to a port the other was not told.
    let (heard, counters) = blocked_call(NatKind::UdpBlockedRandom, NatKind::UdpBlockedRandom);
    carried_by_the_forwarder(heard, &counters, 2);
    assert!(counters.iter().all(|c| c.direct == 0), "no media went direct: {counters:?}");
}

#[test]
fn a_leg_whose_relay_ports_are_blocked_moves_to_fake_tcp_after_a_few_seconds_of_silence() {
    if !common::netns::have_root() {
        return;
    }
    // No direct path between two random-symmetric NATs, and alice's NAT drops UDP to the
    // relay (though not to STUN, nor SIP): her agent hears nothing from the relay and moves
    // the leg to fake TCP.
    let (heard, counters) = tunnelled_call([NatKind::SymmetricRandom, NatKind::SymmetricRandom], [false, false], true);
    carried_by_the_forwarder(heard, &counters, 1);
}
