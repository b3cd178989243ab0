//! Requests: authentication before any state, then routing (§16.4–16.6) — the dialog
//! flow a Record-Route token names, the next Route, the registrar, or the Request-URI —
//! and the registrar's REGISTER handling.

use super::*;

impl<M: MediaAnchor> Proxy<M> {
    pub(super) fn on_request(&mut self, now: Instant, flow: Flow, msg: Message) {
        let method = msg.method().cloned().unwrap_or(Method::Other(String::new()));
        self.count_request(&method, flow.transport);
        if let Err(rej) = msg.check_request(self.cfg.max_message, self.cfg.max_body) {
            tracing::debug!(code = rej.code, reason = %rej.reason, "rejecting malformed request");
            if method != Method::Ack && msg.header(HeaderName::Via).is_some() {
                let resp = msg.response(rej.code, &rej.reason, Some(&self.local_tag(&msg)), &[]);
                self.send_response_stateless(flow, resp, rej.code);
            }
            return;
        }
        let branch = msg.branch().unwrap_or_default().to_owned();
        if self.b2bua.owns_request(&msg) {
            self.b2bua.on_request(now, flow, msg, &mut self.media);
            return;
        }

        if method == Method::Ack {
            let key = server_key(&branch, &Method::Invite);
            if let Some(st) = self.server_txs.get_mut(&key) {
                if st.state == SState::Completed {
                    st.state = SState::Confirmed;
                    st.retransmit_at = None;
                    st.timeout_at = None;
                    st.cleanup_at = Some(now + if flow.transport == Transport::Udp { T4 } else { Duration::ZERO });
                    self.timers.push(Reverse((st.cleanup_at.unwrap_or(now), TimerRef::Server(key))));
                }
                return;
            }
            self.forward_ack(now, flow, &msg);
            return;
        }
        if method == Method::Cancel {
            self.on_cancel(now, flow, &msg, &branch);
            return;
        }

        let key = server_key(&branch, &method);
        if let Some(st) = self.server_txs.get(&key) {
            // A retransmission: repeat the last response (§17.2.1, §17.2.2).
            if let Some(r) = &st.last_response {
                self.out.push_back(Transmit { flow: st.flow, payload: r.clone() });
            }
            return;
        }

        // A trunk (by source address: carriers send from many ports) calling one of its DIDs,
        // or pinging us: the B2BUA's, and no challenge.
        if let Some(trunk) = self.b2bua.trunk_at(flow.remote.ip()) {
            if method == Method::Invite && msg.tag(HeaderName::To).is_none() {
                self.trunk_call(now, flow, msg, trunk);
                return;
            }
            if method == Method::Options && msg.tag(HeaderName::To).is_none() {
                let resp = msg.response(200, "OK", Some(&self.local_tag(&msg)), &self.options_headers());
                self.send_response_stateless(flow, resp, 200);
                return;
            }
        }

        // An agent's signed profile update or quality report: the key of the bindings on its
        // flow is its proof.
        if method == Method::Options
            && msg.tag(HeaderName::To).is_none()
            && msg.extension_header("Pinhole-Sig").is_some()
        {
            if msg.extension_header("Pinhole-Quality").is_some() {
                self.on_quality_report(now, flow, &msg);
            } else {
                self.on_profile_update(now, flow, &msg);
            }
            return;
        }

        // Authenticate before any state exists: a challenge is answered statelessly and never
        // retransmitted, so a spoofed request draws one response of about its own size.
        let routing = self.route_info(&msg);
        let in_dialog = self.dialog_vouches(now, flow, &msg, &method, &routing);
        let auth_user = if in_dialog || self.is_trusted(flow.remote.ip()) {
            None
        } else {
            match self.authenticate(now, flow, &msg, &method) {
                Some(user) => Some(user),
                None => return,
            }
        };

        let invite = method == Method::Invite;
        // A call from a local user on a trunk route: the B2BUA's, not proxied.
        if invite
            && !in_dialog
            && msg.tag(HeaderName::To).is_none()
            && (auth_user.is_some() || self.is_trusted(flow.remote.ip()))
        {
            if let Some(user) = request_user(&msg).filter(|u| self.b2bua.wants(u)) {
                tracing::debug!(%user, "trunk call");
                self.b2bua.on_invite(now, flow, msg, auth_user.as_deref(), &mut self.media);
                return;
            }
        }
        let to_tag = self.local_tag(&msg);
        self.server_txs.insert(
            key.clone(),
            ServerTx {
                invite,
                flow,
                request: msg.clone(),
                state: SState::Proceeding,
                last_response: None,
                retransmit_at: None,
                interval: T1,
                timeout_at: None,
                cleanup_at: None,
                branches: Vec::new(),
                best: None,
                final_sent: false,
                to_tag,
            },
        );
        if invite {
            self.respond(now, &key, 100, "Trying", &[]);
        }
        if in_dialog {
            if let (Some(call_id), Some(from), Some(to)) =
                (msg.call_id(), msg.tag(HeaderName::From), msg.tag(HeaderName::To))
            {
                self.established.touch(now, call_id, from, to);
            }
        }
        self.route_request(now, &key, flow, &msg, &method, routing, auth_user);
    }

    /// An INVITE from trunk `trunk`: to the user its DID maps to, through the B2BUA.
    fn trunk_call(&mut self, now: Instant, flow: Flow, msg: Message, trunk: usize) {
        if let Some(auth) = self.trunk_auth.get_mut(trunk).and_then(Option::as_mut) {
            // The trunk's own account, answered as a phone answers ours.
            let creds = msg.value_texts(HeaderName::ProxyAuthorization);
            let verdict = auth.verify(now, flow.remote.ip(), "INVITE", msg.request_uri().unwrap_or(""), &creds);
            if !matches!(verdict, Verdict::Authenticated(_)) {
                let stale = matches!(verdict, Verdict::Stale | Verdict::Replayed);
                let hs: Vec<String> =
                    auth.challenges(now, stale).into_iter().map(|c| format!("Proxy-Authenticate: {c}")).collect();
                let resp = msg.response(407, "Proxy Authentication Required", Some(&self.local_tag(&msg)), &hs);
                self.send_response_stateless(flow, resp, 407);
                return;
            }
        }
        let number = request_user(&msg).unwrap_or_default();
        let Some(user) = self.b2bua.did_user(trunk, &number).map(str::to_owned) else {
            let resp = msg.response(404, "Not Found - No Such Number On This Trunk", Some(&self.local_tag(&msg)), &[]);
            self.send_response_stateless(flow, resp, 404);
            return;
        };
        let aor = format!("{user}@{}", self.cfg.domain);
        let callee = self.registrar.lookup(&aor, self.unix(now)).first().map(|b| {
            let t = binding_target(b);
            crate::b2bua::Callee {
                flow: t.flow,
                uri: t.request_uri.unwrap_or_else(|| b.contact.clone()),
                routes: t.routes,
                aor: aor.clone(),
            }
        });
        tracing::debug!(%number, %user, registered = callee.is_some(), "call from a trunk");
        self.b2bua.on_inbound(now, flow, msg, trunk, callee, &mut self.media);
    }

    /// Our Route entries at the top of the Route set, and the flows their token names.
    pub(super) fn route_info<'m>(&self, msg: &'m Message) -> RouteInfo<'m> {
        let routes = msg.values(HeaderName::Route);
        let mut strip = Vec::new();
        let mut flows = None;
        let call_id = msg.call_id().unwrap_or("");
        let tags: Vec<&str> = [msg.tag(HeaderName::From), msg.tag(HeaderName::To)].into_iter().flatten().collect();
        for (hi, r) in &routes {
            match self.route_is_us(msg.text(r.clone())) {
                Some(token) => {
                    if flows.is_none() {
                        flows = token.and_then(|t| decode_token(&self.cfg.secret, &t, call_id, &tags));
                    }
                    strip.push((*hi, r.clone()));
                }
                None => break,
            }
        }
        let remaining = routes.iter().skip(strip.len()).map(|(_, r)| msg.text(r.clone())).collect();
        RouteInfo { strip, flows, remaining }
    }

    /// May this request skip authentication? Only an in-dialog request (never a REGISTER)
    /// of a dialog we saw established, whose token names that dialog's flows, arriving on
    /// one of them.
    pub(super) fn dialog_vouches(
        &self,
        now: Instant,
        flow: Flow,
        msg: &Message,
        method: &Method,
        routing: &RouteInfo<'_>,
    ) -> bool {
        let (Some(flows), Some(call_id), Some(from), Some(to)) =
            (routing.flows, msg.call_id(), msg.tag(HeaderName::From), msg.tag(HeaderName::To))
        else {
            return false;
        };
        *method != Method::Register
            && self.established.vouches(now, call_id, from, to, flows, |side| self.side_matches(side, flow))
    }

    /// Checks credentials; on failure answers statelessly (challenge or refusal) and
    /// returns `None`.
    pub(super) fn authenticate(&mut self, now: Instant, flow: Flow, msg: &Message, method: &Method) -> Option<String> {
        let register = *method == Method::Register;
        let creds = msg.value_texts(credentials_header(method));
        let uri = msg.request_uri().unwrap_or("");
        let verdict = self.auth.verify(now, flow.remote.ip(), method.as_str(), uri, &creds);
        let tag = self.local_tag(msg);
        let (code, reason, extra): (u16, &str, Vec<String>) = match verdict {
            Verdict::Authenticated(u) => return Some(u),
            Verdict::RateLimited => (403, "Forbidden - Too Many Failed Authentication Attempts", vec![]),
            Verdict::UserDelayed(d) => (
                403,
                "Forbidden - Too Many Failed Attempts For This User",
                vec![format!("Retry-After: {}", d.as_secs().max(1))],
            ),
            v => {
                let stale = matches!(v, Verdict::Stale | Verdict::Replayed);
                if v == Verdict::Replayed {
                    metrics::counter!("pinhole_auth_replays_total").increment(1);
                }
                let (code, reason, hname) = if register {
                    (401, "Unauthorized", "WWW-Authenticate")
                } else {
                    (407, "Proxy Authentication Required", "Proxy-Authenticate")
                };
                let hs = self.auth.challenges(now, stale).into_iter().map(|c| format!("{hname}: {c}")).collect();
                (code, reason, hs)
            }
        };
        if code == 403 {
            metrics::counter!("pinhole_auth_refused_total").increment(1);
        }
        let resp = msg.response(code, reason, Some(&tag), &extra);
        if self.budget.allow(now, flow.remote.ip(), msg.raw().len(), resp.len()) {
            self.send_response_stateless(flow, resp, code);
        } else {
            metrics::counter!("pinhole_sip_replies_suppressed_total").increment(1);
        }
        None
    }

    /// The values of `header` carrying credentials for our realm: consumed here, never
    /// forwarded (as Kamailio's `consume_credentials()`).
    pub(super) fn our_credentials(&self, msg: &Message, header: HeaderName) -> Vec<(usize, std::ops::Range<usize>)> {
        msg.values(header)
            .into_iter()
            .filter(|(_, r)| {
                crate::auth::Credentials::parse(msg.text(r.clone())).is_some_and(|c| c.realm == self.auth.realm())
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn route_request(
        &mut self,
        now: Instant,
        key: &str,
        flow: Flow,
        msg: &Message,
        method: &Method,
        routing: RouteInfo<'_>,
        auth_user: Option<String>,
    ) {
        // Max-Forwards (§16.3 step 3).
        if let Some(Ok(0)) = msg.max_forwards() {
            if *method == Method::Options && self.request_uri_is_us(msg) && request_user(msg).is_none() {
                self.respond(now, key, 200, "OK", &self.options_headers());
            } else {
                self.respond(now, key, 483, "Too Many Hops", &[]);
            }
            return;
        }
        // Proxy-Require (§16.3 step 5): pinhole supports no proxy extensions.
        let unsupported: Vec<&str> = msg.value_texts(HeaderName::ProxyRequire);
        if !unsupported.is_empty() {
            let h = format!("Unsupported: {}", unsupported.join(", "));
            self.respond(now, key, 420, "Bad Extension", &[h]);
            return;
        }
        // Loop detection (§16.3 step 4).
        let loop_hash = self.loop_hash(msg);
        if self.is_loop(msg, loop_hash) {
            self.respond(now, key, 482, "Loop Detected", &[]);
            return;
        }

        let RouteInfo { mut strip, flows: dialog, remaining } = routing;
        if auth_user.is_some() {
            strip.extend(self.our_credentials(msg, credentials_header(method)));
        }

        let to_us = remaining.is_empty() && self.request_uri_is_us(msg);
        if *method == Method::Register && to_us {
            self.on_register(now, key, flow, msg, auth_user.as_deref());
            return;
        }
        if *method == Method::Options && to_us && request_user(msg).is_none() {
            self.respond(now, key, 200, "OK", &self.options_headers());
            return;
        }

        let targets = match self.targets(now, flow, msg, &remaining, dialog, to_us) {
            Ok(t) => t,
            Err(rej) => {
                // No binding here: in a cluster the store may know of one a moment old.
                let aor = (to_us && matches!(rej.code, 404 | 480))
                    .then(|| request_user(msg))
                    .flatten()
                    .map(|u| format!("{u}@{}", self.cfg.domain));
                if aor.is_some_and(|aor| self.park(now, key, flow, msg, &aor, auth_user.as_deref())) {
                    return;
                }
                self.respond(now, key, rej.code, &rej.reason, &[]);
                return;
            }
        };
        // A new call: its caller's binding (looked up once) tells the media anchor and the
        // punch planner about the caller's agent.
        let new_call = *method == Method::Invite && msg.tag(HeaderName::To).is_none();
        let caller = new_call.then(|| self.caller_binding(now, flow, auth_user.as_deref())).flatten();
        if new_call {
            self.media_hints(msg, caller.as_ref(), &targets);
        }
        let body = match self.media_request(now, flow, msg, targets.first().map(|t| t.flow)) {
            Ok(b) => b,
            Err(NotAnchored::Waiting) => {
                let (key, msg) = (key.to_owned(), msg.clone());
                let wait = MediaWait::Request { key: key.clone(), flow, msg: msg.clone(), auth_user };
                if !self.wait_for_media(msg.call_id(), wait) {
                    self.respond(now, &key, 503, "Service Unavailable - Media Relay Backlog", &[]);
                }
                return;
            }
            Err(NotAnchored::Refused(rej)) => {
                self.respond(now, key, rej.code, &rej.reason, &[]);
                return;
            }
        };
        if new_call {
            self.plan_punch(flow, msg, (auth_user.as_deref(), caller.as_ref()), &targets);
        }
        let body = self.with_punch_plan(msg, Side::B, body);
        self.media_seen_request(msg);
        let record_route = method.creates_dialog() && msg.tag(HeaderName::To).is_none();
        for target in targets {
            self.forward_request(now, key, flow, msg, &strip, target, record_route, loop_hash, body.as_deref());
        }
        if *method == Method::Bye {
            if let Some(call_id) = msg.call_id() {
                if let (Some(from), Some(to)) = (msg.tag(HeaderName::From), msg.tag(HeaderName::To)) {
                    self.established.end(now, call_id, from, to);
                }
                self.media_end(now, call_id);
            }
        }
    }

    /// Decides where a request goes: the next Route, a dialog flow, the bindings of a local
    /// AOR, or the Request-URI.
    pub(super) fn targets(
        &self,
        now: Instant,
        flow: Flow,
        msg: &Message,
        remaining: &[&str],
        dialog: Option<DialogFlows>,
        to_us: bool,
    ) -> Result<Vec<Target>, Rejection> {
        // A token whose MAC holds for this dialog, arriving from one of its sides, routes to
        // the other side: routed by the dialog, whatever the Request-URI and later Routes say.
        if let Some(d) = dialog {
            let other = if self.side_matches(d.a, flow) {
                Some(d.b)
            } else if self.side_matches(d.b, flow) {
                Some(d.a)
            } else {
                None
            };
            if let Some((iface, remote)) = other {
                if let Some(i) = self.cfg.interfaces.get(iface) {
                    return Ok(vec![Target::plain(Flow { transport: i.transport, local: i.bind, remote, conn: None })]);
                }
            }
        }
        if let Some(next) = remaining.first() {
            let uri = uri_of(next);
            let f = self.flow_for_uri(uri).ok_or(Rejection::new(503, "Cannot Route To Next Hop"))?;
            return Ok(vec![Target::plain(self.not_a_trunk(f)?)]);
        }
        if to_us {
            let Some(user) = request_user(msg) else {
                return Err(Rejection::new(404, "Not Found"));
            };
            let aor = format!("{user}@{}", self.cfg.domain);
            let bindings = self.registrar.lookup(&aor, self.unix(now));
            if bindings.is_empty() {
                // Only the operator's own networks learn whether a user exists.
                return Err(if self.is_trusted(flow.remote.ip()) && !self.auth.knows_user(&user) {
                    Rejection::new(404, "Not Found")
                } else {
                    Rejection::new(480, "Temporarily Unavailable")
                });
            }
            let targets = self.binding_targets(flow, &aor, &bindings);
            if targets.is_empty() {
                return Err(Rejection::new(480, "Temporarily Unavailable"));
            }
            return Ok(targets);
        }
        let uri = msg.request_uri().unwrap_or("");
        let f = self.flow_for_uri(uri).ok_or(Rejection::new(404, "Not Found - Unresolvable Request-URI Host"))?;
        Ok(vec![Target::plain(self.not_a_trunk(f)?)])
    }

    /// A carrier is reached only through the B2BUA and its routes (which count the call
    /// against the trunk, record it and hide the caller): never where a Request-URI host or
    /// a preloaded Route points. (Dialogs and registered bindings were vetted when made.)
    fn not_a_trunk(&self, f: Flow) -> Result<Flow, Rejection> {
        if self.b2bua.trunk_at(f.remote.ip()).is_some() {
            tracing::info!(to = %f.remote, "request towards a trunk outside its routes refused");
            metrics::counter!("pinhole_b2bua_bypass_refused_total").increment(1);
            return Err(Rejection::new(403, "Forbidden - Trunks Are Reached Only Through Routes"));
        }
        Ok(f)
    }

    /// Where a request for these bindings goes: down the flows this node holds, and once to
    /// each other node holding one (it sends it down its flow). A request that came from
    /// such a node only goes down our own flows.
    fn binding_targets(&self, flow: Flow, aor: &str, bindings: &[Binding]) -> Vec<Target> {
        let from_peer = bindings.iter().any(|b| b.node_addr == Some(flow.remote));
        let mut targets = Vec::new();
        let mut nodes = Vec::new();
        for b in bindings {
            match (&b.node, b.node_addr) {
                (None, _) => targets.push(binding_target(b)),
                (Some(_), Some(addr)) if !from_peer && !nodes.contains(&addr) => {
                    nodes.push(addr);
                    let Some(i) = self.interface_index(Transport::Udp, addr, addr) else { continue };
                    let local = self.cfg.interfaces[i].bind;
                    // Addressed to the AOR, which every node takes for its own.
                    let flow = Flow { transport: Transport::Udp, local, remote: addr, conn: None };
                    targets.push(Target { request_uri: Some(format!("sip:{aor}")), ..Target::plain(flow) });
                }
                _ => {}
            }
        }
        targets
    }

    pub(super) fn side_matches(&self, side: (usize, SocketAddr), flow: Flow) -> bool {
        side.1 == flow.remote && self.cfg.interfaces.get(side.0).is_some_and(|i| i.transport == flow.transport)
    }

    pub(super) fn on_register(&mut self, now: Instant, key: &str, flow: Flow, msg: &Message, auth_user: Option<&str>) {
        let Some(to) = msg.name_addr(HeaderName::To) else {
            self.respond(now, key, 400, "Malformed To Header", &[]);
            return;
        };
        let user = match &to.uri.user_part {
            SipUriUserPart::Empty => {
                self.respond(now, key, 404, "Not Found - No User In To URI", &[]);
                return;
            }
            SipUriUserPart::User(u) => u.to_string(),
            SipUriUserPart::UserPw(up) => up.user.to_string(),
        };
        if let Some(a) = auth_user {
            if a != user {
                self.respond(now, key, 403, "Forbidden - Credentials Do Not Match AOR", &[]);
                return;
            }
        }
        let requires: Vec<&str> = msg.value_texts(HeaderName::Require);
        let unsupported: Vec<&str> =
            requires.into_iter().filter(|r| !["path", "outbound"].contains(&r.to_ascii_lowercase().as_str())).collect();
        if !unsupported.is_empty() {
            let h = format!("Unsupported: {}", unsupported.join(", "));
            self.respond(now, key, 420, "Bad Extension", &[h]);
            return;
        }
        let aor = format!("{user}@{}", self.cfg.domain);
        let unix = self.unix(now);
        let keepalive = KeepalivePolicy {
            interval: self.cfg.keepalive_interval.as_secs().max(1),
            floor: self.cfg.keepalive_min.as_secs().max(1),
        };
        // An agent's NAT profile counts only on a REGISTER we authenticated (or from the
        // operator's own networks), so nobody can plant one for someone else's binding.
        let vouched = auth_user.is_some() || self.is_trusted(flow.remote.ip());
        let agent = vouched.then(|| crate::registrar::AgentReport {
            nat_profile: msg
                .extension_header("Pinhole-NAT")
                .and_then(pinhole_media::punch::NatProfile::parse_header)
                .map(|p| p.to_header()),
            relay_rtts: msg
                .extension_header("Pinhole-RTT")
                .and_then(pinhole_media::fleet::parse_rtts)
                .map(|r| pinhole_media::fleet::rtts_header(&r)),
            plan_key: msg
                .extension_header("Pinhole-Key")
                .and_then(crate::agent::key_from_header)
                .map(|k| crate::agent::key_to_header(&k)),
        });
        let rtts = agent.as_ref().and_then(|a| a.relay_rtts.clone());
        match self.registrar.register(&self.cfg.registrar, unix, &aor, msg, flow, keepalive, agent) {
            Ok(out) => {
                for (contact, interval) in &out.mapping_deaths {
                    tracing::info!(%aor, contact, interval, "NAT mapping died under the keepalives; interval shortened");
                    metrics::counter!("pinhole_nat_mapping_deaths_total").increment(1);
                }
                tracing::info!(
                    %aor,
                    remote = %flow.remote,
                    transport = %flow.transport,
                    bindings = out.bindings.len(),
                    rtts = rtts.as_deref().unwrap_or("-"),
                    "registered"
                );
                let mut hs: Vec<String> = out
                    .bindings
                    .iter()
                    .map(|b| format!("Contact: <{}>;expires={}", b.contact, b.expires_at.saturating_sub(unix)))
                    .collect();
                for p in msg.value_texts(HeaderName::Path) {
                    hs.push(format!("Path: {p}"));
                }
                hs.push("Supported: path, outbound".into());
                metrics::gauge!("pinhole_registrar_bindings").set(self.registrar.binding_count() as f64);
                self.respond(now, key, 200, "OK", &hs);
            }
            Err((rej, hs)) => self.respond(now, key, rej.code, &rej.reason, &hs),
        }
    }

    pub(super) fn host_is_us(&self, host: &str, port: Option<u16>) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.cfg.interfaces.iter().any(|i| {
            let p = port.unwrap_or(i.transport.default_port());
            let adv = i.advertise.trim_start_matches('[').trim_end_matches(']');
            p == i.bind.port() && (host.eq_ignore_ascii_case(adv) || host.parse::<IpAddr>().ok() == Some(i.bind.ip()))
        })
    }

    pub(super) fn request_uri_is_us(&self, msg: &Message) -> bool {
        let Some(uri) = msg.request_sip_uri() else {
            return false;
        };
        let host = host_string(&uri.host_port.host);
        self.host_is_us(&host, uri.host_port.port) || self.is_our_domain(&host, uri.host_port.port)
    }

    /// Our domain, on no port or one we listen on (Kamailio's `myself` compares ports too):
    /// `sip:bob@example.com:5090` is somebody else's server when we listen on 5060 only.
    pub(super) fn is_our_domain(&self, host: &str, port: Option<u16>) -> bool {
        host.eq_ignore_ascii_case(&self.cfg.domain)
            && port.is_none_or(|p| self.cfg.interfaces.iter().any(|i| i.bind.port() == p))
    }

    /// If `route` names us, returns its user part (our flow token), if any.
    pub(super) fn route_is_us(&self, route: &str) -> Option<Option<String>> {
        let uri = uri_of(route);
        let parsed = parse_sip_uri(uri)?;
        let host = host_string(&parsed.host_port.host);
        if !(self.host_is_us(&host, parsed.host_port.port) || self.is_our_domain(&host, parsed.host_port.port)) {
            return None;
        }
        Some(match parsed.user_part {
            SipUriUserPart::User(u) => Some(u.to_string()),
            _ => None,
        })
    }

    /// The interface to send from: the one we received on for this transport, else the
    /// first of the transport and address family.
    pub(super) fn interface_index(&self, transport: Transport, local: SocketAddr, remote: SocketAddr) -> Option<usize> {
        let ifs = &self.cfg.interfaces;
        ifs.iter()
            .position(|i| i.transport == transport && i.bind == local)
            .or_else(|| ifs.iter().position(|i| i.transport == transport && i.bind.is_ipv4() == remote.is_ipv4()))
            .or_else(|| ifs.iter().position(|i| i.transport == transport))
    }

    /// A flow to an IP-literal SIP URI (pinhole does no DNS).
    pub(super) fn flow_for_uri(&self, uri: &str) -> Option<Flow> {
        let u = parse_sip_uri(uri)?;
        let ip = host_ip(&u.host_port.host)?;
        let transport = if u.sips {
            Transport::Tls
        } else {
            u.uri_params.get_val("transport").and_then(|t| Transport::from_param(t)).unwrap_or(Transport::Udp)
        };
        let port = u.host_port.port.unwrap_or(transport.default_port());
        let remote = SocketAddr::new(ip, port);
        let iface = self.interface_index(transport, remote, remote)?;
        Some(Flow { transport, local: self.cfg.interfaces[iface].bind, remote, conn: None })
    }
}

pub(super) fn binding_target(b: &Binding) -> Target {
    Target {
        flow: b.flow(),
        request_uri: Some(b.contact.clone()),
        routes: b.path.iter().rev().cloned().collect(),
        nat_profile: b.nat_profile.clone(),
        relay_rtts: b.relay_rtts.clone(),
        plan_key: b.plan_key.as_deref().and_then(crate::agent::key_from_header),
    }
}

pub(crate) fn request_user(msg: &Message) -> Option<String> {
    match &msg.request_sip_uri()?.user_part {
        SipUriUserPart::Empty => None,
        SipUriUserPart::User(u) => Some(u.to_string()),
        SipUriUserPart::UserPw(up) => Some(up.user.to_string()),
    }
}

pub(crate) fn host_string(h: &Host) -> String {
    match h {
        Host::Name(n) => n.to_string(),
        Host::IP4(ip) => ip.to_string(),
        Host::IP6(ip) => ip.to_string(),
    }
}

/// Where a request carries its credentials: a registrar's Authorization, a proxy's
/// Proxy-Authorization (RFC 3261 §22).
fn credentials_header(method: &Method) -> HeaderName {
    if *method == Method::Register {
        HeaderName::Authorization
    } else {
        HeaderName::ProxyAuthorization
    }
}

/// A host that is an IP literal (bracketed or not), as an address.
pub(crate) fn host_ip(h: &Host) -> Option<IpAddr> {
    host_string(h).trim_matches(['[', ']']).parse().ok()
}

/// The URI inside a name-addr (`<sip:…>` or a bare URI).
pub(crate) fn uri_of(v: &str) -> &str {
    match (v.find('<'), v.find('>')) {
        (Some(s), Some(e)) if s < e => &v[s + 1..e],
        _ => v.split(';').next().unwrap_or(v).trim(),
    }
}

pub(crate) fn parse_sip_uri(uri: &str) -> Option<SipUri> {
    use ezk_sip_types::parse::Parse;
    let src = Bytes::copy_from_slice(uri.as_bytes());
    let text = std::str::from_utf8(&src).ok()?;
    let parsed = match SipUri::parse(&src)(text) {
        Ok(("", u)) => Some(u),
        _ => None,
    };
    parsed
}
