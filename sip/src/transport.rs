//! Transports, flows and what the proxy asks the shell to send.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
    /// SIP over WebSocket (RFC 7118): from browsers, or behind an operator's TLS terminator.
    Ws,
    Wss,
}

impl Transport {
    /// The token used in Via (RFC 3261 §20.42).
    pub fn via_token(self) -> &'static str {
        match self {
            Transport::Udp => "UDP",
            Transport::Tcp => "TCP",
            Transport::Tls => "TLS",
            Transport::Ws => "WS",
            Transport::Wss => "WSS",
        }
    }

    /// Lower-case name, as in URI `transport=` parameters and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }

    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }

    pub fn from_param(p: &str) -> Option<Transport> {
        match p.to_ascii_lowercase().as_str() {
            "udp" => Some(Transport::Udp),
            "tcp" => Some(Transport::Tcp),
            "tls" => Some(Transport::Tls),
            "ws" => Some(Transport::Ws),
            "wss" => Some(Transport::Wss),
            _ => None,
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Transport::Tls => 5061,
            Transport::Ws => 80,
            Transport::Wss => 443,
            _ => 5060,
        }
    }

    /// Whether SIP messages travel as WebSocket messages on it.
    pub fn is_websocket(self) -> bool {
        matches!(self, Transport::Ws | Transport::Wss)
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identifies one TCP/TLS connection inside the shell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ConnId(pub u64);

/// A flow (in the spirit of RFC 5626): the transport, our local socket, and the remote
/// address a message came from or goes to. For streams, `conn` names the connection;
/// `None` asks the shell to use any live connection to `remote`, or to open one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub transport: Transport,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub conn: Option<ConnId>,
}

impl Flow {
    /// The same path, ignoring which connection carries it.
    pub fn same_path(&self, other: &Flow) -> bool {
        self.transport == other.transport && self.remote == other.remote
    }
}

/// Bytes for the shell to send on a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub flow: Flow,
    pub payload: Vec<u8>,
}
