//! A tc classifier (`cls_bpf`, direct action) on an interface's ingress, through rtnetlink:
//! the inline fast path's attachment on kernels without tcx (Linux < 6.6, such as Debian 12's
//! 6.1, the usual dom0).
//!
//! Two messages do it: a `clsact` qdisc (created if missing; one an administrator made is
//! shared, never removed) and a `bpf` filter at this module's own priority and handle, given
//! the program by file descriptor. Unlike a tcx link, the filter is not owned by a file
//! descriptor: it outlives a SIGKILLed service. [`IngressFilter`] removes it when dropped; the
//! program itself stops acting when its lease runs out (`capture::bpf::FastPath`), so a
//! filter left behind forwards nothing; and attaching again replaces it in place (same
//! priority and handle), so a restarted service never stacks a second one.
//!
//! Written against the three fixed-layout messages (`nlmsghdr`, `tcmsg`, attributes) rather
//! than with a netlink crate: none in the build environment's registry covers `cls_bpf`'s
//! file-descriptor attribute, and the messages are 60-100 bytes.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// include/uapi/linux/rtnetlink.h, pkt_sched.h, pkt_cls.h.
const RTM_NEWQDISC: u16 = 36;
const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
/// `TC_H_CLSACT`: the clsact qdisc's parent, and the major of its handle.
const TC_H_CLSACT: u32 = 0xffff_fff1;
/// `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`: the ingress hook of clsact.
const CLSACT_INGRESS: u32 = 0xffff_fff2;
/// This service's filter priority and handle on an interface (`tc filter show dev vif5.0
/// ingress` lists `pref 1516 ... handle 0x1`).
pub const PRIO: u16 = 1516;
const HANDLE: u32 = 1;

/// The filter on one interface's ingress; removed when dropped.
#[derive(Debug)]
pub struct IngressFilter {
    ifindex: u32,
}

impl IngressFilter {
    /// Attaches `prog` (a `BPF_PROG_TYPE_SCHED_CLS` program, direct action) to the ingress of
    /// interface `ifindex`, replacing this service's earlier filter there if any.
    pub fn attach(ifindex: u32, prog: &OwnedFd, name: &str) -> io::Result<IngressFilter> {
        let nl = Netlink::open()?;
        // clsact, unless there is one already (EEXIST).
        let mut kind = Vec::new();
        attr(&mut kind, TCA_KIND, b"clsact\0");
        match nl.request(
            RTM_NEWQDISC,
            NLM_F_CREATE | NLM_F_EXCL,
            tcmsg(ifindex, TC_H_CLSACT & 0xffff_0000, TC_H_CLSACT, 0),
            &kind,
        ) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
        let mut opts = Vec::new();
        attr(
            &mut opts,
            TCA_BPF_FD,
            &(prog.as_raw_fd() as u32).to_ne_bytes(),
        );
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        attr(&mut opts, TCA_BPF_NAME, &n);
        attr(
            &mut opts,
            TCA_BPF_FLAGS,
            &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes(),
        );
        let mut attrs = Vec::new();
        attr(&mut attrs, TCA_KIND, b"bpf\0");
        attr(&mut attrs, TCA_OPTIONS, &opts);
        // Without NLM_F_EXCL: a filter at this priority and handle is replaced.
        nl.request(RTM_NEWTFILTER, NLM_F_CREATE, filter_msg(ifindex), &attrs)?;
        Ok(IngressFilter { ifindex })
    }
}

impl Drop for IngressFilter {
    fn drop(&mut self) {
        remove(self.ifindex);
    }
}

/// Removes this service's filter from interface `ifindex`'s ingress, if there is one (also
/// one a killed service left, when the splice is undone).
pub fn remove(ifindex: u32) {
    let mut attrs = Vec::new();
    attr(&mut attrs, TCA_KIND, b"bpf\0");
    // ENODEV or ENOENT: the interface (and its filters) went first, or there was none.
    let _ =
        Netlink::open().and_then(|nl| nl.request(RTM_DELTFILTER, 0, filter_msg(ifindex), &attrs));
}

/// `struct tcmsg` (20 bytes).
fn tcmsg(ifindex: u32, handle: u32, parent: u32, info: u32) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[0] = libc::AF_UNSPEC as u8;
    m[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    m[8..12].copy_from_slice(&handle.to_ne_bytes());
    m[12..16].copy_from_slice(&parent.to_ne_bytes());
    m[16..20].copy_from_slice(&info.to_ne_bytes());
    m
}

/// This service's filter on `ifindex`: clsact ingress, [`PRIO`], every protocol, [`HANDLE`].
fn filter_msg(ifindex: u32) -> [u8; 20] {
    let all = u32::from((libc::ETH_P_ALL as u16).to_be());
    tcmsg(
        ifindex,
        HANDLE,
        CLSACT_INGRESS,
        (u32::from(PRIO) << 16) | all,
    )
}

/// Appends a netlink attribute (`struct rtattr` + payload, padded to 4 bytes).
fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len() + (4 - len % 4) % 4, 0);
}

struct Netlink(OwnedFd);

impl Netlink {
    fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        Ok(Netlink(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Sends one request and waits for the kernel's acknowledgement (its error, if any).
    fn request(&self, ty: u16, flags: u16, tcm: [u8; 20], attrs: &[u8]) -> io::Result<()> {
        let len = 16 + tcm.len() + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&ty.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel assigns it
        msg.extend_from_slice(&tcm);
        msg.extend_from_slice(attrs);
        // SAFETY: sends `msg.len()` initialised bytes to the kernel (port id 0, the default
        // destination of an unconnected netlink socket).
        let sent = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: receives into a buffer of the size passed.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if let Some(r) = ack(&buf[..n as usize]) {
                return r;
            }
        }
    }
}

/// The outcome carried by the acknowledgement among the messages in `buf`, if there is one.
fn ack(buf: &[u8]) -> Option<io::Result<()>> {
    let mut off = 0;
    while off + 20 <= buf.len() {
        let u32at = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let len = u32at(off) as usize;
        let ty = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if ty == NLMSG_ERROR {
            let err = u32at(off + 16) as i32;
            return Some(if err == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-err))
            });
        }
        if len < 16 {
            break;
        }
        off += (len + 3) & !3;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_the_filter_is_addressed_as_tc_shows_it() {
        let mut b = Vec::new();
        attr(&mut b, TCA_KIND, b"bpf\0");
        attr(&mut b, TCA_BPF_NAME, b"virtsec\0");
        assert_eq!(
            b,
            [&[8u8, 0, 1, 0][..], b"bpf\0", &[12, 0, 7, 0], b"virtsec\0"].concat()
        );
        let mut odd = Vec::new();
        attr(&mut odd, TCA_KIND, b"clsact\0");
        assert_eq!(odd.len(), 12); // 4 + 7, padded
                                   // ingress of clsact (ffff:fff2), pref 1516, protocol all (0x0003 in network order).
        let m = filter_msg(7);
        assert_eq!(m[4..8], 7u32.to_ne_bytes());
        assert_eq!(m[8..12], 1u32.to_ne_bytes());
        assert_eq!(m[12..16], 0xffff_fff2u32.to_ne_bytes());
        assert_eq!(m[16..20], ((1516u32 << 16) | 0x0300).to_ne_bytes());
    }

    #[test]
    fn acknowledgements_carry_the_kernels_error() {
        let msg = |err: i32| {
            let mut m = Vec::new();
            m.extend_from_slice(&36u32.to_ne_bytes());
            m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            m.extend_from_slice(&[0; 10]);
            m.extend_from_slice(&err.to_ne_bytes());
            m.extend_from_slice(&[0; 16]);
            m
        };
        assert!(matches!(ack(&msg(0)), Some(Ok(()))));
        let e = ack(&msg(-libc::EEXIST)).unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        assert!(ack(&[0u8; 8]).is_none());
        // A message that claims less than its own header: no loop, no panic.
        let mut bad = msg(0);
        bad[0..4].copy_from_slice(&4u32.to_ne_bytes());
        bad[4..6].copy_from_slice(&3u16.to_ne_bytes());
        assert!(ack(&bad).is_none());
    }
}
