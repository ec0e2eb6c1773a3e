//! The live data plane of `virtsecd`: inspection workers on every guest vif.
//!
//! The daemon calls [`DataPlane::sync`] with the inventory and the per-guest policy after every
//! reconcile pass: every vif in it (`vif<D>.<N>` or its `vifname`, and the HVM `-emu` twin)
//! gets workers in the guest's mode; a vif that left the inventory has its workers stopped.
//! XenStore shows a vif before netback creates its netdev, so a worker waits for the interface.
//!
//! - **passive** ([`passive`]): `workers_per_vif` threads, each with a TPACKET_V3 ring in one
//!   fanout group (flows spread by hash, each flow on one thread); nothing is added to the
//!   guest's path and verdicts act through kernel rules.
//! - **inline** ([`inline`]): one thread forwards between the vif and its inline port
//!   (`capture::inline`), with `PACKET_VNET_HDR` so offloads cross untouched; a frame waits
//!   for its verdict, `drop` rules drop, and overload is handled by the fail mode. Where the
//!   worker runs, beside the guest's frames while idle, is [`placement`]'s.
//!
//! Alerts are EVE lines with the guest's identity (`xen` object: domid, uuid, name, vif),
//! appended to the EVE file, logged, and kept (the last 1,000) for `virtsec alerts`. Per-vif
//! counters are lock-free atomics read by `virtsec status`. The behaviour detectors of a vif
//! are shared by its workers (a scan spreads over flows, so over fanout threads).

mod inline;
pub mod losses;
mod passive;
mod placement;

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::Serialize;

use crate::capture::bpf::{CaptureFilter, DirKey, KernelCounts};
use crate::config::{InlineConfig, Mode};
use crate::decode;
use crate::detect::behaviour::{Behaviour, BehaviourConfig};
use crate::detect::matcher::Backend;
use crate::detect::rules::Rule;
use crate::detect::Detector;
use crate::flow::{FlowLimits, Handed};
use crate::inspect::eve::{alert_value, XenIdentity};
use crate::inspect::{Engine, Verdict};
use crate::inventory::Guests;
use crate::policy::Policies;

/// Alerts kept in memory for `virtsec alerts`.
const RECENT: usize = 1000;

/// `VifCounters::worker_cpus` of a worker the scheduler places.
pub const UNPINNED: u32 = u32::MAX;

/// Counters of one vif's workers.
#[derive(Debug, Default)]
pub struct VifCounters {
    /// Frames seen, per worker (the vif's total is their sum: [`VifCounters::frames`]).
    pub worker_frames: Vec<AtomicU64>,
    pub bytes: AtomicU64,
    pub alerts: AtomicU64,
    /// Passive: frames the kernel had no room for in the worker's queue or ring (its count).
    pub capture_drops: AtomicU64,
    /// Inline: frames dropped by a `drop`/`reject` rule.
    pub verdict_drops: AtomicU64,
    /// Inline: the kernel forwards handed-over directions itself (`capture::bpf::FastPath`).
    pub fast_path: AtomicBool,
    /// Inline, per worker: the CPU `placement` pinned it to (beside its vif's frames or
    /// netback interrupt); [`UNPINNED`] while the scheduler places it.
    pub worker_cpus: Vec<AtomicU32>,
    /// Inline: frames forwarded uninspected because of overload (fail open).
    pub overload_bypassed: AtomicU64,
    /// Inline: frames dropped because of overload (fail closed), too long to read, or refused
    /// by the kernel on send.
    pub overload_drops: AtomicU64,
    pub truncated: AtomicU64,
    pub send_errors: AtomicU64,
    /// Inline: frames the kernel dropped before a worker read them, its ports' receive
    /// queues being full (`PACKET_STATISTICS`): the worker fell that far behind.
    pub queue_drops: AtomicU64,
    /// Inline: how long each forwarded frame waited for its verdict, from the kernel's
    /// receive timestamp to the worker handing it back to the kernel (the worker's wake-up,
    /// reading and inspection; not the forwarding after it).
    pub verdict_wait: crate::metrics::Histogram,
    /// Frames from another local guest, inspected at that guest's vif already.
    pub local: AtomicU64,
    /// Passive: frames the kernel copied headers-only (`capture::bpf`: another local guest's
    /// frame, or a bypassed direction past the stream depth).
    pub trimmed: AtomicU64,
    /// Passive: frames (and their bytes) the kernel counted without copying them
    /// (`capture::bpf`: segments of busy established flows that carry nothing to inspect).
    pub uncopied: AtomicU64,
    pub uncopied_bytes: AtomicU64,
    /// Flows tracked by the vif's workers (gauge, the sum of the workers' tables).
    pub flows: AtomicU64,
    /// Flows evicted because a worker's table was full (the flow-table cap at work).
    pub flows_evicted: AtomicU64,
    /// New flows refused because a worker's table was full (`flow_table_full = "closed"`).
    pub flows_refused: AtomicU64,
    /// When the last "flow table full" alert was raised for this vif (µs; one per 10 s).
    pub full_alerted_us: AtomicU64,
    /// Nanoseconds spent decoding and inspecting frames.
    pub inspect_ns: AtomicU64,
    pub attached: AtomicBool,
}

impl VifCounters {
    fn new(workers: usize) -> VifCounters {
        VifCounters {
            worker_frames: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            worker_cpus: (0..workers).map(|_| AtomicU32::new(UNPINNED)).collect(),
            ..VifCounters::default()
        }
    }

    /// Frames seen by all the vif's workers.
    pub fn frames(&self) -> u64 {
        self.worker_frames
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .sum()
    }

    /// Frames lost to inspection: a full queue or ring (passive); overload drops, full receive
    /// queues, frames too long to read and frames the kernel refused on send (inline). The
    /// one definition behind `virtsec status`'s LOST, the XenStore counters' `lost` and
    /// `virtsec_vif_drops_total`.
    pub fn lost(&self) -> u64 {
        [
            &self.capture_drops,
            &self.overload_drops,
            &self.queue_drops,
            &self.truncated,
            &self.send_errors,
        ]
        .iter()
        .map(|a| a.load(Ordering::Relaxed))
        .sum()
    }
}

/// Serialisable snapshot of [`VifCounters`].
#[derive(Clone, Debug, Serialize)]
pub struct VifStatus {
    pub domid: u32,
    pub mode: Mode,
    pub attached: bool,
    pub frames: u64,
    pub bytes: u64,
    pub alerts: u64,
    pub capture_drops: u64,
    /// Frames lost to inspection, all causes ([`VifCounters::lost`]).
    pub lost: u64,
    /// Frames copied headers-only by the kernel (their payload is inspected elsewhere or
    /// bypassed past the stream depth).
    pub trimmed: u64,
    /// Frames the kernel counted without copying (nothing in them to inspect here), and
    /// their bytes: the vif carried `frames + uncopied` frames.
    pub uncopied: u64,
    pub uncopied_bytes: u64,
    /// Frames per worker thread (the fanout's balance).
    pub workers: Vec<u64>,
    /// Flows tracked now and evicted so far (table full).
    pub flows: u64,
    pub flows_evicted: u64,
    pub flows_refused: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inline: Option<InlineStatus>,
}

/// Inline counters.
#[derive(Clone, Debug, Serialize)]
pub struct InlineStatus {
    /// Handed-over directions (past the stream depth, pure ACKs of busy connections) are
    /// forwarded by the kernel, counted in `uncopied`.
    pub fast_path: bool,
    pub verdict_drops: u64,
    pub overload_bypassed: u64,
    pub overload_drops: u64,
    /// Frames the kernel dropped before a worker read them (its receive queue was full).
    pub queue_drops: u64,
    pub truncated: u64,
    pub send_errors: u64,
    /// How long forwarded frames waited for their verdict (`VifCounters::verdict_wait`).
    pub verdict_wait_us: WaitStatus,
    /// Per worker, the CPU `placement` pinned it to (beside its vif's frames or netback
    /// interrupt); `null`: placed by the scheduler.
    pub worker_cpus: Vec<Option<u32>>,
}

/// A summary of a latency histogram, in microseconds (quantiles to the precision of
/// `metrics::BUCKETS_US`); `None` before the first frame.
#[derive(Clone, Debug, Serialize)]
pub struct WaitStatus {
    pub frames: u64,
    pub mean: Option<f64>,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

impl From<&crate::metrics::HistogramSnapshot> for WaitStatus {
    fn from(h: &crate::metrics::HistogramSnapshot) -> WaitStatus {
        let round = |x: Option<f64>| x.map(|v| (v * 10.0).round() / 10.0);
        WaitStatus {
            frames: h.count(),
            mean: round(h.mean_us()),
            p50: round(h.quantile_us(0.5)),
            p99: round(h.quantile_us(0.99)),
        }
    }
}

/// Why a worker is asked to stop.
const RUN: u8 = 0;
/// The vif left the inventory or changed mode: undo what was done to it.
const DETACH: u8 = 1;
/// The service is stopping: inline vifs follow the fail mode.
const SHUTDOWN: u8 = 2;

/// Alerts shared between workers and the control socket.
#[derive(Default)]
pub struct AlertLog {
    pub total: u64,
    pub recent: VecDeque<(u64, serde_json::Value)>,
    /// Alerts per (gid, sid) since start.
    pub by_sid: BTreeMap<(u32, u32), u64>,
}

/// Hands alerts to the daemon's loop (the quarantine policy) and wakes it.
pub struct AlertSink {
    tx: Mutex<std::sync::mpsc::Sender<crate::quarantine::AlertEvent>>,
    waker: Arc<mio::Waker>,
}

impl AlertSink {
    pub fn new(
        tx: std::sync::mpsc::Sender<crate::quarantine::AlertEvent>,
        waker: Arc<mio::Waker>,
    ) -> AlertSink {
        AlertSink {
            tx: Mutex::new(tx),
            waker,
        }
    }

    fn send(&self, ev: crate::quarantine::AlertEvent) {
        if let Ok(tx) = self.tx.lock() {
            if tx.send(ev).is_ok() {
                let _ = self.waker.wake();
            }
        }
    }
}

/// Where alerts go: shared by every worker.
struct Outputs {
    eve: Option<Mutex<std::fs::File>>,
    log: Mutex<AlertLog>,
    sink: Option<AlertSink>,
}

/// What the workers of one vif share.
struct VifShared {
    ifname: String,
    /// MACs of the local guests whose vifs are inspected (empty unless `dedupe_local`).
    local_macs: Arc<std::sync::RwLock<std::collections::HashSet<[u8; 6]>>>,
    counters: VifCounters,
    /// The kernel-side capture filter (passive workers attach it to their rings).
    filter: Option<Arc<CaptureFilter>>,
    ident: Mutex<XenIdentity>,
    behaviour: Mutex<Behaviour>,
    out: Arc<Outputs>,
    stop: AtomicU8,
    /// Engines built with reloaded rules, one per worker, taken between frames.
    next: Mutex<Vec<Option<Engine>>>,
    /// Bumped when an operator releases the guest from quarantine: its workers forget which
    /// rules their flows already alerted on, so a connection that goes on attacking alerts
    /// (and is quarantined by policy) again.
    released: AtomicU64,
}

impl VifShared {
    /// A reloaded engine for worker `i`, if one is waiting.
    fn take_next(&self, i: usize) -> Option<Engine> {
        self.next.lock().ok()?.get_mut(i)?.take()
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed) != RUN
    }

    /// Emits a finding that belongs to the guest rather than to a flow (behaviour detectors,
    /// a full flow table), named by the endpoints of the frame that triggered it.
    fn emit_finding(
        &self,
        ts_us: u64,
        ((src, sport), (dst, dport)): crate::flow::DirTuple,
        proto: decode::Proto,
        r: &Rule,
    ) {
        let a = crate::inspect::Alert {
            ts_us,
            flow_id: 0,
            rule: 0,
            src,
            sport,
            dst,
            dport,
            proto,
            to_server: true,
        };
        self.emit(&a, r);
    }

    fn emit(&self, a: &crate::inspect::Alert, r: &Rule) {
        self.counters.alerts.fetch_add(1, Ordering::Relaxed);
        let id = self.ident.lock().map(|i| i.clone()).unwrap_or_default();
        let v = alert_value(a, r, Some(&id));
        log::warn!(
            target: "virtsec::event::alert",
            gid = r.gid,
            sid = r.sid,
            rev = r.rev,
            domid = id.domid,
            uuid = id.uuid.as_deref().unwrap_or("-"),
            name = id.name.as_deref().unwrap_or("-"),
            vif = id.vif.as_str(),
            src = a.src.to_string().as_str(),
            dst = a.dst.to_string().as_str();
            "alert [{}:{}:{}] {} from domain {} ({}) on {}: {}:{} -> {}:{}",
            r.gid,
            r.sid,
            r.rev,
            r.msg,
            id.domid,
            id.name.as_deref().unwrap_or("?"),
            id.vif,
            a.src,
            a.sport,
            a.dst,
            a.dport
        );
        if let Some(f) = &self.out.eve {
            if let Ok(mut f) = f.lock() {
                let mut line = serde_json::to_vec(&v).unwrap_or_default();
                line.push(b'\n');
                if let Err(e) = f.write_all(&line) {
                    log::error!("cannot write the EVE file: {e}");
                }
            }
        }
        if let Some(sink) = &self.out.sink {
            sink.send(crate::quarantine::AlertEvent {
                domid: id.domid,
                uuid: id.uuid.clone(),
                gid: r.gid,
                sid: r.sid,
                priority: r.priority,
                msg: r.msg.clone(),
            });
        }
        if let Ok(mut l) = self.out.log.lock() {
            *l.by_sid.entry((r.gid, r.sid)).or_insert(0) += 1;
            l.total += 1;
            let seq = l.total;
            l.recent.push_back((seq, v));
            if l.recent.len() > RECENT {
                l.recent.pop_front();
            }
        }
    }
}

/// One worker thread's inspection state: its own flow table, the vif's shared detectors.
struct Inspector {
    engine: Engine,
    vif: Arc<VifShared>,
    /// This worker's index among the vif's workers.
    index: usize,
    /// What this worker last added to the vif's flow gauges (flows, evicted).
    reported: (u64, u64),
    /// The capture filter this worker's sockets have: bypassed directions are handed to it.
    trim: Option<Trim>,
    /// Worker 0 with a filter: what the kernel had counted at the last read (on the vif, on
    /// the inline port), and when.
    counted: ([KernelCounts; 2], Option<std::time::Instant>),
    /// The vif's `released` count this worker has acted on.
    released: u64,
}

/// Where a worker's handovers go: the filter, the vif's interface index and, inline, the
/// inline port's (a direction is handed over on both: the kernel forwards it either way).
struct Trim {
    filter: Arc<CaptureFilter>,
    ifindex: u32,
    port: Option<u32>,
}

impl Trim {
    /// The vif's interface index, then the inline port's.
    fn ifindexes(&self) -> impl Iterator<Item = u32> {
        std::iter::once(self.ifindex).chain(self.port)
    }

    fn keys(&self, t: crate::flow::DirTuple) -> impl Iterator<Item = DirKey> + '_ {
        self.ifindexes().map(move |i| DirKey::new(i, t))
    }
}

impl Inspector {
    fn new(
        rules: &[Rule],
        backend: Backend,
        limits: FlowLimits,
        vif: Arc<VifShared>,
    ) -> Option<Inspector> {
        match Detector::new(rules.to_vec(), backend) {
            Ok(d) => Some(Inspector {
                engine: Engine::new(d, limits),
                released: vif.released.load(Ordering::Relaxed),
                vif,
                index: 0,
                reported: (0, 0),
                trim: None,
                counted: (Default::default(), None),
            }),
            Err(e) => {
                log::error!("{}: cannot build the matcher: {e}", vif.ifname);
                None
            }
        }
    }

    /// Switches to an engine with reloaded rules if one is waiting (between frames: the swap
    /// is atomic for the traffic; flows restart their stream state).
    fn maybe_reload(&mut self) {
        if let Some(e) = self.vif.take_next(self.index) {
            let mut old = std::mem::replace(&mut self.engine, e);
            // The new engine starts its flows afresh: it must see their payload again.
            restore_bypassed(&self.trim, &mut old);
            self.arm_engine();
        }
        let released = self.vif.released.load(Ordering::Relaxed);
        if released != self.released {
            self.released = released;
            self.engine.forget_alerts();
        }
        // Flow-table use and evictions, as deltas so a vif's workers add up.
        let c = &self.vif.counters;
        let (flows, evicted) = (
            self.engine.flows.len() as u64,
            self.engine.flow_stats().evicted,
        );
        let (f0, e0) = self.reported;
        if flows >= f0 {
            c.flows.fetch_add(flows - f0, Ordering::Relaxed);
        } else {
            c.flows.fetch_sub(f0 - flows, Ordering::Relaxed);
        }
        c.flows_evicted
            .fetch_add(evicted.saturating_sub(e0), Ordering::Relaxed);
        self.reported = (flows, evicted);
    }

    /// Uses the kernel-side capture filter attached to the sockets on interface `ifindex`
    /// (and, inline, on the inline port `port`, with the fast path forwarding what it does
    /// not copy): directions past the stream depth (when not inspected there), and in passive
    /// mode the pure ACKs of busy connections, are handed to the kernel.
    fn use_filter(&mut self, filter: Arc<CaptureFilter>, ifindex: u32, port: Option<u32>) {
        let trim = Trim {
            filter,
            ifindex,
            port,
        };
        // One worker per vif has the kernel count its frames (the count is per interface).
        if self.index == 0 {
            for i in trim.ifindexes() {
                if let Err(e) = trim.filter.watch(i) {
                    log::warn!(
                        "{}: capture filter cannot count frames, copying them all: {e}",
                        self.vif.ifname
                    );
                }
            }
        }
        self.trim = Some(trim);
        self.arm_engine();
    }

    /// Has the engine record its handovers when there is a filter to pass them to: whole
    /// directions, and in passive mode (no inline port) segments without payload too.
    fn arm_engine(&mut self) {
        if let Some(trim) = &self.trim {
            self.engine.bypass = Some(Vec::new());
            self.engine.hand_empty = trim.port.is_none();
        }
    }

    /// Worker 0: adds what the kernel counted without copying since the last read (at most
    /// ten reads a second) to the vif's counters, and the guest's frames among them to its
    /// packet-flood detector.
    fn poll_counts(&mut self) {
        let Some(trim) = &self.trim else {
            return;
        };
        let now = std::time::Instant::now();
        if self.index != 0
            || self
                .counted
                .1
                .is_some_and(|t| now.duration_since(t) < std::time::Duration::from_millis(100))
        {
            return;
        }
        self.counted.1 = Some(now);
        let c = &self.vif.counters;
        let mut from = 0;
        for (n, i) in trim.ifindexes().enumerate() {
            let Some(k) = trim.filter.counts(i) else {
                continue;
            };
            let last = std::mem::replace(&mut self.counted.0[n], k);
            let got = k.from_guest_frames.saturating_sub(last.from_guest_frames);
            let frames = got + k.to_guest_frames.saturating_sub(last.to_guest_frames);
            let bytes = (k.from_guest_bytes + k.to_guest_bytes)
                .saturating_sub(last.from_guest_bytes + last.to_guest_bytes);
            c.uncopied.fetch_add(frames, Ordering::Relaxed);
            c.uncopied_bytes.fetch_add(bytes, Ordering::Relaxed);
            // What arrives on the inline port comes from the bridge, towards the guest.
            if n == 0 {
                from = got;
            }
        }
        if from == 0 {
            return;
        }
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let (findings, last) = match self.vif.behaviour.lock() {
            Ok(mut b) => {
                let w = b.window_s();
                let f: Vec<_> = b
                    .on_uncopied(from, ts)
                    .into_iter()
                    .map(|f| f.rule(w))
                    .collect();
                (f, b.last_tcp())
            }
            Err(_) => return,
        };
        // Named by the guest's last TCP segment (the counted frames are TCP segments of its
        // busy connections); the guest's identity is in the alert either way.
        let unspecified = (IpAddr::from([0u8, 0, 0, 0]), 0);
        let ends = last.unwrap_or((unspecified, unspecified));
        for rule in findings {
            self.vif.emit_finding(ts, ends, decode::Proto::Tcp, &rule);
        }
    }

    /// Passes the engine's handovers to the kernel and takes back those of flows gone.
    fn sync_filter(&mut self) {
        let Some(trim) = &self.trim else {
            return;
        };
        let f = &trim.filter;
        if let Some(new) = self.engine.bypass.as_mut() {
            for (t, h) in new.drain(..) {
                for k in trim.keys(t) {
                    match h {
                        // A full map is counted by the filter; the direction stays copied.
                        Handed::All | Handed::Empty => {
                            f.bypass(&k, h == Handed::All);
                        }
                        Handed::Copied => f.restore(&k),
                    }
                }
            }
        }
        for t in self.engine.flows.released.drain(..) {
            for k in trim.keys(t) {
                f.restore(&k);
            }
        }
    }

    /// Has the kernel copy every direction this worker handed over again (and, worker 0,
    /// stop counting on the interface).
    fn restore_all(&mut self) {
        restore_bypassed(&self.trim, &mut self.engine);
        if self.index == 0 {
            self.counted.1 = None;
            self.poll_counts();
            if let Some(trim) = &self.trim {
                for i in trim.ifindexes() {
                    trim.filter.unwatch(i);
                }
            }
        }
    }

    /// Inspects one Ethernet frame. `from_guest`: sent by the guest (received on the vif).
    /// `trimmed`: the kernel copied its headers only (`capture::bpf`).
    fn frame(&mut self, data: &[u8], ts_ns: u64, from_guest: bool, trimmed: bool) -> Verdict {
        let t = std::time::Instant::now();
        let v = self.frame_inner(data, ts_ns, from_guest, trimmed);
        self.vif
            .counters
            .inspect_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        v
    }

    fn frame_inner(&mut self, data: &[u8], ts_ns: u64, from_guest: bool, trimmed: bool) -> Verdict {
        let c = &self.vif.counters;
        if let Some(w) = c.worker_frames.get(self.index) {
            w.fetch_add(1, Ordering::Relaxed);
        }
        c.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        let decoded = if trimmed {
            c.trimmed.fetch_add(1, Ordering::Relaxed);
            // Headers only: flow state and behaviour follow it, payload inspection does not
            // (an empty payload), as the filter only trims what is inspected elsewhere or
            // bypassed.
            decode::decode_ethernet_headers(data, &mut self.engine.decode)
        } else {
            decode::decode_ethernet(data, &mut self.engine.decode)
        };
        let Ok(p) = decoded else {
            return Verdict::Pass;
        };
        let ts = ts_ns / 1000;
        if !from_guest && self.already_inspected(data) {
            // Flow state still follows it (the handshake makes `established`); the payload
            // was inspected at the sender's vif.
            c.local.fetch_add(1, Ordering::Relaxed);
            self.engine.track(&p, ts);
            return Verdict::Pass;
        }
        if from_guest {
            let findings = match self.vif.behaviour.lock() {
                Ok(mut b) => {
                    let w = b.window_s();
                    b.on_packet(&p, ts)
                        .into_iter()
                        .map(|f| f.rule(w))
                        .collect::<Vec<_>>()
                }
                Err(_) => Vec::new(),
            };
            for rule in findings {
                self.vif
                    .emit_finding(ts, ((p.src, p.sport), (p.dst, p.dport)), p.proto, &rule);
            }
        }
        let vif = &self.vif;
        let refused = self.engine.flows.stats.refused;
        let v = self.engine.packet(&p, ts, &mut |a, r| vif.emit(a, r));
        if self.engine.flows.stats.refused > refused {
            self.flow_refused(&p, ts);
        }
        v
    }

    /// A new flow the full table refused (`flow_table_full = "closed"`): counted, and an
    /// alert naming the guest at most every 10 s per vif (the quarantine ladder can act on it).
    fn flow_refused(&self, p: &decode::Packet<'_>, ts_us: u64) {
        let c = &self.vif.counters;
        c.flows_refused.fetch_add(1, Ordering::Relaxed);
        let last = c.full_alerted_us.load(Ordering::Relaxed);
        if last != 0 && ts_us.saturating_sub(last) < 10_000_000 {
            return;
        }
        if c.full_alerted_us
            .compare_exchange(last, ts_us.max(1), Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let rule = crate::detect::behaviour::Finding::FlowTableFull {
            refused: c.flows_refused.load(Ordering::Relaxed),
        }
        .rule(10);
        self.vif
            .emit_finding(ts_us, ((p.src, p.sport), (p.dst, p.dport)), p.proto, &rule);
    }

    /// A frame towards this guest from another local guest was inspected when it left that
    /// guest's vif (its source MAC is enforced by anti-spoofing): inspecting it again here
    /// would double the cost of guest-to-guest traffic for nothing.
    fn already_inspected(&self, data: &[u8]) -> bool {
        let Some(src) = data.get(6..12) else {
            return false;
        };
        let mut mac = [0u8; 6];
        mac.copy_from_slice(src);
        self.vif
            .local_macs
            .read()
            .map(|m| m.contains(&mac))
            .unwrap_or(false)
    }
}

/// Has the kernel copy every direction `engine` bypassed whole again.
fn restore_bypassed(trim: &Option<Trim>, engine: &mut Engine) {
    if let Some(trim) = trim {
        for t in engine.take_bypassed() {
            for k in trim.keys(t) {
                trim.filter.restore(&k);
            }
        }
    }
}

struct Worker {
    mode: Mode,
    shared: Arc<VifShared>,
    handles: Vec<JoinHandle<()>>,
}

impl Worker {
    fn stop(mut self, why: u8) {
        self.shared.stop.store(why, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// Options of the data plane (from `[inspect]` and `[behaviour]`).
#[derive(Clone, Debug)]
pub struct DataPlaneOptions {
    pub rules: Vec<PathBuf>,
    pub eve: Option<PathBuf>,
    pub backend: Backend,
    pub behaviour: BehaviourConfig,
    pub workers_per_vif: usize,
    pub inline: InlineConfig,
    /// How passive workers read their vif (`[inspect] capture`).
    pub capture: crate::capture::SourceKind,
    /// The ring's size, or the most the queue holds, per passive worker, MiB (`[inspect]
    /// ring_mib` or `queue_mib`, whichever `capture` uses).
    pub capture_mib: usize,
    /// Passive ring block timeout, ms (`[inspect] block_timeout_ms`).
    pub block_timeout_ms: u32,
    /// Flows one worker tracks.
    pub max_flows: usize,
    /// What a worker's full flow table does with a new flow.
    pub flow_table_full: crate::flow::WhenFull,
    /// See `[inspect] inspect_past_depth`.
    pub inspect_past_depth: bool,
    /// Inspect guest-to-guest frames once, at the sending guest's vif (needs anti-spoofing:
    /// only then is a frame's source MAC proof of which local guest sent it).
    pub dedupe_local: bool,
}

/// The workers.
pub struct DataPlane {
    rules: Arc<Vec<Rule>>,
    opts: DataPlaneOptions,
    out: Arc<Outputs>,
    workers: BTreeMap<String, Worker>,
    fanout_seq: u16,
    local_macs: Arc<std::sync::RwLock<std::collections::HashSet<[u8; 6]>>>,
    /// The kernel-side capture filter, when the kernel took it (`capture::bpf`).
    filter: Result<Arc<CaptureFilter>, String>,
}

/// Whether passive capture is trimmed in the kernel, and the filter's counters.
#[derive(Clone, Debug, Serialize)]
pub struct FilterStatus {
    pub loaded: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Connection directions handed to the kernel to trim, given back, refused (map full).
    pub bypassed: u64,
    pub restored: u64,
    pub map_full: u64,
}

/// Errors setting up the data plane.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error(transparent)]
    Rules(#[from] crate::inspect::InspectError),
    #[error("cannot open the EVE file {path}: {source}")]
    Eve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DataPlane {
    /// Loads the rules (skipped ones are logged) and opens the EVE file for appending.
    pub fn new(
        opts: DataPlaneOptions,
        sink: Option<AlertSink>,
    ) -> Result<DataPlane, DataPlaneError> {
        let rs = crate::inspect::load_rules(&opts.rules)?;
        for w in &rs.skipped {
            log::warn!("{w}");
        }
        log::info!("inspection: {}", rs.summary());
        // Loaded in every configuration: besides frames inspected elsewhere (anti-spoofing
        // on) and directions past the stream depth (`inspect_past_depth = false`), it counts
        // the pure ACKs of every busy established connection instead of copying them, which
        // is about half the frames of a bulk transfer. Room for every flow direction of every
        // worker is not needed: a direction that does not fit stays copied whole (counted).
        let filter = CaptureFilter::load(1 << 16)
            .map(Arc::new)
            .map_err(|e| e.to_string());
        match &filter {
            Ok(_) => log::info!("capture: kernel-side trimming filter loaded"),
            Err(e) => log::warn!("capture: {e}"),
        }
        let eve = match &opts.eve {
            Some(p) => {
                if let Some(d) = p.parent() {
                    let _ = std::fs::create_dir_all(d);
                }
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| DataPlaneError::Eve {
                        path: p.clone(),
                        source,
                    })?;
                Some(Mutex::new(f))
            }
            None => None,
        };
        Ok(DataPlane {
            rules: Arc::new(rs.rules),
            opts,
            out: Arc::new(Outputs {
                eve,
                log: Mutex::new(AlertLog::default()),
                sink,
            }),
            workers: BTreeMap::new(),
            fanout_seq: 0,
            local_macs: Default::default(),
            filter,
        })
    }

    /// Attaches workers to every vif of `guests` in its guest's mode and stops the workers of
    /// vifs gone (or whose mode changed).
    pub fn sync(&mut self, guests: &Guests, policies: &Policies) {
        let mut want: BTreeMap<String, (XenIdentity, Mode)> = BTreeMap::new();
        if self.opts.dedupe_local {
            let macs = guests
                .values()
                .flat_map(|g| g.vifs.values().filter_map(|v| v.mac.map(|m| m.0)))
                .collect();
            if let Ok(f) = &self.filter {
                f.set_local_macs(&macs);
            }
            if let Ok(mut m) = self.local_macs.write() {
                *m = macs;
            }
        }
        for g in guests.values() {
            let mode = policies.of(g).mode;
            for v in g.vifs.values() {
                let mut names = vec![v.ifname.clone()];
                names.extend(v.emu_ifname.clone());
                for n in names {
                    let ident = XenIdentity {
                        domid: g.domid,
                        uuid: g.uuid.clone(),
                        name: g.name.clone(),
                        vif: n.clone(),
                    };
                    want.insert(n, (ident, mode));
                }
            }
        }
        let gone: Vec<String> = self
            .workers
            .iter()
            .filter(|(k, w)| want.get(*k).is_none_or(|(_, m)| *m != w.mode))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            if let Some(w) = self.workers.remove(&k) {
                w.stop(DETACH);
                log::info!("{k}: inspection detached");
            }
        }
        for (ifname, (ident, mode)) in want {
            if let Some(w) = self.workers.get(&ifname) {
                if let Ok(mut cur) = w.shared.ident.lock() {
                    if *cur != ident {
                        // A new VM reusing the domid (or a rename): alerts name the new one.
                        *cur = ident;
                    }
                }
                continue;
            }
            let w = self.spawn(ifname.clone(), ident, mode);
            self.workers.insert(ifname, w);
        }
    }

    fn spawn(&mut self, ifname: String, ident: XenIdentity, mode: Mode) -> Worker {
        let nworkers = self.opts.workers_per_vif.max(1);
        let shared = Arc::new(VifShared {
            next: Mutex::new((0..nworkers).map(|_| None).collect()),
            ifname: ifname.clone(),
            local_macs: self.local_macs.clone(),
            counters: VifCounters::new(nworkers),
            filter: self.filter.as_ref().ok().cloned(),
            ident: Mutex::new(ident),
            behaviour: Mutex::new(Behaviour::new(self.opts.behaviour.clone())),
            out: self.out.clone(),
            stop: AtomicU8::new(RUN),
            released: AtomicU64::new(0),
        });
        let mut handles = Vec::new();
        match mode {
            Mode::Passive => {
                let n = self.opts.workers_per_vif.max(1);
                // One fanout group per vif (ids are per network namespace).
                self.fanout_seq = self.fanout_seq.wrapping_add(1);
                let group = (n > 1).then_some(self.fanout_seq);
                let ring = passive::CaptureOptions {
                    kind: self.opts.capture,
                    mib: self.opts.capture_mib,
                    block_ms: self.opts.block_timeout_ms,
                };
                let past = self.flow_limits();
                for i in 0..n {
                    let (rules, backend, sh) =
                        (self.rules.clone(), self.opts.backend, shared.clone());
                    let h = std::thread::Builder::new()
                        .name(format!("vif {ifname}/{i}"))
                        .spawn(move || {
                            if let Some(mut ins) = Inspector::new(&rules, backend, past, sh) {
                                ins.index = i;
                                passive::run(ins, group, ring);
                            }
                        });
                    match h {
                        Ok(h) => handles.push(h),
                        Err(e) => log::error!("{ifname}: cannot start a worker: {e}"),
                    }
                }
            }
            Mode::Inline => {
                let past = self.flow_limits();
                let (rules, backend, sh, cfg) = (
                    self.rules.clone(),
                    self.opts.backend,
                    shared.clone(),
                    self.opts.inline.clone(),
                );
                // Two fanout groups: the vif side and the inline port side.
                self.fanout_seq = self.fanout_seq.wrapping_add(2);
                let groups = (self.fanout_seq.wrapping_sub(1), self.fanout_seq);
                let h = std::thread::Builder::new()
                    .name(format!("vif {ifname} inline"))
                    .spawn(move || {
                        let mut all = Vec::with_capacity(nworkers);
                        for i in 0..nworkers {
                            match Inspector::new(&rules, backend, past, sh.clone()) {
                                Some(mut ins) => {
                                    ins.index = i;
                                    all.push(ins);
                                }
                                None => return,
                            }
                        }
                        inline::run(all, &cfg, groups);
                    });
                match h {
                    Ok(h) => handles.push(h),
                    Err(e) => log::error!("{ifname}: cannot start a worker: {e}"),
                }
            }
        }
        Worker {
            mode,
            shared,
            handles,
        }
    }

    fn flow_limits(&self) -> FlowLimits {
        let mut limits = FlowLimits {
            max_flows: self.opts.max_flows,
            when_full: self.opts.flow_table_full,
            ..FlowLimits::default()
        };
        limits.stream.inspect_past_depth = self.opts.inspect_past_depth;
        limits
    }

    /// Reloads the rule files: parsed and compiled here, off the packet path; on success
    /// every worker switches to its new engine between two frames; on failure nothing
    /// changes and the error says why. Returns the new rule set's summary.
    pub fn reload_rules(&mut self) -> Result<String, String> {
        let rs = crate::inspect::load_rules(&self.opts.rules).map_err(|e| e.to_string())?;
        for w in &rs.skipped {
            log::warn!("{w}");
        }
        let summary = rs.summary();
        let limits = self.flow_limits();
        let build = || -> Result<Engine, String> {
            Detector::new(rs.rules.clone(), self.opts.backend)
                .map(|d| Engine::new(d, limits))
                .map_err(|e| format!("the new rules do not compile: {e}"))
        };
        // One engine per worker, all built before any is handed over.
        let mut staged = Vec::new();
        for w in self.workers.values() {
            let n = w.shared.next.lock().map(|v| v.len()).unwrap_or(0);
            let mut engines = Vec::with_capacity(n);
            for _ in 0..n {
                engines.push(Some(build()?));
            }
            staged.push((w.shared.clone(), engines));
        }
        if self.workers.is_empty() {
            build()?;
        }
        for (sh, engines) in staged {
            if let Ok(mut slot) = sh.next.lock() {
                *slot = engines;
            }
        }
        self.rules = Arc::new(rs.rules);
        log::info!("rules reloaded: {summary}");
        Ok(summary)
    }

    /// Reopens the EVE file (after logrotate moved it).
    pub fn reopen_eve(&self) {
        let (Some(path), Some(eve)) = (&self.opts.eve, &self.out.eve) else {
            return;
        };
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => {
                if let Ok(mut cur) = eve.lock() {
                    *cur = f;
                }
            }
            Err(e) => log::error!("cannot reopen the EVE file {}: {e}", path.display()),
        }
    }

    /// Whether `ifname` has workers inspecting it.
    pub fn attached(&self, ifname: &str) -> bool {
        self.workers
            .get(ifname)
            .is_some_and(|w| w.shared.counters.attached.load(Ordering::Relaxed))
    }

    /// Writes the data plane's Prometheus families.
    pub fn metrics(&self, e: &mut crate::metrics::Exposition) {
        type Get = fn(&VifCounters) -> u64;
        let fams: [(&str, &str, &str, Get); 10] = [
            ("virtsec_vif_frames_total", "counter", "Frames seen on a vif.", |c| c.frames()),
            ("virtsec_vif_bytes_total", "counter", "Bytes seen on a vif.", |c| c.bytes.load(Ordering::Relaxed)),
            ("virtsec_vif_uncopied_frames_total", "counter", "Frames the capture filter counted on a vif without copying them (nothing in them to inspect there).", |c| c.uncopied.load(Ordering::Relaxed)),
            ("virtsec_vif_uncopied_bytes_total", "counter", "Bytes of the frames counted without copying.", |c| c.uncopied_bytes.load(Ordering::Relaxed)),
            ("virtsec_vif_drops_total", "counter", "Frames lost to inspection on a vif: ring overflow (passive), overload/truncation/send errors (inline).", |c| c.lost()),
            ("virtsec_vif_verdict_drops_total", "counter", "Frames dropped inline by drop/reject rules.", |c| c.verdict_drops.load(Ordering::Relaxed)),
            ("virtsec_vif_flows", "gauge", "Flows tracked for a vif (flow table use).", |c| c.flows.load(Ordering::Relaxed)),
            ("virtsec_vif_flows_evicted_total", "counter", "Flows evicted because the flow table was full.", |c| c.flows_evicted.load(Ordering::Relaxed)),
            ("virtsec_vif_flows_refused_total", "counter", "New flows refused because the flow table was full (flow_table_full = closed).", |c| c.flows_refused.load(Ordering::Relaxed)),
            ("virtsec_vif_alerts_total", "counter", "Alerts raised on a vif.", |c| c.alerts.load(Ordering::Relaxed)),
        ];
        for (name, kind, help, get) in fams {
            e.family(name, kind, help);
            for (ifname, w) in &self.workers {
                let dom = w
                    .shared
                    .ident
                    .lock()
                    .map(|i| i.domid)
                    .unwrap_or(0)
                    .to_string();
                e.sample(
                    name,
                    &[("vif", ifname), ("domid", &dom)],
                    get(&w.shared.counters) as f64,
                );
            }
        }
        e.family(
            "virtsec_matcher_seconds_total",
            "counter",
            "Time spent decoding and inspecting frames, per vif.",
        );
        for (ifname, w) in &self.workers {
            let ns = w.shared.counters.inspect_ns.load(Ordering::Relaxed);
            e.sample(
                "virtsec_matcher_seconds_total",
                &[("vif", ifname)],
                ns as f64 / 1e9,
            );
        }
        e.family(
            "virtsec_inline_verdict_wait_seconds",
            "histogram",
            "How long an inline vif's forwarded frames waited for their verdict (kernel receive to hand-back).",
        );
        for (ifname, w) in &self.workers {
            if w.mode == Mode::Inline {
                e.histogram(
                    "virtsec_inline_verdict_wait_seconds",
                    &[("vif", ifname)],
                    &w.shared.counters.verdict_wait.snapshot(),
                );
            }
        }
        e.family("virtsec_alerts_total", "counter", "Alerts by rule.");
        if let Ok(l) = self.out.log.lock() {
            for ((gid, sid), n) in &l.by_sid {
                e.sample(
                    "virtsec_alerts_total",
                    &[("gid", &gid.to_string()), ("sid", &sid.to_string())],
                    *n as f64,
                );
            }
        }
    }

    /// The kernel-side capture filter's state.
    pub fn filter_status(&self) -> FilterStatus {
        match &self.filter {
            Ok(f) => FilterStatus {
                loaded: true,
                error: None,
                bypassed: f.stats.bypassed.load(Ordering::Relaxed),
                restored: f.stats.restored.load(Ordering::Relaxed),
                map_full: f.stats.map_full.load(Ordering::Relaxed),
            },
            Err(e) => FilterStatus {
                loaded: false,
                error: Some(e.clone()),
                bypassed: 0,
                restored: 0,
                map_full: 0,
            },
        }
    }

    /// Per-vif counters.
    pub fn status(&self) -> BTreeMap<String, VifStatus> {
        self.workers
            .iter()
            .map(|(k, w)| {
                let c = &w.shared.counters;
                let domid = w.shared.ident.lock().map(|i| i.domid).unwrap_or(0);
                let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
                (
                    k.clone(),
                    VifStatus {
                        domid,
                        mode: w.mode,
                        attached: c.attached.load(Ordering::Relaxed),
                        frames: c.frames(),
                        bytes: ld(&c.bytes),
                        alerts: ld(&c.alerts),
                        capture_drops: ld(&c.capture_drops),
                        lost: c.lost(),
                        trimmed: ld(&c.trimmed),
                        uncopied: ld(&c.uncopied),
                        uncopied_bytes: ld(&c.uncopied_bytes),
                        workers: c.worker_frames.iter().map(ld).collect(),
                        flows: ld(&c.flows),
                        flows_evicted: ld(&c.flows_evicted),
                        flows_refused: ld(&c.flows_refused),
                        inline: (w.mode == Mode::Inline).then(|| InlineStatus {
                            fast_path: c.fast_path.load(Ordering::Relaxed),
                            verdict_drops: ld(&c.verdict_drops),
                            overload_bypassed: ld(&c.overload_bypassed),
                            overload_drops: ld(&c.overload_drops),
                            queue_drops: ld(&c.queue_drops),
                            truncated: ld(&c.truncated),
                            send_errors: ld(&c.send_errors),
                            verdict_wait_us: (&c.verdict_wait.snapshot()).into(),
                            worker_cpus: c
                                .worker_cpus
                                .iter()
                                .map(|w| Some(w.load(Ordering::Relaxed)).filter(|&c| c != UNPINNED))
                                .collect(),
                        }),
                    },
                )
            })
            .collect()
    }

    /// The guest of vif `ifname` was released from quarantine: its workers forget what their
    /// flows alerted on (before their next frames).
    pub fn released(&self, ifname: &str) {
        if let Some(w) = self.workers.get(ifname) {
            w.shared.released.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Alerts with a sequence number above `after`, oldest first, and the total so far.
    pub fn alerts_after(&self, after: u64) -> (u64, Vec<serde_json::Value>) {
        match self.out.log.lock() {
            Ok(l) => (
                l.total,
                l.recent
                    .iter()
                    .filter(|(s, _)| *s > after)
                    .map(|(_, v)| v.clone())
                    .collect(),
            ),
            Err(_) => (0, Vec::new()),
        }
    }

    /// Stops every worker; inline vifs follow the fail mode.
    pub fn shutdown(&mut self) {
        for w in self.workers.values() {
            w.shared.stop.store(SHUTDOWN, Ordering::Relaxed);
        }
        for (_, w) in std::mem::take(&mut self.workers) {
            w.stop(SHUTDOWN);
        }
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_counts_every_cause_once() {
        let c = VifCounters::new(2);
        for (a, n) in [
            (&c.capture_drops, 1),
            (&c.overload_drops, 10),
            (&c.truncated, 100),
            (&c.send_errors, 1000),
            (&c.queue_drops, 10_000),
            // Not losses: verdicts and fail-open bypasses were the policy's choice.
            (&c.verdict_drops, 100_000),
            (&c.overload_bypassed, 1_000_000),
        ] {
            a.store(n, Ordering::Relaxed);
        }
        assert_eq!(c.lost(), 11_111);
    }
}
