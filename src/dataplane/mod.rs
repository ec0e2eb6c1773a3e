//! The live data plane of `virtsecd`: one passive capture worker per guest vif.
//!
//! The daemon calls [`DataPlane::sync`] with the inventory after every reconcile pass: every
//! vif in it (`vif<D>.<N>` or its `vifname`, and the HVM `-emu` twin) gets a worker thread with
//! its own TPACKET_V3 ring and inspection engine; a vif that left the inventory has its worker
//! stopped. XenStore shows a vif before netback creates its netdev, so a worker waits for the
//! interface to appear. Alerts are EVE lines with the guest's identity (`xen` object: domid,
//! uuid, name, vif), appended to the EVE file, logged, and kept (the last 1,000) for
//! `virtsec alerts`. Per-vif counters are lock-free atomics read by `virtsec status`.
//!
//! Passive mode adds nothing to the guest's path; verdicts act through kernel rules (the
//! enforcement layer). Inline mode and the zero-gap gate are not here yet (issue 5).

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use crate::capture::{Ring, RingConfig};
use crate::decode;
use crate::detect::behaviour::{Behaviour, BehaviourConfig};
use crate::detect::matcher::Backend;
use crate::detect::rules::Rule;
use crate::detect::Detector;
use crate::flow::FlowLimits;
use crate::inspect::eve::{alert_value, XenIdentity};
use crate::inspect::Engine;
use crate::inventory::Guests;

/// Ring per vif: 8 × 256 KiB (2 MiB of kernel memory pinned per vif; a 64 KiB GSO
/// super-frame still fits a block). `virtsec capture` uses the larger default for bursts.
const VIF_RING: RingConfig = RingConfig {
    block_size: 256 << 10,
    blocks: 8,
    retire_ms: 10,
    fanout: None,
};

/// Alerts kept in memory for `virtsec alerts`.
const RECENT: usize = 1000;

/// Counters of one vif's worker.
#[derive(Debug, Default)]
pub struct VifCounters {
    pub frames: AtomicU64,
    pub bytes: AtomicU64,
    pub alerts: AtomicU64,
    pub ring_drops: AtomicU64,
    pub attached: AtomicBool,
}

/// Serialisable snapshot of [`VifCounters`].
#[derive(Clone, Debug, Serialize)]
pub struct VifStatus {
    pub domid: u32,
    pub attached: bool,
    pub frames: u64,
    pub bytes: u64,
    pub alerts: u64,
    pub ring_drops: u64,
}

struct Worker {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    counters: Arc<VifCounters>,
    ident: Arc<Mutex<XenIdentity>>,
}

/// Alerts shared between workers and the control socket.
#[derive(Default)]
pub struct AlertLog {
    pub total: u64,
    pub recent: VecDeque<(u64, serde_json::Value)>,
}

/// The workers.
pub struct DataPlane {
    rules: Arc<Vec<Rule>>,
    behaviour: BehaviourConfig,
    backend: Backend,
    eve: Option<Arc<Mutex<std::fs::File>>>,
    workers: BTreeMap<String, Worker>,
    log: Arc<Mutex<AlertLog>>,
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
        rules: &[PathBuf],
        eve: Option<PathBuf>,
        backend: Backend,
        behaviour: BehaviourConfig,
    ) -> Result<DataPlane, DataPlaneError> {
        let rs = crate::inspect::load_rules(rules)?;
        for w in &rs.skipped {
            log::warn!("{w}");
        }
        log::info!("inspection: {}", rs.summary());
        let eve = match eve {
            Some(p) => {
                if let Some(d) = p.parent() {
                    let _ = std::fs::create_dir_all(d);
                }
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .map_err(|source| DataPlaneError::Eve {
                        path: p.clone(),
                        source,
                    })?;
                Some(Arc::new(Mutex::new(f)))
            }
            None => None,
        };
        Ok(DataPlane {
            rules: Arc::new(rs.rules),
            behaviour,
            backend,
            eve,
            workers: BTreeMap::new(),
            log: Arc::new(Mutex::new(AlertLog::default())),
        })
    }

    /// Attaches a worker to every vif of `guests` and stops the workers of vifs gone.
    pub fn sync(&mut self, guests: &Guests) {
        let mut want: BTreeMap<String, XenIdentity> = BTreeMap::new();
        for g in guests.values() {
            for v in g.vifs.values() {
                let mut names = vec![v.ifname.clone()];
                names.extend(v.emu_ifname.clone());
                for n in names {
                    want.insert(
                        n.clone(),
                        XenIdentity {
                            domid: g.domid,
                            uuid: g.uuid.clone(),
                            name: g.name.clone(),
                            vif: n,
                        },
                    );
                }
            }
        }
        let gone: Vec<String> = self
            .workers
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(mut w) = self.workers.remove(&k) {
                w.stop.store(true, Ordering::Relaxed);
                if let Some(h) = w.handle.take() {
                    let _ = h.join();
                }
                log::info!("{k}: inspection detached");
            }
        }
        for (ifname, ident) in want {
            if let Some(w) = self.workers.get(&ifname) {
                if let Ok(mut cur) = w.ident.lock() {
                    if *cur != ident {
                        // A new VM reusing the domid (or a rename): alerts name the new one.
                        *cur = ident;
                    }
                }
                continue;
            }
            let w = self.spawn(ifname.clone(), ident);
            self.workers.insert(ifname, w);
        }
    }

    fn spawn(&self, ifname: String, ident: XenIdentity) -> Worker {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(VifCounters::default());
        let ident = Arc::new(Mutex::new(ident));
        let behaviour = self.behaviour.clone();
        let (rules, backend, eve, log_) = (
            self.rules.clone(),
            self.backend,
            self.eve.clone(),
            self.log.clone(),
        );
        let (stop2, counters2, ident2, name2) = (
            stop.clone(),
            counters.clone(),
            ident.clone(),
            ifname.clone(),
        );
        let handle = std::thread::Builder::new()
            .name(format!("vif {ifname}"))
            .spawn(move || {
                worker(
                    name2, rules, backend, behaviour, eve, log_, stop2, counters2, ident2,
                )
            })
            .ok();
        Worker {
            stop,
            handle,
            counters,
            ident,
        }
    }

    /// Whether `ifname` has a worker capturing on it.
    pub fn attached(&self, ifname: &str) -> bool {
        self.workers
            .get(ifname)
            .is_some_and(|w| w.counters.attached.load(Ordering::Relaxed))
    }

    /// Per-vif counters.
    pub fn status(&self) -> BTreeMap<String, VifStatus> {
        self.workers
            .iter()
            .map(|(k, w)| {
                let c = &w.counters;
                let domid = w.ident.lock().map(|i| i.domid).unwrap_or(0);
                (
                    k.clone(),
                    VifStatus {
                        domid,
                        attached: c.attached.load(Ordering::Relaxed),
                        frames: c.frames.load(Ordering::Relaxed),
                        bytes: c.bytes.load(Ordering::Relaxed),
                        alerts: c.alerts.load(Ordering::Relaxed),
                        ring_drops: c.ring_drops.load(Ordering::Relaxed),
                    },
                )
            })
            .collect()
    }

    /// Alerts with a sequence number above `after`, oldest first, and the total so far.
    pub fn alerts_after(&self, after: u64) -> (u64, Vec<serde_json::Value>) {
        match self.log.lock() {
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

    /// Stops every worker.
    pub fn shutdown(&mut self) {
        for w in self.workers.values() {
            w.stop.store(true, Ordering::Relaxed);
        }
        for (_, mut w) in std::mem::take(&mut self.workers) {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[allow(clippy::too_many_arguments)]
fn worker(
    ifname: String,
    rules: Arc<Vec<Rule>>,
    backend: Backend,
    behaviour: BehaviourConfig,
    eve: Option<Arc<Mutex<std::fs::File>>>,
    log_: Arc<Mutex<AlertLog>>,
    stop: Arc<AtomicBool>,
    counters: Arc<VifCounters>,
    ident: Arc<Mutex<XenIdentity>>,
) {
    let detector = match Detector::new(rules.as_ref().clone(), backend) {
        Ok(d) => d,
        Err(e) => {
            log::error!("{ifname}: cannot build the matcher: {e}");
            return;
        }
    };
    let mut engine = Engine::new(detector, FlowLimits::default());
    // netback creates the netdev after the backend appears in XenStore: wait for it.
    let mut ring = loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match Ring::open(&ifname, VIF_RING) {
            Ok(r) => break r,
            Err(crate::capture::CaptureError::NoInterface(_)) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => {
                log::error!("{ifname}: {e}");
                return;
            }
        }
    };
    counters.attached.store(true, Ordering::Relaxed);
    log::info!("{ifname}: inspection attached (passive)");
    let mut detectors = Behaviour::new(behaviour);
    let emit = |a: &crate::inspect::Alert, r: &Rule| {
        counters.alerts.fetch_add(1, Ordering::Relaxed);
        let id = ident.lock().map(|i| i.clone()).unwrap_or_default();
        let v = alert_value(a, r, Some(&id));
        log::warn!(
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
        if let Some(f) = &eve {
            if let Ok(mut f) = f.lock() {
                let mut line = serde_json::to_vec(&v).unwrap_or_default();
                line.push(b'\n');
                if let Err(e) = f.write_all(&line) {
                    log::error!("cannot write the EVE file: {e}");
                }
            }
        }
        if let Ok(mut l) = log_.lock() {
            l.total += 1;
            let seq = l.total;
            l.recent.push_back((seq, v));
            if l.recent.len() > RECENT {
                l.recent.pop_front();
            }
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let res = ring.poll(Duration::from_millis(100), &mut |f| {
            counters.frames.fetch_add(1, Ordering::Relaxed);
            counters
                .bytes
                .fetch_add(f.data.len() as u64, Ordering::Relaxed);
            if let Ok(p) = decode::decode_ethernet(f.data, &mut engine.decode) {
                let ts = f.ts_ns / 1000;
                if !f.outgoing {
                    for finding in detectors.on_packet(&p, ts) {
                        let rule = finding.rule(detectors.window_s());
                        let a = crate::inspect::Alert {
                            ts_us: ts,
                            flow_id: 0,
                            rule: 0,
                            src: p.src,
                            sport: p.sport,
                            dst: p.dst,
                            dport: p.dport,
                            proto: p.proto,
                            to_server: true,
                        };
                        emit(&a, &rule);
                    }
                }
                engine.packet(&p, ts, &mut |a, r| emit(a, r));
            }
        });
        if let Err(e) = res {
            log::error!("{ifname}: capture failed: {e}");
            break;
        }
        let st = ring.stats();
        counters.ring_drops.store(st.drops, Ordering::Relaxed);
    }
    counters.attached.store(false, Ordering::Relaxed);
}
