//! Forwarding: splicing a received request into the one we send (Via with a
//! loop-detecting branch, Record-Route with flow tokens, Max-Forwards, Route removal,
//! received/rport), stateless ACK forwarding, and hop-by-hop CANCEL/ACK construction.

use super::*;

impl<M: MediaAnchor> Proxy<M> {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn forward_request(
        &mut self,
        now: Instant,
        key: &str,
        in_flow: Flow,
        msg: &Message,
        strip: &[(usize, std::ops::Range<usize>)],
        target: Target,
        record_route: bool,
        loop_hash: u64,
        body: Option<&[u8]>,
    ) {
        let Some(out_iface) = self.interface_index(target.flow.transport, target.flow.local, target.flow.remote) else {
            self.respond(now, key, 503, "No Interface For Transport", &[]);
            return;
        };
        let in_iface = self.interface_index(in_flow.transport, in_flow.local, in_flow.remote).unwrap_or(out_iface);
        let mut flow = target.flow;
        flow.local = self.cfg.interfaces[out_iface].bind;
        let branch = format!("{BRANCH_PREFIX}{loop_hash:016x}.{:08x}", self.rng.gen::<u32>());

        let mut e = Editor::new(msg);
        if let Some(uri) = &target.request_uri {
            if let crate::message::StartLine::Request { uri: r, .. } = &msg.start {
                e.replace(r.clone(), uri.clone());
            }
        }
        let via = format!(
            "SIP/2.0/{} {};branch={branch}",
            flow.transport.via_token(),
            self.cfg.interfaces[out_iface].host_port()
        );
        e.prepend_header("Via", &via);
        let rr = record_route.then_some(DialogFlows { a: (in_iface, in_flow.remote), b: (out_iface, flow.remote) });
        if let Some(flows) = rr {
            let (call_id, from_tag) = (msg.call_id().unwrap_or(""), msg.tag(HeaderName::From).unwrap_or(""));
            let token = encode_token(&self.cfg.secret, flows, call_id, from_tag);
            let rr_out = self.rr_uri(out_iface, &token);
            e.prepend_header("Record-Route", &rr_out);
            if in_iface != out_iface {
                // §4 of RFC 5658: one entry per interface the dialog crosses.
                let rr_in = self.rr_uri(in_iface, &token);
                e.prepend_header("Record-Route", &rr_in);
            }
        }
        for r in &target.routes {
            e.prepend_header("Route", r);
        }
        for (hi, r) in strip {
            e.remove_value(*hi, r.clone());
        }
        fix_top_via(msg, &mut e, in_flow);
        if let Some(b) = body {
            e.set_body(b);
        }
        e.decrement_max_forwards();
        let bytes = e.finish();
        let Ok(sent) = Message::parse(Bytes::from(bytes)) else {
            self.respond(now, key, 500, "Internal Error Building Request", &[]);
            return;
        };
        if let Some(st) = self.server_txs.get_mut(key) {
            st.branches.push(branch.clone());
        }
        self.start_client(now, branch.clone(), Owner::Server(key.to_owned()), flow, sent);
        if let Some(ct) = self.client_txs.get_mut(&branch) {
            ct.rr = rr;
        }
    }

    /// ACK for a 2xx is its own transaction (§13.2.2.4): forward it without state.
    pub(super) fn forward_ack(&mut self, now: Instant, flow: Flow, msg: &Message) {
        let routing = self.route_info(msg);
        if !self.dialog_vouches(now, flow, msg, &Method::Ack, &routing) && !self.is_trusted(flow.remote.ip()) {
            return; // not a dialog we saw established, from one of its sides: never relay for strangers
        }
        let RouteInfo { strip, flows: dialog, remaining } = routing;
        let to_us = remaining.is_empty() && self.request_uri_is_us(msg);
        let Ok(targets) = self.targets(now, flow, msg, &remaining, dialog, to_us) else {
            return;
        };
        let Some(target) = targets.into_iter().next() else {
            return;
        };
        let Some(iface) = self.interface_index(target.flow.transport, target.flow.local, target.flow.remote) else {
            return;
        };
        let mut out = target.flow;
        out.local = self.cfg.interfaces[iface].bind;
        let mut h = DefaultHasher::new();
        msg.branch().hash(&mut h);
        let branch = format!("{BRANCH_PREFIX}{:016x}.ack", h.finish());
        let body = match self.media_request(now, flow, msg, Some(target.flow)) {
            Ok(b) => b,
            Err(NotAnchored::Waiting)
                if self.wait_for_media(msg.call_id(), MediaWait::Ack { flow, msg: msg.clone() }) =>
            {
                return;
            }
            Err(_) => None,
        };
        // A late offer's answer: the callee's plan rides on it. Then the plans retire (the
        // caller has its 2xx, and with it its plan).
        let body = self.with_punch_plan(msg, Side::B, body);
        if let Some(call_id) = msg.call_id() {
            self.punch_plans.remove(call_id);
        }
        let mut e = Editor::new(msg);
        if let Some(b) = &body {
            e.set_body(b);
        }

        if let Some(uri) = &target.request_uri {
            if let crate::message::StartLine::Request { uri: r, .. } = &msg.start {
                e.replace(r.clone(), uri.clone());
            }
        }
        let via =
            format!("SIP/2.0/{} {};branch={branch}", out.transport.via_token(), self.cfg.interfaces[iface].host_port());
        e.prepend_header("Via", &via);
        for (hi, r) in &strip {
            e.remove_value(*hi, r.clone());
        }
        if let Some(h) = msg.headers.iter().find(|h| h.name == HeaderName::MaxForwards) {
            let mf = msg.max_forwards().and_then(Result::ok).unwrap_or(70);
            if mf == 0 {
                return;
            }
            e.replace(h.value.clone(), (mf - 1).to_string());
        }
        self.out.push_back(Transmit { flow: out, payload: e.finish() });
    }

    /// §16.6 step 8: the part of our branch that detects loops.
    pub(super) fn loop_hash(&self, msg: &Message) -> u64 {
        let mut h = DefaultHasher::new();
        msg.request_uri().hash(&mut h);
        msg.tag(HeaderName::From).hash(&mut h);
        msg.header(HeaderName::To).hash(&mut h);
        msg.call_id().hash(&mut h);
        msg.cseq().map(|(n, _)| n).hash(&mut h);
        msg.value_texts(HeaderName::Route).hash(&mut h);
        msg.value_texts(HeaderName::ProxyRequire).hash(&mut h);
        h.finish()
    }

    pub(super) fn is_loop(&self, msg: &Message, hash: u64) -> bool {
        let ours = format!("{BRANCH_PREFIX}{hash:016x}.");
        // Only a Via whose text holds our branch can be ours: the others are not parsed.
        msg.values(HeaderName::Via)
            .into_iter()
            .filter(|(_, r)| msg.text(r.clone()).contains(&ours))
            .filter_map(|(_, r)| msg.parse_value::<ezk_sip_types::header::typed::Via>(r))
            .any(|v| {
                let sent_by_us = self.host_is_us(&host_string(&v.sent_by.host), v.sent_by.port);
                sent_by_us && v.params.get_val("branch").is_some_and(|b| b.starts_with(&ours))
            })
    }

    pub(super) fn rr_uri(&self, iface: usize, token: &str) -> String {
        let i = &self.cfg.interfaces[iface];
        let tp = match i.transport {
            Transport::Udp => String::new(),
            t => format!(";transport={t}"),
        };
        format!("<sip:{token}@{}{tp};lr>", i.host_port())
    }
}

/// RFC 3581 §4 and RFC 3261 §18.2.1: record where the request really came from in the top
/// Via, so responses can follow the NAT mapping.
pub(crate) fn fix_top_via(msg: &Message, e: &mut Editor<'_>, flow: Flow) {
    let Some((_, r)) = msg.values(HeaderName::Via).into_iter().next() else {
        return;
    };
    let Some(via) = msg.top_via() else { return };
    let text = msg.text(r.clone());
    let src_ip = flow.remote.ip().to_string();
    let mut out = String::with_capacity(text.len() + 40);
    let mut changed = false;
    for (i, part) in text.split(';').enumerate() {
        if i > 0 {
            out.push(';');
        }
        if i > 0 && part.trim().eq_ignore_ascii_case("rport") {
            out.push_str(&format!("rport={}", flow.remote.port()));
            changed = true;
        } else {
            out.push_str(part);
        }
    }
    let sent_ip = host_string(&via.sent_by.host);
    if sent_ip.trim_start_matches('[').trim_end_matches(']') != src_ip && via.params.get("received").is_none() {
        out.push_str(&format!(";received={src_ip}"));
        changed = true;
    }
    if changed {
        e.replace(r, out);
    }
}

/// CANCEL for a sent INVITE (§9.1).
pub(super) fn build_cancel(invite: &Message) -> Vec<u8> {
    build_hop_request(invite, "CANCEL", None)
}

/// ACK for a non-2xx final response (§17.1.1.3).
pub(super) fn build_ack(invite: &Message, resp: &Message) -> Vec<u8> {
    build_hop_request(invite, "ACK", resp.header(HeaderName::To))
}

/// CANCEL, or ACK for a non-2xx final response, of a request we sent: its Request-URI, top
/// Via, Route set, From, Call-ID and CSeq number; To from `to` (the response's) when given.
pub(crate) fn build_hop_request(invite: &Message, method: &str, to: Option<&str>) -> Vec<u8> {
    let uri = invite.request_uri().unwrap_or("");
    let mut out = format!("{method} {uri} SIP/2.0\r\n");
    if let Some((_, r)) = invite.values(HeaderName::Via).into_iter().next() {
        out.push_str(&format!("Via: {}\r\n", invite.text(r)));
    }
    for r in invite.value_texts(HeaderName::Route) {
        out.push_str(&format!("Route: {r}\r\n"));
    }
    out.push_str("Max-Forwards: 70\r\n");
    out.push_str(&format!("From: {}\r\n", invite.header(HeaderName::From).unwrap_or("")));
    out.push_str(&format!("To: {}\r\n", to.or(invite.header(HeaderName::To)).unwrap_or("")));
    out.push_str(&format!("Call-ID: {}\r\n", invite.call_id().unwrap_or("")));
    let n = invite.cseq().map(|(n, _)| n).unwrap_or(1);
    out.push_str(&format!("CSeq: {n} {method}\r\nContent-Length: 0\r\n\r\n"));
    out.into_bytes()
}
