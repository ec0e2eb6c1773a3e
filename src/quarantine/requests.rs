//! Quarantine requests through XenStore, for automation in dom0.
//!
//! The service keeps a request directory under its own domain path,
//! `/local/domain/<self>/virtsec/request`, owned by itself with no access for other domains:
//! dom0 (privileged) writes there, a guest's write is refused by xenstored itself. A request
//! is one node,
//! `request/<id>` = `{"op":"quarantine","target":"web01","action":"isolate","reason":"..."}`
//! or `{"op":"release","target":...,"reason":...}`. As a second line, a request is executed
//! only if the node's owner (the first entry of its permissions, read with GET_PERMS) is
//! domain 0 or the service's own domain. The directory's permissions are the line that holds
//! on every xenstored: on Xen 4.17's oxenstored a new node keeps its directory's owner
//! whoever creates it (tests/xen-e2e found a guest's node under a dom0-owned directory owned
//! by dom0, and dom0's node under a driver domain's directory owned by the driver domain),
//! so ownership alone cannot tell who wrote it there. In a network driver domain the
//! directory is the driver domain's (`/local/domain/<dd>/virtsec`, which dom0's virtsec
//! creates for the driver domains it serves: a domain cannot create nodes under its own
//! `/local/domain/<dd>`), and dom0's requests there are owned by the driver domain. The
//! answer goes to
//! `virtsec/response/<id>` (`{"ok":true,"record":...}` or `{"ok":false,"error":...}`) and the
//! request node is removed; refusals are audited like actions.

use serde::Deserialize;

use crate::xenstore::perms::Perm;

/// A request as written.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum XsRequest {
    Quarantine {
        target: String,
        action: String,
        reason: String,
    },
    Release {
        target: String,
        reason: String,
    },
}

/// Why a request is not executed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("refused: the request node is owned by domain {0}; only requests written by dom0 are executed (owned by dom0 or by this service's domain)")]
    NotDom0(u32),
    #[error("refused: cannot read the request node's permissions ({0})")]
    NoPerms(String),
    #[error("malformed request: {0}")]
    Malformed(String),
}

/// A request id: the node name, `[A-Za-z0-9_-]`, 1 to 64 characters.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// Decides on a request from its value and its GET_PERMS reply, for the service running in
/// domain `self_domid`.
pub fn decide(value: &[u8], perms: &[u8], self_domid: u32) -> Result<XsRequest, Refusal> {
    let list: Vec<&str> = perms
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| std::str::from_utf8(s).unwrap_or(""))
        .collect();
    let owner = list
        .first()
        .and_then(|p| p.parse::<Perm>().ok())
        .ok_or_else(|| Refusal::NoPerms(format!("{list:?}")))?;
    if owner.domid != 0 && owner.domid != self_domid {
        return Err(Refusal::NotDom0(owner.domid));
    }
    let value = value.strip_suffix(&[0]).unwrap_or(value);
    serde_json::from_slice::<XsRequest>(value).map_err(|e| Refusal::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_dom0_owned_requests_are_obeyed() {
        let req = br#"{"op":"quarantine","target":"web01","action":"isolate","reason":"IR-42"}"#;
        assert_eq!(
            decide(req, b"n0\0r5\0", 0),
            Ok(XsRequest::Quarantine {
                target: "web01".into(),
                action: "isolate".into(),
                reason: "IR-42".into()
            })
        );
        // The same bytes written by guest 5: refused, whatever it claims.
        assert_eq!(decide(req, b"w5\0", 0), Err(Refusal::NotDom0(5)));
        // In driver domain 3, dom0's request inherits the directory's owner, 3: obeyed; one
        // owned by guest 5 is not.
        assert!(decide(req, b"n3\0", 3).is_ok());
        assert_eq!(decide(req, b"n5\0", 3), Err(Refusal::NotDom0(5)));
        assert!(matches!(decide(req, b"", 0), Err(Refusal::NoPerms(_))));
        assert!(matches!(
            decide(br#"{"op":"reboot"}"#, b"n0\0", 0),
            Err(Refusal::Malformed(_))
        ));
        assert!(matches!(
            decide(b"\xff\xfe", b"n0\0", 0),
            Err(Refusal::Malformed(_))
        ));
        assert!(valid_id("req-1_a"));
        assert!(!valid_id("../x"));
        assert!(!valid_id(""));
    }
}
