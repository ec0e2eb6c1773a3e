//! dom0's side of a network driver domain (`[xenstore] driver_domains`): the directory it
//! keeps for each one (`inventory::identity`, `quarantine::delegate`), the identities of the
//! guests that domain backs, and its pause/detach requests, decided against what it backs,
//! executed through dom0's domain control, audited and answered.

use std::collections::{BTreeMap, BTreeSet};

use super::{Op, State};
use crate::xenstore::wire::Request;

/// dom0's bookkeeping for a driver domain it publishes identities for.
#[derive(Default)]
pub(super) struct DriverDomain {
    /// The guests it backs, once listed.
    pub(super) backed: Option<BTreeSet<u32>>,
    /// What is published for it on this connection, by guest domid.
    pub(super) published: BTreeMap<u32, String>,
    /// The domains dom0's service paused on its request (also in XenStore, `paused/`).
    pub(super) paused: BTreeSet<u32>,
}

impl State {
    /// dom0: starts and stops serving the configured driver domains present now, and
    /// republishes their guests' identities (names may have changed).
    pub(super) fn sync_driver_domains(&mut self) {
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
    pub(super) fn on_driver_domain_request(&mut self, dd: u32, id: &str, value: &[u8]) {
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
    pub(super) fn publish_identities(&mut self, dd: u32) {
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
}
