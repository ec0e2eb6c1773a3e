//! Debian's real C XenStore clients (xenstore-utils, libxenstore 4.17) against the lab
//! xenstored: if our server speaks the protocol differently from xenstored, these fail.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use virtsec::xenstore::Client;

#[test]
fn read_write_ls_list_exists_rm() {
    let dir = tempfile::tempdir().unwrap();
    let _srv = lab_xenstored(dir.path(), &[]);
    let s = dir.path().join("xs.sock");

    // Two pairs in one call: xenstore-write runs them in one transaction.
    let o = xs_util(&s, "xenstore-write", &["/t/a", "alpha", "/t/b/c", "gamma"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&xs_util(&s, "xenstore-read", &["/t/a"])), "alpha\n");
    assert_eq!(
        stdout(&xs_util(&s, "xenstore-read", &["-p", "/t/b/c"])),
        "/t/b/c: gamma\n"
    );

    let list = stdout(&xs_util(&s, "xenstore-list", &["/t"]));
    assert_eq!(list, "a\nb\n");
    let ls = stdout(&xs_util(&s, "xenstore-ls", &["-p", "/t"]));
    assert!(ls.contains("a = \"alpha\"") && ls.contains("(n0)"), "{ls}");
    assert!(ls.contains(" c = \"gamma\""), "nested child listed: {ls}");

    assert!(xs_util(&s, "xenstore-exists", &["/t/a"]).status.success());
    assert!(!xs_util(&s, "xenstore-exists", &["/t/zz"]).status.success());

    assert!(xs_util(&s, "xenstore-rm", &["/t/b"]).status.success());
    assert_eq!(stdout(&xs_util(&s, "xenstore-list", &["/t"])), "a\n");
    let o = xs_util(&s, "xenstore-read", &["/t/b/c"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("couldn't read path"));

    // -t (tidy) removes empty parents up the tree.
    xs_util(&s, "xenstore-write", &["/tidy/x/y", "1"]);
    assert!(xs_util(&s, "xenstore-rm", &["-t", "/tidy/x/y"])
        .status
        .success());
    assert!(!xs_util(&s, "xenstore-exists", &["/tidy"]).status.success());
}

#[test]
fn chmod_and_permission_refusal_for_a_domain_socket() {
    let dir = tempfile::tempdir().unwrap();
    let _srv = lab_xenstored(dir.path(), &[5, 6]);
    let s = dir.path().join("xs.sock");
    let d5 = dir.path().join("d5.sock");
    let d6 = dir.path().join("d6.sock");

    xs_util(&s, "xenstore-write", &["/secret/key", "v"]);
    // Owned by dom0, no access for others: domain 5 can neither read nor write.
    assert!(!xs_util(&d5, "xenstore-read", &["/secret/key"])
        .status
        .success());
    assert!(!xs_util(&d5, "xenstore-write", &["/secret/key", "x"])
        .status
        .success());
    assert!(!xs_util(&d5, "xenstore-ls", &["/secret"]).status.success());

    // Grant domain 5 read: it reads, still cannot write; domain 6 still cannot read.
    assert!(
        xs_util(&s, "xenstore-chmod", &["-r", "/secret", "n0", "r5"])
            .status
            .success()
    );
    assert_eq!(
        stdout(&xs_util(&d5, "xenstore-read", &["/secret/key"])),
        "v\n"
    );
    assert!(!xs_util(&d5, "xenstore-write", &["/secret/key", "x"])
        .status
        .success());
    assert!(!xs_util(&d6, "xenstore-read", &["/secret/key"])
        .status
        .success());
    let ls = stdout(&xs_util(&s, "xenstore-ls", &["-p", "/secret"]));
    assert!(ls.contains("(n0,r5)"), "{ls}");

    // A domain owns what it creates in a directory it may write, and relative paths resolve
    // under its home.
    xs_util(&s, "xenstore-write", &["/local/domain/5/data", ""]);
    assert!(
        xs_util(&s, "xenstore-chmod", &["/local/domain/5/data", "n5"])
            .status
            .success()
    );
    assert!(xs_util(&d5, "xenstore-write", &["data/mine", "1"])
        .status
        .success());
    let ls = stdout(&xs_util(&s, "xenstore-ls", &["-p", "/local/domain/5/data"]));
    assert!(ls.contains("mine = \"1\"") && ls.contains("(n5)"), "{ls}");
    // ... but may not give it to another domain.
    assert!(!xs_util(&d5, "xenstore-chmod", &["data/mine", "n6"])
        .status
        .success());
    // ... and domain 6 cannot even see it.
    assert!(
        !xs_util(&d6, "xenstore-read", &["/local/domain/5/data/mine"])
            .status
            .success()
    );
}

#[test]
fn watch_delivers_events() {
    let dir = tempfile::tempdir().unwrap();
    let _srv = lab_xenstored(dir.path(), &[]);
    let s = dir.path().join("xs.sock");
    xs_util(&s, "xenstore-write", &["/w", ""]);
    // Initial event + two changes.
    let child = Command::new("/usr/bin/xenstore-watch")
        .args(["-n", "3", "/w"])
        .env("XENSTORED_PATH", &s)
        .stdout(Stdio::piped())
        .spawn()
        .expect("xenstore-watch (install xenstore-utils)");
    std::thread::sleep(Duration::from_millis(200));
    xs_util(&s, "xenstore-write", &["/w/one", "1"]);
    xs_util(&s, "xenstore-rm", &["/w/one"]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(stdout(&out), "/w\n/w/one\n/w/one\n");
}

#[test]
fn transaction_conflict_and_retry_with_c_and_rust_clients() {
    let dir = tempfile::tempdir().unwrap();
    let _srv = lab_xenstored(dir.path(), &[]);
    let s = dir.path().join("xs.sock");
    let mut xs = Client::open(&s).unwrap();
    xs.write("/tx/k", "0").unwrap();
    let t = xs.transaction_start().unwrap();
    assert_eq!(xs.read_tx(t, "/tx/k").unwrap(), b"0");
    // The C client commits a change to the key under our transaction's feet.
    assert!(xs_util(&s, "xenstore-write", &["/tx/k", "c-client"])
        .status
        .success());
    xs.write_tx(t, "/tx/k", "rust").unwrap();
    let err = xs.transaction_end(t, true).unwrap_err();
    assert!(err.is_errno("EAGAIN"), "{err}");
    assert_eq!(
        stdout(&xs_util(&s, "xenstore-read", &["/tx/k"])),
        "c-client\n"
    );
    // The retrying helper re-runs the body and wins on the second attempt.
    let mut attempts = 0;
    xs.transaction(|xs, t| {
        attempts += 1;
        let v = xs.read_tx(t, "/tx/k")?;
        if attempts == 1 {
            let o = xs_util(&s, "xenstore-write", &["/tx/k", "again"]);
            assert!(o.status.success());
        }
        xs.write_tx(t, "/tx/k", [v.as_slice(), b"+rust"].concat())
    })
    .unwrap();
    assert_eq!(attempts, 2);
    assert_eq!(
        stdout(&xs_util(&s, "xenstore-read", &["/tx/k"])),
        "again+rust\n"
    );
}

#[test]
fn conformance_suite_passes_against_the_lab_server() {
    let dir = tempfile::tempdir().unwrap();
    let _srv = lab_xenstored(dir.path(), &[]);
    let out = Command::new(VIRTSEC)
        .args(["selftest", "xenstore", "--xenstore-socket"])
        .arg(dir.path().join("xs.sock"))
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.trim_end().ends_with("11 passed, 0 failed"), "{text}");
    // It cleans up after itself.
    let ls = stdout(&xs_util(
        &dir.path().join("xs.sock"),
        "xenstore-list",
        &["/"],
    ));
    assert!(!ls.contains("virtsec-selftest"), "{ls}");
}

#[test]
fn oversized_frame_drops_only_that_client() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let _srv = lab_xenstored(dir.path(), &[]);
    let s = dir.path().join("xs.sock");
    let mut raw = std::os::unix::net::UnixStream::connect(&s).unwrap();
    // Header announcing a 1 MiB payload.
    let mut hdr = Vec::new();
    for w in [2u32, 1, 0, 1 << 20] {
        hdr.extend_from_slice(&w.to_ne_bytes());
    }
    raw.write_all(&hdr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut raw, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "server should close a client that breaks framing");
    // Others are unaffected.
    assert!(xs_util(&s, "xenstore-write", &["/still", "up"])
        .status
        .success());
}
