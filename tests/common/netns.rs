//! Network-namespace NAT labs (also used by `cargo xtask lab`, so std only here): LAN host → NAT box (the Linux kernel's own NAT via
//! nftables) → WAN namespace. Addresses are RFC 5737 only: 203.0.113.0/24 is the "internet",
//! 198.51.100.0/25 the private LAN. Every namespace name is unique to the test and removed
//! on drop; stale ones from crashed runs are removed at start.

#![allow(dead_code)]

use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

pub const WAN_SERVER: &str = "203.0.113.1";
/// pinhole's second WAN address, for RFC 5780 CHANGE-REQUEST.
pub const WAN_ALTERNATE: &str = "203.0.113.100";
pub const NAT_WAN: &str = "203.0.113.2";
pub const NAT_LAN: &str = "198.51.100.1";
pub const LAN_HOST: &str = "198.51.100.10";

/// The NAT behaviour of the box (docs/DESIGN.md recipes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// No NAT: the box only routes (the WAN has a route back to the LAN).
    Open,
    /// EIM + EIF: masquerade plus a dynamic map of mappings that lets anyone in.
    FullCone,
    /// EIM + ADF: the same map keyed on the remote address.
    Restricted,
    /// Linux `masquerade`: endpoint-independent mapping, port-restricted filtering.
    PortRestricted,
    /// APDM with sequential ports (Δ = 1) from numgen.
    SymmetricSeq,
    /// `masquerade random`: address- and port-dependent mapping with random ports.
    SymmetricRandom,
    /// UDP dropped, TCP masqueraded.
    UdpBlocked,
    /// UDP dropped, TCP masqueraded to random ports (`masquerade random`).
    UdpBlockedRandom,
}

impl NatKind {
    pub fn drops_udp(self) -> bool {
        matches!(self, NatKind::UdpBlocked | NatKind::UdpBlockedRandom)
    }
}

/// One private network behind its own NAT box.
pub struct Lan {
    /// The NAT box namespace and the LAN host namespace.
    pub nat: String,
    pub lan: String,
    /// The NAT's public address, the LAN router and the LAN host.
    pub nat_wan: String,
    pub router: String,
    pub host: String,
}

pub struct NatLab {
    pub wan: String,
    pub lans: Vec<Lan>,
    /// The first LAN's namespaces, for single-LAN labs.
    pub nat: String,
    pub lan: String,
}

static SEQ: AtomicU32 = AtomicU32::new(0);
/// Every lab namespace name starts with this (xtask checks none is left after the suite).
pub const PREFIX: &str = "phl";

fn ip(args: &[&str]) -> Output {
    Command::new("ip").args(args).stdin(Stdio::null()).output().expect("ip (iproute2) must be installed")
}

fn must(args: &[&str]) {
    let out = ip(args);
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Set by `cargo xtask test`: a test that cannot run fails instead of skipping.
pub const STRICT_ENV: &str = "PINHOLE_TEST_STRICT";

/// Labs need root (network namespaces, nftables). Without it a lab test says so and is
/// skipped when run by hand with `cargo test`, rather than failing on the first
/// `ip netns add`; under `cargo xtask test` (which sets [`STRICT_ENV`]) it fails: a lab
/// that did not run never counts as passed.
pub fn have_root() -> bool {
    let uid = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines().find_map(|l| l.strip_prefix("Uid:").map(|v| v.split_whitespace().next().unwrap_or("").to_owned()))
    });
    let root = uid.as_deref() == Some("0");
    if !root {
        assert!(
            std::env::var_os(STRICT_ENV).is_none(),
            "this network-namespace lab needs root and cannot run; under cargo xtask test that is a failure"
        );
        eprintln!("SKIPPED: this network-namespace lab needs root (cargo xtask test runs it as root)");
    }
    root
}

/// Runs a command inside a namespace and insists it succeeds.
pub fn ns_exec(ns: &str, cmd: &[&str]) -> Output {
    let out =
        Command::new("ip").args(["netns", "exec", ns]).args(cmd).stdin(Stdio::null()).output().expect("ip netns exec");
    assert!(out.status.success(), "in {ns}: {}: {}", cmd.join(" "), String::from_utf8_lossy(&out.stderr));
    out
}

/// Loads nftables `rules` into `ns` (and insists it works).
pub fn nft(ns: &str, rules: &str) {
    static FILES: AtomicU32 = AtomicU32::new(0);
    let n = FILES.fetch_add(1, Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("{ns}-{}-{n}.nft", std::process::id()));
    std::fs::write(&path, rules).expect("write nft rules");
    ns_exec(ns, &["nft", "-f", &path.display().to_string()]);
    let _ = std::fs::remove_file(path);
}

/// Packets counted so far by the named counter `name` of table `inet table` in `ns`.
pub fn nft_counter(ns: &str, table: &str, name: &str) -> u64 {
    let out = ns_exec(ns, &["nft", "list", "counter", "inet", table, name]);
    let text = String::from_utf8_lossy(&out.stdout);
    let n = text.split_whitespace().skip_while(|w| *w != "packets").nth(1).and_then(|n| n.parse().ok());
    n.unwrap_or_else(|| panic!("no counter {name} in {table} of {ns}: {text}"))
}

/// Removes namespaces left by test processes that no longer exist.
fn remove_stale() {
    let out = ip(&["netns", "list"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: u32 = rest.split('x').next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if pid != 0 && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{name}"));
        }
    }
}

fn add_ns(ns: &str) {
    // Resolvers inside the lab point at the namespace's own loopback, so nothing ever
    // tries the host's nameserver.
    let etc = format!("/etc/netns/{ns}");
    std::fs::create_dir_all(&etc).expect("/etc/netns");
    std::fs::write(format!("{etc}/resolv.conf"), "nameserver 127.0.0.1\n").expect("resolv.conf");
    must(&["netns", "add", ns]);
    ns_exec(ns, &["ip", "link", "set", "lo", "up"]);
}

impl NatLab {
    /// One LAN host behind one NAT box of `kind`.
    pub fn new(kind: NatKind) -> NatLab {
        NatLab::with_lans(&[kind])
    }

    /// One LAN per kind, each behind its own NAT box: LAN i is 198.51.100.(128·i)/25 and
    /// its NAT's public address is 203.0.113.(2+i).
    pub fn with_lans(kinds: &[NatKind]) -> NatLab {
        remove_stale();
        let id = format!("{PREFIX}{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let wan = format!("{id}w");
        add_ns(&wan);
        let mut lans = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            let base = 128 * i as u16;
            let lan = Lan {
                nat: format!("{id}n{i}"),
                lan: format!("{id}l{i}"),
                nat_wan: format!("203.0.113.{}", 2 + i),
                router: format!("198.51.100.{}", base + 1),
                host: format!("198.51.100.{}", base + 10),
            };
            add_ns(&lan.nat);
            add_ns(&lan.lan);
            let wan_if = format!("w{i}");
            // veth names live per namespace; the WAN side gets one per NAT box.
            must(&["link", "add", "wan0", "netns", &lan.nat, "type", "veth", "peer", "name", &wan_if, "netns", &wan]);
            must(&[
                "link", "add", "lan0", "netns", &lan.nat, "type", "veth", "peer", "name", "eth0", "netns", &lan.lan,
            ]);
            if i == 0 {
                ns_exec(&wan, &["ip", "link", "add", "br0", "type", "bridge"]);
                ns_exec(&wan, &["ip", "addr", "add", &format!("{WAN_SERVER}/24"), "dev", "br0"]);
                ns_exec(&wan, &["ip", "addr", "add", &format!("{WAN_ALTERNATE}/24"), "dev", "br0"]);
                ns_exec(&wan, &["ip", "link", "set", "br0", "up"]);
            }
            ns_exec(&wan, &["ip", "link", "set", &wan_if, "master", "br0"]);
            ns_exec(&wan, &["ip", "link", "set", &wan_if, "up"]);
            ns_exec(&lan.nat, &["ip", "addr", "add", &format!("{}/24", lan.nat_wan), "dev", "wan0"]);
            ns_exec(&lan.nat, &["ip", "addr", "add", &format!("{}/25", lan.router), "dev", "lan0"]);
            ns_exec(&lan.nat, &["ip", "link", "set", "wan0", "up"]);
            ns_exec(&lan.nat, &["ip", "link", "set", "lan0", "up"]);
            ns_exec(&lan.nat, &["sysctl", "-q", "net.ipv4.ip_forward=1"]);
            ns_exec(&lan.lan, &["ip", "addr", "add", &format!("{}/25", lan.host), "dev", "eth0"]);
            ns_exec(&lan.lan, &["ip", "link", "set", "eth0", "up"]);
            ns_exec(&lan.lan, &["ip", "route", "add", "default", "via", &lan.router]);
            let wan_ip = &lan.nat_wan;
            // docs/DESIGN.md recipes. The cone maps learn each mapping in postrouting (only in the
            // original direction, or replies would overwrite it; and before `masquerade`,
            // which ends the chain) and let new inbound flows in through it in prerouting.
            let (post, pre, extra) = match kind {
                NatKind::Open => (String::new(), String::new(), String::new()),
                NatKind::PortRestricted => ("oifname \"wan0\" masquerade".to_owned(), String::new(), String::new()),
                NatKind::SymmetricRandom => ("oifname \"wan0\" masquerade random".to_owned(), String::new(), String::new()),
                NatKind::SymmetricSeq => (
                    format!(
                        "oifname \"wan0\" meta l4proto udp snat ip to {wan_ip} : numgen inc mod 16 map {{ {} }}\n    oifname \"wan0\" masquerade",
                        (0..16).map(|k| format!("{k} : {}", 40000 + k)).collect::<Vec<_>>().join(", ")
                    ),
                    String::new(),
                    String::new(),
                ),
                NatKind::FullCone => (
                    "oifname \"wan0\" ct direction original update @fc { udp sport : ct original ip saddr . ct original proto-src }\n    oifname \"wan0\" masquerade".to_owned(),
                    "iifname \"wan0\" ct state new dnat ip to udp dport map @fc".to_owned(),
                    "  map fc { type inet_service : ipv4_addr . inet_service; flags dynamic; }\n".to_owned(),
                ),
                NatKind::Restricted => (
                    "oifname \"wan0\" ct direction original update @rc { udp sport . ip daddr : ct original ip saddr . ct original proto-src }\n    oifname \"wan0\" masquerade".to_owned(),
                    "iifname \"wan0\" ct state new dnat ip to udp dport . ip saddr map @rc".to_owned(),
                    "  map rc { type inet_service . ipv4_addr : ipv4_addr . inet_service; flags dynamic; }\n".to_owned(),
                ),
                NatKind::UdpBlocked => ("oifname \"wan0\" masquerade".to_owned(), String::new(), String::new()),
                NatKind::UdpBlockedRandom => {
                    ("oifname \"wan0\" masquerade random".to_owned(), String::new(), String::new())
                }
            };
            if kind == &NatKind::Open {
                let net = format!("198.51.100.{}/25", 128 * i);
                ns_exec(&wan, &["ip", "route", "add", &net, "via", wan_ip]);
            }
            let forward = if kind.drops_udp() {
                "  chain forwarding {\n    type filter hook forward priority 0;\n    meta l4proto udp drop\n  }\n"
            } else {
                ""
            };
            // The WAN input drop keeps early inbound packets from being accepted by the box
            // itself (docs/DESIGN.md: without it punching fails every time).
            let rules = format!(
                "table ip nat {{\n{extra}  chain prerouting {{\n    type nat hook prerouting priority -100;\n    {pre}\n  }}\n  chain postrouting {{\n    type nat hook postrouting priority 100;\n    {post}\n  }}\n}}\n\
                 table inet filter {{\n  chain input {{\n    type filter hook input priority 0;\n    iifname \"wan0\" ct state new drop\n  }}\n{forward}}}\n"
            );
            nft(&lan.nat, &rules);
            lans.push(lan);
        }
        let (nat, lan) = (lans[0].nat.clone(), lans[0].lan.clone());
        NatLab { wan, lans, nat, lan }
    }

    /// A command to run inside `ns`.
    pub fn command(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        let names = self.lans.iter().flat_map(|l| [l.lan.clone(), l.nat.clone()]).chain([self.wan.clone()]);
        for ns in names {
            let _ = ip(&["netns", "del", &ns]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}

/// One flat segment: a hub namespace with a bridge on 203.0.113.1/24 and hosts, each in its
/// own namespace with `eth0` on the bridge. An address can be moved between hosts (a
/// virtual IP) with [`Segment::move_address`].
pub struct Segment {
    pub hub: String,
    pub hosts: Vec<String>,
}

impl Segment {
    /// Hosts with these addresses (in 203.0.113.0/24), in order.
    pub fn new(addresses: &[&str]) -> Segment {
        remove_stale();
        let id = format!("{PREFIX}{}x{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let hub = format!("{id}h");
        add_ns(&hub);
        ns_exec(&hub, &["ip", "link", "add", "br0", "type", "bridge"]);
        ns_exec(&hub, &["ip", "addr", "add", &format!("{WAN_SERVER}/24"), "dev", "br0"]);
        ns_exec(&hub, &["ip", "link", "set", "br0", "up"]);
        let mut hosts = Vec::new();
        for (i, addr) in addresses.iter().enumerate() {
            let host = format!("{id}s{i}");
            add_ns(&host);
            let port = format!("p{i}");
            must(&["link", "add", "eth0", "netns", &host, "type", "veth", "peer", "name", &port, "netns", &hub]);
            ns_exec(&hub, &["ip", "link", "set", &port, "master", "br0"]);
            ns_exec(&hub, &["ip", "link", "set", &port, "up"]);
            ns_exec(&host, &["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ns_exec(&host, &["ip", "link", "set", "eth0", "up"]);
            hosts.push(host);
        }
        Segment { hub, hosts }
    }

    /// Moves `addr` from host `from` to host `to` and makes every namespace on the segment
    /// forget where it was (what a gratuitous ARP from the new holder does).
    pub fn move_address(&self, addr: &str, from: usize, to: usize) {
        let _ = Command::new("ip")
            .args(["-n", &self.hosts[from], "addr", "del", &format!("{addr}/24"), "dev", "eth0"])
            .output();
        ns_exec(&self.hosts[to], &["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        for ns in std::iter::once(&self.hub).chain(&self.hosts) {
            let _ = Command::new("ip").args(["-n", ns, "neigh", "flush", "to", addr]).output();
        }
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.hub)) {
            let _ = ip(&["netns", "del", ns]);
            let _ = std::fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
}
