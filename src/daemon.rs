//! `virtsecd`: wires XenStore, the inventory and the control socket on one mio event loop.
//!
//! ```text
//!  xenstored ──(engine: pipelined requests, watch events)──▶ reconcile pass ──▶ inventory
//!      ▲                                                                          │
//!      └──────── watches: @introduceDomain, @releaseDomain, backend/vif,          ▼
//!                per-guest name (reconcile) and device/ (count only)      control socket
//! ```
//!
//! The loop never blocks on xenstored. When the connection breaks (EOF, protocol error, no
//! reply within `request_timeout_ms`) the service keeps its last inventory, marks XenStore
//! disconnected in `status`, redials with exponential back-off, re-registers every watch and
//! runs a full reconcile: state is rebuilt from XenStore truth, never from memory.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::config::Config;
use crate::control::{ControlError, ControlRequest, ControlServer};
use crate::inventory::{self, Guests, Pass, PassReport, Tag};
use crate::xenstore::wire::{strip_nul, Request};
use crate::xenstore::{Completion, Engine, XsError};

const XS: Token = Token(0);
const CONTROL: Token = Token(1);
const SIGNALS: Token = Token(2);
/// Data-plane workers wake the loop when alerts wait for the quarantine policy.
const WAKE: Token = Token(3);
/// Prometheus scrapes.
const METRICS: Token = Token(4);
const CONTROL_CONN_BASE: usize = 16;

/// Errors that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("event loop setup failed: {0}")]
    Poll(#[from] std::io::Error),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    DataPlane(#[from] crate::dataplane::DataPlaneError),
}

/// What a XenStore reply belongs to.
#[derive(Debug)]
enum Op {
    Pass(Tag),
    SelfDomid,
    Watch(String),
    Unwatch,
    /// A write or removal of what the service publishes (quarantine state, throttle rate).
    Publish(String),
    /// A XenStore quarantine request's value / permissions (by request id).
    ReqValue(String),
    ReqPerms(String),
    /// dom0: the listing of a driver domain's `backend/vif` (by its domid).
    DdBacked(u32),
    /// dom0: the listing of what it paused for a driver domain.
    DdPaused(u32),
    /// dom0: a driver domain's request (its domid, the request id).
    DdRequest(u32, String),
    /// A driver domain: dom0's answer to one of its requests (the node).
    DdResponse(String),
    /// A clean-up whose failure (the node was not there) means nothing.
    Cleanup,
}

/// dom0's bookkeeping for a driver domain it publishes identities for.
#[derive(Default)]
struct DriverDomain {
    /// The guests it backs, once listed.
    backed: Option<BTreeSet<u32>>,
    /// What is published for it on this connection, by guest domid.
    published: BTreeMap<u32, String>,
    /// The domains dom0's service paused on its request (also in XenStore, `paused/`).
    paused: BTreeSet<u32>,
}

/// XenStore side of the status report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct XenstoreStatus {
    pub path: String,
    pub connected: bool,
    pub self_domid: Option<u32>,
    pub watches: Vec<String>,
    pub connects: u64,
    pub disconnects: u64,
    pub last_error: Option<String>,
    pub reconciles: u64,
    pub last_reconcile_ms: Option<f64>,
    /// The last completed pass saw XenStore as it is now (no change pending).
    pub in_sync: bool,
}

/// Warnings about untrusted or unreadable input.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Warnings {
    /// Changes seen in guests' own frontend trees (`device/**`, writable by the guest; the
    /// toolstack writes there too when it adds or removes a device). Never trusted, only counted.
    pub untrusted_frontend_writes: u64,
    /// Vifs whose frontend MAC disagrees with the backend (last pass).
    pub frontend_mismatches: u64,
    /// Backend/toolstack values that failed validation (last pass).
    pub invalid_values: u64,
    /// Reads refused for lack of permission (last pass), e.g. in a driver domain.
    pub denied: Vec<String>,
    pub errors: Vec<String>,
    /// Watches xenstored refused (quota in a driver domain): coverage is reduced.
    pub watch_failures: u64,
}

/// `virtsec status --json`.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub version: &'static str,
    pub pid: u32,
    pub uptime_s: f64,
    pub xenstore: XenstoreStatus,
    pub guests: usize,
    pub vifs: usize,
    pub warnings: Warnings,
    pub control_refused_peers: u64,
    /// Per-vif inspection counters (empty without `[inspect] rules`).
    pub inspection: std::collections::BTreeMap<String, crate::dataplane::VifStatus>,
    /// Passive capture trimmed in the kernel (absent without a data plane).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture_filter: Option<crate::dataplane::FilterStatus>,
    pub alerts: u64,
    /// Anti-spoofing drops per vif (with the guest's identity) and reason; `*` counts frames
    /// of vifs with no policy yet. `null` when anti-spoofing is off.
    pub antispoof: Option<std::collections::BTreeMap<String, serde_json::Value>>,
    pub enforce_errors: Vec<String>,
    pub quarantine: QuarantineStatus,
}

/// Quarantine side of the status report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QuarantineStatus {
    /// Quarantined VMs (UUIDs).
    pub vms: Vec<String>,
    /// How pause/detach act: `xenctrl`, `xl` or `none`.
    pub domain_control: Option<&'static str>,
    /// Policy steps held back by the rate limit.
    pub rate_limited: u64,
    /// State files that did not load, and errors of the last sync.
    pub errors: Vec<String>,
}

enum Link {
    Down {
        retry_at: Instant,
        backoff: Duration,
    },
    Up(Box<Engine<Op>>),
}

struct State {
    cfg: Config,
    started: Instant,
    link: Link,
    self_domid: Option<u32>,
    pass: Option<(Pass, Instant)>,
    dirty: bool,
    inventory: Guests,
    /// Counts the inventory's replacements (each finished pass): what followers of the
    /// control socket were last pushed is compared against it.
    inventory_gen: u64,
    report: PassReport,
    /// Guests whose per-guest watches are registered.
    watched: BTreeSet<u32>,
    watches: BTreeSet<String>,
    last_progress: Instant,
    xs: XenstoreStatus,
    untrusted_frontend_writes: u64,
    watch_failures: u64,
    registered_fd: Option<RawFd>,
    dataplane: Option<crate::dataplane::DataPlane>,
    policies: crate::policy::Policies,
    antispoof: Option<crate::enforce::AntiSpoof>,
    enforce_errors: Vec<String>,
    quarantine: Option<crate::quarantine::Quarantine>,
    quarantine_errors: Vec<String>,
    /// Anti-spoofing drop counters last reported, per (vif, reason); `None` before the first
    /// look (what the kernel counted before this run is not re-reported).
    violations: Option<std::collections::BTreeMap<(String, String), u64>>,
    /// Readiness was reported to the init system.
    ready_sent: bool,
    last_status_publish: Instant,
    last_status_body: Option<String>,
    /// xenstored refused a write under our own `/local/domain/<self>/virtsec` (a driver domain
    /// cannot create it; dom0's virtsec or the administrator does): everything there is
    /// published again when that directory appears.
    own_dir_denied: bool,
    last_counters_publish: Instant,
    /// Per-vif counters as last written to XenStore on this connection, by (domid, node);
    /// `None` until the first publication, which starts by removing what an earlier run or
    /// connection left.
    published_counters: Option<BTreeMap<(u32, String), String>>,
    /// XenStore quarantine requests being read: (value, permissions) per id.
    #[allow(clippy::type_complexity)]
    requests: std::collections::HashMap<
        String,
        (
            Option<Result<Vec<u8>, String>>,
            Option<Result<Vec<u8>, String>>,
        ),
    >,
    /// Kernel counters per (chain, reason) when anti-spoofing was set up by this run.
    violation_base: Option<std::collections::BTreeMap<(String, String), u64>>,
    last_violation_check: Instant,
    /// The periodic read of the anti-spoofing counters, running in its own thread: `nft -j
    /// list` takes 5-20 ms (more with many vifs), which the event loop must not wait for
    /// while a quarantine or a new vif's policy is due. It wakes the loop when done.
    violation_read: Option<std::thread::JoinHandle<crate::enforce::Counters>>,
    waker: std::sync::Arc<mio::Waker>,
    alerts_rx: Option<std::sync::mpsc::Receiver<crate::quarantine::AlertEvent>>,
    /// dom0: driver domains served (`[xenstore] driver_domains`), by domid.
    driver_domains: BTreeMap<u32, DriverDomain>,
    /// A driver domain: pause/detach operations for dom0's service, to write.
    delegate_out: Option<std::sync::Arc<std::sync::Mutex<Vec<crate::enforce::domctl::DomainOp>>>>,
    delegate_seq: u64,
}

/// The service.
pub struct Daemon {
    poll: Poll,
    control: ControlServer,
    signals: Signals,
    metrics: Option<mio::net::TcpListener>,
    state: State,
}

impl Daemon {
    /// Sets up the control socket and signal handling; connecting to xenstored happens in
    /// [`Daemon::run`] so a missing xenstored delays, not prevents, start-up.
    pub fn new(cfg: Config) -> Result<Daemon, DaemonError> {
        let poll = Poll::new()?;
        let control = ControlServer::bind(
            &cfg.control.socket,
            poll.registry(),
            CONTROL,
            CONTROL_CONN_BASE,
        )?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let mut metrics = match cfg.metrics.listen {
            Some(addr) => {
                let mut l = mio::net::TcpListener::bind(addr).map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("cannot listen on {addr} for [metrics]: {e}"),
                    )
                })?;
                poll.registry()
                    .register(&mut l, METRICS, Interest::READABLE)?;
                log::info!("Prometheus metrics on http://{addr}/metrics");
                Some(l)
            }
            None => None,
        };
        let waker = std::sync::Arc::new(mio::Waker::new(poll.registry(), WAKE)?);
        let (alerts_tx, alerts_rx) = std::sync::mpsc::channel();
        let sink = crate::dataplane::AlertSink::new(alerts_tx, waker.clone());
        // A driver domain asks dom0's service to pause and detach (quarantine::delegate).
        let (domctl, delegate_out): (Box<dyn crate::enforce::domctl::DomainControl>, _) =
            if cfg.quarantine.domain_control == "dom0" {
                let (ctl, out) = crate::enforce::domctl::Dom0::new();
                (Box::new(ctl), Some(out))
            } else {
                (
                    crate::enforce::domctl::open(&cfg.quarantine.domain_control, {
                        // A background detach wakes the loop to audit how it ended.
                        let waker = waker.clone();
                        crate::enforce::domctl::Reports::waking(std::sync::Arc::new(move || {
                            let _ = waker.wake();
                        }))
                    }),
                    None,
                )
            };
        let (quarantine, quarantine_errors) = match crate::quarantine::Quarantine::open(
            cfg.quarantine.clone(),
            Some(cfg.inspect.eve.clone()),
            domctl,
        ) {
            Ok(q) => (Some(q), Vec::new()),
            Err(e) => {
                log::error!("quarantine unavailable: {e}");
                (None, vec![e.to_string()])
            }
        };
        let dataplane = if cfg.inspect.rules.is_empty() && !cfg.behaviour.enabled {
            None
        } else {
            Some(crate::dataplane::DataPlane::new(
                crate::dataplane::DataPlaneOptions {
                    rules: cfg.inspect.rules.clone(),
                    eve: Some(cfg.inspect.eve.clone()),
                    backend: cfg.inspect.matcher.into(),
                    behaviour: cfg.behaviour.clone(),
                    workers_per_vif: cfg.inspect.workers_per_vif,
                    inline: cfg.inspect.inline.clone(),
                    ring_mib: cfg.inspect.ring_mib,
                    block_timeout_ms: cfg.inspect.block_timeout_ms,
                    max_flows: cfg.inspect.max_flows,
                    flow_table_full: cfg.inspect.flow_table_full,
                    inspect_past_depth: cfg.inspect.inspect_past_depth,
                    dedupe_local: cfg.enforce.antispoof,
                },
                Some(sink),
            )?)
        };
        let policies = crate::policy::Policies::from_config(&cfg);
        let now = Instant::now();
        let xs = XenstoreStatus {
            path: cfg.xenstore.path.display().to_string(),
            ..Default::default()
        };
        Ok(Daemon {
            poll,
            control,
            signals,
            metrics: metrics.take(),
            state: State {
                self_domid: cfg.xenstore.domid,
                link: Link::Down {
                    retry_at: now,
                    backoff: Duration::from_millis(cfg.xenstore.reconnect_min_ms),
                },
                cfg,
                started: now,
                pass: None,
                dirty: false,
                inventory: Guests::new(),
                inventory_gen: 0,
                report: PassReport::default(),
                watched: BTreeSet::new(),
                driver_domains: BTreeMap::new(),
                watches: BTreeSet::new(),
                last_progress: now,
                xs,
                untrusted_frontend_writes: 0,
                watch_failures: 0,
                registered_fd: None,
                dataplane,
                policies,
                antispoof: None,
                enforce_errors: Vec::new(),
                quarantine,
                quarantine_errors,
                violations: None,
                ready_sent: false,
                last_status_publish: now,
                last_status_body: None,
                own_dir_denied: false,
                last_counters_publish: now,
                published_counters: None,
                requests: Default::default(),
                violation_base: None,
                last_violation_check: now,
                violation_read: None,
                waker,
                alerts_rx: Some(alerts_rx),
                delegate_out,
                delegate_seq: 0,
            },
        })
    }

    /// Runs until SIGTERM or SIGINT.
    pub fn run(mut self) -> Result<(), DaemonError> {
        let mut events = Events::with_capacity(256);
        log::info!(
            "virtsecd {} started; control socket {}",
            env!("CARGO_PKG_VERSION"),
            self.control.path().display()
        );
        let mut pushed_gen = 0;
        loop {
            self.state.maintain(&self.poll);
            if self.state.inventory_gen != pushed_gen && self.control.has_followers() {
                pushed_gen = self.state.inventory_gen;
                if let Ok(v) =
                    serde_json::to_value(self.state.inventory.values().collect::<Vec<_>>())
                {
                    self.control.push_domains(self.poll.registry(), v);
                }
            }
            let timeout = self.state.next_wakeup();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            for ev in events.iter() {
                match ev.token() {
                    XS => self.state.on_xs_ready(&self.poll),
                    WAKE => {
                        self.state.on_alerts();
                        if let Some(q) = self.state.quarantine.as_mut() {
                            q.audit_domctl_reports(&self.state.inventory);
                        }
                    }
                    METRICS => {
                        while let Some(Ok((conn, _))) = self.metrics.as_ref().map(|l| l.accept()) {
                            use std::os::fd::{FromRawFd, IntoRawFd};
                            // SAFETY: the descriptor comes from mio's accepted stream, whose
                            // ownership moves here.
                            let std_conn =
                                unsafe { std::net::TcpStream::from_raw_fd(conn.into_raw_fd()) };
                            let state = &self.state;
                            crate::metrics::serve(std_conn, || state.metrics());
                        }
                    }
                    CONTROL => self.control.accept(self.poll.registry()),
                    SIGNALS => {
                        for sig in self.signals.pending() {
                            match sig {
                                SIGHUP => {
                                    log::info!(
                                        "SIGHUP: re-reading XenStore, reloading rules, reopening the EVE file (other settings take effect on restart)"
                                    );
                                    if let Some(dp) = self.state.dataplane.as_mut() {
                                        if let Err(e) = dp.reload_rules() {
                                            log::error!(
                                                "rule reload failed, the old rules stay: {e}"
                                            );
                                        }
                                        dp.reopen_eve();
                                    }
                                    self.state.request_reconcile();
                                }
                                _ => {
                                    log::info!("signal {sig}: shutting down");
                                    return Ok(());
                                }
                            }
                        }
                    }
                    t if self.control.owns(t) => {
                        let state = &mut self.state;
                        let refused = self.control.refused_peers;
                        self.control.on_ready(t, self.poll.registry(), &mut |req| {
                            state.answer(req, refused)
                        });
                    }
                    _ => {}
                }
            }
        }
    }
}

impl State {
    fn answer(&mut self, req: ControlRequest, refused: u64) -> Result<serde_json::Value, String> {
        let v =
            match req {
                ControlRequest::Quarantine {
                    target,
                    action,
                    reason,
                    who,
                } => {
                    let q = self.quarantine.as_mut().ok_or(
                        "quarantine is unavailable (see virtsec status: quarantine.errors)",
                    )?;
                    let action: crate::quarantine::Action = action.parse()?;
                    let by = format!("operator {who}");
                    let r = q
                        .apply(&target, action, &reason, &by, &self.inventory)
                        .map_err(|e| e.to_string());
                    self.flush_publish();
                    serde_json::to_value(r?)
                }
                ControlRequest::Release {
                    target,
                    reason,
                    who,
                } => {
                    let q = self.quarantine.as_mut().ok_or(
                        "quarantine is unavailable (see virtsec status: quarantine.errors)",
                    )?;
                    let by = format!("operator {who}");
                    let r = q
                        .release(&target, &reason, &by, &self.inventory)
                        .map_err(|e| e.to_string());
                    if let Ok(rec) = &r {
                        self.released(&rec.uuid);
                    }
                    self.flush_publish();
                    serde_json::to_value(r?)
                }
                ControlRequest::ReloadRules => {
                    let dp = self
                        .dataplane
                        .as_mut()
                        .ok_or("no data plane: [inspect] rules is empty and behaviour is off")?;
                    let summary = dp.reload_rules()?;
                    Ok(serde_json::json!({ "summary": summary }))
                }
                ControlRequest::Quarantined => {
                    let q = self.quarantine.as_ref().ok_or(
                        "quarantine is unavailable (see virtsec status: quarantine.errors)",
                    )?;
                    Ok(serde_json::json!({
                        "quarantined": q.records().collect::<Vec<_>>(),
                        "corrupt": q.corrupt(),
                        "audit": q.audit_log().collect::<Vec<_>>(),
                    }))
                }
                ControlRequest::Status => serde_json::to_value(self.status(refused)),
                ControlRequest::Domains { .. } => {
                    serde_json::to_value(self.inventory.values().collect::<Vec<_>>())
                }
                ControlRequest::Alerts { after } => {
                    let (total, alerts) = self
                        .dataplane
                        .as_ref()
                        .map(|d| d.alerts_after(after))
                        .unwrap_or_default();
                    Ok(serde_json::json!({"total": total, "alerts": alerts}))
                }
                ControlRequest::VifReady { domid, devid } => {
                    let guest = self.inventory.get(&domid);
                    let vif = guest.and_then(|g| g.vifs.get(&devid));
                    let ifname = vif.map(|v| v.ifname.clone());
                    // A quarantined VM's new vif: held as its record says (`bridge`: the
                    // backend key vif-bridge reads names the quarantine bridge).
                    let quarantine = match (&self.quarantine, guest, vif) {
                        (Some(q), Some(g), Some(v)) => q.vif_held(g, v),
                        _ => true,
                    };
                    // A driver domain taking identities from dom0: not before it knows whose
                    // vif it is (a quarantined VM is held by UUID).
                    let identity = !self.cfg.xenstore.dom0_identities
                        || self.self_domid == Some(0)
                        || guest.is_some_and(|g| g.uuid.is_some());
                    let antispoof = match (&self.antispoof, &ifname) {
                        (Some(a), Some(n)) => Some(a.has(n)),
                        (None, _) => None,
                        (Some(_), None) => Some(false),
                    };
                    let inspection = match (&self.dataplane, &ifname) {
                        (Some(d), Some(n)) => Some(d.attached(n)),
                        (None, _) => None,
                        (Some(_), None) => Some(false),
                    };
                    let ready = ifname.is_some()
                        && antispoof.unwrap_or(true)
                        && inspection.unwrap_or(true)
                        && quarantine
                        && identity
                        && matches!(self.link, Link::Up(_));
                    Ok(serde_json::json!({
                        "ready": ready,
                        "ifname": ifname,
                        "antispoof": antispoof,
                        "inspection": inspection,
                        "quarantine": quarantine,
                        "identity": identity,
                    }))
                }
            };
        v.map_err(|e| e.to_string())
    }

    fn status(&self, refused_peers: u64) -> Status {
        let mut xs = self.xs.clone();
        xs.connected = matches!(self.link, Link::Up(_)) && self.self_domid.is_some();
        xs.self_domid = self.self_domid;
        xs.watches = self.watches.iter().cloned().collect();
        xs.in_sync = xs.connected && self.pass.is_none() && !self.dirty && xs.reconciles > 0;
        Status {
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            xenstore: xs,
            guests: self.inventory.len(),
            vifs: self.inventory.values().map(|g| g.vifs.len()).sum(),
            warnings: Warnings {
                untrusted_frontend_writes: self.untrusted_frontend_writes,
                frontend_mismatches: self.report.frontend_mismatches,
                invalid_values: self.report.invalid_values,
                denied: self.report.denied.clone(),
                errors: self.report.errors.clone(),
                watch_failures: self.watch_failures,
            },
            control_refused_peers: refused_peers,
            inspection: self
                .dataplane
                .as_ref()
                .map(|d| d.status())
                .unwrap_or_default(),
            capture_filter: self.dataplane.as_ref().map(|d| d.filter_status()),
            antispoof: self.antispoof.as_ref().map(|a| self.antispoof_report(a)),
            enforce_errors: self.enforce_errors.clone(),
            quarantine: match &self.quarantine {
                Some(q) => QuarantineStatus {
                    vms: q.records().map(|r| r.uuid.clone()).collect(),
                    domain_control: Some(q.domctl_how()),
                    rate_limited: q.rate_limited,
                    errors: q
                        .corrupt()
                        .iter()
                        .chain(self.quarantine_errors.iter())
                        .cloned()
                        .collect(),
                },
                None => QuarantineStatus {
                    errors: self.quarantine_errors.clone(),
                    ..Default::default()
                },
            },
            alerts: self
                .dataplane
                .as_ref()
                .map(|d| d.alerts_after(u64::MAX).0)
                .unwrap_or(0),
        }
    }

    /// Kernel drop counters keyed by vif, each with the guest it belongs to.
    fn antispoof_report(
        &self,
        a: &crate::enforce::AntiSpoof,
    ) -> std::collections::BTreeMap<String, serde_json::Value> {
        self.report_of(a, crate::enforce::AntiSpoof::counters())
    }

    /// [`Self::antispoof_report`] from counters already read.
    fn report_of(
        &self,
        a: &crate::enforce::AntiSpoof,
        mut counters: crate::enforce::Counters,
    ) -> std::collections::BTreeMap<String, serde_json::Value> {
        let mut out = std::collections::BTreeMap::new();
        for (ifname, domid) in a.vifs() {
            let drops = counters
                .remove(&crate::enforce::chain_name(ifname))
                .unwrap_or_default();
            let g = self.inventory.get(&domid);
            out.insert(
                ifname.to_string(),
                serde_json::json!({
                    "domid": domid,
                    "uuid": g.and_then(|g| g.uuid.clone()),
                    "name": g.and_then(|g| g.name.clone()),
                    "drops": drops,
                }),
            );
        }
        if let Some(star) = counters.remove("*") {
            out.insert("*".into(), serde_json::json!({ "drops": star }));
        }
        out
    }

    fn next_wakeup(&self) -> Duration {
        let now = Instant::now();
        match &self.link {
            Link::Down { retry_at, .. } => retry_at.saturating_duration_since(now),
            Link::Up(e) if e.outstanding() > 0 => Duration::from_millis(100),
            Link::Up(_) => Duration::from_secs(1),
        }
    }

    /// The Prometheus exposition.
    fn metrics(&self) -> String {
        let mut e = crate::metrics::Exposition::new();
        e.family("virtsec_up", "gauge", "1 while virtsecd runs.");
        e.sample("virtsec_up", &[], 1.0);
        e.family(
            "virtsec_xenstore_connected",
            "gauge",
            "1 while the XenStore link is up.",
        );
        e.sample(
            "virtsec_xenstore_connected",
            &[],
            f64::from(u8::from(matches!(self.link, Link::Up(_)))),
        );
        e.family("virtsec_guests", "gauge", "Guests in the inventory.");
        e.sample("virtsec_guests", &[], self.inventory.len() as f64);
        e.family("virtsec_vifs", "gauge", "Vifs in the inventory.");
        let vifs: usize = self.inventory.values().map(|g| g.vifs.len()).sum();
        e.sample("virtsec_vifs", &[], vifs as f64);
        e.family(
            "virtsec_reconciles_total",
            "counter",
            "XenStore reconcile passes.",
        );
        e.sample("virtsec_reconciles_total", &[], self.xs.reconciles as f64);
        if let Some(dp) = &self.dataplane {
            dp.metrics(&mut e);
        }
        if let Some(a) = &self.antispoof {
            e.family(
                "virtsec_antispoof_drops_total",
                "counter",
                "Frames dropped by anti-spoofing, per vif and reason.",
            );
            for (ifname, v) in self.antispoof_report(a) {
                for (reason, n) in v["drops"].as_object().into_iter().flatten() {
                    e.sample(
                        "virtsec_antispoof_drops_total",
                        &[("vif", &ifname), ("reason", reason)],
                        n.as_f64().unwrap_or(0.0),
                    );
                }
            }
        }
        if let Some(q) = &self.quarantine {
            e.family(
                "virtsec_quarantined_vms",
                "gauge",
                "VMs under quarantine, per action.",
            );
            let mut by: std::collections::BTreeMap<String, u64> = Default::default();
            for r in q.records() {
                for a in &r.actions {
                    *by.entry(format!("{a:?}").to_lowercase()).or_insert(0) += 1;
                }
            }
            for a in ["throttle", "isolate", "bridge", "pause", "detach"] {
                e.sample(
                    "virtsec_quarantined_vms",
                    &[("action", a)],
                    by.get(a).copied().unwrap_or(0) as f64,
                );
            }
            e.family(
                "virtsec_quarantine_rate_limited_total",
                "counter",
                "Policy steps held back by the rate limit.",
            );
            e.sample(
                "virtsec_quarantine_rate_limited_total",
                &[],
                q.rate_limited as f64,
            );
        }
        e.finish()
    }

    /// Reports anti-spoofing drops as events (syslog and EVE `event_type:"antispoof"`, with
    /// the guest's identity), at most one per vif and reason every 2 s. The counters are read
    /// in a thread started here and reported by the first call after it finished.
    fn report_violations(&mut self) {
        let Some(a) = &self.antispoof else { return };
        let counters = match self.violation_read.take() {
            Some(h) if h.is_finished() => match h.join() {
                Ok(c) => c,
                Err(_) => {
                    log::error!("the anti-spoofing counter reader panicked; retrying in 2 s");
                    return;
                }
            },
            Some(h) => {
                self.violation_read = Some(h);
                return;
            }
            None => {
                if self.last_violation_check.elapsed() >= Duration::from_secs(2) {
                    self.last_violation_check = Instant::now();
                    let waker = self.waker.clone();
                    let spawned = std::thread::Builder::new()
                        .name("antispoof-counters".into())
                        .spawn(move || {
                            let c = crate::enforce::AntiSpoof::counters();
                            let _ = waker.wake();
                            c
                        });
                    match spawned {
                        Ok(h) => self.violation_read = Some(h),
                        Err(e) => log::warn!("cannot start the anti-spoofing counter reader: {e}"),
                    }
                }
                return;
            }
        };
        let report = self.report_of(a, counters);
        let base = self.violation_base.take().unwrap_or_default();
        let seen = self.violations.get_or_insert_with(Default::default);
        let mut events = Vec::new();
        for (ifname, v) in &report {
            let chain = if ifname == "*" {
                "*".to_string()
            } else {
                crate::enforce::chain_name(ifname)
            };
            for (reason, n) in v["drops"].as_object().into_iter().flatten() {
                let n = n.as_u64().unwrap_or(0);
                let prev = seen
                    .insert((ifname.clone(), reason.clone()), n)
                    .or_else(|| base.get(&(chain.clone(), reason.clone())).copied())
                    .unwrap_or(0);
                if n > prev {
                    events.push((ifname.clone(), reason.clone(), n - prev, n, v.clone()));
                }
            }
        }
        for (ifname, reason, delta, total, v) in events {
            let who = if ifname == "*" {
                "a vif with no policy yet".to_string()
            } else {
                format!(
                    "domain {} ({}) on {ifname}",
                    v["domid"],
                    v["name"].as_str().unwrap_or("?")
                )
            };
            log::warn!(
                target: "virtsec::event::antispoof",
                vif = ifname.as_str(),
                reason = reason.as_str(),
                dropped = delta,
                total = total,
                domid = v["domid"].to_string().as_str();
                "anti-spoofing: {who}: {delta} frame(s) dropped ({reason}), {total} in total"
            );
            let line = serde_json::json!({
                "timestamp": crate::inspect::eve::format_ts(
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_micros() as u64)
                        .unwrap_or(0)
                ),
                "event_type": "antispoof",
                "antispoof": {"reason": reason, "dropped": delta, "total": total},
                "xen": {"domid": v["domid"], "uuid": v["uuid"], "name": v["name"], "vif": ifname},
            });
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.cfg.inspect.eve)
            {
                use std::io::Write;
                let _ = writeln!(f, "{line}");
            }
        }
    }

    /// Publishes a summary of the service's state for other tools at
    /// `/local/domain/<self>/virtsec/status` (JSON, rewritten when it changes, at most every
    /// 2 s): guests, vifs, alerts, quarantined VMs, anti-spoofing drops, in sync.
    fn publish_status(&mut self) {
        let Some(d) = self.self_domid else { return };
        if !matches!(self.link, Link::Up(_))
            || self.last_status_publish.elapsed() < Duration::from_secs(2)
        {
            return;
        }
        self.last_status_publish = Instant::now();
        let vifs: usize = self.inventory.values().map(|g| g.vifs.len()).sum();
        let alerts = self
            .dataplane
            .as_ref()
            .map(|dp| dp.alerts_after(u64::MAX).0)
            .unwrap_or(0);
        let drops: u64 = self
            .violations
            .as_ref()
            .map(|v| v.values().sum())
            .unwrap_or(0);
        let body = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "guests": self.inventory.len(),
            "vifs": vifs,
            "alerts": alerts,
            "quarantined": self.quarantine.as_ref().map(|q| q.records().count()).unwrap_or(0),
            "antispoof_drops": drops,
            "in_sync": self.pass.is_none() && !self.dirty,
        })
        .to_string();
        if self.last_status_body.as_deref() == Some(body.as_str()) {
            return;
        }
        let path = format!("/local/domain/{d}/virtsec/status");
        self.submit(
            Request::Write(path.clone(), body.clone().into_bytes()),
            Op::Publish(path),
        );
        self.last_status_body = Some(body);
    }

    /// Publishes each inspected vif's counters for other tools, at
    /// `/local/domain/<self>/virtsec/vif/<domid>/<devid>` (the emulated twin of an HVM NIC at
    /// `<devid>-emu`), mirroring the toolstack's `backend/vif/<domid>/<devid>`: a JSON object
    /// with the guest's identity, the data plane's counters and the vif's anti-spoofing drops.
    /// Every `counters_interval_s` at most, only the nodes that changed; a vif that goes away
    /// has its node removed. (Netdev names cannot be node names: XenStore has no `.`.)
    fn publish_counters(&mut self) {
        let every = self.cfg.xenstore.counters_interval_s;
        let Some(d) = self.self_domid else { return };
        if every == 0
            || !matches!(self.link, Link::Up(_))
            || self.last_counters_publish.elapsed() < Duration::from_secs(every)
        {
            return;
        }
        self.last_counters_publish = Instant::now();
        let Some(dp) = &self.dataplane else { return };
        let stats = dp.status();
        // Anti-spoofing drops per vif (the report keeps them per vif and reason).
        let mut spoof: BTreeMap<&str, u64> = BTreeMap::new();
        for ((ifname, _), n) in self.violations.iter().flatten() {
            *spoof.entry(ifname.as_str()).or_default() += n;
        }
        let mut now = BTreeMap::new();
        for g in self.inventory.values() {
            for v in g.vifs.values() {
                let names = std::iter::once((v.ifname.as_str(), v.devid.to_string())).chain(
                    v.emu_ifname
                        .as_deref()
                        .map(|e| (e, format!("{}-emu", v.devid))),
                );
                for (ifname, node) in names {
                    let Some(st) = stats.get(ifname) else {
                        continue;
                    };
                    let body = serde_json::json!({
                        "vif": ifname,
                        "domid": g.domid,
                        "uuid": g.uuid,
                        "name": g.name,
                        "mode": st.mode,
                        "attached": st.attached,
                        "frames": st.frames + st.uncopied,
                        "bytes": st.bytes + st.uncopied_bytes,
                        "inspected_frames": st.frames,
                        "lost": st.lost,
                        "alerts": st.alerts,
                        "antispoof_drops": spoof.get(ifname).copied().unwrap_or(0),
                    })
                    .to_string();
                    now.insert((g.domid, node), body);
                }
            }
        }
        let dir = format!("/local/domain/{d}/virtsec/vif");
        let before = match self.published_counters.take() {
            Some(b) => b,
            None => {
                // Vifs of an earlier run may be gone: start from an empty directory (made
                // first so that removing it cannot fail on a fresh xenstored).
                self.submit(Request::Mkdir(dir.clone()), Op::Publish(dir.clone()));
                self.submit(Request::Rm(dir.clone()), Op::Publish(dir.clone()));
                Default::default()
            }
        };
        for ((domid, node), body) in &now {
            if before.get(&(*domid, node.clone())) != Some(body) {
                let path = format!("{dir}/{domid}/{node}");
                self.submit(
                    Request::Write(path.clone(), body.clone().into_bytes()),
                    Op::Publish(path),
                );
            }
        }
        // A guest gone entirely takes its directory along, else only the vif's node goes.
        let live: BTreeSet<u32> = now.keys().map(|(domid, _)| *domid).collect();
        let mut gone = BTreeSet::new();
        for (domid, node) in before.keys().filter(|k| !now.contains_key(*k)) {
            gone.insert(if live.contains(domid) {
                format!("{dir}/{domid}/{node}")
            } else {
                format!("{dir}/{domid}")
            });
        }
        for path in gone {
            self.submit(Request::Rm(path.clone()), Op::Publish(path));
        }
        self.published_counters = Some(now);
    }

    /// Reconnects when due and detects a xenstored that stopped answering.
    fn maintain(&mut self, poll: &Poll) {
        self.report_violations();
        self.publish_status();
        self.publish_counters();
        let now = Instant::now();
        match &self.link {
            Link::Down { retry_at, backoff } if now >= *retry_at => {
                let backoff = *backoff;
                self.connect(poll, backoff);
            }
            Link::Up(e) if e.outstanding() > 0 => {
                let limit = Duration::from_millis(self.cfg.xenstore.request_timeout_ms);
                if now.duration_since(self.last_progress) > limit {
                    let err = XsError::Timeout {
                        op: "request",
                        ms: self.cfg.xenstore.request_timeout_ms,
                    };
                    self.disconnect(poll, &err);
                }
            }
            _ => {}
        }
    }

    fn connect(&mut self, poll: &Poll, backoff: Duration) {
        match Engine::<Op>::connect(&self.cfg.xenstore.path) {
            Ok(engine) => {
                let fd = engine.raw_fd();
                if let Err(e) = poll.registry().register(
                    &mut SourceFd(&fd),
                    XS,
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    log::error!("cannot register the xenstored connection: {e}");
                    self.schedule_retry(backoff);
                    return;
                }
                self.registered_fd = Some(fd);
                self.link = Link::Up(Box::new(engine));
                self.xs.connects += 1;
                self.last_progress = Instant::now();
                log::info!(
                    "connected to xenstored at {}",
                    self.cfg.xenstore.path.display()
                );
                self.watches.clear();
                self.watched.clear();
                self.driver_domains.clear();
                self.pass = None;
                match self.cfg.xenstore.domid {
                    Some(d) => {
                        self.self_domid = Some(d);
                        self.after_domid();
                    }
                    None => {
                        self.self_domid = None;
                        self.submit(Request::Read("domid".into()), Op::SelfDomid);
                    }
                }
            }
            Err(e) => {
                if self.xs.last_error.as_deref() != Some(&e.to_string()) {
                    log::warn!("{e}; retrying");
                }
                self.xs.last_error = Some(e.to_string());
                self.schedule_retry(backoff);
            }
        }
    }

    fn schedule_retry(&mut self, backoff: Duration) {
        let max = Duration::from_millis(self.cfg.xenstore.reconnect_max_ms);
        self.link = Link::Down {
            retry_at: Instant::now() + backoff,
            backoff: (backoff * 2).min(max),
        };
    }

    fn disconnect(&mut self, poll: &Poll, err: &XsError) {
        // A new xenstored may have lost what was published.
        self.last_status_body = None;
        self.published_counters = None;
        if let Some(fd) = self.registered_fd.take() {
            let _ = poll.registry().deregister(&mut SourceFd(&fd));
        }
        log::warn!(
            "lost xenstored connection: {err}; keeping the last inventory ({} guests) until resynchronised",
            self.inventory.len()
        );
        self.xs.disconnects += 1;
        self.xs.last_error = Some(err.to_string());
        self.pass = None;
        self.dirty = false;
        self.watches.clear();
        self.watched.clear();
        // Dropping the engine closes the socket.
        self.schedule_retry(Duration::from_millis(self.cfg.xenstore.reconnect_min_ms));
    }

    fn submit(&mut self, req: Request, op: Op) {
        if let Link::Up(engine) = &mut self.link {
            if engine.outstanding() == 0 {
                self.last_progress = Instant::now();
            }
            if let Err(e) = engine.submit(0, req, op) {
                // The write failed: the next readiness event reports a broken socket; on the
                // xenbus device the request stays unanswered and `maintain`'s request
                // timeout reconnects.
                log::debug!("xenstored submit failed: {e}");
            }
        }
    }

    /// Automation's request directory: ours, and no other domain's (dom0 writes anyway, being
    /// privileged). Requests are also executed only if GET_PERMS names dom0 or this domain as
    /// the node's owner (quarantine::requests), for setups where the directory is shared.
    fn make_request_dir(&mut self) {
        let Some(d) = self.self_domid else { return };
        if self.quarantine.is_none() {
            return;
        }
        let req_dir = format!("/local/domain/{d}/virtsec/request");
        self.submit(
            Request::Mkdir(req_dir.clone()),
            Op::Publish(req_dir.clone()),
        );
        self.submit(
            Request::SetPerms(req_dir.clone(), vec![format!("n{d}")]),
            Op::Publish(req_dir),
        );
    }

    /// This service's own directory, `/local/domain/<self>/virtsec`.
    fn own_dir(&self) -> Option<String> {
        self.self_domid
            .map(|d| format!("/local/domain/{d}/virtsec"))
    }

    /// Whether `path` is in [`Self::own_dir`].
    fn in_own_dir(&self, path: &str) -> bool {
        self.own_dir()
            .is_some_and(|own| crate::xenstore::path::is_subpath(&own, path))
    }

    fn after_domid(&mut self) {
        let Some(d) = self.self_domid else { return };
        if let Some(q) = self.quarantine.as_mut() {
            q.xs_base = Some(format!("/local/domain/{d}"));
            q.republish();
        }
        let backend = format!("/local/domain/{d}/backend/vif");
        let req_dir = format!("/local/domain/{d}/virtsec/request");
        self.make_request_dir();
        let mut watches = vec![
            ("@introduceDomain".to_string(), "domains"),
            ("@releaseDomain".to_string(), "domains"),
            (backend, "backend"),
        ];
        if d != 0 {
            // A driver domain cannot create its own `virtsec` directory: dom0's virtsec (or
            // the administrator) does, and we publish again when it appears.
            watches.extend(self.own_dir().map(|own| (own, "owndir")));
        }
        for (path, token) in watches {
            self.submit(Request::Watch(path.clone(), token.into()), Op::Watch(path));
        }
        if self.quarantine.is_some() {
            self.submit(
                Request::Watch(req_dir.clone(), "request".into()),
                Op::Watch(req_dir),
            );
        }
        if d != 0 && self.delegate_out.is_some() {
            let dir = crate::quarantine::delegate::response_dir(d);
            self.submit(
                Request::Watch(dir.clone(), "ddresponse".into()),
                Op::Watch(dir),
            );
        }
        if d != 0 && self.cfg.xenstore.dom0_identities {
            // Who our guests are, from dom0's service (inventory::identity): a new or
            // changed identity is a reconcile.
            let ids = format!("{}/vm", crate::inventory::identity::dir(d));
            self.submit(
                Request::Watch(ids.clone(), "identity".into()),
                Op::Watch(ids),
            );
        }
        self.request_reconcile();
    }

    fn request_reconcile(&mut self) {
        if self.self_domid.is_none() || !matches!(self.link, Link::Up(_)) {
            return;
        }
        if self.pass.is_some() {
            self.dirty = true;
            return;
        }
        let mut outbox = Vec::new();
        let pass = Pass::start(self.self_domid.unwrap_or(0), &mut outbox);
        self.pass = Some((pass, Instant::now()));
        for (req, tag) in outbox {
            self.submit(req, Op::Pass(tag));
        }
    }

    fn on_xs_ready(&mut self, poll: &Poll) {
        let mut done = Vec::new();
        let res = match &mut self.link {
            Link::Up(engine) => engine.on_readable(&mut done),
            Link::Down { .. } => return,
        };
        if !done.is_empty() {
            self.last_progress = Instant::now();
        }
        for c in done {
            self.on_completion(c);
        }
        if let Err(e) = res {
            self.disconnect(poll, &e);
        }
    }

    fn on_completion(&mut self, c: Completion<Op>) {
        match c {
            Completion::Event(ev) => self.on_event(&ev.path, &ev.token),
            Completion::Reply(Op::SelfDomid, res) => {
                let d = res
                    .ok()
                    .and_then(|p| std::str::from_utf8(strip_nul(&p)).ok()?.trim().parse().ok())
                    .unwrap_or(0);
                log::info!(
                    "running in domain {d}; guarding vifs under /local/domain/{d}/backend/vif"
                );
                self.self_domid = Some(d);
                self.after_domid();
            }
            Completion::Reply(Op::Watch(path), Ok(_)) => {
                self.watches.insert(path);
            }
            Completion::Reply(Op::Watch(path), Err(e)) => {
                self.watch_failures += 1;
                log::warn!("xenstored refused a watch on {path}: {e}; changes there are seen only on the next reconcile");
            }
            Completion::Reply(Op::Unwatch, _) => {}
            Completion::Reply(Op::ReqValue(id), res) => {
                self.requests.entry(id.clone()).or_default().0 = Some(res);
                self.on_request(&id);
            }
            Completion::Reply(Op::ReqPerms(id), res) => {
                self.requests.entry(id.clone()).or_default().1 = Some(res);
                self.on_request(&id);
            }
            Completion::Reply(Op::Cleanup, _) => {}
            Completion::Reply(Op::DdPaused(dd), res) => {
                if let (Some(st), Ok(list)) = (self.driver_domains.get_mut(&dd), res) {
                    st.paused = crate::inventory::identity::domids(&list);
                }
            }
            Completion::Reply(Op::DdRequest(dd, id), res) => {
                // Removed before it was read (answered already): nothing to do.
                if let Ok(value) = res {
                    self.on_driver_domain_request(dd, &id, &value);
                }
            }
            Completion::Reply(Op::DdResponse(node), res) => {
                if let Ok(v) = res {
                    let v: serde_json::Value =
                        serde_json::from_slice(crate::xenstore::wire::strip_nul(&v))
                            .unwrap_or_default();
                    if v["ok"] == true {
                        log::info!("dom0's virtsec did {}", v["request"]);
                    } else {
                        log::error!(
                            "dom0's virtsec refused or failed {}: {}",
                            v["request"],
                            v["error"]
                        );
                    }
                    self.submit(Request::Rm(node), Op::Cleanup);
                }
            }
            Completion::Reply(Op::DdBacked(dd), res) => {
                let Some(st) = self.driver_domains.get_mut(&dd) else {
                    return;
                };
                match res {
                    Ok(list) => st.backed = Some(crate::inventory::identity::domids(&list)),
                    Err(e) if e == "ENOENT" => st.backed = Some(BTreeSet::new()),
                    Err(e) => {
                        log::warn!("cannot list driver domain {dd}'s backend vifs: {e}");
                        return;
                    }
                }
                self.publish_identities(dd);
            }
            Completion::Reply(Op::Publish(path), Ok(_)) => {
                if self.in_own_dir(&path) {
                    self.own_dir_denied = false;
                }
            }
            Completion::Reply(Op::Publish(path), Err(e)) => {
                let own = self
                    .own_dir()
                    .filter(|_| self.in_own_dir(&path) && e == "EACCES");
                match own {
                    Some(_) if self.own_dir_denied => {
                        log::debug!("cannot publish {path} in XenStore: {e}");
                    }
                    Some(own) => {
                        self.own_dir_denied = true;
                        log::warn!(
                            "cannot publish {path} in XenStore: {e}: this domain cannot write {own}. \
                             In a driver domain dom0's virtsec creates it when this domain is in its \
                             [xenstore] driver_domains; by hand: xenstore-write {own} '' && \
                             xenstore-chmod {own} n{}. Published again when it appears.",
                            self.self_domid.unwrap_or(0)
                        );
                    }
                    None => log::warn!("cannot publish {path} in XenStore: {e}"),
                }
            }
            Completion::Reply(Op::Pass(tag), res) => {
                let mut outbox = Vec::new();
                let finished = match &mut self.pass {
                    Some((pass, _)) => pass.on_reply(tag, res, &mut outbox),
                    None => None,
                };
                for (req, tag) in outbox {
                    self.submit(req, Op::Pass(tag));
                }
                if let Some((guests, report)) = finished {
                    self.finish_pass(guests, report);
                }
            }
        }
    }

    fn on_event(&mut self, path: &str, token: &str) {
        if let Some(d) = token.strip_prefix("frontend/") {
            let watched = format!("/local/domain/{d}/device");
            if path != watched {
                self.untrusted_frontend_writes += 1;
                log::debug!("guest {d} wrote its frontend node {path}: not trusted, counted");
            }
            return;
        }
        match token {
            "request" => {
                let Some(d) = self.self_domid else { return };
                let dir = format!("/local/domain/{d}/virtsec/request/");
                if let Some(id) = path.strip_prefix(&dir) {
                    if crate::quarantine::requests::valid_id(id) && !self.requests.contains_key(id)
                    {
                        self.requests.insert(id.to_string(), (None, None));
                        self.submit(Request::Read(path.to_string()), Op::ReqValue(id.into()));
                        self.submit(Request::GetPerms(path.to_string()), Op::ReqPerms(id.into()));
                    }
                }
            }
            "domains" | "backend" | "identity" => self.request_reconcile(),
            // The directory itself (created or its permissions changed), not our own writes
            // below it.
            "owndir" if self.own_dir_denied && self.own_dir().as_deref() == Some(path) => {
                log::info!("{path} appeared: publishing there again");
                self.last_status_body = None;
                self.published_counters = None;
                self.make_request_dir();
                if let Some(q) = self.quarantine.as_mut() {
                    q.republish();
                }
            }
            "owndir" => {}
            t if t.starts_with("ddrequest/") => {
                if let Some(Ok(dd)) = t.strip_prefix("ddrequest/").map(str::parse::<u32>) {
                    let dir = format!("{}/", crate::quarantine::delegate::request_dir(dd));
                    if let Some(id) = path.strip_prefix(&dir) {
                        if crate::quarantine::requests::valid_id(id)
                            && self.driver_domains.contains_key(&dd)
                        {
                            self.submit(
                                Request::Read(path.to_string()),
                                Op::DdRequest(dd, id.to_string()),
                            );
                        }
                    }
                }
            }
            "ddresponse" => {
                let Some(d) = self.self_domid else { return };
                let dir = format!("{}/", crate::quarantine::delegate::response_dir(d));
                if path
                    .strip_prefix(&dir)
                    .is_some_and(crate::quarantine::requests::valid_id)
                {
                    self.submit(
                        Request::Read(path.to_string()),
                        Op::DdResponse(path.to_string()),
                    );
                }
            }
            t if t.starts_with("ddbackend/") => {
                if let Some(Ok(dd)) = t.strip_prefix("ddbackend/").map(str::parse::<u32>) {
                    if self.driver_domains.contains_key(&dd) {
                        self.submit(
                            Request::Directory(format!("/local/domain/{dd}/backend/vif")),
                            Op::DdBacked(dd),
                        );
                    }
                }
            }
            t if t.starts_with("name/") => self.request_reconcile(),
            _ => {}
        }
    }

    fn finish_pass(&mut self, guests: Guests, report: PassReport) {
        let elapsed = self
            .pass
            .take()
            .map(|(_, t)| t.elapsed().as_secs_f64() * 1e3);
        for line in inventory::diff(&self.inventory, &guests) {
            log::info!("{line}");
        }
        if report.frontend_mismatches > self.report.frontend_mismatches {
            log::warn!(
                "{} vif(s) have a guest-written frontend MAC that differs from the toolstack's; the backend value is used",
                report.frontend_mismatches
            );
        }
        if report.invalid_values > self.report.invalid_values {
            log::warn!(
                "{} XenStore value(s) failed validation and were ignored",
                report.invalid_values
            );
        }
        self.xs.reconciles += 1;
        self.xs.last_reconcile_ms = elapsed;
        self.inventory = guests;
        self.inventory_gen += 1;
        self.report = report;
        // Quarantine first: a rebooted quarantined VM's new vifs are held before the
        // anti-spoofing chain that would let them pass exists.
        if let Some(q) = self.quarantine.as_mut() {
            self.quarantine_errors = q.sync(&self.inventory);
        }
        self.flush_publish();
        if self.cfg.enforce.antispoof {
            let errors = match self.antispoof.as_mut() {
                Some(a) => a.sync(&self.inventory),
                None => match crate::enforce::AntiSpoof::init(&self.inventory) {
                    Ok(a) => {
                        log::info!("anti-spoofing rules installed (nftables table bridge virtsec)");
                        // What the kernel counted before this run is the baseline.
                        let mut base = std::collections::BTreeMap::new();
                        for (chain, reasons) in crate::enforce::AntiSpoof::counters() {
                            for (reason, n) in reasons {
                                base.insert((chain.clone(), reason), n);
                            }
                        }
                        self.violation_base = Some(base);
                        self.antispoof = Some(a);
                        Vec::new()
                    }
                    Err(e) => vec![e],
                },
            };
            for e in &errors {
                log::error!("{e}");
            }
            self.enforce_errors = errors.iter().map(|e| e.to_string()).collect();
        }
        if let Some(dp) = self.dataplane.as_mut() {
            dp.sync(&self.inventory, &self.policies);
        }
        self.sync_guest_watches();
        self.sync_driver_domains();
        if std::mem::take(&mut self.dirty) {
            self.request_reconcile();
        } else if !self.ready_sent {
            self.ready_sent = true;
            let vifs: usize = self.inventory.values().map(|g| g.vifs.len()).sum();
            crate::notify::ready(&format!(
                "{} guests, {vifs} vifs under policy",
                self.inventory.len()
            ));
        }
    }

    /// A XenStore request whose value and permissions are both in: decide, execute, answer.
    fn on_request(&mut self, id: &str) {
        let Some((Some(value), Some(perms))) = self.requests.get(id).cloned() else {
            return;
        };
        self.requests.remove(id);
        let Some(d) = self.self_domid else { return };
        let base = format!("/local/domain/{d}/virtsec");
        let node = format!("{base}/request/{id}");
        let value = match value {
            Ok(v) => v,
            // Removed before it was read (e.g. answered already): nothing to do.
            Err(_) => return,
        };
        let Some(q) = self.quarantine.as_mut() else {
            return;
        };
        let decision = match perms {
            Ok(p) => crate::quarantine::requests::decide(&value, &p, self.self_domid.unwrap_or(0)),
            Err(e) => Err(crate::quarantine::requests::Refusal::NoPerms(e)),
        };
        use crate::quarantine::requests::XsRequest;
        let answer = match decision {
            Ok(XsRequest::Quarantine {
                target,
                action,
                reason,
            }) => match action.parse() {
                Ok(a) => q
                    .apply(
                        &target,
                        a,
                        &reason,
                        "xenstore request (dom0)",
                        &self.inventory,
                    )
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e),
            },
            Ok(XsRequest::Release { target, reason }) => {
                let r = q
                    .release(&target, &reason, "xenstore request (dom0)", &self.inventory)
                    .map_err(|e| e.to_string());
                if let Ok(rec) = &r {
                    self.released(&rec.uuid);
                }
                r
            }
            Err(refusal) => {
                q.audit_refused(&format!("XenStore {node}"), &refusal.to_string());
                Err(refusal.to_string())
            }
        };
        let body = match answer {
            Ok(r) => serde_json::json!({"ok": true, "record": r}),
            Err(e) => serde_json::json!({"ok": false, "error": e}),
        };
        let resp = format!("{base}/response/{id}");
        self.submit(
            Request::Write(resp.clone(), body.to_string().into_bytes()),
            Op::Publish(resp),
        );
        self.submit(Request::Rm(node.clone()), Op::Publish(node));
        self.flush_publish();
    }

    /// A VM was released from quarantine: detection on its vifs starts afresh (a connection
    /// that already alerted alerts again on its next match, so the policy can act again).
    fn released(&self, uuid: &str) {
        let Some(dp) = &self.dataplane else { return };
        for g in self
            .inventory
            .values()
            .filter(|g| g.uuid.as_deref() == Some(uuid))
        {
            for v in g.vifs.values() {
                dp.released(&v.ifname);
                if let Some(emu) = &v.emu_ifname {
                    dp.released(emu);
                }
            }
        }
    }

    /// Writes what the quarantine manager publishes to XenStore, and a driver domain's
    /// requests to dom0's service.
    fn flush_publish(&mut self) {
        let ops: Vec<crate::enforce::domctl::DomainOp> = match &self.delegate_out {
            Some(q) => q
                .lock()
                .map(|mut q| std::mem::take(&mut *q))
                .unwrap_or_default(),
            None => Vec::new(),
        };
        if let (Some(d), false) = (self.self_domid, ops.is_empty()) {
            for op in ops {
                self.delegate_seq += 1;
                let id = format!(
                    "{}-{}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|t| t.as_nanos())
                        .unwrap_or(0),
                    self.delegate_seq
                );
                let node = format!("{}/{id}", crate::quarantine::delegate::request_dir(d));
                let body = serde_json::to_string(&op).unwrap_or_default();
                log::info!("asking dom0's virtsec to {op} ({node})");
                self.submit(
                    Request::Write(node.clone(), body.into_bytes()),
                    Op::Publish(node),
                );
            }
        }
        let Some(q) = self.quarantine.as_mut() else {
            return;
        };
        let items = q.take_publish();
        for (path, value) in items {
            let req = match value {
                Some(v) => Request::Write(path.clone(), v.into_bytes()),
                None => Request::Rm(path.clone()),
            };
            self.submit(req, Op::Publish(path));
        }
    }

    /// Alerts from the data plane, for the quarantine ladder.
    fn on_alerts(&mut self) {
        let Some(rx) = self.alerts_rx.as_ref() else {
            return;
        };
        let events: Vec<crate::quarantine::AlertEvent> = rx.try_iter().collect();
        let Some(q) = self.quarantine.as_mut() else {
            return;
        };
        for ev in events {
            let ladder = self
                .inventory
                .get(&ev.domid)
                .and_then(|g| self.policies.of(g).ladder)
                .unwrap_or_else(|| q.ladder().to_vec());
            match q.on_alert(&ev, &ladder, &self.inventory) {
                Some(Ok(r)) => log::info!(
                    "policy quarantined VM {} (domain {}): now {:?}",
                    r.uuid,
                    ev.domid,
                    r.actions
                ),
                Some(Err(e)) => log::error!("policy could not quarantine domain {}: {e}", ev.domid),
                None => {}
            }
        }
        self.flush_publish();
    }

    /// dom0: starts and stops serving the configured driver domains present now, and
    /// republishes their guests' identities (names may have changed).
    fn sync_driver_domains(&mut self) {
        if self.self_domid != Some(0) || self.cfg.xenstore.driver_domains.is_empty() {
            return;
        }
        let want: BTreeSet<u32> = self
            .inventory
            .values()
            .filter(|g| {
                g.name
                    .as_ref()
                    .is_some_and(|n| self.cfg.xenstore.driver_domains.contains(n))
            })
            .map(|g| g.domid)
            .collect();
        let gone: Vec<u32> = self
            .driver_domains
            .keys()
            .filter(|d| !want.contains(d))
            .copied()
            .collect();
        for dd in gone {
            let path = format!("/local/domain/{dd}/backend/vif");
            self.watches.remove(&path);
            self.submit(
                Request::Unwatch(path, format!("ddbackend/{dd}")),
                Op::Unwatch,
            );
            let req = crate::quarantine::delegate::request_dir(dd);
            self.watches.remove(&req);
            self.submit(
                Request::Unwatch(req, format!("ddrequest/{dd}")),
                Op::Unwatch,
            );
            if let Some(st) = self.driver_domains.get(&dd) {
                if !st.paused.is_empty() {
                    log::warn!(
                        "driver domain {dd} is gone; the domains paused on its request stay paused: {:?} (xl unpause)",
                        st.paused
                    );
                }
            }
            self.submit(
                Request::Rm(crate::inventory::identity::dir(dd)),
                Op::Cleanup,
            );
            self.driver_domains.remove(&dd);
        }
        for dd in want {
            if !self.driver_domains.contains_key(&dd) {
                use crate::quarantine::delegate::{paused_dir, request_dir, response_dir};
                let dir = crate::inventory::identity::dir(dd);
                let read = vec!["n0".to_string(), format!("r{dd}")];
                let both = vec!["n0".to_string(), format!("b{dd}")];
                // What an earlier run published is replaced (not what it paused: that is
                // state). Only dom0 writes identities and pauses, only this driver domain
                // reads them; it writes requests and removes answers.
                for p in [format!("{dir}/vm"), request_dir(dd), response_dir(dd)] {
                    self.submit(Request::Rm(p), Op::Cleanup);
                }
                // The driver domain's own `virtsec` directory (its counters, status and
                // automation's requests), which a domain cannot create under its
                // `/local/domain/<dd>`: it owns it, nobody else has access.
                let own = format!("/local/domain/{dd}/virtsec");
                let owned = vec![format!("n{dd}")];
                for (p, perms) in [
                    (own, &owned),
                    (dir.clone(), &read),
                    (format!("{dir}/vm"), &read),
                    (paused_dir(dd), &read),
                    (request_dir(dd), &both),
                    (response_dir(dd), &both),
                ] {
                    self.submit(Request::Mkdir(p.clone()), Op::Publish(p.clone()));
                    self.submit(Request::SetPerms(p.clone(), perms.clone()), Op::Publish(p));
                }
                self.submit(Request::Directory(paused_dir(dd)), Op::DdPaused(dd));
                let req = request_dir(dd);
                self.submit(
                    Request::Watch(req.clone(), format!("ddrequest/{dd}")),
                    Op::Watch(req),
                );
                let backend = format!("/local/domain/{dd}/backend/vif");
                self.submit(
                    Request::Watch(backend.clone(), format!("ddbackend/{dd}")),
                    Op::Watch(backend.clone()),
                );
                self.submit(Request::Directory(backend), Op::DdBacked(dd));
                self.driver_domains.insert(dd, DriverDomain::default());
                log::info!(
                    "driver domain {dd}: publishing the identities of its guests at {dir}/vm"
                );
            }
            self.publish_identities(dd);
            // A paused domain that is gone: its pause went with it, and its domid must not
            // let the driver domain unpause a later domain that reuses it.
            let gone: Vec<u32> = self
                .driver_domains
                .get(&dd)
                .map(|st| {
                    st.paused
                        .iter()
                        .filter(|d| !self.inventory.contains_key(d))
                        .copied()
                        .collect()
                })
                .unwrap_or_default();
            for d in gone {
                if let Some(st) = self.driver_domains.get_mut(&dd) {
                    st.paused.remove(&d);
                }
                self.submit(
                    Request::Rm(format!(
                        "{}/{d}",
                        crate::quarantine::delegate::paused_dir(dd)
                    )),
                    Op::Cleanup,
                );
            }
        }
    }

    /// dom0: a driver domain's pause/detach request: decided, executed, audited, answered.
    fn on_driver_domain_request(&mut self, dd: u32, id: &str, value: &[u8]) {
        use crate::quarantine::delegate::{decide, paused_dir, request_dir, response_dir};
        let Some(st) = self.driver_domains.get(&dd) else {
            return;
        };
        let empty = BTreeSet::new();
        let decision = decide(dd, value, st.backed.as_ref().unwrap_or(&empty), &st.paused);
        let name = self
            .inventory
            .get(&dd)
            .and_then(|g| g.name.clone())
            .unwrap_or_default();
        let source = format!("driver domain {dd} ({name})");
        let (request, outcome) = match (decision, self.quarantine.as_mut()) {
            (Ok(op), Some(q)) => {
                let r = q.run_delegated(&source, &op);
                (op.to_string(), r.map(|()| op))
            }
            (Ok(op), None) => (
                op.to_string(),
                Err("quarantine is unavailable in dom0's virtsec (see its status)".to_string()),
            ),
            (Err(refusal), q) => {
                if let Some(q) = q {
                    q.audit_refused(&source, &refusal.to_string());
                }
                (String::new(), Err(refusal.to_string()))
            }
        };
        let body = match &outcome {
            Ok(_) => serde_json::json!({"ok": true, "request": request}),
            Err(e) => serde_json::json!({"ok": false, "request": request, "error": e}),
        };
        if let (Ok(op), Some(st)) = (&outcome, self.driver_domains.get_mut(&dd)) {
            use crate::enforce::domctl::DomainOp;
            match op {
                DomainOp::Pause { domid } => {
                    st.paused.insert(*domid);
                    let n = format!("{}/{domid}", paused_dir(dd));
                    self.submit(Request::Write(n.clone(), Vec::new()), Op::Publish(n));
                }
                DomainOp::Unpause { domid } => {
                    st.paused.remove(domid);
                    self.submit(
                        Request::Rm(format!("{}/{domid}", paused_dir(dd))),
                        Op::Cleanup,
                    );
                }
                DomainOp::Detach { .. } => {}
            }
        }
        let resp = format!("{}/{id}", response_dir(dd));
        self.submit(
            Request::Write(resp.clone(), body.to_string().into_bytes()),
            Op::Publish(resp),
        );
        self.submit(
            Request::Rm(format!("{}/{id}", request_dir(dd))),
            Op::Cleanup,
        );
        self.flush_publish();
    }

    /// dom0: brings driver domain `dd`'s published identities in line with the inventory.
    fn publish_identities(&mut self, dd: u32) {
        let Some(st) = self.driver_domains.get_mut(&dd) else {
            return;
        };
        let Some(backed) = &st.backed else { return };
        let new = crate::inventory::identity::entries(&self.inventory, backed);
        let changes = crate::inventory::identity::changes(dd, &st.published, &new);
        st.published = new;
        for (path, value) in changes {
            let req = match value {
                Some(v) => Request::Write(path.clone(), v.into_bytes()),
                None => Request::Rm(path.clone()),
            };
            self.submit(req, Op::Publish(path));
        }
    }

    /// Registers per-guest watches for new guests and drops those of departed ones.
    fn sync_guest_watches(&mut self) {
        let now: BTreeSet<u32> = self.inventory.keys().copied().collect();
        let added: Vec<u32> = now.difference(&self.watched).copied().collect();
        let gone: Vec<u32> = self.watched.difference(&now).copied().collect();
        for d in added {
            let name = format!("/local/domain/{d}/name");
            self.submit(
                Request::Watch(name.clone(), format!("name/{d}")),
                Op::Watch(name),
            );
            if self.cfg.xenstore.watch_frontends {
                let dev = format!("/local/domain/{d}/device");
                self.submit(
                    Request::Watch(dev.clone(), format!("frontend/{d}")),
                    Op::Watch(dev),
                );
            }
            self.watched.insert(d);
        }
        for d in gone {
            let name = format!("/local/domain/{d}/name");
            let dev = format!("/local/domain/{d}/device");
            self.watches.remove(&name);
            self.watches.remove(&dev);
            self.submit(Request::Unwatch(name, format!("name/{d}")), Op::Unwatch);
            if self.cfg.xenstore.watch_frontends {
                self.submit(Request::Unwatch(dev, format!("frontend/{d}")), Op::Unwatch);
            }
            self.watched.remove(&d);
        }
    }
}
