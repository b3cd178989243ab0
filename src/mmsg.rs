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

pub(crate) struct RecvBatch {
    bufs: Vec<u8>,
    iovs: Vec<libc::iovec>,
    addrs: Vec<libc::sockaddr_storage>,
    hdrs: Vec<libc::mmsghdr>,
    count: usize,
}

// The raw pointers inside only ever point into the batch's own buffers.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    pub(crate) fn new(n: usize) -> RecvBatch {
        RecvBatch {
            bufs: vec![0u8; n * MAX_PACKET],
            iovs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; n],
            // SAFETY: sockaddr_storage and mmsghdr are plain C structs; all-zero is valid.
            addrs: vec![unsafe { zeroed() }; n],
            hdrs: vec![unsafe { zeroed() }; n],
            count: 0,
        }
    }

    /// Receives up to the batch size without blocking. `Ok(0)`: nothing pending.
    pub(crate) fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.hdrs.len();
        for i in 0..n {
            self.iovs[i].iov_base = self.bufs[i * MAX_PACKET..].as_mut_ptr().cast();
            self.iovs[i].iov_len = MAX_PACKET;
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
            self.hdrs[i].msg_len = 0;
        }
        // SAFETY: hdrs[..n] are initialised above and point into buffers that outlive the
        // call; the kernel writes at most iov_len bytes and msg_namelen address bytes.
        let r = unsafe {
            libc::recvmmsg(fd, self.hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
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
        let len = (h.msg_len as usize).min(MAX_PACKET);
        let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        (&self.bufs[i * MAX_PACKET..i * MAX_PACKET + len], from_storage(&self.addrs[i]), truncated)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// The receive buffer `i`, for sending it on without a copy.
    fn buf_ptr(&self, i: usize, len: usize) -> libc::iovec {
        libc::iovec { iov_base: self.bufs[i * MAX_PACKET..].as_ptr() as *mut libc::c_void, iov_len: len }
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
        if n == 0 {
            return Ok(0);
        }
        for i in 0..n {
            let h = &mut self.hdrs[i].msg_hdr;
            h.msg_name = (&mut self.dst as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = self.dst_len;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = std::ptr::null_mut();
            h.msg_controllen = 0;
            h.msg_flags = 0;
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: hdrs[sent..n] are initialised above; their iovecs point into `_from`,
            // which the caller keeps borrowed (and unmodified) for the duration of the call.
            let r = unsafe {
                libc::sendmmsg(fd, self.hdrs[sent..].as_mut_ptr(), (n - sent) as libc::c_uint, libc::MSG_DONTWAIT)
            };
            if r <= 0 {
                self.count = 0;
                let e = io::Error::last_os_error();
                return if sent > 0 || e.kind() == io::ErrorKind::WouldBlock { Ok(sent) } else { Err(e) };
            }
            sent += r as usize;
        }
        self.count = 0;
        Ok(sent)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

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
}
