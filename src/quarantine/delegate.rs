//! `pause` and `detach` for a network driver domain, executed by dom0's service.
//!
//! Pausing a domain and detaching its vif need dom0's privilege. A driver domain's service
//! with `[quarantine] domain_control = "dom0"` asks dom0's service instead, through the
//! directory dom0's service keeps for it (`inventory::identity`):
//!
//! ```text
//! /local/domain/0/virtsec/dd/<dd>/request/<id>   n0 b<dd>  the driver domain writes
//!                                  {"op":"pause","domid":5} | {"op":"unpause","domid":5}
//!                                  | {"op":"detach","domid":5,"devid":0}
//! /local/domain/0/virtsec/dd/<dd>/response/<id>  n0 b<dd>  dom0 answers {"ok":…,"error":…}
//! /local/domain/0/virtsec/dd/<dd>/paused/<domid> n0 r<dd>  what dom0 paused for it
//! ```
//!
//! Only dom0 and that driver domain can write its request directory, so where a request
//! is says who sent it (ownership does not: oxenstored keeps the directory's owner on nodes
//! other domains create in it). dom0's service executes a request only for a guest the
//! driver domain backs (its `backend/vif` tree lists the guest), and unpauses only a domain
//! it paused on that driver domain's request: Xen's pause is reference-counted per caller,
//! so a driver domain can never lift a pause that dom0's operator (or anyone else) holds.
//! The driver domain keeps its quarantine records as usual; dom0's service keeps only the
//! pauses it made, in XenStore, so they outlive its restarts. Every request executed or
//! refused is audited in dom0 (syslog, EVE `event_type:"quarantine"`, op `delegated`).

use std::collections::BTreeSet;

/// A request from a driver domain: one domain-control operation.
pub use crate::enforce::domctl::DomainOp as Request;

/// Why dom0's service does not execute a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("domain {domid} has no vif backed by driver domain {dd}")]
    NotBacked { dd: u32, domid: u32 },
    #[error("domain {domid} was not paused on driver domain {dd}'s request; only those pauses are lifted")]
    NotPausedByIt { dd: u32, domid: u32 },
}

pub fn request_dir(dd: u32) -> String {
    format!("{}/request", crate::inventory::identity::dir(dd))
}

pub fn response_dir(dd: u32) -> String {
    format!("{}/response", crate::inventory::identity::dir(dd))
}

pub fn paused_dir(dd: u32) -> String {
    format!("{}/paused", crate::inventory::identity::dir(dd))
}

/// dom0's decision on a request from driver domain `dd`, which backs the guests `backed` and
/// has had `paused` paused on its behalf.
pub fn decide(
    dd: u32,
    value: &[u8],
    backed: &BTreeSet<u32>,
    paused: &BTreeSet<u32>,
) -> Result<Request, Refusal> {
    let req: Request = serde_json::from_slice(crate::xenstore::wire::strip_nul(value))
        .map_err(|e| Refusal::Malformed(e.to_string()))?;
    let domid = req.domid();
    match req {
        // What it paused stays liftable after the guest left its backend tree.
        Request::Unpause { .. } if !paused.contains(&domid) => {
            Err(Refusal::NotPausedByIt { dd, domid })
        }
        Request::Unpause { .. } => Ok(req),
        _ if !backed.contains(&domid) => Err(Refusal::NotBacked { dd, domid }),
        _ => Ok(req),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dom0_acts_only_on_the_driver_domains_own_guests_and_pauses() {
        let backed = BTreeSet::from([5, 7]);
        let none = BTreeSet::new();
        assert_eq!(
            decide(3, br#"{"op":"pause","domid":5}"#, &backed, &none),
            Ok(Request::Pause { domid: 5 })
        );
        assert_eq!(
            decide(
                3,
                b"{\"op\":\"detach\",\"domid\":7,\"devid\":1}\0",
                &backed,
                &none
            ),
            Ok(Request::Detach { domid: 7, devid: 1 })
        );
        // Another backend's guest, or dom0 itself.
        assert_eq!(
            decide(3, br#"{"op":"pause","domid":6}"#, &backed, &none),
            Err(Refusal::NotBacked { dd: 3, domid: 6 })
        );
        assert_eq!(
            decide(3, br#"{"op":"pause","domid":0}"#, &backed, &none),
            Err(Refusal::NotBacked { dd: 3, domid: 0 })
        );
        // An unpause of a pause it did not ask for (dom0's operator's, say).
        assert_eq!(
            decide(3, br#"{"op":"unpause","domid":5}"#, &backed, &none),
            Err(Refusal::NotPausedByIt { dd: 3, domid: 5 })
        );
        assert_eq!(
            decide(
                3,
                br#"{"op":"unpause","domid":5}"#,
                &none,
                &BTreeSet::from([5])
            ),
            Ok(Request::Unpause { domid: 5 })
        );
        for bad in [
            &br#"{"op":"destroy","domid":5}"#[..],
            br#"{"op":"pause","domid":-1}"#,
            br#"{"op":"pause","domid":5,"also":1}"#,
            b"\xff",
        ] {
            assert!(
                matches!(decide(3, bad, &backed, &none), Err(Refusal::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            serde_json::to_string(&Request::Detach { domid: 5, devid: 0 }).unwrap(),
            r#"{"op":"detach","domid":5,"devid":0}"#
        );
    }
}
