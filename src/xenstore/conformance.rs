//! Checks of xenstored behaviour that virtsec relies on, run against any xenstored: the lab
//! server in the integration tests, the real oxenstored in tests/xen-e2e, or an
//! administrator's host (`virtsec selftest xenstore`). Every difference between our lab
//! server and the real daemon shows up as a failing check.
//!
//! Checks run as dom0 in a scratch subtree `/virtsec-selftest-<pid>` that is removed at the
//! end, and leave nothing else behind.

use std::path::Path;
use std::time::Duration;

use super::client::Client;
use super::perms::{Access, Perm};
use super::XsError;

/// Result of one check.
#[derive(Debug)]
pub struct CheckResult {
    pub name: &'static str,
    pub outcome: Result<(), String>,
}

type Check = fn(&mut Client, &str) -> Result<(), String>;

fn e(x: XsError) -> String {
    x.to_string()
}

fn expect_errno<T: std::fmt::Debug>(r: Result<T, XsError>, names: &[&str]) -> Result<(), String> {
    match r {
        Err(err) if names.iter().any(|n| err.is_errno(n)) => Ok(()),
        other => Err(format!("expected one of {names:?}, got {other:?}")),
    }
}

fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(what())
    }
}

fn read_write(xs: &mut Client, base: &str) -> Result<(), String> {
    let p = format!("{base}/rw/key");
    xs.write(&p, "value-1").map_err(e)?;
    ensure(xs.read(&p).map_err(e)? == b"value-1", || {
        "read back differs".into()
    })?;
    // Values are bytes: an embedded NUL survives.
    xs.write(&p, b"a\0b").map_err(e)?;
    ensure(xs.read(&p).map_err(e)? == b"a\0b", || {
        "binary value changed".into()
    })?;
    // Parents were created with empty values.
    ensure(
        xs.read(&format!("{base}/rw")).map_err(e)?.is_empty(),
        || "parent not empty".into(),
    )?;
    expect_errno(xs.read(&format!("{base}/rw/missing")), &["ENOENT"])
}

fn mkdir_and_directory(xs: &mut Client, base: &str) -> Result<(), String> {
    let d = format!("{base}/dir");
    xs.mkdir(&d).map_err(e)?;
    xs.mkdir(&d)
        .map_err(|err| format!("second MKDIR of an existing node failed: {err}"))?;
    for c in ["b", "a", "c"] {
        xs.write(&format!("{d}/{c}"), c).map_err(e)?;
    }
    let mut got = xs.directory(&d).map_err(e)?;
    got.sort();
    ensure(got == ["a", "b", "c"], || format!("listing {got:?}"))?;
    ensure(
        xs.directory(&format!("{d}/a")).map_err(e)?.is_empty(),
        || "leaf has children".into(),
    )
}

fn rm_semantics(xs: &mut Client, base: &str) -> Result<(), String> {
    let d = format!("{base}/rm");
    xs.write(&format!("{d}/x/y/z"), "1").map_err(e)?;
    xs.rm(&format!("{d}/x")).map_err(e)?;
    expect_errno(xs.read(&format!("{d}/x/y/z")), &["ENOENT"])?;
    // Removing a missing child of an existing node succeeds.
    xs.rm(&format!("{d}/never"))
        .map_err(|err| format!("rm of missing child: {err}"))?;
    expect_errno(xs.rm(&format!("{d}/never/deeper")), &["ENOENT"])
}

fn permissions(xs: &mut Client, base: &str) -> Result<(), String> {
    let p = format!("{base}/perm");
    xs.write(&p, "x").map_err(e)?;
    let want = vec![Perm::new(Access::None, 0), Perm::new(Access::Read, 5)];
    xs.set_perms(&p, &want).map_err(e)?;
    let got = xs.get_perms(&p).map_err(e)?;
    ensure(got == want, || format!("perms {got:?}"))?;
    // A child inherits its parent's permissions.
    xs.write(&format!("{p}/child"), "y").map_err(e)?;
    let got = xs.get_perms(&format!("{p}/child")).map_err(e)?;
    ensure(got == want, || format!("child perms {got:?}"))
}

fn watches(xs: &mut Client, base: &str) -> Result<(), String> {
    let w = format!("{base}/watched");
    xs.watch(&w, "tok-1").map_err(e)?;
    // A watch fires once at registration.
    let first = xs.next_event(Duration::from_secs(2)).map_err(e)?;
    ensure(
        matches!(&first, Some(ev) if ev.path == w && ev.token == "tok-1"),
        || format!("initial event {first:?}"),
    )?;
    let child = format!("{w}/child");
    xs.write(&child, "1").map_err(e)?;
    let mut seen = false;
    while let Some(ev) = xs.next_event(Duration::from_millis(500)).map_err(e)? {
        if ev.path == child && ev.token == "tok-1" {
            seen = true;
            break;
        }
    }
    ensure(seen, || "no event for a child write".into())?;
    xs.unwatch(&w, "tok-1").map_err(e)?;
    xs.write(&child, "2").map_err(e)?;
    while let Some(ev) = xs.next_event(Duration::from_millis(300)).map_err(e)? {
        if ev.token == "tok-1" && ev.path == child {
            return Err("event after UNWATCH".into());
        }
    }
    expect_errno(xs.unwatch(&w, "tok-1"), &["ENOENT"])
}

fn special_watches(xs: &mut Client, _base: &str) -> Result<(), String> {
    for (path, tok) in [("@introduceDomain", "intro"), ("@releaseDomain", "rel")] {
        xs.watch(path, tok).map_err(e)?;
        let ev = xs.next_event(Duration::from_secs(2)).map_err(e)?;
        ensure(
            matches!(&ev, Some(ev) if ev.path == path && ev.token == tok),
            || format!("initial {path} event {ev:?}"),
        )?;
        xs.unwatch(path, tok).map_err(e)?;
    }
    Ok(())
}

fn transactions(xs: &mut Client, base: &str) -> Result<(), String> {
    let k = format!("{base}/tx/k");
    xs.write(&k, "0").map_err(e)?;
    let t = xs.transaction_start().map_err(e)?;
    xs.write_tx(t, &k, "1").map_err(e)?;
    ensure(xs.read(&k).map_err(e)? == b"0", || {
        "uncommitted write visible".into()
    })?;
    ensure(xs.read_tx(t, &k).map_err(e)? == b"1", || {
        "own write not visible in tx".into()
    })?;
    xs.transaction_end(t, true).map_err(e)?;
    ensure(xs.read(&k).map_err(e)? == b"1", || {
        "committed write missing".into()
    })?;
    // Abort discards.
    let t = xs.transaction_start().map_err(e)?;
    xs.write_tx(t, &k, "2").map_err(e)?;
    xs.transaction_end(t, false).map_err(e)?;
    ensure(xs.read(&k).map_err(e)? == b"1", || {
        "aborted write applied".into()
    })
}

fn transaction_conflict(xs: &mut Client, base: &str) -> Result<(), String> {
    let k = format!("{base}/conflict/k");
    xs.write(&k, "0").map_err(e)?;
    // A transaction whose read is overtaken by another writer fails with EAGAIN.
    let t = xs.transaction_start().map_err(e)?;
    xs.read_tx(t, &k).map_err(e)?;
    xs.write(&k, "outside").map_err(e)?;
    xs.write_tx(t, &k, "inside").map_err(e)?;
    expect_errno(xs.transaction_end(t, true), &["EAGAIN"])?;
    ensure(xs.read(&k).map_err(e)? == b"outside", || {
        "conflicting tx applied".into()
    })?;
    // The retry helper re-runs the body and succeeds.
    let mut runs = 0;
    xs.transaction(|xs, t| {
        runs += 1;
        let v = xs.read_tx(t, &k)?;
        if runs == 1 {
            xs.write(&k, "interloper")?;
        }
        xs.write_tx(t, &k, [v.as_slice(), b"+1"].concat())
    })
    .map_err(e)?;
    ensure(runs == 2, || format!("body ran {runs} times, expected 2"))?;
    ensure(xs.read(&k).map_err(e)? == b"interloper+1", || {
        "retry result wrong".into()
    })
}

fn large_directory(xs: &mut Client, base: &str) -> Result<(), String> {
    // 300 names of 20 bytes: more than one 4 KiB payload, so DIRECTORY answers E2BIG and the
    // client must page with DIRECTORY_PART.
    let d = format!("{base}/big");
    let names: Vec<String> = (0..300).map(|i| format!("child-{i:014}")).collect();
    xs.transaction(|xs, t| {
        for n in &names {
            xs.write_tx(t, &format!("{d}/{n}"), "")?;
        }
        Ok(())
    })
    .map_err(e)?;
    let mut got = xs.directory(&d).map_err(e)?;
    got.sort();
    ensure(got == names, || {
        format!("{} names listed of {}", got.len(), names.len())
    })
}

fn limits(xs: &mut Client, base: &str) -> Result<(), String> {
    let p = format!("{base}/limits");
    xs.write(&p, vec![b'v'; 2000])
        .map_err(|err| format!("2000-byte value refused: {err}"))?;
    expect_errno(
        xs.write(&p, vec![b'v'; 4000]),
        &["E2BIG", "ENOSPC", "EQUOTA"],
    )?;
    expect_errno(xs.read(&format!("{base}//double")), &["EINVAL"])?;
    expect_errno(xs.read(&format!("{base}/bad char")), &["EINVAL"])
}

fn domains(xs: &mut Client, _base: &str) -> Result<(), String> {
    ensure(
        xs.get_domain_path(5).map_err(e)? == "/local/domain/5",
        || "domain path".into(),
    )?;
    ensure(xs.is_domain_introduced(0).map_err(e)?, || {
        "dom0 not introduced".into()
    })
}

/// The checks, in order.
pub const CHECKS: &[(&str, Check)] = &[
    ("read/write round trip, binary values, ENOENT", read_write),
    ("mkdir and directory listing", mkdir_and_directory),
    ("rm removes subtrees; missing child is fine", rm_semantics),
    ("set/get permissions and inheritance", permissions),
    ("watch: initial event, child event, unwatch", watches),
    (
        "special watches @introduceDomain/@releaseDomain",
        special_watches,
    ),
    ("transaction isolation, commit and abort", transactions),
    (
        "transaction conflict gives EAGAIN; retry succeeds",
        transaction_conflict,
    ),
    (
        "directory larger than one payload (DIRECTORY_PART)",
        large_directory,
    ),
    ("value size limit and invalid paths", limits),
    ("GET_DOMAIN_PATH and IS_DOMAIN_INTRODUCED", domains),
];

/// Runs every check against the xenstored at `path`; each check gets a fresh connection.
pub fn run(path: &Path) -> Result<Vec<CheckResult>, XsError> {
    let base = format!("/virtsec-selftest-{}", std::process::id());
    let mut cleanup = Client::open(path)?;
    let mut out = Vec::new();
    for (name, check) in CHECKS {
        let outcome = match Client::open(path) {
            Ok(mut xs) => {
                xs.set_timeout(Duration::from_secs(5));
                check(&mut xs, &base)
            }
            Err(err) => Err(err.to_string()),
        };
        out.push(CheckResult { name, outcome });
    }
    cleanup.rm(&base)?;
    Ok(out)
}
