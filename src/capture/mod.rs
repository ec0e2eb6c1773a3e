//! Passive capture from a vif: an AF_PACKET socket read either through its receive queue
//! ([`queue::Queue`], the default) or through a memory-mapped TPACKET_V3 ring ([`Ring`]).
//!
//! Both see frames in both directions of the vif (`ETH_P_ALL`), can join a fanout group that
//! spreads a vif's flows over several sockets (one per worker) by a symmetric flow hash, run
//! the capture filter (`bpf`), and report what the kernel dropped for want of room
//! (`PACKET_STATISTICS`), never silently. Neither adds anything the guest waits for: verdicts
//! act through kernel rules (issue 5's enforcement). They differ in who copies the frame:
//!
//! - the **ring**: the kernel copies each frame into fixed-size blocks in the context that
//!   delivers it and hands a whole block to user space at once (when full or after
//!   `retire_ms`), so one wake-up serves many frames and the worker reads them in place.
//!   Cheapest per frame for the worker (0.5 µs a small frame, the queue 2 µs), but the
//!   copy of every GSO super-frame (up to 64 KiB) is paid on the guest's path: netback's
//!   thread on Xen, the sending guest's softirq in the lab.
//! - the **queue**: the kernel queues a reference to the frame (no data copied) and the
//!   worker copies it out with `recvmmsg`, on its own CPU. With the service on a CPU of its
//!   own, inspecting every byte, the guests kept 0.83–1.12× of their throughput, against
//!   0.60–0.87× with the ring (docs/performance.md, "Passive capture: ring or queue").
//!
//! [`Source`] is what a passive worker needs from either. Constants and layouts are the
//! kernel's (`include/uapi/linux/if_packet.h`) as the `libc` crate exposes them.

pub mod bpf;
pub mod inline;
pub mod irq;
pub mod queue;
pub mod tc;
pub mod vnet;

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

/// How a passive worker reads its vif (`[inspect] capture`).
#[derive(Clone, Copy, Debug, serde::Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A packet socket's receive queue, read with `recvmmsg`: no copy on the guest's path.
    Queue,
    /// A TPACKET_V3 ring: the kernel copies each frame on the guest's path; cheapest per
    /// frame for the worker.
    Ring,
}

impl SourceKind {
    /// Its name in the configuration and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Queue => "queue",
            SourceKind::Ring => "ring",
        }
    }

    /// The memory a worker's source of this kind holds by default, MiB.
    pub fn default_mib(self) -> usize {
        match self {
            SourceKind::Queue => DEFAULT_QUEUE_MIB,
            SourceKind::Ring => DEFAULT_RING_MIB,
        }
    }
}

/// A passive ring's size by default, MiB (`[inspect] ring_mib`): pinned kernel memory per
/// worker while its vif is inspected.
pub const DEFAULT_RING_MIB: usize = 16;

/// The most frame memory a passive worker's queue holds by default, MiB (`[inspect]
/// queue_mib`). Nothing is allocated while the worker keeps up; the bound is what the kernel
/// may keep queued while it does not. At 16 MiB (the ring's size) a worker scanning every byte
/// on a CPU of its own lost frames in every round of `benches/dataplane.py --own-cpu` (0.18%):
/// its reads slowed for tens of milliseconds at a time (2,048 frames read in 70 ms against
/// 25 µs a frame otherwise) while the guests kept sending; at 64 MiB 0.04%, none lost in three
/// rounds of five (docs/performance.md, "The queue's bound").
pub const DEFAULT_QUEUE_MIB: usize = 64;

impl std::str::FromStr for SourceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<SourceKind, String> {
        [SourceKind::Queue, SourceKind::Ring]
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown capture {s:?}: expected queue or ring"))
    }
}

/// Block size of a passive ring: a 64 KiB GSO super-frame always fits; the ring's size sets
/// how many blocks (kernel memory pinned per worker).
const PASSIVE_BLOCK: usize = 256 << 10;

/// Opens a passive capture of `kind` on `iface` (in the caller's network namespace): a queue
/// holding up to `mib` MiB whose frames wait at most `delay_ms` while frames come, or a ring
/// of `mib` MiB whose partly filled blocks are handed over after `delay_ms`; in fanout group
/// `fanout` if given.
pub fn open_source(
    kind: SourceKind,
    iface: &str,
    mib: usize,
    delay_ms: u32,
    fanout: Option<u16>,
) -> Result<Box<dyn Source>, CaptureError> {
    Ok(match kind {
        SourceKind::Queue => Box::new(queue::Queue::open(
            iface,
            mib << 20,
            Duration::from_millis(delay_ms.into()),
            fanout,
        )?),
        SourceKind::Ring => Box::new(Ring::open(
            iface,
            RingConfig {
                block_size: PASSIVE_BLOCK,
                blocks: ((mib << 20) / PASSIVE_BLOCK).max(1),
                // Detection (and so quarantine) latency on a quiet vif is bounded by this, not
                // by traffic filling the block; each expiry costs a timer on the guests' CPUs.
                retire_ms: delay_ms,
                fanout,
            },
        )?),
    })
}

/// What a passive worker reads frames from: a [`Ring`] or a [`queue::Queue`].
pub trait Source: AsRawFd {
    /// Waits up to `timeout` for frames, then hands those ready to `f`; returns how many.
    fn poll(
        &mut self,
        timeout: Duration,
        f: &mut dyn FnMut(Frame<'_>),
    ) -> Result<usize, CaptureError>;
    /// The error the kernel last reported on the socket (such as `ENETDOWN`: the interface
    /// went down), once.
    fn take_error(&mut self) -> Option<io::Error>;
    /// The kernel's counters, accumulated.
    fn stats(&mut self) -> RingStats;
    fn ifindex(&self) -> u32;
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

impl RingStats {
    /// Adds packet socket `fd`'s counters since the last read (the kernel resets them on
    /// read) and returns the totals.
    fn accumulate(&mut self, fd: std::os::fd::RawFd) -> RingStats {
        if let Some(st) = packet_statistics(fd) {
            self.packets += u64::from(st.tp_packets);
            self.drops += u64::from(st.tp_drops);
            self.freezes += u64::from(st.tp_freeze_q_cnt);
        }
        *self
    }
}

/// A TPACKET_V3 receive ring bound to one interface.
pub struct Ring {
    fd: OwnedFd,
    map: *mut u8,
    map_len: usize,
    cfg: RingConfig,
    next: usize,
    iface: String,
    ifindex: u32,
    stats: RingStats,
    /// The socket's pending error, read (and so cleared) after `poll` saw `POLLERR`.
    error: Option<io::Error>,
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
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
    let ifindex = nix::net::if_::if_nametoindex(iface)
        .map_err(|_| CaptureError::NoInterface(iface.into()))?;
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

/// Joins `fd` to fanout group `group` of its interface, spreading frames by a flow hash that
/// is the same in both directions (addresses and ports combined by XOR, computed by a classic
/// BPF program the group runs: `PACKET_FANOUT_CBPF`). The kernel's own `PACKET_FANOUT_HASH`
/// uses `skb->hash` when one is set, and on netback the guest sets it: xen-netback takes the
/// hash a frontend passes in a `XEN_NETIF_EXTRA_TYPE_HASH` extra slot (Linux 4.7, "use hash
/// value from the frontend"). A hostile guest could then send one direction of a connection to
/// a worker that never sees the other, which cannot follow the handshake
/// (`flow:established`) and so misses what such rules match. Inline workers join
/// two groups (vif side and switch side) in the same order, so a flow's frames from both sides
/// meet in one worker. Frames that are not IPv4/IPv6 go to the first member.
///
/// `ignore_outgoing` (inline ports): the group skips frames leaving the interface
/// (`PACKET_FANOUT_FLAG_IGNORE_OUTGOING`, Linux 6.2; a member's own `PACKET_IGNORE_OUTGOING`
/// does not apply to a group). Older kernels join without it; there the capture filter drops
/// outgoing frames (`bpf::CaptureFilter::attach_inline`).
pub(crate) fn join_symmetric_fanout(
    fd: &OwnedFd,
    iface: &str,
    group: u16,
    ignore_outgoing: bool,
) -> Result<(), CaptureError> {
    const FLAG_IGNORE_OUTGOING: libc::c_int = 0x4000;
    let arg = |flags: libc::c_int| -> libc::c_int {
        group as libc::c_int | ((libc::PACKET_FANOUT_CBPF as libc::c_int | flags) << 16)
    };
    let joined = ignore_outgoing
        && setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_FANOUT,
            &arg(FLAG_IGNORE_OUTGOING),
        )
        .is_ok();
    if !joined {
        setsockopt(fd, libc::SOL_PACKET, libc::PACKET_FANOUT, &arg(0))
            .map_err(sys("PACKET_FANOUT", iface))?;
    }
    let prog = symmetric_hash_program();
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    setsockopt(fd, libc::SOL_PACKET, libc::PACKET_FANOUT_DATA, &fprog)
        .map_err(sys("PACKET_FANOUT_DATA", iface))
}

/// The classic BPF program of [`join_symmetric_fanout`]: returns `(h * 0x9e3779b1) >> 16`
/// with `h = src ^ dst ^ sport ^ dport` (the kernel takes it modulo the group size); 0 for
/// frames that are not IP. Fanout runs before the packet socket puts the frame back at its
/// Ethernet header: a received frame starts at its IP header there, a sent one at its
/// Ethernet header. So every load is relative to the network header (`SKF_NET_OFF`) and the
/// ether type comes from the kernel (`SKF_AD_PROTOCOL`), the same in both directions.
fn symmetric_hash_program() -> Vec<libc::sock_filter> {
    let op = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jf: u8| libc::sock_filter {
        code: 0x15,
        jt: 0,
        jf,
        k,
    };
    const NET: u32 = (-0x10_0000i32) as u32; // SKF_NET_OFF
    const PROTOCOL: u32 = (-0x1000i32) as u32; // SKF_AD_OFF + SKF_AD_PROTOCOL
    const LDH: u16 = 0x28; // A = u16 at k
    const LDW: u16 = 0x20; // A = u32 at k
    const LDH_X: u16 = 0x48; // A = u16 at X + k
    const LDX_MSH: u16 = 0xb1; // X = 4 * (byte at k & 0xf)
    const ST: u16 = 0x02; // M[k] = A
    const LDX_M: u16 = 0x61; // X = M[k]
    const XOR_X: u16 = 0xac; // A ^= X
    const MUL: u16 = 0x24; // A *= k
    const RSH: u16 = 0x74; // A >>= k
    const JA: u16 = 0x05;
    const RET_A: u16 = 0x16;
    const RET_K: u16 = 0x06;
    let mut v4 = vec![
        op(LDW, NET + 12),
        op(ST, 0),
        op(LDW, NET + 16),
        op(LDX_M, 0),
        op(XOR_X, 0),
        op(ST, 0),
        op(LDX_MSH, NET),
        op(LDH_X, NET),
        op(ST, 1),
        op(LDH_X, NET + 2),
        op(LDX_M, 1),
        op(XOR_X, 0),
        op(LDX_M, 0),
        op(XOR_X, 0),
    ];
    let mut v6 = vec![op(LDW, NET + 8), op(ST, 0)];
    for w in (12..40).step_by(4) {
        v6.extend([op(LDW, NET + w), op(LDX_M, 0), op(XOR_X, 0), op(ST, 0)]);
    }
    v6.extend([
        op(LDH, NET + 40),
        op(ST, 1),
        op(LDH, NET + 42),
        op(LDX_M, 1),
        op(XOR_X, 0),
        op(LDX_M, 0),
        op(XOR_X, 0),
    ]);
    // Multiplicative mixing: ephemeral ports of one client step by 2 (Linux picks even ports
    // for connect), so the low bits of `h` alone would put four parallel connections on two
    // workers; bits 16..31 of `h * golden ratio` depend on all of its low bits.
    let fold = [op(MUL, 0x9e37_79b1), op(RSH, 16), op(RET_A, 0)];
    let mut p = vec![op(LDH, PROTOCOL)];
    // to v6's test when not IPv4: past v4 and its jump to the fold
    p.push(jeq(0x0800, (v4.len() + 1) as u8));
    p.append(&mut v4);
    p.push(op(JA, (1 + v6.len()) as u32));
    // not IPv6 either: past v6 and the fold, to `ret 0`
    p.push(jeq(0x86dd, (v6.len() + fold.len()) as u8));
    p.append(&mut v6);
    p.extend(fold);
    p.push(op(RET_K, 0));
    p
}

/// Waits up to `timeout` until `fd` is readable or has an error; returns `poll`'s events
/// (0: the time ran out, or a signal came).
pub(crate) fn wait(fd: std::os::fd::RawFd, timeout: Duration) -> io::Result<libc::c_short> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLERR,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(e)
        };
    }
    Ok(pfd.revents)
}

/// What a received message's control data says (the options each socket asked for).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Control {
    /// Kernel receive time (`SCM_TIMESTAMPNS`), ns since the epoch; 0 if none.
    pub ts_ns: u64,
    /// The frame's length before the capture filter cut it (`PACKET_AUXDATA`).
    pub orig_len: Option<u32>,
}

/// Reads the control messages of a message `recvmmsg` filled.
pub(crate) fn control(msg: &libc::msghdr) -> Control {
    let mut out = Control::default();
    // SAFETY: CMSG_* walk the control buffer the kernel filled, bounded by msg_controllen;
    // the payloads are read unaligned from inside it, each only when its header says it is
    // that type (whose size the kernel wrote).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS) => {
                    let t = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                    out.ts_ns = t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64;
                }
                (libc::SOL_PACKET, libc::PACKET_AUXDATA) => {
                    let a = std::ptr::read_unaligned(
                        libc::CMSG_DATA(c) as *const libc::tpacket_auxdata
                    );
                    out.orig_len = Some(a.tp_len);
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    out
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

impl Source for Ring {
    fn poll(&mut self, t: Duration, f: &mut dyn FnMut(Frame<'_>)) -> Result<usize, CaptureError> {
        Ring::poll(self, t, f)
    }
    fn take_error(&mut self) -> Option<io::Error> {
        Ring::take_error(self)
    }
    fn stats(&mut self) -> RingStats {
        Ring::stats(self)
    }
    fn ifindex(&self) -> u32 {
        Ring::ifindex(self)
    }
}

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
            ifindex,
            stats: RingStats::default(),
            error: None,
        };
        bind_packet(&ring.fd, iface, ifindex)?;
        if let Some(group) = cfg.fanout {
            join_symmetric_fanout(&ring.fd, iface, group, false)?;
        }
        Ok(ring)
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    pub fn ifindex(&self) -> u32 {
        self.ifindex
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
            let revents = wait(self.fd.as_raw_fd(), timeout).map_err(sys("poll", &self.iface))?;
            if revents & libc::POLLERR != 0 {
                self.read_error();
            }
        }
        while self.ready(self.next) {
            n += self.walk(self.next, f);
            self.release(self.next);
            self.next = (self.next + 1) % self.cfg.blocks;
        }
        Ok(n)
    }

    /// Reads the socket's pending error, which clears it. The kernel sets `ENETDOWN` on a
    /// packet socket when its interface goes down (a vif does when its guest reconnects, or
    /// on its way onto a bridge), and `poll` reports `POLLERR` until the error is read: a
    /// ring reads frames from memory and never calls `recv`, which is what would read it, so
    /// without this every `poll` returned at once and an idle worker spun (70% of a core
    /// per vif, seen in the lab and in dom0 on real Xen). The socket itself keeps working:
    /// the kernel re-attaches it when the interface comes back up.
    fn read_error(&mut self) {
        use nix::sys::socket::{getsockopt, sockopt::SocketError};
        if let Ok(err) = getsockopt(&self.fd, SocketError) {
            if err != 0 {
                self.error = Some(io::Error::from_raw_os_error(err));
            }
        }
    }

    /// The error the kernel last reported on the socket (such as `ENETDOWN`: the interface
    /// went down), once.
    pub fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
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
        self.stats.accumulate(self.fd.as_raw_fd())
    }
}

/// A packet socket's `PACKET_STATISTICS` since the last read (the kernel resets them on
/// read): frames delivered to the socket and frames dropped for want of room (ring full, or
/// the receive queue at `SO_RCVBUF` for a socket without a ring). A socket without a ring
/// reports the first two fields only (`tpacket_stats`); the third stays 0. `None` if the
/// kernel refused (not a packet socket).
pub(crate) fn packet_statistics(fd: std::os::fd::RawFd) -> Option<libc::tpacket_stats_v3> {
    // SAFETY: an all-zero tpacket_stats_v3 is valid; getsockopt fills at most `len` bytes.
    let mut st: libc::tpacket_stats_v3 = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tpacket_stats_v3>() as libc::socklen_t;
    // SAFETY: `st` and `len` are valid for writes of the advertised size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            &mut st as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0).then_some(st)
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `open`; no frame borrows outlive
        // `poll`, so nothing refers to it any more.
        unsafe { libc::munmap(self.map as *mut libc::c_void, self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the classic BPF opcodes the fanout program uses over Ethernet frame `pkt`, with
    /// the kernel's meaning of the negative offsets (network header, ancillary protocol).
    fn run(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
        let (mut a, mut x, mut m, mut pc) = (0u32, 0u32, [0u32; 16], 0usize);
        let ld = |off: usize, n: usize| -> Option<u32> {
            let off = off as u32;
            if off == (-0x1000i32) as u32 {
                return pkt
                    .get(12..14)
                    .map(|b| u32::from(b[0]) << 8 | u32::from(b[1]));
            }
            let off = 14 + off.checked_sub((-0x10_0000i32) as u32)? as usize;
            pkt.get(off..off + n)
                .map(|b| b.iter().fold(0u32, |v, &c| (v << 8) | u32::from(c)))
        };
        loop {
            let i = prog[pc];
            pc += 1;
            let k = i.k as usize;
            match i.code {
                0x28 => {
                    a = match ld(k, 2) {
                        Some(v) => v,
                        None => return 0,
                    }
                }
                0x20 => {
                    a = match ld(k, 4) {
                        Some(v) => v,
                        None => return 0,
                    }
                }
                0x48 => {
                    a = match ld(x as usize + k, 2) {
                        Some(v) => v,
                        None => return 0,
                    }
                }
                0xb1 => {
                    x = match ld(k, 1) {
                        Some(v) => 4 * (v & 0xf),
                        None => return 0,
                    }
                }
                0x02 => m[k] = a,
                0x61 => x = m[k],
                0xac => a ^= x,
                0x24 => a = a.wrapping_mul(i.k),
                0x74 => a >>= i.k,
                0x05 => pc += k,
                0x15 => pc += if a == i.k { i.jt } else { i.jf } as usize,
                0x16 => return a,
                0x06 => return i.k,
                c => panic!("opcode {c:#x} not modelled"),
            }
        }
    }

    fn v4_tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[23] = 6;
        f[26..30].copy_from_slice(&src);
        f[30..34].copy_from_slice(&dst);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f
    }

    #[test]
    fn fanout_hash_is_the_same_both_ways_and_spreads_flows() {
        let p = symmetric_hash_program();
        let there = run(&p, &v4_tcp([10, 0, 0, 1], 40000, [10, 0, 0, 2], 80));
        let back = run(&p, &v4_tcp([10, 0, 0, 2], 80, [10, 0, 0, 1], 40000));
        assert_eq!(there, back);
        assert_ne!(there, 0);
        // One client's connections: ports stepping by 2, as Linux picks them for connect.
        let mut per_worker = [0; 4];
        for i in 0..64 {
            let h = run(
                &p,
                &v4_tcp([10, 0, 0, 1], 40000 + 2 * i, [10, 0, 0, 2], 5201),
            );
            per_worker[(h % 4) as usize] += 1;
        }
        assert!(
            per_worker.iter().all(|&n| n >= 8),
            "64 connections over 4 workers: {per_worker:?}"
        );
        // IPv6: same both ways.
        let mut f = vec![0u8; 14 + 40 + 20];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        f[22..38].copy_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        f[38..54].copy_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        f[54..56].copy_from_slice(&5000u16.to_be_bytes());
        f[56..58].copy_from_slice(&22u16.to_be_bytes());
        let mut g = f.clone();
        g[22..38].copy_from_slice(&f[38..54]);
        g[38..54].copy_from_slice(&f[22..38]);
        g[54..56].copy_from_slice(&f[56..58]);
        g[56..58].copy_from_slice(&f[54..56]);
        assert_eq!(run(&p, &f), run(&p, &g));
        // Not IP (ARP): the first member.
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(run(&p, &arp), 0);
    }
}
