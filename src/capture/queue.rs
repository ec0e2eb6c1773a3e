//! Passive capture through a packet socket's receive queue, without a ring.
//!
//! A TPACKET_V3 ring ([`super::Ring`]) has the kernel copy every frame into the ring in the
//! context that delivers the frame: on a vif that is the guest's own path (netback's thread
//! on Xen, the sending guest's softirq in the lab), so the copy of each GSO super-frame (up
//! to 64 KiB) is paid there, before the frame moves on. A plain packet socket instead queues
//! a reference to the frame (`skb_clone`: no data copied) and the worker copies it out with
//! `recvmmsg` on its own CPU. On the lab's two vCPUs with the service on its own CPU, the
//! ring's copy was 21% of the guests' CPU (`__pi_memcpy` under `tpacket_rcv`) and the
//! guests kept 0.60–0.87× of their throughput, against 0.83–1.12× through the queue
//! (docs/performance.md, "Passive capture: ring or queue").
//!
//! What the queue costs instead: the frame's memory stays allocated until the worker reads
//! it (the socket's receive buffer bounds that, `SO_RCVBUFFORCE`, set from `queue_mib`), one
//! system call per batch of frames, a copy into the worker's buffers, and freeing the frame:
//! about 2 µs of the worker's time per small frame, against the ring's 0.5 µs. Frames the kernel
//! drops because the queue is full are counted (`PACKET_STATISTICS`), as a ring's are.
//! Frames longer than a buffer (BIG TCP super-frames past 64 KiB) are read truncated and
//! reported with their full length.
//!
//! **How the worker is woken.** A thread waiting on the socket (`poll`) is woken by every
//! frame that arrives, and that wake-up is paid on the guest's path: an inter-processor
//! interrupt per frame (a guest's ping in the lab, the service on a CPU of its own: +21 µs
//! at p50 so, +7 µs with the ring, which wakes its reader per block; +2 µs reading on a
//! timer as below). So while frames come the worker does not wait on the socket:
//! it sleeps, reads what queued meanwhile, and sleeps again, 0.5 ms after a read that found
//! frames, twice as long after each that found none, up to 2 ms (or `[inspect]
//! block_timeout_ms` if shorter). Frames arriving meanwhile find no waiter and cost the guest
//! nothing more than the queueing. The ring wakes its reader when a block fills whatever its
//! timer; nothing wakes a sleeping reader here, so the bound is what a burst after a lull can
//! queue (at 20 ms, 120 of 3.4 million frames were lost at the start of transfers in the
//! lab). After 20 ms without frames it waits in `poll` again, so an idle vif costs no
//! timer: the next frame wakes it, once.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use super::{bind_packet, packet_socket, setsockopt, sys, CaptureError, Frame, RingStats, Source};

/// Bytes per frame buffer: a 64 KiB GSO super-frame and its Ethernet header.
const BUF: usize = 65536 + 256;
/// Frames read per `recvmmsg`.
const BATCH: usize = 32;

/// A packet socket on one interface whose frames are read with `recvmmsg`.
pub struct Queue {
    fd: OwnedFd,
    iface: String,
    ifindex: u32,
    bufs: Vec<Vec<u8>>,
    stats: RingStats,
    error: Option<io::Error>,
    /// The last read stopped at its limit with frames left.
    more: bool,
    /// When the last frame was read.
    last_frame: Instant,
    /// The next sleep while frames come (module docs).
    sleep: Duration,
    /// The longest a frame waits in the queue while frames come (`block_timeout_ms`).
    max_delay: Duration,
}

/// The first sleep after frames were read.
const FIRST_SLEEP: Duration = Duration::from_micros(500);
/// The longest sleep while frames come: a burst after a lull must find the worker reading
/// before it fills the queue (2 ms of 40 Gbit/s is 10 MB; the default queue holds 16 MiB).
const MAX_SLEEP: Duration = Duration::from_millis(2);
/// No frame for this long: the worker waits in `poll` (the next frame wakes it). Short, so
/// that a vif with a frame now and then costs a dozen timer wake-ups per frame, not a
/// stream of them.
const IDLE_AFTER: Duration = Duration::from_millis(20);

impl AsRawFd for Queue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Queue {
    /// Opens a queue on `iface` (in the caller's network namespace) holding up to
    /// `rcvbuf` bytes of frames (the kernel's accounting: each frame's whole buffer), in
    /// fanout group `fanout` if given, whose frames wait at most `max_delay` (2 ms at most)
    /// while frames come (module docs).
    pub fn open(
        iface: &str,
        rcvbuf: usize,
        max_delay: Duration,
        fanout: Option<u16>,
    ) -> Result<Queue, CaptureError> {
        let (fd, ifindex) = packet_socket(iface)?;
        // The kernel doubles what it is given (its accounting counts each frame's whole
        // buffer, not its bytes): half of `rcvbuf`.
        let size = (rcvbuf / 2).clamp(4096, i32::MAX as usize) as libc::c_int;
        if setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &size).is_err() {
            // Without CAP_NET_ADMIN: as much as `net.core.rmem_max` allows.
            setsockopt(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, &size)
                .map_err(sys("SO_RCVBUF", iface))?;
        }
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, &1)
            .map_err(sys("SO_TIMESTAMPNS", iface))?;
        // The frame's length before the capture filter cut it to its headers (the read
        // length is the cut one): what tells the worker the payload was not copied.
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_AUXDATA, &1)
            .map_err(sys("PACKET_AUXDATA", iface))?;
        bind_packet(&fd, iface, ifindex)?;
        if let Some(group) = fanout {
            super::join_symmetric_fanout(&fd, iface, group, false)?;
        }
        let max_delay = max_delay.min(MAX_SLEEP);
        Ok(Queue {
            fd,
            iface: iface.into(),
            ifindex,
            bufs: (0..BATCH).map(|_| vec![0u8; BUF]).collect(),
            stats: RingStats::default(),
            error: None,
            more: false,
            last_frame: Instant::now()
                .checked_sub(IDLE_AFTER)
                .unwrap_or_else(Instant::now),
            sleep: FIRST_SLEEP.min(max_delay),
            max_delay,
        })
    }

    /// The sleep after a read that found frames (module docs).
    fn first_sleep(&self) -> Duration {
        FIRST_SLEEP.min(self.max_delay)
    }

    /// Reads what is queued, at most a few batches (so that the caller's housekeeping runs
    /// between them; `more` says whether frames were left).
    fn read(&mut self, f: &mut dyn FnMut(Frame<'_>)) -> Result<usize, CaptureError> {
        let mut n = 0;
        self.more = true;
        for _ in 0..64 {
            let got = self.recv(f)?;
            n += got;
            if got < BATCH {
                self.more = false;
                break;
            }
        }
        if n > 0 {
            self.last_frame = Instant::now();
        }
        Ok(n)
    }

    fn recv(&mut self, f: &mut dyn FnMut(Frame<'_>)) -> Result<usize, CaptureError> {
        let mut iovs: [libc::iovec; BATCH] = std::array::from_fn(|i| libc::iovec {
            iov_base: self.bufs[i].as_mut_ptr() as *mut libc::c_void,
            iov_len: BUF,
        });
        let mut cbufs = [[0u64; CONTROL_WORDS]; BATCH];
        // SAFETY: an all-zero sockaddr_ll is valid.
        let mut names: [libc::sockaddr_ll; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: all-zero mmsghdrs are valid; every pointer set below outlives the call.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, m) in msgs.iter_mut().enumerate() {
            m.msg_hdr.msg_name = &mut names[i] as *mut libc::sockaddr_ll as *mut libc::c_void;
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as _;
            m.msg_hdr.msg_iov = &mut iovs[i];
            m.msg_hdr.msg_iovlen = 1;
            m.msg_hdr.msg_control = cbufs[i].as_mut_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_controllen = std::mem::size_of::<[u64; CONTROL_WORDS]>() as _;
        }
        // SAFETY: `msgs` holds BATCH headers describing buffers valid for writes;
        // MSG_TRUNC makes each `msg_len` the frame's length as queued (past the buffer's).
        let got = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                // The socket's pending error (ENETDOWN: the interface went down; the kernel
                // re-attaches the socket when it is up), now read and so cleared.
                _ => {
                    self.error = Some(e);
                    Ok(0)
                }
            };
        }
        let got = got as usize;
        for (i, m) in msgs.iter().take(got).enumerate() {
            let queued = m.msg_len as usize;
            let c = super::control(&m.msg_hdr);
            let wire = c.orig_len.map_or(queued, |l| (l as usize).max(queued));
            f(Frame {
                data: &self.bufs[i][..queued.min(BUF)],
                wire_len: wire.min(u32::MAX as usize) as u32,
                ts_ns: c.ts_ns,
                outgoing: names[i].sll_pkttype == libc::PACKET_OUTGOING,
            });
        }
        Ok(got)
    }
}

impl Source for Queue {
    /// Waits up to `timeout` for a frame, then hands every queued frame to `f` (at most a
    /// few batches, so that the caller's housekeeping runs between them). Returns the number
    /// of frames.
    fn poll(
        &mut self,
        timeout: Duration,
        f: &mut dyn FnMut(Frame<'_>),
    ) -> Result<usize, CaptureError> {
        if self.more {
            return self.read(f);
        }
        if self.last_frame.elapsed() < IDLE_AFTER {
            // Frames came lately: read on a timer, never waiting on the socket.
            std::thread::sleep(self.sleep.min(timeout));
            let n = self.read(f)?;
            self.sleep = if n > 0 {
                self.first_sleep()
            } else {
                (self.sleep * 2).min(self.max_delay)
            };
            return Ok(n);
        }
        // A pending error (the interface went down) ends the wait too; `read` reads it.
        super::wait(self.fd.as_raw_fd(), timeout).map_err(sys("poll", &self.iface))?;
        let n = self.read(f)?;
        self.sleep = self.first_sleep();
        Ok(n)
    }

    fn take_error(&mut self) -> Option<io::Error> {
        self.error.take()
    }

    /// Reads the kernel's counters (they reset on read) into the accumulated totals: frames
    /// dropped because the queue was at its limit.
    fn stats(&mut self) -> RingStats {
        self.stats.accumulate(self.fd.as_raw_fd())
    }

    fn ifindex(&self) -> u32 {
        self.ifindex
    }
}

/// Control buffer per message, in u64 words: the receive timestamp and `tpacket_auxdata`.
const CONTROL_WORDS: usize = 16;
