//! Batched UDP I/O: `recvmmsg(2)` and `sendmmsg(2)` over preallocated buffers, so the
//! forwarding path makes one system call per batch and allocates nothing per packet.
//!
//! This is the only unsafe code in pinhole. The invariants: every pointer handed to the
//! kernel points into `Vec`s owned by the batch that are allocated once and never resized,
//! and the headers are rebuilt before every call, so nothing dangles.
#![allow(unsafe_code)]

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Largest datagram the relay forwards; larger ones are truncated by the kernel (and
/// counted as they are, never forwarded partially: see `truncated`).
pub(crate) const MAX_PACKET: usize = 2048;

/// Points one mmsghdr at a name and a single iovec (no control data).
fn fill_hdr(h: &mut libc::mmsghdr, name: *mut libc::sockaddr_storage, namelen: libc::socklen_t, iov: *mut libc::iovec) {
    let m = &mut h.msg_hdr;
    m.msg_name = name.cast();
    m.msg_namelen = namelen;
    m.msg_iov = iov;
    m.msg_iovlen = 1;
    m.msg_control = std::ptr::null_mut();
    m.msg_controllen = 0;
    m.msg_flags = 0;
    h.msg_len = 0;
}

/// sendmmsg until every prepared header went out or the socket would block; returns how
/// many were sent. The caller guarantees `hdrs` point into buffers alive for the call.
fn send_all(fd: RawFd, hdrs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    let n = hdrs.len();
    let mut sent = 0;
    while sent < n {
        // SAFETY: hdrs[sent..] were filled by fill_hdr and point into live buffers.
        let r =
            unsafe { libc::sendmmsg(fd, hdrs[sent..].as_mut_ptr(), (n - sent) as libc::c_uint, libc::MSG_DONTWAIT) };
        if r <= 0 {
            let e = io::Error::last_os_error();
            return if sent > 0 || e.kind() == io::ErrorKind::WouldBlock { Ok(sent) } else { Err(e) };
        }
        sent += r as usize;
    }
    Ok(sent)
}

/// Sends each payload to its destination with as few `sendmmsg` calls as the kernel takes;
/// returns how many went out.
pub(crate) fn send_to_many(fd: RawFd, packets: &[(SocketAddr, &[u8])]) -> io::Result<usize> {
    let n = packets.len();
    // SAFETY: plain C structs; all-zero is valid.
    let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { zeroed() }; n];
    let mut iovs: Vec<libc::iovec> = vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; n];
    let mut hdrs: Vec<libc::mmsghdr> = vec![unsafe { zeroed() }; n];
    for (i, (to, payload)) in packets.iter().enumerate() {
        let len = to_storage(*to, &mut names[i]);
        iovs[i] = libc::iovec { iov_base: payload.as_ptr() as *mut libc::c_void, iov_len: payload.len() };
        fill_hdr(&mut hdrs[i], &mut names[i], len, &mut iovs[i]);
    }
    // The names, iovecs and payloads all outlive the call.
    send_all(fd, &mut hdrs)
}

pub(crate) struct RecvBatch {
    /// Bytes per buffer.
    size: usize,
    bufs: Vec<u8>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    hdrs: Vec<libc::mmsghdr>,
    count: usize,
}

// The raw pointers inside only ever point into the batch's own buffers.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// `n` buffers of [`MAX_PACKET`] bytes (media).
    pub(crate) fn new(n: usize) -> RecvBatch {
        RecvBatch::with_size(n, MAX_PACKET)
    }

    /// `n` buffers of `size` bytes.
    pub(crate) fn with_size(n: usize, size: usize) -> RecvBatch {
        RecvBatch {
            size,
            bufs: vec![0u8; n * size],
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; n],
            // SAFETY: sockaddr_storage and mmsghdr are plain C structs; all-zero is valid.
            addrs: vec![unsafe { zeroed() }; n],
            hdrs: vec![unsafe { zeroed() }; n],
            count: 0,
        }
    }

    /// Receives up to the batch size without blocking. `Ok(0)`: nothing pending.
    pub(crate) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_flags(fd, libc::MSG_DONTWAIT)
    }

    /// Waits for one datagram (on a blocking socket), then takes whatever else is queued
    /// up to the batch size, in one system call.
    pub(crate) fn recv_wait(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_flags(fd, libc::MSG_WAITFORONE)
    }

    fn recv_flags(&mut self, fd: RawFd, flags: libc::c_int) -> io::Result<usize> {
        let n = self.hdrs.len();
        let namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        for i in 0..n {
            self.iovs[i].iov_base = self.bufs[i * self.size..].as_mut_ptr().cast();
            self.iovs[i].iov_len = self.size;
            fill_hdr(&mut self.hdrs[i], &mut self.addrs[i], namelen, &mut self.iovs[i]);
        }
        // SAFETY: hdrs[..n] are initialised above and point into buffers that outlive the
        // call; the kernel writes at most iov_len bytes and msg_namelen address bytes.
        let r = unsafe { libc::recvmmsg(fd, self.hdrs.as_mut_ptr(), n as libc::c_uint, flags, std::ptr::null_mut()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            self.count = 0;
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) };
        }
        self.count = r as usize;
        Ok(self.count)
    }

    /// Packet `i` of the last receive: its bytes, source, and whether it was truncated.
    pub(crate) fn packet(&self, i: usize) -> (&[u8], Option<SocketAddr>, bool) {
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(self.size);
        let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        (&self.bufs[i * self.size..i * self.size + len], from_storage(&self.addrs[i]), truncated)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// The receive buffer `i`, for sending it on without a copy.
    fn buf_ptr(&self, i: usize, len: usize) -> libc::iovec {
        libc::iovec { iov_base: self.bufs[i * self.size..].as_ptr() as *mut libc::c_void, iov_len: len }
    }
}

pub(crate) struct SendBatch {
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    dst: libc::sockaddr_storage,
    dst_len: libc::socklen_t,
    count: usize,
}

// SAFETY: as for RecvBatch; the iovecs point into a RecvBatch borrowed for the send.
unsafe impl Send for SendBatch {}

impl SendBatch {
    pub(crate) fn new(n: usize) -> SendBatch {
        SendBatch {
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; n],
            // SAFETY: plain C structs; all-zero is valid.
            hdrs: vec![unsafe { zeroed() }; n],
            dst: unsafe { zeroed() },
            dst_len: 0,
            count: 0,
        }
    }

    /// Starts a batch of packets from one socket to one destination.
    pub(crate) fn start(&mut self, dst: SocketAddr) {
        self.dst_len = to_storage(dst, &mut self.dst);
        self.count = 0;
    }

    /// Queues packet `i` of `from` (no copy).
    pub(crate) fn push(&mut self, from: &RecvBatch, i: usize, len: usize) {
        if self.count < self.iovs.len() {
            self.iovs[self.count] = from.buf_ptr(i, len);
            self.count += 1;
        }
    }

    /// Sends the queued packets; `from` must be the batch the packets were pushed from.
    pub(crate) fn flush(&mut self, fd: RawFd, _from: &RecvBatch) -> io::Result<usize> {
        let n = self.count;
        for i in 0..n {
            fill_hdr(&mut self.hdrs[i], &mut self.dst, self.dst_len, &mut self.iovs[i]);
        }
        // The iovecs point into `_from`, which the caller keeps borrowed for the call.
        self.count = 0;
        send_all(fd, &mut self.hdrs[..n])
    }
}

fn from_storage(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(s.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn to_storage(addr: SocketAddr, s: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin: &mut libc::sockaddr_in = unsafe { &mut *(s as *mut libc::sockaddr_storage).cast() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from(*a.ip()).to_be() };
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6: &mut libc::sockaddr_in6 = unsafe { &mut *(s as *mut libc::sockaddr_storage).cast() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// One raw IPv4/UDP socket for a whole relay port range: a classic BPF filter passes only
/// UDP datagrams whose destination port is in the range, `recvmmsg` takes many ports'
/// packets in one call, and with IP_HDRINCL `sendmmsg` sends many packets to many
/// destinations, each from the right relay port, in one call.
pub(crate) struct RawSocket {
    fd: std::os::fd::OwnedFd,
}

impl RawSocket {
    /// Opens the socket bound to `ip` for UDP destination ports `lo..=hi`. Needs CAP_NET_RAW.
    pub(crate) fn open(ip: Ipv4Addr, lo: u16, hi: u16) -> io::Result<RawSocket> {
        RawSocket::open_proto(ip, libc::IPPROTO_UDP, lo, hi)
    }

    /// The same for another IP protocol whose header starts with the ports (TCP: the
    /// fake-TCP forwarder and tunnels).
    pub(crate) fn open_proto(ip: Ipv4Addr, proto: libc::c_int, lo: u16, hi: u16) -> io::Result<RawSocket> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the result is checked and owned immediately.
        let fd =
            unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, valid descriptor nobody else owns.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let on: libc::c_int = 1;
        // SAFETY: setsockopt with a pointer to a live c_int of the given size.
        if unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_IP,
                libc::IP_HDRINCL,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        let size: libc::c_int = 8 << 20;
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            // SAFETY: as above. Failure (no CAP_NET_ADMIN) leaves the default size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
        // Classic BPF: accept IPv4 `proto` with lo <= dst port <= hi, not fragments.
        let prog: [libc::sock_filter; 9] = [
            bpf(0x30, 0, 0, 9),                    // ldb [9]          protocol
            bpf(0x15, 0, 6, proto.unsigned_abs()), // jeq #proto, else drop
            bpf(0x28, 0, 0, 6),                    // ldh [6]          flags/fragment offset
            bpf(0x45, 4, 0, 0x1fff),               // jset #0x1fff → drop (fragment)
            bpf(0xb1, 0, 0, 0),                    // ldxb 4*([0]&0xf) header length
            bpf(0x48, 0, 0, 2),                    // ldh [x+2]        destination port
            bpf(0x35, 0, 1, u32::from(lo)),        // jge #lo, else drop
            bpf(0x25, 0, 1, u32::from(hi)),        // jgt #hi → drop, else accept
            bpf(0x06, 0, 0, 0xffff),               // ret #65535 (accept)
        ];
        // The two drop targets above land here.
        let mut full = prog.to_vec();
        full.push(bpf(0x06, 0, 0, 0)); // ret #0 (drop)
                                       // Fix jump offsets: they count from the next instruction to the drop at index 9.
        full[1].jf = 9 - 2; // from 1 to drop
        full[3].jt = 9 - 4;
        full[6].jf = 9 - 7;
        full[7].jt = 9 - 8;
        full[7].jf = 0;
        let fprog = libc::sock_fprog { len: full.len() as u16, filter: full.as_mut_ptr() };
        // SAFETY: fprog points at `full`, alive for the call; the kernel copies the program.
        if unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&fprog as *const libc::sock_fprog).cast(),
                size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        let mut sa: libc::sockaddr_storage = unsafe { zeroed() };
        let len = to_storage(SocketAddr::V4(SocketAddrV4::new(ip, 0)), &mut sa);
        // SAFETY: sa holds a valid sockaddr_in of `len` bytes.
        if unsafe { libc::bind(fd, (&sa as *const libc::sockaddr_storage).cast(), len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // Packets that arrived before the filter was attached are not filtered: drop them.
        let mut junk = [0u8; 64];
        // SAFETY: recv into a live stack buffer of the given length.
        while unsafe { libc::recv(fd, junk.as_mut_ptr().cast(), junk.len(), libc::MSG_DONTWAIT) } >= 0 {}
        Ok(RawSocket { fd: owned })
    }

    pub(crate) fn fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.fd.as_raw_fd()
    }

    /// Waits up to `timeout` (at most a second) for a packet; whether one is waiting.
    pub(crate) fn wait_readable(&self, timeout: std::time::Duration) -> bool {
        let mut p = libc::pollfd { fd: self.fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one live pollfd.
        let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(1000) as libc::c_int) };
        n > 0
    }

    /// One whole IPv4 packet into `buf` (non-blocking: `WouldBlock` when none is waiting).
    pub(crate) fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv into a live buffer of the given length.
        let n = unsafe { libc::recv(self.fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Sends one whole IPv4 packet (its header says where to).
    pub(crate) fn send(&self, packet: &[u8], to: Ipv4Addr) -> io::Result<usize> {
        let mut sa: libc::sockaddr_storage = unsafe { zeroed() };
        let len = to_storage(SocketAddr::V4(SocketAddrV4::new(to, 0)), &mut sa);
        // SAFETY: sendto from a live buffer to a valid sockaddr_in of `len` bytes.
        let n = unsafe {
            libc::sendto(
                self.fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&sa as *const libc::sockaddr_storage).cast(),
                len,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// One IPv4/UDP datagram as received on the raw socket.
pub(crate) struct RawPacket<'a> {
    pub(crate) src: SocketAddrV4,
    pub(crate) dst: SocketAddrV4,
    pub(crate) payload: &'a [u8],
}

/// Parses packet `i` of a batch received on a [`RawSocket`].
pub(crate) fn raw_packet(batch: &RecvBatch, i: usize) -> Option<RawPacket<'_>> {
    let (ip, _, truncated) = batch.packet(i);
    if truncated {
        return None;
    }
    ipv4_udp(ip)
}

/// An IPv4 packet carrying UDP: its addresses and payload. A header shorter than IPv4's
/// 20 bytes (IHL below 5) or past the packet is no packet.
fn ipv4_udp(ip: &[u8]) -> Option<RawPacket<'_>> {
    if ip.len() < 28 || ip[0] >> 4 != 4 || ip[9] != 17 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let udp = ip.get(ihl..total)?;
    if udp.len() < 8 {
        return None;
    }
    let ulen = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    let payload = udp.get(8..ulen.min(udp.len()))?;
    Some(RawPacket {
        src: SocketAddrV4::new(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), u16::from_be_bytes([udp[0], udp[1]])),
        dst: SocketAddrV4::new(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]), u16::from_be_bytes([udp[2], udp[3]])),
        payload,
    })
}

/// Datagrams built with their own IPv4 and UDP headers, each to its own destination.
pub(crate) struct RawSendBatch {
    bufs: Vec<u8>,
    iovs: Vec<libc::iovec>,
    dsts: Vec<libc::sockaddr_storage>,
    hdrs: Vec<libc::mmsghdr>,
    count: usize,
}

// SAFETY: pointers only ever point into the batch's own buffers.
unsafe impl Send for RawSendBatch {}

impl RawSendBatch {
    pub(crate) fn new(n: usize) -> RawSendBatch {
        RawSendBatch {
            bufs: vec![0u8; n * MAX_PACKET],
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; n],
            // SAFETY: plain C structs; all-zero is valid.
            dsts: vec![unsafe { zeroed() }; n],
            hdrs: vec![unsafe { zeroed() }; n],
            count: 0,
        }
    }

    /// Queues `payload` from `src` to `dst`. The kernel fills in the IP checksum, id and
    /// total length; the UDP checksum is left 0 (optional over IPv4, RFC 768).
    pub(crate) fn push(&mut self, src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> bool {
        let len = 28 + payload.len();
        if self.count == self.hdrs.len() || len > MAX_PACKET {
            return false;
        }
        let b = &mut self.bufs[self.count * MAX_PACKET..self.count * MAX_PACKET + len];
        b[0] = 0x45;
        b[1] = 0xb8; // DSCP EF, as voice should be
        b[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        b[4..8].copy_from_slice(&[0, 0, 0x40, 0]); // id 0 (kernel sets), don't fragment
        b[8] = 64;
        b[9] = 17;
        b[10..12].copy_from_slice(&[0, 0]);
        b[12..16].copy_from_slice(&src.ip().octets());
        b[16..20].copy_from_slice(&dst.ip().octets());
        b[20..22].copy_from_slice(&src.port().to_be_bytes());
        b[22..24].copy_from_slice(&dst.port().to_be_bytes());
        b[24..26].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        b[26..28].copy_from_slice(&[0, 0]);
        b[28..].copy_from_slice(payload);
        let i = self.count;
        to_storage(SocketAddr::V4(SocketAddrV4::new(*dst.ip(), 0)), &mut self.dsts[i]);
        self.iovs[i] = libc::iovec { iov_base: self.bufs[i * MAX_PACKET..].as_mut_ptr().cast(), iov_len: len };
        self.count += 1;
        true
    }

    pub(crate) fn flush(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.count;
        let namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        for i in 0..n {
            fill_hdr(&mut self.hdrs[i], &mut self.dsts[i], namelen, &mut self.iovs[i]);
        }
        self.count = 0;
        send_all(fd, &mut self.hdrs[..n])
    }
}

/// Sets the calling thread's nice value (Linux: a thread is its own scheduling entity).
pub(crate) fn set_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid and setpriority take plain integers and touch no memory of ours.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn an_ipv4_header_shorter_than_twenty_bytes_is_no_packet() {
        // 20-byte IPv4 header, UDP 203.0.113.1:5000 -> 203.0.113.2:6000, 4 bytes of payload.
        let mut ip = vec![0x45, 0, 0, 32, 0, 0, 0, 0, 64, 17, 0, 0, 203, 0, 113, 1, 203, 0, 113, 2];
        ip.extend_from_slice(&[0x13, 0x88, 0x17, 0x70, 0, 12, 0, 0, 1, 2, 3, 4]);
        let p = ipv4_udp(&ip).expect("a packet");
        assert_eq!((p.src.port(), p.dst.port(), p.payload), (5000, 6000, &[1u8, 2, 3, 4][..]));
        for ihl in 0..5u8 {
            ip[0] = 0x40 | ihl;
            assert!(ipv4_udp(&ip).is_none(), "IHL {ihl}");
        }
    }

    #[test]
    fn batches_round_trip_over_loopback() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let c = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        for i in 0..5u8 {
            a.send_to(&[i; 100], b.local_addr().expect("addr")).expect("send");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut rb = RecvBatch::new(8);
        assert_eq!(rb.recv(b.as_raw_fd()).expect("recv"), 5);
        let (data, src, trunc) = rb.packet(3);
        assert_eq!(data, &[3u8; 100][..]);
        assert_eq!(src, Some(a.local_addr().expect("addr")));
        assert!(!trunc);
        let mut sb = SendBatch::new(8);
        sb.start(c.local_addr().expect("addr"));
        for i in 0..rb.len() {
            let len = rb.packet(i).0.len();
            sb.push(&rb, i, len);
        }
        assert_eq!(sb.flush(b.as_raw_fd(), &rb).expect("send"), 5);
        let mut buf = [0u8; 200];
        c.set_read_timeout(Some(std::time::Duration::from_secs(1))).expect("timeout");
        let (n, from) = c.recv_from(&mut buf).expect("recv");
        assert_eq!((n, from), (100, b.local_addr().expect("addr")));
        assert_eq!(rb.recv(b.as_raw_fd()).expect("empty"), 0, "nothing pending is Ok(0)");
    }

    /// Needs CAP_NET_RAW (root), as the relay's raw mode does.
    #[test]
    fn raw_socket_sees_only_its_port_range_and_sends_from_any_port() {
        let inside = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let outside = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = inside.local_addr().expect("addr").port();
        let Ok(raw) = RawSocket::open(Ipv4Addr::LOCALHOST, port, port) else {
            panic!("raw sockets need CAP_NET_RAW; the test tiers run as root");
        };
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        peer.send_to(b"outside", outside.local_addr().expect("addr")).expect("send");
        peer.send_to(b"inside", inside.local_addr().expect("addr")).expect("send");
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut rb = RecvBatch::new(8);
        assert_eq!(rb.recv(raw.fd()).expect("recv"), 1, "the filter passes only the range");
        let p = raw_packet(&rb, 0).expect("udp");
        assert_eq!(p.payload, b"inside");
        assert_eq!(SocketAddr::V4(p.src), peer.local_addr().expect("addr"));
        assert_eq!(p.dst.port(), port);
        // Send back from a port of our choosing (the relay's peer port) without its socket.
        let free = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let from_port = free.local_addr().expect("addr").port();
        drop(free);
        let mut sb = RawSendBatch::new(4);
        let SocketAddr::V4(to) = peer.local_addr().expect("addr") else { panic!("v4") };
        assert!(sb.push(SocketAddrV4::new(Ipv4Addr::LOCALHOST, from_port), to, b"reply"));
        assert_eq!(sb.flush(raw.fd()).expect("send"), 1);
        let mut buf = [0u8; 64];
        peer.set_read_timeout(Some(std::time::Duration::from_secs(1))).expect("timeout");
        let (n, from) = peer.recv_from(&mut buf).expect("reply");
        assert_eq!(&buf[..n], b"reply");
        assert_eq!(from.port(), from_port);
    }
}
