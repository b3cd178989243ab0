//! Punch planning at call time: when both ends of a new call registered through agents
//! that reported NAT profiles, pick the method a direct path would take (media::punch),
//! under the operator's `[punch]` policy, and report it as an event and a metric. Media
//! keeps flowing through the relay whatever the plan; carrying plans out to the agents
//! comes next.

use pinhole_media::punch::{choose, NatProfile};

use super::requests::request_user;
use super::*;

impl<M: MediaAnchor> Proxy<M> {
    /// A new INVITE from `flow` (caller `auth_user`) is about to go to `targets`.
    pub(super) fn plan_punch(
        &mut self,
        now: Instant,
        flow: Flow,
        msg: &Message,
        auth_user: Option<&str>,
        targets: &[Target],
    ) {
        let Some(call_id) = msg.call_id() else { return };
        // The caller's profile: its binding on the very flow the INVITE came in on.
        let unix = self.unix(now);
        let caller = auth_user.and_then(|u| {
            let aor = format!("{u}@{}", self.cfg.domain);
            self.registrar.lookup(&aor, unix).into_iter().find(|b| b.flow().remote == flow.remote)
        });
        let Some(caller_profile) =
            caller.as_ref().and_then(|b| b.nat_profile.as_deref()).and_then(NatProfile::parse_header)
        else {
            return;
        };
        let callee_user = request_user(msg);
        for t in targets {
            let Some(callee_profile) = t.nat_profile.as_deref().and_then(NatProfile::parse_header) else { continue };
            let users: Vec<&str> = auth_user.into_iter().chain(callee_user.as_deref()).collect();
            let addrs: Vec<IpAddr> = [Some(flow.remote.ip()), Some(t.flow.remote.ip())]
                .into_iter()
                .chain([caller_profile.window, callee_profile.window].map(|w| w.map(|a| a.ip())))
                .chain([
                    caller.as_ref().and_then(|b| contact_ip(&b.contact)),
                    t.request_uri.as_deref().and_then(contact_ip),
                ])
                .flatten()
                .collect();
            let method = if self.cfg.punch.allows(&users, &addrs) {
                choose(&caller_profile, &callee_profile).label()
            } else {
                "denied"
            };
            tracing::info!(call_id, caller = ?auth_user, callee = ?callee_user, method, "punch plan (media stays relayed until plans are carried out)");
            metrics::counter!("pinhole_punch_plans_total", "method" => method).increment(1);
            self.events.push_back(ProxyEvent::PunchPlanned { call_id: call_id.to_owned(), method });
        }
    }
}

/// The host of a SIP URI, when it is an IP literal (a phone's private address).
fn contact_ip(uri: &str) -> Option<IpAddr> {
    let u = parse_sip_uri(uri)?;
    host_string(&u.host_port.host).trim_matches(['[', ']']).parse().ok()
}
