//! Flows: a table keyed by the 5-tuple (both directions map to one flow), with timeouts and a
//! cap on the number of flows, and TCP reassembly per direction ([`stream`]).
//!
//! The table is generic over what the next layer keeps per flow (`T`), so this module does
//! not depend on detection. Lookup is one hash of a small key (Fx hash: the table is keyed by
//! addresses a guest chooses, so the service also caps the table and evicts; see
//! docs/inspection.md for the hash-flooding trade-off). When the table is full, expired flows
//! are swept first (at most once a second), then [`WhenFull`] decides: evict the least
//! recently seen flow (fail open: the new flow is inspected, an evicted one that comes back
//! is picked up midstream) or refuse the new flow (fail closed: it is not tracked, and the
//! caller drops or reports it). Both are counted. The eviction victim is the oldest of a
//! random sample of 32 flows (exact below 64 flows): an exact search would cost the whole
//! table for every new flow of a flood, which is what fills the table.

pub mod stream;

use std::net::IpAddr;

use rustc_hash::FxHashMap;

use crate::decode::{Packet, Proto};
use stream::{StreamLimits, StreamStats, TcpStream};

/// Normalised 5-tuple: the lower endpoint first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub a: (IpAddr, u16),
    pub b: (IpAddr, u16),
    pub proto: Proto,
}

impl FlowKey {
    pub fn of(p: &Packet<'_>) -> FlowKey {
        let x = (p.src, p.sport);
        let y = (p.dst, p.dport);
        if x <= y {
            FlowKey {
                a: x,
                b: y,
                proto: p.proto,
            }
        } else {
            FlowKey {
                a: y,
                b: x,
                proto: p.proto,
            }
        }
    }
}

/// Table limits.
#[derive(Clone, Copy, Debug)]
pub struct FlowLimits {
    pub max_flows: usize,
    /// Seconds without packets before a flow expires.
    pub timeout_s: u64,
    pub stream: StreamLimits,
    pub when_full: WhenFull,
}

/// What a full table does with a new flow (`[inspect] flow_table_full`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenFull {
    /// Fail open: evict the least recently seen flow to make room.
    #[default]
    Open,
    /// Fail closed: refuse the new flow (not tracked, not inspected; inline drops it).
    Closed,
}

impl Default for FlowLimits {
    fn default() -> FlowLimits {
        FlowLimits {
            max_flows: 1 << 18,
            timeout_s: 600,
            stream: StreamLimits::default(),
            when_full: WhenFull::Open,
        }
    }
}

/// One flow.
pub struct Flow<T> {
    pub id: u64,
    pub key: FlowKey,
    /// The endpoint that opened the flow (SYN sender, or first packet's source).
    pub client: (IpAddr, u16),
    pub first_ts: u64,
    pub last_ts: u64,
    pub packets: [u64; 2],
    pub bytes: [u64; 2],
    /// Per direction, index 0 = to server.
    pub tcp: [TcpStream; 2],
    syn: bool,
    synack: bool,
    /// The client's initial sequence number, once its SYN was seen.
    client_isn: Option<u32>,
    pub established: bool,
    /// Per direction: past the stream depth and not inspected there
    /// (`inspect_past_depth = false`).
    pub bypassed: [bool; 2],
    /// Per direction: what the capture's kernel filter counts instead of copying (set by the
    /// engine for live capture, `capture::bpf`); given back through [`FlowTable::released`]
    /// when the flow leaves the table.
    pub handed: [Handed; 2],
    /// A FIN or RST was seen: the flow is ending (nothing more is handed to the kernel).
    pub closing: bool,
    pub user: T,
}

/// What the capture's kernel filter does with a direction's frames (`capture::bpf`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Handed {
    /// Copied to the worker (the default).
    #[default]
    Copied,
    /// Segments without payload are counted in the kernel, not copied.
    Empty,
    /// Every frame is counted in the kernel (SYN, FIN, RST and a sample a second excepted).
    All,
}

/// One direction of a flow: (source, destination) endpoints.
pub type DirTuple = ((IpAddr, u16), (IpAddr, u16));

impl<T> Flow<T> {
    /// The endpoints of direction `dir` (0: client to server).
    pub fn dir_tuple(&self, dir: usize) -> DirTuple {
        let server = if self.key.a == self.client {
            self.key.b
        } else {
            self.key.a
        };
        if dir == 0 {
            (self.client, server)
        } else {
            (server, self.client)
        }
    }
}

/// Counters of the table.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FlowStats {
    pub created: u64,
    pub expired: u64,
    pub evicted: u64,
    /// New flows refused because the table was full (`WhenFull::Closed`).
    pub refused: u64,
    /// A new connection (a SYN with a new initial sequence number) on the 5-tuple of a
    /// tracked flow: the old flow is ended and a new one starts.
    pub reused: u64,
    pub active: u64,
    pub stream: StreamStats,
}

/// The flow table.
pub struct FlowTable<T> {
    map: FxHashMap<FlowKey, usize>,
    slots: Vec<Option<Flow<T>>>,
    free: Vec<usize>,
    next_id: u64,
    last_sweep: u64,
    /// xorshift state for sampling eviction victims.
    rng: u64,
    pub limits: FlowLimits,
    pub stats: FlowStats,
    /// Handed-over directions of flows that left the table (expired, evicted, reused): the
    /// data plane drains this and has the kernel copy them again.
    pub released: Vec<DirTuple>,
}

/// What happened to a packet in its flow.
pub struct Seen<'f, T> {
    pub flow: &'f mut Flow<T>,
    /// Direction: 0 client→server, 1 server→client.
    pub dir: usize,
    /// The table's reassembly counters (and memcap gauge), for `TcpStream::segment`.
    pub stream: &'f mut StreamStats,
}

impl<T: Default> Flow<T> {
    fn new(id: u64, key: FlowKey, p: &Packet<'_>, ts: u64) -> Flow<T> {
        // The SYN's sender is the client; a SYN-ACK's receiver; else the first sender.
        let client = match p.tcp {
            Some(t) if t.syn && t.ack_flag => (p.dst, p.dport),
            _ => (p.src, p.sport),
        };
        Flow {
            id,
            key,
            client,
            first_ts: ts,
            last_ts: ts,
            packets: [0; 2],
            bytes: [0; 2],
            tcp: [TcpStream::default(), TcpStream::default()],
            syn: false,
            synack: false,
            client_isn: None,
            established: p.proto != Proto::Tcp,
            bypassed: [false; 2],
            handed: [Handed::Copied; 2],
            closing: false,
            user: T::default(),
        }
    }
}

impl<T: Default> FlowTable<T> {
    pub fn new(limits: FlowLimits) -> FlowTable<T> {
        FlowTable {
            map: FxHashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            next_id: 1,
            last_sweep: 0,
            rng: 0x9e37_79b9_7f4a_7c15
                ^ std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1),
            limits,
            stats: FlowStats::default(),
            released: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Creates a flow for `key` (making room first if the table is full, as `when_full`
    /// says); returns its slot, or `None` when the flow is refused.
    fn insert_new(&mut self, key: FlowKey, p: &Packet<'_>, ts: u64) -> Option<usize> {
        self.map.remove(&key);
        if self.map.len() >= self.limits.max_flows {
            if ts / 1_000_000 > self.last_sweep {
                self.sweep(ts);
            }
            if self.map.len() >= self.limits.max_flows {
                match self.limits.when_full {
                    WhenFull::Open => self.evict_oldest(),
                    WhenFull::Closed => {
                        self.stats.refused += 1;
                        return None;
                    }
                }
            }
        }
        let flow = Flow::new(self.next_id, key, p, ts);
        self.next_id += 1;
        self.stats.created += 1;
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(flow);
                i
            }
            None => {
                self.slots.push(Some(flow));
                self.slots.len() - 1
            }
        };
        self.map.insert(key, i);
        Some(i)
    }

    /// Finds or creates the packet's flow (`ts` in microseconds) and updates its TCP state.
    /// `None`: a new flow the full table refused (`WhenFull::Closed`).
    pub fn track(&mut self, p: &Packet<'_>, ts: u64) -> Option<Seen<'_, T>> {
        let key = FlowKey::of(p);
        if ts / 1_000_000 > self.last_sweep + 10 {
            self.sweep(ts);
        }
        let existing = self.map.get(&key).copied();
        if let (Some(i), Some(t)) = (existing, p.tcp) {
            let new_conn = t.syn
                && !t.ack_flag
                && self
                    .slots
                    .get(i)
                    .and_then(Option::as_ref)
                    .is_some_and(|f| f.client_isn != Some(t.seq));
            if new_conn {
                self.remove(&key);
                self.stats.reused += 1;
            }
        }
        // A key whose slot is empty would be a table bug; treat it as a new flow, not a panic.
        let live = self
            .map
            .get(&key)
            .copied()
            .filter(|&i| self.slots.get(i).is_some_and(Option::is_some));
        let idx = match live {
            Some(i) => i,
            None => self.insert_new(key, p, ts)?,
        };
        self.stats.active = self.map.len() as u64;
        let stream_stats = &mut self.stats.stream;
        let flow = self.slots[idx].get_or_insert_with(|| Flow::new(0, key, p, ts));
        let dir = usize::from((p.src, p.sport) != flow.client);
        flow.last_ts = ts;
        flow.packets[dir] += 1;
        flow.bytes[dir] += p.payload.len() as u64;
        if let Some(t) = p.tcp {
            if t.syn && !t.ack_flag && dir == 0 {
                flow.syn = true;
                flow.client_isn = Some(t.seq);
                flow.tcp[0].syn(t.seq);
            } else if t.syn && t.ack_flag && dir == 1 {
                flow.synack = true;
                flow.tcp[1].syn(t.seq);
            } else if t.ack_flag && dir == 0 && flow.syn && flow.synack {
                flow.established = true;
            } else if flow.packets[0] > 0 && flow.packets[1] > 0 && !flow.syn {
                // Picked up midstream: both sides talking counts as established.
                flow.established = true;
            }
            if t.fin || t.rst {
                flow.closing = true;
            }
        }
        Some(Seen {
            flow,
            dir,
            stream: stream_stats,
        })
    }

    /// Removes flows idle for longer than the timeout; returns them for final processing.
    pub fn sweep(&mut self, now: u64) -> usize {
        self.last_sweep = now / 1_000_000;
        let limit = self.limits.timeout_s * 1_000_000;
        let expired: Vec<FlowKey> = self
            .map
            .iter()
            .filter(|(_, &i)| {
                self.slots[i]
                    .as_ref()
                    .is_some_and(|f| now.saturating_sub(f.last_ts) > limit)
            })
            .map(|(k, _)| *k)
            .collect();
        for k in &expired {
            self.remove(k);
        }
        self.stats.expired += expired.len() as u64;
        expired.len()
    }

    fn evict_oldest(&mut self) {
        let n = self.slots.len();
        let oldest = if n <= 64 {
            self.slots
                .iter()
                .flatten()
                .min_by_key(|f| f.last_ts)
                .map(|f| f.key)
        } else {
            let mut best: Option<&Flow<T>> = None;
            for _ in 0..32 {
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                if let Some(f) = &self.slots[(self.rng % n as u64) as usize] {
                    if best.is_none_or(|b| f.last_ts < b.last_ts) {
                        best = Some(f);
                    }
                }
            }
            best.map(|f| f.key)
        };
        if let Some(k) = oldest {
            self.remove(&k);
            self.stats.evicted += 1;
        }
    }

    fn remove(&mut self, k: &FlowKey) {
        if let Some(i) = self.map.remove(k) {
            if let Some(f) = self.slots[i].as_mut() {
                for s in &mut f.tcp {
                    s.release(&mut self.stats.stream);
                }
                for dir in 0..2 {
                    if f.handed[dir] != Handed::Copied {
                        self.released.push(f.dir_tuple(dir));
                    }
                }
            }
            self.slots[i] = None;
            self.free.push(i);
        }
    }

    /// Visits every live flow (end of input).
    pub fn for_each(&mut self, mut f: impl FnMut(&mut Flow<T>)) {
        for flow in self.slots.iter_mut().flatten() {
            f(flow);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::TcpInfo;

    fn pkt(src: &str, sport: u16, dst: &str, dport: u16, tcp: Option<TcpInfo>) -> Packet<'static> {
        Packet {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: Proto::Tcp,
            sport,
            dport,
            tcp,
            payload: b"",
        }
    }

    fn flags(syn: bool, ack: bool) -> Option<TcpInfo> {
        Some(TcpInfo {
            seq: 1,
            ack: 0,
            syn,
            ack_flag: ack,
            fin: false,
            rst: false,
        })
    }

    #[test]
    fn both_directions_one_flow_and_handshake() {
        let mut t: FlowTable<()> = FlowTable::new(FlowLimits::default());
        let c = "10.0.1.1";
        let s = "10.0.2.2";
        let id = t
            .track(&pkt(c, 40000, s, 80, flags(true, false)), 1)
            .unwrap()
            .flow
            .id;
        let seen = t
            .track(&pkt(s, 80, c, 40000, flags(true, true)), 2)
            .unwrap();
        assert_eq!((seen.flow.id, seen.dir), (id, 1));
        assert!(!seen.flow.established);
        let seen = t
            .track(&pkt(c, 40000, s, 80, flags(false, true)), 3)
            .unwrap();
        assert!(seen.flow.established && seen.dir == 0);
        assert_eq!(t.len(), 1);
        // A retransmitted SYN stays in the flow; a SYN with a new ISN is a new connection.
        assert_eq!(
            t.track(&pkt(c, 40000, s, 80, flags(true, false)), 4)
                .unwrap()
                .flow
                .id,
            id
        );
        let mut again = flags(true, false);
        if let Some(x) = again.as_mut() {
            x.seq = 99;
        }
        assert_ne!(
            t.track(&pkt(c, 40000, s, 80, again), 5).unwrap().flow.id,
            id
        );
        assert_eq!(t.stats.reused, 1);
    }

    #[test]
    fn cap_evicts_the_oldest_and_timeouts_expire() {
        let mut t: FlowTable<()> = FlowTable::new(FlowLimits {
            max_flows: 2,
            timeout_s: 60,
            ..FlowLimits::default()
        });
        t.track(&pkt("10.0.0.1", 1, "10.0.0.9", 80, None), 1_000_000);
        t.track(&pkt("10.0.0.2", 1, "10.0.0.9", 80, None), 2_000_000);
        t.track(&pkt("10.0.0.3", 1, "10.0.0.9", 80, None), 3_000_000);
        assert_eq!((t.len(), t.stats.evicted), (2, 1));
        // The first flow was the one evicted: seeing it again creates a new flow.
        t.track(&pkt("10.0.0.1", 1, "10.0.0.9", 80, None), 4_000_000);
        assert_eq!(t.stats.created, 4);
        assert_eq!(t.sweep(200_000_000), 2);
        assert!(t.is_empty());
    }

    #[test]
    fn a_full_table_fails_open_or_closed_as_configured() {
        let flow = |i: u32| {
            pkt(
                &format!("10.1.{}.{}", i / 250, i % 250 + 1),
                1,
                "10.0.0.9",
                80,
                None,
            )
        };
        for when_full in [WhenFull::Open, WhenFull::Closed] {
            let mut t: FlowTable<()> = FlowTable::new(FlowLimits {
                max_flows: 1000,
                when_full,
                ..FlowLimits::default()
            });
            for i in 0..1000 {
                assert!(t.track(&flow(i), 1_000_000 + u64::from(i)).is_some());
            }
            // A flood of new flows in the same second.
            let taken = (1000..3000)
                .filter(|&i| t.track(&flow(i), 2_000_000 + u64::from(i)).is_some())
                .count();
            assert_eq!(t.len(), 1000);
            match when_full {
                WhenFull::Open => {
                    assert_eq!((taken, t.stats.evicted, t.stats.refused), (2000, 2000, 0));
                    // Sampled eviction took old flows, not the newest ones.
                    let created = t.stats.created;
                    for i in 2900..3000 {
                        t.track(&flow(i), 3_000_000 + u64::from(i));
                    }
                    assert!(
                        t.stats.created - created <= 10,
                        "the newest flows were evicted"
                    );
                }
                WhenFull::Closed => {
                    assert_eq!((taken, t.stats.evicted, t.stats.refused), (0, 0, 2000));
                    // The tracked flows keep their state.
                    assert!(t.track(&flow(999), 3_000_000).is_some());
                    assert_eq!(t.stats.created, 1000);
                }
            }
        }
    }
}
