//! Trimming capture in the kernel: an eBPF socket filter on every passive ring copies only the
//! headers of frames whose payload the inspector will not read.
//!
//! Why: a passive ring costs the guest nothing in user space, but the kernel copies each frame
//! into the ring on the guest's own path (the sender's softirq on a veth or netback vif). With
//! 64 KiB GSO super-frames that copy is most of what passive inspection costs a guest: on the
//! 16-core machine, passive with stream bypass used 21% of a core in user space and still cut
//! guest-to-guest throughput to 0.6× (docs/performance.md). The payload is copied for nothing
//! in two cases, and this filter returns a header-only snap length (`HEADER_SNAP`) for them:
//!
//! - **guest-to-guest frames at the receiving vif**: a frame leaving the host towards a guest
//!   (`PACKET_OUTGOING`) whose source MAC is another local, inspected guest's was inspected at
//!   the sender's vif (anti-spoofing makes the source MAC proof of the sender). The receiver
//!   still gets the headers: flow state (`flow:established`) follows both directions.
//! - **bypassed TCP directions** (`inspect_past_depth = false`): once a direction passed the
//!   stream depth, the worker adds it (interface, addresses, ports) to a hash map; its frames
//!   arrive with headers only. SYN, FIN and RST segments always arrive whole, and a SYN removes
//!   its direction from the map in the kernel, so a new connection reusing the 5-tuple is
//!   inspected from its first byte (no user-space race). The worker removes a direction when
//!   its flow leaves the table, when the rules are reloaded and when it stops.
//!
//! Anything else (IPv4 fragments, VLAN tags, IPv6 extension headers, short frames) is copied
//! whole: the filter only ever trims what it positively recognises. Frames are never dropped
//! by it (a trimmed frame still counts for behaviour detection and flow state).
//!
//! The program is eBPF assembled here (a few dozen instructions, legacy `LD_ABS`/`LD_IND`
//! packet loads, which the kernel bounds-checks at run time) rather than compiled C: no clang,
//! libbpf or BTF at build or run time, and the whole filter is readable in one function. Where
//! the kernel has no eBPF (or the service lacks CAP_BPF/CAP_SYS_ADMIN) capture works as before,
//! untrimmed, and `virtsec status` says so.

use std::collections::HashSet;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Bytes copied of a trimmed frame: Ethernet + IPv4 with options (60) + TCP with options (60),
/// or IPv6 (40) + TCP (60), with room to spare.
pub const HEADER_SNAP: u32 = 192;
/// Key of the bypass map: source address words (16 bytes), destination address words (16),
/// ports (4), ifindex (4), family (4).
const KEY: usize = 44;

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

/// An address as the filter's `LD_ABS` loads store it: 32-bit words in host order.
fn addr_words(a: IpAddr, out: &mut [u8]) {
    match a {
        IpAddr::V4(v4) => out[..4].copy_from_slice(&u32::from_be_bytes(v4.octets()).to_ne_bytes()),
        IpAddr::V6(v6) => {
            for (i, c) in v6.octets().chunks_exact(4).enumerate() {
                let w = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
                out[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
        }
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
        addr_words(self.src, &mut k[0..16]);
        addr_words(self.dst, &mut k[16..32]);
        let ports = (u32::from(self.sport) << 16) | u32::from(self.dport);
        k[32..36].copy_from_slice(&ports.to_ne_bytes());
        k[36..40].copy_from_slice(&self.ifindex.to_ne_bytes());
        let family: u32 = if self.src.is_ipv4() { 4 } else { 6 };
        k[40..44].copy_from_slice(&family.to_ne_bytes());
        k
    }
}

/// A MAC as the filter loads it (`LD_ABS` word at 6, half-word at 10).
fn mac_key(m: &[u8; 6]) -> [u8; 8] {
    let v = m.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b));
    v.to_ne_bytes()
}

/// Counters of the filter's maps.
#[derive(Debug, Default)]
pub struct FilterStats {
    /// Directions handed to the kernel to trim.
    pub bypassed: AtomicU64,
    /// Directions given back (flow gone or reused, rules reloaded, worker stopped).
    pub restored: AtomicU64,
    /// Directions the map had no room for (still copied whole: safe, only slower).
    pub map_full: AtomicU64,
}

/// The loaded program and its two maps, shared by every passive worker of the service.
pub struct CaptureFilter {
    prog: OwnedFd,
    flows: OwnedFd,
    macs: OwnedFd,
    mac_set: Mutex<HashSet<[u8; 6]>>,
    pub stats: FilterStats,
}

// bpf(2) commands and constants (include/uapi/linux/bpf.h).
const MAP_CREATE: libc::c_long = 0;
const MAP_LOOKUP_ELEM: libc::c_long = 1;
const MAP_UPDATE_ELEM: libc::c_long = 2;
const MAP_DELETE_ELEM: libc::c_long = 3;
const PROG_LOAD: libc::c_long = 5;
const MAP_TYPE_HASH: u32 = 1;
const BPF_F_NO_PREALLOC: u32 = 1;
const PROG_TYPE_SOCKET_FILTER: u32 = 1;
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

fn map_create(key_size: u32, max_entries: u32) -> Result<OwnedFd, BpfError> {
    // Entries are allocated as directions are bypassed, not all up front (a preallocated
    // 65,536-entry map would pin ~6 MiB of kernel memory for a mostly empty table).
    let mut a = Attr::new()
        .u32(0, MAP_TYPE_HASH)
        .u32(4, key_size)
        .u32(8, 1)
        .u32(12, max_entries)
        .u32(16, BPF_F_NO_PREALLOC);
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
    value: Option<&mut u8>,
) -> io::Result<()> {
    let vp = value.map_or(0, |v| v as *mut u8 as u64);
    let mut a = Attr::new()
        .u32(0, map.as_raw_fd() as u32)
        .u64(8, key.as_ptr() as u64)
        .u64(16, vp);
    bpf(cmd, &mut a).map(|_| ())
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
        pub fn or(&mut self, dst: u8, src: u8) -> &mut Prog {
            self.raw(0x4f, dst, src, 0, 0)
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
        /// r0 = packet bytes at `off` (size 4, 2 or 1), network to host order.
        pub fn ldabs(&mut self, size: u8, off: i32) -> &mut Prog {
            self.raw(0x20 | sz(size), 0, 0, 0, off)
        }
        /// r0 = packet bytes at `src + off`.
        pub fn ldind(&mut self, size: u8, src: u8, off: i32) -> &mut Prog {
            self.raw(0x40 | sz(size), 0, src, 0, off)
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
        pub fn jgt(&mut self, dst: u8, src: u8, to: &'static str) -> &mut Prog {
            self.jump(0x2d, dst, src, 0, to)
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

    fn sz(size: u8) -> u8 {
        match size {
            4 => 0x00,
            2 => 0x08,
            _ => 0x10,
        }
    }
}

/// The filter program (see the module documentation). Returns the snap length.
fn program(flows: i32, macs: i32) -> Result<Vec<asm::Insn>, String> {
    use asm::*;
    const FULL: i32 = 0x7fff_ffff;
    // struct __sk_buff: len at 0, pkt_type at 4, ifindex at 40.
    let mut p = Prog::new();
    p.mov(R6, R1).ldxw(R9, R6, 0); // r9 = frame length
                                   // Guest-to-guest at the receiver: outgoing, from a local inspected guest's MAC.
    p.ldxw(R0, R6, 4)
        .jnei(R0, libc::PACKET_OUTGOING as i32, "ip");
    p.jlti(R9, 14, "full");
    p.ldabs(4, 6)
        .mov(R7, R0)
        .lshi(R7, 16)
        .ldabs(2, 10)
        .or(R7, R0);
    p.stxdw(R10, -56, R7)
        .ldmap(R1, macs)
        .mov(R2, R10)
        .addi(R2, -56)
        .call(1);
    p.jnei(R0, 0, "snap");
    // The bypass key at r10-48 (44 bytes, zeroed first).
    p.label("ip");
    for off in [-48, -40, -32, -24, -16, -8] {
        p.stdw(R10, off, 0);
    }
    p.ldxw(R0, R6, 40).stxw(R10, -12, R0);
    p.jlti(R9, 34, "full").ldabs(2, 12);
    p.jeqi(R0, 0x0800, "v4").jeqi(R0, 0x86dd, "v6").ja("full");
    // IPv4 without fragmentation; r7 = header length.
    p.label("v4");
    p.ldabs(1, 23).jnei(R0, 6, "full");
    p.ldabs(2, 20).jseti(R0, 0x3fff, "full");
    p.ldabs(1, 14).andi(R0, 0xf).lshi(R0, 2).mov(R7, R0);
    p.mov(R1, R7).addi(R1, 14 + 20).jgt(R1, R9, "full");
    p.ldabs(4, 26).stxw(R10, -48, R0);
    p.ldabs(4, 30).stxw(R10, -32, R0);
    p.stw(R10, -8, 4).ja("l4");
    // IPv6 with TCP as the next header (extension headers: copied whole).
    p.label("v6");
    p.jlti(R9, 14 + 40 + 20, "full");
    p.ldabs(1, 20).jnei(R0, 6, "full");
    for (i, off) in (22..54).step_by(4).enumerate() {
        let slot = if i < 4 {
            -48 + 4 * i as i16
        } else {
            -32 + 4 * (i as i16 - 4)
        };
        p.ldabs(4, off).stxw(R10, slot, R0);
    }
    p.stw(R10, -8, 6).movi(R7, 40);
    // TCP ports and flags.
    p.label("l4");
    p.ldind(2, R7, 14).mov(R8, R0).lshi(R8, 16);
    p.ldind(2, R7, 16).or(R8, R0).stxw(R10, -16, R8);
    p.ldind(1, R7, 14 + 13).mov(R8, R0);
    p.ldmap(R1, flows).mov(R2, R10).addi(R2, -48);
    p.jseti(R8, 0x02, "del").jseti(R8, 0x05, "full");
    p.call(1).jnei(R0, 0, "snap").ja("full");
    // A SYN starts a connection: never trim it, and forget the tuple's bypass.
    p.label("del").call(3);
    p.label("full").movi(R0, FULL).exit();
    p.label("snap").movi(R0, HEADER_SNAP as i32).exit();
    p.finish()
}

impl CaptureFilter {
    /// Creates the maps (`max_bypassed` directions) and loads the program.
    pub fn load(max_bypassed: u32) -> Result<CaptureFilter, BpfError> {
        let flows = map_create(KEY as u32, max_bypassed.max(1))?;
        let macs = map_create(8, 4096)?;
        let insns = program(flows.as_raw_fd(), macs.as_raw_fd()).map_err(BpfError::Verifier)?;
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let attr = |level: u32, log: &mut Vec<u8>| {
            Attr::new()
                .u32(0, PROG_TYPE_SOCKET_FILTER)
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
        let fd = match bpf(PROG_LOAD, &mut attr(0, &mut log)) {
            Ok(fd) => fd,
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL)
                    || e.raw_os_error() == Some(libc::EACCES) =>
            {
                // Load again with the verifier's log, to say why.
                let _ = bpf(PROG_LOAD, &mut attr(1, &mut log));
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                let text = String::from_utf8_lossy(&log[..end]);
                let tail: Vec<&str> = text.lines().rev().take(3).collect();
                return Err(BpfError::Verifier(format!("{e}: {}", tail.join(" / "))));
            }
            Err(source) => {
                return Err(BpfError::Sys {
                    what: "loading the eBPF capture filter",
                    source,
                })
            }
        };
        Ok(CaptureFilter {
            // SAFETY: a new file descriptor from the kernel, owned by nothing else.
            prog: unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
            flows,
            macs,
            mac_set: Mutex::new(HashSet::new()),
            stats: FilterStats::default(),
        })
    }

    /// Attaches the filter to a packet socket (each worker's ring).
    pub fn attach(&self, sock: &impl AsRawFd) -> io::Result<()> {
        let fd: libc::c_int = self.prog.as_raw_fd();
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
            let mut one = 1u8;
            if let Err(e) = map_elem(MAP_UPDATE_ELEM, &self.macs, &mac_key(m), Some(&mut one)) {
                log::warn!("capture filter: cannot add a local MAC: {e}");
            }
        }
        *cur = want.clone();
    }

    /// Trims this direction from now on. False when the map is full (it stays whole).
    pub fn bypass(&self, k: &DirKey) -> bool {
        let mut one = 1u8;
        match map_elem(MAP_UPDATE_ELEM, &self.flows, &k.bytes(), Some(&mut one)) {
            Ok(()) => {
                self.stats.bypassed.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.stats.map_full.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Copies this direction whole again (if the kernel did not already forget it on a SYN).
    pub fn restore(&self, k: &DirKey) {
        let _ = map_elem(MAP_DELETE_ELEM, &self.flows, &k.bytes(), None);
        self.stats.restored.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the kernel currently trims this direction.
    pub fn is_bypassed(&self, k: &DirKey) -> bool {
        let mut v = 0u8;
        map_elem(MAP_LOOKUP_ELEM, &self.flows, &k.bytes(), Some(&mut v)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(&k[0..4], &0x0a00_0001u32.to_ne_bytes());
        assert!(k[4..16].iter().all(|&b| b == 0));
        assert_eq!(&k[16..20], &0x0a00_0002u32.to_ne_bytes());
        assert_eq!(&k[32..36], &0x1234_0050u32.to_ne_bytes());
        assert_eq!(&k[36..40], &7u32.to_ne_bytes());
        assert_eq!(&k[40..44], &4u32.to_ne_bytes());
        assert_eq!(
            mac_key(&[0x02, 0, 0, 0, 0x77, 0x01]),
            0x0200_0000_7701u64.to_ne_bytes()
        );
    }

    #[test]
    fn the_program_assembles() {
        let p = program(3, 4).unwrap();
        assert!(p.len() > 40 && p.len() < 200);
    }

    /// The kernel's verifier accepts the program and the maps behave (needs root, as CI).
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
        assert!(f.bypass(&k(1)));
        assert!(f.is_bypassed(&k(1)) && !f.is_bypassed(&k(2)));
        f.restore(&k(1));
        assert!(!f.is_bypassed(&k(1)));
        // Full map: refused and counted, never an error for the caller.
        for p in 10..14 {
            assert!(f.bypass(&k(p)));
        }
        assert!(!f.bypass(&k(99)));
        assert_eq!(f.stats.map_full.load(Ordering::Relaxed), 1);
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        f.attach(&socket).unwrap();
    }
}
