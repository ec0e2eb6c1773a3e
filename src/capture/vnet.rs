//! An AF_PACKET port that carries offloads through: `PACKET_VNET_HDR`.
//!
//! Inline inspection must hand every guest frame on after its verdict. A guest (netfront, or a
//! veth in the lab) sends TCP with partial checksums (`CHECKSUM_PARTIAL`: the checksum field
//! holds only the pseudo-header sum) and as GSO super-frames up to 64 KiB. A plain packet
//! socket receives those as finished-looking frames and re-sends them as plain frames: the
//! receiver drops the bad checksums and TCP never completes (Suricata's copy-mode IPS, see
//! docs/inline.md). With `PACKET_VNET_HDR` the kernel prefixes every received frame with a
//! `virtio_net_hdr` (GSO type and size, checksum start and offset) and accepts the same header
//! on send, rebuilding the offloaded skb: super-frames and partial checksums cross the
//! user-space bridge untouched, so guests keep their offloads and their throughput.
//!
//! A [`VnetPort`] is one such socket bound to one interface. It reads batches with `recvmmsg`
//! (each frame: the 10-byte header first, then the Ethernet frame) with the kernel's receive
//! timestamp (`SO_TIMESTAMPNS`), which tells the inline worker how long a frame has waited:
//! that is its overload signal. It ignores frames sent out of its own interface
//! (`PACKET_IGNORE_OUTGOING`, so what it forwards is not read back) and bypasses the qdisc on
//! send (`PACKET_QDISC_BYPASS`, as netback's own transmit does not queue either).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::{bind_packet, packet_socket, setsockopt, sys, CaptureError};

/// `include/uapi/linux/if_packet.h` values the `libc` crate does not export.
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_QDISC_BYPASS: libc::c_int = 20;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// Size of `struct virtio_net_hdr` (no `num_buffers`): the prefix of every frame.
pub const VNET_HDR_LEN: usize = 10;

/// `virtio_net_hdr.gso_type` of a frame that is not a super-frame.
pub const GSO_NONE: u8 = 0;

/// One frame read from a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    /// Bytes in the buffer: the virtio header and the frame (`buf[..len]`).
    pub len: usize,
    /// The frame was longer than the buffer (only the first part was read).
    pub truncated: bool,
    /// Kernel receive time (CLOCK_REALTIME, ns), 0 if the kernel gave none.
    pub ts_ns: u64,
}

/// The parsed `virtio_net_hdr` in front of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Parses the header at the start of `buf` (host byte order: the socket uses the
    /// little-endian virtio layout on x86 and the native one elsewhere, which the kernel
    /// converts; both are host order for a packet socket).
    pub fn parse(buf: &[u8]) -> Option<VnetHdr> {
        let b = buf.get(..VNET_HDR_LEN)?;
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }
}

/// An AF_PACKET socket with `PACKET_VNET_HDR`, bound to one interface.
pub struct VnetPort {
    fd: OwnedFd,
    iface: String,
    ifindex: u32,
}

impl AsRawFd for VnetPort {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl VnetPort {
    /// Opens a port on `iface` (in the caller's network namespace), in fanout group `fanout`
    /// if given (several workers sharing the interface by symmetric flow hash).
    pub fn open(iface: &str, fanout: Option<u16>) -> Result<VnetPort, CaptureError> {
        let (fd, ifindex) = packet_socket(iface)?;
        setsockopt(&fd, libc::SOL_PACKET, PACKET_VNET_HDR, &1)
            .map_err(sys("PACKET_VNET_HDR", iface))?;
        setsockopt(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &1)
            .map_err(sys("PACKET_IGNORE_OUTGOING (Linux >= 4.20)", iface))?;
        // Best effort: both only change performance.
        let _ = setsockopt(&fd, libc::SOL_PACKET, PACKET_QDISC_BYPASS, &1);
        let _ = setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &(4 << 20));
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, &1)
            .map_err(sys("SO_TIMESTAMPNS", iface))?;
        bind_packet(&fd, iface, ifindex)?;
        if let Some(group) = fanout {
            super::join_symmetric_fanout(&fd, iface, group, true)?;
        }
        Ok(VnetPort {
            fd,
            iface: iface.into(),
            ifindex,
        })
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Frames the kernel dropped since the last call because this socket's receive queue
    /// was full (`SO_RCVBUF`, 4 MiB here): the worker fell that far behind. They never reach
    /// the worker, so only this count tells of them.
    pub fn take_drops(&self) -> u64 {
        super::packet_statistics(self.fd.as_raw_fd()).map_or(0, |st| u64::from(st.tp_drops))
    }

    /// Reads up to `bufs.len()` frames in one system call (`recvmmsg`) without blocking;
    /// `out[i]` describes `bufs[i]`. Returns how many were read (0: none waiting).
    pub fn recv_batch(&self, bufs: &mut [Vec<u8>], out: &mut Vec<Received>) -> io::Result<usize> {
        out.clear();
        let n = bufs.len();
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let mut cbufs = vec![[0u64; 8]; n];
        // SAFETY: all-zero mmsghdrs are valid; every pointer set below outlives the call.
        let mut msgs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = cbufs[i].as_mut_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_controllen = std::mem::size_of::<[u64; 8]>() as _;
        }
        // SAFETY: `msgs` holds `n` headers describing buffers valid for writes.
        let got = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        for m in msgs.iter().take(got as usize) {
            out.push(Received {
                len: m.msg_len as usize,
                truncated: m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
                ts_ns: super::control(&m.msg_hdr).ts_ns,
            });
        }
        Ok(got as usize)
    }

    /// Sends the frames `frames` (each with its virtio header) in one system call
    /// (`sendmmsg`); returns how many the kernel took.
    pub fn send_batch(&self, frames: &[&[u8]]) -> usize {
        if frames.is_empty() {
            return 0;
        }
        let mut iovs: Vec<libc::iovec> = frames
            .iter()
            .map(|f| libc::iovec {
                iov_base: f.as_ptr() as *mut libc::c_void,
                iov_len: f.len(),
            })
            .collect();
        // SAFETY: all-zero mmsghdrs are valid; the iovecs outlive the call.
        let mut msgs: Vec<libc::mmsghdr> = (0..frames.len())
            .map(|_| unsafe { std::mem::zeroed() })
            .collect();
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0;
        while sent < msgs.len() {
            // SAFETY: the headers from `sent` on describe buffers valid for reads.
            let r = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs[sent..].as_mut_ptr(),
                    (msgs.len() - sent) as libc::c_uint,
                    0,
                )
            };
            if r <= 0 {
                break;
            }
            sent += r as usize;
        }
        sent
    }
}

/// Waits up to `timeout_ms` until one of `fds` is readable; returns which are.
pub fn wait_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `p` is a valid array of `p.len()` pollfds.
    let rc = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter().map(|x| x.revents != 0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_tso_header() {
        // NEEDS_CSUM, TCPV4, hdr_len 66, gso_size 1448, csum_start 34, csum_offset 16.
        let mut b = vec![1u8, 1];
        for v in [66u16, 1448, 34, 16] {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        let h = VnetHdr::parse(&b).expect("10 bytes");
        assert_eq!(
            h,
            VnetHdr {
                flags: 1,
                gso_type: 1,
                hdr_len: 66,
                gso_size: 1448,
                csum_start: 34,
                csum_offset: 16
            }
        );
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }
}
