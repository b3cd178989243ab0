//! sendmmsg/recvmmsg for the load generators: a time slice's packets in one syscall, so the
//! generator keeps up with the rates it is asked for.
#![allow(unsafe_code)]

use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;

/// The generators' RTP packet size (G.711, 20 ms).
pub(crate) const PACKET: usize = 172;

/// One time slice's packets for one socket, sent with sendmmsg.
#[derive(Default)]
pub(crate) struct SendMany {
    packets: Vec<[u8; PACKET]>,
    to: Vec<libc::sockaddr_in>,
}

impl SendMany {
    pub(crate) fn push(&mut self, pkt: [u8; PACKET], to: SocketAddrV4) {
        self.packets.push(pkt);
        self.to.push(libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: to.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*to.ip()).to_be() },
            sin_zero: [0; 8],
        });
    }

    /// Sends everything pushed (what the kernel refuses is dropped, as a phone's would
    /// be); returns how many were sent.
    pub(crate) fn send(&mut self, sock: &UdpSocket) -> usize {
        let mut iov: Vec<libc::iovec> =
            self.packets.iter_mut().map(|p| libc::iovec { iov_base: p.as_mut_ptr().cast(), iov_len: PACKET }).collect();
        // SAFETY: zeroed mmsghdr is a valid "empty" header; the pointers set below stay
        // alive (iov, self.to) until sendmmsg returns.
        let mut msgs: Vec<libc::mmsghdr> = (0..iov.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
        for ((m, v), to) in msgs.iter_mut().zip(iov.iter_mut()).zip(self.to.iter_mut()) {
            m.msg_hdr.msg_name = (to as *mut libc::sockaddr_in).cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut done = 0;
        while done < msgs.len() {
            let rest = &mut msgs[done..];
            // SAFETY: rest points at initialised headers whose buffers are alive.
            let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), rest.as_mut_ptr(), rest.len() as libc::c_uint, 0) };
            if n <= 0 {
                break;
            }
            done += n as usize;
        }
        self.packets.clear();
        self.to.clear();
        done
    }
}

/// recvmmsg into fixed buffers, with each datagram's kernel arrival time where the socket
/// asked for one (`stamp_arrivals`).
pub(crate) struct RecvMany {
    bufs: Vec<[u8; 2048]>,
    lens: Vec<usize>,
    /// Control buffers for SCM_TIMESTAMPNS, u64s so they are aligned for a cmsghdr.
    controls: Vec<[u64; 8]>,
    arrivals: Vec<Option<u64>>,
}

/// Asks the kernel to stamp each datagram's arrival (SO_TIMESTAMPNS, CLOCK_REALTIME): the
/// time it reached the host's receive path, not the time a reader got round to it.
pub(crate) fn stamp_arrivals(sock: &UdpSocket) {
    let on: libc::c_int = 1;
    // SAFETY: a plain int option on a socket we own.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// CLOCK_REALTIME in nanoseconds, the clock arrival stamps are in.
pub(crate) fn realtime_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl RecvMany {
    pub(crate) const SIZE: usize = 64;

    pub(crate) fn new() -> RecvMany {
        RecvMany {
            bufs: vec![[0; 2048]; Self::SIZE],
            lens: vec![0; Self::SIZE],
            controls: vec![[0; 8]; Self::SIZE],
            arrivals: vec![None; Self::SIZE],
        }
    }

    /// Reads up to SIZE datagrams without waiting; how many.
    pub(crate) fn recv(&mut self, sock: &UdpSocket) -> usize {
        let mut iov: Vec<libc::iovec> =
            self.bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
        // SAFETY: as in SendMany::send; no names are asked for.
        let mut msgs: Vec<libc::mmsghdr> = (0..iov.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
        for ((m, v), c) in msgs.iter_mut().zip(iov.iter_mut()).zip(self.controls.iter_mut()) {
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = c.as_mut_ptr().cast();
            m.msg_hdr.msg_controllen = std::mem::size_of_val(c) as _;
        }
        // SAFETY: msgs and their buffers are alive for the call.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                msgs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        let n = n.max(0) as usize;
        for ((len, arrival), m) in self.lens.iter_mut().zip(self.arrivals.iter_mut()).zip(&msgs).take(n) {
            *len = m.msg_len as usize;
            *arrival = None;
            // SAFETY: the kernel filled msg_control up to msg_controllen; the CMSG macros
            // walk only within it.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                        let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                        *arrival = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
                    }
                    c = libc::CMSG_NXTHDR(&m.msg_hdr, c);
                }
            }
        }
        n
    }

    pub(crate) fn packets(&self, n: usize) -> impl Iterator<Item = &[u8]> {
        self.bufs.iter().zip(&self.lens).take(n).map(|(b, l)| &b[..*l])
    }

    /// The packets with their kernel arrival times (None unless the socket stamps them).
    pub(crate) fn stamped(&self, n: usize) -> impl Iterator<Item = (&[u8], Option<u64>)> {
        self.packets(n).zip(self.arrivals.iter().copied())
    }
}
