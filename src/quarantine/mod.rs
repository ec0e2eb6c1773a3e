//! Quarantine: acting on a guest with Xen's primitives, sticky to the VM, lifted only by an
//! operator.
//!
//! A quarantine belongs to a VM **UUID**, not a domid: a VM that reboots (new domid, same
//! UUID) is held again in the same reconcile pass that sees its new vifs, before the
//! anti-spoofing chain that would let them pass is installed; a new VM that reuses a domid
//! inherits nothing. The actions:
//!
//! | action | how | undone on release |
//! |---|---|---|
//! | `isolate` | nftables (`enforce::isolate`): everything dropped both ways but the remediation allow-list; conntrack entries of the guest's addresses removed | chains and map elements removed |
//! | `throttle` | the backend `rate` key (`<bytes>,<usecs>`, netback applies it at run time) and an nftables policer (where there is no netback, as in the lab) | the toolstack's `rate` restored |
//! | `pause` | libxenctrl or `xl pause` (`enforce::domctl`); Xen's pause is reference-counted, so the domid this service paused is recorded and unpaused exactly once | unpaused once |
//! | `bridge` | the VM's bridge ports moved to `[quarantine] bridge` as isolated ports (`enforce::bridge`), and its vifs' backend `bridge` keys rewritten so a vif that appears later joins it directly | ports moved back to the bridge they came from, keys restored |
//! | `detach` | `xl network-detach` per vif, in the background, retried while it fails (bounded); the VM's vifs are isolated as with `isolate` meanwhile, so the guest is cut off at once and stays cut off if the toolstack fails | not re-attached (the operator re-attaches); the isolation removed |
//!
//! **Order and durability.** The kernel hold is applied first (it is what stops traffic; the
//! isolation latency is measured from the attack packet), then the record is written
//! atomically (`store`), then it is audited (syslog and an EVE `event_type:"quarantine"` line)
//! and published to XenStore for automation. A crash between the kernel and the file leaves a
//! kernel hold without a record: at start it is kept and a record is recreated from it. An
//! unwritable or full disk fails the operator's request with a clear error while the kernel
//! keeps holding the guest (fail safe). A state file that does not parse is reported and left
//! alone, and so is its VM's kernel hold.
//!
//! **Policy.** With `[quarantine] auto = true`, alerts whose rule priority is at most
//! `trigger_priority` move the guest one step up its ladder (`[quarantine] ladder`, or the
//! guest's `[[policy]] ladder`), at most one step per `min_step_interval_ms`, so a noisy guest
//! cannot flood actions.

pub mod delegate;
pub mod requests;
pub mod store;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::enforce::bridge;
use crate::enforce::domctl::DomainControl;
use crate::enforce::isolate::{Allow, Hold, Isolation};
use crate::inventory::{Guest, Guests};
use store::{Store, StoreError};

/// A quarantine action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Throttle,
    Isolate,
    Bridge,
    Pause,
    Detach,
}

impl Action {
    /// Whether the VM's vifs are isolated in the kernel while the action holds. `detach`
    /// isolates too: `xl network-detach` takes seconds (up to a minute with a slow backend
    /// domain) and can fail, and the guest must not talk meanwhile nor if it fails; a vif
    /// that is gone holds nothing, and one the operator attaches before the release is held.
    pub fn isolates(self) -> bool {
        matches!(self, Action::Isolate | Action::Detach)
    }
}

impl std::str::FromStr for Action {
    type Err = String;
    fn from_str(s: &str) -> Result<Action, String> {
        match s {
            "throttle" => Ok(Action::Throttle),
            "isolate" => Ok(Action::Isolate),
            "pause" => Ok(Action::Pause),
            "bridge" => Ok(Action::Bridge),
            "detach" => Ok(Action::Detach),
            o => Err(format!(
                "unknown action {o:?}: expected throttle, isolate, bridge, pause or detach"
            )),
        }
    }
}

/// One VM's quarantine, as stored and as shown by `virtsec quarantined`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub uuid: String,
    pub name: Option<String>,
    /// The domid when the quarantine was last applied (informational: it follows the UUID).
    pub domid: Option<u32>,
    pub actions: Vec<Action>,
    pub reason: String,
    /// Unix seconds of the first action.
    pub since: u64,
    /// Who acted: `operator <user>` or `policy` (with the alert in `reason`).
    pub by: String,
    /// The domid this service paused, to unpause exactly once.
    #[serde(default)]
    pub paused: Option<u32>,
    /// The toolstack's backend `rate` of each throttled vif (by devid) before the throttle,
    /// restored on release (`None`: there was none).
    #[serde(default)]
    pub rates: BTreeMap<u32, Option<String>>,
    /// `bridge`: where each moved vif (by devid) goes back to on release.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bridges: BTreeMap<u32, Moved>,
    /// Set durably when a release starts: a service killed in the middle of a release
    /// finishes it at restart instead of re-applying the quarantine (and a kernel hold with no
    /// record at all is a quarantine whose record was not written yet: kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub releasing: Option<Releasing>,
}

/// A vif the `bridge` action moved: what to restore on release.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    /// The toolstack's backend `bridge` key before (`None`: there was none).
    pub key: Option<String>,
    /// The bridge its port was on when it was moved (used when the key names none).
    pub bridge: Option<String>,
}

impl Moved {
    /// Where the vif goes back to.
    fn back(&self) -> Option<&str> {
        self.key.as_deref().or(self.bridge.as_deref())
    }
}

/// Who asked for a release in progress, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Releasing {
    pub reason: String,
    pub by: String,
}

/// `[quarantine]`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct QuarantineConfig {
    /// Where quarantine records live (`<state_dir>/quarantine/<uuid>.json`).
    pub state_dir: PathBuf,
    /// Act on alerts by the ladder (off: only operators quarantine).
    pub auto: bool,
    /// Steps taken one per triggering alert.
    pub ladder: Vec<Action>,
    /// Alerts whose rule priority is at most this trigger a step (1 is the most severe).
    pub trigger_priority: u8,
    /// At most one step per guest per this many milliseconds.
    pub min_step_interval_ms: u64,
    /// `throttle`: the guest's rate, kilobytes per second.
    pub throttle_kbytes_per_s: u32,
    /// "auto" (libxenctrl, then xl), "xenctrl", "xl" or "none".
    pub domain_control: String,
    /// Flows an isolated guest keeps (`[[quarantine.allow]]`: proto, port, host).
    pub allow: Vec<Allow>,
    /// `bridge`: the quarantine bridge (created, with no address, if it does not exist).
    #[serde(deserialize_with = "bridge_name")]
    pub bridge: String,
}

/// The quarantine bridge's name must be a Linux interface name.
fn bridge_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if crate::inventory::model::valid_ifname(&s) {
        Ok(s)
    } else {
        Err(serde::de::Error::custom(format!(
            "{s:?} is not an interface name (1-15 characters, no '/', ':' or spaces)"
        )))
    }
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig {
            state_dir: PathBuf::from("/var/lib/virtsec"),
            auto: false,
            ladder: vec![Action::Isolate],
            trigger_priority: 1,
            min_step_interval_ms: 1000,
            throttle_kbytes_per_s: 1024,
            domain_control: "auto".into(),
            allow: Vec::new(),
            bridge: "vsquarantine".into(),
        }
    }
}

/// Errors of quarantine requests.
#[derive(Debug, thiserror::Error)]
pub enum QuarantineError {
    #[error("no guest or quarantined VM matches {0:?} (give a UUID, a name or a running domid)")]
    NoSuchTarget(String),
    #[error("{0:?} matches several guests; give the UUID")]
    Ambiguous(String),
    #[error("domain {0} has no readable VM UUID (/local/domain/{0}/vm) and quarantine follows UUIDs; a network driver domain cannot read it: quarantine from dom0's virtsec")]
    NoUuid(u32),
    #[error("{0} is not quarantined")]
    NotQuarantined(String),
    #[error("the kernel refused the quarantine: {0}")]
    Kernel(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    DomCtl(#[from] crate::enforce::domctl::DomCtlError),
}

/// An alert as the policy sees it.
#[derive(Clone, Debug)]
pub struct AlertEvent {
    pub domid: u32,
    pub uuid: Option<String>,
    pub gid: u32,
    pub sid: u32,
    pub priority: Option<u8>,
    pub msg: String,
}

/// A XenStore change for the daemon to make (path, value; `None` removes).
pub type Publish = (String, Option<String>);

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The quarantine manager (owned by the daemon's event loop).
pub struct Quarantine {
    cfg: QuarantineConfig,
    store: Store,
    records: BTreeMap<String, Record>,
    /// State files that did not load (their VMs' kernel holds are kept).
    corrupt: Vec<String>,
    corrupt_uuids: BTreeSet<String>,
    iso: Option<Isolation>,
    domctl: Box<dyn DomainControl>,
    last_step: HashMap<String, Instant>,
    eve: Option<std::fs::File>,
    /// Recent audit records (newest last) for `virtsec quarantined --json`.
    audit: VecDeque<serde_json::Value>,
    /// XenStore changes waiting for the daemon.
    publish: Vec<Publish>,
    /// The service's own XenStore path (`/local/domain/<self>`), when known.
    pub xs_base: Option<String>,
    /// Steps the rate limit held back.
    pub rate_limited: u64,
}

impl Quarantine {
    /// Loads the state and reconciles the kernel's holds with it.
    pub fn open(
        cfg: QuarantineConfig,
        eve: Option<PathBuf>,
        domctl: Box<dyn DomainControl>,
    ) -> Result<Quarantine, QuarantineError> {
        let store = Store::open(&cfg.state_dir)?;
        let (records, bad) = store.load()?;
        let mut corrupt_uuids = BTreeSet::new();
        let corrupt: Vec<String> = bad
            .iter()
            .map(|e| {
                if let StoreError::Corrupt { path, .. } = e {
                    if let Some(u) = path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| n.strip_suffix(".json"))
                    {
                        corrupt_uuids.insert(u.to_string());
                    }
                }
                log::error!("{e}");
                e.to_string()
            })
            .collect();
        let eve = eve.and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        });
        // The kernel table is touched only when there is (or was) something to hold: a host
        // that never quarantined anything keeps its ruleset as it was.
        let table_exists =
            crate::enforce::nft_json("list table bridge virtsec_q").is_ok_and(|v| !v.is_null());
        let mut q = Quarantine {
            cfg,
            store,
            records,
            corrupt,
            corrupt_uuids,
            iso: None,
            domctl,
            last_step: HashMap::new(),
            eve,
            audit: VecDeque::new(),
            publish: Vec::new(),
            xs_base: None,
            rate_limited: 0,
        };
        // With the policy on, the table is set up now so the first isolation is one
        // transaction, not three (the latency budget is milliseconds).
        if table_exists || !q.records.is_empty() || q.cfg.auto {
            q.isolation()?;
        }
        // Kernel holds without a record (a crash between the kernel and the disk): keep them
        // and recreate the record so an operator sees and releases them.
        let orphans: Vec<String> = q
            .iso
            .as_ref()
            .map(|i| {
                i.held()
                    .filter(|u| store::valid_uuid(u))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        for u in orphans {
            if q.records.contains_key(&u) || q.corrupt_uuids.contains(&u) {
                continue;
            }
            // What the kernel says it was; a hold of no known kind (a policer) is kept as an
            // isolation: stricter, never looser.
            let (isolates, bridged) = q.iso.as_ref().map_or((true, false), |i| i.held_as(&u));
            let mut actions = Vec::new();
            if bridged {
                actions.push(Action::Bridge);
            }
            if isolates || !bridged {
                actions.push(Action::Isolate);
            }
            let r = Record {
                uuid: u.clone(),
                name: None,
                domid: None,
                actions,
                reason: "recovered: the kernel held this VM without a state record".into(),
                since: now_s(),
                by: "virtsecd (recovery)".into(),
                paused: None,
                rates: BTreeMap::new(),
                bridges: BTreeMap::new(),
                releasing: None,
            };
            log::warn!("quarantine of {u}: {}", r.reason);
            if let Err(e) = q.store.save(&r) {
                log::error!("{e}");
            }
            q.records.insert(u, r);
        }
        for r in q.records.values() {
            log::info!(
                "quarantine of {} ({}) restored from state: {:?} since {}",
                r.uuid,
                r.name.as_deref().unwrap_or("?"),
                r.actions,
                r.since
            );
        }
        Ok(q)
    }

    fn isolation(&mut self) -> Result<&mut Isolation, QuarantineError> {
        if self.iso.is_none() {
            self.iso = Some(Isolation::open().map_err(|e| QuarantineError::Kernel(e.to_string()))?);
        }
        self.iso
            .as_mut()
            .ok_or_else(|| QuarantineError::Kernel("unavailable".into()))
    }

    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.records.values()
    }

    pub fn corrupt(&self) -> &[String] {
        &self.corrupt
    }

    pub fn is_quarantined(&self, uuid: &str) -> bool {
        self.records.contains_key(uuid)
    }

    pub fn domctl_how(&self) -> &'static str {
        self.domctl.how()
    }

    /// XenStore changes to make (drained).
    pub fn take_publish(&mut self) -> Vec<Publish> {
        std::mem::take(&mut self.publish)
    }

    pub fn audit_log(&self) -> impl Iterator<Item = &serde_json::Value> {
        self.audit.iter()
    }

    /// The UUID a target names: a UUID, a running domid or a name (of a running guest or a
    /// quarantined VM).
    fn resolve(&self, target: &str, guests: &Guests) -> Result<String, QuarantineError> {
        let t = target.trim();
        let lower = t.to_ascii_lowercase();
        if store::valid_uuid(&lower) {
            return Ok(lower);
        }
        if let Ok(d) = t.parse::<u32>() {
            let g = guests
                .get(&d)
                .ok_or_else(|| QuarantineError::NoSuchTarget(t.into()))?;
            return g.uuid.clone().ok_or(QuarantineError::NoUuid(d));
        }
        let mut found: BTreeSet<String> = guests
            .values()
            .filter(|g| g.name.as_deref() == Some(t))
            .filter_map(|g| g.uuid.clone())
            .collect();
        found.extend(
            self.records
                .values()
                .filter(|r| r.name.as_deref() == Some(t))
                .map(|r| r.uuid.clone()),
        );
        match found.len() {
            0 => Err(QuarantineError::NoSuchTarget(t.into())),
            1 => Ok(found.into_iter().next().unwrap_or_default()),
            _ => Err(QuarantineError::Ambiguous(t.into())),
        }
    }

    fn guest_of<'a>(guests: &'a Guests, uuid: &str) -> Option<&'a Guest> {
        guests.values().find(|g| {
            g.uuid
                .as_deref()
                .is_some_and(|u| u.eq_ignore_ascii_case(uuid))
        })
    }

    /// What the kernel should hold, per UUID.
    fn wanted(&self, guests: &Guests) -> BTreeMap<String, (Hold, BTreeSet<String>)> {
        let mut want = BTreeMap::new();
        for r in self.records.values() {
            let isolate = r.actions.iter().any(|a| a.isolates());
            let throttle = r.actions.contains(&Action::Throttle);
            let bridge = r.actions.contains(&Action::Bridge);
            if !isolate && !throttle && !bridge {
                continue;
            }
            let mut ports = BTreeSet::new();
            for g in guests.values().filter(|g| {
                g.uuid
                    .as_deref()
                    .is_some_and(|u| u.eq_ignore_ascii_case(&r.uuid))
            }) {
                for v in g.vifs.values() {
                    ports.extend(bridge_ports(v));
                }
            }
            // netback applies the backend `rate` key itself; the nftables policer stands in
            // where the vif is not a netback device (a veth in the lab).
            let netback = ports
                .iter()
                .any(|p| std::path::Path::new(&format!("/sys/class/net/{p}/device")).exists());
            let policer = (throttle && !netback).then_some(self.cfg.throttle_kbytes_per_s);
            if !isolate && !bridge && policer.is_none() {
                // Held by netback's rate key alone: nothing for the kernel table.
                continue;
            }
            want.insert(
                r.uuid.clone(),
                (
                    Hold {
                        isolate,
                        throttle_kbytes: policer,
                        allow: self.cfg.allow.clone(),
                        bridge,
                    },
                    ports,
                ),
            );
        }
        want
    }

    /// Makes the kernel table hold what the records say (set up on first need).
    fn sync_kernel(&mut self, guests: &Guests) -> Vec<String> {
        let want = self.wanted(guests);
        if want.is_empty() && self.iso.is_none() {
            return Vec::new();
        }
        let keep = self.corrupt_uuids.clone();
        match self.isolation() {
            Ok(iso) => iso
                .sync(&want, &keep)
                .iter()
                .map(|e| e.to_string())
                .collect(),
            Err(e) => vec![e.to_string()],
        }
    }

    /// Brings the kernel, the hypervisor and XenStore in line with the records for the
    /// current inventory. Called after every reconcile pass, before anti-spoofing.
    pub fn sync(&mut self, guests: &Guests) -> Vec<String> {
        // Releases a killed service had started are finished first.
        let pending: Vec<String> = self
            .records
            .values()
            .filter(|r| r.releasing.is_some())
            .map(|r| r.uuid.clone())
            .collect();
        for u in pending {
            match self.finish_release(&u, guests) {
                Ok(_) => log::info!("quarantine of {u}: release finished after a restart"),
                Err(e) => log::error!("quarantine of {u}: cannot finish its release: {e}"),
            }
        }
        let mut errors = self.sync_kernel(guests);
        // A paused VM that rebooted (new domid) is paused again; throttled vifs get the rate.
        let uuids: Vec<String> = self.records.keys().cloned().collect();
        for u in uuids {
            if let Err(e) = self.follow(&u, guests) {
                errors.push(e.to_string());
            }
        }
        for e in &errors {
            log::error!("quarantine: {e}");
        }
        errors
    }

    /// Applies a record's domain-level actions to the VM's current domid.
    fn follow(&mut self, uuid: &str, guests: &Guests) -> Result<(), QuarantineError> {
        let Some(g) = Self::guest_of(guests, uuid) else {
            return Ok(());
        };
        let Some(r) = self.records.get(uuid).cloned() else {
            return Ok(());
        };
        let mut changed = false;
        let mut r2 = r.clone();
        // A record recovered from the kernel learns its VM's name and domid.
        if r2.name.is_none() && g.name.is_some() {
            r2.name = g.name.clone();
            r2.domid = Some(g.domid);
            changed = true;
        }
        if r.actions.contains(&Action::Pause) && r.paused != Some(g.domid) {
            self.domctl.pause(g.domid)?;
            r2.paused = Some(g.domid);
            r2.domid = Some(g.domid);
            changed = true;
        }
        if r.actions.contains(&Action::Throttle) {
            // netback's credit scheduler: `bytes` per `usecs` window, read at run time.
            let (bytes, usecs) = (
                u64::from(self.cfg.throttle_kbytes_per_s) * 1024 / 20,
                50_000,
            );
            let want = format!("{bytes},{usecs}");
            if let Some(base) = self.xs_base.clone() {
                for v in g.vifs.values() {
                    if v.rate.as_deref() != Some(want.as_str()) {
                        if let std::collections::btree_map::Entry::Vacant(e) =
                            r2.rates.entry(v.devid)
                        {
                            e.insert(v.rate.clone());
                            changed = true;
                        }
                        self.publish.push((
                            format!("{base}/backend/vif/{}/{}/rate", g.domid, v.devid),
                            Some(want.clone()),
                        ));
                    }
                }
            }
        }
        if r.actions.contains(&Action::Bridge) {
            changed |= self.hold_on_bridge(&mut r2, g)?;
        }
        if changed {
            self.store.save(&r2)?;
            self.records.insert(uuid.to_string(), r2);
        }
        Ok(())
    }

    /// `bridge`: points the VM's backend `bridge` keys at the quarantine bridge (what
    /// `vif-bridge` reads for a vif that appears later) and moves the bridge ports it already
    /// has there, isolated. Returns whether the record learnt something to restore.
    fn hold_on_bridge(&mut self, r: &mut Record, g: &Guest) -> Result<bool, QuarantineError> {
        let qbr = self.cfg.bridge.clone();
        let kernel = |e: crate::enforce::EnforceError| QuarantineError::Kernel(e.to_string());
        let mut changed = false;
        let mut ensured = false;
        for v in g.vifs.values() {
            if v.bridge.as_deref() != Some(qbr.as_str()) {
                if let Some(base) = &self.xs_base {
                    if let std::collections::btree_map::Entry::Vacant(e) = r.bridges.entry(v.devid)
                    {
                        e.insert(Moved {
                            key: v.bridge.clone(),
                            bridge: None,
                        });
                        changed = true;
                    }
                    self.publish.push((
                        format!("{base}/backend/vif/{}/{}/bridge", g.domid, v.devid),
                        Some(qbr.clone()),
                    ));
                }
            }
            for name in bridge_ports(v) {
                let Some(p) = bridge::port(&name) else {
                    continue;
                };
                let Some(master) = p.master else {
                    continue;
                };
                if master == qbr {
                    if !p.isolated {
                        bridge::set_isolated(&name, true).map_err(kernel)?;
                    }
                    continue;
                }
                if !ensured {
                    bridge::ensure_bridge(&qbr).map_err(kernel)?;
                    ensured = true;
                }
                let m = r.bridges.entry(v.devid).or_insert_with(|| Moved {
                    key: v.bridge.clone(),
                    bridge: None,
                });
                if m.bridge.is_none() {
                    m.bridge = Some(master.clone());
                    changed = true;
                }
                bridge::move_port(&name, &qbr, true).map_err(kernel)?;
                log::info!(
                    "quarantine of {}: {name} moved from bridge {master} to {qbr}",
                    r.uuid
                );
            }
        }
        Ok(changed)
    }

    /// Whether the kernel and XenStore hold a new vif of a quarantined VM as its record says,
    /// so its policy can be reported in place: for `bridge`, the vif's backend `bridge` key
    /// (what `vif-bridge` will read) names the quarantine bridge.
    pub fn vif_held(&self, g: &Guest, v: &crate::inventory::Vif) -> bool {
        let Some(r) = g.uuid.as_deref().and_then(|u| self.records.get(u)) else {
            return true;
        };
        !r.actions.contains(&Action::Bridge)
            || self.xs_base.is_none()
            || v.bridge.as_deref() == Some(self.cfg.bridge.as_str())
    }

    /// Quarantines `target` with `action`.
    pub fn apply(
        &mut self,
        target: &str,
        action: Action,
        reason: &str,
        by: &str,
        guests: &Guests,
    ) -> Result<Record, QuarantineError> {
        let uuid = self.resolve(target, guests)?;
        let g = Self::guest_of(guests, &uuid);
        let mut r = self.records.get(&uuid).cloned().unwrap_or_else(|| Record {
            uuid: uuid.clone(),
            name: g.and_then(|g| g.name.clone()),
            domid: g.map(|g| g.domid),
            actions: Vec::new(),
            reason: String::new(),
            since: now_s(),
            by: by.into(),
            paused: None,
            rates: BTreeMap::new(),
            bridges: BTreeMap::new(),
            releasing: None,
        });
        if let Some(g) = g {
            r.name = g.name.clone().or(r.name);
            r.domid = Some(g.domid);
        }
        if !r.actions.contains(&action) {
            r.actions.push(action);
            r.actions.sort();
        }
        r.reason = reason.into();
        r.by = by.into();
        // The kernel first: that is what stops the traffic.
        self.records.insert(uuid.clone(), r.clone());
        let kernel_errors = self.sync_kernel(guests);
        if action.isolates() {
            if let Some(g) = g {
                flush_conntrack(g);
            }
        }
        let mut domain_error: Option<QuarantineError> = None;
        match action {
            Action::Pause => {
                if let Some(g) = g {
                    if r.paused != Some(g.domid) {
                        match self.domctl.pause(g.domid) {
                            Ok(()) => r.paused = Some(g.domid),
                            Err(e) => domain_error = Some(e.into()),
                        }
                    }
                }
            }
            Action::Detach => {
                if let Some(g) = g {
                    for v in g.vifs.values() {
                        if let Err(e) = self.domctl.detach_vif(g.domid, v.devid) {
                            domain_error = Some(e.into());
                        }
                    }
                }
            }
            Action::Bridge => {
                if let Some(g) = g {
                    if let Err(e) = self.hold_on_bridge(&mut r, g) {
                        // Ports already moved go back with the rollback below.
                        let _ = self.bridge_back(&r, g);
                        domain_error = Some(e);
                    }
                }
            }
            Action::Throttle | Action::Isolate => {}
        }
        if let Some(e) = domain_error {
            // Nothing was done at the domain level: keep what the record held before.
            r.actions.retain(|a| *a != action);
            if r.actions.is_empty() {
                self.records.remove(&uuid);
                let _ = self.sync_kernel(guests);
            } else {
                r.bridges.clear();
                self.records.insert(uuid.clone(), r);
            }
            return Err(e);
        }
        self.records.insert(uuid.clone(), r.clone());
        if action == Action::Throttle {
            let _ = self.follow(&uuid, guests);
            r = self.records.get(&uuid).cloned().unwrap_or(r);
        }
        if let Some(e) = kernel_errors.into_iter().next() {
            return Err(QuarantineError::Kernel(e));
        }
        self.store.save(&r)?;
        self.audit_event("apply", Some(action), &r, reason, by);
        self.publish_record(&r);
        Ok(r)
    }

    /// Lifts the quarantine of `target`.
    pub fn release(
        &mut self,
        target: &str,
        reason: &str,
        by: &str,
        guests: &Guests,
    ) -> Result<Record, QuarantineError> {
        let uuid = self.resolve(target, guests)?;
        let mut r = self
            .records
            .get(&uuid)
            .cloned()
            .ok_or_else(|| QuarantineError::NotQuarantined(target.into()))?;
        // Durably "releasing" first: from here a crash finishes the release at restart.
        r.releasing = Some(Releasing {
            reason: reason.into(),
            by: by.into(),
        });
        self.store.save(&r)?;
        self.records.insert(uuid.clone(), r);
        self.finish_release(&uuid, guests)
    }

    /// Undoes a record's actions, removes it and audits the release.
    fn finish_release(&mut self, uuid: &str, guests: &Guests) -> Result<Record, QuarantineError> {
        let r = self
            .records
            .get(uuid)
            .cloned()
            .ok_or_else(|| QuarantineError::NotQuarantined(uuid.into()))?;
        let Releasing { reason, by } = r.releasing.clone().unwrap_or(Releasing {
            reason: String::new(),
            by: String::new(),
        });
        let g = Self::guest_of(guests, uuid);
        if let (Some(d), Some(g)) = (r.paused, g) {
            if g.domid == d {
                // After a crash this may be the second unpause: Xen refuses it harmlessly.
                if let Err(e) = self.domctl.unpause(d) {
                    log::warn!("releasing {uuid}: {e}");
                }
            }
        }
        // Throttled vifs get the toolstack's rate back.
        if let (Some(g), Some(base)) = (g, self.xs_base.clone()) {
            for (devid, orig) in &r.rates {
                if g.vifs.contains_key(devid) {
                    self.publish.push((
                        format!("{base}/backend/vif/{}/{devid}/rate", g.domid),
                        orig.clone(),
                    ));
                }
            }
        }
        if let Some(g) = g {
            // A port left on the quarantine bridge keeps the VM there: the release stays
            // pending and is retried on the next pass.
            self.bridge_back(&r, g)
                .map_err(|e| QuarantineError::Kernel(e.to_string()))?;
        }
        self.records.remove(uuid);
        let errors = self.sync_kernel(guests);
        if let Some(e) = errors.into_iter().next() {
            // Still held in the kernel: still quarantined (the release stays pending).
            self.records.insert(uuid.to_string(), r);
            return Err(QuarantineError::Kernel(e));
        }
        self.store.remove(uuid)?;
        self.last_step.remove(uuid);
        self.audit_event("release", None, &r, &reason, &by);
        if let Some(base) = &self.xs_base {
            self.publish
                .push((format!("{base}/virtsec/quarantine/{uuid}"), None));
        }
        Ok(r)
    }

    /// Undoes `bridge` for the VM's current vifs: backend keys restored, ports on the
    /// quarantine bridge moved back (not isolated) to where they came from.
    fn bridge_back(&mut self, r: &Record, g: &Guest) -> Result<(), crate::enforce::EnforceError> {
        if r.bridges.is_empty() {
            return Ok(());
        }
        let qbr = self.cfg.bridge.clone();
        for v in g.vifs.values() {
            let Some(m) = r.bridges.get(&v.devid) else {
                continue;
            };
            if let Some(base) = &self.xs_base {
                if v.bridge.as_deref() == Some(qbr.as_str()) {
                    self.publish.push((
                        format!("{base}/backend/vif/{}/{}/bridge", g.domid, v.devid),
                        m.key.clone(),
                    ));
                }
            }
            for name in bridge_ports(v) {
                if bridge::port(&name).and_then(|p| p.master).as_deref() != Some(qbr.as_str()) {
                    continue;
                }
                match m.back() {
                    Some(b) => {
                        bridge::move_port(&name, b, false)?;
                        log::info!("quarantine of {}: {name} back on bridge {b}", r.uuid);
                    }
                    None => log::warn!(
                        "quarantine of {}: {name} stays on {qbr}: neither the toolstack nor the kernel named its bridge before",
                        r.uuid
                    ),
                }
            }
        }
        Ok(())
    }

    /// Moves the alert's guest one step up its ladder if the alert is severe enough and the
    /// rate limit allows. Returns the record when an action was taken.
    pub fn on_alert(
        &mut self,
        ev: &AlertEvent,
        ladder: &[Action],
        guests: &Guests,
    ) -> Option<Result<Record, QuarantineError>> {
        if !self.cfg.auto || ev.priority.unwrap_or(3) > self.cfg.trigger_priority {
            return None;
        }
        if ladder.is_empty() {
            return None;
        }
        let Some(uuid) = ev.uuid.clone() else {
            // Quarantine follows UUIDs; a service that cannot read the VM's (a driver domain:
            // `/local/domain/<D>/vm` is dom0's and the guest's only) says so instead of
            // silently not acting, at most once per step interval per domain.
            let key = format!("domain {}", ev.domid);
            let now = Instant::now();
            if let Some(t) = self.last_step.get(&key) {
                if now.duration_since(*t).as_millis() < u128::from(self.cfg.min_step_interval_ms) {
                    self.rate_limited += 1;
                    return None;
                }
            }
            self.last_step.insert(key, now);
            return Some(Err(QuarantineError::NoUuid(ev.domid)));
        };
        let held: Vec<Action> = self
            .records
            .get(&uuid)
            .map(|r| r.actions.clone())
            .unwrap_or_default();
        let next = ladder.iter().find(|a| !held.contains(a)).copied()?;
        let now = Instant::now();
        if let Some(t) = self.last_step.get(&uuid) {
            if now.duration_since(*t).as_millis() < u128::from(self.cfg.min_step_interval_ms) {
                self.rate_limited += 1;
                return None;
            }
        }
        self.last_step.insert(uuid.clone(), now);
        let reason = format!(
            "alert [{}:{}] {} from domain {}",
            ev.gid, ev.sid, ev.msg, ev.domid
        );
        Some(self.apply(&uuid, next, &reason, "policy", guests))
    }

    pub fn ladder(&self) -> &[Action] {
        &self.cfg.ladder
    }

    fn publish_record(&mut self, r: &Record) {
        if let Some(base) = &self.xs_base {
            let v = serde_json::json!({
                "actions": r.actions,
                "reason": r.reason,
                "since": r.since,
                "by": r.by,
                "domid": r.domid,
                "name": r.name,
            });
            self.publish.push((
                format!("{base}/virtsec/quarantine/{}", r.uuid),
                Some(v.to_string()),
            ));
        }
    }

    /// Every current record, again (after a XenStore reconnect).
    pub fn republish(&mut self) {
        let rs: Vec<Record> = self.records.values().cloned().collect();
        for r in &rs {
            self.publish_record(r);
        }
    }

    /// dom0: runs a driver domain's pause/detach request (`delegate`) and audits it.
    pub fn run_delegated(
        &mut self,
        source: &str,
        op: &crate::enforce::domctl::DomainOp,
    ) -> Result<(), String> {
        let r = op.run(self.domctl.as_mut()).map_err(|e| e.to_string());
        let outcome = match &r {
            Ok(()) => "done".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        let v = serde_json::json!({
            "timestamp": crate::inspect::eve::format_time(SystemTime::now()),
            "event_type": "quarantine",
            "quarantine": {"op": "delegated", "request": op, "by": source, "outcome": outcome},
            "xen": {"domid": op.domid()},
        });
        log::warn!(
            target: "virtsec::event::quarantine",
            op = "delegated",
            by = source,
            domid = op.domid().to_string().as_str();
            "{source} asked to {op}: {outcome}"
        );
        self.audit_line(v);
        r
    }

    /// Audits how the toolstack's background detaches ended (`enforce::domctl`): an EVE
    /// `quarantine` record with op `detached` or `detach-failed`, naming the guest.
    pub fn audit_domctl_reports(&mut self, guests: &Guests) {
        for rep in self.domctl.take_reports() {
            let g = guests.get(&rep.domid);
            let uuid = g.and_then(|g| g.uuid.clone());
            let name = g.and_then(|g| g.name.clone());
            let op = if rep.error.is_none() {
                "detached"
            } else {
                "detach-failed"
            };
            let v = serde_json::json!({
                "timestamp": crate::inspect::eve::format_time(SystemTime::now()),
                "event_type": "quarantine",
                "quarantine": {
                    "op": op,
                    "action": Action::Detach,
                    "vif": rep.devid,
                    "tries": rep.tries,
                    "error": rep.error,
                    "by": self.domctl.how(),
                },
                "xen": {"domid": rep.domid, "uuid": uuid, "name": name},
            });
            log::warn!(
                target: "virtsec::event::quarantine",
                op = op,
                uuid = uuid.as_deref().unwrap_or_default(),
                domid = rep.domid.to_string().as_str();
                "quarantine {op}: vif {} of domain {} ({}) after {} tr{}{}",
                rep.devid,
                rep.domid,
                name.as_deref().unwrap_or("?"),
                rep.tries,
                if rep.tries == 1 { "y" } else { "ies" },
                rep.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default(),
            );
            self.audit_line(v);
        }
    }

    fn audit_line(&mut self, v: serde_json::Value) {
        if let Some(f) = &mut self.eve {
            let mut line = v.to_string().into_bytes();
            line.push(b'\n');
            if let Err(e) = f.write_all(&line) {
                log::error!("cannot write the quarantine audit record to the EVE file: {e}");
            }
        }
        self.audit.push_back(v);
        if self.audit.len() > 1000 {
            self.audit.pop_front();
        }
    }

    /// Audits a request that was not executed (e.g. a XenStore request not written by dom0).
    pub fn audit_refused(&mut self, source: &str, why: &str) {
        let v = serde_json::json!({
            "timestamp": crate::inspect::eve::format_time(SystemTime::now()),
            "event_type": "quarantine",
            "quarantine": {"op": "refused", "source": source, "reason": why},
        });
        log::warn!(
            target: "virtsec::event::quarantine",
            op = "refused",
            source = source,
            reason = why;
            "quarantine request from {source} refused: {why}"
        );
        self.audit_line(v);
    }

    fn audit_event(&mut self, op: &str, action: Option<Action>, r: &Record, why: &str, by: &str) {
        let v = serde_json::json!({
            "timestamp": crate::inspect::eve::format_time(SystemTime::now()),
            "event_type": "quarantine",
            "quarantine": {
                "op": op,
                "action": action,
                "actions": r.actions,
                "reason": why,
                "by": by,
            },
            "xen": {"domid": r.domid, "uuid": r.uuid, "name": r.name},
        });
        log::warn!(
            target: "virtsec::event::quarantine",
            op = op,
            action = action.map(|a| format!("{a:?}").to_lowercase()).unwrap_or_default().as_str(),
            uuid = r.uuid.as_str(),
            domid = r.domid.map(|d| d.to_string()).unwrap_or_default().as_str(),
            by = by,
            reason = why;
            "quarantine {op}{} of VM {} ({}, domain {}) by {by}: {why}",
            action
                .map(|a| format!(" {a:?}").to_lowercase())
                .unwrap_or_default(),
            r.uuid,
            r.name.as_deref().unwrap_or("?"),
            r.domid.map(|d| d.to_string()).unwrap_or_else(|| "-".into()),
        );
        self.audit_line(v);
    }
}

/// The interfaces of a vif that can be bridge ports: the vif, its `-emu` twin and their
/// inline ports (`vsb…`, on the bridge while the vif is spliced out).
fn bridge_ports(v: &crate::inventory::Vif) -> Vec<String> {
    let mut names = vec![v.ifname.clone()];
    names.extend(v.emu_ifname.clone());
    let mut out = Vec::new();
    for n in names {
        if let Some((b, _)) = crate::capture::inline::port_names(&n) {
            out.push(b);
        }
        out.push(n);
    }
    out
}

/// Cuts the guest's existing connections: conntrack entries to and from its addresses
/// (matters where the backend domain routes or NATs its guests; a pure bridge has none).
fn flush_conntrack(g: &Guest) {
    for v in g.vifs.values() {
        for ip in &v.ips {
            for dir in ["--orig-src", "--orig-dst"] {
                let _ = std::process::Command::new("conntrack")
                    .args(["-D", dir, &ip.to_string()])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_parse() {
        assert_eq!("isolate".parse::<Action>(), Ok(Action::Isolate));
        assert_eq!("bridge".parse::<Action>(), Ok(Action::Bridge));
        assert!("nuke".parse::<Action>().is_err());
    }

    /// Runs `f` in a network namespace of its own where this process may make one (root):
    /// the quarantine's kernel table is per namespace, and these tests hold the same VM, so
    /// run side by side in the host's namespace one saw the other's hold as an orphan left by
    /// a crash, took it over, and its alert then found the VM already held (a flaky failure).
    fn own_netns(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            // Not root: the host's namespace, where the kernel side fails as it always did.
            let _ = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET);
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    }

    fn guest(domid: u32, bridge: &str) -> Guests {
        let vif = crate::inventory::Vif {
            devid: 0,
            // No such interface here: only the XenStore side is exercised.
            ifname: format!("vqtest{domid}.0"),
            emu_ifname: None,
            mac: None,
            ips: Vec::new(),
            bridge: Some(bridge.into()),
            script: None,
            state: None,
            hotplug_status: None,
            online: true,
            rate: None,
            mtu: None,
        };
        let g = Guest {
            domid,
            uuid: Some("5e1ab000-0000-4000-8000-000000000005".into()),
            name: Some("web".into()),
            label: None,
            introduced: Some(true),
            vifs: BTreeMap::from([(0, vif)]),
        };
        BTreeMap::from([(domid, g)])
    }

    #[test]
    fn the_bridge_action_points_new_vifs_at_the_quarantine_bridge_and_restores_the_key() {
        own_netns(the_bridge_action_body);
    }

    fn the_bridge_action_body() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = QuarantineConfig {
            state_dir: dir.path().to_path_buf(),
            ..Default::default()
        };
        let mut q = Quarantine::open(cfg, None, Box::new(crate::enforce::domctl::NoXen)).unwrap();
        q.xs_base = Some("/local/domain/0".into());
        let key = "/local/domain/0/backend/vif/5/0/bridge";
        let prod = guest(5, "xenbr0");
        let r = q
            .apply("web", Action::Bridge, "case 7", "operator", &prod)
            .unwrap();
        assert_eq!(r.bridges[&0].key.as_deref(), Some("xenbr0"));
        assert!(q
            .take_publish()
            .contains(&(key.into(), Some("vsquarantine".into()))));
        // Until XenStore says the vif goes to the quarantine bridge, its policy is not in
        // place (vif-bridge must not run yet).
        let g = &prod[&5];
        assert!(!q.vif_held(g, &g.vifs[&0]));
        let held = guest(5, "vsquarantine");
        let g = &held[&5];
        assert!(q.vif_held(g, &g.vifs[&0]));
        // The VM reboots as domain 8: the toolstack writes its key again, the record keeps
        // the original and the new key is rewritten.
        let reboot = guest(8, "xenbr0");
        q.sync(&reboot);
        let p = q.take_publish();
        assert!(p.contains(&(
            "/local/domain/0/backend/vif/8/0/bridge".into(),
            Some("vsquarantine".into())
        )));
        // Released while its key names the quarantine bridge: the toolstack's key comes back.
        let r = q
            .release("web", "clean", "operator", &guest(8, "vsquarantine"))
            .unwrap();
        assert_eq!(r.bridges[&0].key.as_deref(), Some("xenbr0"));
        assert!(q.take_publish().contains(&(
            "/local/domain/0/backend/vif/8/0/bridge".into(),
            Some("xenbr0".into())
        )));
        // A VM that is not quarantined is never held back.
        let g = &prod[&5];
        assert!(q.vif_held(g, &g.vifs[&0]));
    }

    #[test]
    fn an_alert_on_a_guest_without_a_readable_uuid_is_an_error_not_silence() {
        own_netns(an_alert_without_uuid_body);
    }

    fn an_alert_without_uuid_body() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = QuarantineConfig {
            state_dir: dir.path().to_path_buf(),
            auto: true,
            min_step_interval_ms: 60_000,
            // Only the XenStore side of `bridge` runs here (no interface of the guest's).
            ladder: vec![Action::Bridge],
            ..Default::default()
        };
        let mut q = Quarantine::open(cfg, None, Box::new(crate::enforce::domctl::NoXen)).unwrap();
        let ev = AlertEvent {
            domid: 5,
            uuid: None,
            gid: 1,
            sid: 9,
            priority: Some(1),
            msg: "attack".into(),
        };
        let guests = guest(5, "xenbr0");
        let ladder = q.ladder().to_vec();
        match q.on_alert(&ev, &ladder, &guests) {
            Some(Err(QuarantineError::NoUuid(5))) => {}
            other => panic!("expected NoUuid(5), got {other:?}"),
        }
        // Reported once per step interval, not once per alert.
        assert!(q.on_alert(&ev, &ladder, &guests).is_none());
        assert_eq!(q.rate_limited, 1);
        // With the UUID the same alert acts.
        let ev = AlertEvent {
            uuid: Some("5e1ab000-0000-4000-8000-000000000005".into()),
            ..ev
        };
        let r = q.on_alert(&ev, &ladder, &guests);
        assert!(matches!(r, Some(Ok(_))), "{r:?}");
        // An empty ladder (a guest exempted by policy) is no error.
        let ev = AlertEvent {
            uuid: None,
            domid: 6,
            ..ev
        };
        assert!(q.on_alert(&ev, &[], &guests).is_none());
    }

    #[test]
    fn the_quarantine_bridge_must_be_an_interface_name() {
        let ok: Result<QuarantineConfig, _> = toml::from_str("bridge = \"qbr0\"");
        assert_eq!(ok.unwrap().bridge, "qbr0");
        for bad in ["", "a-name-far-too-long", "q/br", "q br"] {
            let r: Result<QuarantineConfig, _> = toml::from_str(&format!("bridge = {bad:?}"));
            assert!(r.is_err(), "{bad:?} accepted");
        }
    }
}
