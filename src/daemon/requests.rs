//! Quarantine requests automation writes in XenStore, under the service's own
//! `/local/domain/<self>/virtsec/request/<id>` (dom0's tools, XAPI plugins, a driver domain's
//! administrator): the directory, and each request decided (only the node's owner counts,
//! `quarantine::requests`), executed, audited and answered at `response/<id>`.

use super::{Op, State};
use crate::xenstore::wire::Request;

impl State {
    /// Automation's request directory: ours, and no other domain's (dom0 writes anyway, being
    /// privileged). Requests are also executed only if GET_PERMS names dom0 or this domain as
    /// the node's owner (quarantine::requests), for setups where the directory is shared.
    pub(super) fn make_request_dir(&mut self) {
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

    /// A XenStore request whose value and permissions are both in: decide, execute, answer.
    pub(super) fn on_request(&mut self, id: &str) {
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
}
