//! Transactions (RFC 3261 §17, RFC 6026): client transactions with timers A–F/K/M and
//! Timer C, server transactions with G–J/L, response selection across forked branches
//! (§16.7) and CANCEL.

use super::*;

impl<M: MediaAnchor> Proxy<M> {
    pub(super) fn start_client(&mut self, now: Instant, key: String, owner: Owner, flow: Flow, sent: Message) {
        self.out.push_back(Transmit { flow, payload: sent.raw().to_vec() });
        let udp = flow.transport == Transport::Udp;
        let ct = ClientTx {
            owner,
            flow,
            sent,
            state: CState::Trying,
            retransmit_at: udp.then(|| now + T1),
            interval: T1,
            timeout_at: Some(now + TIMEOUT_64T1),
            cleanup_at: None,
            final_code: None,
            cancel_requested: false,
            ack: None,
            rr: None,
        };
        if let Some(t) = ct.retransmit_at {
            self.timers.push(Reverse((t, TimerRef::Client(key.clone()))));
        }
        self.timers.push(Reverse((now + TIMEOUT_64T1, TimerRef::Client(key.clone()))));
        self.client_txs.insert(key, ct);
    }

    pub(super) fn on_cancel(&mut self, now: Instant, flow: Flow, msg: &Message, branch: &str) {
        let invite_key = server_key(branch, &Method::Invite);
        let tag = self.local_tag(msg);
        let Some(st) = self.server_txs.get(&invite_key) else {
            let r = msg.response(481, "Call/Transaction Does Not Exist", Some(&tag), &[]);
            self.send_response_stateless(flow, r, 481);
            return;
        };
        let ok = msg.response(200, "OK", Some(&st.to_tag), &[]);
        let (final_sent, branches) = (st.final_sent, st.branches.clone());
        self.send_response_stateless(flow, ok, 200);
        if final_sent {
            return;
        }
        for b in branches {
            self.cancel_branch(now, &b);
        }
    }

    /// Sends CANCEL for a pending INVITE branch (§9.1), or remembers to once it rings.
    pub(super) fn cancel_branch(&mut self, now: Instant, branch: &str) {
        let Some(ct) = self.client_txs.get_mut(branch) else {
            return;
        };
        if ct.final_code.is_some() || ct.cancel_requested && ct.state != CState::Proceeding {
            return;
        }
        ct.cancel_requested = true;
        if ct.state != CState::Proceeding {
            return; // §9.1: wait for a provisional response before cancelling
        }
        let cancel = build_cancel(&ct.sent);
        let flow = ct.flow;
        let key = format!("{branch};CANCEL");
        if self.client_txs.contains_key(&key) {
            return;
        }
        if let Ok(sent) = Message::parse(Bytes::from(cancel)) {
            self.start_client(now, key, Owner::Cancel, flow, sent);
        }
    }

    pub(super) fn on_response(&mut self, now: Instant, flow: Flow, msg: Message) {
        if self.b2bua.owns_response(&msg) {
            self.b2bua.on_response(now, flow, msg, &mut self.media);
            return;
        }
        let code = msg.status().unwrap_or(0);
        self.count_response(code, false);
        let Some(branch) = msg.branch().map(str::to_owned) else {
            self.stats.unmatched_responses += 1;
            return;
        };
        let cancel = msg.cseq().is_some_and(|(_, m)| m == Method::Cancel);
        let key = if cancel { format!("{branch};CANCEL") } else { branch };
        let Some(ct) = self.client_txs.get_mut(&key) else {
            self.stats.unmatched_responses += 1;
            return;
        };
        let invite = ct.invite();
        let owner = ct.owner.clone();
        if let (Some(flows), 101..=299) = (ct.rr, code) {
            let from_tag = ct.sent.tag(HeaderName::From).map(str::to_owned);
            if let (Some(call_id), Some(from_tag), Some(to_tag)) = (msg.call_id(), from_tag, msg.tag(HeaderName::To)) {
                self.established.establish(now, call_id, &from_tag, to_tag, flows, code >= 200);
            }
        }
        let Some(ct) = self.client_txs.get_mut(&key) else { return };
        if code < 200 {
            if matches!(ct.state, CState::Trying | CState::Proceeding) {
                ct.state = CState::Proceeding;
                ct.retransmit_at = if invite { None } else { ct.retransmit_at };
                if invite {
                    ct.timeout_at = Some(now + TIMER_C);
                    self.timers.push(Reverse((now + TIMER_C, TimerRef::Client(key.clone()))));
                }
                let cancel_now = invite && ct.cancel_requested;
                if cancel_now {
                    ct.cancel_requested = false;
                    self.cancel_branch(now, &key);
                }
                if code > 100 {
                    if let Owner::Server(sk) = &owner {
                        self.forward_response(now, sk, &msg, Some(flow));
                    }
                }
            }
            return;
        }
        match ct.state {
            CState::Completed => {
                // Retransmitted final: repeat our ACK (§17.1.1.2).
                if let Some(ack) = ct.ack.clone() {
                    let flow = ct.flow;
                    self.out.push_back(Transmit { flow, payload: ack });
                }
                return;
            }
            CState::Accepted => {
                if (200..300).contains(&code) {
                    if let Owner::Server(sk) = &owner {
                        self.forward_response(now, sk, &msg, Some(flow));
                    }
                }
                return;
            }
            _ => {}
        }
        ct.final_code = Some(code);
        ct.retransmit_at = None;
        ct.timeout_at = None;
        let reliable = ct.flow.transport != Transport::Udp;
        if invite && (200..300).contains(&code) {
            ct.state = CState::Accepted;
            ct.cleanup_at = Some(now + TIMEOUT_64T1);
        } else {
            ct.state = CState::Completed;
            if invite {
                let ack = build_ack(&ct.sent, &msg);
                ct.ack = Some(ack.clone());
                let flow = ct.flow;
                self.out.push_back(Transmit { flow, payload: ack });
            }
            let wait = if reliable {
                Duration::ZERO
            } else if invite {
                TIMEOUT_64T1
            } else {
                T4
            };
            if let Some(ct) = self.client_txs.get_mut(&key) {
                ct.cleanup_at = Some(now + wait);
            }
        }
        if let Some(ct) = self.client_txs.get(&key) {
            if let Some(c) = ct.cleanup_at {
                self.timers.push(Reverse((c, TimerRef::Client(key.clone()))));
            }
        }
        match owner {
            Owner::Server(sk) => self.branch_final(now, &sk, &key, msg, flow),
            Owner::Keepalive { aor, contact } => self.keepalive_result(&aor, &contact, true),
            Owner::Cancel | Owner::Local => {}
        }
    }

    /// A branch reached a final response: 2xx goes up at once, others wait for the best
    /// (§16.7).
    pub(super) fn branch_final(&mut self, now: Instant, sk: &str, branch: &str, msg: Message, from: Flow) {
        let code = msg.status().unwrap_or(500);
        let Some(st) = self.server_txs.get_mut(sk) else {
            return;
        };
        if (200..300).contains(&code) {
            let others: Vec<String> = st.branches.iter().filter(|b| *b != branch).cloned().collect();
            self.forward_response(now, sk, &msg, Some(from));
            for b in others {
                self.cancel_branch(now, &b);
            }
            return;
        }
        if st.final_sent && code >= 300 {
            return;
        }
        let better = match &st.best {
            None => true,
            Some(b) => rank(code) < rank(b.status().unwrap_or(500)),
        };
        if better {
            st.best = Some(msg);
        }
        self.maybe_finish(now, sk);
    }

    pub(super) fn maybe_finish(&mut self, now: Instant, sk: &str) {
        let Some(st) = self.server_txs.get(sk) else {
            return;
        };
        if st.final_sent {
            return;
        }
        let pending = st.branches.iter().any(|b| self.client_txs.get(b).is_some_and(|c| c.final_code.is_none()));
        if pending {
            return;
        }
        match st.best.clone() {
            Some(best) => self.forward_response(now, sk, &best, None),
            None => self.respond(now, sk, 408, "Request Timeout", &[]),
        }
    }

    /// Sends a downstream response upstream through server transaction `sk`, without our Via.
    pub(super) fn forward_response(&mut self, now: Instant, sk: &str, msg: &Message, from: Option<Flow>) {
        let code = msg.status().unwrap_or(500);
        let up = self.server_txs.get(sk).map(|st| st.flow);
        let mut body = match from.map(|f| (f, self.media_response(now, f, up, msg))) {
            None => None,
            Some((_, Ok(b))) => b,
            Some((from, Err(_))) => {
                let wait = MediaWait::Response { sk: sk.to_owned(), msg: msg.clone(), from };
                if self.wait_for_media(msg.call_id(), wait) {
                    return;
                }
                None
            }
        };
        if (200..300).contains(&code) && msg.cseq().is_some_and(|(_, m)| m == Method::Invite) {
            body = self.with_punch_plan(msg, Side::A, body);
        }
        if let (Some(f), true) = (from, (200..300).contains(&code)) {
            if let Some(st) = self.server_txs.get(sk) {
                if st.invite && st.request.tag(HeaderName::To).is_none() {
                    let (req, up) = (st.request.clone(), st.flow);
                    self.media_dialog(&req, up, msg, f);
                }
            }
        }
        let Some((hi, r)) = msg.values(HeaderName::Via).into_iter().next() else {
            return;
        };
        let mut e = Editor::new(msg);
        e.remove_value(hi, r);
        if code == 503 {
            // §16.7 step 6: a 503 from downstream must not make upstream avoid us.
            let sl = msg.start_line_range();
            e.replace(sl, "SIP/2.0 500 Service Unavailable Downstream");
        }
        if let Some(b) = &body {
            e.set_body(b);
        }
        let bytes = e.finish();
        self.send_on_server(now, sk, code, bytes);
    }

    /// Builds and sends a local response on a server transaction.
    pub(super) fn respond(&mut self, now: Instant, sk: &str, code: u16, reason: &str, extra: &[String]) {
        let Some(st) = self.server_txs.get(sk) else {
            return;
        };
        let bytes = st.request.response(code, reason, Some(&st.to_tag), extra);
        self.send_on_server(now, sk, code, bytes);
    }

    pub(super) fn send_on_server(&mut self, now: Instant, sk: &str, code: u16, bytes: Vec<u8>) {
        let Some(st) = self.server_txs.get(sk) else {
            return;
        };
        if st.final_sent && !(st.invite && (200..300).contains(&code) && st.state == SState::Accepted) {
            return;
        }
        self.count_response(code, true);
        let Some(st) = self.server_txs.get_mut(sk) else {
            return;
        };
        self.out.push_back(Transmit { flow: st.flow, payload: bytes.clone() });
        st.last_response = Some(bytes);
        if code < 200 {
            return;
        }
        let udp = st.flow.transport == Transport::Udp;
        st.final_sent = true;
        let failed_call = (st.invite && code >= 300 && st.request.tag(HeaderName::To).is_none())
            .then(|| st.request.call_id().map(str::to_owned))
            .flatten();
        if st.invite && (200..300).contains(&code) {
            st.state = SState::Accepted;
            st.cleanup_at = Some(now + TIMEOUT_64T1);
        } else if st.invite {
            st.state = SState::Completed;
            if udp {
                st.retransmit_at = Some(now + T1);
                st.interval = T1;
                self.timers.push(Reverse((now + T1, TimerRef::Server(sk.to_owned()))));
            }
            st.timeout_at = Some(now + TIMEOUT_64T1);
        } else {
            st.state = SState::Completed;
            st.cleanup_at = Some(now + if udp { TIMEOUT_64T1 } else { Duration::ZERO });
        }
        let next = [st.cleanup_at, st.timeout_at].into_iter().flatten().min();
        if let Some(t) = next {
            self.timers.push(Reverse((t, TimerRef::Server(sk.to_owned()))));
        }
        if let Some(call_id) = failed_call {
            self.media_end(now, &call_id);
        }
    }

    pub(super) fn send_response_stateless(&mut self, flow: Flow, bytes: Vec<u8>, code: u16) {
        self.count_response(code, true);
        self.out.push_back(Transmit { flow, payload: bytes });
    }

    pub(super) fn server_timer(&mut self, now: Instant, key: &str) {
        let Some(st) = self.server_txs.get_mut(key) else {
            return;
        };
        if st.cleanup_at.is_some_and(|t| t <= now) || st.timeout_at.is_some_and(|t| t <= now) {
            // Timer H, I, J or L: the transaction ends.
            self.server_txs.remove(key);
            return;
        }
        if let Some(t) = st.retransmit_at.filter(|t| *t <= now) {
            let _ = t;
            if let Some(r) = &st.last_response {
                self.out.push_back(Transmit { flow: st.flow, payload: r.clone() });
            }
            st.interval = (st.interval * 2).min(T2);
            st.retransmit_at = Some(now + st.interval);
            self.timers.push(Reverse((now + st.interval, TimerRef::Server(key.to_owned()))));
        }
    }

    pub(super) fn client_timer(&mut self, now: Instant, key: &str) {
        let Some(ct) = self.client_txs.get_mut(key) else {
            return;
        };
        if ct.cleanup_at.is_some_and(|t| t <= now) {
            // Timers D, K, M: absorb time over.
            self.client_txs.remove(key);
            return;
        }
        if ct.timeout_at.is_some_and(|t| t <= now) && ct.final_code.is_none() {
            let owner = ct.owner.clone();
            if ct.invite() && ct.state == CState::Proceeding {
                // Timer C: cancel the ringing branch; its 487 finishes it.
                ct.timeout_at = Some(now + TIMEOUT_64T1);
                ct.cancel_requested = false;
                self.timers.push(Reverse((now + TIMEOUT_64T1, TimerRef::Client(key.to_owned()))));
                self.cancel_branch(now, key);
                return;
            }
            // Timer B or F: the branch timed out (§17.1.1.2, §17.1.2.2).
            ct.final_code = Some(408);
            self.client_txs.remove(key);
            match owner {
                Owner::Server(sk) => self.maybe_finish(now, &sk),
                Owner::Keepalive { aor, contact } => self.keepalive_result(&aor, &contact, false),
                Owner::Cancel | Owner::Local => {}
            }
            return;
        }
        if let Some(t) = ct.retransmit_at.filter(|t| *t <= now) {
            let _ = t;
            self.out.push_back(Transmit { flow: ct.flow, payload: ct.sent.raw().to_vec() });
            ct.interval = if ct.invite() { ct.interval * 2 } else { (ct.interval * 2).min(T2) };
            let next = now + ct.interval;
            ct.retransmit_at = Some(next);
            self.timers.push(Reverse((next, TimerRef::Client(key.to_owned()))));
        }
    }
}

pub(super) fn server_key(branch: &str, method: &Method) -> String {
    let kind = match method {
        Method::Ack | Method::Invite => "INVITE",
        m => m.as_str(),
    };
    format!("{branch};{kind}")
}

/// §16.7 step 6 preference: 6xx, then the lowest class.
pub(super) fn rank(code: u16) -> u16 {
    if code >= 600 {
        0
    } else {
        code
    }
}
