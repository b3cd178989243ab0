//! Record-Route tokens and the dialogs they may vouch for.
//!
//! Our Record-Route user part names both sides' flows, so in-dialog requests reach phones
//! behind NATs. The token's MAC covers the flows, the Call-ID and the dialog creator's From
//! tag, so it is worthless outside its own dialog. A token is only a routing hint: a
//! request skips authentication only when, in addition, the dialog is one pinhole saw
//! established (a 1xx/2xx with a To tag passed through it), its tags match the table, it
//! comes from one of the dialog's two flows, and it is not a REGISTER
//! ([`DialogTable::vouches`]). The table forgets a dialog [`ENDED_MARGIN`] after its BYE,
//! after [`DIALOG_LIFETIME`] without in-dialog requests, and entirely on restart.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::mac::{ct_eq, hmac};

/// How long a confirmed dialog is remembered after its last in-dialog request.
pub(super) const DIALOG_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// How long an early dialog (a 1xx with a To tag) is remembered: Timer C plus 64·T1.
pub(super) const EARLY_DIALOG_LIFETIME: Duration = Duration::from_secs(180 + 32);
/// How long a dialog is remembered after its BYE, for retransmissions and the BYE's 200.
pub(super) const ENDED_MARGIN: Duration = Duration::from_secs(32);
/// Most dialogs remembered at once; past it new dialogs still route by token but their
/// in-dialog requests are challenged.
pub(super) const MAX_DIALOGS: usize = 200_000;
/// To tags remembered per dialog (forked 2xx responses each make one).
const MAX_TO_TAGS: usize = 8;
const TOKEN_MAC_LEN: usize = 10;

/// The two sides of a dialog, carried in our Record-Route user part: (interface index,
/// remote address) of the flow towards each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DialogFlows {
    pub(super) a: (usize, SocketAddr),
    pub(super) b: (usize, SocketAddr),
}

/// The Record-Route user part for a dialog created by a request with this Call-ID and
/// From tag.
pub(super) fn encode_token(secret: &[u8; 32], d: DialogFlows, call_id: &str, from_tag: &str) -> String {
    let mut raw = Vec::with_capacity(40);
    for (iface, addr) in [d.a, d.b] {
        raw.push(u8::try_from(iface).unwrap_or(u8::MAX));
        match addr.ip() {
            IpAddr::V4(v4) => {
                raw.push(4);
                raw.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                raw.push(6);
                raw.extend_from_slice(&v6.octets());
            }
        }
        raw.extend_from_slice(&addr.port().to_be_bytes());
    }
    let mac = hmac(secret, "rr-token", &[&raw, call_id.as_bytes(), from_tag.as_bytes()]);
    format!("ph{}{}", hex::encode(&raw), hex::encode(&mac[..TOKEN_MAC_LEN]))
}

/// The flows of a token, if its MAC holds for this Call-ID and one of `tags` (a request
/// from the callee carries the creator's tag in To).
pub(super) fn decode_token(secret: &[u8; 32], token: &str, call_id: &str, tags: &[&str]) -> Option<DialogFlows> {
    let bytes = hex::decode(token.strip_prefix("ph")?).ok()?;
    if bytes.len() <= TOKEN_MAC_LEN {
        return None;
    }
    let (raw, mac) = bytes.split_at(bytes.len() - TOKEN_MAC_LEN);
    let valid = tags.iter().any(|tag| {
        let want = hmac(secret, "rr-token", &[raw, call_id.as_bytes(), tag.as_bytes()]);
        ct_eq(&want[..TOKEN_MAC_LEN], mac)
    });
    if !valid {
        return None;
    }
    let mut pos = 0;
    let mut side = || -> Option<(usize, SocketAddr)> {
        let iface = *raw.get(pos)? as usize;
        let fam = *raw.get(pos + 1)?;
        pos += 2;
        let ip: IpAddr = match fam {
            4 => {
                let o: [u8; 4] = raw.get(pos..pos + 4)?.try_into().ok()?;
                pos += 4;
                o.into()
            }
            6 => {
                let o: [u8; 16] = raw.get(pos..pos + 16)?.try_into().ok()?;
                pos += 16;
                o.into()
            }
            _ => return None,
        };
        let port = u16::from_be_bytes(raw.get(pos..pos + 2)?.try_into().ok()?);
        pos += 2;
        Some((iface, SocketAddr::new(ip, port)))
    };
    let a = side()?;
    let b = side()?;
    Some(DialogFlows { a, b })
}

/// A dialog key: Call-ID and the creator's From tag.
type Key = (String, String);

struct Entry {
    to_tags: Vec<String>,
    flows: DialogFlows,
    expires: Instant,
    /// When its live entry in the expiry heap falls due (never after `expires`).
    scheduled: Instant,
    confirmed: bool,
    ended: bool,
}

/// How far out an expiry check is ever scheduled. A dialog's expiry moves (a confirmed one
/// lives 12 h, a BYE cuts that to 32 s): checks are pushed at most this far ahead and pushed
/// again when they fall due early, so a moved expiry leaves a stale heap entry for at most
/// this long instead of for the old lifetime (12 h of entries per call otherwise).
const RECHECK: Duration = Duration::from_secs(60);

/// Dialogs pinhole saw established, with lazy expiry through a heap.
#[derive(Default)]
pub(super) struct DialogTable {
    map: HashMap<Key, Entry>,
    expiry: BinaryHeap<Reverse<(Instant, Key)>>,
}

impl DialogTable {
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// A 1xx (early, `confirmed = false`) or 2xx with `to_tag` came back for a dialog-creating
    /// request we record-routed with `flows`.
    pub(super) fn establish(
        &mut self,
        now: Instant,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
        flows: DialogFlows,
        confirmed: bool,
    ) {
        let key = (call_id.to_owned(), from_tag.to_owned());
        let life = if confirmed { DIALOG_LIFETIME } else { EARLY_DIALOG_LIFETIME };
        if !self.map.contains_key(&key) && self.map.len() >= MAX_DIALOGS {
            metrics::counter!("pinhole_sip_dialogs_refused_total").increment(1);
            return;
        }
        let e = self.map.entry(key.clone()).or_insert(Entry {
            to_tags: Vec::new(),
            flows,
            expires: now,
            scheduled: now,
            confirmed,
            ended: false,
        });
        if e.ended {
            return;
        }
        if !e.to_tags.iter().any(|t| t == to_tag) && e.to_tags.len() < MAX_TO_TAGS {
            e.to_tags.push(to_tag.to_owned());
        }
        e.confirmed |= confirmed;
        e.expires = (now + life).max(e.expires);
        schedule(&mut self.expiry, now, key, e);
    }

    fn find(&self, call_id: &str, from_tag: &str, to_tag: &str) -> Option<(&Key, &Entry)> {
        [(from_tag, to_tag), (to_tag, from_tag)].into_iter().find_map(|(creator, other)| {
            let (k, e) = self.map.get_key_value(&(call_id.to_owned(), creator.to_owned()))?;
            e.to_tags.iter().any(|t| t == other).then_some((k, e))
        })
    }

    fn find_key(&self, call_id: &str, from_tag: &str, to_tag: &str) -> Option<Key> {
        self.find(call_id, from_tag, to_tag).map(|(k, _)| k.clone())
    }

    /// Does this in-dialog request (with these tags, arriving on `from`, whose token named
    /// `flows`) belong to a live dialog we saw established? `on_side` tells whether an
    /// address is the flow of one of its sides.
    pub(super) fn vouches(
        &self,
        now: Instant,
        call_id: &str,
        from_tag: &str,
        to_tag: &str,
        flows: DialogFlows,
        on_side: impl Fn((usize, SocketAddr)) -> bool,
    ) -> bool {
        let Some((_, e)) = self.find(call_id, from_tag, to_tag) else {
            return false;
        };
        e.expires > now && e.flows == flows && (on_side(e.flows.a) || on_side(e.flows.b))
    }

    /// An in-dialog request passed: the dialog lives on.
    pub(super) fn touch(&mut self, now: Instant, call_id: &str, from_tag: &str, to_tag: &str) {
        let Some(key) = self.find_key(call_id, from_tag, to_tag) else { return };
        let Some(e) = self.map.get_mut(&key) else { return };
        if e.ended || !e.confirmed {
            return;
        }
        e.expires = now + DIALOG_LIFETIME;
        schedule(&mut self.expiry, now, key, e);
    }

    /// A BYE passed: the dialog is forgotten after [`ENDED_MARGIN`].
    pub(super) fn end(&mut self, now: Instant, call_id: &str, from_tag: &str, to_tag: &str) {
        let Some(key) = self.find_key(call_id, from_tag, to_tag) else { return };
        let Some(e) = self.map.get_mut(&key) else { return };
        e.ended = true;
        e.expires = e.expires.min(now + ENDED_MARGIN);
        schedule(&mut self.expiry, now, key, e);
    }

    pub(super) fn expire(&mut self, now: Instant) {
        while let Some(Reverse((t, _))) = self.expiry.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((t, key))) = self.expiry.pop() else { break };
            let Some(e) = self.map.get_mut(&key) else { continue };
            if e.scheduled != t {
                continue; // stale: its expiry moved and a check for it is due at `scheduled`
            }
            if e.expires <= t {
                self.map.remove(&key);
            } else {
                schedule(&mut self.expiry, t, key, e);
            }
        }
    }

    /// Entries in the expiry heap (live and stale).
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.expiry.len()
    }
}

/// Makes sure a check for `e` is pending no later than its expiry, and no further out than
/// [`RECHECK`] from `now`.
fn schedule(expiry: &mut BinaryHeap<Reverse<(Instant, Key)>>, now: Instant, key: Key, e: &mut Entry) {
    let at = e.expires.min(now + RECHECK);
    if e.scheduled <= now || at < e.scheduled {
        e.scheduled = at;
        expiry.push(Reverse((at, key)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flows() -> DialogFlows {
        DialogFlows {
            a: (0, "203.0.113.9:40001".parse().expect("a")),
            b: (0, "203.0.113.10:40002".parse().expect("b")),
        }
    }

    #[test]
    fn a_token_decodes_only_for_its_own_call_id_and_tag() {
        let s = [3u8; 32];
        let t = encode_token(&s, flows(), "call-1", "tagA");
        assert_eq!(decode_token(&s, &t, "call-1", &["x", "tagA"]), Some(flows()));
        assert_eq!(decode_token(&s, &t, "call-2", &["tagA"]), None);
        assert_eq!(decode_token(&s, &t, "call-1", &["tagB"]), None);
        assert_eq!(decode_token(&[4u8; 32], &t, "call-1", &["tagA"]), None);
    }

    #[test]
    fn only_established_dialogs_vouch_and_only_for_their_sides() {
        let t0 = Instant::now();
        let mut d = DialogTable::default();
        let side = |f: (usize, SocketAddr)| f.1 == flows().b.1;
        assert!(!d.vouches(t0, "c", "tagA", "tagB", flows(), side), "nothing established yet");
        d.establish(t0, "c", "tagA", "tagB", flows(), true);
        assert!(d.vouches(t0, "c", "tagA", "tagB", flows(), side));
        assert!(d.vouches(t0, "c", "tagB", "tagA", flows(), side), "either direction");
        assert!(!d.vouches(t0, "c", "tagA", "tagX", flows(), side), "another To tag");
        assert!(!d.vouches(t0, "c", "tagA", "tagB", flows(), |_| false), "from a third flow");
        let other = DialogFlows { b: (0, "198.51.100.1:5060".parse().expect("x")), ..flows() };
        assert!(!d.vouches(t0, "c", "tagA", "tagB", other, side), "flows of another token");
    }

    #[test]
    fn dialogs_end_with_a_margin_after_bye_and_expire_when_idle() {
        let t0 = Instant::now();
        let mut d = DialogTable::default();
        let side = |_| true;
        d.establish(t0, "c", "a", "b", flows(), true);
        d.establish(t0, "early", "a", "b", flows(), false);
        d.end(t0, "c", "b", "a");
        d.expire(t0 + ENDED_MARGIN - Duration::from_secs(1));
        assert!(d.vouches(t0 + ENDED_MARGIN - Duration::from_secs(1), "c", "a", "b", flows(), side));
        d.expire(t0 + ENDED_MARGIN);
        assert!(!d.vouches(t0 + ENDED_MARGIN, "c", "a", "b", flows(), side));
        d.expire(t0 + EARLY_DIALOG_LIFETIME);
        assert_eq!(d.len(), 0, "an early dialog that never got its 2xx is forgotten");
        d.establish(t0, "long", "a", "b", flows(), true);
        d.touch(t0 + Duration::from_secs(3600), "long", "a", "b");
        d.expire(t0 + DIALOG_LIFETIME);
        assert_eq!(d.len(), 1, "touched dialogs live on");
        d.expire(t0 + DIALOG_LIFETIME + Duration::from_secs(3600));
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn ended_calls_leave_nothing_behind_in_the_expiry_heap() {
        // Each call: 180 (early), 200 (confirmed, 12 h), ACK (touch), BYE (end).
        let t0 = Instant::now();
        let mut d = DialogTable::default();
        for i in 0..1000u32 {
            let (now, call) = (t0 + Duration::from_millis(u64::from(i) * 10), format!("call-{i}"));
            d.establish(now, &call, "a", "b", flows(), false);
            d.establish(now, &call, "a", "b", flows(), true);
            d.touch(now, &call, "a", "b");
            d.end(now, &call, "b", "a");
            d.expire(now);
        }
        assert!(d.pending() <= 2 * 1000, "{} checks pending", d.pending());
        let long = t0 + Duration::from_secs(20);
        d.establish(long, "long", "a", "b", flows(), true);
        d.expire(t0 + Duration::from_secs(10) + ENDED_MARGIN + RECHECK);
        assert_eq!(d.len(), 1, "the ended calls are forgotten, the live one is not");
        assert!(d.pending() <= 2, "{} checks pending instead of the live dialog's one", d.pending());
        d.expire(long + DIALOG_LIFETIME);
        assert_eq!((d.len(), d.pending()), (0, 0));
    }
}
