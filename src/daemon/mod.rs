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
//!
//! This file holds the loop, the XenStore link and the reconcile pass; what the loop does
//! with the state it keeps is in one file per concern:
//! - `answers`: the control socket's requests, `virtsec status`, the Prometheus exposition;
//! - `publish`: what the service writes on its own (status and per-vif counters in XenStore,
//!   anti-spoofing events, the quarantine manager's XenStore writes);
//! - `requests`: quarantine requests automation writes in the service's XenStore directory;
//! - `driver_domains`: dom0's side of a network driver domain (identities, delegated
//!   pause/detach).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::config::Config;
use crate::control::{ControlError, ControlServer};
use crate::inventory::{self, Guests, Pass, PassReport, Tag};
use crate::xenstore::wire::{strip_nul, Request};
use crate::xenstore::{Completion, Engine, XsError};

mod answers;
mod driver_domains;
mod publish;
mod requests;

pub use answers::{QuarantineStatus, Status, Warnings, XenstoreStatus};
use driver_domains::DriverDomain;

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
    /// Frames lost to inspection as last reported, per vif, and when they were last looked at.
    losses: crate::dataplane::losses::LossWatch,
    last_loss_check: Instant,
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
                    capture: cfg.inspect.capture,
                    capture_mib: cfg.inspect.capture_mib(),
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
                losses: Default::default(),
                last_loss_check: now,
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
    fn next_wakeup(&self) -> Duration {
        let now = Instant::now();
        match &self.link {
            Link::Down { retry_at, .. } => retry_at.saturating_duration_since(now),
            Link::Up(e) if e.outstanding() > 0 => Duration::from_millis(100),
            Link::Up(_) => Duration::from_secs(1),
        }
    }

    /// Reconnects when due and detects a xenstored that stopped answering.
    fn maintain(&mut self, poll: &Poll) {
        self.report_violations();
        self.report_losses();
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
