//! Read-through for a cluster: a request for one of our users that finds no binding on
//! this node waits (parked) while the shell asks the cluster store, instead of getting 480
//! at once. A phone registered through another node a moment ago is reachable here as
//! soon as its 200 OK has left that node, before the change is even announced.
//!
//! The proxy never waits itself: [`Proxy::poll_lookup`] hands the shell an AOR to read
//! (outside the node's lock), [`Proxy::handle_lookup`] brings the answer back, and the
//! parked requests are routed again as soon as a binding is known — from that answer, or
//! from a change another node announces ([`Proxy::apply_remote`]; the store may not hold
//! a registration whose 200 OK left that node a millisecond ago) — or answered from what
//! there is after [`LOOKUP_TIMEOUT`].

use super::*;

/// Requests waiting for the store at once, over all AORs, and per AOR; past either a
/// request is answered from what this node has, at once.
pub(super) const MAX_PARKED: usize = 4096;
pub(super) const MAX_PARKED_PER_AOR: usize = 16;
/// How long a parked request waits for the store's answer.
pub(super) const LOOKUP_TIMEOUT: Duration = Duration::from_millis(300);

struct Parked {
    key: String,
    flow: Flow,
    msg: Message,
    auth_user: Option<String>,
    deadline: Instant,
}

/// The parked requests and the lookups the shell has not taken yet.
#[derive(Default)]
pub(super) struct ReadThrough {
    enabled: bool,
    parked: HashMap<String, Vec<Parked>>,
    count: usize,
    lookups: VecDeque<String>,
    /// While parked requests are routed again: they are answered from what there is.
    replaying: bool,
}

impl<M: MediaAnchor> Proxy<M> {
    /// Requests for users with no binding here wait for the cluster store from now on.
    pub fn enable_read_through(&mut self) {
        self.read_through.enabled = true;
    }

    /// The next AOR to read from the cluster store; its answer goes to
    /// [`Proxy::handle_lookup`].
    #[must_use]
    pub fn poll_lookup(&mut self) -> Option<String> {
        self.read_through.lookups.pop_front()
    }

    /// Requests waiting for the store now.
    pub fn parked(&self) -> usize {
        self.read_through.count
    }

    /// A request for `aor` found no binding: parks it when the store may know more.
    /// `false`: answer it now.
    pub(super) fn park(
        &mut self,
        now: Instant,
        key: &str,
        flow: Flow,
        msg: &Message,
        aor: &str,
        auth_user: Option<&str>,
    ) -> bool {
        let rt = &mut self.read_through;
        if !rt.enabled || rt.replaying || rt.count >= MAX_PARKED {
            return false;
        }
        let waiting = rt.parked.entry(aor.to_owned()).or_default();
        if waiting.len() >= MAX_PARKED_PER_AOR {
            return false;
        }
        if waiting.is_empty() {
            rt.lookups.push_back(aor.to_owned());
        }
        waiting.push(Parked {
            key: key.to_owned(),
            flow,
            msg: msg.clone(),
            auth_user: auth_user.map(str::to_owned),
            deadline: now + LOOKUP_TIMEOUT,
        });
        rt.count += 1;
        true
    }

    /// The store's answer for `aor`: each other node's bindings of it (read by the shell,
    /// outside the node's lock). They become this node's copies, and the requests parked
    /// for the AOR are routed again if it is known now (else they wait on for an announced
    /// change, or their timeout).
    pub fn handle_lookup(&mut self, now: Instant, aor: &str, found: Vec<(String, Vec<Binding>)>) {
        let unix = self.unix(now);
        let any = found.iter().any(|(_, b)| b.iter().any(|b| b.expires_at > unix));
        metrics::counter!("pinhole_cluster_lookups_total", "result" => if any { "found" } else { "missing" })
            .increment(1);
        for (node, bindings) in found {
            self.registrar.set_remote(aor, &node, bindings, unix);
        }
        self.resume_if_known(now, aor);
    }

    /// Another node's bindings of `aor` as it announced them (they replace its copies);
    /// requests waiting for the AOR go on if it is known now.
    pub fn apply_remote(&mut self, now: Instant, aor: &str, node: &str, bindings: Vec<Binding>) {
        let unix = self.unix(now);
        self.registrar.set_remote(aor, node, bindings, unix);
        self.resume_if_known(now, aor);
    }

    fn resume_if_known(&mut self, now: Instant, aor: &str) {
        if self.read_through.parked.contains_key(aor) && !self.registrar.lookup(aor, self.unix(now)).is_empty() {
            self.resume(now, aor);
        }
    }

    /// Routes the requests parked for `aor` again, answering from what there is.
    fn resume(&mut self, now: Instant, aor: &str) {
        let Some(waiting) = self.read_through.parked.remove(aor) else { return };
        self.read_through.count -= waiting.len();
        self.read_through.replaying = true;
        for p in waiting {
            // Given up meanwhile (a CANCEL, a transaction timeout): nothing to route.
            if !self.server_txs.contains_key(&p.key) {
                continue;
            }
            let Some(method) = p.msg.method().cloned() else { continue };
            let routing = self.route_info(&p.msg);
            self.route_request(now, &p.key, p.flow, &p.msg, &method, routing, p.auth_user);
        }
        self.read_through.replaying = false;
    }

    /// When the oldest parked request stops waiting.
    pub(super) fn lookup_deadline(&self) -> Option<Instant> {
        self.read_through.parked.values().flat_map(|w| w.iter().map(|p| p.deadline)).min()
    }

    /// Parked requests whose wait is over are answered from what this node has.
    pub(super) fn lookups_due(&mut self, now: Instant) {
        let due: Vec<String> = self
            .read_through
            .parked
            .iter()
            .filter(|(_, w)| w.iter().any(|p| p.deadline <= now))
            .map(|(aor, _)| aor.clone())
            .collect();
        for aor in due {
            metrics::counter!("pinhole_cluster_lookups_total", "result" => "timeout").increment(1);
            self.resume(now, &aor);
        }
    }
}
