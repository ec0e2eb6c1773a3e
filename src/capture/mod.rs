//! Passive capture from a vif: an AF_PACKET socket with a memory-mapped TPACKET_V3 ring.
//!
//! The kernel fills fixed-size blocks with variable-size frames and hands a whole block to
//! user space at once (when full or after `retire_ms`), so one wake-up serves many frames and
//! nothing is copied between the kernel and the engine: frames are read in place and the block
//! is returned. Blocks are 1 MiB by default so a netback/veth GSO super-frame (up to 64 KiB)
//! always fits. Frames in both directions of the vif are seen (`ETH_P_ALL`). An optional fanout
//! group spreads a vif's flows over several sockets (one per worker) by flow hash, so each
//! flow stays on one worker. Ring drops are read from `PACKET_STATISTICS` and reported, never
//! silent. This is the guest's path untouched: zero added latency (verdicts act through kernel
//! rules, issue 5's enforcement).
//!
//! Constants and layouts are the kernel's (`include/uapi/linux/if_packet.h`) as the `libc`
//! crate exposes them.

pub mod inline;
pub mod vnet;

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

/// Errors opening or reading a ring.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("interface {0:?} does not exist in this network namespace")]
    NoInterface(String),
    #[error("{what} on {iface} failed: {source}. Capturing needs CAP_NET_RAW (run as root) and a kernel with TPACKET_V3")]
    Sys {
        what: &'static str,
        iface: String,
        #[source]
        source: io::Error,
    },
}

/// Ring geometry.
#[derive(Clone, Copy, Debug)]
pub struct RingConfig {
    pub block_size: usize,
    pub blocks: usize,
    /// A partly filled block is handed over after this long.
    pub retire_ms: u32,
    /// Fanout group id, to share a vif between workers by flow hash.
    pub fanout: Option<u16>,
}

impl Default for RingConfig {
    fn default() -> RingConfig {
        RingConfig {
            block_size: 1 << 20,
            blocks: 16,
            retire_ms: 10,
            fanout: None,
        }
    }
}

/// One received frame, borrowed from the ring.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    pub data: &'a [u8],
    /// Length on the wire (may exceed `data` if truncated by the ring).
    pub wire_len: u32,
    pub ts_ns: u64,
    /// Sent by this host out of the interface (towards the guest on a vif); otherwise
    /// received on it (from the guest).
    pub outgoing: bool,
}

/// Counters of a ring (`PACKET_STATISTICS` is reset on each read; these accumulate).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RingStats {
    pub packets: u64,
    pub drops: u64,
    pub freezes: u64,
}

/// A TPACKET_V3 receive ring bound to one interface.
pub struct Ring {
    fd: OwnedFd,
    map: *mut u8,
    map_len: usize,
    cfg: RingConfig,
    next: usize,
    iface: String,
    stats: RingStats,
}

// SAFETY: the mapping is owned by this value and only accessed through `&mut self`.
unsafe impl Send for Ring {}

pub(crate) fn sys<'a>(
    what: &'static str,
    iface: &'a str,
) -> impl FnOnce(io::Error) -> CaptureError + 'a {
    move |source| CaptureError::Sys {
        what,
        iface: iface.to_owned(),
        source,
    }
}

pub(crate) fn setsockopt<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    val: &T,
) -> io::Result<()> {
    // SAFETY: `val` points at a live `T` of the size passed; the fd is open.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            val as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A new, unbound AF_PACKET socket for every protocol, and `iface`'s index: the common start
/// of a capture ring and an inline port (both set their options before binding).
pub(crate) fn packet_socket(iface: &str) -> Result<(OwnedFd, u32), CaptureError> {
    let c = CString::new(iface).map_err(|_| CaptureError::NoInterface(iface.into()))?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        return Err(CaptureError::NoInterface(iface.into()));
    }
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL_BE),
        )
    };
    if raw < 0 {
        return Err(sys("socket(AF_PACKET)", iface)(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a freshly created, owned descriptor.
    Ok((unsafe { OwnedFd::from_raw_fd(raw) }, ifindex))
}

/// Binds a packet socket to interface `ifindex` for every protocol.
pub(crate) fn bind_packet(fd: &OwnedFd, iface: &str, ifindex: u32) -> Result<(), CaptureError> {
    // SAFETY: an all-zero sockaddr_ll is valid; the fields needed are set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETH_P_ALL_BE;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(sys("bind", iface)(io::Error::last_os_error()));
    }
    Ok(())
}

/// `ETH_P_ALL` in network byte order.
const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();

impl Ring {
    /// Opens a ring on `iface` (in the caller's network namespace).
    pub fn open(iface: &str, cfg: RingConfig) -> Result<Ring, CaptureError> {
        let (fd, ifindex) = packet_socket(iface)?;
        let version: libc::c_int = libc::tpacket_versions::TPACKET_V3 as libc::c_int;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VERSION, &version)
            .map_err(sys("PACKET_VERSION", iface))?;
        let frame_size = 2048u32;
        let req = libc::tpacket_req3 {
            tp_block_size: cfg.block_size as u32,
            tp_block_nr: cfg.blocks as u32,
            tp_frame_size: frame_size,
            tp_frame_nr: (cfg.block_size as u32 / frame_size) * cfg.blocks as u32,
            tp_retire_blk_tov: cfg.retire_ms,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req)
            .map_err(sys("PACKET_RX_RING", iface))?;
        let map_len = cfg.block_size * cfg.blocks;
        // SAFETY: maps the ring the kernel just allocated for this socket; checked below.
        let map = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(sys("mmap of the ring", iface)(io::Error::last_os_error()));
        }
        let ring = Ring {
            fd,
            map: map as *mut u8,
            map_len,
            cfg,
            next: 0,
            iface: iface.into(),
            stats: RingStats::default(),
        };
        bind_packet(&ring.fd, iface, ifindex)?;
        if let Some(group) = cfg.fanout {
            let arg: libc::c_int =
                group as libc::c_int | ((libc::PACKET_FANOUT_HASH as libc::c_int) << 16);
            setsockopt(&ring.fd, libc::SOL_PACKET, libc::PACKET_FANOUT, &arg)
                .map_err(sys("PACKET_FANOUT", iface))?;
        }
        Ok(ring)
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    fn block(&self, i: usize) -> *mut libc::tpacket_block_desc {
        // SAFETY: `i < blocks`, so the offset stays inside the mapping.
        unsafe { self.map.add(i * self.cfg.block_size) as *mut libc::tpacket_block_desc }
    }

    /// Waits up to `timeout` for a block, then hands every ready frame to `f`. Returns the
    /// number of frames.
    pub fn poll(
        &mut self,
        timeout: Duration,
        f: &mut dyn FnMut(Frame<'_>),
    ) -> Result<usize, CaptureError> {
        let mut n = 0;
        if !self.ready(self.next) {
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN | libc::POLLERR,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    return Ok(0);
                }
                return Err(sys("poll", &self.iface)(e));
            }
        }
        while self.ready(self.next) {
            n += self.walk(self.next, f);
            self.release(self.next);
            self.next = (self.next + 1) % self.cfg.blocks;
        }
        Ok(n)
    }

    fn ready(&self, i: usize) -> bool {
        let b = self.block(i);
        // SAFETY: `b` points at a block descriptor in the mapping; the status word is written
        // by the kernel, so it is read volatile and followed by an acquire fence before the
        // block's frames are read.
        let status = unsafe { ptr::read_volatile(ptr::addr_of!((*b).hdr.bh1.block_status)) };
        fence(Ordering::Acquire);
        status & libc::TP_STATUS_USER != 0
    }

    fn release(&self, i: usize) {
        let b = self.block(i);
        fence(Ordering::Release);
        // SAFETY: as in `ready`; writing TP_STATUS_KERNEL gives the block back.
        unsafe {
            ptr::write_volatile(
                ptr::addr_of_mut!((*b).hdr.bh1.block_status),
                libc::TP_STATUS_KERNEL,
            )
        };
    }

    fn walk(&mut self, i: usize, f: &mut dyn FnMut(Frame<'_>)) -> usize {
        let base = self.block(i) as *const u8;
        let bs = self.cfg.block_size;
        // SAFETY: the block is owned by user space (TP_STATUS_USER) until released; header
        // fields were written by the kernel before it set the status.
        let (num, first) = unsafe {
            let b = self.block(i);
            (
                (*b).hdr.bh1.num_pkts as usize,
                (*b).hdr.bh1.offset_to_first_pkt as usize,
            )
        };
        let mut off = first;
        let hdr_len = std::mem::size_of::<libc::tpacket3_hdr>();
        let mut count = 0;
        for _ in 0..num {
            if off + hdr_len > bs {
                break;
            }
            // SAFETY: `off + hdr_len <= block_size` (checked); the kernel aligns frame
            // headers to TPACKET_ALIGNMENT (16).
            let h = unsafe { &*(base.add(off) as *const libc::tpacket3_hdr) };
            let start = off + h.tp_mac as usize;
            let len = h.tp_snaplen as usize;
            if start + len <= bs {
                // SAFETY: the frame lies inside the block (checked) and stays valid until
                // the block is released, after `f` returns.
                let data = unsafe { std::slice::from_raw_parts(base.add(start), len) };
                // The kernel stores a sockaddr_ll right after the aligned frame header
                // (TPACKET3_HDRLEN); its packet type tells the direction.
                let sll_off = off + ((hdr_len + 15) & !15);
                let outgoing = if sll_off + std::mem::size_of::<libc::sockaddr_ll>() <= bs {
                    // SAFETY: inside the block (checked); sockaddr_ll has no invalid bit
                    // patterns and is read unaligned.
                    let sll = unsafe {
                        ptr::read_unaligned(base.add(sll_off) as *const libc::sockaddr_ll)
                    };
                    sll.sll_pkttype == libc::PACKET_OUTGOING
                } else {
                    false
                };
                f(Frame {
                    data,
                    wire_len: h.tp_len,
                    ts_ns: h.tp_sec as u64 * 1_000_000_000 + h.tp_nsec as u64,
                    outgoing,
                });
                count += 1;
            }
            if h.tp_next_offset == 0 {
                break;
            }
            off += h.tp_next_offset as usize;
        }
        count
    }

    /// Reads the kernel's counters (they reset on read) into the accumulated totals.
    pub fn stats(&mut self) -> RingStats {
        // SAFETY: an all-zero tpacket_stats_v3 is valid; getsockopt fills it.
        let mut st: libc::tpacket_stats_v3 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tpacket_stats_v3>() as libc::socklen_t;
        // SAFETY: `st` and `len` are valid for writes of the advertised size.
        let rc = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                &mut st as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        if rc == 0 {
            self.stats.packets += st.tp_packets as u64;
            self.stats.drops += st.tp_drops as u64;
            self.stats.freezes += st.tp_freeze_q_cnt as u64;
        }
        self.stats
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `open`; no frame borrows outlive
        // `poll`, so nothing refers to it any more.
        unsafe { libc::munmap(self.map as *mut libc::c_void, self.map_len) };
    }
}
