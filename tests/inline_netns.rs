//! Inline inspection on a simulated backend domain: guests behind `vif5.0`/`vif6.0` on bridge
//! `xenbr0`, guest offloads left on (veth default: partial checksums, TSO super-frames).
//! A `[[policy]]` puts guest "web" (domid 5) inline: virtsecd splices vif5.0 out of the bridge
//! and forwards through `vsb5.0`. Real TCP with offloads crosses it intact; a `drop` rule stops
//! a flow whose payload is split over two segments; anti-spoofing still applies to the
//! guest's frames on their new way into the bridge; overload follows the fail mode; a clean
//! stop with fail closed cuts the guest off and `virtsec inline restore` puts it back.
//! Needs root, nftables and tc; reports itself skipped otherwise.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use virtsec::lab::toolstack::GuestSpec;

/// A TCP server in `ns` on `port` that counts what one connection sends; returns the count
/// when the connection closes (or after `secs`).
fn sink(ns: &str, port: u16, secs: u32) -> std::process::Child {
    let prog = format!(
        "import socket,sys\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\ns.bind(('0.0.0.0',{port}))\ns.listen(1)\ns.settimeout({secs})\nn=0\ntry:\n  c,_=s.accept()\n  c.settimeout({secs})\n  while True:\n    b=c.recv(1<<16)\n    if not b: break\n    n+=len(b)\nexcept Exception:\n  pass\nprint(n)\n"
    );
    Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c", &prog])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3")
}

fn sink_count(mut c: std::process::Child) -> u64 {
    let mut out = String::new();
    c.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let _ = c.wait();
    out.trim().parse().unwrap_or(0)
}

/// Sends `chunks` from `ns` to `dst:port`, each its own segment (TCP_NODELAY + a pause).
fn send(ns: &str, dst: &str, port: u16, chunks: &[Vec<u8>]) -> bool {
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "python3",
            "-c",
            &format!(
                "import socket,sys,time\nc=socket.create_connection(('{dst}',{port}),timeout=5)\nc.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\nimport struct\nd=sys.stdin.buffer.read()\ni=0\nwhile i<len(d):\n  (l,)=struct.unpack('>I',d[i:i+4]); i+=4\n  c.sendall(d[i:i+l]); i+=l\n  time.sleep(0.05)\nc.close()\n"
            ),
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut framed = Vec::new();
    for c in chunks {
        framed.extend_from_slice(&(c.len() as u32).to_be_bytes());
        framed.extend_from_slice(c);
    }
    child.stdin.take().unwrap().write_all(&framed).unwrap();
    child.wait().map(|s| s.success()).unwrap_or(false)
}

fn link_master(dd: &str, ifname: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["-n", dd, "-j", "link", "show", "dev", ifname])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v[0]["master"].as_str().map(str::to_string)
}

/// `virtsec inline restore` in the backend domain `dd` (what the unit's ExecStopPost runs).
fn inline_restore(dd: &str) {
    succeeded(
        Command::new("ip")
            .args(["netns", "exec", dd, VIRTSEC, "inline", "restore"])
            .output()
            .unwrap(),
    );
}

fn inline_counter(dir: &std::path::Path, key: &str) -> u64 {
    status(dir)
        .and_then(|s| s["inspection"]["vif5.0"]["inline"][key].as_u64())
        .unwrap_or(0)
}

fn usable() -> bool {
    nix::unistd::geteuid().is_root()
        && Command::new("nft").arg("--version").output().is_ok()
        && Command::new("tc").arg("-V").output().is_ok()
}

#[test]
fn inline_guest_keeps_offloads_drop_rules_drop_and_fail_mode_holds() {
    if !usable() {
        eprintln!("SKIPPED inline_guest_keeps_offloads_drop_rules_drop_and_fail_mode_holds: needs root, nft, tc");
        return;
    }
    // Alone: two inline tests sharing two CPUs overload the workers (fail closed drops).
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let _log = LogOnPanic(dir.path().to_path_buf());
    let id = std::process::id();
    let (dd, g5, g6) = (format!("vil{id}"), format!("vil5{id}"), format!("vil6{id}"));
    bridge_domain(&dd, Some("10.96.0.1/24"));
    let _ns = Netns(vec![dd.clone(), g5.clone(), g6.clone()]);
    bridged_guest(&dd, &g5, "vif5.0", "00:16:3e:00:05:00", "10.96.0.5/24");
    bridged_guest(&dd, &g6, "vif6.0", "00:16:3e:00:06:00", "10.96.0.6/24");

    let (_xs, mut ts) = lab_toolstack(dir.path());
    let rules = dir.path().join("inline.rules");
    std::fs::write(
        &rules,
        "drop tcp any any -> any 8080 (msg:\"exfil blocked\"; flow:to_server; content:\"evil-payload\"; sid:7101; rev:1;)\n",
    )
    .unwrap();
    let eve = dir.path().join("eve.json");
    let base = format!(
        "[inspect]\nrules = [{:?}]\neve = {:?}\n[enforce]\nantispoof = true\n[[policy]]\nname = \"web\"\nmode = \"inline\"\n",
        rules.display().to_string(),
        eve.display().to_string()
    );
    let mut d = virtsecd_with(dir.path(), Some(&dd), &base);
    let mut web = GuestSpec::simple(5, "web", "xenbr0");
    web.vifs[0].mac = "00:16:3e:00:05:00".into();
    web.vifs[0].ip = Some("10.96.0.5".into());
    let mut db = GuestSpec::simple(6, "db", "xenbr0");
    db.vifs[0].mac = "00:16:3e:00:06:00".into();
    db.vifs[0].ip = Some("10.96.0.6".into());
    ts.create(&web, None).unwrap();
    ts.create(&db, None).unwrap();
    wait_for("vif5.0 inline", Duration::from_secs(10), || {
        status(dir.path())
            .map(|s| {
                s["inspection"]["vif5.0"]["attached"] == true
                    && s["inspection"]["vif5.0"]["mode"] == "inline"
                    && s["inspection"]["vif6.0"]["mode"] == "passive"
            })
            .unwrap_or(false)
    });
    // The splice: vif5.0 off the bridge, its inline port on it.
    assert_eq!(link_master(&dd, "vif5.0"), None);
    assert_eq!(link_master(&dd, "vsb5.0").as_deref(), Some("xenbr0"));
    // netback's vif address on the bridge side, so the port never becomes the bridge's own.
    let out = Command::new("ip")
        .args(["-n", &dd, "-j", "link", "show", "dev", "vsb5.0"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["address"], "fe:ff:ff:ff:ff:ff", "{v}");
    let out = Command::new("ip")
        .args(["netns", "exec", &dd, VIRTSEC, "inline", "list"])
        .output()
        .unwrap();
    assert_eq!(stdout(&out).trim(), "vif5.0");

    // Real traffic through the inline path, guest offloads on.
    assert!(
        ping(&g5, &["10.96.0.6"]),
        "inline guest cannot reach its peer"
    );
    assert!(
        ping(&g5, &["10.96.0.1"]),
        "inline guest cannot reach the host"
    );
    // Every frame the worker forwarded has its wait for the verdict measured: the two echo
    // requests and replies at least (ARP too), each well under the overload bound (20 ms).
    let wait = &status(dir.path()).unwrap()["inspection"]["vif5.0"]["inline"]["verdict_wait_us"];
    assert!(wait["frames"].as_u64().unwrap_or(0) >= 4, "{wait}");
    let p50 = wait["p50"].as_f64().unwrap_or(-1.0);
    assert!(p50 > 0.0 && p50 <= 2000.0, "{wait}");
    let human = stdout(&cli(dir.path(), &["status"]));
    assert!(
        human.contains("inline verdict wait: vif5.0 p50 "),
        "{human}"
    );
    let srv = sink(&g6, 5001, 10);
    std::thread::sleep(Duration::from_millis(300));
    let big = vec![vec![b'x'; 8 << 20]];
    assert!(
        send(&g5, "10.96.0.6", 5001, &big),
        "bulk TCP through inline failed"
    );
    assert_eq!(sink_count(srv), 8 << 20, "bytes lost through inline");
    let frames = status(dir.path()).unwrap()["inspection"]["vif5.0"]["frames"]
        .as_u64()
        .unwrap();
    // 8 MiB in fewer frames than MTU-sized segments: super-frames crossed whole.
    assert!(frames > 0 && frames < (8 << 20) / 1448, "frames {frames}");
    // The kernel fast path forwarded guest 6's side of the busy connection: its frames were
    // inspected where they left it (vif6.0; anti-spoofing proves the sender), so once the
    // connection was established and busy that direction went to the kernel whole. The
    // upload itself, inspected byte by byte, crossed the worker.
    wait_for(
        "guest 6's direction forwarded by the kernel",
        Duration::from_secs(3),
        || {
            status(dir.path()).is_some_and(|s| {
                let v = &s["inspection"]["vif5.0"];
                v["inline"]["fast_path"] == true && v["uncopied"].as_u64().unwrap_or(0) > 0
            })
        },
    );
    let human = stdout(&cli(dir.path(), &["status"]));
    assert!(
        human.contains("inline kernel fast path: vif5.0 on"),
        "{human}"
    );

    // A drop rule on a payload split over two segments: the rest of the flow is dropped.
    let srv = sink(&g6, 8080, 3);
    std::thread::sleep(Duration::from_millis(300));
    let _ = send(
        &g5,
        "10.96.0.6",
        8080,
        &[
            b"GET evil-".to_vec(),
            b"payload now".to_vec(),
            b"more".to_vec(),
        ],
    );
    let got = sink_count(srv);
    assert!(
        got <= 9,
        "the flow went on after the drop rule fired: {got} bytes"
    );
    assert!(inline_counter(dir.path(), "verdict_drops") >= 1);
    let alerts = cli(dir.path(), &["alerts", "--json"]);
    let text = stdout(&alerts);
    assert!(text.contains("\"signature_id\":7101"), "{text}");
    assert!(text.contains("\"vif\":\"vif5.0\""), "{text}");

    // Anti-spoofing applies on the way in through vsb5.0.
    ip(&["-n", &g5, "addr", "add", "10.96.0.99/24", "dev", "eth0"]);
    assert!(
        !ping(&g5, &["-I", "10.96.0.99", "10.96.0.6"]),
        "a spoofed source passed inline"
    );
    let spoofed = status(dir.path()).unwrap()["antispoof"]["vif5.0"]["drops"]["spoof-ip4"]
        .as_u64()
        .unwrap_or(0);
    assert!(spoofed >= 1, "spoofed frames not counted");

    // Clean stop, fail closed: the guest stays cut off; restore (what the unit's
    // ExecStopPost does for fail open) puts it back.
    d.sigterm();
    assert_eq!(link_master(&dd, "vif5.0"), None);
    assert!(!ping(&g5, &["10.96.0.6"]), "fail closed let a frame pass");
    inline_restore(&dd);
    assert_eq!(link_master(&dd, "vif5.0").as_deref(), Some("xenbr0"));
    assert!(ping(&g5, &["10.96.0.6"]));

    // Overload, fail open: every frame is late by a 1 µs budget, forwarded uninspected, counted.
    let _d = virtsecd_with(
        dir.path(),
        Some(&dd),
        &format!("{base}[inspect.inline]\nfail = \"open\"\nmax_wait_us = 1\n"),
    );
    wait_for("vif5.0 inline again", Duration::from_secs(10), || {
        status(dir.path())
            .map(|s| s["inspection"]["vif5.0"]["attached"] == true)
            .unwrap_or(false)
    });
    assert!(ping(&g5, &["10.96.0.6"]), "fail open dropped");
    assert!(inline_counter(dir.path(), "overload_bypassed") >= 1);
}

/// Several inline workers on one vif (`workers_per_vif = 4`): the vif side and the switch
/// side are shared by the same symmetric flow hash, so each connection's handshake and data
/// meet in one worker. 16 connections each carry a marker that only a rule needing the
/// handshake (`flow:established`) matches: all 16 are dropped and alerted; parallel bulk
/// transfers cross whole.
/// Two bridged guests `web` (5) and `db` (6) on `<net>.5` and `<net>.6` in a simulated backend
/// domain, `web` inline by policy: the lab (namespaces and a XenStore with both guests) and
/// virtsecd's configuration with `rule` loaded and `extra` under `[inspect]` (more sections
/// may follow it); `start` starts the service and creates the guests.
struct InlineLab {
    dir: tempfile::TempDir,
    dd: String,
    g5: String,
    g6: String,
    cfg: String,
    _ns: Netns,
    _xs: Proc,
    ts: virtsec::lab::toolstack::Toolstack,
    /// The guests' /24 (`<net>.5`, `<net>.6`).
    net: String,
}

impl InlineLab {
    fn new(tag: &str, net: &str, rule: &str, extra: &str) -> InlineLab {
        let dir = tempfile::tempdir().unwrap();
        let id = std::process::id();
        let (dd, g5, g6) = (
            format!("{tag}{id}"),
            format!("{tag}5{id}"),
            format!("{tag}6{id}"),
        );
        bridge_domain(&dd, None);
        let ns = Netns(vec![dd.clone(), g5.clone(), g6.clone()]);
        bridged_guest(
            &dd,
            &g5,
            "vif5.0",
            "00:16:3e:00:05:00",
            &format!("{net}.5/24"),
        );
        bridged_guest(
            &dd,
            &g6,
            "vif6.0",
            "00:16:3e:00:06:00",
            &format!("{net}.6/24"),
        );
        let (xs, ts) = lab_toolstack(dir.path());
        let rules = dir.path().join("inline.rules");
        std::fs::write(&rules, format!("{rule}\n")).unwrap();
        let cfg = format!(
            "[inspect]\nrules = [{:?}]\neve = {:?}\n{extra}\n[[policy]]\nname = \"web\"\nmode = \"inline\"\n",
            rules.display().to_string(),
            dir.path().join("eve.json").display().to_string()
        );
        InlineLab {
            dir,
            dd,
            g5,
            g6,
            cfg,
            _ns: ns,
            _xs: xs,
            ts,
            net: net.into(),
        }
    }

    /// Starts virtsecd in the backend domain (its log printed if the test fails), then the
    /// toolstack creates both guests; returns the log guard and the service.
    fn start(&mut self) -> (LogOnPanic, Proc) {
        let log = LogOnPanic(self.dir.path().to_path_buf());
        let d = virtsecd_with(self.dir.path(), Some(&self.dd), &self.cfg);
        for (domid, name) in [(5, "web"), (6, "db")] {
            self.ts
                .create(&bridged_spec(domid, name, &self.net), None)
                .unwrap();
        }
        (log, d)
    }

    /// Waits until vif5.0 is attached inline and `web` reaches `db` (`<net>.6`) through it.
    fn wait_inline(&self) {
        wait_for("vif5.0 inline", Duration::from_secs(10), || {
            status(self.dir.path()).is_some_and(|s| {
                s["inspection"]["vif5.0"]["attached"] == true
                    && s["inspection"]["vif5.0"]["mode"] == "inline"
            })
        });
        wait_for("guests talking", Duration::from_secs(5), || {
            ping(&self.g5, &[&format!("{}.6", self.net)])
        });
    }
}

#[test]
fn inline_workers_keep_each_connection_on_one_worker() {
    if !usable() {
        eprintln!("SKIPPED inline_workers_keep_each_connection_on_one_worker: needs root, nft, tc");
        return;
    }
    let _serial = serial();
    // Four workers, four senders and their receivers share two CPUs: a worker may wait its
    // turn longer than the default 2 ms overload bound, and with fail closed the repeated
    // drops of a retransmission stalled a sender past its 5 s timeout (1 run in 5). This
    // test is about where connections go and what arrives, not overload (the first test).
    let mut lab = InlineLab::new(
        "viw",
        "10.95.0",
        "drop tcp any any -> any 8080 (msg:\"marker after a handshake\"; flow:established,to_server; content:\"evil-payload\"; sid:7102; rev:1;)",
        "workers_per_vif = 4\ninspect_past_depth = false\n[inspect.inline]\nmax_wait_us = 1000000",
    );
    let (_log, _d) = lab.start();
    lab.wait_inline();
    let (dir, dd, g5, g6) = (&lab.dir, lab.dd.clone(), lab.g5.clone(), lab.g6.clone());

    // 16 short connections, each with the marker after its handshake.
    let server = Command::new("ip")
        .args(["netns", "exec", &g6, "python3", "-c", "import socket,threading\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('10.95.0.6', 8080)); s.listen(32); s.settimeout(5)\ndef rd(c):\n  c.settimeout(1)\n  try:\n    while c.recv(4096): pass\n  except Exception: pass\nfor _ in range(16):\n  c,_=s.accept(); threading.Thread(target=rd, args=(c,), daemon=True).start()\n"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let clients = Command::new("ip")
        .args(["netns", "exec", &g5, "python3", "-c", "import socket,time\nfor i in range(16):\n  c=socket.create_connection(('10.95.0.6', 8080), timeout=5); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\n  time.sleep(0.02); c.send(b'GET /evil-payload'); time.sleep(0.02); c.close()\n"])
        .status()
        .unwrap();
    assert!(clients.success());
    server.wait_with_output().unwrap();
    let mut n = 0;
    wait_for("16 alerts", Duration::from_secs(5), || {
        n = stdout(&cli(dir.path(), &["alerts", "--json"]))
            .lines()
            .filter(|l| l.contains("\"signature_id\":7102"))
            .count();
        n >= 16
    });
    assert_eq!(n, 16);
    // ... and the connections were spread over the workers (each has its handshake).
    let s = status(dir.path()).unwrap();
    let busy = s["inspection"]["vif5.0"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f.as_u64().unwrap_or(0) > 0)
        .count();
    assert!(
        busy >= 3,
        "16 connections on {busy} of 4 workers: {}",
        s["inspection"]["vif5.0"]
    );

    // Parallel bulk transfers arrive whole: their first MiB crosses the workers, the rest
    // (past the stream depth, not inspected there) the kernel's fast path.
    let before = status(dir.path()).unwrap()["inspection"]["vif5.0"]["bytes"]
        .as_u64()
        .unwrap_or(0);
    let sinks: Vec<_> = (0..4).map(|i| sink(&g6, 5001 + i, 10)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let senders: Vec<_> = (0..4u16)
        .map(|i| {
            let g5 = g5.clone();
            std::thread::spawn(move || send(&g5, "10.95.0.6", 5001 + i, &[vec![b'y'; 4 << 20]]))
        })
        .collect();
    for s in senders {
        assert!(
            s.join().unwrap(),
            "bulk TCP through inline workers failed: {}",
            status(dir.path()).unwrap_or_default()["inspection"]["vif5.0"]
        );
    }
    for s in sinks {
        assert_eq!(sink_count(s), 4 << 20, "bytes lost through inline workers");
    }
    // The kernel's counts of what it forwarded reach the status when worker 0 next reads
    // them (every 100 ms while it runs; later on a busy machine): wait for them a while.
    let deadline = Instant::now() + Duration::from_secs(5);
    let s = loop {
        let s = status(dir.path()).unwrap();
        let counted = s["inspection"]["vif5.0"]["uncopied_bytes"]
            .as_u64()
            .unwrap_or(0);
        if counted > 4 << 20 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let v = &s["inspection"]["vif5.0"];
    assert_eq!(v["inline"]["fast_path"], true, "{v}");
    let crossed = v["bytes"].as_u64().unwrap_or(0) - before;
    assert!(
        crossed < 8 << 20 && v["uncopied_bytes"].as_u64().unwrap_or(0) > 4 << 20,
        "the workers carried {crossed} of 16 MiB: {v}"
    );

    // A download past the stream depth that goes on in small segments: the kernel forwards it
    // to the guest out of vif5.0, and samples it once a second (whole, being small). A fanout
    // group reads outgoing frames even with PACKET_IGNORE_OUTGOING on its sockets: the
    // workers read those samples back and sent them to the bridge as if the guest had sent
    // them, and the bridge learnt the peer's MAC on the inline port (for the next 20 ms,
    // everything sent to the peer was lost: in a bulk transfer, a stall).
    let mut monitor = Command::new("ip")
        .args(["netns", "exec", &dd, "bridge", "monitor", "fdb"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let srv = sink(&g5, 5011, 10);
    std::thread::sleep(Duration::from_millis(300));
    let trickle = Command::new("ip")
        .args([
            "netns",
            "exec",
            &g6,
            "python3",
            "-c",
            "import socket,time\nc=socket.create_connection(('10.95.0.5',5011),timeout=5)\nc.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)\nc.sendall(b'd'*(2<<20))\nfor i in range(150):\n  c.sendall(b't'*100); time.sleep(0.02)\nc.close()\n",
        ])
        .status()
        .unwrap();
    assert!(trickle.success(), "the download failed");
    assert_eq!(
        sink_count(srv),
        (2 << 20) + 150 * 100,
        "bytes lost downloading"
    );
    let _ = monitor.kill();
    let mut moves = String::new();
    monitor
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut moves)
        .unwrap();
    let _ = monitor.wait();
    assert!(
        !moves
            .lines()
            .any(|l| l.contains("00:16:3e:00:06:00") && l.contains("vsb5.0")),
        "the bridge learnt the peer's MAC on the inline port: {moves}"
    );
}

/// `tc filter show` of this service's fast-path filters on `dev`'s ingress in `dd`.
fn fast_path_filters(dd: &str, dev: &str) -> usize {
    let out = Command::new("tc")
        .args(["-n", dd, "filter", "show", "dev", dev, "ingress"])
        .output()
        .unwrap();
    stdout(&out).matches("virtsec_fast_path").count()
}

/// The fast path attached as tc `cls_bpf` filters (`fast_path_attach = "tc"`: what a kernel
/// without tcx, such as Debian 12's 6.1, gets). An upload past the stream depth is forwarded
/// by the kernel and arrives whole. SIGKILLed, the service leaves its filters behind (they
/// are not owned by a file descriptor), yet once their lease is over they forward nothing of
/// that connection: fail closed holds. A restart replaces them (one per interface), a clean
/// stop removes them.
#[test]
fn the_tc_fast_path_forwards_nothing_once_its_service_is_gone() {
    if !usable() {
        eprintln!("SKIPPED the_tc_fast_path_forwards_nothing_once_its_service_is_gone: needs root, nft, tc");
        return;
    }
    let _serial = serial();
    let mut lab = InlineLab::new(
        "vit",
        "10.97.0",
        "alert tcp any any -> any 8080 (msg:\"marker\"; content:\"evil-payload\"; sid:7103; rev:1;)",
        "inspect_past_depth = false\n[inspect.inline]\nmax_wait_us = 1000000\nfast_path_attach = \"tc\"",
    );
    let (_log, mut d) = lab.start();
    let (dir, dd, g5, g6, cfg) = (
        &lab.dir,
        lab.dd.clone(),
        lab.g5.clone(),
        lab.g6.clone(),
        lab.cfg.clone(),
    );
    let attached = |dir: &std::path::Path| {
        status(dir).is_some_and(|s| {
            let v = &s["inspection"]["vif5.0"];
            v["attached"] == true && v["mode"] == "inline" && v["inline"]["fast_path"] == true
        })
    };
    wait_for(
        "vif5.0 inline with its fast path",
        Duration::from_secs(10),
        || attached(dir.path()),
    );
    assert_eq!(fast_path_filters(&dd, "vif5.0"), 1);
    assert_eq!(fast_path_filters(&dd, "vsi5.0"), 1);
    wait_for("guests talking", Duration::from_secs(5), || {
        ping(&g5, &["10.97.0.6"])
    });

    // One connection: 4 MiB (past the 1 MiB depth: the kernel forwards the rest), then, once
    // the service is gone and the lease over, 1 MiB more.
    let (sent, go) = (dir.path().join("sent"), dir.path().join("go"));
    let srv = sink(&g6, 5003, 6);
    std::thread::sleep(Duration::from_millis(300));
    let mut client = Command::new("ip")
        .args([
            "netns",
            "exec",
            &g5,
            "python3",
            "-c",
            &format!(
                "import socket,os,time\nc=socket.create_connection(('10.97.0.6',5003),timeout=5)\nc.sendall(b'z'*(4<<20))\nopen({sent:?},'w').close()\nend=time.time()+20\nwhile not os.path.exists({go:?}) and time.time()<end: time.sleep(0.05)\nc.settimeout(1)\ntry: c.sendall(b'z'*(1<<20))\nexcept Exception: pass\n",
                sent = sent.display().to_string(),
                go = go.display().to_string()
            ),
        ])
        .spawn()
        .unwrap();
    wait_for("4 MiB written", Duration::from_secs(10), || sent.exists());
    std::thread::sleep(Duration::from_millis(1000));
    let v = status(dir.path()).unwrap()["inspection"]["vif5.0"].clone();
    assert!(
        v["uncopied_bytes"].as_u64().unwrap_or(0) > 1 << 20,
        "the kernel forwarded little of the upload: {v}"
    );
    let log = std::fs::read_to_string(dir.path().join("virtsecd.log")).unwrap_or_default();
    assert!(log.contains("kernel fast path on (tc cls_bpf)"), "{log}");

    d.sigkill();
    std::thread::sleep(Duration::from_millis(1500));
    // Left behind, and inert: the connection's next MiB does not pass.
    assert_eq!(fast_path_filters(&dd, "vif5.0"), 1);
    std::fs::write(&go, b"").unwrap();
    let _ = client.wait();
    assert_eq!(
        sink_count(srv),
        4 << 20,
        "the fast path forwarded after its service died"
    );

    // Restarted: the filters are replaced, not stacked; a clean stop removes them.
    d = virtsecd_with(dir.path(), Some(&dd), &cfg);
    wait_for("vif5.0 inline again", Duration::from_secs(10), || {
        attached(dir.path())
    });
    assert_eq!(fast_path_filters(&dd, "vif5.0"), 1);
    assert_eq!(fast_path_filters(&dd, "vsi5.0"), 1);
    assert!(ping(&g5, &["10.97.0.6"]), "no traffic after the restart");
    d.sigterm();
    assert_eq!(fast_path_filters(&dd, "vif5.0"), 0);
    assert_eq!(fast_path_filters(&dd, "vsi5.0"), 0);
    // Killed again: `virtsec inline restore` (the unit's ExecStopPost) takes the filter off
    // the vif as it puts the vif back on its bridge.
    d = virtsecd_with(dir.path(), Some(&dd), &cfg);
    wait_for(
        "vif5.0 inline a third time",
        Duration::from_secs(10),
        || attached(dir.path()),
    );
    d.sigkill();
    assert_eq!(fast_path_filters(&dd, "vif5.0"), 1);
    inline_restore(&dd);
    assert_eq!(link_master(&dd, "vif5.0").as_deref(), Some("xenbr0"));
    assert_eq!(fast_path_filters(&dd, "vif5.0"), 0);
}

/// The CPUs (`Cpus_allowed_list`) of service `pid`'s inline worker for vif5.0 (worker 0).
fn worker_cpus(pid: u32) -> Option<String> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.starts_with("vif vif5.0 in") {
            let st = std::fs::read_to_string(t.path().join("status")).ok()?;
            return st
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string());
        }
    }
    None
}

/// The CPUs this thread may run on: its affinity, and as a list.
fn my_cpus() -> (nix::sched::CpuSet, Vec<usize>) {
    let set = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)).unwrap();
    let cpus = (0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect();
    (set, cpus)
}

/// `placement = "auto"` (the default): an idle inline worker runs on the CPU its guest's
/// frames arrive on (a veth delivers them on the sender's CPU: the pinging process's here)
/// and moves when they do; under a bulk transfer from that same CPU it is busy and leaves it
/// to the scheduler; quiet again, it goes back. `virtsec status` says where it is.
#[test]
fn an_idle_inline_worker_runs_where_its_guests_frames_arrive() {
    if !usable() {
        eprintln!("SKIPPED an_idle_inline_worker_runs_where_its_guests_frames_arrive: needs root, nft, tc");
        return;
    }
    let (_, cpus) = my_cpus();
    if cpus.len() < 2 {
        eprintln!(
            "SKIPPED an_idle_inline_worker_runs_where_its_guests_frames_arrive: needs two CPUs"
        );
        return;
    }
    let _serial = serial();
    let mut lab = InlineLab::new(
        "vip",
        "10.98.0",
        "alert tcp any any -> any 8080 (msg:\"marker\"; content:\"evil-payload\"; sid:7104; rev:1;)",
        "[inspect.inline]\nmax_wait_us = 1000000",
    );
    let (_log, d) = lab.start();
    lab.wait_inline();
    let (dir, g5, g6) = (&lab.dir, lab.g5.clone(), lab.g6.clone());
    let pings = |cpu: usize, count: u32| {
        Command::new("ip")
            .args(["netns", "exec", &g5, "taskset", "-c", &cpu.to_string()])
            .args([
                "ping",
                "-q",
                "-c",
                &count.to_string(),
                "-i",
                "0.01",
                "10.98.0.6",
            ])
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let status_cpus =
        || status(dir.path()).map(|s| s["inspection"]["vif5.0"]["inline"]["worker_cpus"].clone());
    // A quiet guest pinging from one CPU, then from the other: the worker follows.
    for cpu in [cpus[1], cpus[0], cpus[1]] {
        let mut p = pings(cpu, 300);
        wait_for(
            &format!("the worker on CPU {cpu}"),
            Duration::from_secs(3),
            || worker_cpus(d.pid()).as_deref() == Some(cpu.to_string().as_str()),
        );
        assert_eq!(status_cpus(), Some(serde_json::json!([cpu])));
        let human = stdout(&cli(dir.path(), &["status"]));
        assert!(
            human.contains(&format!(
                "inline workers pinned: vif5.0 worker 0 on CPU {cpu}\n"
            )),
            "{human}"
        );
        let _ = p.kill();
        let _ = p.wait();
    }
    // A bulk transfer: the worker is busy and gets all its CPUs back. (Before it is busy its
    // connection's first frames may pin it elsewhere: a veth guest sends TCP data from the
    // softirq that took the peer's ACKs too, which runs on the CPU that forwarded them.)
    let sink_ = sink(&g6, 8080, 20);
    std::thread::sleep(Duration::from_millis(300));
    let mut bulk = Command::new("ip")
        .args(["netns", "exec", &g5, "taskset", "-c", &cpus[1].to_string(), "python3", "-c"])
        .arg("import socket,time\nc=socket.create_connection(('10.98.0.6',8080),timeout=5)\nb=bytes(1<<20)\nt=time.time()\nwhile time.time()-t<4: c.sendall(b)\nc.close()\n")
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    wait_for("the busy worker unpinned", Duration::from_secs(4), || {
        let w = worker_cpus(d.pid()).unwrap_or_default();
        if seen.last() != Some(&w) {
            seen.push(w.clone());
        }
        // More than one CPU: "0-1", "0,2", ...
        w.contains(['-', ','])
    });
    assert_eq!(status_cpus(), Some(serde_json::json!([null])), "{seen:?}");
    assert!(bulk.wait().unwrap().success());
    assert!(sink_count(sink_) > 0);
    // Quiet again: beside the pings.
    let mut p = pings(cpus[0], 300);
    wait_for(
        "the worker back beside the pings",
        Duration::from_secs(3),
        || worker_cpus(d.pid()).as_deref() == Some(cpus[0].to_string().as_str()),
    );
    let _ = p.kill();
    let _ = p.wait();
}

/// An operator who gives the service some CPUs (`taskset`, systemd's `CPUAffinity=`; here
/// the one CPU of the thread that starts it) keeps its inline workers on them: a quiet
/// guest's frames arriving on another CPU do not pull the idle worker there, though the
/// kernel would let a thread widen its own affinity. The log says why it stays.
#[test]
fn inline_workers_stay_on_the_cpus_the_service_was_given() {
    use nix::sched::{sched_setaffinity, CpuSet};
    use nix::unistd::Pid;
    if !usable() {
        eprintln!(
            "SKIPPED inline_workers_stay_on_the_cpus_the_service_was_given: needs root, nft, tc"
        );
        return;
    }
    let (allowed, cpus) = my_cpus();
    if cpus.len() < 2 {
        eprintln!("SKIPPED inline_workers_stay_on_the_cpus_the_service_was_given: needs two CPUs");
        return;
    }
    let (given, other) = (cpus[0], cpus[1]);
    let _serial = serial();
    let mut lab = InlineLab::new(
        "vic",
        "10.93.0",
        "alert tcp any any -> any 8080 (msg:\"marker\"; content:\"evil-payload\"; sid:7106; rev:1;)",
        "",
    );
    // The service inherits the affinity of the thread that spawns it.
    let mut one = CpuSet::new();
    one.set(given).unwrap();
    sched_setaffinity(Pid::from_raw(0), &one).unwrap();
    let (_log, d) = lab.start();
    sched_setaffinity(Pid::from_raw(0), &allowed).unwrap();
    lab.wait_inline();
    // A quiet guest pinging from the other CPU for 1.5 s: fifteen of the placement's windows.
    let mut p = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.g5,
            "taskset",
            "-c",
            &other.to_string(),
        ])
        .args(["ping", "-q", "-c", "150", "-i", "0.01", "10.93.0.6"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let w = worker_cpus(d.pid()).unwrap_or_default();
        if seen.last() != Some(&w) {
            seen.push(w);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = p.kill();
    let _ = p.wait();
    assert_eq!(
        seen,
        vec![given.to_string()],
        "the worker's CPUs over the pings"
    );
    let status = status(lab.dir.path()).expect("status");
    assert_eq!(
        status["inspection"]["vif5.0"]["inline"]["worker_cpus"],
        serde_json::json!([null])
    );
    let log = std::fs::read_to_string(lab.dir.path().join("virtsecd.log")).unwrap_or_default();
    assert!(
        log.contains(&format!(
            "cannot run on CPU {other}, where its frames arrive (CPU {other} is not one of the service's CPUs ({given}"
        )),
        "{log}"
    );
}

/// A worker that cannot read (the service stopped with SIGSTOP) while its guest sends more
/// than the worker's receive queue holds (4 MiB): the kernel drops the rest before any
/// worker sees them. When the service runs again it counts them (`queue_drops`, part of
/// LOST): every datagram the guest sent was either read by the worker or counted as dropped.
#[test]
fn frames_the_kernel_drops_for_a_worker_that_fell_behind_are_counted() {
    if !usable() {
        eprintln!("SKIPPED frames_the_kernel_drops_for_a_worker_that_fell_behind_are_counted: needs root, nft, tc");
        return;
    }
    let _serial = serial();
    let mut lab = InlineLab::new(
        "viq",
        "10.94.0",
        "alert tcp any any -> any 8080 (msg:\"marker\"; content:\"evil-payload\"; sid:7105; rev:1;)",
        // Late frames are not overload here: whatever is lost, the kernel dropped.
        "[inspect.inline]\nmax_wait_us = 10000000",
    );
    let (_log, d) = lab.start();
    lab.wait_inline();
    let vif = |key: &str| {
        status(lab.dir.path())
            .and_then(|s| s["inspection"]["vif5.0"][key].as_u64())
            .unwrap_or(0)
    };
    let read_before = vif("frames");
    // 6,000 datagrams of 1,400 bytes (over 13 MiB as the kernel accounts them).
    let sent = datagrams_while_stopped(d.pid(), &lab.g5, "10.94.0.6");
    assert_eq!(sent, 6000, "the guest could not send its datagrams");
    let dropped = every_datagram_read_or_dropped(
        "inline",
        sent,
        || vif("frames").saturating_sub(read_before),
        || inline_counter(lab.dir.path(), "queue_drops"),
    );
    assert!(
        vif("lost") >= dropped,
        "queue drops are not in LOST: {}",
        vif("lost")
    );
    // The operator is told, with the guest's identity and the cause.
    wait_for(
        "the loss reported in the log",
        Duration::from_secs(5),
        || {
            std::fs::read_to_string(lab.dir.path().join("virtsecd.log"))
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    l.contains("WARN: vif5.0 of domain 5 (web): ")
                        && l.contains(" with a worker's receive queue full")
                })
        },
    );
}
