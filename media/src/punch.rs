//! Punch planning: from both endpoints' NAT profiles, which method can make a direct path
//! — and when none can, say so, so the call stays on the relay it started on.
//!
//! | A \ B | full cone | restricted | port-restricted | symmetric, sequential | symmetric, random |
//! |---|---|---|---|---|---|
//! | full cone | reach | reach | reach | reach | reach |
//! | restricted | | reach (opened) | reach (opened) | reach (opened) | reach (opened) |
//! | port-restricted | | | simultaneous open | prediction | birthday |
//! | symmetric, sequential | | | | lockstep shotgun | relay |
//! | symmetric, random | | | | | relay |
//!
//! "Reach": the side whose filtering admits the peer is sent to at its window (a restricted
//! cone first sends one null packet to the peer's address, which opens its filter for any
//! port of that address). The rest need both sides to send: at the window (cone × cone), at
//! a window of predicted ports around a sequential NAT's next allocation, in lockstep when
//! both are sequential, or by the birthday paradox against a random allocator. The policy
//! (`[punch]`: disabled, denied networks or users) is applied by the caller.

use std::net::SocketAddr;

use crate::probe::{Allocation, Behaviour, NatReport};
use crate::relay::Side;

/// Ports either side of a sequential NAT's predicted next port.
pub const PREDICTION_WINDOW: u16 = 16;
/// Birthday punching: sockets the hard side opens, probes the easy side may send per
/// round. With 64 000 possible ports a round succeeds about 98 % of the time
/// (1 − e^(−256·1024/64000)); when one finds nothing, one more round (new random ports)
/// brings the failure rate to about 0.03 %.
pub const BIRTHDAY_SOCKETS: u16 = 256;
pub const BIRTHDAY_PROBES: u16 = 1024;
pub const BIRTHDAY_ROUNDS: u32 = 2;

/// What the server knows of one endpoint's NAT, from its agent's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatProfile {
    pub mapping: Option<Behaviour>,
    pub filtering: Option<Behaviour>,
    pub allocation: Option<Allocation>,
    /// The public address of the endpoint's media socket (its "firewall window").
    pub window: Option<SocketAddr>,
    /// The gateway maps the endpoint's ports on request (PCP or NAT-PMP): its windows
    /// admit anyone, whatever the NAT does otherwise.
    pub portmap: Option<crate::portmap::Protocol>,
}

impl NatProfile {
    /// The profile a probe report gives, with the media socket's mapped address.
    pub fn from_report(r: &NatReport, window: Option<SocketAddr>) -> NatProfile {
        NatProfile { mapping: r.mapping, filtering: r.filtering, allocation: r.allocation, window, portmap: None }
    }

    /// How the endpoint behaves for punching: one whose gateway maps ports on request is
    /// endpoint-independent in both mapping and filtering (a full cone).
    fn effective(&self) -> NatProfile {
        match self.portmap {
            Some(_) => NatProfile {
                mapping: Some(Behaviour::EndpointIndependent),
                filtering: Some(Behaviour::EndpointIndependent),
                allocation: Some(Allocation::Preserving),
                ..*self
            },
            None => *self,
        }
    }

    fn cone(&self) -> bool {
        self.mapping == Some(Behaviour::EndpointIndependent)
    }

    /// The `Pinhole-NAT` header value an agent adds to the REGISTERs it relays:
    /// `mapping=eim;filtering=apdf;allocation=sequential;delta=1;window=203.0.113.2:31000`.
    /// Unknown parts are left out.
    pub fn to_header(&self) -> String {
        let mut parts = Vec::new();
        if let Some(m) = self.mapping {
            parts.push(format!("mapping={}", behaviour_token(m, "m")));
        }
        if let Some(f) = self.filtering {
            parts.push(format!("filtering={}", behaviour_token(f, "f")));
        }
        match self.allocation {
            Some(Allocation::Preserving) => parts.push("allocation=preserving".into()),
            Some(Allocation::Sequential { delta }) => parts.push(format!("allocation=sequential;delta={delta}")),
            Some(Allocation::PortBlock { size }) => parts.push(format!("allocation=port-block;block={size}")),
            Some(Allocation::Random) => parts.push("allocation=random".into()),
            None => {}
        }
        if let Some(w) = self.window {
            parts.push(format!("window={w}"));
        }
        if let Some(p) = self.portmap {
            parts.push(format!("portmap={}", p.token()));
        }
        parts.join(";")
    }

    /// Reads a `Pinhole-NAT` value; unknown parameters are ignored, malformed ones make
    /// the whole value unusable (`None`).
    pub fn parse_header(value: &str) -> Option<NatProfile> {
        let mut p = NatProfile { mapping: None, filtering: None, allocation: None, window: None, portmap: None };
        let (mut kind, mut delta, mut block) = (None, None, None);
        for part in value.split(';').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = part.split_once('=')?;
            match k.trim().to_ascii_lowercase().as_str() {
                "mapping" => p.mapping = Some(parse_behaviour(v, "m")?),
                "filtering" => p.filtering = Some(parse_behaviour(v, "f")?),
                "allocation" => kind = Some(v.trim().to_ascii_lowercase()),
                "delta" => delta = Some(v.trim().parse::<i32>().ok()?),
                "block" => block = Some(v.trim().parse::<u16>().ok()?),
                "window" => p.window = Some(v.trim().parse().ok()?),
                "portmap" => p.portmap = Some(crate::portmap::Protocol::from_token(v.trim())?),
                _ => {}
            }
        }
        p.allocation = match kind.as_deref() {
            None => None,
            Some("preserving") => Some(Allocation::Preserving),
            Some("sequential") => Some(Allocation::Sequential { delta: delta? }),
            Some("port-block") => Some(Allocation::PortBlock { size: block? }),
            Some("random") => Some(Allocation::Random),
            Some(_) => return None,
        };
        Some(p)
    }
}

/// RFC 4787's short names: `eim`/`adm`/`apdm` for mapping, `eif`/`adf`/`apdf` for filtering.
fn behaviour_token(b: Behaviour, suffix: &str) -> String {
    let stem = match b {
        Behaviour::EndpointIndependent => "ei",
        Behaviour::AddressDependent => "ad",
        Behaviour::AddressAndPortDependent => "apd",
    };
    format!("{stem}{suffix}")
}

fn parse_behaviour(v: &str, suffix: &str) -> Option<Behaviour> {
    let v = v.trim().to_ascii_lowercase();
    let stem = v.strip_suffix(suffix)?;
    match stem {
        "ei" => Some(Behaviour::EndpointIndependent),
        "ad" => Some(Behaviour::AddressDependent),
        "apd" => Some(Behaviour::AddressAndPortDependent),
        _ => None,
    }
}

/// Why no direct path is planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayReason {
    /// A profile lacks mapping, filtering, allocation or window.
    Unknown,
    /// Both sides map per destination and at least one unpredictably.
    Unpredictable,
}

/// The method for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// `target` admits the peer: the peer sends to `target`'s window. With `open_first`,
    /// `target` first sends one null packet to the peer's address (address-dependent
    /// filtering).
    Reach {
        target: Side,
        open_first: bool,
    },
    /// Both endpoint-independent: both send to each other's window, null packets first.
    SimultaneousOpen,
    /// `symmetric` allocates sequentially: it sends to the cone's window, and the cone
    /// sprays its next ports (`delta` apart, `window` either side).
    Prediction {
        symmetric: Side,
        delta: u16,
        window: u16,
    },
    /// Both sequential: each steps through the other's predicted ports in the same order.
    LockstepShotgun {
        delta: [u16; 2],
        window: u16,
    },
    /// `hard` allocates unpredictably: it opens `sockets` sockets towards the easy side's
    /// window, and the easy side sends up to `probes` probes to random ports.
    Birthday {
        hard: Side,
        sockets: u16,
        probes: u16,
    },
    RelayOnly(RelayReason),
}

impl Strategy {
    /// A label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Strategy::Reach { .. } => "reach",
            Strategy::SimultaneousOpen => "simultaneous-open",
            Strategy::Prediction { .. } => "prediction",
            Strategy::LockstepShotgun { .. } => "lockstep-shotgun",
            Strategy::Birthday { .. } => "birthday",
            Strategy::RelayOnly(_) => "relay",
        }
    }

    pub fn is_direct(&self) -> bool {
        !matches!(self, Strategy::RelayOnly(_))
    }
}

/// The method for a call between endpoints A and B (a side whose gateway maps ports counts
/// as a full cone).
pub fn choose(a: &NatProfile, b: &NatProfile) -> Strategy {
    let (a, b) = (&a.effective(), &b.effective());
    let complete = |p: &NatProfile| p.mapping.is_some() && p.filtering.is_some() && p.window.is_some();
    if !complete(a) || !complete(b) {
        return Strategy::RelayOnly(RelayReason::Unknown);
    }
    let sides = [(Side::A, a, b), (Side::B, b, a)];
    // A cone that filters by nothing, then one that filters by address only: reachable.
    for filtering in [Behaviour::EndpointIndependent, Behaviour::AddressDependent] {
        if let Some((target, _, _)) = sides.iter().find(|(_, p, _)| p.cone() && p.filtering == Some(filtering)) {
            return Strategy::Reach { target: *target, open_first: filtering == Behaviour::AddressDependent };
        }
    }
    match (a.cone(), b.cone()) {
        (true, true) => Strategy::SimultaneousOpen,
        (true, false) | (false, true) => {
            let (symmetric, p) = if a.cone() { (Side::B, b) } else { (Side::A, a) };
            match p.allocation {
                Some(Allocation::Sequential { delta }) => Strategy::Prediction {
                    symmetric,
                    delta: u16::try_from(delta.unsigned_abs()).unwrap_or(u16::MAX),
                    window: PREDICTION_WINDOW,
                },
                Some(Allocation::Preserving) => Strategy::Prediction { symmetric, delta: 0, window: PREDICTION_WINDOW },
                Some(Allocation::PortBlock { .. } | Allocation::Random) => {
                    Strategy::Birthday { hard: symmetric, sockets: BIRTHDAY_SOCKETS, probes: BIRTHDAY_PROBES }
                }
                None => Strategy::RelayOnly(RelayReason::Unknown),
            }
        }
        (false, false) => match (a.allocation, b.allocation) {
            (Some(Allocation::Sequential { delta: da }), Some(Allocation::Sequential { delta: db })) => {
                let d = |x: i32| u16::try_from(x.unsigned_abs()).unwrap_or(u16::MAX);
                Strategy::LockstepShotgun { delta: [d(da), d(db)], window: PREDICTION_WINDOW }
            }
            _ => Strategy::RelayOnly(RelayReason::Unpredictable),
        },
    }
}

pub mod path;
pub mod scheduler;
pub mod sdp;

#[cfg(test)]
mod tests;
