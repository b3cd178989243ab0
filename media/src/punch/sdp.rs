//! A punch plan in SDP, for the leg to an agent only. ICE's own attributes carry what ICE
//! has (`a=ice-ufrag`, `a=ice-pwd`, the peer's window as a server-reflexive
//! `a=candidate`); `a=x-pinhole-peer` and `a=x-pinhole-punch` carry what ICE lacks (the
//! peer's credentials, the method with its parameters, both windows, the common start).
//! The agent strips all of them before the SDP reaches a phone.

use std::net::SocketAddr;

use super::scheduler::{Credentials, PunchPlan};
use super::{RelayReason, Strategy, BIRTHDAY_PROBES, BIRTHDAY_SOCKETS, PREDICTION_WINDOW};
use crate::relay::Side;

/// When both sides start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanStart {
    /// This long after the agent sees the call answered (the 2xx passing through it): the
    /// two agents see it within a one-way delay of each other, and every method tolerates
    /// that (lockstep steps are matched by count, not by clock).
    AfterAnswer { ms: u32 },
    /// At this wall-clock time (NTP-synchronised agents).
    UnixMs(u64),
}

/// A plan as it travels: the scheduler's plan with a start both agents can agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WirePlan {
    pub strategy: Strategy,
    pub side: Side,
    pub windows: [SocketAddr; 2],
    pub credentials: Credentials,
    pub start: PlanStart,
}

/// Every line a plan adds starts with one of these (our candidate has its own foundation,
/// so a phone's own candidates are never taken for ours).
const PREFIXES: [&str; 7] = [
    "a=ice-ufrag:",
    "a=ice-pwd:",
    "a=x-pinhole-peer:",
    "a=x-pinhole-punch:",
    "a=candidate:pinhole ",
    "a=x-pinhole-tcp:",
    SIG_PREFIX,
];

/// The line that signs the others: `a=x-pinhole-sig:HEX`, a MAC over the call and every
/// other line a plan or forwarder offer added, under a key the agent gave the server with
/// its REGISTER (see [`signed_part`]).
pub const SIG_PREFIX: &str = "a=x-pinhole-sig:";

/// Largest plan parameters a server sends ([`crate::punch::choose`]'s own values); a plan
/// asking for more is refused where it is parsed.
pub const MAX_DELTA: u16 = 64;
/// Longest a plan may wait after the answer before it starts.
pub const MAX_START_AFTER_ANSWER_MS: u32 = 10_000;

impl WirePlan {
    /// The scheduler's plan, given the instant [`WirePlan::start`] means here.
    pub fn to_plan(&self, start: std::time::Instant) -> PunchPlan {
        PunchPlan {
            strategy: self.strategy,
            side: self.side,
            windows: self.windows,
            credentials: self.credentials.clone(),
            start,
        }
    }

    /// The session-level lines to add (CRLF-terminated).
    pub fn lines(&self) -> String {
        let peer = self.windows[self.side.other() as usize];
        let c = &self.credentials;
        let start = match self.start {
            PlanStart::AfterAnswer { ms } => format!("answer+{ms}"),
            PlanStart::UnixMs(ms) => ms.to_string(),
        };
        let side = if self.side == Side::A { "A" } else { "B" };
        format!(
            "a=ice-ufrag:{}\r\na=ice-pwd:{}\r\na=x-pinhole-peer:{} {}\r\na=candidate:pinhole 1 UDP 1 {} {} typ srflx\r\na=x-pinhole-punch:{};side={side};start={start};windows={},{}\r\n",
            c.local_ufrag,
            c.local_pwd,
            c.remote_ufrag,
            c.remote_pwd,
            peer.ip(),
            peer.port(),
            strategy_params(&self.strategy),
            self.windows[0],
            self.windows[1],
        )
    }

    /// The plan in an SDP body, if it carries a complete one.
    pub fn from_sdp(body: &str) -> Option<WirePlan> {
        let value = |prefix: &str| body.lines().find_map(|l| l.trim_end().strip_prefix(prefix));
        let (peer_ufrag, peer_pwd) = value("a=x-pinhole-peer:")?.split_once(' ')?;
        let credentials = Credentials {
            local_ufrag: value("a=ice-ufrag:")?.to_owned(),
            local_pwd: value("a=ice-pwd:")?.to_owned(),
            remote_ufrag: peer_ufrag.to_owned(),
            remote_pwd: peer_pwd.to_owned(),
        };
        let params: Vec<(&str, &str)> =
            value("a=x-pinhole-punch:")?.split(';').filter_map(|p| p.split_once('=')).collect();
        let get = |k: &str| param(&params, k);
        let side = match get("side")? {
            "A" => Side::A,
            "B" => Side::B,
            _ => return None,
        };
        let (wa, wb) = get("windows")?.split_once(',')?;
        let windows: [SocketAddr; 2] = [wa.parse().ok()?, wb.parse().ok()?];
        let start = match get("start")?.strip_prefix("answer+") {
            Some(ms) => PlanStart::AfterAnswer { ms: ms.parse().ok().filter(|ms| *ms <= MAX_START_AFTER_ANSWER_MS)? },
            None => PlanStart::UnixMs(get("start")?.parse().ok()?),
        };
        let plan = WirePlan { strategy: parse_strategy(&params)?, side, windows, credentials, start };
        plan.in_range().then_some(plan)
    }

    /// Every count, port, address and credential within what a server sends: a plan is
    /// carried out by sockets and packets, so nothing in it may ask for more than one real
    /// call needs.
    fn in_range(&self) -> bool {
        let addr_ok = |a: &SocketAddr| {
            let ip = a.ip();
            a.port() != 0
                && !ip.is_unspecified()
                && !ip.is_multicast()
                && ip != std::net::IpAddr::V4(std::net::Ipv4Addr::BROADCAST)
        };
        // RFC 8445 §5.3: ufrag 4–256 ice-chars, password 22–256.
        let ice = |s: &str, min: usize| {
            (min..=256).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
        };
        let c = &self.credentials;
        let counts = match self.strategy {
            Strategy::Prediction { delta, window, .. } => {
                delta <= MAX_DELTA && (1..=PREDICTION_WINDOW).contains(&window)
            }
            Strategy::LockstepShotgun { delta, window } => {
                delta.iter().all(|d| (1..=MAX_DELTA).contains(d)) && (1..=PREDICTION_WINDOW).contains(&window)
            }
            Strategy::Birthday { sockets, probes, .. } => {
                (1..=BIRTHDAY_SOCKETS).contains(&sockets) && (1..=BIRTHDAY_PROBES).contains(&probes)
            }
            Strategy::Reach { .. } | Strategy::SimultaneousOpen | Strategy::RelayOnly(_) => true,
        };
        counts
            && self.windows.iter().all(addr_ok)
            && ice(&c.local_ufrag, 4)
            && ice(&c.remote_ufrag, 4)
            && ice(&c.local_pwd, 22)
            && ice(&c.remote_pwd, 22)
    }
}

/// Adds a plan's lines at the end of an SDP's session-level block (before the first m=).
pub fn insert(sdp: &str, plan: &WirePlan) -> String {
    insert_lines(sdp, &plan.lines())
}

/// Adds CRLF-terminated `lines` at the end of an SDP's session-level block.
pub fn insert_lines(sdp: &str, lines: &str) -> String {
    match sdp.find("\nm=") {
        Some(i) => format!("{}{lines}{}", &sdp[..=i], &sdp[i + 1..]),
        None if sdp.ends_with('\n') || sdp.is_empty() => format!("{sdp}{lines}"),
        None => format!("{sdp}\r\n{lines}"),
    }
}

/// The fake-TCP forwarder an SDP offers this leg: `a=x-pinhole-tcp:PORT KEY`.
pub fn forwarder_offer(sdp: &str) -> Option<(u16, String)> {
    let rest = sdp.lines().find_map(|l| l.strip_prefix("a=x-pinhole-tcp:"))?;
    let (port, key) = rest.trim().split_once(' ')?;
    let key = key.trim();
    (!key.is_empty() && key.len() <= 64 && key.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| Some((port.parse().ok()?, key.to_owned())))
        .flatten()
}

/// What a plan's signature covers: every line a plan or forwarder offer added, except the
/// signature itself, in order, each without its line ending, joined by LF.
pub fn signed_part(sdp: &str) -> String {
    let lines: Vec<&str> = sdp
        .lines()
        .map(str::trim_end)
        .filter(|l| PREFIXES.iter().any(|p| l.starts_with(p)) && !l.starts_with(SIG_PREFIX))
        .collect();
    lines.join("\n")
}

/// The signature line's value, if there is one.
pub fn signature(sdp: &str) -> Option<&str> {
    sdp.lines().find_map(|l| l.strip_prefix(SIG_PREFIX)).map(str::trim)
}

/// Removes every line a plan (or a forwarder offer) added from an SDP, leaving the rest
/// byte for byte.
pub fn strip(sdp: &str) -> String {
    sdp.split_inclusive('\n').filter(|l| !PREFIXES.iter().any(|p| l.starts_with(p))).collect()
}

fn strategy_params(s: &Strategy) -> String {
    let side = |s: Side| if s == Side::A { "A" } else { "B" };
    match s {
        Strategy::Reach { target, open_first } => {
            format!("method=reach;target={};open={}", side(*target), u8::from(*open_first))
        }
        Strategy::SimultaneousOpen => "method=simultaneous-open".into(),
        Strategy::Prediction { symmetric, delta, window } => {
            format!("method=prediction;symmetric={};delta={delta};window={window}", side(*symmetric))
        }
        Strategy::LockstepShotgun { delta, window } => {
            format!("method=lockstep-shotgun;delta={},{};window={window}", delta[0], delta[1])
        }
        Strategy::Birthday { hard, sockets, probes } => {
            format!("method=birthday;hard={};sockets={sockets};probes={probes}", side(*hard))
        }
        Strategy::RelayOnly(_) => "method=relay".into(),
    }
}

fn param<'a>(params: &[(&'a str, &'a str)], k: &str) -> Option<&'a str> {
    params.iter().find(|(n, _)| *n == k).map(|(_, v)| *v)
}

fn parse_strategy(params: &[(&str, &str)]) -> Option<Strategy> {
    let get = |k: &str| param(params, k);
    let side = |k: &str| match get(k)? {
        "A" => Some(Side::A),
        "B" => Some(Side::B),
        _ => None,
    };
    let num = |k: &str| get(k)?.parse::<u16>().ok();
    Some(match get("method")? {
        "reach" => Strategy::Reach { target: side("target")?, open_first: get("open")? == "1" },
        "simultaneous-open" => Strategy::SimultaneousOpen,
        "prediction" => {
            Strategy::Prediction { symmetric: side("symmetric")?, delta: num("delta")?, window: num("window")? }
        }
        "lockstep-shotgun" => {
            let (a, b) = get("delta")?.split_once(',')?;
            Strategy::LockstepShotgun { delta: [a.parse().ok()?, b.parse().ok()?], window: num("window")? }
        }
        "birthday" => Strategy::Birthday { hard: side("hard")?, sockets: num("sockets")?, probes: num("probes")? },
        "relay" => Strategy::RelayOnly(RelayReason::Unknown),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SDP: &str = "v=0\r\no=- 1 1 IN IP4 203.0.113.1\r\ns=-\r\nc=IN IP4 203.0.113.1\r\nt=0 0\r\nm=audio 30000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n";

    fn plan(strategy: Strategy) -> WirePlan {
        WirePlan {
            strategy,
            side: Side::B,
            windows: ["203.0.113.2:40001".parse().expect("a"), "203.0.113.3:40002".parse().expect("b")],
            credentials: Credentials {
                local_ufrag: "bbbb".into(),
                local_pwd: "bpassword0123456789abcdef".into(),
                remote_ufrag: "aaaa".into(),
                remote_pwd: "apassword0123456789abcdef".into(),
            },
            start: PlanStart::AfterAnswer { ms: 300 },
        }
    }

    #[test]
    fn every_method_survives_the_trip_through_sdp() {
        for s in [
            Strategy::Reach { target: Side::A, open_first: true },
            Strategy::SimultaneousOpen,
            Strategy::Prediction { symmetric: Side::A, delta: 3, window: 16 },
            Strategy::LockstepShotgun { delta: [1, 2], window: 16 },
            Strategy::Birthday { hard: Side::B, sockets: 256, probes: 1024 },
        ] {
            let p = plan(s);
            let with = insert(SDP, &p);
            assert_eq!(WirePlan::from_sdp(&with), Some(p), "{with}");
        }
    }

    #[test]
    fn the_plan_goes_at_session_level_and_stripping_restores_the_sdp_byte_for_byte() {
        let with = insert(SDP, &plan(Strategy::SimultaneousOpen));
        let m = with.find("m=audio").expect("m=");
        assert!(with.find("a=x-pinhole-punch:").expect("plan") < m, "before the first m=");
        assert!(with.contains("a=candidate:pinhole 1 UDP 1 203.0.113.2 40001 typ srflx\r\n"), "the peer's window");
        assert_eq!(strip(&with), SDP);
        let phones_own = SDP.to_owned() + "a=candidate:1 1 UDP 2130706431 198.51.100.20 5000 typ host\r\n";
        assert_eq!(
            strip(&insert(&phones_own, &plan(Strategy::SimultaneousOpen))),
            phones_own,
            "a phone's candidate stays"
        );
    }

    #[test]
    fn both_kinds_of_start_survive_and_an_sdp_without_media_lines_still_takes_a_plan() {
        let p = WirePlan { start: PlanStart::UnixMs(1_700_000_000_123), ..plan(Strategy::SimultaneousOpen) };
        assert_eq!(WirePlan::from_sdp(&insert(SDP, &p)), Some(p.clone()));
        let bare = insert("v=0", &p);
        assert!(bare.starts_with("v=0\r\na=ice-ufrag:"), "{bare}");
        assert_eq!(WirePlan::from_sdp(&bare), Some(p));
    }

    #[test]
    fn a_plan_off_the_wire_drives_a_puncher_and_only_the_hard_birthday_side_opens_many_sockets() {
        use crate::punch::scheduler::Puncher;
        let now = std::time::Instant::now();
        let birthday = |hard| {
            let with = insert(SDP, &plan(Strategy::Birthday { hard, sockets: 256, probes: 1024 }));
            WirePlan::from_sdp(&with).expect("plan").to_plan(now)
        };
        let hard = birthday(Side::B);
        assert_eq!(hard.side, Side::B);
        assert_eq!(hard.start, now);
        assert_eq!(Puncher::new(hard, 1).sockets(), 256);
        assert_eq!(Puncher::new(birthday(Side::A), 1).sockets(), 1, "the easy side keeps one socket");
        let simple = WirePlan::from_sdp(&insert(SDP, &plan(Strategy::SimultaneousOpen))).expect("plan");
        assert_eq!(Puncher::new(simple.to_plan(now), 1).sockets(), 1);
    }

    #[test]
    fn an_sdp_without_a_complete_plan_has_none() {
        assert_eq!(WirePlan::from_sdp(SDP), None);
        let with = insert(SDP, &plan(Strategy::SimultaneousOpen));
        assert_eq!(WirePlan::from_sdp(&with.replace("side=B", "side=C")), None);
        assert_eq!(WirePlan::from_sdp(&with.replace("method=simultaneous-open", "method=teleport")), None);
    }
}
