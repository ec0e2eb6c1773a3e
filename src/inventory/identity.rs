//! Guest identities for a network driver domain, published by dom0's service.
//!
//! A service in a driver domain sees the vifs it backs but not whose they are: a guest's
//! `/local/domain/<D>/vm` and `name` are readable by dom0 and the guest only. Quarantine
//! follows VM UUIDs, so without them a driver domain could not quarantine at all. dom0's
//! service, told which driver domains to serve (`[xenstore] driver_domains`, by name), lists
//! each one's backend tree and publishes, for every guest that driver domain backs and only
//! those,
//!
//! ```text
//! /local/domain/0/virtsec/dd/<dd>/vm/<domid> = {"uuid":"…","name":"…"}
//! ```
//!
//! under a directory with permissions `n0 r<dd>`: dom0 writes, the driver domain reads,
//! nobody else does either (guests cannot create anything under `/local/domain/0`). The
//! driver domain's reconcile pass reads `…/dd/<self>/vm/<fe>` for each frontend it backs and
//! uses it where its own reads are refused; what it can read itself wins. Entries are
//! validated like everything else read from XenStore (UUID syntax, name length and
//! characters); a bad one is counted and ignored.

use std::collections::{BTreeMap, BTreeSet};

use super::model::{valid_uuid, Guests};

/// The directory dom0's service publishes driver domain `dd`'s guest identities in.
pub fn dir(dd: u32) -> String {
    format!("/local/domain/0/virtsec/dd/{dd}")
}

/// The identity node of guest `domid` for driver domain `dd`.
pub fn node(dd: u32, domid: u32) -> String {
    format!("{}/vm/{domid}", dir(dd))
}

/// A published identity, as read back in the driver domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub uuid: String,
    pub name: Option<String>,
}

/// What dom0 publishes for driver domain `dd`: one JSON value per guest it backs whose UUID
/// dom0 knows.
pub fn entries(guests: &Guests, backed: &BTreeSet<u32>) -> BTreeMap<u32, String> {
    backed
        .iter()
        .filter_map(|d| {
            let g = guests.get(d)?;
            let uuid = g.uuid.as_ref()?;
            let v = serde_json::json!({"uuid": uuid, "name": g.name});
            Some((*d, v.to_string()))
        })
        .collect()
}

/// The XenStore writes (`Some`) and removals (`None`) that turn `old` into `new`.
pub fn changes(
    dd: u32,
    old: &BTreeMap<u32, String>,
    new: &BTreeMap<u32, String>,
) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for (d, v) in new {
        if old.get(d) != Some(v) {
            out.push((node(dd, *d), Some(v.clone())));
        }
    }
    for d in old.keys().filter(|d| !new.contains_key(d)) {
        out.push((node(dd, *d), None));
    }
    out
}

/// Parses an identity node's value; `None` for anything that is not a valid identity.
pub fn parse(value: &[u8]) -> Option<Identity> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        uuid: String,
        name: Option<String>,
    }
    let raw: Raw = serde_json::from_slice(crate::xenstore::wire::strip_nul(value)).ok()?;
    if !valid_uuid(&raw.uuid) {
        return None;
    }
    let name = match raw.name {
        Some(n) if n.is_empty() || n.len() > 256 || n.chars().any(char::is_control) => return None,
        n => n,
    };
    Some(Identity {
        uuid: raw.uuid.to_ascii_lowercase(),
        name,
    })
}

/// The domids of a directory listing (a driver domain's `backend/vif`, what dom0 paused for
/// it); names that are not domids are skipped.
pub fn domids(listing: &[u8]) -> BTreeSet<u32> {
    crate::xenstore::wire::split_list(listing)
        .into_iter()
        .filter_map(|n| std::str::from_utf8(n).ok()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Guest;

    #[test]
    fn dom0_publishes_only_the_guests_a_driver_domain_backs() {
        let mut guests = Guests::new();
        for (d, uuid) in [(5, Some("5e1ab000-0000-4000-8000-000000000005")), (6, None)] {
            guests.insert(
                d,
                Guest {
                    domid: d,
                    uuid: uuid.map(str::to_string),
                    name: Some(format!("g{d}")),
                    ..Default::default()
                },
            );
        }
        guests.insert(
            7,
            Guest {
                domid: 7,
                uuid: Some("5e1ab000-0000-4000-8000-000000000007".into()),
                ..Default::default()
            },
        );
        // dd 3 backs 5 and 6 (6 has no UUID dom0 could read) and not 7.
        let e = entries(&guests, &domids(b"5\x006\x00"));
        assert_eq!(e.len(), 1);
        assert_eq!(
            parse(e[&5].as_bytes()),
            Some(Identity {
                uuid: "5e1ab000-0000-4000-8000-000000000005".into(),
                name: Some("g5".into()),
            })
        );
        let c = changes(3, &BTreeMap::new(), &e);
        assert_eq!(c, vec![(node(3, 5), Some(e[&5].clone()))]);
        assert_eq!(node(3, 5), "/local/domain/0/virtsec/dd/3/vm/5");
        // Unchanged: nothing written; gone: removed.
        assert!(changes(3, &e, &e).is_empty());
        assert_eq!(changes(3, &e, &BTreeMap::new()), vec![(node(3, 5), None)]);
    }

    #[test]
    fn a_bad_identity_is_ignored() {
        assert_eq!(
            parse(b"{\"uuid\":\"5E1AB000-0000-4000-8000-000000000005\",\"name\":null}\0"),
            Some(Identity {
                uuid: "5e1ab000-0000-4000-8000-000000000005".into(),
                name: None,
            })
        );
        for bad in [
            &b"{\"uuid\":\"../../x\",\"name\":\"a\"}"[..],
            b"{\"uuid\":\"5e1ab000-0000-4000-8000-000000000005\",\"name\":\"a\\nb\"}",
            b"{\"uuid\":\"5e1ab000-0000-4000-8000-000000000005\",\"name\":\"\"}",
            b"{\"uuid\":\"5e1ab000-0000-4000-8000-000000000005\",\"extra\":1}",
            b"not json",
            b"\xff\xfe",
        ] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(domids(b"5\x00x\x0012\x00"), BTreeSet::from([5, 12]));
    }
}
