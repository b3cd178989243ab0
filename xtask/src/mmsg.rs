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

/// recvmmsg into fixed buffers.
pub(crate) struct RecvMany {
    bufs: Vec<[u8; 2048]>,
    lens: Vec<usize>,
}

impl RecvMany {
    pub(crate) const SIZE: usize = 64;

    pub(crate) fn new() -> RecvMany {
        RecvMany { bufs: vec![[0; 2048]; Self::SIZE], lens: vec![0; Self::SIZE] }
    }

    /// Reads up to SIZE datagrams without waiting; how many.
    pub(crate) fn recv(&mut self, sock: &UdpSocket) -> usize {
        let mut iov: Vec<libc::iovec> =
            self.bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
        // SAFETY: as in SendMany::send; no names are asked for.
        let mut msgs: Vec<libc::mmsghdr> = (0..iov.len()).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
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
        for (len, m) in self.lens.iter_mut().zip(&msgs).take(n) {
            *len = m.msg_len as usize;
        }
        n
    }

    pub(crate) fn packets(&self, n: usize) -> impl Iterator<Item = &[u8]> {
        self.bufs.iter().zip(&self.lens).take(n).map(|(b, l)| &b[..*l])
    }
}
