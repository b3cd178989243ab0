//! pinhole-media: the sans-IO media half of pinhole — SDP editing, relay sessions and
//! latching, per-stream statistics and the ng protocol's codec. (The STUN codec and NAT
//! classifier, punch planning and the fake-TCP state machine will join them.)
//!
//! Like `pinhole-sip`, it never performs I/O and never reads the clock: callers pass `now`
//! in and execute the commands that come out. The relay's loop:
//!
//! ```no_run
//! # use std::time::Instant;
//! # use pinhole_media::relay::{Relay, RelayConfig, Options, Command};
//! # fn bind_and_forward(_: Command) {}
//! # fn run(cfg: RelayConfig, offer: &[u8]) {
//! let epoch = Instant::now();
//! let mut relay = Relay::new(cfg, epoch);
//! // Signalling: an offer from the caller (tag "a") becomes the SDP sent to the callee.
//! let _rewritten = relay.offer(Instant::now(), "call-1", "a", offer, None, Options::default());
//! // The data plane binds ports and installs forwarding rules…
//! while let Some(cmd) = relay.poll_command() {
//!     bind_and_forward(cmd);
//! }
//! // …and, about once a second, timeouts end calls (events tell their owner).
//! relay.handle_timeout(Instant::now());
//! while let Some(_event) = relay.poll_event() {}
//! # }
//! ```
//!
//! Per packet, the data plane calls [`latch::Latch::on_packet`] and
//! [`stats::StreamStats::on_packet`]: no allocation, no lock.
//!
//! Design decisions:
//! - SDP is edited line by line ([`sdp`]), byte-faithful except the lines changed, because
//!   the SDP crates available re-serialise (and one panics on input a peer can send).
//! - Latching ([`latch`]) is strict by default and re-learns only with proof, against the
//!   RTP Bleed class of attacks.
//! - The ng codec ([`ng`]) is our own: arrival-ordered dictionaries, bounded depth, lengths
//!   checked before allocating, trailing bytes refused.

pub mod anchor;
pub mod cidr;
pub mod dtls;
pub mod edge;
pub mod faketcp;
pub mod fleet;
pub mod guard;
pub mod ice_lite;
pub mod latch;
pub mod mac;
pub mod natmodel;
pub mod ng;
pub mod ng_server;
pub mod portmap;
pub mod ports;
pub mod probe;
pub mod punch;
pub mod quality;
pub mod relay;
pub mod rtcp;
pub mod sdes;
pub mod sdp;
pub mod secure;
pub mod srtp;
pub mod stats;
pub mod stun;
