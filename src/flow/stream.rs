//! TCP reassembly of one direction of a connection.
//!
//! Segments are placed by their sequence number relative to the stream's first byte (the SYN's
//! sequence + 1, or the first segment's when picking up a connection midstream). The consumer
//! receives the stream in order, exactly once per byte, through a callback:
//!
//! - **In-order data is not copied**: a segment that starts at the next expected byte and does
//!   not run into queued data is handed over straight from the packet (the common case).
//! - Out-of-order segments are copied into a queue and released when the gap closes. The
//!   queue is bounded per direction (`max_queued`) and across all streams of the table
//!   (`memcap`, the `queued_bytes` gauge): beyond either, segments are dropped and counted, so
//!   a guest opening many connections with gaps cannot exhaust the service's memory.
//! - Retransmissions of delivered bytes are dropped and counted.
//! - **Overlap policy: first wins.** A byte, once received (delivered or queued), is never
//!   replaced by a later segment carrying different data for the same sequence number. This
//!   is the behaviour of the BSD/Linux stacks' receive queues for data already queued, and it
//!   denies the classic evasion of sending a harmless byte first and the attack byte in a
//!   retransmission (or the reverse) to an IDS that resolves overlaps differently from the
//!   receiving guest. Suricata's default (`bsd`) policy differs only for overlaps of queued
//!   out-of-order data that start before the original segment.
//! - **Depth**: only the first `depth` bytes of the direction are delivered (default 1 MiB,
//!   as Suricata's `stream.reassembly.depth`); the rest is counted, not inspected.

use std::collections::BTreeMap;

/// Reassembly limits.
#[derive(Clone, Copy, Debug)]
pub struct StreamLimits {
    pub depth: u64,
    /// Past `depth`, inspect each packet's payload on its own (`true`, the default: a long
    /// connection does not make the engine blind) or stop inspecting the direction (`false`:
    /// Suricata's stream bypass, a fraction of the CPU on bulk transfers).
    pub inspect_past_depth: bool,
    pub max_queued: usize,
    /// Bytes of out-of-order data queued across all streams sharing one `StreamStats`.
    pub memcap: usize,
}

impl Default for StreamLimits {
    fn default() -> StreamLimits {
        StreamLimits {
            depth: 1 << 20,
            inspect_past_depth: true,
            max_queued: 1 << 20,
            memcap: 64 << 20,
        }
    }
}

/// Counters of the reassembler, summed over streams.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamStats {
    pub segments: u64,
    pub in_order: u64,
    pub out_of_order: u64,
    pub retransmitted_bytes: u64,
    pub overlap_bytes: u64,
    pub queue_dropped: u64,
    /// Segments (bytes) dropped because the table-wide memcap was reached.
    pub memcap_dropped: u64,
    /// Out-of-order bytes queued now, across streams (gauge).
    pub queued_bytes: u64,
    pub beyond_depth_bytes: u64,
    pub midstream_pickups: u64,
}

/// One direction.
#[derive(Debug, Default)]
pub struct TcpStream {
    base: Option<u32>,
    next: u64,
    queue: BTreeMap<u64, Vec<u8>>,
    queued: usize,
}

impl TcpStream {
    /// Bytes delivered so far.
    pub fn delivered(&self) -> u64 {
        self.next
    }

    /// Bytes waiting behind a gap.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Frees the queue (the flow ends) and returns the gauge's share.
    pub fn release(&mut self, stats: &mut StreamStats) {
        stats.queued_bytes = stats.queued_bytes.saturating_sub(self.queued as u64);
        self.queue.clear();
        self.queued = 0;
    }

    /// Notes a SYN: the stream starts at `seq + 1`.
    pub fn syn(&mut self, seq: u32) {
        if self.base.is_none() {
            self.base = Some(seq.wrapping_add(1));
        }
    }

    /// Handles one segment's payload.
    pub fn segment(
        &mut self,
        seq: u32,
        data: &[u8],
        lim: &StreamLimits,
        stats: &mut StreamStats,
        deliver: &mut dyn FnMut(&[u8]),
    ) {
        if data.is_empty() {
            return;
        }
        stats.segments += 1;
        let base = match self.base {
            Some(b) => b,
            None => {
                stats.midstream_pickups += 1;
                self.base = Some(seq);
                seq
            }
        };
        let rel32 = seq.wrapping_sub(base);
        if rel32 > u32::MAX / 2 {
            // Before the stream start: an old retransmission (or garbage).
            stats.retransmitted_bytes += data.len() as u64;
            return;
        }
        let mut off = rel32 as u64;
        let mut data = data;
        let end = off + data.len() as u64;
        if end <= self.next {
            stats.retransmitted_bytes += data.len() as u64;
            return;
        }
        if off < self.next {
            // First wins: the delivered prefix is kept.
            let cut = (self.next - off) as usize;
            stats.overlap_bytes += cut as u64;
            data = &data[cut..];
            off = self.next;
        }
        if self.next >= lim.depth {
            stats.beyond_depth_bytes += data.len() as u64;
            return;
        }
        if off == self.next {
            stats.in_order += 1;
            let first_queued = self.queue.keys().next().copied();
            match first_queued {
                Some(q) if q < end => {
                    // Runs into queued data: queued bytes win; take the slow path.
                    self.enqueue(off, data, lim, stats);
                }
                _ => {
                    let n = self.clip_depth(data.len(), lim, stats);
                    deliver(&data[..n]);
                    self.next += n as u64;
                }
            }
        } else {
            stats.out_of_order += 1;
            self.enqueue(off, data, lim, stats);
        }
        self.drain(lim, stats, deliver);
    }

    fn clip_depth(&self, len: usize, lim: &StreamLimits, stats: &mut StreamStats) -> usize {
        let room = lim.depth.saturating_sub(self.next);
        if (len as u64) > room {
            stats.beyond_depth_bytes += len as u64 - room;
            room as usize
        } else {
            len
        }
    }

    /// Queues the parts of `[off, off+len)` not already queued (first wins).
    fn enqueue(&mut self, off: u64, data: &[u8], lim: &StreamLimits, stats: &mut StreamStats) {
        let end = off + data.len() as u64;
        let mut pieces: Vec<(u64, u64)> = vec![(off, end)];
        // Existing entries that may overlap: the one starting before `off` and those inside.
        let before = self
            .queue
            .range(..off)
            .next_back()
            .map(|(k, v)| (*k, *k + v.len() as u64));
        let inside: Vec<(u64, u64)> = self
            .queue
            .range(off..end)
            .map(|(k, v)| (*k, *k + v.len() as u64))
            .collect();
        for (qs, qe) in before.into_iter().chain(inside) {
            let mut next = Vec::new();
            for (ps, pe) in pieces {
                if qe <= ps || qs >= pe {
                    next.push((ps, pe));
                    continue;
                }
                stats.overlap_bytes += qe.min(pe) - qs.max(ps);
                if ps < qs {
                    next.push((ps, qs));
                }
                if qe < pe {
                    next.push((qe, pe));
                }
            }
            pieces = next;
        }
        for (ps, pe) in pieces {
            let len = (pe - ps) as usize;
            if self.queued + len > lim.max_queued {
                stats.queue_dropped += len as u64;
                continue;
            }
            if stats.queued_bytes as usize + len > lim.memcap {
                stats.memcap_dropped += len as u64;
                continue;
            }
            stats.queued_bytes += len as u64;
            let from = (ps - off) as usize;
            self.queue.insert(ps, data[from..from + len].to_vec());
            self.queued += len;
        }
    }

    fn drain(
        &mut self,
        lim: &StreamLimits,
        stats: &mut StreamStats,
        deliver: &mut dyn FnMut(&[u8]),
    ) {
        while let Some((&k, _)) = self.queue.iter().next() {
            if k > self.next {
                return;
            }
            let Some(v) = self.queue.remove(&k) else {
                return;
            };
            self.queued -= v.len();
            stats.queued_bytes = stats.queued_bytes.saturating_sub(v.len() as u64);
            let end = k + v.len() as u64;
            if end <= self.next {
                continue;
            }
            let from = (self.next - k) as usize;
            if self.next >= lim.depth {
                stats.beyond_depth_bytes += (v.len() - from) as u64;
                continue;
            }
            let n = self.clip_depth(v.len() - from, lim, stats);
            deliver(&v[from..from + n]);
            self.next += n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(segs: &[(u32, &[u8])], lim: StreamLimits) -> (Vec<u8>, StreamStats) {
        let mut s = TcpStream::default();
        s.syn(999);
        let mut out = Vec::new();
        let mut st = StreamStats::default();
        for (seq, d) in segs {
            s.segment(*seq, d, &lim, &mut st, &mut |b| out.extend_from_slice(b));
        }
        (out, st)
    }

    #[test]
    fn in_order_split_out_of_order_and_retransmission() {
        let lim = StreamLimits::default();
        assert_eq!(feed(&[(1000, b"abc"), (1003, b"def")], lim).0, b"abcdef");
        let (out, st) = feed(&[(1003, b"def"), (1000, b"abc"), (1000, b"abc")], lim);
        assert_eq!(out, b"abcdef");
        assert_eq!((st.out_of_order, st.retransmitted_bytes), (1, 3));
    }

    #[test]
    fn first_wins_on_overlap() {
        let lim = StreamLimits::default();
        // Delivered bytes are not replaced by a conflicting retransmission.
        assert_eq!(feed(&[(1000, b"abcd"), (1002, b"XYZW")], lim).0, b"abcdZW");
        // Queued bytes are not replaced either, whichever side the overlap is on.
        assert_eq!(
            feed(&[(1004, b"efgh"), (1003, b"XYZ"), (1000, b"abc")], lim).0,
            b"abcXefgh"
        );
        assert_eq!(
            feed(&[(1004, b"ef"), (1000, b"abcdEFgh")], lim).0,
            b"abcdefgh"
        );
    }

    #[test]
    fn depth_and_queue_limits() {
        let lim = StreamLimits {
            depth: 5,
            max_queued: 4,
            memcap: 100,
            ..StreamLimits::default()
        };
        let (out, st) = feed(&[(1000, b"abc"), (1003, b"defgh"), (1008, b"ij")], lim);
        assert_eq!(out, b"abcde");
        assert_eq!(st.beyond_depth_bytes, 5);
        let lim = StreamLimits {
            depth: 100,
            max_queued: 4,
            memcap: 100,
            ..StreamLimits::default()
        };
        let (out, st) = feed(&[(1003, b"defgh"), (1000, b"abc")], lim);
        assert_eq!(out, b"abc");
        assert_eq!(st.queue_dropped, 5);
        // The table-wide memcap binds across streams sharing the counters.
        let lim = StreamLimits {
            depth: 100,
            max_queued: 100,
            memcap: 6,
            ..StreamLimits::default()
        };
        let mut st = StreamStats::default();
        let (mut a, mut b) = (TcpStream::default(), TcpStream::default());
        a.syn(0);
        b.syn(0);
        a.segment(10, b"xxxx", &lim, &mut st, &mut |_| {});
        b.segment(10, b"yyyy", &lim, &mut st, &mut |_| {});
        assert_eq!((st.queued_bytes, st.memcap_dropped), (4, 4));
        a.release(&mut st);
        assert_eq!(st.queued_bytes, 0);
    }

    #[test]
    fn midstream_pickup_and_wraparound() {
        let mut s = TcpStream::default();
        let mut out = Vec::new();
        let mut st = StreamStats::default();
        let lim = StreamLimits::default();
        let seq = u32::MAX - 1;
        s.segment(seq, b"ab", &lim, &mut st, &mut |b| out.extend_from_slice(b));
        s.segment(seq.wrapping_add(2), b"cd", &lim, &mut st, &mut |b| {
            out.extend_from_slice(b)
        });
        assert_eq!(out, b"abcd");
        assert_eq!(st.midstream_pickups, 1);
        // A segment from before the stream start is dropped.
        s.segment(seq.wrapping_sub(10), b"zz", &lim, &mut st, &mut |b| {
            out.extend_from_slice(b)
        });
        assert_eq!(out, b"abcd");
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_segmentation_and_order_yields_the_stream(
                len in 1usize..400,
                cuts in proptest::collection::vec(1usize..400, 0..12),
                order in proptest::collection::vec(any::<u16>(), 12),
                dup in any::<bool>(),
            ) {
                let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
                let mut cuts: Vec<usize> = cuts.into_iter().filter(|c| *c < len).collect();
                cuts.sort();
                cuts.dedup();
                let mut segs = Vec::new();
                let mut prev = 0;
                for c in cuts.iter().copied().chain(std::iter::once(len)) {
                    segs.push((prev, c));
                    prev = c;
                }
                // Shuffle deterministically by `order`.
                let mut idx: Vec<usize> = (0..segs.len()).collect();
                idx.sort_by_key(|i| order[i % order.len()].wrapping_mul(*i as u16 + 1));
                let mut s = TcpStream::default();
                s.syn(41);
                let mut out = Vec::new();
                let mut st = StreamStats::default();
                let lim = StreamLimits::default();
                for &i in &idx {
                    let (a, b) = segs[i];
                    s.segment(42 + a as u32, &data[a..b], &lim, &mut st, &mut |x| out.extend_from_slice(x));
                    if dup {
                        s.segment(42 + a as u32, &data[a..b], &lim, &mut st, &mut |x| out.extend_from_slice(x));
                    }
                }
                prop_assert_eq!(out, data);
                prop_assert_eq!(s.queued(), 0);
            }
        }
    }
}
