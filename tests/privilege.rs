//! virtsecd drops every capability it does not use once set up: the bounding, permitted and
//! effective sets of the running service are exactly NET_ADMIN, NET_RAW, IPC_LOCK and
//! SYS_ADMIN, nothing is inheritable, and no_new_privs is set (read from /proc/<pid>/status).
//! The other namespace tests (anti-spoofing, inline, quarantine) show the service still does
//! its work with these. Needs root; skipped otherwise.

mod common;

use std::time::Duration;

use common::*;

fn field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap_or(u64::MAX))
        .unwrap_or(u64::MAX)
}

#[test]
fn the_running_service_keeps_only_its_capabilities() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED the_running_service_keeps_only_its_capabilities: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _log = LogOnPanic(dir.path().to_path_buf());
    let _xs = lab_xenstored(dir.path(), &[]);
    let extra = format!(
        "[inspect]\nnice = -7\neve = {:?}\n",
        dir.path().join("eve.json").display().to_string()
    );
    let d = virtsecd_with(dir.path(), None, &extra);
    std::thread::sleep(Duration::from_millis(100));
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let want: u64 = virtsec::privilege::KEEP
        .iter()
        .map(|c| 1u64 << c.index())
        .sum();
    assert_eq!(want, (1 << 12) | (1 << 13) | (1 << 14) | (1 << 21));
    for set in ["CapBnd", "CapPrm", "CapEff"] {
        assert_eq!(field(&status, set), want, "{set} in\n{status}");
    }
    assert_eq!(field(&status, "CapInh"), 0);
    assert_eq!(field(&status, "NoNewPrivs"), 1);
    // `[inspect] nice`, set before the drop (field 19 of /proc/<pid>/stat).
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", d.pid())).unwrap();
    let after_comm = stat.rsplit(')').next().unwrap_or_default();
    let nice: i64 = after_comm
        .split_whitespace()
        .nth(16)
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert_eq!(nice, -7, "{stat}");
    // Still serving.
    assert!(status_ok(dir.path()));
}

fn status_ok(dir: &std::path::Path) -> bool {
    status(dir).is_some_and(|s| s["xenstore"]["in_sync"] == true)
}
