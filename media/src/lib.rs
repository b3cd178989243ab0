//! pinhole-media: the sans-IO media half of pinhole.
//!
//! This crate will hold SDP editing, relay sessions and latching, the STUN codec and NAT
//! classifier, punch planning and the fake-TCP state machine. Like `pinhole-sip`, it never
//! performs I/O and never reads the clock: callers pass `now` in and execute the commands
//! that come out.
//!

/// The media mode a deployment runs in (`[media] mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MediaMode {
    /// Anchor every call's media on pinhole's relay ports.
    #[default]
    Relay,
    /// Leave SDP untouched.
    Off,
}

pub mod latch;
pub mod ng;
pub mod relay;
pub mod sdp;
pub mod stats;
