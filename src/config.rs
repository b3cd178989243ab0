//! Configuration: TOML parsed once into typed structs. Unknown keys are errors.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use pinhole_sip::auth::Algorithm;
use pinhole_sip::{Cidr, Transport};
use serde::Deserialize;

/// The embedded default (`config/pinhole.toml`).
pub(crate) const DEFAULT_TOML: &str = include_str!("../config/pinhole.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) sip: Sip,
    #[serde(default)]
    pub(crate) auth: Auth,
    #[serde(default)]
    pub(crate) registrar: Registrar,
    #[serde(default)]
    pub(crate) nat: Nat,
    #[serde(default)]
    pub(crate) media: Media,
    #[serde(default)]
    pub(crate) ng: Ng,
    #[serde(default)]
    pub(crate) stun: Stun,
    #[serde(default)]
    pub(crate) metrics: Metrics,
    #[serde(default)]
    pub(crate) punch: Punch,
    /// `[faketcp]`: the fake-TCP forwarder; off unless the section is there.
    #[serde(default)]
    pub(crate) faketcp: Option<FakeTcp>,
    /// `[[trunk]]`: SIP trunks calls on a `[[route]]` go out through (B2BUA).
    #[serde(default)]
    pub(crate) trunk: Vec<TrunkSpec>,
    #[serde(default)]
    pub(crate) route: Vec<RouteSpec>,
    #[serde(default)]
    pub(crate) b2bua: B2buaSpec,
    /// `[cdr]`: call records of trunk calls; none unless the section is there.
    #[serde(default)]
    pub(crate) cdr: Option<CdrSpec>,
    /// `[cluster]`: registrations shared with other nodes in Redis; off without the section.
    #[serde(default)]
    pub(crate) cluster: Option<ClusterSpec>,
    /// `[hep]`: SIP, RTCP and quality reports exported to a capture server; off without
    /// the section.
    #[serde(default)]
    pub(crate) hep: Option<HepSpec>,
    /// `[recording]`: where recorded calls go; nothing is recorded without the section.
    #[serde(default)]
    pub(crate) recording: Option<RecordingSpec>,
}

/// `[recording]`: the directory, the bytes it may hold (oldest recordings deleted past it;
/// 0: no limit), the users whose calls are always recorded, and how many packets may wait
/// for the recorder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RecordingSpec {
    pub(crate) dir: PathBuf,
    #[serde(default = "default_recording_bytes")]
    pub(crate) max_bytes: u64,
    #[serde(default)]
    pub(crate) users: Vec<String>,
    #[serde(default = "default_recording_queue")]
    pub(crate) queue: usize,
}

fn default_recording_bytes() -> u64 {
    10_000_000_000
}

fn default_recording_queue() -> usize {
    65_536
}

/// `[hep]`: the capture server (`udp:IP:PORT`), this node's capture agent id, the
/// receiver's password (none when empty) and how many captures may wait to be sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HepSpec {
    pub(crate) address: Listen,
    #[serde(default = "default_capture_id")]
    pub(crate) capture_id: u32,
    #[serde(default)]
    pub(crate) password: String,
    #[serde(default = "default_hep_queue")]
    pub(crate) queue: usize,
}

fn default_capture_id() -> u32 {
    2001
}

fn default_hep_queue() -> usize {
    10_000
}

/// `[cluster]`: the Redis holding the nodes' registrations, this node's name, and the
/// address other nodes send requests for its phones to (default: its first UDP listener,
/// with `sip.advertise` when that listener is on 0.0.0.0).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClusterSpec {
    /// `redis://[:PASSWORD@]HOST:PORT` or `rediss://…` (TLS).
    pub(crate) redis: String,
    /// The CA (PEM) that signs a `rediss://` server's certificate, when the system's
    /// trust store does not hold it.
    #[serde(default)]
    pub(crate) tls_ca: Option<PathBuf>,
    /// Redis Sentinel: `["redis://IP:26379", …]` and the master's name; `redis` then
    /// gives only the master's password and scheme.
    #[serde(default)]
    pub(crate) sentinels: Vec<String>,
    #[serde(default)]
    pub(crate) master: Option<String>,
    /// Redis Cluster: `["redis://IP:PORT", …]`, some of its nodes; `redis` then gives only
    /// the password, user and scheme.
    #[serde(default)]
    pub(crate) cluster_nodes: Vec<String>,
    pub(crate) node: String,
    #[serde(default)]
    pub(crate) address: Option<SocketAddr>,
    /// The relay's call state in Redis, for takeover: `active` writes it, `standby`
    /// mirrors it until the relay's address moves here. Off when absent.
    #[serde(default)]
    pub(crate) calls: Option<CallsRole>,
}

impl ClusterSpec {
    fn target(&self) -> crate::redis_link::RedisTarget {
        crate::redis_link::RedisTarget {
            url: self.redis.clone(),
            tls_ca: self.tls_ca.clone(),
            sentinels: self.sentinels.clone(),
            master: self.master.clone(),
            cluster_nodes: self.cluster_nodes.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum CallsRole {
    Active,
    Standby,
}

/// `[cdr]`: where call records go, and the size at which the file is rotated (0: never;
/// SIGHUP reopens it either way).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CdrSpec {
    pub(crate) path: PathBuf,
    #[serde(default)]
    pub(crate) max_bytes: u64,
}

/// One `[[trunk]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrunkSpec {
    pub(crate) name: String,
    /// `udp:IP:PORT`, `tcp:…` or `tls:…`: the carrier's SIP address.
    pub(crate) address: Listen,
    #[serde(default)]
    pub(crate) username: String,
    #[serde(default)]
    pub(crate) password: String,
    #[serde(default)]
    pub(crate) register: bool,
    #[serde(default = "default_max_calls")]
    pub(crate) max_calls: usize,
    #[serde(default)]
    pub(crate) dids: Vec<DidSpec>,
    /// Seconds between OPTIONS pings (0: never; the trunk then counts as always up).
    #[serde(default = "default_options_interval")]
    pub(crate) options_interval: u64,
    /// The registration lifetime asked for, in seconds.
    #[serde(default = "default_register_expires")]
    pub(crate) register_expires: u64,
    /// Calls from the trunk must answer a digest challenge with username/password too.
    #[serde(default)]
    pub(crate) inbound_auth: bool,
}

fn default_options_interval() -> u64 {
    30
}

fn default_register_expires() -> u64 {
    600
}

fn default_max_calls() -> usize {
    100
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DidSpec {
    pub(crate) number: String,
    pub(crate) user: String,
}

/// One `[[route]]`: Request-URI users matching `match` go to `trunks`, tried in order.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RouteSpec {
    #[serde(rename = "match")]
    pub(crate) pattern: String,
    pub(crate) trunks: Vec<String>,
    /// Record the calls of this route (needs `[recording]`).
    #[serde(default)]
    pub(crate) record: bool,
}

/// `[b2bua]`: which headers cross from one leg to the other.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct B2buaSpec {
    pub(crate) copy_headers: Vec<String>,
    /// The session interval asked for on trunk legs, in seconds (RFC 4028; at least 90).
    pub(crate) session_expires: u64,
    /// Seconds a trunk may ring before the call is given up with 408.
    pub(crate) ring_timeout: u64,
}

impl Default for B2buaSpec {
    fn default() -> Self {
        let d = pinhole_sip::b2bua::B2buaConfig::default();
        B2buaSpec {
            copy_headers: d.copy_headers,
            session_expires: d.session_expires.as_secs(),
            ring_timeout: d.ring_timeout.as_secs(),
        }
    }
}

/// `[faketcp]`: where the forwarder listens (raw TCP; needs CAP_NET_RAW and nftables).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FakeTcp {
    #[serde(default = "default_faketcp_listen")]
    pub(crate) listen: SocketAddr,
}

fn default_faketcp_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4443))
}

/// `[punch]`: who may get a direct media path.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Punch {
    pub(crate) enabled: bool,
    /// Networks whose endpoints (public or private address) never get a direct path.
    pub(crate) deny: Vec<CidrSpec>,
    /// Users who never get a direct path.
    pub(crate) deny_users: Vec<String>,
}

impl Default for Punch {
    fn default() -> Self {
        Punch { enabled: true, deny: Vec::new(), deny_users: Vec::new() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Sip {
    #[serde(default)]
    pub(crate) listen: Vec<Listen>,
    #[serde(default)]
    pub(crate) advertise: Option<String>,
    pub(crate) domain: String,
    #[serde(default)]
    pub(crate) tls: Option<Tls>,
    /// Largest message accepted, in bytes (UDP datagram or stream frame).
    #[serde(default = "default_max_message")]
    pub(crate) max_message_size: usize,
    /// TCP/TLS connections held at once (also bounded by the open-file limit).
    #[serde(default = "default_max_connections")]
    pub(crate) max_connections: usize,
    /// TCP/TLS connections from one source address (IPv6: one /64).
    #[serde(default = "default_max_connections_per_source")]
    pub(crate) max_connections_per_source: usize,
    /// Seconds a connection may stay without a complete message or keepalive.
    #[serde(default = "default_idle_timeout")]
    pub(crate) idle_timeout: u64,
    /// Seconds a started message (or a TLS handshake, or a WebSocket upgrade) may take to
    /// arrive whole.
    #[serde(default = "default_message_timeout")]
    pub(crate) message_timeout: u64,
    /// `ws:`/`wss:` listeners: the `Origin`s a browser's upgrade may come from (empty: any).
    #[serde(default)]
    pub(crate) allowed_origins: Vec<String>,
}

fn default_max_message() -> usize {
    65_535
}

fn default_max_connections() -> usize {
    4096
}

fn default_max_connections_per_source() -> usize {
    128
}

fn default_idle_timeout() -> u64 {
    300
}

fn default_message_timeout() -> u64 {
    10
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Tls {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

/// `transport:IP:PORT`, e.g. `udp:0.0.0.0:5060` or `tls:[::]:5061`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub(crate) struct Listen {
    pub(crate) transport: Transport,
    pub(crate) addr: SocketAddr,
}

impl TryFrom<String> for Listen {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        let (t, a) = s.split_once(':').ok_or_else(|| format!("listen `{s}` is not transport:IP:PORT"))?;
        let transport =
            Transport::from_param(t).ok_or_else(|| format!("unknown transport `{t}` (udp, tcp, tls, ws or wss)"))?;
        let addr = a.parse().map_err(|_| format!("`{a}` is not IP:PORT"))?;
        Ok(Listen { transport, addr })
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.transport, self.addr)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub(crate) struct CidrSpec(pub(crate) Cidr);

impl TryFrom<String> for CidrSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Cidr::parse(&s).map(CidrSpec).ok_or_else(|| format!("`{s}` is not an IP address or CIDR block"))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Auth {
    #[serde(default = "default_realm")]
    pub(crate) realm: String,
    #[serde(default)]
    pub(crate) users: Vec<User>,
    #[serde(default)]
    pub(crate) trusted: Vec<CidrSpec>,
    /// Digest algorithms offered, in challenge order: "MD5", "SHA-256".
    #[serde(default = "default_algorithms")]
    pub(crate) algorithms: Vec<AlgorithmSpec>,
}

/// MD5 only by default: libre-based phones (baresip 1.0 in Debian) fail with "Function not
/// implemented" as soon as any challenge names an algorithm they lack, even next to MD5.
fn default_algorithms() -> Vec<AlgorithmSpec> {
    vec![AlgorithmSpec(Algorithm::Md5)]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub(crate) struct AlgorithmSpec(pub(crate) Algorithm);

impl TryFrom<String> for AlgorithmSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Algorithm::from_name(&s)
            .map(AlgorithmSpec)
            .ok_or_else(|| format!("unknown digest algorithm `{s}` (MD5 or SHA-256)"))
    }
}

fn default_realm() -> String {
    "pinhole".into()
}

impl Default for Auth {
    fn default() -> Self {
        Auth { realm: default_realm(), users: vec![], trusted: vec![], algorithms: default_algorithms() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct User {
    pub(crate) user: String,
    pub(crate) password: String,
    /// The identity this user's trunk calls carry (From and P-Asserted-Identity); by
    /// default the user name itself.
    #[serde(default)]
    pub(crate) caller_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Registrar {
    pub(crate) default_expires: u32,
    pub(crate) min_expires: u32,
    pub(crate) max_expires: u32,
    /// Path of the embedded registration store; empty keeps registrations in memory only.
    pub(crate) store: PathBuf,
}

impl Default for Registrar {
    fn default() -> Self {
        Registrar { default_expires: 3600, min_expires: 60, max_expires: 7200, store: PathBuf::new() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum KeepaliveKind {
    #[default]
    Options,
    Crlf,
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Nat {
    pub(crate) keepalive: KeepaliveKind,
    /// Seconds between keepalives per binding, to start with; well under the 20 s after
    /// which cheap routers, CGNATs and a tuned Linux conntrack drop idle UDP mappings.
    pub(crate) keepalive_interval: u64,
    /// The floor a binding's interval is halved towards each time its mapping is found dead
    /// (never above `keepalive_interval`).
    pub(crate) keepalive_min: u64,
}

impl Default for Nat {
    fn default() -> Self {
        Nat { keepalive: KeepaliveKind::Options, keepalive_interval: 15, keepalive_min: 5 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum MediaModeSpec {
    #[default]
    Relay,
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Media {
    pub(crate) mode: MediaModeSpec,
    pub(crate) interfaces: Vec<MediaInterface>,
    pub(crate) port_min: u16,
    pub(crate) port_max: u16,
    /// Seconds without media before a call is ended.
    pub(crate) timeout: u64,
    /// Seconds an offer may wait for its answer.
    pub(crate) offer_timeout: u64,
    /// Longest call, in seconds.
    pub(crate) max_duration: u64,
    /// Most relayed calls at once.
    pub(crate) max_sessions: usize,
    /// Forwarding threads; 0 picks one less than the number of cores (at least one).
    pub(crate) workers: usize,
    /// Scheduling priority (nice, -20..=19) of the forwarding threads, as rtpengine's
    /// `--priority`; below 0 needs CAP_SYS_NICE.
    pub(crate) nice: i32,
    /// Remote relays driven over ng instead of this node's own (a relay fleet).
    pub(crate) relays: Vec<RelayEntry>,
    /// The kernel fast path: `auto` forwards latched plain-RTP streams in a TC program
    /// where the kernel allows it (and says which path it took), `off` never.
    pub(crate) fastpath: FastPathSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum FastPathSpec {
    #[default]
    Auto,
    Off,
}

/// One relay of `[media] relays`: `"ng:IP:PORT"`, or a table with `ng`, `weight`,
/// `region` and `cidrs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "toml::Value")]
pub(crate) struct RelayEntry(pub(crate) pinhole_media::fleet::RelaySpec);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RelayTable {
    ng: String,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    cidrs: Vec<CidrSpec>,
    /// The relay's STUN service, which agents measure their round trip to.
    #[serde(default)]
    stun: Option<SocketAddr>,
}

fn one() -> u32 {
    1
}

impl TryFrom<toml::Value> for RelayEntry {
    type Error = String;
    fn try_from(v: toml::Value) -> Result<Self, String> {
        let t = match v {
            toml::Value::String(ng) => RelayTable { ng, weight: 1, region: None, cidrs: vec![], stun: None },
            table @ toml::Value::Table(_) => RelayTable::deserialize(table).map_err(|e| e.message().to_owned())?,
            other => return Err(format!("a relay is \"ng:IP:PORT\" or a table, not {}", other.type_str())),
        };
        let addr = t.ng.strip_prefix("ng:").unwrap_or(&t.ng);
        let ng = addr.parse().map_err(|_| format!("relay `{}` is not ng:IP:PORT", t.ng))?;
        if t.weight == 0 {
            return Err(format!("relay `{}` has weight 0; weights start at 1", t.ng));
        }
        Ok(RelayEntry(pinhole_media::fleet::RelaySpec {
            ng,
            weight: t.weight,
            region: t.region,
            cidrs: t.cidrs.into_iter().map(|c| c.0).collect(),
            stun: t.stun,
        }))
    }
}

impl Default for Media {
    fn default() -> Self {
        Media {
            mode: MediaModeSpec::Relay,
            interfaces: vec![],
            port_min: 30000,
            port_max: 39999,
            timeout: 60,
            offer_timeout: 200,
            max_duration: 14_400,
            max_sessions: 10_000,
            workers: 0,
            nice: 0,
            relays: vec![],
            fastpath: FastPathSpec::Auto,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MediaInterface {
    pub(crate) name: String,
    pub(crate) bind: IpAddr,
    pub(crate) advertise: Option<IpAddr>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Ng {
    pub(crate) listen: String,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Stun {
    pub(crate) listen: Vec<SocketAddr>,
    pub(crate) alternate: Option<IpAddr>,
    /// Short-term credentials for MESSAGE-INTEGRITY, separate from the SIP passwords so a
    /// STUN guess never tests a SIP password.
    pub(crate) users: Vec<User>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Metrics {
    pub(crate) listen: Option<SocketAddr>,
}

/// `pinhole agent --config FILE`: an edge helper on a LAN, next to unchanged phones.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentFile {
    pub(crate) agent: AgentSection,
    pub(crate) sip: AgentSip,
    #[serde(default)]
    pub(crate) media: Media,
    /// `/metrics` (punch attempts, outcomes, paths), only when `listen` is set.
    #[serde(default)]
    pub(crate) metrics: Metrics,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentSection {
    /// The pinhole server's SIP/UDP address; its STUN is at the same IP, port 3478.
    pub(crate) server: SocketAddr,
    /// The server's STUN service, when not at the server's IP port 3478.
    #[serde(default)]
    pub(crate) stun: Option<SocketAddr>,
    /// How signalling reaches the server: `auto` (UDP, TCP when the NAT probe finds UDP
    /// blocked), `udp` or `tcp`.
    #[serde(default)]
    pub(crate) transport: AgentTransport,
    /// The STUN services of the server's relays: their round trips are measured and
    /// reported with REGISTERs (`Pinhole-RTT`), so each call gets the nearest relay.
    #[serde(default)]
    pub(crate) relays: Vec<SocketAddr>,
    /// Ask the LAN's gateway for port mappings (PCP, then NAT-PMP): `auto` or `off`.
    #[serde(default)]
    pub(crate) portmap: PortmapMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum PortmapMode {
    #[default]
    Auto,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum AgentTransport {
    #[default]
    Auto,
    Udp,
    Tcp,
}

impl AgentSection {
    pub(crate) fn stun(&self) -> SocketAddr {
        self.stun.unwrap_or(SocketAddr::new(self.server.ip(), 3478))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AgentSip {
    /// Where the LAN's phones send (their outbound proxy).
    pub(crate) listen: Vec<Listen>,
    #[serde(default = "default_max_message")]
    pub(crate) max_message_size: usize,
}

impl AgentFile {
    /// Parses and checks an agent file, returning every error found.
    pub(crate) fn parse(text: &str) -> Result<AgentFile, Vec<ConfigError>> {
        let cfg: AgentFile = from_toml(text)?;
        let mut errs = Vec::new();
        let mut err = |table: &str, key: &str, message: String| {
            let (line, column) = locate(text, table, key);
            errs.push(ConfigError { line, column, message });
        };
        if cfg.sip.listen.is_empty() {
            err("sip", "listen", "the agent needs a listen address for its phones".into());
        }
        for l in &cfg.sip.listen {
            if l.transport != Transport::Udp {
                err("sip", "listen", format!("{l}: the agent listens on UDP only, for now"));
            }
            if l.addr.ip().is_unspecified() {
                err(
                    "sip",
                    "listen",
                    format!("{l}: the agent needs a specific address (it goes in Via and Record-Route)"),
                );
            }
        }
        if cfg.media.port_min > cfg.media.port_max || cfg.media.port_min < 1024 {
            err("media", "port_min", "need 1024 <= port_min <= port_max".into());
        }
        if errs.is_empty() {
            Ok(cfg)
        } else {
            Err(errs)
        }
    }
}

/// Deserialises a file, turning the TOML error into one positioned error.
fn from_toml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Vec<ConfigError>> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        vec![ConfigError { line, column, message: e.message().to_owned() }]
    })
}

/// Whether a file is an agent's (it has an `[agent]` table).
pub(crate) fn is_agent_file(text: &str) -> bool {
    text.parse::<toml::Table>().is_ok_and(|t| t.contains_key("agent"))
}

/// A configuration error with its position in the file (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConfigError {
    pub(crate) line: usize,
    pub(crate) column: usize,
    pub(crate) message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}: {}", self.line, self.column, self.message)
    }
}

impl Config {
    /// Parses and checks a whole file, returning every error found.
    pub(crate) fn parse(text: &str) -> Result<Config, Vec<ConfigError>> {
        let cfg: Config = from_toml(text)?;
        let errors = cfg.check(text);
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(errors)
        }
    }

    pub(crate) fn embedded() -> Config {
        // The embedded default is checked by the `embedded_default_is_valid` test.
        #[allow(clippy::expect_used)]
        Config::parse(DEFAULT_TOML).expect("embedded config/pinhole.toml is valid")
    }

    /// Cross-field checks that serde cannot express.
    fn check(&self, text: &str) -> Vec<ConfigError> {
        let mut errs = Vec::new();
        let mut err = |table: &str, key: &str, message: String| {
            let (line, column) = locate(text, table, key);
            errs.push(ConfigError { line, column, message });
        };
        let r = &self.registrar;
        if !(r.min_expires <= r.default_expires && r.default_expires <= r.max_expires) {
            err("registrar", "default_expires", "need min_expires <= default_expires <= max_expires".into());
        }
        if self.sip.listen.iter().any(|l| matches!(l.transport, Transport::Tls | Transport::Wss))
            && self.sip.tls.is_none()
        {
            err("sip", "listen", "a tls: or wss: listener needs [sip.tls] cert and key".into());
        }
        let records =
            self.route.iter().any(|r| r.record) || self.recording.as_ref().is_some_and(|r| !r.users.is_empty());
        if records && self.recording.is_none() {
            err("route", "record", "recording calls needs a [recording] table with its dir".into());
        }
        if let Some(r) = &self.recording {
            if r.queue == 0 || r.queue > 10_000_000 {
                err("recording", "queue", "queue must be between 1 and 10000000".into());
            }
        }
        if let Some(h) = &self.hep {
            if h.address.transport != Transport::Udp {
                err("hep", "address", "HEP is exported over UDP: address = \"udp:IP:PORT\"".into());
            }
            if h.queue == 0 || h.queue > 1_000_000 {
                err("hep", "queue", "queue must be between 1 and 1000000".into());
            }
        }
        if self.sip.domain.trim().is_empty() {
            err("sip", "domain", "domain must not be empty".into());
        }
        if self.media.port_min > self.media.port_max || self.media.port_min < 1024 {
            err("media", "port_min", "need 1024 <= port_min <= port_max".into());
        }
        if !(-20..=19).contains(&self.media.nice) {
            err("media", "nice", "nice must be between -20 and 19".into());
        }
        if self.stun.alternate.is_some() && self.stun.listen.iter().any(|a| a.ip().is_unspecified()) {
            err("stun", "alternate", "an alternate address needs specific stun.listen addresses, not 0.0.0.0".into());
        }
        if self.sip.max_connections == 0 || self.sip.max_connections_per_source == 0 {
            err("sip", "max_connections", "connection caps must be at least 1".into());
        }
        if self.sip.idle_timeout == 0 || self.sip.message_timeout == 0 {
            err("sip", "message_timeout", "connection timeouts must be at least 1 second".into());
        }
        if self.nat.keepalive_interval == 0 {
            err("nat", "keepalive_interval", "keepalive_interval must be at least 1 second".into());
        }
        if self.nat.keepalive_min == 0 {
            err("nat", "keepalive_min", "keepalive_min must be at least 1 second".into());
        }
        if !self.ng.listen.is_empty() && self.ng.listen.parse::<SocketAddr>().is_err() {
            err("ng", "listen", format!("`{}` is not IP:PORT", self.ng.listen));
        }
        if let Some(adv) = &self.sip.advertise {
            if adv.trim().is_empty() || adv.contains(char::is_whitespace) {
                err("sip", "advertise", "advertise must be an IP address or host name".into());
            }
        }
        let mut seen = std::collections::HashSet::new();
        for l in &self.sip.listen {
            if !seen.insert((l.transport, l.addr)) {
                err("sip", "listen", format!("{l} is listed twice"));
            }
        }
        let mut relays = std::collections::HashSet::new();
        for r in &self.media.relays {
            if !relays.insert(r.0.ng) {
                err("media", "relays", format!("relay {} is listed twice", r.0.ng));
            }
        }
        if !self.media.relays.is_empty() && self.media.mode == MediaModeSpec::Off {
            err("media", "relays", "relays need media.mode = \"relay\"".into());
        }
        self.check_trunks(text, &mut errs);
        if let Some(c) = &self.cluster {
            let mut err = |key: &str, message: String| {
                let (line, column) = locate(text, "cluster", key);
                errs.push(ConfigError { line, column, message });
            };
            if !c.redis.starts_with("redis://") && !c.redis.starts_with("rediss://") {
                err("redis", format!("`{}` is not a redis:// or rediss:// URL", c.redis));
            } else if redis::IntoConnectionInfo::into_connection_info(c.redis.as_str()).is_err() {
                err("redis", format!("`{}` is not a Redis URL", c.redis));
            }
            if c.tls_ca.is_some() && !c.redis.starts_with("rediss://") {
                err("tls_ca", "tls_ca needs a rediss:// URL".into());
            }
            if c.sentinels.is_empty() != c.master.is_none() {
                err("sentinels", "Redis Sentinel needs both sentinels and master".into());
            }
            for s in &c.sentinels {
                if redis::IntoConnectionInfo::into_connection_info(s.as_str()).is_err() {
                    err("sentinels", format!("`{s}` is not a Redis URL"));
                }
            }
            if !c.cluster_nodes.is_empty() && !c.sentinels.is_empty() {
                err("cluster_nodes", "a Redis Cluster has no sentinels: give cluster_nodes or sentinels".into());
            }
            for n in &c.cluster_nodes {
                let scheme = c.redis.split("://").next().unwrap_or_default();
                if redis::IntoConnectionInfo::into_connection_info(n.as_str()).is_err() {
                    err("cluster_nodes", format!("`{n}` is not a Redis URL"));
                } else if n.split("://").next() != Some(scheme) {
                    err("cluster_nodes", format!("`{n}` is not a {scheme}:// URL as `redis` is"));
                }
            }
            if c.node.trim().is_empty() || c.node.contains(char::is_whitespace) {
                err("node", "node must be a name without spaces".into());
            }
            let sip = !self.sip.listen.is_empty();
            if sip && c.address.is_none() && !self.sip.listen.iter().any(|l| l.transport == Transport::Udp) {
                err("address", "a cluster node needs a UDP listener or an address".into());
            }
            if c.calls.is_some() && (self.relay().is_none() || !self.media.relays.is_empty()) {
                err("calls", "call state is a relay's: it needs media.mode = \"relay\" and no media.relays".into());
            }
        }
        errs
    }

    /// The cluster's registration sharing, with this node's address worked out (none on a
    /// node without SIP).
    pub(crate) fn cluster(&self) -> Option<crate::cluster::ClusterConfig> {
        let c = self.cluster.as_ref()?;
        if self.sip.listen.is_empty() {
            return None;
        }
        let address = c.address.or_else(|| {
            let l = self.sip.listen.iter().find(|l| l.transport == Transport::Udp)?;
            let ip = self.advertise_for(l).parse().unwrap_or(l.addr.ip());
            Some(SocketAddr::new(ip, l.addr.port()))
        })?;
        Some(crate::cluster::ClusterConfig { redis: c.target(), node: c.node.clone(), address })
    }

    /// The relay call state's settings (`[cluster] calls`): keys under the relay's first
    /// advertised address, which the active node and its standby share.
    pub(crate) fn call_store(&self) -> Option<crate::takeover::CallStoreConfig> {
        let c = self.cluster.as_ref()?;
        let role = c.calls?;
        let relay = self.relay()?;
        let address = relay.interfaces.first()?.advertise;
        Some(crate::takeover::CallStoreConfig {
            redis: c.target(),
            node: c.node.clone(),
            prefix: format!("pinhole:call:{address}:"),
            stream: format!("pinhole:calllog:{address}"),
            standby: role == CallsRole::Standby,
            ttl: self.media.max_duration.max(1),
        })
    }

    /// `[[trunk]]` and `[[route]]`: names unique, routes naming trunks that exist, patterns
    /// that compile, limits of at least one call.
    fn check_trunks(&self, text: &str, errs: &mut Vec<ConfigError>) {
        let mut err = |table: &str, nth: usize, key: &str, message: String| {
            let (line, column) = locate_nth(text, table, nth, key);
            errs.push(ConfigError { line, column, message });
        };
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.trunk.iter().enumerate() {
            if t.name.trim().is_empty() || !names.insert(t.name.as_str()) {
                err("trunk", i, "name", format!("trunk name `{}` is empty or used twice", t.name));
            }
            if t.max_calls == 0 {
                err("trunk", i, "max_calls", "max_calls must be at least 1".into());
            }
            if t.register && t.username.is_empty() {
                err("trunk", i, "register", "register = true needs a username".into());
            }
            if t.inbound_auth && (t.username.is_empty() || t.password.is_empty()) {
                err("trunk", i, "inbound_auth", "inbound_auth = true needs a username and a password".into());
            }
            if t.address.addr.ip().is_unspecified() || t.address.addr.port() == 0 {
                err("trunk", i, "address", format!("`{}` is not a carrier's address", t.address));
            }
            if !self.sip.listen.iter().any(|l| l.transport == t.address.transport) {
                err(
                    "trunk",
                    i,
                    "address",
                    format!("no {} listener to reach `{}` from", t.address.transport, t.address),
                );
            }
        }
        if self.b2bua.session_expires < pinhole_sip::b2bua::MIN_SE.as_secs() {
            err("b2bua", 0, "session_expires", "session_expires must be at least 90 (RFC 4028 Min-SE)".into());
        }
        if !(1..=3600).contains(&self.b2bua.ring_timeout) {
            err("b2bua", 0, "ring_timeout", "ring_timeout must be 1 to 3600 seconds".into());
        }
        for u in &self.auth.users {
            if u.caller_id.as_deref().is_some_and(|c| !pinhole_sip::b2bua::dialable(c)) {
                err("auth", 0, "users", format!("caller_id of `{}` must be 1-64 of 0-9 A-Z a-z + * # . _ -", u.user));
            }
        }
        for (i, r) in self.route.iter().enumerate() {
            if let Err(e) = regex::Regex::new(&r.pattern) {
                let first = e.to_string().lines().last().unwrap_or("").trim().to_owned();
                err("route", i, "match", format!("match `{}` is not a regular expression: {first}", r.pattern));
            }
            if r.trunks.is_empty() {
                err("route", i, "trunks", "a route needs at least one trunk".into());
            }
            for name in &r.trunks {
                if !self.trunk.iter().any(|t| &t.name == name) {
                    err("route", i, "trunks", format!("no [[trunk]] named `{name}`"));
                }
            }
        }
    }

    /// The B2BUA's trunks and routes (checked by [`Config::parse`]).
    pub(crate) fn b2bua(&self) -> pinhole_sip::b2bua::B2buaConfig {
        use pinhole_sip::b2bua::{B2buaConfig, Route, Trunk};
        let trunks = self
            .trunk
            .iter()
            .map(|t| Trunk {
                name: t.name.clone(),
                transport: t.address.transport,
                address: t.address.addr,
                username: t.username.clone(),
                password: t.password.clone(),
                register: t.register,
                max_calls: t.max_calls,
                dids: t.dids.iter().map(|d| (d.number.clone(), d.user.clone())).collect(),
                options_interval: t.options_interval,
                register_expires: t.register_expires,
                inbound_auth: t.inbound_auth,
            })
            .collect();
        let routes = self
            .route
            .iter()
            .filter_map(|r| {
                Some(Route {
                    pattern: regex::Regex::new(&r.pattern).ok()?,
                    trunks: r.trunks.iter().filter_map(|n| self.trunk.iter().position(|t| &t.name == n)).collect(),
                    record: r.record,
                })
            })
            .collect();
        B2buaConfig {
            trunks,
            routes,
            copy_headers: self.b2bua.copy_headers.clone(),
            session_expires: std::time::Duration::from_secs(self.b2bua.session_expires),
            ring_timeout: std::time::Duration::from_secs(self.b2bua.ring_timeout),
            caller_ids: self.auth.users.iter().filter_map(|u| Some((u.user.clone(), u.caller_id.clone()?))).collect(),
        }
    }

    /// The relay configuration, or `None` when `media.mode = "off"`.
    pub(crate) fn relay(&self) -> Option<pinhole_media::relay::RelayConfig> {
        use std::time::Duration;
        if self.media.mode == MediaModeSpec::Off {
            return None;
        }
        let fallback =
            [MediaInterface { name: "default".into(), bind: std::net::Ipv4Addr::UNSPECIFIED.into(), advertise: None }];
        let configured = if self.media.interfaces.is_empty() { &fallback[..] } else { &self.media.interfaces[..] };
        let sip_ip = self
            .sip
            .advertise
            .as_deref()
            .and_then(|a| a.parse().ok())
            .or_else(|| self.sip.listen.iter().map(|l| l.addr.ip()).find(|ip| !ip.is_unspecified()))
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
        let interfaces = configured
            .iter()
            .map(|i| pinhole_media::relay::RelayInterface {
                name: i.name.clone(),
                bind: i.bind,
                advertise: i.advertise.unwrap_or(if i.bind.is_unspecified() { sip_ip } else { i.bind }),
            })
            .collect();
        Some(pinhole_media::relay::RelayConfig {
            interfaces,
            port_min: self.media.port_min,
            port_max: self.media.port_max,
            media_timeout: Duration::from_secs(self.media.timeout),
            offer_timeout: Duration::from_secs(self.media.offer_timeout),
            max_duration: Duration::from_secs(self.media.max_duration),
            max_sessions: self.media.max_sessions,
            max_streams: pinhole_media::relay::DEFAULT_MAX_STREAMS,
            can_record: self.recording.is_some(),
        })
    }

    /// The host to put in Via/Record-Route for a listener.
    pub(crate) fn advertise_for(&self, l: &Listen) -> String {
        match &self.sip.advertise {
            Some(a) => a.clone(),
            None if !l.addr.ip().is_unspecified() => l.addr.ip().to_string(),
            None => "127.0.0.1".into(),
        }
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(before.len(), |i| before.len() - i - 1) + 1;
    (line, column)
}

/// Where `key` is set inside `[table]`, or where the table starts, or line 1.
fn locate(text: &str, table: &str, key: &str) -> (usize, usize) {
    locate_nth(text, table, 0, key)
}

/// As [`locate`], in the `nth` (from 0) of the tables named `table` (`[[table]]` arrays).
fn locate_nth(text: &str, table: &str, nth: usize, key: &str) -> (usize, usize) {
    let mut in_table = false;
    let mut table_line = None;
    let mut seen = 0;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            in_table = t.trim_matches(|c| c == '[' || c == ']').trim() == table;
            if in_table {
                in_table = seen == nth;
                seen += 1;
            }
            if in_table {
                table_line = Some(i + 1);
            }
            continue;
        }
        if in_table && t.split('=').next().map(str::trim) == Some(key) {
            return (i + 1, line.len() - line.trim_start().len() + 1);
        }
    }
    (table_line.unwrap_or(1), 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_not_an_open_relay() {
        let c = Config::parse(DEFAULT_TOML).expect("valid");
        assert!(c.auth.users.is_empty(), "no default credentials");
        let outside: IpAddr = "198.51.100.1".parse().expect("ip");
        assert!(c.auth.trusted.iter().all(|t| !t.0.contains(outside)), "outside sources are challenged");
        assert_eq!(c.ng.listen, "127.0.0.1:2223");
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9090".parse().expect("addr")));
    }

    #[test]
    fn trunks_and_routes_parse_and_each_mistake_is_named_with_its_line() {
        let base = "[sip]\ndomain = \"x\"\nlisten = [\"udp:127.0.0.1:5060\"]\n";
        let good = format!(
            "{base}[[trunk]]\nname = \"carrier1\"\naddress = \"udp:127.0.0.3:5080\"\nusername = \"acct1\"\npassword = \"secret\"\n\
             register = true\nmax_calls = 2\ndids = [{{ number = \"15551230001\", user = \"alice\" }}]\n\
             [[trunk]]\nname = \"carrier2\"\naddress = \"udp:127.0.0.4:5080\"\n\
             [[route]]\nmatch = \"^\\\\+?1?555\\\\d{{7}}$\"\ntrunks = [\"carrier1\", \"carrier2\"]\n"
        );
        let c = Config::parse(&good).expect("valid");
        let b = c.b2bua();
        assert_eq!(b.trunks.len(), 2);
        assert_eq!(b.trunks[0].dids, vec![("15551230001".to_owned(), "alice".to_owned())]);
        assert_eq!(b.routes[0].trunks, vec![0, 1]);
        assert!(b.routes[0].pattern.is_match("+15551230001") && !b.routes[0].pattern.is_match("alice"));
        // A bad pattern and an unknown trunk, each at its own line, in the second route.
        let bad = format!("{good}[[route]]\nmatch = \"(unclosed\"\ntrunks = [\"nope\"]\n");
        let errs = Config::parse(&bad).expect_err("invalid");
        let lines: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert!(errs.iter().any(|e| e.message.contains("(unclosed") && e.line == 19), "{errs:?}");
        assert!(errs.iter().any(|e| e.message.contains("`nope`") && e.line == 20), "{errs:?} {lines:?}");
        let dup = format!("{good}[[trunk]]\nname = \"carrier1\"\naddress = \"tcp:127.0.0.5:5080\"\n");
        let errs = Config::parse(&dup).expect_err("invalid");
        assert!(errs.iter().any(|e| e.message.contains("used twice") && e.line == 19), "{errs:?}");
        assert!(errs.iter().any(|e| e.message.contains("no tcp listener")), "{errs:?}");
    }

    #[test]
    fn media_nice_is_a_nice_value() {
        let base = "[sip]\ndomain = \"x\"\n[media]\n";
        assert_eq!(Config::parse(&format!("{base}nice = -10\n")).expect("valid").media.nice, -10);
        assert_eq!(Config::parse(base).expect("valid").media.nice, 0, "unchanged by default");
        let errs = Config::parse(&format!("{base}nice = 20\n")).expect_err("out of range");
        assert!(errs[0].message.contains("between -20 and 19"), "{errs:?}");
    }

    #[test]
    fn punch_policy_parses_and_a_bad_network_is_named() {
        let base = "[sip]\ndomain = \"x\"\n[punch]\nenabled = false\ndeny_users = [\"alice\"]\n";
        let c = Config::parse(&format!("{base}deny = [\"198.51.100.0/24\"]\n")).expect("valid");
        assert!(!c.punch.enabled);
        assert_eq!(c.punch.deny_users, vec!["alice".to_owned()]);
        assert_eq!(c.punch.deny.len(), 1);
        let errs = Config::parse(&format!("{base}deny = [\"198.51.100.0/99\"]\n")).expect_err("bad CIDR");
        assert!(errs[0].message.contains("198.51.100.0/99") && errs[0].line == 6, "{errs:?}");
        assert!(Config::parse("[sip]\ndomain = \"x\"\n").expect("valid").punch.enabled, "on by default");
    }

    #[test]
    fn unknown_key_is_an_error_with_position() {
        let text = "[sip]\ndomain = \"x\"\nlisten = []\nbogus = 1\n";
        let errs = Config::parse(text).expect_err("unknown key");
        assert_eq!(errs[0].line, 4);
        assert!(errs[0].message.contains("bogus"), "{}", errs[0].message);
    }

    #[test]
    fn bad_listen_spec_names_the_problem() {
        let errs = Config::parse("[sip]\ndomain = \"x\"\nlisten = [\"sctp:1.2.3.4:5060\"]\n").expect_err("bad");
        assert_eq!(errs[0].line, 3);
        assert!(errs[0].message.contains("unknown transport `sctp`"));
    }

    #[test]
    fn every_cross_field_error_is_reported() {
        let text = "[sip]\ndomain = \"x\"\nlisten = [\"tls:127.0.0.1:5061\"]\n[registrar]\nmin_expires = 100\ndefault_expires = 10\n";
        let errs = Config::parse(text).expect_err("bad");
        assert_eq!(errs.len(), 2);
        assert!(errs.iter().any(|e| e.line == 6 && e.message.contains("default_expires")));
        assert!(errs.iter().any(|e| e.line == 3 && e.message.contains("tls")));
    }
}
