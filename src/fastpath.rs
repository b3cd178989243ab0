//! The kernel fast path (`[media] fastpath`): bpf/fastpath.bpf.c, a TC ingress program on
//! the relay's interfaces, forwards the packets of latched plain-RTP streams without them
//! reaching a socket. This module loads and attaches it (aya), and gives the data plane's
//! worker the flow map: it installs a flow once both parties of a port pair are latched,
//! removes it when signalling or the latch changes or the ports close, and reads its
//! counters into the streams' statistics (media timeout, media path, packet counts).
//!
//! Userspace stays the authority: the program forwards only exact 5-tuples userspace put
//! in the map, so a stranger's packet always comes up to the latch, as before.
//!
//! Attachment is a TCX link (kernel ≥ 6.6), which the kernel removes when the process
//! ends, however it ends; on older kernels it is a netlink filter, and a leftover one from
//! a crashed run (found by the program's name) is removed before attaching.
#![allow(unsafe_code)] // `Pod` for the two map types: plain C structs, all bit patterns valid.

use std::collections::HashMap as StdHashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};

use aya::maps::{HashMap, MapData};
use aya::programs::tc::{qdisc_add_clsact, qdisc_detach_program, SchedClassifier, TcAttachType};
use aya::Ebpf;

/// The program's name in the object (and the name a leftover filter is found by).
const PROGRAM: &str = "pinhole_fwd";
const MAP: &str = "pinhole_flows";
/// Flows the map holds (the program's `max_entries`).
pub(crate) const MAX_FLOWS: usize = 65_536;

/// The object clang built from bpf/fastpath.bpf.c, when it could (see build.rs).
#[cfg(pinhole_bpf)]
static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fastpath.bpf.o")));
#[cfg(not(pinhole_bpf))]
static OBJECT: Option<&[u8]> = None;

/// A flow's key: who sends, to which relay address and port (network byte order).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(crate) struct FlowKey {
    src_ip: u32,
    dst_ip: u32,
    src_port: u16,
    dst_port: u16,
}

/// What the program does with a flow's packets, and what it counted.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Flow {
    new_src_ip: u32,
    new_dst_ip: u32,
    new_src_port: u16,
    new_dst_port: u16,
    /// The interface towards the new destination; 0: local (back up the stack).
    ifindex: u32,
    packets: u64,
    bytes: u64,
    last_ns: u64,
    rtp_packets: u64,
    /// RTP's extended highest sequence number and jitter, continued from userspace's.
    ext_max: u32,
    seq_known: u32,
    jitter16: u32,
    last_transit: u32,
    transit_known: u32,
    pad: u32,
}

/// What the program counted of a flow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counted {
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
    pub(crate) rtp: u64,
    /// The extended highest sequence number (when it saw RTP) and jitter × 16.
    pub(crate) ext_max: Option<u32>,
    pub(crate) jitter16: u32,
}

// SAFETY: #[repr(C)] structs of integers, laid out as the program's, no padding bytes the
// kernel could leave uninitialised that we read as anything but integers.
unsafe impl aya::Pod for FlowKey {}
unsafe impl aya::Pod for Flow {}

fn wire(a: SocketAddrV4) -> (u32, u16) {
    (u32::from_ne_bytes(a.ip().octets()), a.port().to_be())
}

impl FlowKey {
    pub(crate) fn new(src: SocketAddrV4, relay: SocketAddrV4) -> FlowKey {
        let ((src_ip, src_port), (dst_ip, dst_port)) = (wire(src), wire(relay));
        FlowKey { src_ip, dst_ip, src_port, dst_port }
    }
}

impl Flow {
    /// Leave from `from` (the relay's peer port) towards `to` (the other party), out of
    /// interface `ifindex` (0: `to` is local).
    /// `seq`: userspace's extended highest sequence number and jitter × 16 so far, which
    /// the program continues (a transit time is not carried: the clocks differ).
    pub(crate) fn new(from: SocketAddrV4, to: SocketAddrV4, ifindex: u32, seq: Option<(u32, u32)>) -> Flow {
        let ((new_src_ip, new_src_port), (new_dst_ip, new_dst_port)) = (wire(from), wire(to));
        let (ext_max, jitter16) = seq.unwrap_or_default();
        Flow {
            new_src_ip,
            new_dst_ip,
            new_src_port,
            new_dst_port,
            ifindex,
            ext_max,
            seq_known: u32::from(seq.is_some()),
            jitter16,
            ..Flow::default()
        }
    }
}

/// The loaded, attached program and its flow map.
pub(crate) struct FastPath {
    flows: HashMap<MapData, FlowKey, Flow>,
    /// This host's addresses when the fast path started.
    local: Vec<Ipv4Addr>,
    /// Keeps the program (and its TCX links) alive; dropping it detaches.
    _bpf: Ebpf,
    pub(crate) interfaces: Vec<String>,
}

/// Every IPv4 address of this host's interfaces.
fn addresses() -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs fills a list we only read and free with freeifaddrs.
    unsafe {
        let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null() && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

/// The interface the main routing table sends `dst` through (longest prefix of
/// /proc/net/route), by index; `None` when no route matches.
fn route(dst: Ipv4Addr) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    let want = u32::from_ne_bytes(dst.octets());
    let mut best: Option<(u32, String)> = None;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(iface), Some(net), Some(mask)) = (f.first(), f.get(1), f.get(7)) else { continue };
        let (Ok(net), Ok(mask)) = (u32::from_str_radix(net, 16), u32::from_str_radix(mask, 16)) else { continue };
        // Both as the kernel prints them: the address's bytes in memory order.
        if want & mask == net && best.as_ref().is_none_or(|(m, _)| mask.count_ones() > m.count_ones()) {
            best = Some((mask, (*iface).to_owned()));
        }
    }
    let name = std::ffi::CString::new(best?.1).ok()?;
    // SAFETY: a NUL-terminated name; if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The names of the interfaces that are up.
fn interfaces_up() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else { return Vec::new() };
    let mut names: Vec<String> = dir
        .flatten()
        .filter(|e| {
            let flags = std::fs::read_to_string(e.path().join("flags")).unwrap_or_default();
            u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).is_ok_and(|f| f & 1 != 0)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

impl FastPath {
    /// Loads the program and attaches it at ingress of the interfaces that have the
    /// relay's addresses `binds`. The error says why the fast path is not there.
    pub(crate) fn start(binds: &[IpAddr]) -> Result<FastPath, String> {
        let object = OBJECT.ok_or("not built: clang and libbpf-dev were missing when pinhole was built")?;
        let local = addresses();
        for ip in binds {
            let IpAddr::V4(v4) = ip else { return Err(format!("{ip}: the fast path is IPv4 only")) };
            if v4.is_unspecified() {
                return Err("the relay is bound to 0.0.0.0: the fast path needs its addresses".into());
            }
            if !local.contains(v4) {
                return Err(format!("no interface has {v4}"));
            }
        }
        // Packets for a relay address may come in on any interface (a second network
        // routed through this host): the program sits on every one that is up.
        let interfaces = interfaces_up();
        let mut bpf = Ebpf::load(object).map_err(|e| format!("cannot load the program: {e}"))?;
        let prog: &mut SchedClassifier = bpf
            .program_mut(PROGRAM)
            .ok_or("the object has no program")?
            .try_into()
            .map_err(|e| format!("not a TC program: {e}"))?;
        prog.load().map_err(|e| {
            // The verifier's log follows the first line; the first line says enough.
            let e = e.to_string();
            format!("the kernel refused the program: {}", e.lines().next().unwrap_or(&e))
        })?;
        for iface in &interfaces {
            // A crashed run's netlink filter (kernels before TCX) forwards on; it goes first.
            let _ = qdisc_detach_program(iface, TcAttachType::Ingress, PROGRAM);
            // clsact is needed for netlink attachment only; already there is fine.
            let _ = qdisc_add_clsact(iface);
            prog.attach(iface, TcAttachType::Ingress).map_err(|e| format!("cannot attach to {iface}: {e}"))?;
        }
        let map = bpf.take_map(MAP).ok_or("the object has no flow map")?;
        let flows = HashMap::try_from(map).map_err(|e| format!("the flow map: {e}"))?;
        Ok(FastPath { flows, local, _bpf: bpf, interfaces })
    }

    /// Whether `ip` is this host's (loopback, or an interface's address at start).
    pub(crate) fn is_local(&self, ip: Ipv4Addr) -> bool {
        ip.is_loopback() || self.local.contains(&ip)
    }

    /// The interface index a flow to `dst` leaves by; 0 for a local `dst` (delivered
    /// here); `None` when no route matches.
    pub(crate) fn egress(&self, dst: Ipv4Addr) -> Option<u32> {
        if self.is_local(dst) {
            return Some(0);
        }
        route(dst)
    }

    pub(crate) fn install(&mut self, key: FlowKey, flow: Flow) -> bool {
        self.flows.insert(key, flow, 0).is_ok()
    }

    pub(crate) fn remove(&mut self, key: &FlowKey) {
        let _ = self.flows.remove(key);
    }

    /// What the program forwarded for a flow so far: packets, bytes (of UDP payload), RTP
    /// packets, and where RTP's sequence and jitter stand.
    pub(crate) fn counters(&self, key: &FlowKey) -> Option<Counted> {
        self.flows.get(key, 0).ok().map(|f| Counted {
            packets: f.packets,
            bytes: f.bytes,
            rtp: f.rtp_packets,
            ext_max: (f.seq_known != 0).then_some(f.ext_max),
            jitter16: f.jitter16,
        })
    }
}

/// A port's flow in the map, and what of its counters was already accounted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Offload {
    pub(crate) key: FlowKey,
    /// The latched source the flow was made for.
    pub(crate) src: SocketAddr,
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
    pub(crate) rtp: u64,
}

/// A worker's offloaded ports (by relay port).
pub(crate) type Offloads = StdHashMap<u16, Offload>;
