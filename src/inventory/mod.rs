//! The inventory: every guest on this host and each of its vifs, rebuilt from XenStore truth.
//!
//! This follows libxl's driver-domain daemon (`xl devd`): one reconcile function reads what
//! XenStore says now and replaces the inventory; it runs at start, after every reconnect and
//! after every relevant watch event (`@introduceDomain`, `@releaseDomain`, the backend tree,
//! a guest's `name`). Events only say "something changed": a watch "may be triggered
//! spuriously" and events can be coalesced, so the service never applies event deltas.
//! Events that arrive while a pass is in flight mark the inventory dirty and one more pass
//! follows, so a burst of N events costs at most two passes.
//!
//! See [`reconcile`] for which nodes are trusted and how values are validated.

pub mod identity;
pub mod model;
pub mod reconcile;

pub use model::{Guest, Guests, MacAddr, Vif, XenbusState};
pub use reconcile::{Pass, PassReport, Tag};

fn state_name(s: Option<XenbusState>) -> String {
    match s {
        Some(s) => serde_json::to_value(s)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("{s:?}")),
        None => "(none)".into(),
    }
}

/// Human-readable differences between two inventories, for the service log.
pub fn diff(old: &Guests, new: &Guests) -> Vec<String> {
    let mut out = Vec::new();
    let label = |g: &Guest| match &g.name {
        Some(n) => format!("domain {} ({n})", g.domid),
        None => format!("domain {}", g.domid),
    };
    for (d, g) in new {
        match old.get(d) {
            None => out.push(format!(
                "{} appeared, uuid {}",
                label(g),
                g.uuid.as_deref().unwrap_or("unknown")
            )),
            Some(o) => {
                if o.uuid != g.uuid && o.uuid.is_some() {
                    out.push(format!(
                        "{} now has another uuid: a new VM reuses the domid",
                        label(g)
                    ));
                }
                if o.name != g.name {
                    out.push(format!("{} renamed", label(g)));
                }
            }
        }
        for (devid, v) in &g.vifs {
            let before = old.get(d).and_then(|o| o.vifs.get(devid));
            match before {
                None => out.push(format!(
                    "{} added vif {} (devid {devid})",
                    label(g),
                    v.ifname
                )),
                Some(b) if b != v => {
                    let mut what = Vec::new();
                    if b.state != v.state {
                        what.push(format!(
                            "state {} -> {}",
                            state_name(b.state),
                            state_name(v.state)
                        ));
                    }
                    if b.hotplug_status != v.hotplug_status {
                        what.push(format!(
                            "hotplug-status {}",
                            v.hotplug_status.as_deref().unwrap_or("(removed)")
                        ));
                    }
                    if what.is_empty() {
                        what.push("configuration changed".into());
                    }
                    out.push(format!("{}: {}", v.ifname, what.join(", ")));
                }
                Some(_) => {}
            }
        }
        if let Some(o) = old.get(d) {
            for (devid, v) in &o.vifs {
                if !g.vifs.contains_key(devid) {
                    out.push(format!("{} removed vif {}", label(g), v.ifname));
                }
            }
        }
    }
    for (d, g) in old {
        if !new.contains_key(d) {
            out.push(format!("{} is gone", label(g)));
        }
    }
    out
}
