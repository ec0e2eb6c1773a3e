//! What the service writes on its own schedule, for automation and security teams: a status
//! summary and per-vif counters under `/local/domain/<self>/virtsec` (only what changed, at
//! most every few seconds), anti-spoofing drop events (syslog and EVE, read off the event
//! loop's thread), and the XenStore writes the quarantine manager and a driver domain's
//! delegated requests queue up.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{Link, Op, State};
use crate::xenstore::wire::Request;

impl State {
    /// Reports anti-spoofing drops as events (syslog and EVE `event_type:"antispoof"`, with
    /// the guest's identity), at most one per vif and reason every 2 s. The counters are read
    /// in a thread started here and reported by the first call after it finished.
    pub(super) fn report_violations(&mut self) {
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
                "timestamp": crate::inspect::eve::format_time(std::time::SystemTime::now()),
                "event_type": "antispoof",
                "antispoof": {"reason": reason, "dropped": delta, "total": total},
                "xen": {"domid": v["domid"], "uuid": v["uuid"], "name": v["name"], "vif": ifname},
            });
            self.append_eve(&line);
        }
    }

    /// Appends one event to the EVE file (the data plane's alerts go through its own writer;
    /// these events are rare enough to open the file each time, which also follows rotation).
    fn append_eve(&self, line: &serde_json::Value) {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.cfg.inspect.eve)
        {
            use std::io::Write;
            let _ = writeln!(f, "{line}");
        }
    }

    /// Tells the operator when a vif's traffic went uninspected (`dataplane::losses`): a
    /// warning with the guest's identity (syslog MSGID `lost`) and an EVE event
    /// (`event_type:"lost"`), a vif's first loss within a second, then at most one a minute
    /// per vif.
    pub(super) fn report_losses(&mut self) {
        if self.last_loss_check.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_loss_check = Instant::now();
        let Some(dp) = &self.dataplane else { return };
        for r in self.losses.check(Instant::now(), &dp.status()) {
            let guest = self.inventory.get(&r.domid);
            let name = guest.and_then(|g| g.name.as_deref()).unwrap_or("?");
            let uuid = guest.and_then(|g| g.uuid.as_deref()).unwrap_or("-");
            log::warn!(
                target: "virtsec::event::lost",
                vif = r.vif.as_str(),
                domid = r.domid,
                uuid = uuid,
                name = name,
                lost = r.lost.total();
                "{} of domain {} ({name}): {r}: its worker did not keep up and that traffic was not inspected (`virtsec status`; the admin guide's \"dom0's CPUs\")",
                r.vif,
                r.domid
            );
            let l = &r.lost;
            self.append_eve(&serde_json::json!({
                "timestamp": crate::inspect::eve::format_time(std::time::SystemTime::now()),
                "event_type": "lost",
                "lost": {
                    "frames": l.total(),
                    "seconds": r.over.map(|d| d.as_secs()),
                    "capture_full": l.capture,
                    "queue_full": l.queue,
                    "overload_dropped": l.overload,
                    "overload_forwarded": l.bypassed,
                    "truncated": l.truncated,
                    "send_errors": l.send,
                },
                "xen": {"domid": r.domid, "uuid": guest.and_then(|g| g.uuid.as_deref()), "name": guest.and_then(|g| g.name.as_deref()), "vif": r.vif},
            }));
        }
    }

    /// Publishes a summary of the service's state for other tools at
    /// `/local/domain/<self>/virtsec/status` (JSON, rewritten when it changes, at most every
    /// 2 s): guests, vifs, alerts, quarantined VMs, anti-spoofing drops, in sync.
    pub(super) fn publish_status(&mut self) {
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
    pub(super) fn publish_counters(&mut self) {
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

    /// Writes what the quarantine manager publishes to XenStore, and a driver domain's
    /// requests to dom0's service.
    pub(super) fn flush_publish(&mut self) {
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
}
