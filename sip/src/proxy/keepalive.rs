//! Housekeeping and NAT keepalives: registrations expire, keepalives go to each binding
//! at its own (learned) interval, and a binding whose keepalives fail is removed.

use super::*;

impl<M: MediaAnchor> Proxy<M> {
    pub(super) fn housekeeping(&mut self, now: Instant) {
        let unix = self.unix(now);
        if self.registrar.expire(unix) > 0 {
            metrics::gauge!("pinhole_registrar_bindings").set(self.registrar.binding_count() as f64);
        }
        self.auth.expire(now);
        self.established.expire(now);
        self.budget.expire(now);
        metrics::gauge!("pinhole_sip_transactions").set(self.transaction_count() as f64);
        metrics::gauge!("pinhole_sip_dialogs").set(self.established.len() as f64);
        if self.cfg.keepalive == Keepalive::Off {
            return;
        }
        let interval = self.cfg.keepalive_interval.as_secs().max(1);
        let options = self.cfg.keepalive == Keepalive::Options;
        let mut due = Vec::new();
        // Another node's binding is kept alive by that node, down its own flow.
        for (aor, b) in self.registrar.bindings_mut().filter(|(_, b)| b.node.is_none()) {
            if b.next_keepalive <= unix {
                b.next_keepalive = unix + b.keepalive_every(interval);
                if options && b.keepalive_pending_since == 0 {
                    b.keepalive_pending_since = unix;
                }
                due.push((aor.clone(), b.clone()));
            }
        }
        for (aor, b) in due {
            metrics::counter!("pinhole_nat_keepalives_total", "result" => "sent").increment(1);
            self.send_keepalive(now, &aor, &b);
        }
    }

    pub(super) fn send_keepalive(&mut self, now: Instant, aor: &str, b: &Binding) {
        let flow = b.flow();
        if b.transport.is_stream() && self.cfg.keepalive == Keepalive::Crlf {
            self.out.push_back(Transmit { flow, payload: b"\r\n\r\n".to_vec() });
            return;
        }
        if self.cfg.keepalive == Keepalive::Crlf && b.transport == Transport::Udp {
            // RFC 5626 §4.4.2 uses STUN on datagrams; a CRLF still refreshes NAT state.
            self.out.push_back(Transmit { flow, payload: b"\r\n\r\n".to_vec() });
            return;
        }
        let Some(iface) = self.interface_index(flow.transport, flow.local, flow.remote) else {
            return;
        };
        let branch = format!("{BRANCH_PREFIX}ka.{:016x}", self.rng.gen::<u64>());
        let hp = self.cfg.interfaces[iface].host_port();
        let req = format!(
            "OPTIONS {} SIP/2.0\r\nVia: SIP/2.0/{} {hp};branch={branch}\r\nMax-Forwards: 70\r\nTo: <{}>\r\nFrom: <sip:pinhole@{}>;tag={:08x}\r\nCall-ID: ka-{:016x}@{}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
            b.contact,
            flow.transport.via_token(),
            b.contact,
            self.cfg.domain,
            self.rng.gen::<u32>(),
            self.rng.gen::<u64>(),
            self.cfg.domain,
        );
        if let Ok(sent) = Message::parse(Bytes::from(req)) {
            let owner = Owner::Keepalive { aor: aor.to_owned(), contact: b.contact.clone() };
            self.start_client(now, branch, owner, flow, sent);
        }
    }

    pub(super) fn keepalive_result(&mut self, aor: &str, contact: &str, ok: bool) {
        let mut dead = false;
        for (a, b) in self.registrar.bindings_mut() {
            if a == aor && b.contact == contact {
                if ok {
                    b.keepalive_failures = 0;
                    b.keepalive_pending_since = 0;
                    metrics::counter!("pinhole_nat_keepalives_total", "result" => "answered").increment(1);
                } else {
                    metrics::counter!("pinhole_nat_keepalives_total", "result" => "unanswered").increment(1);
                    b.keepalive_failures += 1;
                    dead = b.keepalive_failures >= KEEPALIVE_MAX_FAILURES;
                }
            }
        }
        if dead {
            tracing::info!(aor, contact, "binding expired after failed keepalives");
            self.registrar.remove(aor, contact);
        }
    }
}
