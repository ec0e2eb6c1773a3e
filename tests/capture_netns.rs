//! Live passive capture on a netback-like vif: a veth named `vif5.0` in a "driver domain"
//! network namespace, a guest namespace behind it sending real TCP traffic. A content rule
//! fires on a payload the guest splits across two segments, and signatures deep inside the
//! GSO super-frames of a guest with its offloads on fire. Needs root (namespaces,
//! AF_PACKET); reports itself skipped otherwise.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest_behind_vif, ip, vif_and_guest, Netns};

fn in_ns(ns: &str, prog: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, prog]).args(args);
    c
}

/// `virtsec capture` on `dd`'s vif5.0 with `rules`, reading it as `capture` says (queue or
/// ring), alerts to `dir/eve.json`; returns once the socket is bound (its ready file exists).
fn start_capture(dd: &str, dir: &Path, rules: &Path, capture: &str) -> Child {
    let ready = dir.join("ready");
    let cap = in_ns(
        dd,
        env!("CARGO_BIN_EXE_virtsec"),
        &[
            "capture",
            "--iface",
            "vif5.0",
            "--duration",
            "30",
            "--capture",
            capture,
            "--rules",
        ],
    )
    .arg(rules)
    .arg("--eve")
    .arg(dir.join("eve.json"))
    .arg("--ready-file")
    .arg(&ready)
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let t = Instant::now();
    while !ready.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "capture never became ready"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    cap
}

/// Lets the ring's block timer hand over the last block (the queue's reader its last read),
/// stops the capture (SIGTERM) and returns its JSON summary (the last line on stderr).
fn stop_capture(cap: Child) -> serde_json::Value {
    std::thread::sleep(Duration::from_millis(300));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cap.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let out = cap.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    serde_json::from_str(err.lines().last().unwrap_or("{}")).unwrap()
}

/// The EVE alerts the capture wrote to `dir/eve.json`.
fn alerts(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("eve.json"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn content_rule_fires_on_a_split_payload_from_a_guest_namespace() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIPPED content_rule_fires_on_a_split_payload_from_a_guest_namespace: needs root"
        );
        return;
    }
    let (dd, g5, _guard) = vif_and_guest("d", "10.99.5");
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("live.rules");
    std::fs::write(
        &rules,
        "alert tcp any any -> any 8080 (msg:\"split evil\"; flow:to_server,established; content:\"evil-payload\"; sid:5001; rev:1;)\n\
         alert tcp any any -> any 8080 (msg:\"never\"; content:\"absent-string\"; sid:5002; rev:1;)\n",
    )
    .unwrap();
    let server = in_ns(
        &dd,
        "python3",
        &["-c", "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('10.99.5.1', 8080)); s.listen(1); s.settimeout(8)\nc,_=s.accept(); d=b''\nwhile True:\n  x=c.recv(100)\n  if not x: break\n  d+=x\nprint(d.decode())"],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let cap = start_capture(&dd, dir.path(), &rules, "queue");
    // The guest sends the payload in two segments (TCP_NODELAY, a pause between writes).
    let client = in_ns(
        &g5,
        "python3",
        &["-c", "import socket,time\ns=socket.create_connection(('10.99.5.1', 8080), timeout=5); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\ns.send(b'GET /x HTTP/1.0\\r\\nX: ev'); time.sleep(0.2); s.send(b'il-payload\\r\\n\\r\\n'); time.sleep(0.1); s.close()"],
    )
    .status()
    .unwrap();
    assert!(client.success());
    let got = server.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&got.stdout).contains("evil-payload"),
        "server did not receive the payload"
    );
    let summary = stop_capture(cap);
    assert!(
        summary["flow"]["stream"]["segments"].as_u64().unwrap_or(0) >= 2,
        "{summary:#}"
    );
    assert_eq!(summary["ring"]["drops"], 0, "{summary:#}");
    let alerts = alerts(dir.path());
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    let a = &alerts[0];
    assert_eq!(a["alert"]["signature_id"], 5001);
    assert_eq!(a["src_ip"], "10.99.5.2");
    assert_eq!(a["dest_port"], 8080);
    assert_eq!(a["direction"], "to_server");
}

/// With its offloads on (a netfront guest's default), a guest's TCP leaves in GSO super-frames
/// of up to 64 KiB, and the vif receives them whole. Eight signatures placed through the first
/// MiB of one bulk write each fire: every byte of every super-frame is inspected, not only
/// a ring frame's worth of each (Suricata's AF_PACKET capture cuts them to its 9296-byte
/// ring frames and inspects none of them; docs/performance.md). Both ways of reading the vif.
#[test]
fn signatures_deep_inside_gso_super_frames_fire() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED signatures_deep_inside_gso_super_frames_fire: needs root");
        return;
    }
    deep_signatures_fire("queue", "q", "10.99.6");
    deep_signatures_fire("ring", "r", "10.99.7");
}

fn deep_signatures_fire(capture: &str, tag: &str, net: &str) {
    let (dd, g5, _guard) = vif_and_guest(tag, net);
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("deep.rules");
    let text: String = (1..=8)
        .map(|i| {
            format!(
                "alert tcp any any -> any 8081 (msg:\"deep {i}\"; content:\"deep-marker-{i}-end\"; sid:{}; rev:1;)\n",
                5100 + i
            )
        })
        .collect();
    std::fs::write(&rules, text).unwrap();
    let server = in_ns(
        &dd,
        "python3",
        &["-c", &format!("import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('{net}.1', 8081)); s.listen(1); s.settimeout(10)\nc,_=s.accept(); n=0\nwhile True:\n  x=c.recv(1<<16)\n  if not x: break\n  n+=len(x)\nprint(n)")],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let cap = start_capture(&dd, dir.path(), &rules, capture);
    // One write of 1 MiB (the default reassembly depth) with marker i at i × 120,000 bytes:
    // the kernel segments it as TSO allows, so the markers land at offsets inside frames
    // that no test controls, most of them far past a ring frame's first 9 KiB.
    let client = in_ns(
        &g5,
        "python3",
        &["-c", &format!("import socket\nd=bytearray(b'x' * (1 << 20))\nfor i in range(1, 9):\n  m=b'deep-marker-%d-end' % i\n  d[i*120000:i*120000+len(m)]=m\ns=socket.create_connection(('{net}.1', 8081), timeout=5)\ns.sendall(bytes(d)); s.close()")],
    )
    .status()
    .unwrap();
    assert!(client.success());
    let got = server.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got.stdout).trim(),
        (1u32 << 20).to_string(),
        "the server did not receive the whole write"
    );
    let summary = stop_capture(cap);
    assert_eq!(summary["ring"]["drops"], 0, "{summary:#}");
    // Super-frames crossed the vif: fewer frames than MTU-sized segments would need (the
    // guest's 1 MiB alone is 725 of those; the count includes the ACKs the other way).
    let packets = summary["ring"]["packets"].as_u64().unwrap_or(0);
    assert!(
        packets > 0 && packets < 725,
        "{capture}: {packets} frames: no GSO super-frames; {summary:#}"
    );
    let mut sids: Vec<u64> = alerts(dir.path())
        .iter()
        .filter_map(|a| a["alert"]["signature_id"].as_u64())
        .collect();
    sids.sort_unstable();
    assert_eq!(
        sids,
        (5101..=5108).collect::<Vec<u64>>(),
        "{capture}: {summary:#}"
    );
}

/// A vif that goes down and up again (netback's does when its guest reconnects; a vif is
/// also brought down on its way onto a bridge) leaves `ENETDOWN` pending on the capture
/// socket, and `poll` reports it until it is read. An idle worker must read it once and go
/// back to sleeping: a ring used to return from `poll` at once, forever (70% of a core per
/// vif, in the lab and in dom0 on real Xen), and capture goes on when the vif is back up.
/// Both ways of reading the vif.
#[test]
fn an_idle_capture_sleeps_after_its_vif_went_down_and_up() {
    use virtsec::capture::{queue::Queue, Ring, RingConfig};
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED an_idle_capture_sleeps_after_its_vif_went_down_and_up: needs root");
        return;
    }
    idle_after_down_and_up("r", || {
        Box::new(Ring::open("vif6.0", RingConfig::default()).expect("ring on vif6.0"))
    });
    idle_after_down_and_up("q", || {
        Box::new(
            Queue::open("vif6.0", 16 << 20, Duration::from_millis(20), None)
                .expect("queue on vif6.0"),
        )
    });
}

fn idle_after_down_and_up(
    tag: &str,
    open: impl FnOnce() -> Box<dyn virtsec::capture::Source> + Send + 'static,
) {
    let id = std::process::id();
    let (dd, g6) = (format!("vsdd6{tag}{id}"), format!("vsg6{tag}{id}"));
    ip(&["netns", "add", &dd]);
    let _guard = Netns(vec![dd.clone(), g6.clone()]);
    guest_behind_vif(&dd, &g6, "vif6.0", "10.99.6.2/24", None);
    ip(&["-n", &dd, "link", "set", "vif6.0", "up"]);
    let ns = dd.clone();
    let (polls, error, frames_after) = virtsec::lab::net::in_netns(&dd, move || {
        let mut src = open();
        ip(&["-n", &ns, "link", "set", "vif6.0", "down"]);
        ip(&["-n", &ns, "link", "set", "vif6.0", "up"]);
        let t = Instant::now();
        let mut polls = 0;
        let mut error = None;
        while t.elapsed() < Duration::from_millis(600) {
            src.poll(Duration::from_millis(100), &mut |_| {}).unwrap();
            error = error.or(src.take_error());
            polls += 1;
        }
        // Capture goes on: a frame from the guest reaches the socket.
        let mut frames = 0;
        let t = Instant::now();
        while frames == 0 && t.elapsed() < Duration::from_secs(5) {
            let _ = Command::new("ip")
                .args(["netns", "exec", &g6, "ping", "-c", "1", "-W", "0.2"])
                .arg("10.99.6.1")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            frames += src.poll(Duration::from_millis(100), &mut |_| {}).unwrap();
        }
        (polls, error, frames)
    })
    .unwrap();
    assert_eq!(
        error.as_ref().and_then(|e| e.raw_os_error()),
        Some(libc::ENETDOWN),
        "{tag}: the socket's error after the vif went down: {error:?}"
    );
    // 600 ms of 100 ms waits: about 6; a queue reads on a timer for 20 ms after each frame
    // (0.5 ms growing to 2 ms: a dozen reads), and the guest sends a few of its own as its
    // link comes up (neighbour discovery). A spinning one makes thousands.
    assert!(
        polls <= 100,
        "{tag}: {polls} polls in 600 ms on an idle vif"
    );
    assert!(
        frames_after > 0,
        "{tag}: no frame captured after the vif came back up"
    );
}
