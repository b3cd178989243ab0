//! pinhole-sip: a sans-IO SIP edge proxy and registrar.
//!
//! Everything here is deterministic: no sockets, no clock, no tokio. The shell in the
//! `pinhole` binary receives bytes, hands them in with the current time, sends what comes
//! out and sleeps until the next timeout:
//!
//! ```no_run
//! # use std::time::Instant;
//! # use pinhole_sip::{Proxy, ProxyConfig, Flow};
//! # use pinhole_media::relay::Relay;
//! # fn recv() -> (Flow, bytes::Bytes) { unimplemented!() }
//! # fn send(_: &pinhole_sip::Transmit) {}
//! # fn run(cfg: ProxyConfig) {
//! // No relay: SDP passes untouched. pinhole-core's Node drives a proxy with a relay.
//! let mut proxy = Proxy::new(cfg, None::<Relay>, Instant::now(), 1_700_000_000, 42);
//! loop {
//!     let (flow, bytes) = recv();
//!     let _ = proxy.handle_input(Instant::now(), flow, bytes); // Err: garbage, counted
//!     proxy.handle_timeout(Instant::now());
//!     while let Some(t) = proxy.poll_transmit() {
//!         send(&t);
//!     }
//!     let _next_wake = proxy.poll_timeout(); // Option<(Instant, why)>
//! }
//! # }
//! ```
//!
//! Design decisions:
//! - Messages are scanned into byte ranges ([`message::Message`]) and header values are
//!   parsed on demand with ezk-sip-types. Forwarding splices the received bytes
//!   ([`message::Editor`]); nothing is re-serialised, so unknown headers, odd spacing and
//!   bodies pass byte for byte.
//! - Registrations are bound to the flow they arrived on (RFC 5626 spirit). Record-Route
//!   entries carry an authenticated token naming both sides' flows, so in-dialog requests
//!   reach phones behind NATs whatever private address their Contact holds.
//! - Transactions follow RFC 3261 §17 with RFC 6026's Accepted state; timers are deadlines
//!   in the transaction, woken through one heap.
//! - Media is anchored through the [`pinhole_media::anchor::MediaAnchor`] trait the proxy
//!   is generic over; it never sees the relay's ports or timers.

pub mod agent;
pub mod auth;
pub mod b2bua;
pub mod hep;
pub use pinhole_media::mac;
pub mod message;
pub mod proxy;
pub mod registrar;
pub mod stream;
pub mod transport;
pub mod websocket;

pub use proxy::{faketcp_key, Cidr, Interface, Keepalive, Proxy, ProxyConfig, ProxyEvent, PunchPolicy};
pub use registrar::{Binding, RegistrarConfig};
pub use transport::{ConnId, Flow, Transmit, Transport};
