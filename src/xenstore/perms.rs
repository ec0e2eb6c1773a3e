//! XenStore node permissions.
//!
//! A node carries a list: the first entry names the owner and the access every domain not
//! listed gets; later entries grant a listed domain its own access. The text form is a letter
//! (`n` none, `r` read, `w` write, `b` both) followed by a domid: `n0 r5` means "owned by dom0,
//! no access for others, domain 5 may read". Dom0 (and a connection on dom0's socket) is
//! privileged and bypasses the list.

use std::fmt;
use std::str::FromStr;

/// Access granted by one entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    None,
    Read,
    Write,
    Both,
}

impl Access {
    pub fn can_read(self) -> bool {
        matches!(self, Access::Read | Access::Both)
    }
    pub fn can_write(self) -> bool {
        matches!(self, Access::Write | Access::Both)
    }
    fn letter(self) -> char {
        match self {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        }
    }
}

/// One permission entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Perm {
    pub domid: u32,
    pub access: Access,
}

impl Perm {
    pub const fn new(access: Access, domid: u32) -> Perm {
        Perm { domid, access }
    }
}

/// A permission string that is not a letter followed by a domid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid permission {0:?}: expected n, r, w or b followed by a domain id, e.g. r5")]
pub struct PermParseError(pub String);

impl FromStr for Perm {
    type Err = PermParseError;
    fn from_str(s: &str) -> Result<Perm, PermParseError> {
        let err = || PermParseError(s.to_owned());
        let mut chars = s.chars();
        let access = match chars.next().ok_or_else(err)? {
            'n' => Access::None,
            'r' => Access::Read,
            'w' => Access::Write,
            'b' => Access::Both,
            _ => return Err(err()),
        };
        let rest = chars.as_str();
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let domid = rest.parse().map_err(|_| err())?;
        Ok(Perm { domid, access })
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.access.letter(), self.domid)
    }
}

/// The access `domid` has to a node with `perms`, following xenstored's `perm_for_conn`:
/// the owner may do everything, a listed domain gets its entry, anyone else the default.
/// `privileged` connections (dom0) bypass the check.
pub fn access_for(perms: &[Perm], domid: u32, privileged: bool) -> Access {
    if privileged {
        return Access::Both;
    }
    let Some(owner) = perms.first() else {
        return Access::None;
    };
    if owner.domid == domid {
        return Access::Both;
    }
    perms[1..]
        .iter()
        .find(|p| p.domid == domid)
        .map(|p| p.access)
        .unwrap_or(owner.access)
}

/// Formats a list as `xenstore-ls -p` prints it, e.g. `n0,r5`.
pub fn format_list(perms: &[Perm]) -> String {
    perms
        .iter()
        .map(Perm::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let p: Perm = "r5".parse().unwrap();
        assert_eq!(p, Perm::new(Access::Read, 5));
        assert_eq!(p.to_string(), "r5");
        assert_eq!("b0".parse::<Perm>().unwrap().access, Access::Both);
        for bad in ["", "x5", "r", "r-1", "r5a", "r 5", "r99999999999"] {
            assert!(bad.parse::<Perm>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn access_rules() {
        let perms = [Perm::new(Access::None, 0), Perm::new(Access::Read, 5)];
        assert_eq!(access_for(&perms, 5, false), Access::Read);
        assert_eq!(access_for(&perms, 6, false), Access::None);
        assert_eq!(access_for(&perms, 6, true), Access::Both);
        let owned = [Perm::new(Access::None, 7)];
        assert_eq!(access_for(&owned, 7, false), Access::Both);
        let open = [Perm::new(Access::Read, 0), Perm::new(Access::None, 9)];
        assert_eq!(access_for(&open, 3, false), Access::Read);
        assert_eq!(access_for(&open, 9, false), Access::None);
        assert_eq!(format_list(&perms), "n0,r5");
    }
}
