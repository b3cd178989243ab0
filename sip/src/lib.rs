//! pinhole-sip: a sans-IO SIP edge proxy and registrar.
//!
//! Everything here is deterministic: no sockets, no clock, no tokio. The shell in the
//! `pinhole` binary receives bytes, hands them in with the current time, sends what comes
//! out and sleeps until the next timeout:
//!
//! ```no_run
//! # use std::time::Instant;
//! # use pinhole_sip::{Proxy, ProxyConfig, Flow};
//! # fn recv() -> (Flow, bytes::Bytes) { unimplemented!() }
//! # fn send(_: &pinhole_sip::Transmit) {}
//! # fn run(cfg: ProxyConfig) {
//! let mut proxy = Proxy::new(cfg, Instant::now(), 1_700_000_000, 42);
//! loop {
//!     let (flow, bytes) = recv();
//!     let _ = proxy.handle_input(Instant::now(), flow, bytes); // Err: garbage, counted
//!     proxy.handle_timeout(Instant::now());
//!     while let Some(t) = proxy.poll_transmit() {
//!         send(&t);
//!     }
//!     let _next_wake = proxy.poll_timeout();
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

pub mod auth;
pub mod mac;
pub mod message;
pub mod proxy;
pub mod registrar;
pub mod stream;
pub mod transport;

pub use proxy::{Cidr, Interface, Keepalive, Proxy, ProxyConfig};
pub use registrar::{Binding, RegistrarConfig};
pub use transport::{ConnId, Flow, Transmit, Transport};

#[cfg(test)]
mod proxy_tests;
