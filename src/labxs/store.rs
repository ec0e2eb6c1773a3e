//! The node tree of the lab xenstored, with xenstored's semantics.
//!
//! Behaviour follows C xenstored (`xenstored_core.c`) and, where the two daemons differ and
//! the difference is visible to virtsec, oxenstored, which Debian's Xen 4.17 dom0 runs:
//! - a new node inherits its parent's permissions; a node created by an unprivileged domain is
//!   owned by that domain;
//! - reading or listing needs read access, writing an existing node needs write access on it,
//!   creating one needs write access on its nearest existing ancestor;
//! - a missing node whose nearest existing ancestor the caller cannot access answers `EACCES`
//!   rather than `ENOENT` (it must not leak existence);
//! - removing a missing node whose parent exists succeeds;
//! - only the owner (or dom0) may change permissions, and an unprivileged owner may not give
//!   the node away (`EPERM`);
//! - a value longer than the entry quota is `E2BIG` for every caller (oxenstored), an
//!   unprivileged domain owning more nodes than its quota gets `EQUOTA`.
//!
//! Every node carries a generation, bumped when it or its child list changes: transactions use
//! it for conflict detection and `DIRECTORY_PART` reports it.

use std::collections::HashMap;

use crate::xenstore::path::{self, is_subpath};
use crate::xenstore::perms::{access_for, Access, Perm};

/// An errno name as xenstored sends it.
pub type Errno = &'static str;

/// Quotas, with oxenstored's defaults where it has one.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest value in bytes (`quota-maxsize`, 2048).
    pub entry_size: usize,
    /// Nodes an unprivileged domain may own (`quota-maxentity`, 1000).
    pub nodes_per_domain: usize,
    /// Watches per connection (`quota-maxwatch`, 100 for domains; dom0 exempt).
    pub watches_per_conn: usize,
    /// Open transactions per connection (`quota-transactions`, 10).
    pub transactions_per_conn: usize,
    /// Watch events queued for one slow connection before further events are dropped.
    pub queued_events_per_conn: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            entry_size: 2048,
            nodes_per_domain: 1000,
            watches_per_conn: 100,
            transactions_per_conn: 10,
            queued_events_per_conn: 1024,
        }
    }
}

/// Who is asking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller {
    pub domid: u32,
    pub privileged: bool,
}

impl Caller {
    pub const DOM0: Caller = Caller {
        domid: 0,
        privileged: true,
    };
    pub fn domain(domid: u32) -> Caller {
        Caller {
            domid,
            privileged: false,
        }
    }
}

/// One node.
#[derive(Clone, Debug)]
pub struct Node {
    pub value: Vec<u8>,
    pub perms: Vec<Perm>,
    pub children: Vec<String>,
    pub gen: u64,
}

/// A change that fires watches: the node's path, the permissions that decide who may see the
/// event, and whether a whole subtree went away (watches below it fire too).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Changed {
    pub path: String,
    pub perms: Vec<Perm>,
    pub subtree_removed: bool,
}

/// Records what a transaction touched: the generation each node had when first seen
/// (`None`: absent).
pub type AccessLog = HashMap<String, Option<u64>>;

/// The tree.
#[derive(Clone, Debug)]
pub struct Tree {
    nodes: HashMap<String, Node>,
    owned: HashMap<u32, usize>,
    next_gen: u64,
}

impl Default for Tree {
    fn default() -> Tree {
        Tree::new()
    }
}

impl Tree {
    /// A tree with `/` (owned by dom0, no access for others), `/local`, `/local/domain` and
    /// `/tool` as xenstored creates them.
    pub fn new() -> Tree {
        let mut t = Tree {
            nodes: HashMap::new(),
            owned: HashMap::new(),
            next_gen: 1,
        };
        let root_perms = vec![Perm::new(Access::None, 0)];
        t.nodes.insert(
            "/".into(),
            Node {
                value: Vec::new(),
                perms: root_perms,
                children: Vec::new(),
                gen: 0,
            },
        );
        for p in ["/local", "/local/domain", "/tool"] {
            // Creating these as dom0 cannot fail.
            let _ = t.mkdir(Caller::DOM0, p, &Limits::default(), None);
        }
        t
    }

    pub fn node(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn note(log: &mut Option<&mut AccessLog>, tree: &Tree, path: &str) {
        if let Some(log) = log.as_deref_mut() {
            log.entry(path.to_owned())
                .or_insert_with(|| tree.nodes.get(path).map(|n| n.gen));
        }
    }

    /// The error for a missing node: `EACCES` if the nearest existing ancestor denies `need`.
    fn missing(&self, c: Caller, path: &str, need: fn(Access) -> bool) -> Errno {
        let mut p = path;
        while let Some(parent) = path::parent(p) {
            if let Some(n) = self.nodes.get(parent) {
                return if need(access_for(&n.perms, c.domid, c.privileged)) {
                    "ENOENT"
                } else {
                    "EACCES"
                };
            }
            p = parent;
        }
        "ENOENT"
    }

    fn get_checked(
        &self,
        c: Caller,
        path: &str,
        need: fn(Access) -> bool,
        log: &mut Option<&mut AccessLog>,
    ) -> Result<&Node, Errno> {
        Tree::note(log, self, path);
        match self.nodes.get(path) {
            Some(n) if need(access_for(&n.perms, c.domid, c.privileged)) => Ok(n),
            Some(_) => Err("EACCES"),
            None => Err(self.missing(c, path, need)),
        }
    }

    pub fn read(
        &self,
        c: Caller,
        path: &str,
        mut log: Option<&mut AccessLog>,
    ) -> Result<Vec<u8>, Errno> {
        Ok(self
            .get_checked(c, path, Access::can_read, &mut log)?
            .value
            .clone())
    }

    pub fn directory(
        &self,
        c: Caller,
        path: &str,
        mut log: Option<&mut AccessLog>,
    ) -> Result<(u64, Vec<String>), Errno> {
        let n = self.get_checked(c, path, Access::can_read, &mut log)?;
        Ok((n.gen, n.children.clone()))
    }

    pub fn get_perms(
        &self,
        c: Caller,
        path: &str,
        mut log: Option<&mut AccessLog>,
    ) -> Result<Vec<Perm>, Errno> {
        Ok(self
            .get_checked(c, path, Access::can_read, &mut log)?
            .perms
            .clone())
    }

    fn bump(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen
    }

    /// Creates `path` and any missing ancestors; returns the nodes created (top-down).
    fn create(
        &mut self,
        c: Caller,
        path: &str,
        limits: &Limits,
        log: &mut Option<&mut AccessLog>,
    ) -> Result<Vec<String>, Errno> {
        // Find the nearest existing ancestor and check write access there.
        let mut missing = vec![path.to_owned()];
        let mut p = path;
        let anchor = loop {
            let parent = path::parent(p).ok_or("EINVAL")?;
            Tree::note(log, self, parent);
            if self.nodes.contains_key(parent) {
                break parent.to_owned();
            }
            missing.push(parent.to_owned());
            p = parent;
        };
        let anchor_perms = self.nodes[&anchor].perms.clone();
        if !access_for(&anchor_perms, c.domid, c.privileged).can_write() {
            return Err("EACCES");
        }
        if !c.privileged {
            let owned = self.owned.get(&c.domid).copied().unwrap_or(0);
            if owned + missing.len() > limits.nodes_per_domain {
                return Err("EQUOTA");
            }
        }
        missing.reverse();
        let mut perms = anchor_perms;
        if !c.privileged {
            perms[0].domid = c.domid;
        }
        for m in &missing {
            Tree::note(log, self, m);
            let gen = self.bump();
            let parent = path::parent(m).ok_or("EINVAL")?.to_owned();
            if let Some(pn) = self.nodes.get_mut(&parent) {
                pn.children.push(path::basename(m).to_owned());
                pn.gen = gen;
            }
            self.nodes.insert(
                m.clone(),
                Node {
                    value: Vec::new(),
                    perms: perms.clone(),
                    children: Vec::new(),
                    gen,
                },
            );
            *self.owned.entry(perms[0].domid).or_default() += 1;
        }
        Ok(missing)
    }

    pub fn write(
        &mut self,
        c: Caller,
        path: &str,
        value: &[u8],
        limits: &Limits,
        mut log: Option<&mut AccessLog>,
    ) -> Result<Vec<Changed>, Errno> {
        if value.len() > limits.entry_size {
            return Err("E2BIG");
        }
        Tree::note(&mut log, self, path);
        if path == "/" {
            return Err("EINVAL");
        }
        if !self.nodes.contains_key(path) {
            self.create(c, path, limits, &mut log)?;
        } else {
            let n = &self.nodes[path];
            if !access_for(&n.perms, c.domid, c.privileged).can_write() {
                return Err("EACCES");
            }
        }
        let gen = self.bump();
        let n = self.nodes.get_mut(path).ok_or("ENOENT")?;
        n.value = value.to_vec();
        n.gen = gen;
        Ok(vec![Changed {
            path: path.to_owned(),
            perms: n.perms.clone(),
            subtree_removed: false,
        }])
    }

    pub fn mkdir(
        &mut self,
        c: Caller,
        path: &str,
        limits: &Limits,
        mut log: Option<&mut AccessLog>,
    ) -> Result<Vec<Changed>, Errno> {
        Tree::note(&mut log, self, path);
        if let Some(n) = self.nodes.get(path) {
            // Existing node: success if the caller could write it, as xenstored.
            return if access_for(&n.perms, c.domid, c.privileged).can_write() {
                Ok(Vec::new())
            } else {
                Err("EACCES")
            };
        }
        self.create(c, path, limits, &mut log)?;
        let n = &self.nodes[path];
        Ok(vec![Changed {
            path: path.to_owned(),
            perms: n.perms.clone(),
            subtree_removed: false,
        }])
    }

    pub fn rm(
        &mut self,
        c: Caller,
        path: &str,
        mut log: Option<&mut AccessLog>,
    ) -> Result<Vec<Changed>, Errno> {
        if path == "/" {
            return Err("EINVAL");
        }
        Tree::note(&mut log, self, path);
        let Some(n) = self.nodes.get(path) else {
            // Removing a missing node succeeds when its parent exists and is accessible.
            let parent = path::parent(path).unwrap_or("/");
            Tree::note(&mut log, self, parent);
            return match self.nodes.get(parent) {
                Some(pn) if access_for(&pn.perms, c.domid, c.privileged).can_read() => {
                    Ok(Vec::new())
                }
                Some(_) => Err("EACCES"),
                None => Err(self.missing(c, path, Access::can_write)),
            };
        };
        if !access_for(&n.perms, c.domid, c.privileged).can_write() {
            return Err("EACCES");
        }
        let perms = n.perms.clone();
        let parent = path::parent(path).unwrap_or("/").to_owned();
        Tree::note(&mut log, self, &parent);
        // Remove the subtree.
        let mut stack = vec![path.to_owned()];
        while let Some(p) = stack.pop() {
            Tree::note(&mut log, self, &p);
            if let Some(node) = self.nodes.remove(&p) {
                if let Some(cnt) = self.owned.get_mut(&node.perms[0].domid) {
                    *cnt = cnt.saturating_sub(1);
                }
                stack.extend(node.children.iter().map(|ch| path::join(&p, ch)));
            }
        }
        let gen = self.bump();
        if let Some(pn) = self.nodes.get_mut(&parent) {
            let name = path::basename(path);
            pn.children.retain(|ch| ch != name);
            pn.gen = gen;
        }
        Ok(vec![Changed {
            path: path.to_owned(),
            perms,
            subtree_removed: true,
        }])
    }

    pub fn set_perms(
        &mut self,
        c: Caller,
        path: &str,
        perms: Vec<Perm>,
        mut log: Option<&mut AccessLog>,
    ) -> Result<Vec<Changed>, Errno> {
        Tree::note(&mut log, self, path);
        let Some(n) = self.nodes.get(path) else {
            return Err(self.missing(c, path, Access::can_write));
        };
        if perms.is_empty() {
            return Err("EINVAL");
        }
        if !c.privileged {
            let owner = n.perms[0].domid;
            if owner != c.domid {
                return Err("EACCES");
            }
            if perms[0].domid != owner {
                return Err("EPERM");
            }
        }
        let old_owner = n.perms[0].domid;
        let gen = self.bump();
        let n = self.nodes.get_mut(path).ok_or("ENOENT")?;
        // Watchers who could see the node before or after the change are told.
        let mut visible = n.perms.clone();
        visible.extend(perms.iter().copied());
        n.perms = perms;
        n.gen = gen;
        let new_owner = n.perms[0].domid;
        if old_owner != new_owner {
            if let Some(cnt) = self.owned.get_mut(&old_owner) {
                *cnt = cnt.saturating_sub(1);
            }
            *self.owned.entry(new_owner).or_default() += 1;
        }
        Ok(vec![Changed {
            path: path.to_owned(),
            perms: visible,
            subtree_removed: false,
        }])
    }

    /// Whether every node in `log` still has the generation recorded there.
    pub fn unchanged_since(&self, log: &AccessLog) -> bool {
        log.iter()
            .all(|(p, gen)| self.nodes.get(p).map(|n| n.gen) == *gen)
    }

    /// Nodes owned by `domid` (for quota reporting and tests).
    pub fn owned_by(&self, domid: u32) -> usize {
        self.owned.get(&domid).copied().unwrap_or(0)
    }

    /// Every path below `root` (for tests and debugging).
    pub fn paths_under(&self, root: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .nodes
            .keys()
            .filter(|p| is_subpath(root, p))
            .cloned()
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits::default()
    }

    #[test]
    fn write_creates_parents_and_inherits_perms() {
        let mut t = Tree::new();
        t.write(Caller::DOM0, "/a/b/c", b"v", &lim(), None).unwrap();
        assert_eq!(t.read(Caller::DOM0, "/a/b/c", None).unwrap(), b"v");
        assert_eq!(t.read(Caller::DOM0, "/a/b", None).unwrap(), b"");
        assert_eq!(
            t.directory(Caller::DOM0, "/a", None).unwrap().1,
            vec!["b".to_string()]
        );
        assert_eq!(
            t.get_perms(Caller::DOM0, "/a/b/c", None).unwrap(),
            vec![Perm::new(Access::None, 0)]
        );
    }

    #[test]
    fn domain_permissions() {
        let mut t = Tree::new();
        let d5 = Caller::domain(5);
        t.mkdir(Caller::DOM0, "/local/domain/5", &lim(), None)
            .unwrap();
        t.set_perms(
            Caller::DOM0,
            "/local/domain/5",
            vec![Perm::new(Access::None, 0), Perm::new(Access::Read, 5)],
            None,
        )
        .unwrap();
        // Readable, not writable.
        assert!(t.read(d5, "/local/domain/5", None).is_ok());
        assert_eq!(
            t.write(d5, "/local/domain/5/x", b"1", &lim(), None),
            Err("EACCES")
        );
        // A domain-owned subdirectory: the domain owns what it creates there.
        t.mkdir(Caller::DOM0, "/local/domain/5/device", &lim(), None)
            .unwrap();
        t.set_perms(
            Caller::DOM0,
            "/local/domain/5/device",
            vec![Perm::new(Access::None, 5)],
            None,
        )
        .unwrap();
        t.write(d5, "/local/domain/5/device/vif/0/mac", b"x", &lim(), None)
            .unwrap();
        assert_eq!(
            t.get_perms(d5, "/local/domain/5/device/vif/0/mac", None)
                .unwrap()[0]
                .domid,
            5
        );
        // Another domain cannot even learn whether nodes exist under dom0-only paths.
        assert_eq!(
            t.read(Caller::domain(6), "/local/domain/5/nope", None),
            Err("EACCES")
        );
        assert_eq!(t.read(d5, "/local/domain/5/nope", None), Err("ENOENT"));
        // Owner may not give a node away.
        assert_eq!(
            t.set_perms(
                d5,
                "/local/domain/5/device/vif",
                vec![Perm::new(Access::None, 6)],
                None
            ),
            Err("EPERM")
        );
        // Non-owner may not change permissions.
        assert_eq!(
            t.set_perms(
                Caller::domain(6),
                "/local/domain/5/device",
                vec![Perm::new(Access::Both, 6)],
                None
            ),
            Err("EACCES")
        );
    }

    #[test]
    fn rm_semantics() {
        let mut t = Tree::new();
        t.write(Caller::DOM0, "/a/b/c", b"v", &lim(), None).unwrap();
        let ch = t.rm(Caller::DOM0, "/a/b", None).unwrap();
        assert!(ch[0].subtree_removed);
        assert!(t.node("/a/b/c").is_none());
        assert!(t.directory(Caller::DOM0, "/a", None).unwrap().1.is_empty());
        // Missing node with an existing parent: fine. Missing parent: ENOENT.
        assert_eq!(t.rm(Caller::DOM0, "/a/zz", None), Ok(vec![]));
        assert_eq!(t.rm(Caller::DOM0, "/q/zz", None), Err("ENOENT"));
        assert_eq!(t.rm(Caller::DOM0, "/", None), Err("EINVAL"));
    }

    #[test]
    fn quotas() {
        let mut t = Tree::new();
        let small = Limits {
            nodes_per_domain: 3,
            ..lim()
        };
        assert_eq!(
            t.write(Caller::DOM0, "/x", &[b'a'; 2049], &small, None),
            Err("E2BIG")
        );
        t.mkdir(Caller::DOM0, "/d", &small, None).unwrap();
        t.set_perms(Caller::DOM0, "/d", vec![Perm::new(Access::Both, 0)], None)
            .unwrap();
        let d = Caller::domain(9);
        t.write(d, "/d/1", b"", &small, None).unwrap();
        t.write(d, "/d/2", b"", &small, None).unwrap();
        t.write(d, "/d/3", b"", &small, None).unwrap();
        assert_eq!(t.write(d, "/d/4", b"", &small, None), Err("EQUOTA"));
        t.rm(d, "/d/1", None).unwrap();
        t.write(d, "/d/4", b"", &small, None).unwrap();
        assert_eq!(t.owned_by(9), 3);
    }

    #[test]
    fn access_log_detects_conflicts() {
        let mut t = Tree::new();
        t.write(Caller::DOM0, "/k", b"1", &lim(), None).unwrap();
        let mut log = AccessLog::new();
        t.read(Caller::DOM0, "/k", Some(&mut log)).unwrap();
        let _ = t.read(Caller::DOM0, "/absent", Some(&mut log));
        assert!(t.unchanged_since(&log));
        t.write(Caller::DOM0, "/k", b"2", &lim(), None).unwrap();
        assert!(!t.unchanged_since(&log));
        let mut log = AccessLog::new();
        let _ = t.read(Caller::DOM0, "/absent", Some(&mut log));
        t.write(Caller::DOM0, "/absent", b"now", &lim(), None)
            .unwrap();
        assert!(!t.unchanged_since(&log));
    }
}
