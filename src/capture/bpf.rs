//! Trimming and counting capture in the kernel: an eBPF socket filter on every passive ring
//! copies only the headers of frames whose payload the inspector will not read, and does not
//! copy at all (counts) the frames that carry nothing for it.
//!
//! Why: a passive ring costs the guest nothing in user space, but the kernel copies each frame
//! into the ring on the guest's own path (the sender's softirq on a veth or netback vif). With
//! 64 KiB GSO super-frames that copy is most of what passive inspection costs a guest: on the
//! 16-core machine, passive with stream bypass used 21% of a core in user space and still cut
//! guest-to-guest throughput to 0.6× (docs/performance.md). After trimming, what was left was
//! the per-frame cost of the copy itself (ring lock, header copy, the worker reading it): a
//! bulk transfer's ACKs and trimmed segments are as many frames as its data. So:
//!
//! - **guest-to-guest frames at the receiving vif**: a frame leaving the host towards a guest
//!   (`PACKET_OUTGOING`) whose source MAC is another local, inspected guest's was inspected at
//!   the sender's vif (anti-spoofing makes the source MAC proof of the sender): headers only,
//!   so that flow state (`flow:established`) follows both directions.
//! - **handed-over directions**: the workers put TCP directions (interface, addresses, ports)
//!   in a hash map, in one of two modes. *All*: a direction past the stream depth when
//!   `inspect_past_depth = false`, or another local guest's direction at the receiving vif once
//!   its flow is established and busy; none of its frames is copied. *Empty*: the other
//!   direction of those, and both directions of any established flow after
//!   `inspect::HANDOVER_AFTER` packets; its segments without payload (pure ACKs) are not
//!   copied, segments with data are. Frames not copied are counted per interface in a second
//!   map (frames and bytes, from and to the guest): the workers add them to the vif's counters
//!   and the guest's frames to its packet-flood detector. One frame a second per direction
//!   still reaches the worker (headers only), so a long transfer's flow never looks idle.
//!
//! SYN, FIN and RST segments are always copied; a SYN removes its direction from the map in the
//! kernel, so a new connection reusing the 5-tuple is inspected from its first byte (no
//! user-space race), and a FIN or RST makes the worker give both directions back. The worker
//! also removes a direction when its flow leaves the table, when the rules are reloaded and
//! when it stops. Anything else (IPv4 fragments, VLAN tags, IPv6 extension headers, short
//! frames, interfaces no worker counts on) is copied whole: the filter only ever trims or
//! counts what it positively recognises.
//!
//! The program is eBPF assembled here (about a hundred instructions; `bpf_skb_load_bytes`
//! copies the headers to the stack in two calls) rather than compiled C: no clang, libbpf or
//! BTF at build or run time, and the whole filter is readable in one function. Its answers on
//! literal frames are tested through `BPF_PROG_TEST_RUN`. Where the kernel has no eBPF (or the
//! service lacks CAP_BPF/CAP_SYS_ADMIN) capture works as before, untrimmed, and `virtsec
//! status` says so.

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Bytes copied of a trimmed frame: Ethernet + IPv4 with options (60) + TCP with options (60),
/// or IPv6 (40) + TCP (60), with room to spare.
pub const HEADER_SNAP: u32 = 192;
/// Key of the direction map: source address (16 bytes, network order; IPv4 in the first
/// four), destination address (16), source and destination ports (network order), ifindex
/// (host order), family (4 or 6, host order).
const KEY: usize = 44;
/// Value of the direction map: the handover (`MODE_*`, u32), the TCP sequence number of the
/// last sample copied whole, when the next sampled frame is due (u64, `ktime_get_ns`), that
/// sample's acknowledgement number, and whether it is still to be seen by the inline fast
/// path (u32, 1 or 0).
const VALUE: usize = 24;
/// Every frame of the direction is counted rather than copied (SYN, FIN, RST and the
/// once-a-second sample excepted).
const MODE_TRIM: u32 = 1;
/// Segments without payload (pure ACKs) are counted rather than copied.
const MODE_EMPTY: u32 = 2;
/// Value of the counts map (key: ifindex): frames and bytes from the guest, then to it; then
/// (inline ports only) every frame that arrived there, copied or not: per CPU, where the
/// kernel delivered the vif's frames (`CaptureFilter::delivered`).
const COUNTS: usize = 40;

/// Errors loading the filter.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("{what} failed: {source} (trimming needs a kernel with eBPF and CAP_BPF or CAP_SYS_ADMIN; capture continues untrimmed)")]
    Sys {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused the capture filter: {0}")]
    Verifier(String),
}

/// One direction of a TCP connection seen on one interface, as the filter keys it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirKey {
    pub ifindex: u32,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

/// An address as the program copies it from the frame: network order, IPv4 in the first four
/// bytes.
fn addr_bytes(a: IpAddr, out: &mut [u8]) {
    match a {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&v4.octets()),
        IpAddr::V6(v6) => out[..16].copy_from_slice(&v6.octets()),
    }
}

impl DirKey {
    /// The direction `((src, sport), (dst, dport))` of a flow seen on interface `ifindex`.
    pub fn new(ifindex: u32, ((src, sport), (dst, dport)): crate::flow::DirTuple) -> DirKey {
        DirKey {
            ifindex,
            src,
            sport,
            dst,
            dport,
        }
    }

    fn bytes(&self) -> [u8; KEY] {
        let mut k = [0u8; KEY];
        addr_bytes(self.src, &mut k[0..16]);
        addr_bytes(self.dst, &mut k[16..32]);
        k[32..34].copy_from_slice(&self.sport.to_be_bytes());
        k[34..36].copy_from_slice(&self.dport.to_be_bytes());
        k[36..40].copy_from_slice(&self.ifindex.to_ne_bytes());
        let family: u32 = if self.src.is_ipv4() { 4 } else { 6 };
        k[40..44].copy_from_slice(&family.to_ne_bytes());
        k
    }
}

/// A MAC as the program keys it: its six bytes, two zero bytes.
fn mac_key(m: &[u8; 6]) -> [u8; 8] {
    let mut k = [0u8; 8];
    k[..6].copy_from_slice(m);
    k
}

/// Counters of the filter's maps.
#[derive(Debug, Default)]
pub struct FilterStats {
    /// Directions handed to the kernel (counted instead of copied, whole or their segments
    /// without payload).
    pub bypassed: AtomicU64,
    /// Directions given back (flow gone or reused, rules reloaded, worker stopped).
    pub restored: AtomicU64,
    /// Directions the map had no room for (still copied whole: safe, only slower).
    pub map_full: AtomicU64,
}

/// What the kernel counted without copying, on one interface (see [`CaptureFilter::counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelCounts {
    pub from_guest_frames: u64,
    pub from_guest_bytes: u64,
    pub to_guest_frames: u64,
    pub to_guest_bytes: u64,
}

/// The loaded program and its three maps, shared by every passive worker of the service.
pub struct CaptureFilter {
    prog: OwnedFd,
    /// The same program for inline workers' sockets, which also leaves every outgoing frame
    /// uncopied (see [`CaptureFilter::attach_inline`]).
    inline_prog: OwnedFd,
    flows: OwnedFd,
    macs: OwnedFd,
    counts: OwnedFd,
    /// Possible CPUs: a per-CPU map's value, from user space, is one value per CPU.
    cpus: usize,
    mac_set: Mutex<HashSet<[u8; 6]>>,
    pub stats: FilterStats,
}

// bpf(2) commands and constants (include/uapi/linux/bpf.h).
const MAP_CREATE: libc::c_long = 0;
const MAP_LOOKUP_ELEM: libc::c_long = 1;
const MAP_UPDATE_ELEM: libc::c_long = 2;
const MAP_DELETE_ELEM: libc::c_long = 3;
const PROG_LOAD: libc::c_long = 5;
const LINK_CREATE: libc::c_long = 28;
/// `enum bpf_attach_type`: tcx ingress (Linux 6.6).
const ATTACH_TCX_INGRESS: u32 = 46;
const MAP_TYPE_HASH: u32 = 1;
const MAP_TYPE_ARRAY: u32 = 2;
/// One value per CPU: the counters are added to without atomics or cache-line traffic
/// between the CPUs of a guest's two directions.
const MAP_TYPE_PERCPU_HASH: u32 = 5;
const BPF_F_NO_PREALLOC: u32 = 1;
const PROG_TYPE_SOCKET_FILTER: u32 = 1;
const PROG_TYPE_SCHED_CLS: u32 = 3;
// Helper functions (enum bpf_func_id).
const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_MAP_DELETE: i32 = 3;
const HELPER_KTIME_NS: i32 = 5;
const HELPER_REDIRECT: i32 = 23;
const HELPER_SKB_LOAD_BYTES: i32 = 26;
const SO_ATTACH_BPF: libc::c_int = 50;

/// `union bpf_attr`, as bytes: every command's fields are at fixed offsets and the rest must
/// be zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Attr {
        Attr([0; 128])
    }
    fn u32(mut self, off: usize, v: u32) -> Attr {
        self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64(mut self, off: usize, v: u64) -> Attr {
        self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, fully initialised bpf_attr of the size passed; pointers
    // inside it were set by the callers to buffers that outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr as *mut libc::c_void,
            std::mem::size_of::<Attr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) -> Result<OwnedFd, BpfError> {
    // Hash entries are allocated as directions are bypassed, not all up front (a preallocated
    // 65,536-entry map would pin ~6 MiB of kernel memory for a mostly empty table); an array
    // is always preallocated.
    let flags = if map_type == MAP_TYPE_ARRAY {
        0
    } else {
        BPF_F_NO_PREALLOC
    };
    let mut a = Attr::new()
        .u32(0, map_type)
        .u32(4, key_size)
        .u32(8, value_size)
        .u32(12, max_entries)
        .u32(16, flags);
    let fd = bpf(MAP_CREATE, &mut a).map_err(|source| BpfError::Sys {
        what: "creating an eBPF map",
        source,
    })?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn map_elem(
    cmd: libc::c_long,
    map: &OwnedFd,
    key: &[u8],
    value: Option<&mut [u8]>,
) -> io::Result<()> {
    let vp = value.map_or(0, |v| v.as_mut_ptr() as u64);
    let mut a = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, vp);
    bpf(cmd, &mut a).map(|_| ())
}

/// Puts `value` under `key`; true when the key is new (false: it replaced a value).
fn map_put(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    const NOEXIST: u64 = 1;
    let mut a = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, value.as_mut_ptr() as u64)
        .u64(24, NOEXIST);
    match bpf(MAP_UPDATE_ELEM, &mut a) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            map_elem(MAP_UPDATE_ELEM, map, key, Some(value)).map(|_| false)
        }
        Err(e) => Err(e),
    }
}

/// The number of possible CPUs (`/sys/devices/system/cpu/possible`, e.g. "0-3" or "0,2-5":
/// the highest listed, plus one), as per-CPU maps size their values; the configured CPUs if
/// that file cannot be read.
fn possible_cpus() -> usize {
    let parsed = std::fs::read_to_string("/sys/devices/system/cpu/possible")
        .ok()
        .and_then(|s| {
            s.trim()
                .split(',')
                .filter_map(|r| r.rsplit('-').next()?.trim().parse::<usize>().ok())
                .max()
        });
    match parsed {
        Some(n) => n + 1,
        // SAFETY: sysconf has no preconditions.
        None => (unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }).max(1) as usize,
    }
}

/// A tiny eBPF assembler: instructions with symbolic jump targets.
mod asm {
    #[repr(C)]
    #[derive(Clone, Copy, Debug)]
    pub struct Insn {
        code: u8,
        regs: u8,
        off: i16,
        imm: i32,
    }

    pub const R0: u8 = 0;
    pub const R1: u8 = 1;
    pub const R2: u8 = 2;
    pub const R3: u8 = 3;
    pub const R4: u8 = 4;
    pub const R6: u8 = 6;
    pub const R7: u8 = 7;
    pub const R8: u8 = 8;
    pub const R9: u8 = 9;
    pub const R10: u8 = 10;

    pub struct Prog {
        pub insns: Vec<Insn>,
        fixups: Vec<(usize, &'static str)>,
        labels: Vec<(&'static str, usize)>,
    }

    impl Prog {
        pub fn new() -> Prog {
            Prog {
                insns: Vec::new(),
                fixups: Vec::new(),
                labels: Vec::new(),
            }
        }
        fn raw(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) -> &mut Prog {
            self.insns.push(Insn {
                code,
                regs: (src << 4) | dst,
                off,
                imm,
            });
            self
        }
        pub fn label(&mut self, l: &'static str) -> &mut Prog {
            self.labels.push((l, self.insns.len()));
            self
        }
        fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: &'static str) -> &mut Prog {
            self.fixups.push((self.insns.len(), to));
            self.raw(code, dst, src, 0, imm)
        }
        pub fn mov(&mut self, dst: u8, src: u8) -> &mut Prog {
            self.raw(0xbf, dst, src, 0, 0)
        }
        pub fn movi(&mut self, dst: u8, imm: i32) -> &mut Prog {
            self.raw(0xb7, dst, 0, 0, imm)
        }
        pub fn addi(&mut self, dst: u8, imm: i32) -> &mut Prog {
            self.raw(0x07, dst, 0, 0, imm)
        }
        pub fn andi(&mut self, dst: u8, imm: i32) -> &mut Prog {
            self.raw(0x57, dst, 0, 0, imm)
        }
        pub fn lshi(&mut self, dst: u8, imm: i32) -> &mut Prog {
            self.raw(0x67, dst, 0, 0, imm)
        }
        pub fn rshi(&mut self, dst: u8, imm: i32) -> &mut Prog {
            self.raw(0x77, dst, 0, 0, imm)
        }
        pub fn ori(&mut self, dst: u8, imm: i32) -> &mut Prog {
            self.raw(0x47, dst, 0, 0, imm)
        }
        pub fn or(&mut self, dst: u8, src: u8) -> &mut Prog {
            self.raw(0x4f, dst, src, 0, 0)
        }
        pub fn sub(&mut self, dst: u8, src: u8) -> &mut Prog {
            self.raw(0x1f, dst, src, 0, 0)
        }
        /// dst = the low 16 bits of dst in network order, as a number (host order).
        pub fn be16(&mut self, dst: u8) -> &mut Prog {
            self.raw(0xdc, dst, 0, 0, 16)
        }
        /// dst = *(u8 *)(src + off)
        pub fn ldxb(&mut self, dst: u8, src: u8, off: i16) -> &mut Prog {
            self.raw(0x71, dst, src, off, 0)
        }
        /// dst = *(u16 *)(src + off)
        pub fn ldxh(&mut self, dst: u8, src: u8, off: i16) -> &mut Prog {
            self.raw(0x69, dst, src, off, 0)
        }
        /// dst = *(u64 *)(src + off)
        pub fn ldxdw(&mut self, dst: u8, src: u8, off: i16) -> &mut Prog {
            self.raw(0x79, dst, src, off, 0)
        }
        /// *(u16 *)(dst + off) = src
        pub fn stxh(&mut self, dst: u8, off: i16, src: u8) -> &mut Prog {
            self.raw(0x6b, dst, src, off, 0)
        }
        /// Atomically *(u64 *)(dst + off) += src.
        pub fn xadd(&mut self, dst: u8, off: i16, src: u8) -> &mut Prog {
            self.raw(0xdb, dst, src, off, 0)
        }
        /// dst = *(u32 *)(src + off)
        pub fn ldxw(&mut self, dst: u8, src: u8, off: i16) -> &mut Prog {
            self.raw(0x61, dst, src, off, 0)
        }
        /// *(u32 *)(dst + off) = src
        pub fn stxw(&mut self, dst: u8, off: i16, src: u8) -> &mut Prog {
            self.raw(0x63, dst, src, off, 0)
        }
        /// *(u64 *)(dst + off) = src
        pub fn stxdw(&mut self, dst: u8, off: i16, src: u8) -> &mut Prog {
            self.raw(0x7b, dst, src, off, 0)
        }
        /// *(u32 *)(dst + off) = imm
        pub fn stw(&mut self, dst: u8, off: i16, imm: i32) -> &mut Prog {
            self.raw(0x62, dst, 0, off, imm)
        }
        /// *(u64 *)(dst + off) = imm
        pub fn stdw(&mut self, dst: u8, off: i16, imm: i32) -> &mut Prog {
            self.raw(0x7a, dst, 0, off, imm)
        }
        /// dst = the map with this file descriptor (a two-slot instruction).
        pub fn ldmap(&mut self, dst: u8, fd: i32) -> &mut Prog {
            self.raw(0x18, dst, 1, 0, fd).raw(0, 0, 0, 0, 0)
        }
        pub fn call(&mut self, helper: i32) -> &mut Prog {
            self.raw(0x85, 0, 0, 0, helper)
        }
        pub fn exit(&mut self) -> &mut Prog {
            self.raw(0x95, 0, 0, 0, 0)
        }
        pub fn ja(&mut self, to: &'static str) -> &mut Prog {
            self.jump(0x05, 0, 0, 0, to)
        }
        pub fn jeqi(&mut self, dst: u8, imm: i32, to: &'static str) -> &mut Prog {
            self.jump(0x15, dst, 0, imm, to)
        }
        pub fn jnei(&mut self, dst: u8, imm: i32, to: &'static str) -> &mut Prog {
            self.jump(0x55, dst, 0, imm, to)
        }
        pub fn jlti(&mut self, dst: u8, imm: i32, to: &'static str) -> &mut Prog {
            self.jump(0xa5, dst, 0, imm, to)
        }
        pub fn jne(&mut self, dst: u8, src: u8, to: &'static str) -> &mut Prog {
            self.jump(0x5d, dst, src, 0, to)
        }
        /// Unsigned dst >= src.
        pub fn jge(&mut self, dst: u8, src: u8, to: &'static str) -> &mut Prog {
            self.jump(0x3d, dst, src, 0, to)
        }
        pub fn jseti(&mut self, dst: u8, imm: i32, to: &'static str) -> &mut Prog {
            self.jump(0x45, dst, 0, imm, to)
        }
        /// Resolves the jumps; a missing label is a bug in the program text.
        pub fn finish(mut self) -> Result<Vec<Insn>, String> {
            for (at, to) in std::mem::take(&mut self.fixups) {
                let target = self
                    .labels
                    .iter()
                    .find(|(l, _)| *l == to)
                    .map(|(_, i)| *i)
                    .ok_or_else(|| format!("no label {to}"))?;
                let off = target as isize - at as isize - 1;
                self.insns[at].off = i16::try_from(off).map_err(|_| "jump too far".to_string())?;
            }
            Ok(self.insns)
        }
    }
}

// Stack layout of the program (offsets from r10, the frame pointer). The packet copy starts
// 2 bytes off a 4-byte boundary, so that every IP field after the 14-byte Ethernet header is
// naturally aligned (the verifier requires aligned stack loads).
const PKT: i16 = -126; // 54 bytes: Ethernet + IPv4 + TCP (no options), or Ethernet + IPv6
const MACK: i16 = -72; // 8 bytes: a MAC key
const TCPB: i16 = -64; // 16 bytes: the TCP header's first 16 bytes
const KEYO: i16 = -48; // 44 bytes: the direction key
const IPPL: i16 = -4; // 4 bytes: IP payload length (TCP header + data)
/// A bit of r8 besides the TCP flags: the segment carries no payload.
const EMPTY: i32 = 0x200;
/// A counted frame's sample interval: a handed-over direction still reaches the worker
/// (headers only) once a second, so its flow stays fresh in the table.
const SAMPLE_NS: i32 = 1_000_000_000;

/// Parses the frame in `ctx` (r1) as both programs need it: r6 = the `__sk_buff`, r9 = its
/// length, the direction key at `KEYO` (addresses, ports, ifindex, family), the IP payload
/// length at `IPPL`, the TCP header's first 16 bytes at `TCPB` (ports, sequence and
/// acknowledgement numbers, offset, flags, window), the TCP flags in r8 plus `EMPTY` when the
/// segment carries no payload.
/// Jumps to `full` (too short, unreadable) or `other` (not TCP over IPv4/IPv6 without
/// fragments or extension headers) otherwise; falls through with a TCP segment.
fn parse_tcp(p: &mut asm::Prog) {
    use asm::*;
    // struct __sk_buff: len at 0, pkt_type at 4, ifindex at 40 (the same offsets for a
    // socket filter and a tc program).
    p.mov(R6, R1).ldxw(R9, R6, 0).movi(R8, 0);
    // Every frame this filter acts on is at least Ethernet + IPv4 + TCP.
    p.jlti(R9, 54, "full");
    p.mov(R1, R6)
        .movi(R2, 0)
        .mov(R3, R10)
        .addi(R3, PKT.into())
        .movi(R4, 54)
        .call(HELPER_SKB_LOAD_BYTES)
        .jnei(R0, 0, "full");
    // The direction key (zeroed first): addresses, ports, ifindex, family.
    for off in [-48, -40, -32, -24, -16, -8] {
        p.stdw(R10, off, 0);
    }
    p.ldxw(R0, R6, 40).stxw(R10, KEYO + 36, R0);
    // Ether types as little-endian loads of network-order bytes.
    p.ldxh(R0, R10, PKT + 12);
    p.jeqi(R0, 0x0008, "v4").jeqi(R0, 0xdd86, "v6").ja("other");
    // IPv4, TCP, not a fragment; r7 = header length.
    p.label("v4");
    p.ldxb(R0, R10, PKT + 23).jnei(R0, 6, "other");
    p.ldxh(R0, R10, PKT + 20)
        .andi(R0, 0xff3f)
        .jnei(R0, 0, "other");
    p.ldxb(R7, R10, PKT + 14).andi(R7, 0xf).lshi(R7, 2);
    p.jlti(R7, 20, "other");
    p.ldxh(R0, R10, PKT + 16)
        .be16(R0)
        .sub(R0, R7)
        .stxw(R10, IPPL, R0);
    p.ldxw(R0, R10, PKT + 26).stxw(R10, KEYO, R0);
    p.ldxw(R0, R10, PKT + 30).stxw(R10, KEYO + 16, R0);
    p.stw(R10, KEYO + 40, 4).jnei(R7, 20, "l4");
    // Without IP options the first load holds the TCP fields already: no second copy.
    p.ldxw(R0, R10, PKT + 34).stxw(R10, TCPB, R0);
    p.ldxw(R0, R10, PKT + 38).stxw(R10, TCPB + 4, R0);
    p.ldxw(R0, R10, PKT + 42).stxw(R10, TCPB + 8, R0);
    p.ldxh(R0, R10, PKT + 46).stxh(R10, TCPB + 12, R0).ja("tcp");
    // IPv6 with TCP as the next header (extension headers: not acted on).
    p.label("v6");
    p.jlti(R9, 14 + 40 + 20, "other");
    p.ldxb(R0, R10, PKT + 20).jnei(R0, 6, "other");
    p.ldxh(R0, R10, PKT + 18).be16(R0).stxw(R10, IPPL, R0);
    for i in 0..8i16 {
        p.ldxw(R0, R10, PKT + 22 + 4 * i)
            .stxw(R10, KEYO + 4 * i, R0);
    }
    p.stw(R10, KEYO + 40, 6).movi(R7, 40);
    // TCP: ports into the key; r8 gets the flags and EMPTY when the segment has no payload.
    p.label("l4");
    p.mov(R1, R6)
        .mov(R2, R7)
        .addi(R2, 14)
        .mov(R3, R10)
        .addi(R3, TCPB.into())
        .movi(R4, 16)
        .call(HELPER_SKB_LOAD_BYTES)
        .jnei(R0, 0, "other");
    p.label("tcp");
    p.ldxw(R0, R10, TCPB).stxw(R10, KEYO + 32, R0);
    p.ldxb(R0, R10, TCPB + 12).rshi(R0, 4).lshi(R0, 2);
    p.ldxw(R1, R10, IPPL).jne(R1, R0, "flags").ori(R8, EMPTY);
    p.label("flags");
    p.ldxb(R0, R10, TCPB + 13).or(R8, R0);
}

/// The filter program (see the module documentation). Returns the snap length: whole, headers
/// only, or 0 (not copied; counted in the `counts` map).
fn program(flows: i32, macs: i32, counts: i32, inline: bool) -> Result<Vec<asm::Insn>, String> {
    use asm::*;
    const FULL: i32 = 0x7fff_ffff;
    const OUTGOING: i32 = libc::PACKET_OUTGOING as i32;
    let mut p = Prog::new();
    if inline {
        // An inline port reads what arrives on it, never what leaves it (`pkt_type`, offset
        // 4 of `__sk_buff`): not copied, not counted.
        p.ldxw(R0, R1, 4)
            .jnei(R0, OUTGOING, "incoming")
            .movi(R0, 0)
            .exit();
        // Counted on the CPU it arrived on, before anything else (ICMP too): an idle inline
        // worker is placed there (`dataplane::placement`).
        p.label("incoming")
            .mov(R6, R1)
            .ldxw(R0, R6, 40)
            .stxw(R10, KEYO + 36, R0)
            .ldmap(R1, counts)
            .mov(R2, R10)
            .addi(R2, (KEYO + 36).into())
            .call(HELPER_MAP_LOOKUP)
            .jeqi(R0, 0, "parse")
            .movi(R1, 1)
            .xadd(R0, 32, R1);
        p.label("parse").mov(R1, R6);
    }
    parse_tcp(&mut p);
    p.ldmap(R1, flows).mov(R2, R10).addi(R2, KEYO.into());
    // A SYN starts a connection: never counted, and the tuple's handover is forgotten.
    p.jseti(R8, 0x02, "del");
    // FIN and RST end one: always copied.
    p.jseti(R8, 0x05, "other");
    p.call(HELPER_MAP_LOOKUP).jeqi(R0, 0, "other").mov(R7, R0);
    p.ldxw(R0, R7, 0).jeqi(R0, MODE_TRIM as i32, "count");
    p.jseti(R8, EMPTY, "count").ja("other");
    // Handed over: sampled once a second (headers only), else counted and not copied.
    p.label("count");
    p.call(HELPER_KTIME_NS)
        .ldxdw(R1, R7, 8)
        .jge(R0, R1, "sample");
    p.ldmap(R1, counts)
        .mov(R2, R10)
        .addi(R2, (KEYO + 36).into())
        .call(HELPER_MAP_LOOKUP)
        .jeqi(R0, 0, "snap");
    p.movi(R1, 1).ldxw(R2, R6, 4).jeqi(R2, OUTGOING, "to_guest");
    p.xadd(R0, 0, R1).xadd(R0, 8, R9).ja("drop");
    p.label("to_guest").xadd(R0, 16, R1).xadd(R0, 24, R9);
    p.label("drop").movi(R0, 0).exit();
    p.label("sample").addi(R0, SAMPLE_NS).stxdw(R7, 8, R0);
    // A sample no longer than the header snap is copied whole, so an inline worker forwards
    // it: its sequence and acknowledgement numbers are noted for the fast path's tc program,
    // which then leaves that one frame to the worker instead of forwarding it too.
    p.jlti(R9, HEADER_SNAP as i32 + 1, "mark").ja("snap");
    p.label("mark")
        .ldxw(R0, R10, TCPB + 4)
        .stxw(R7, 4, R0)
        .ldxw(R0, R10, TCPB + 8)
        .stxw(R7, 16, R0)
        .stw(R7, 20, 1)
        .ja("snap");
    p.label("del").call(HELPER_MAP_DELETE);
    // Not counted. Guest-to-guest at the receiver (outgoing, from a local inspected guest's
    // MAC): headers only; anything else whole. (Looked up only here: most frames of a busy
    // connection never get this far.)
    p.label("other").ldxw(R0, R6, 4).jnei(R0, OUTGOING, "full");
    p.stdw(R10, MACK, 0)
        .ldxw(R0, R10, PKT + 6)
        .stxw(R10, MACK, R0)
        .ldxh(R0, R10, PKT + 10)
        .stxh(R10, MACK + 4, R0);
    p.ldmap(R1, macs)
        .mov(R2, R10)
        .addi(R2, MACK.into())
        .call(HELPER_MAP_LOOKUP)
        .jnei(R0, 0, "snap");
    p.label("full").movi(R0, FULL).exit();
    p.label("snap").movi(R0, HEADER_SNAP as i32).exit();
    p.finish()
}

/// The inline fast path's tc program on one side of an inline splice (see [`FastPath`]):
/// a frame of a direction handed over whole, or a segment without payload of a direction
/// handed over `Empty`, is redirected out of interface `to` (the other side); anything else,
/// SYN, FIN and RST included, continues to the worker. These are exactly the frames the
/// capture filter on the worker's socket does not copy (or copies as a header-only sample,
/// which the worker inspects and does not forward).
fn fast_path_program(flows: i32, lease: i32, to: u32) -> Result<Vec<asm::Insn>, String> {
    use asm::*;
    const TC_PASS: i32 = 0;
    let mut p = Prog::new();
    parse_tcp(&mut p);
    p.jseti(R8, 0x07, "pass");
    p.ldmap(R1, flows)
        .mov(R2, R10)
        .addi(R2, KEYO.into())
        .call(HELPER_MAP_LOOKUP)
        .jeqi(R0, 0, "pass");
    // The sample the capture filter just copied whole (see `program`): the worker forwards
    // it, so it is not redirected (once: the mark is cleared).
    p.mov(R7, R0).ldxw(R1, R7, 20).jeqi(R1, 0, "mode");
    p.jlti(R9, HEADER_SNAP as i32 + 1, "marked").ja("mode");
    p.label("marked")
        .ldxw(R1, R7, 4)
        .ldxw(R2, R10, TCPB + 4)
        .jne(R1, R2, "mode")
        .ldxw(R1, R7, 16)
        .ldxw(R2, R10, TCPB + 8)
        .jne(R1, R2, "mode")
        .stw(R7, 20, 0)
        .ja("pass");
    p.label("mode");
    p.ldxw(R1, R7, 0).jeqi(R1, MODE_TRIM as i32, "redirect");
    p.jseti(R8, EMPTY, "redirect").ja("pass");
    // Only while the workers renew the lease (entry 0 of `lease`: until when, ktime ns): a
    // filter that outlived its service forwards nothing.
    p.label("redirect")
        .stw(R10, MACK, 0)
        .ldmap(R1, lease)
        .mov(R2, R10)
        .addi(R2, MACK.into())
        .call(HELPER_MAP_LOOKUP)
        .jeqi(R0, 0, "pass")
        .ldxdw(R7, R0, 0)
        .call(HELPER_KTIME_NS)
        .jge(R0, R7, "pass");
    // bpf_redirect(to, 0): out of `to` (egress); returns TC_ACT_REDIRECT.
    p.movi(R1, to as i32)
        .movi(R2, 0)
        .call(HELPER_REDIRECT)
        .exit();
    p.label("full").label("other").label("pass");
    p.movi(R0, TC_PASS).exit();
    p.finish()
}

/// Loads a program of `prog_type`; a refusal carries the verifier's last words.
fn load_program(
    prog_type: u32,
    insns: &[asm::Insn],
    what: &'static str,
) -> Result<OwnedFd, BpfError> {
    let license = c"GPL";
    let mut log = vec![0u8; 64 * 1024];
    let attr = |level: u32, log: &mut Vec<u8>| {
        Attr::new()
            .u32(0, prog_type)
            .u32(4, insns.len() as u32)
            .u64(8, insns.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(24, level)
            .u32(28, if level > 0 { log.len() as u32 } else { 0 })
            .u64(
                32,
                if level > 0 {
                    log.as_mut_ptr() as u64
                } else {
                    0
                },
            )
    };
    match bpf(PROG_LOAD, &mut attr(0, &mut log)) {
        // SAFETY: a new file descriptor from the kernel, owned by nothing else.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
        Err(e)
            if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EACCES) =>
        {
            // Load again with the verifier's log, to say why.
            let _ = bpf(PROG_LOAD, &mut attr(1, &mut log));
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            Err(BpfError::Verifier(format!("{e}: {}", tail.join(" / "))))
        }
        Err(source) => Err(BpfError::Sys { what, source }),
    }
}

/// Attaches socket filter `prog` to packet socket `sock`.
fn attach_prog(prog: &OwnedFd, sock: &impl AsRawFd) -> io::Result<()> {
    let fd: libc::c_int = prog.as_raw_fd();
    // SAFETY: passes a pointer to an int of the advertised size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_BPF,
            &fd as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The inline fast path of one spliced vif: two tc programs, one on the vif's ingress and one
/// on its inline port's, forward the frames of handed-over directions straight to the other
/// side, so a connection past the stream depth (`inspect_past_depth = false`) no longer
/// crosses user space. They are attached as tcx links (Linux 6.6), owned by this value, or
/// else as `cls_bpf` filters (`capture::tc`), removed when this is dropped. Either way they
/// redirect only under a lease the workers renew ([`FastPath::renew`]): a service that is
/// SIGKILLed or stuck leaves no forwarding behind, even where a filter outlives it. Without
/// the fast path every frame reaches the worker again, or with no worker, the splice's drop
/// rule (fail closed).
pub struct FastPath {
    _progs: [OwnedFd; 2],
    attached: Attachment,
    lease: OwnedFd,
    lease_ns: u64,
    /// When the lease was last renewed (CLOCK_MONOTONIC ns).
    renewed: AtomicU64,
}

enum Attachment {
    Tcx {
        _links: [OwnedFd; 2],
    },
    Tc {
        _filters: [super::tc::IngressFilter; 2],
    },
}

/// How often the workers renew the fast path's lease.
const RENEW_NS: u64 = 100_000_000;

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes into the timespec passed.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl FastPath {
    /// Keeps the kernel forwarding for another lease; cheap when called often (one map
    /// write per `RENEW_NS`, whichever worker comes first). The lease must outlast the
    /// longest pause of a live worker between two calls: a handed-over direction's frames
    /// that the kernel neither forwards (lease over) nor copies (the capture filter) are lost.
    pub fn renew(&self) {
        let now = monotonic_ns();
        let last = self.renewed.load(Ordering::Relaxed);
        if now.saturating_sub(last) < RENEW_NS
            || self
                .renewed
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        set_lease(&self.lease, now + self.lease_ns);
    }

    /// How the programs are attached, as the log says it: `"tcx"` or `"tc cls_bpf"`.
    pub fn via(&self) -> &'static str {
        match self.attached {
            Attachment::Tcx { .. } => "tcx",
            Attachment::Tc { .. } => "tc cls_bpf",
        }
    }
}

fn set_lease(lease: &OwnedFd, until_ns: u64) {
    let mut v = until_ns.to_ne_bytes();
    if let Err(e) = map_elem(MAP_UPDATE_ELEM, lease, &0u32.to_ne_bytes(), Some(&mut v)) {
        log::warn!("inline fast path: cannot renew its lease: {e}");
    }
}

impl CaptureFilter {
    /// Creates the maps (`max_bypassed` directions) and loads the program.
    pub fn load(max_bypassed: u32) -> Result<CaptureFilter, BpfError> {
        let flows = map_create(MAP_TYPE_HASH, KEY as u32, VALUE as u32, max_bypassed.max(1))?;
        let macs = map_create(MAP_TYPE_HASH, 8, 1, 4096)?;
        let counts = map_create(MAP_TYPE_PERCPU_HASH, 4, COUNTS as u32, 4096)?;
        let load = |inline: bool| {
            let insns = program(
                flows.as_raw_fd(),
                macs.as_raw_fd(),
                counts.as_raw_fd(),
                inline,
            )
            .map_err(BpfError::Verifier)?;
            load_program(
                PROG_TYPE_SOCKET_FILTER,
                &insns,
                "loading the eBPF capture filter",
            )
        };
        let (prog, inline_prog) = (load(false)?, load(true)?);
        Ok(CaptureFilter {
            prog,
            inline_prog,
            flows,
            macs,
            counts,
            cpus: possible_cpus(),
            mac_set: Mutex::new(HashSet::new()),
            stats: FilterStats::default(),
        })
    }

    /// Attaches the filter to a packet socket (each worker's ring).
    pub fn attach(&self, sock: &impl AsRawFd) -> io::Result<()> {
        attach_prog(&self.prog, sock)
    }

    /// Attaches the filter to an inline worker's port, where it also drops every outgoing
    /// frame. A port's own `PACKET_IGNORE_OUTGOING` does not apply once it is in a fanout
    /// group (several workers): the group then read the frames the fast path sends out of
    /// the vif, and a sample copied whole (a pure ACK towards the guest) went back to the
    /// bridge as if the guest had sent it, which learnt the peer's MAC on the inline port.
    pub fn attach_inline(&self, sock: &impl AsRawFd) -> io::Result<()> {
        attach_prog(&self.inline_prog, sock)
    }

    /// Starts the inline fast path between interfaces `a` (the vif) and `b` (its inline port):
    /// handed-over frames arriving on either leave by the other while the lease (`lease_ns`,
    /// renewed by [`FastPath::renew`]) runs. Attached with tcx where the kernel has it (6.6),
    /// else as `cls_bpf` filters, unless `tc_only`; if both fail the worker forwards
    /// everything itself, as without it.
    pub fn fast_path(
        &self,
        a: u32,
        b: u32,
        tc_only: bool,
        lease_ns: u64,
    ) -> Result<FastPath, BpfError> {
        let lease = map_create(MAP_TYPE_ARRAY, 4, 8, 1)?;
        let now = monotonic_ns();
        set_lease(&lease, now + lease_ns);
        let load = |to: u32| -> Result<OwnedFd, BpfError> {
            let insns = fast_path_program(self.flows.as_raw_fd(), lease.as_raw_fd(), to)
                .map_err(BpfError::Verifier)?;
            load_program(PROG_TYPE_SCHED_CLS, &insns, "loading the inline fast path")
        };
        let (pa, pb) = (load(b)?, load(a)?);
        let tcx = |prog: &OwnedFd, on: u32| -> io::Result<OwnedFd> {
            let mut attr = Attr::new()
                .u32(0, prog.as_raw_fd() as u32)
                .u32(4, on)
                .u32(8, ATTACH_TCX_INGRESS);
            let link = bpf(LINK_CREATE, &mut attr)?;
            // SAFETY: a new file descriptor from the kernel, owned by nothing else.
            Ok(unsafe { OwnedFd::from_raw_fd(link as RawFd) })
        };
        let tcx_links = if tc_only {
            Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
        } else {
            tcx(&pa, a).and_then(|la| Ok([la, tcx(&pb, b)?]))
        };
        let attached = match tcx_links {
            Ok(links) => Attachment::Tcx { _links: links },
            Err(tcx_err) => {
                let tc = |prog: &OwnedFd, on: u32| {
                    super::tc::IngressFilter::attach(on, prog, "virtsec_fast_path")
                };
                let filters = tc(&pa, a)
                    .and_then(|fa| Ok([fa, tc(&pb, b)?]))
                    .map_err(|source| BpfError::Sys {
                        what: if tc_only {
                            "attaching the inline fast path (tc cls_bpf)"
                        } else {
                            "attaching the inline fast path (neither tcx, Linux 6.6, nor tc cls_bpf)"
                        },
                        source: if tc_only {
                            source
                        } else {
                            io::Error::new(source.kind(), format!("{source}; tcx: {tcx_err}"))
                        },
                    })?;
                Attachment::Tc { _filters: filters }
            }
        };
        Ok(FastPath {
            _progs: [pa, pb],
            attached,
            lease,
            lease_ns,
            renewed: AtomicU64::new(now),
        })
    }

    /// Sets the MACs of the local guests whose vifs are inspected (their frames are trimmed
    /// where they arrive at another local guest's vif).
    pub fn set_local_macs(&self, want: &HashSet<[u8; 6]>) {
        let Ok(mut cur) = self.mac_set.lock() else {
            return;
        };
        for m in cur.difference(want) {
            let _ = map_elem(MAP_DELETE_ELEM, &self.macs, &mac_key(m), None);
        }
        for m in want.difference(&cur) {
            let mut one = [1u8];
            if let Err(e) = map_elem(MAP_UPDATE_ELEM, &self.macs, &mac_key(m), Some(&mut one)) {
                log::warn!("capture filter: cannot add a local MAC: {e}");
            }
        }
        *cur = want.clone();
    }

    /// Hands a direction to the kernel: from now on its frames (`all`), or its segments
    /// without payload (not `all`), are counted instead of copied. False when the map is full
    /// (the direction stays copied: safe, only slower).
    pub fn bypass(&self, k: &DirKey, all: bool) -> bool {
        // A mode change keeps the entry (and its count of directions handed over).
        let mut v = [0u8; VALUE];
        let mode = if all { MODE_TRIM } else { MODE_EMPTY };
        v[..4].copy_from_slice(&mode.to_ne_bytes());
        match map_put(&self.flows, &k.bytes(), &mut v) {
            Ok(new) => {
                if new {
                    self.stats.bypassed.fetch_add(1, Ordering::Relaxed);
                }
                true
            }
            Err(_) => {
                self.stats.map_full.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Copies this direction again (if the kernel did not already forget it on a SYN).
    pub fn restore(&self, k: &DirKey) {
        let _ = map_elem(MAP_DELETE_ELEM, &self.flows, &k.bytes(), None);
        self.stats.restored.fetch_add(1, Ordering::Relaxed);
    }

    /// How the kernel handles this direction: `Some(true)` every frame counted, `Some(false)`
    /// its segments without payload, `None` copied.
    pub fn bypassed(&self, k: &DirKey) -> Option<bool> {
        let mut v = [0u8; VALUE];
        map_elem(MAP_LOOKUP_ELEM, &self.flows, &k.bytes(), Some(&mut v)).ok()?;
        Some(u32::from_ne_bytes([v[0], v[1], v[2], v[3]]) == MODE_TRIM)
    }

    /// Starts counting on an interface: until this, nothing there is left uncopied.
    pub fn watch(&self, ifindex: u32) -> io::Result<()> {
        let mut v = vec![0u8; COUNTS * self.cpus];
        map_elem(
            MAP_UPDATE_ELEM,
            &self.counts,
            &ifindex.to_ne_bytes(),
            Some(&mut v),
        )
    }

    /// Frames that arrived on an inline port (`ifindex`, watched) per CPU, since `watch`: the
    /// CPUs the kernel delivered them on, indexed by CPU number. `None` when not watched.
    pub fn delivered(&self, ifindex: u32) -> Option<Vec<u64>> {
        let mut v = vec![0u8; COUNTS * self.cpus];
        map_elem(
            MAP_LOOKUP_ELEM,
            &self.counts,
            &ifindex.to_ne_bytes(),
            Some(&mut v),
        )
        .ok()?;
        Some(
            v.chunks_exact(COUNTS)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&c[32..40]);
                    u64::from_ne_bytes(b)
                })
                .collect(),
        )
    }

    /// Stops counting on an interface (its frames are copied again).
    pub fn unwatch(&self, ifindex: u32) {
        let _ = map_elem(MAP_DELETE_ELEM, &self.counts, &ifindex.to_ne_bytes(), None);
    }

    /// What the kernel counted without copying on this interface since `watch`.
    pub fn counts(&self, ifindex: u32) -> Option<KernelCounts> {
        let mut v = vec![0u8; COUNTS * self.cpus];
        map_elem(
            MAP_LOOKUP_ELEM,
            &self.counts,
            &ifindex.to_ne_bytes(),
            Some(&mut v),
        )
        .ok()?;
        // The sum over the CPUs' values.
        let w = |i: usize| {
            v.chunks_exact(COUNTS)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&c[i * 8..i * 8 + 8]);
                    u64::from_ne_bytes(b)
                })
                .fold(0u64, u64::wrapping_add)
        };
        Some(KernelCounts {
            from_guest_frames: w(0),
            from_guest_bytes: w(1),
            to_guest_frames: w(2),
            to_guest_bytes: w(3),
        })
    }
}

#[cfg(test)]
impl CaptureFilter {
    /// Runs the program once on `frame` (BPF_PROG_TEST_RUN, as a frame received on `lo`);
    /// returns its snap length.
    fn test_run(&self, frame: &[u8]) -> io::Result<u32> {
        socket_test_run(&self.prog, frame)
    }

    /// As [`CaptureFilter::test_run`], with the inline ports' program.
    fn test_run_inline(&self, frame: &[u8]) -> io::Result<u32> {
        socket_test_run(&self.inline_prog, frame)
    }
}

/// A socket filter's test run on `frame`: the kernel consumes a first Ethernet header for
/// it, and the program must see the whole frame, so it goes behind a throwaway one.
#[cfg(test)]
fn socket_test_run(prog: &OwnedFd, frame: &[u8]) -> io::Result<u32> {
    let mut data = vec![0u8; 12];
    data.extend_from_slice(&[0x08, 0x00]);
    data.extend_from_slice(frame);
    test_run(prog, &data)
}

/// `BPF_PROG_TEST_RUN` of `prog` on `data` (arriving on `lo`): the program's return value.
#[cfg(test)]
fn test_run(prog: &OwnedFd, data: &[u8]) -> io::Result<u32> {
    let mut a = Attr::new()
        .u32(0, prog.as_raw_fd() as u32)
        .u32(8, data.len() as u32)
        .u64(16, data.as_ptr() as u64)
        .u32(32, 1);
    bpf(10, &mut a)?;
    Ok(u32::from_ne_bytes([a.0[4], a.0[5], a.0[6], a.0[7]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: u32 = 0x7fff_ffff;
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const FIN: u8 = 0x01;
    const RST: u8 = 0x04;

    /// An Ethernet frame with an IPv4 header (`ihl` words, `frag` = flags and offset) and a
    /// TCP header (5 words), field by field: 10.0.0.1:40000 to 10.0.0.2:80 (`up`) or back.
    fn v4(proto: u8, ihl: u8, frag: u16, up: bool, flags: u8, payload: &[u8]) -> Vec<u8> {
        let (a, b) = if up { (1, 2) } else { (2, 1) };
        let (sport, dport) = if up { (40000, 80) } else { (80, 40000) };
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
        let ip_len = usize::from(ihl) * 4;
        let total = (ip_len + 20 + payload.len()) as u16;
        f.extend_from_slice(&[0x40 | ihl, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 1]);
        f.extend_from_slice(&frag.to_be_bytes());
        f.extend_from_slice(&[64, proto, 0, 0, 10, 0, 0, a, 10, 0, 0, b]);
        f.resize(14 + ip_len, 1); // options, if any
        tcp(&mut f, sport, dport, flags, payload);
        f
    }

    fn v6(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd];
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[6, 64]);
        let (a, b): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
            ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        f.extend_from_slice(&a.octets());
        f.extend_from_slice(&b.octets());
        tcp(&mut f, sport, dport, flags, payload);
        f
    }

    fn tcp(f: &mut Vec<u8>, sport: u16, dport: u16, flags: u8, payload: &[u8]) {
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend_from_slice(payload);
    }

    fn key(src: &str, sport: u16, dst: &str, dport: u16) -> DirKey {
        DirKey {
            ifindex: 1, // the test run's frames arrive on `lo`
            src: src.parse().unwrap(),
            sport,
            dst: dst.parse().unwrap(),
            dport,
        }
    }

    #[test]
    fn keys_are_laid_out_as_the_program_loads_them() {
        let k = DirKey {
            ifindex: 7,
            src: "10.0.0.1".parse().unwrap(),
            sport: 0x1234,
            dst: "10.0.0.2".parse().unwrap(),
            dport: 80,
        }
        .bytes();
        assert_eq!(&k[0..4], &[10, 0, 0, 1]);
        assert!(k[4..16].iter().all(|&b| b == 0));
        assert_eq!(&k[16..20], &[10, 0, 0, 2]);
        assert_eq!(&k[32..36], &[0x12, 0x34, 0, 80]);
        assert_eq!(&k[36..40], &7u32.to_ne_bytes());
        assert_eq!(&k[40..44], &4u32.to_ne_bytes());
        assert_eq!(
            mac_key(&[0x02, 0, 0, 0, 0x77, 0x01]),
            [0x02, 0, 0, 0, 0x77, 0x01, 0, 0]
        );
    }

    #[test]
    fn the_program_assembles() {
        let p = program(3, 4, 5, false).unwrap();
        assert!(p.len() > 40 && p.len() < 200);
        // The inline variant: four more instructions in front (outgoing frames: 0), and
        // twelve counting each frame on its CPU (a map load is two).
        assert_eq!(program(3, 4, 5, true).unwrap().len(), p.len() + 4 + 12);
    }

    /// What the program answers for literal frames (needs root, as CI): copied whole,
    /// headers only, or counted and not copied.
    #[test]
    fn frames_are_copied_trimmed_or_counted_as_handed_over() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let f = CaptureFilter::load(16).unwrap();
        let data = v4(6, 5, 0, true, ACK, b"GET / HTTP/1.1\r\n");
        let ack = v4(6, 5, 0, false, ACK, b"");
        let fwd = key("10.0.0.1", 40000, "10.0.0.2", 80);
        let rev = key("10.0.0.2", 80, "10.0.0.1", 40000);
        // Nothing handed over: every frame whole.
        assert_eq!(f.test_run(&data).unwrap(), FULL);
        assert_eq!(f.test_run(&ack).unwrap(), FULL);

        assert!(f.bypass(&fwd, true) && f.bypass(&rev, false));
        assert_eq!(f.bypassed(&fwd), Some(true));
        assert_eq!(f.bypassed(&rev), Some(false));
        // The first frame of a handed-over direction is the second's sample (headers only);
        // without counting on the interface nothing is left uncopied.
        assert_eq!(f.test_run(&data).unwrap(), HEADER_SNAP);
        assert_eq!(f.test_run(&data).unwrap(), HEADER_SNAP);
        f.watch(1).unwrap();
        assert_eq!(f.test_run(&data).unwrap(), 0);
        assert_eq!(f.test_run(&data).unwrap(), 0);
        // The reverse direction: its pure ACKs are counted, a segment with data is copied.
        assert_eq!(f.test_run(&ack).unwrap(), HEADER_SNAP); // its sample
        assert_eq!(f.test_run(&ack).unwrap(), 0);
        let reply = v4(6, 5, 0, false, ACK, b"HTTP/1.1 200 OK\r\n");
        assert_eq!(f.test_run(&reply).unwrap(), FULL);
        let c = f.counts(1).unwrap();
        assert_eq!(c.from_guest_frames, 3);
        assert_eq!(c.from_guest_bytes, 2 * data.len() as u64 + ack.len() as u64);
        assert_eq!(c.to_guest_frames, 0);
        // FIN and RST are always copied, and whole.
        assert_eq!(
            f.test_run(&v4(6, 5, 0, true, ACK | FIN, b"")).unwrap(),
            FULL
        );
        assert_eq!(f.test_run(&v4(6, 5, 0, true, RST, b"")).unwrap(), FULL);
        // Not TCP, a fragment, a frame too short: whole, and nothing counted.
        assert_eq!(f.test_run(&v4(17, 5, 0, true, ACK, b"x")).unwrap(), FULL);
        assert_eq!(
            f.test_run(&v4(6, 5, 0x2000, true, ACK, b"x")).unwrap(),
            FULL
        );
        assert_eq!(f.test_run(&data[..50]).unwrap(), FULL);
        assert_eq!(f.counts(1).unwrap(), c);
        // IPv4 options move the TCP header: still the same direction.
        assert_eq!(f.test_run(&v4(6, 6, 0, true, ACK, b"x")).unwrap(), 0);
        // A SYN on the tuple (a new connection) is copied and forgets the handover.
        assert_eq!(f.test_run(&v4(6, 5, 0, true, SYN, b"")).unwrap(), FULL);
        assert_eq!(f.bypassed(&fwd), None);
        assert_eq!(f.test_run(&data).unwrap(), FULL);
        // IPv6.
        let k6 = key("fd00::1", 5000, "fd00::2", 22);
        assert!(f.bypass(&k6, true));
        let d6 = v6(5000, 22, ACK, b"ssh data");
        assert_eq!(f.test_run(&d6).unwrap(), HEADER_SNAP);
        assert_eq!(f.test_run(&d6).unwrap(), 0);
        assert_eq!(f.test_run(&v6(5000, 23, ACK, b"x")).unwrap(), FULL);
        // Given back: copied again; not counted any more once unwatched.
        f.restore(&rev);
        assert_eq!(f.test_run(&ack).unwrap(), FULL);
        f.unwatch(1);
        assert!(f.counts(1).is_none());
        assert_eq!(f.test_run(&d6).unwrap(), HEADER_SNAP);
    }

    /// The inline ports' program counts every frame arriving on a watched interface on the
    /// CPU that ran it, copied or not, and nothing elsewhere (needs root, as CI).
    #[test]
    fn inline_ports_count_frames_on_the_cpu_they_arrive_on() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let f = CaptureFilter::load(16).unwrap();
        let data = v4(6, 5, 0, true, ACK, b"GET / HTTP/1.1\r\n");
        let udp = v4(17, 5, 0, true, ACK, b"x");
        // Not watched: nothing to count in.
        assert_eq!(f.test_run_inline(&data).unwrap(), FULL);
        assert!(f.delivered(1).is_none());
        // The test runs on this thread's CPU: pin it there so that all runs count in one slot.
        let cpu = nix::sched::sched_getcpu().unwrap();
        let mut one = nix::sched::CpuSet::new();
        one.set(cpu).unwrap();
        let before = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).unwrap();
        f.watch(1).unwrap();
        assert_eq!(f.test_run_inline(&data).unwrap(), FULL);
        assert_eq!(f.test_run_inline(&udp).unwrap(), FULL);
        // A frame the kernel counts instead of copying (handed over) arrived there too.
        assert!(f.bypass(&key("10.0.0.1", 40000, "10.0.0.2", 80), true));
        assert_eq!(f.test_run_inline(&data).unwrap(), HEADER_SNAP);
        assert_eq!(f.test_run_inline(&data).unwrap(), 0);
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &before).unwrap();
        let d = f.delivered(1).unwrap();
        assert_eq!(d.len(), f.cpus);
        assert_eq!(d[cpu], 4, "{d:?}");
        assert_eq!(d.iter().sum::<u64>(), 4, "{d:?}");
        // The passive program does not count arrivals.
        assert_eq!(f.test_run(&udp).unwrap(), FULL);
        assert_eq!(f.delivered(1).unwrap().iter().sum::<u64>(), 4);
    }

    /// The fast path's tc program over `f`'s direction map, redirecting to ifindex 7, with
    /// a lease running for a minute.
    fn test_fast_path(f: &CaptureFilter) -> (OwnedFd, OwnedFd) {
        let lease = map_create(MAP_TYPE_ARRAY, 4, 8, 1).unwrap();
        set_lease(&lease, monotonic_ns() + 60_000_000_000);
        let insns = fast_path_program(f.flows.as_raw_fd(), lease.as_raw_fd(), 7).unwrap();
        let prog = load_program(PROG_TYPE_SCHED_CLS, &insns, "test").unwrap();
        (lease, prog)
    }

    /// The inline fast path's tc program on literal frames (needs root, as CI): it redirects
    /// exactly what the filter leaves uncopied for a handed-over direction, and lets
    /// everything else continue to the worker.
    #[test]
    fn the_fast_path_forwards_what_the_filter_leaves_uncopied() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        const PASS: u32 = 0;
        const REDIRECT: u32 = 7; // TC_ACT_REDIRECT, from bpf_redirect
        let f = CaptureFilter::load(16).unwrap();
        let (lease, prog) = test_fast_path(&f);
        // A tc program's test run sees the frame from its Ethernet header.
        let run = |frame: &[u8]| test_run(&prog, frame).unwrap();
        let data = v4(6, 5, 0, true, ACK, b"GET / HTTP/1.1\r\n");
        let ack = v4(6, 5, 0, false, ACK, b"");
        let reply = v4(6, 5, 0, false, ACK, b"HTTP/1.1 200 OK\r\n");
        let fwd = key("10.0.0.1", 40000, "10.0.0.2", 80);
        let rev = key("10.0.0.2", 80, "10.0.0.1", 40000);
        for fr in [&data, &ack, &reply] {
            assert_eq!(run(fr), PASS);
        }
        assert!(f.bypass(&fwd, true) && f.bypass(&rev, false));
        // Handed over whole: every segment; `Empty`: its pure ACKs only.
        assert_eq!(run(&data), REDIRECT);
        assert_eq!(run(&v4(6, 6, 0, true, ACK, b"x")), REDIRECT);
        assert_eq!(run(&ack), REDIRECT);
        assert_eq!(run(&reply), PASS);
        // SYN, FIN and RST always reach the worker, as do other protocols, fragments and
        // short frames.
        for flags in [SYN, ACK | FIN, RST] {
            assert_eq!(run(&v4(6, 5, 0, true, flags, b"")), PASS);
        }
        assert_eq!(run(&v4(17, 5, 0, true, ACK, b"x")), PASS);
        assert_eq!(run(&v4(6, 5, 0x2000, true, ACK, b"x")), PASS);
        assert_eq!(run(&data[..50]), PASS);
        let k6 = key("fd00::1", 5000, "fd00::2", 22);
        assert!(f.bypass(&k6, true));
        assert_eq!(run(&v6(5000, 22, ACK, b"ssh data")), REDIRECT);
        assert_eq!(run(&v6(5000, 23, ACK, b"x")), PASS);
        // The lease over (the service died or stopped renewing it): nothing is redirected.
        set_lease(&lease, monotonic_ns().saturating_sub(1));
        assert_eq!(run(&data), PASS);
        assert_eq!(run(&v6(5000, 22, ACK, b"ssh data")), PASS);
        set_lease(&lease, monotonic_ns() + 60_000_000_000);
        assert_eq!(run(&data), REDIRECT);
        // Given back: to the worker again.
        f.restore(&fwd);
        assert_eq!(run(&data), PASS);
    }

    /// A handed-over direction's once-a-second sample reaches the worker whole when it is no
    /// longer than the header snap (a pure ACK): the worker forwards it, so the tc program
    /// must not forward it too (the duplicate segment of earlier versions). A longer sample is
    /// copied headers-only and forwarded by the kernel.
    #[test]
    fn a_sample_copied_whole_is_forwarded_once() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        const PASS: u32 = 0;
        const REDIRECT: u32 = 7;
        let f = CaptureFilter::load(16).unwrap();
        let (_lease, prog) = test_fast_path(&f);
        let tc = |frame: &[u8]| test_run(&prog, frame).unwrap();
        // Pure ACKs with their acknowledgement numbers (byte 8 of the TCP header).
        let ack = |n: u8| {
            let mut a = v4(6, 5, 0, true, ACK, b"");
            a[14 + 20 + 11] = n;
            a
        };
        let fwd = key("10.0.0.1", 40000, "10.0.0.2", 80);
        f.watch(1).unwrap();
        assert!(f.bypass(&fwd, true));
        // The sample (copied whole: 54 bytes), then a different ACK before the tc program sees
        // the sample: only the sample itself is left to the worker, and only once.
        assert_eq!(f.test_run(&ack(7)).unwrap(), HEADER_SNAP);
        assert_eq!(tc(&ack(8)), REDIRECT);
        assert_eq!(tc(&ack(7)), PASS);
        assert_eq!(tc(&ack(7)), REDIRECT);
        assert_eq!(f.test_run(&ack(9)).unwrap(), 0); // not a sample: counted, not copied
        assert_eq!(tc(&ack(9)), REDIRECT);
        // A sample longer than the snap is cut (the worker does not forward it): redirected.
        assert!(f.bypass(&fwd, true)); // a fresh entry: the next frame is a sample
        let big = v4(6, 5, 0, true, ACK, &[b'x'; 300]);
        assert_eq!(f.test_run(&big).unwrap(), HEADER_SNAP);
        assert_eq!(tc(&big), REDIRECT);
    }

    /// The maps behave as the data plane relies on (needs root, as CI).
    #[test]
    fn loads_and_keeps_directions() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let f = CaptureFilter::load(4).unwrap();
        let k = |sport| DirKey {
            ifindex: 3,
            src: "fe80::1".parse().unwrap(),
            sport,
            dst: "fe80::2".parse().unwrap(),
            dport: 22,
        };
        assert!(f.bypass(&k(1), true));
        assert!(f.bypassed(&k(1)).is_some() && f.bypassed(&k(2)).is_none());
        f.restore(&k(1));
        assert!(f.bypassed(&k(1)).is_none());
        // Full map: refused and counted, never an error for the caller.
        for p in 10..14 {
            assert!(f.bypass(&k(p), false));
        }
        assert!(!f.bypass(&k(99), true));
        assert_eq!(f.stats.map_full.load(Ordering::Relaxed), 1);
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        f.attach(&socket).unwrap();
    }
}
