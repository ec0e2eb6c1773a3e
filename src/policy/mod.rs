//! Per-guest policy: which guests get which treatment.
//!
//! `[[policy]]` entries in the configuration are tried in order; the first whose selectors all
//! match a guest applies, and the `[inspect]` defaults apply to guests none matches. A guest is
//! selected by what the toolstack (dom0) wrote about it, never by what the guest wrote: the VM
//! UUID (`/local/domain/<D>/vm` → `/vm/<uuid>`), its name (`/local/domain/<D>/name`, set by
//! the toolstack and read-only to the guest) against a pattern with `*` and `?`, or a label
//! the toolstack or orchestration wrote at `/vm/<uuid>/virtsec/label` (under `/vm`, which
//! guests cannot write).

use serde::Deserialize;

use crate::config::{Config, Mode};
use crate::inventory::Guest;

/// One `[[policy]]` entry.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PolicyEntry {
    /// The VM's UUID (case-insensitive).
    pub uuid: Option<String>,
    /// A pattern on the guest's name (`*` any run, `?` one character).
    pub name: Option<String>,
    /// The toolstack's label for the VM (`/vm/<uuid>/virtsec/label` in XenStore).
    pub label: Option<String>,
    /// Inspection mode for the guest's vifs.
    pub mode: Option<Mode>,
    /// The guest's quarantine ladder (instead of `[quarantine] ladder`); empty: never
    /// quarantined by policy (operators still can).
    pub ladder: Option<Vec<crate::quarantine::Action>>,
}

impl PolicyEntry {
    /// Whether every selector of the entry matches `g` (an entry without selectors matches
    /// every guest).
    pub fn matches(&self, g: &Guest) -> bool {
        let uuid_ok = match (&self.uuid, &g.uuid) {
            (None, _) => true,
            (Some(want), Some(have)) => want.eq_ignore_ascii_case(have),
            (Some(_), None) => false,
        };
        let name_ok = match (&self.name, &g.name) {
            (None, _) => true,
            (Some(pat), Some(have)) => glob(pat.as_bytes(), have.as_bytes()),
            (Some(_), None) => false,
        };
        let label_ok = match (&self.label, &g.label) {
            (None, _) => true,
            (Some(want), Some(have)) => want == have,
            (Some(_), None) => false,
        };
        uuid_ok && name_ok && label_ok
    }
}

/// The treatment of one guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestPolicy {
    pub mode: Mode,
    pub ladder: Option<Vec<crate::quarantine::Action>>,
}

/// Resolves guests to their policy.
#[derive(Clone, Debug)]
pub struct Policies {
    entries: Vec<PolicyEntry>,
    default_mode: Mode,
}

impl Policies {
    pub fn from_config(cfg: &Config) -> Policies {
        Policies {
            entries: cfg.policy.clone(),
            default_mode: cfg.inspect.mode,
        }
    }

    pub fn of(&self, g: &Guest) -> GuestPolicy {
        let e = self.entries.iter().find(|e| e.matches(g));
        GuestPolicy {
            mode: e.and_then(|e| e.mode).unwrap_or(self.default_mode),
            ladder: e.and_then(|e| e.ladder.clone()),
        }
    }
}

/// `*`/`?` pattern match, iterative with one backtrack point (linear in practice, no
/// recursion on hostile-length names).
pub fn glob(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some((p, i));
            p += 1;
        } else if let Some((sp, si)) = star {
            p = sp + 1;
            i = si + 1;
            star = Some((sp, si + 1));
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        assert!(glob(b"web-*", b"web-01"));
        assert!(glob(b"*", b""));
        assert!(glob(b"w?b*1", b"web-01"));
        assert!(!glob(b"web-*", b"db-01"));
        assert!(!glob(b"web", b"web-01"));
        assert!(glob(b"*-01", b"web-01"));
        assert!(!glob(b"a*b*c", b"aXbY"));
    }

    #[test]
    fn first_matching_entry_wins() {
        let cfg = Config::parse(
            "[inspect]\nmode = \"passive\"\n[[policy]]\nuuid = \"AAAA\"\nmode = \"passive\"\n[[policy]]\nname = \"web-*\"\nmode = \"inline\"\n",
            std::path::Path::new("t.toml"),
        )
        .expect("parses");
        let p = Policies::from_config(&cfg);
        let mut g = Guest {
            domid: 5,
            uuid: None,
            name: Some("web-1".into()),
            label: None,
            introduced: Some(true),
            vifs: Default::default(),
        };
        assert_eq!(p.of(&g).mode, Mode::Inline);
        g.uuid = Some("aaaa".into());
        assert_eq!(p.of(&g).mode, Mode::Passive);
        g.uuid = None;
        g.name = None;
        assert_eq!(p.of(&g).mode, Mode::Passive);
        // A toolstack label selects too.
        let cfg = Config::parse(
            "[[policy]]\nlabel = \"dmz\"\nmode = \"inline\"\n",
            std::path::Path::new("t.toml"),
        )
        .expect("parses");
        let p = Policies::from_config(&cfg);
        assert_eq!(p.of(&g).mode, Mode::Passive);
        g.label = Some("dmz".into());
        assert_eq!(p.of(&g).mode, Mode::Inline);
    }
}
