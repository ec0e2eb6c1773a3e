//! Kernel-side capture trimming (`capture::bpf`) on a simulated backend domain: two guests on
//! `xenbr0` behind vif5.0 and vif6.0, anti-spoofing on (so guest-to-guest frames are inspected
//! once, at the sender's vif), `inspect_past_depth = false` and two workers per vif.
//!
//! What a user sees: a 3 MiB upload from guest 5 to guest 6 is copied into the rings only up to
//! the stream depth at vif5.0 and headers-only at vif6.0, yet the server's reply is still
//! matched by a `flow:established` rule at vif6.0 (flow state followed the trimmed frames), and
//! a new connection reusing the same 5-tuple is inspected from its first byte (the kernel
//! forgets a bypass on SYN). A rule reload gives every bypassed direction back.
//! Needs root, nftables and eBPF; reports itself skipped otherwise.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use virtsec::lab::toolstack::GuestSpec;

const SERVER: &str = r#"
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('10.96.0.6', 9000)); s.listen(2); s.settimeout(20)
for _ in range(2):
    c, _ = s.accept()
    while c.recv(1 << 16): pass
    c.sendall(b'server-reply-marker'); c.close()
"#;

/// Connects from port 40001 twice: 3 MiB the first time (paced, so the worker sees the depth
/// pass while most of it is still to come), a marker first thing the second.
const CLIENT: &str = r#"
import socket, time
def conn(chunks):
    c = socket.socket(); c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    c.bind(('10.96.0.5', 40001)); c.settimeout(10); c.connect(('10.96.0.6', 9000))
    for x in chunks:
        c.sendall(x); time.sleep(0.002)
    c.shutdown(socket.SHUT_WR)
    while c.recv(100): pass
    c.close()
conn([b'a' * (64 << 10)] * 48)
time.sleep(0.3)
conn([b'reused-tuple-marker' + b'b' * 1000])
"#;

fn sids(dir: &std::path::Path) -> Vec<u64> {
    stdout(&cli(dir, &["alerts", "--json"]))
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|a| a["alert"]["signature_id"].as_u64())
        .collect()
}

/// Two guests on a simulated backend domain and virtsecd inspecting them, with or without
/// anti-spoofing, two workers per vif, `rules` and `extra` configuration (fields drop in order: the
/// service, the namespaces, the log on panic, the directory, the test lock).
struct Lab {
    g5: String,
    g6: String,
    _d: Proc,
    _xs: Proc,
    _ns: Netns,
    _log: LogOnPanic,
    dir: tempfile::TempDir,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Lab {
    /// A server in guest 6 on port 9000 that reads one connection to its end, listening.
    fn sink(&self) -> std::process::Child {
        let server = Command::new("ip")
            .args(["netns", "exec", &self.g6, "python3", "-c", "import socket\ns=socket.socket(); s.bind(('10.96.0.6', 9000)); s.listen(1); s.settimeout(20)\nc,_=s.accept()\nwhile c.recv(1 << 16): pass"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        server
    }
}

/// `None` (the test reports itself skipped) without root or nft; panics if the capture
/// filter did not load.
fn lab(test: &str, antispoof: bool, rules: &str, extra: &str) -> Option<Lab> {
    if !nix::unistd::geteuid().is_root() || Command::new("nft").arg("--version").output().is_err() {
        eprintln!("SKIPPED {test}: needs root and nft");
        return None;
    }
    let serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let log = LogOnPanic(tmp.path().to_path_buf());
    let dir = tmp.path();
    let id = std::process::id();
    let (dd, g5, g6) = (format!("vtd{id}"), format!("vtg5{id}"), format!("vtg6{id}"));
    bridge_domain(&dd, None);
    let ns = Netns(vec![dd.clone(), g5.clone(), g6.clone()]);
    bridged_guest(&dd, &g5, "vif5.0", "00:16:3e:00:05:00", "10.96.0.5/24");
    bridged_guest(&dd, &g6, "vif6.0", "00:16:3e:00:06:00", "10.96.0.6/24");

    let (xs, mut ts) = lab_toolstack(dir);
    for (domid, name) in [(5, "client"), (6, "server")] {
        let mut g = GuestSpec::simple(domid, name, "xenbr0");
        g.vifs[0].ip = Some(format!("10.96.0.{domid}"));
        ts.create(&g, None).unwrap();
    }
    let rule_file = dir.join("trim.rules");
    std::fs::write(&rule_file, rules).unwrap();
    let extra = format!(
        "[enforce]\nantispoof = {antispoof}\n[inspect]\nrules = [{:?}]\neve = {:?}\nworkers_per_vif = 2\n{extra}",
        rule_file.display().to_string(),
        dir.join("eve.json").display().to_string()
    );
    let d = virtsecd_with(dir, Some(&dd), &extra);
    wait_for("both vifs attached", Duration::from_secs(10), || {
        status(dir)
            .map(|s| {
                s["inspection"]["vif5.0"]["attached"] == true
                    && s["inspection"]["vif6.0"]["attached"] == true
                    && (!antispoof || s["antispoof"]["vif6.0"]["domid"] == 6)
            })
            .unwrap_or(false)
    });
    let s = status(dir).unwrap();
    if s["capture_filter"]["loaded"] != true {
        // Not a pass: the kernel refused eBPF, so there is nothing to check here.
        panic!("the capture filter did not load: {}", s["capture_filter"]);
    }
    Some(Lab {
        g5,
        g6,
        _d: d,
        _xs: xs,
        _ns: ns,
        _log: log,
        dir: tmp,
        _serial: serial,
    })
}

#[test]
fn trimmed_capture_keeps_flow_state_and_reinspects_reused_tuples() {
    let Some(lab) = lab(
        "trimmed_capture_keeps_flow_state_and_reinspects_reused_tuples",
        true,
        "alert tcp any any -> any 9000 (msg:\"marker on a reused tuple\"; flow:established,to_server; content:\"reused-tuple-marker\"; sid:8001;)\n\
         alert tcp any 9000 -> any any (msg:\"server reply\"; flow:established,to_client; content:\"server-reply-marker\"; sid:8002;)\n",
        "inspect_past_depth = false\n",
    ) else {
        return;
    };
    let (g5, g6, dir) = (&lab.g5, &lab.g6, &lab.dir);

    let server = Command::new("ip")
        .args(["netns", "exec", g6, "python3", "-c", SERVER])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let client = Command::new("ip")
        .args(["netns", "exec", g5, "python3", "-c", CLIENT])
        .status()
        .unwrap();
    assert!(client.success(), "the guests could not talk");
    server.wait_with_output().unwrap();

    wait_for("three alerts", Duration::from_secs(5), || {
        sids(dir.path()).len() >= 3
    });
    let mut got = sids(dir.path());
    got.sort();
    assert_eq!(
        got,
        vec![8001, 8002, 8002],
        "the reply on each connection (flow state from trimmed frames) and the marker on the reused tuple"
    );
    let s = status(dir.path()).unwrap();
    let v5 = &s["inspection"]["vif5.0"];
    let v6 = &s["inspection"]["vif6.0"];
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    assert!(n(&s["capture_filter"]["bypassed"]) >= 1, "{s:#}");
    // vif5.0: the upload's first MiB whole, the rest headers-only.
    assert!(n(&v5["trimmed"]) >= 1, "{s:#}");
    assert!(
        n(&v5["bytes"]) < 2 << 20,
        "vif5.0 copied {} bytes of a 3 MiB upload: {s:#}",
        n(&v5["bytes"])
    );
    // vif6.0: guest 5's frames were inspected at vif5.0; here only their headers.
    assert!(n(&v6["trimmed"]) >= 1, "{s:#}");
    assert!(
        n(&v6["bytes"]) < 1 << 20,
        "vif6.0 copied {} bytes: {s:#}",
        n(&v6["bytes"])
    );
    assert_eq!(n(&v5["capture_drops"]) + n(&v6["capture_drops"]), 0);
    // Past the depth vif5.0 counted the upload's segments in the kernel rather than copying
    // them; vif6.0 counted guest 5's segments once the connection was established and busy.
    assert!(
        n(&v5["uncopied"]) > 0 && n(&v6["uncopied"]) > 0,
        "nothing was left uncopied: {s:#}"
    );
    // Both directions of each connection reach the same worker at vif6.0, else the reply
    // rule (flow:established) could not have fired; and the two workers both saw frames.
    for v in [v5, v6] {
        let w: Vec<u64> = v["workers"].as_array().unwrap().iter().map(n).collect();
        assert_eq!(w.len(), 2, "{s:#}");
    }

    // The operator's view: the filter and each vif's share of trimmed frames.
    let human = stdout(&cli(dir.path(), &["status"]));
    assert!(
        human.contains("capture filter: loaded") && human.contains("TRIMMED"),
        "{human}"
    );
    let row = human
        .lines()
        .find(|l| l.starts_with("vif6.0"))
        .unwrap_or_default();
    assert!(row.contains("passive") && row.contains("yes"), "{human}");

    // The reused tuple's bypass was given back when its flow was replaced.
    assert_eq!(
        n(&s["capture_filter"]["restored"]),
        n(&s["capture_filter"]["bypassed"])
    );

    // Reloading the rules restarts flow state: a connection bypassed at that moment is
    // copied whole again.
    let held = Command::new("ip")
        .args(["netns", "exec", g6, "python3", "-c", "import socket\ns=socket.socket(); s.bind(('10.96.0.6', 9001)); s.listen(1); s.settimeout(20)\nc,_=s.accept()\nwhile c.recv(1 << 16): pass"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let holder = Command::new("ip")
        .args(["netns", "exec", g5, "python3", "-c", "import socket,time\nc=socket.create_connection(('10.96.0.6', 9001), timeout=10)\nfor _ in range(40):\n    c.sendall(b'c' * 65536); time.sleep(0.002)\ntime.sleep(3)\nc.close()"])
        .spawn()
        .unwrap();
    let before = n(&s["capture_filter"]["bypassed"]);
    wait_for(
        "the held connection bypassed",
        Duration::from_secs(5),
        || status(dir.path()).is_some_and(|s| n(&s["capture_filter"]["bypassed"]) > before),
    );
    let s = status(dir.path()).unwrap();
    assert!(n(&s["capture_filter"]["restored"]) < n(&s["capture_filter"]["bypassed"]));
    let out = cli(dir.path(), &["rules", "reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // (workers swap engines between frames: ping so each sees one)
    wait_for("bypasses given back", Duration::from_secs(5), || {
        ping(g5, &["10.96.0.6"]);
        status(dir.path()).is_some_and(|s| {
            n(&s["capture_filter"]["restored"]) == n(&s["capture_filter"]["bypassed"])
        })
    });
    holder.wait_with_output().unwrap();
    held.wait_with_output().unwrap();
}

/// Counting in the kernel does not blind the behaviour detectors: a guest flooding small
/// segments over an established connection past the stream depth (frames the kernel counts
/// and does not copy) is reported as a packet flood, with its identity.
#[test]
fn frames_counted_in_the_kernel_still_feed_the_flood_detector() {
    let Some(lab) = lab(
        "frames_counted_in_the_kernel_still_feed_the_flood_detector",
        true,
        "alert tcp any any -> any 9000 (msg:\"not in this traffic\"; content:\"no-such-marker\"; sid:8003;)\n",
        "inspect_past_depth = false\n[behaviour]\nenabled = true\nwindow_s = 2\npackets_per_s = 3000\n",
    ) else {
        return;
    };
    let dir = &lab.dir;
    let server = lab.sink();
    // 2 MiB (past the 1 MiB depth), then three seconds of 64-byte segments.
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.g5, "python3", "-c", "import socket,time\nc=socket.create_connection(('10.96.0.6', 9000), timeout=10)\nc.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\nc.sendall(b'a' * (2 << 20))\nn=0\nend=time.time()+3\nwhile time.time() < end:\n    c.send(b'b' * 64); n += 1\nc.close()\nprint(n)"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.wait_with_output().unwrap();
    let sent: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    assert!(
        sent > 20_000,
        "the guest sent only {sent} segments: no flood to detect"
    );

    let flood = || {
        stdout(&cli(dir.path(), &["alerts", "--json"]))
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|a| {
                a["alert"]["gid"] == 9 && a["alert"]["signature_id"] == 4 && a["xen"]["domid"] == 5
            })
    };
    let waited = std::time::Instant::now();
    while flood().is_none() && waited.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        flood().is_some(),
        "no packet-flood alert for guest 5 ({sent} segments sent): {:#}\n{}",
        status(dir.path()).unwrap_or_default(),
        stdout(&cli(dir.path(), &["alerts", "--json"]))
    );
    let a = flood().unwrap();
    assert_eq!(a["src_ip"], "10.96.0.5", "{a}");
    assert_eq!(a["dest_port"], 9000, "{a}");
    let s = status(dir.path()).unwrap();
    let v5 = &s["inspection"]["vif5.0"];
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    // The flood was counted, not copied: the workers saw a small share of it.
    assert!(
        n(&v5["uncopied"]) > 6000 && n(&v5["frames"]) < n(&v5["uncopied"]) / 4,
        "{s:#}"
    );
}

/// The filter also runs with anti-spoofing off and every byte inspected (the defaults): the
/// pure ACKs of a busy connection are counted, not copied, while its data still is (a marker
/// at the end of a 16 MiB upload fires).
#[test]
fn pure_acks_are_counted_with_every_byte_inspected() {
    let Some(lab) = lab(
        "pure_acks_are_counted_with_every_byte_inspected",
        false,
        "alert tcp any any -> any 9000 (msg:\"marker past the depth\"; flow:established,to_server; content:\"end-of-upload-marker\"; sid:8004;)\n",
        "",
    ) else {
        return;
    };
    let dir = &lab.dir;
    let server = lab.sink();
    // Paced (16 MiB in 1 MiB writes 30 ms apart): unpaced, the upload could end before the
    // worker's first ring block was read (20 ms block timeout, this binary's other tests
    // sharing the CPUs), so no ACK was left to hand over (a CI run).
    let client = Command::new("ip")
        .args(["netns", "exec", &lab.g5, "python3", "-c", "import socket,time\nc=socket.create_connection(('10.96.0.6', 9000), timeout=10)\nfor i in range(16):\n  c.sendall(b'a' * (1 << 20)); time.sleep(0.03)\nc.sendall(b'end-of-upload-marker')\nc.close()"])
        .status()
        .unwrap();
    assert!(client.success(), "the guests could not talk");
    server.wait_with_output().unwrap();
    wait_for("the marker's alert", Duration::from_secs(5), || {
        sids(dir.path()).contains(&8004)
    });
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    // (worker 0 of each vif collects the kernel's counts up to ten times a second)
    wait_for("counts collected", Duration::from_secs(3), || {
        status(dir.path()).is_some_and(|s| {
            n(&s["inspection"]["vif5.0"]["uncopied"]) > 0
                && n(&s["inspection"]["vif6.0"]["uncopied"]) > 0
        })
    });
    let s = status(dir.path()).unwrap();
    let (v5, v6) = (&s["inspection"]["vif5.0"], &s["inspection"]["vif6.0"]);
    // The upload itself was copied whole at the sender's vif...
    assert!(n(&v5["bytes"]) >= 16 << 20, "{s:#}");
    // ...and guest 6's pure ACKs were counted in the kernel at both vifs.
    assert!(
        n(&v5["uncopied"]) > 0 && n(&v6["uncopied"]) > 0,
        "no pure ACK was left uncopied: {s:#}"
    );
    assert_eq!(
        n(&v5["capture_drops"]) + n(&v6["capture_drops"]),
        0,
        "{s:#}"
    );
}
