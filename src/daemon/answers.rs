//! What the service answers when asked: the control socket's requests (quarantine, release,
//! reload, `virtsec status`, domains, alerts, a hotplug script's "is this vif ready"), and the
//! Prometheus exposition. Quarantine, release and rule reloads act here, on the loop's thread.

use serde::Serialize;

use super::{Link, State};
use crate::control::ControlRequest;

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

/// The control answer when the quarantine manager did not open.
const NO_QUARANTINE: &str = "quarantine is unavailable (see virtsec status: quarantine.errors)";

impl State {
    pub(super) fn answer(
        &mut self,
        req: ControlRequest,
        refused: u64,
    ) -> Result<serde_json::Value, String> {
        let v = match req {
            ControlRequest::Quarantine {
                target,
                action,
                reason,
                who,
            } => {
                let q = self.quarantine.as_mut().ok_or(NO_QUARANTINE)?;
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
                let q = self.quarantine.as_mut().ok_or(NO_QUARANTINE)?;
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
                let q = self.quarantine.as_ref().ok_or(NO_QUARANTINE)?;
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

    pub(super) fn status(&self, refused_peers: u64) -> Status {
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
    pub(super) fn antispoof_report(
        &self,
        a: &crate::enforce::AntiSpoof,
    ) -> std::collections::BTreeMap<String, serde_json::Value> {
        self.report_of(a, crate::enforce::AntiSpoof::counters())
    }

    /// [`Self::antispoof_report`] from counters already read.
    pub(super) fn report_of(
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

    /// The Prometheus exposition.
    pub(super) fn metrics(&self) -> String {
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
}
