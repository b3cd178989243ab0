//! Trunk health: the registration pinhole keeps with each `register = true` trunk
//! (refreshed before it expires, challenges answered with the trunk's credentials, retried
//! with backoff when the registrar fails or is silent) and OPTIONS pings that mark a trunk
//! up or down (calls skip down trunks).

use std::cmp::Reverse;
use std::time::{Duration, Instant};

use super::build::{host_port, transport_param, RequestSpec};
use super::{B2bua, Purpose, Timer, BRANCH_PREFIX};
use crate::message::{HeaderName, Message};
use crate::transport::Flow;

/// A ping unanswered this long counts as failed.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Failed pings in a row after which a trunk is down.
pub const PINGS_TO_DOWN: u32 = 2;
/// Registration retries: the first after this, doubling up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_secs(2);
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub(super) struct TrunkHealth {
    pub up: bool,
    pub registered: bool,
    /// The registration's Call-ID, From tag and CSeq (one dialog-like sequence, §10.2).
    reg_call_id: String,
    reg_tag: String,
    reg_cseq: u32,
    /// A challenge was answered on the current REGISTER (a second one is a failure).
    reg_challenged: bool,
    backoff: Duration,
    failed_pings: u32,
}

impl Default for TrunkHealth {
    fn default() -> Self {
        TrunkHealth {
            up: true,
            registered: false,
            reg_call_id: String::new(),
            reg_tag: String::new(),
            reg_cseq: 0,
            reg_challenged: false,
            backoff: BACKOFF_MIN,
            failed_pings: 0,
        }
    }
}

impl B2bua {
    /// Starts registrations and pings (called once, when the proxy starts).
    pub fn start(&mut self, now: Instant) {
        for (t, trunk) in self.cfg.trunks.iter().enumerate() {
            metrics::gauge!("pinhole_trunk_registered", "trunk" => trunk.name.clone()).set(0.0);
            metrics::gauge!("pinhole_trunk_up", "trunk" => trunk.name.clone()).set(1.0);
            if trunk.register {
                self.timers.push(Reverse((now, Timer::Register(t))));
            }
            if trunk.options_interval > 0 {
                self.timers.push(Reverse((now + Duration::from_secs(1), Timer::Ping(t))));
            }
        }
    }

    /// Whether trunk `t` is registered now, and whether it is up.
    pub fn trunk_state(&self, t: usize) -> Option<(bool, bool)> {
        self.health.get(t).map(|h| (h.registered, h.up))
    }

    fn trunk_flow(&self, t: usize) -> Option<(Flow, String)> {
        let trunk = self.cfg.trunks.get(t)?;
        let iface = self.interface_for(trunk.transport)?;
        let flow = Flow { transport: trunk.transport, local: iface.bind, remote: trunk.address, conn: None };
        Some((flow, iface.host_port()))
    }

    /// A REGISTER to trunk `t` (with `auth` after a challenge).
    pub(super) fn register(&mut self, now: Instant, t: usize, auth: Option<(&str, String)>) {
        let branch = format!("{BRANCH_PREFIX}{}", self.random_hex(8));
        if self.health.get(t).is_some_and(|h| h.reg_call_id.is_empty()) {
            let (call_id, tag) = (self.random_hex(12), format!("pb{}", self.random_hex(6)));
            self.health[t].reg_call_id = call_id;
            self.health[t].reg_tag = tag;
        }
        let Some((flow, our)) = self.trunk_flow(t) else { return };
        let trunk = &self.cfg.trunks[t];
        let host = host_port(trunk.address);
        let h = &mut self.health[t];
        h.reg_cseq += 1;
        if auth.is_none() {
            h.reg_challenged = false;
        }
        let aor = format!("<sip:{}@{host}>", trunk.username);
        let extra = [
            Some(format!("Expires: {}", trunk.register_expires)),
            auth.map(|(name, value)| format!("{name}: {value}")),
        ];
        let extra: Vec<String> = extra.into_iter().flatten().collect();
        let bytes = RequestSpec {
            method: "REGISTER",
            uri: &format!("sip:{host}"),
            via: &format!("SIP/2.0/{} {our};branch={branch};rport", flow.transport.via_token()),
            from: &format!("{aor};tag={}", h.reg_tag),
            to: &aor,
            call_id: &h.reg_call_id,
            cseq: h.reg_cseq,
            contact: Some(&format!("<sip:{}@{our}{}>", trunk.username, transport_param(flow.transport))),
            routes: &[],
            extra: &extra,
            body: None,
        }
        .build();
        self.start_client(now, branch, 0, Purpose::Register(t), flow, bytes, false);
    }

    pub(super) fn on_register_response(&mut self, now: Instant, t: usize, msg: &Message) {
        let Some(code) = msg.status() else { return };
        if code < 200 {
            return;
        }
        if (code == 401 || code == 407) && !self.health[t].reg_challenged {
            let host = self.cfg.trunks.get(t).map(|tr| host_port(tr.address)).unwrap_or_default();
            if let Some(auth) = self.credentials_for(t, msg, "REGISTER", &format!("sip:{host}")) {
                self.health[t].reg_challenged = true;
                self.register(now, t, Some(auth));
                return;
            }
        }
        if !(200..300).contains(&code) {
            self.registration_failed(now, t, "refused");
            return;
        }
        let Some(trunk) = self.cfg.trunks.get(t) else { return };
        let granted = granted_expires(msg).unwrap_or(trunk.register_expires).clamp(10, trunk.register_expires.max(10));
        let h = &mut self.health[t];
        h.backoff = BACKOFF_MIN;
        if !h.registered {
            tracing::info!(trunk = %trunk.name, expires = granted, "registered to the trunk");
        }
        h.registered = true;
        metrics::gauge!("pinhole_trunk_registered", "trunk" => trunk.name.clone()).set(1.0);
        // Refreshed well before it runs out: at 80 % of the time granted.
        let refresh = Duration::from_millis(granted * 800);
        self.timers.push(Reverse((now + refresh, Timer::Register(t))));
    }

    pub(super) fn registration_failed(&mut self, now: Instant, t: usize, why: &str) {
        let Some(trunk) = self.cfg.trunks.get(t) else { return };
        let h = &mut self.health[t];
        let retry = h.backoff;
        h.backoff = (h.backoff * 2).min(BACKOFF_MAX);
        h.registered = false;
        metrics::gauge!("pinhole_trunk_registered", "trunk" => trunk.name.clone()).set(0.0);
        tracing::warn!(trunk = %trunk.name, why, retry_in = ?retry, "trunk registration failed");
        self.timers.push(Reverse((now + retry, Timer::Register(t))));
    }

    /// An OPTIONS ping to trunk `t`, and the next one scheduled.
    pub(super) fn ping(&mut self, now: Instant, t: usize) {
        let Some(interval) = self.cfg.trunks.get(t).map(|tr| tr.options_interval).filter(|i| *i > 0) else { return };
        self.timers.push(Reverse((now + Duration::from_secs(interval), Timer::Ping(t))));
        let branch = format!("{BRANCH_PREFIX}{}", self.random_hex(8));
        let (call_id, tag) = (self.random_hex(12), self.random_hex(6));
        let Some((flow, our)) = self.trunk_flow(t) else { return };
        let host = host_port(self.cfg.trunks[t].address);
        let bytes = RequestSpec {
            method: "OPTIONS",
            uri: &format!("sip:{host}"),
            via: &format!("SIP/2.0/{} {our};branch={branch};rport", flow.transport.via_token()),
            from: &format!("<sip:ping@{our}>;tag=pb{tag}"),
            to: &format!("<sip:{host}>"),
            call_id: &call_id,
            cseq: 1,
            contact: None,
            routes: &[],
            extra: &[],
            body: None,
        }
        .build();
        self.start_client(now, branch.clone(), 0, Purpose::Ping(t), flow, bytes, false);
        // A ping gives up sooner than a transaction would.
        if let Some(tx) = self.clients.get_mut(&branch) {
            tx.deadline = now + PING_TIMEOUT;
            self.timers.push(Reverse((now + PING_TIMEOUT, Timer::Client(branch))));
        }
    }

    /// Any final answer means the trunk is there.
    pub(super) fn on_ping_response(&mut self, _now: Instant, t: usize) {
        let Some(trunk) = self.cfg.trunks.get(t) else { return };
        let h = &mut self.health[t];
        h.failed_pings = 0;
        if !h.up {
            tracing::info!(trunk = %trunk.name, "trunk up");
            metrics::gauge!("pinhole_trunk_up", "trunk" => trunk.name.clone()).set(1.0);
        }
        h.up = true;
    }

    pub(super) fn ping_failed(&mut self, _now: Instant, t: usize) {
        let Some(trunk) = self.cfg.trunks.get(t) else { return };
        let h = &mut self.health[t];
        h.failed_pings += 1;
        if h.up && h.failed_pings >= PINGS_TO_DOWN {
            h.up = false;
            tracing::warn!(trunk = %trunk.name, "trunk down: OPTIONS unanswered");
            metrics::gauge!("pinhole_trunk_up", "trunk" => trunk.name.clone()).set(0.0);
        }
    }
}

/// The registration time the registrar granted: our Contact's `expires`, else `Expires`.
fn granted_expires(msg: &Message) -> Option<u64> {
    let from_contact = msg
        .value_texts(HeaderName::Contact)
        .into_iter()
        .find_map(|c| c.split(';').find_map(|p| p.trim().strip_prefix("expires=").and_then(|v| v.trim().parse().ok())));
    from_contact.or_else(|| msg.header(HeaderName::Expires).and_then(|v| v.trim().parse().ok()))
}
