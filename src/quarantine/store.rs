//! Quarantine state on disk: one JSON file per VM UUID under `<state_dir>/quarantine/`.
//!
//! Each write is atomic and durable: the record goes to a temporary file in the same
//! directory, is fsynced, renamed over `<uuid>.json`, and the directory is fsynced, so a
//! crash or power loss leaves either the old record or the new one, never a torn file. A
//! release removes the file and fsyncs the directory. A file that does not parse is never
//! deleted or overwritten silently: loading reports it (the daemon names it in `status` and
//! keeps the kernel's enforcement for it) until an operator moves it away.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::Record;

/// Errors reading or writing state.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use the quarantine state directory {path}: {source}. Check that it exists, is writable by virtsecd and the disk is not full")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write quarantine state {path}: {source}. The action was not recorded: check free space and permissions")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("quarantine state file {path} is corrupt ({reason}); it was left in place and its VM's kernel rules are kept. Inspect it, then move it away and re-apply the quarantine")]
    Corrupt { path: PathBuf, reason: String },
}

/// The state directory.
pub struct Store {
    dir: PathBuf,
}

/// A UUID as the file name: 8-4-4-4-12 hex digits (callers lower-case it). Anything else
/// (from a hostile or broken source) is refused before it becomes a path.
pub use crate::inventory::model::valid_uuid;

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store {
    /// Opens (creating) `<state_dir>/quarantine`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        let dir = state_dir.join("quarantine");
        fs::create_dir_all(&dir).map_err(|source| StoreError::Dir {
            path: dir.clone(),
            source,
        })?;
        Ok(Store { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, uuid: &str) -> PathBuf {
        self.dir.join(format!("{uuid}.json"))
    }

    /// Every record, and every file that could not be read as one.
    pub fn load(&self) -> Result<(BTreeMap<String, Record>, Vec<StoreError>), StoreError> {
        let mut out = BTreeMap::new();
        let mut bad = Vec::new();
        let rd = fs::read_dir(&self.dir).map_err(|source| StoreError::Dir {
            path: self.dir.clone(),
            source,
        })?;
        for e in rd.flatten() {
            let path = e.path();
            let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
            else {
                continue;
            };
            let corrupt = |reason: String| StoreError::Corrupt {
                path: path.clone(),
                reason,
            };
            let text = match fs::read(&path) {
                Ok(t) => t,
                Err(e) => {
                    bad.push(corrupt(e.to_string()));
                    continue;
                }
            };
            match serde_json::from_slice::<Record>(&text) {
                Ok(r) if r.uuid == stem && valid_uuid(stem) => {
                    out.insert(r.uuid.clone(), r);
                }
                Ok(r) => bad.push(corrupt(format!(
                    "it names UUID {:?} but is stored as {stem:?}",
                    r.uuid
                ))),
                Err(e) => bad.push(corrupt(e.to_string())),
            }
        }
        Ok((out, bad))
    }

    /// Writes `r` atomically and durably.
    pub fn save(&self, r: &Record) -> Result<(), StoreError> {
        let path = self.path(&r.uuid);
        let tmp = self.dir.join(format!(".{}.tmp", r.uuid));
        let werr = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(r).map_err(|e| werr(std::io::Error::other(e)))?;
        let mut f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&tmp)
            .map_err(werr)?;
        let res = f
            .write_all(&body)
            .and_then(|_| f.write_all(b"\n"))
            .and_then(|_| f.sync_all());
        drop(f);
        if let Err(e) = res {
            let _ = fs::remove_file(&tmp);
            return Err(werr(e));
        }
        fs::rename(&tmp, &path).map_err(werr)?;
        sync_dir(&self.dir).map_err(werr)
    }

    /// Removes the record of `uuid` (released).
    pub fn remove(&self, uuid: &str) -> Result<(), StoreError> {
        let path = self.path(uuid);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(StoreError::Write { path, source }),
        }
        sync_dir(&self.dir).map_err(|source| StoreError::Write {
            path: self.dir.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quarantine::Action;

    fn rec(uuid: &str) -> Record {
        Record {
            uuid: uuid.into(),
            name: Some("web".into()),
            domid: Some(5),
            actions: vec![Action::Isolate],
            reason: "test".into(),
            since: 1,
            by: "operator".into(),
            paused: None,
            rates: Default::default(),
            bridges: Default::default(),
            releasing: None,
        }
    }

    #[test]
    fn save_load_remove_and_corrupt_files_are_reported_not_lost() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let u = "5e1ab000-0000-4000-8000-000000000005";
        s.save(&rec(u)).unwrap();
        let (m, bad) = s.load().unwrap();
        assert_eq!(m.get(u), Some(&rec(u)));
        assert!(bad.is_empty());
        // A torn/corrupt file is reported and left in place.
        let other = "5e1ab000-0000-4000-8000-000000000006";
        std::fs::write(s.dir().join(format!("{other}.json")), b"{\"uuid\": \"5e1a").unwrap();
        let (m, bad) = s.load().unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(bad.len(), 1);
        assert!(bad[0].to_string().contains("corrupt"), "{}", bad[0]);
        assert!(s.dir().join(format!("{other}.json")).exists());
        s.remove(u).unwrap();
        assert!(s.load().unwrap().0.is_empty());
        assert!(valid_uuid(u));
        assert!(!valid_uuid("../../etc/passwd"));
        assert!(!valid_uuid("5e1ab000-0000-4000-8000-00000000000g"));
    }

    #[test]
    fn unwritable_directory_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let mut r = rec("5e1ab000-0000-4000-8000-000000000005");
        // A directory where the record's temporary file would go makes the write fail.
        std::fs::create_dir(s.dir().join(format!(".{}.tmp", r.uuid))).unwrap();
        let e = s.save(&r).unwrap_err().to_string();
        assert!(e.contains("not recorded"), "{e}");
        r.uuid = "5e1ab000-0000-4000-8000-000000000007".into();
        s.save(&r).unwrap();
    }
}
