//! virtsecd's live data plane on a simulated host: the lab XenStore lists guest 5 with vif5.0
//! (written as libxl does), a veth named vif5.0 in the service's "driver domain" namespace
//! has the guest's namespace behind it. The service attaches inspection to vif5.0 by itself,
//! a content rule fires on a payload the guest splits across two TCP segments, and the alert
//! names the guest (domid, uuid, name, vif) in `virtsec alerts` and the EVE file; the vif's
//! counters are published in XenStore for other tools. When the guest is destroyed the vif
//! is detached and its counters' node removed. Needs root; reports itself skipped otherwise.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use virtsec::lab::toolstack::{GuestSpec, Toolstack};
use virtsec::xenstore::Client;

#[test]
fn alerts_name_the_guest_and_vifs_follow_the_inventory() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED alerts_name_the_guest_and_vifs_follow_the_inventory: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let id = std::process::id();
    let (dd, g5) = (format!("vdp{id}"), format!("vgp{id}"));
    ip(&["netns", "add", &dd]);
    let _ns = Netns(vec![dd.clone(), g5.clone()]);
    guest_behind_vif(&dd, &g5, "vif5.0", "10.98.5.2/24", None);
    ip(&["-n", &dd, "addr", "add", "10.98.5.1/24", "dev", "vif5.0"]);
    ip(&["-n", &dd, "link", "set", "vif5.0", "up"]);

    let _xs = lab_xenstored(dir.path(), &[]);
    let mut ts = Toolstack::new(Client::open(dir.path().join("xs.sock")).unwrap());
    ts.init_host().unwrap();
    // What an earlier run published for a vif that no longer exists.
    let mut dom0 = Client::open(dir.path().join("xs.sock")).unwrap();
    dom0.write("/local/domain/0/virtsec/vif/9/0", r#"{"vif":"vif9.0"}"#)
        .unwrap();
    let rules = dir.path().join("live.rules");
    std::fs::write(
        &rules,
        "alert tcp any any -> any 8080 (msg:\"guest exfil\"; flow:to_server; content:\"evil-payload\"; classtype:policy-violation; sid:7001; rev:2;)\n",
    )
    .unwrap();
    let eve = dir.path().join("eve.json");
    let extra = format!(
        "[inspect]\nrules = [{:?}]\neve = {:?}\n[behaviour]\nenabled = true\nscan_ports = 20\n",
        rules.display().to_string(),
        eve.display().to_string()
    );
    let _d = virtsecd_with(dir.path(), Some(&dd), &extra);

    let web = GuestSpec::simple(5, "web", "xenbr0");
    ts.create(&web, None).unwrap();
    wait_for("vif5.0 attached", Duration::from_secs(5), || {
        status(dir.path())
            .map(|s| s["inspection"]["vif5.0"]["attached"] == true)
            .unwrap_or(false)
    });

    // The hotplug gate's question: is vif5.0's policy in place? Yes; and for an unknown vif, no.
    let out = cli(
        dir.path(),
        &[
            "attach",
            "--backend",
            "/local/domain/0/backend/vif/5/0",
            "--timeout",
            "5",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).contains("vif5.0"));
    let out = cli(
        dir.path(),
        &[
            "attach",
            "--backend",
            "/local/domain/0/backend/vif/9/0",
            "--timeout",
            "0.3",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not ready"));

    // XAPI's vif-hotplug hook, called as XAPI's vif script calls it (it names the VM, not the
    // vif): the VM's vifs are in place; an unknown VM is reported, and so is a hostile UUID.
    let hook = |vm: &str| {
        Command::new("sh")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/xen-config/xapi/vif-hotplug"
            ))
            .args([
                "-action",
                "online",
                "-vifuuid",
                "0e0e0e0e-0000-4000-8000-000000000001",
            ])
            .args(["-vmuuid", vm])
            .env("VIRTSEC", VIRTSEC)
            .env("VIRTSEC_CONTROL_SOCKET", dir.path().join("control.sock"))
            .env("VIRTSEC_ATTACH_TIMEOUT", "0.5")
            .output()
            .unwrap()
    };
    let out = hook(&web.uuid);
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("vif 5/0 (vif5.0): policy in place"),
        "{}",
        stdout(&out)
    );
    let out = hook("0e0e0e0e-0000-4000-8000-0000000000ff");
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("not in virtsecd's inventory"),
        "{}",
        stdout(&out)
    );
    let out = hook("../../etc; reboot");
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("is not a VM UUID"),
        "{}",
        stdout(&out)
    );

    let server = Command::new("ip")
        .args(["netns", "exec", &dd, "python3", "-c", "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('10.98.5.1', 8080)); s.listen(1); s.settimeout(8)\nc,_=s.accept()\nwhile c.recv(100): pass"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let client = Command::new("ip")
        .args(["netns", "exec", &g5, "python3", "-c", "import socket,time\ns=socket.create_connection(('10.98.5.1', 8080), timeout=5); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)\ns.send(b'POST /up HTTP/1.0\\r\\n\\r\\nev'); time.sleep(0.2); s.send(b'il-payload'); time.sleep(0.1); s.close()"])
        .status()
        .unwrap();
    assert!(client.success());
    server.wait_with_output().unwrap();

    let mut alerts = Vec::new();
    wait_for("the alert", Duration::from_secs(5), || {
        let out = cli(dir.path(), &["alerts", "--json"]);
        alerts = stdout(&out)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .collect();
        !alerts.is_empty()
    });
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    let a = &alerts[0];
    assert_eq!(a["alert"]["signature_id"], 7001);
    assert_eq!(a["alert"]["category"], "policy-violation");
    assert_eq!(a["src_ip"], "10.98.5.2");
    assert_eq!(a["xen"]["domid"], 5);
    assert_eq!(a["xen"]["name"], "web");
    assert_eq!(a["xen"]["uuid"], web.uuid.as_str());
    assert_eq!(a["xen"]["vif"], "vif5.0");
    let file: Vec<serde_json::Value> = std::fs::read_to_string(&eve)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(&file, &alerts, "EVE file and virtsec alerts agree");
    let s = status(dir.path()).unwrap();
    assert!(
        s["inspection"]["vif5.0"]["frames"].as_u64().unwrap() >= 6,
        "{s:#}"
    );
    assert_eq!(s["inspection"]["vif5.0"]["capture_drops"], 0);
    let human = stdout(&cli(dir.path(), &["alerts"]));
    assert!(
        human.contains("domain 5 (web) vif5.0") && human.contains("guest exfil"),
        "{human}"
    );

    // A port scan from the guest is a behaviour alert (gid 9, sid 1) naming the guest.
    let scan = Command::new("ip")
        .args([
            "netns",
            "exec",
            &g5,
            "python3",
            "-c",
            "import socket
for p in range(9000, 9060):
    s=socket.socket(); s.setblocking(False); s.connect_ex(('10.98.5.1', p)); s.close()",
        ])
        .status()
        .unwrap();
    assert!(scan.success());
    let mut scans = Vec::new();
    wait_for("the port scan alert", Duration::from_secs(5), || {
        let out = cli(dir.path(), &["alerts", "--json"]);
        scans = stdout(&out)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|a| a["alert"]["gid"] == 9)
            .collect();
        !scans.is_empty()
    });
    assert_eq!(scans.len(), 1, "one finding per window: {scans:#?}");
    assert_eq!(scans[0]["alert"]["signature_id"], 1);
    assert!(
        scans[0]["alert"]["signature"]
            .as_str()
            .unwrap()
            .contains("port scan (21 ports on 10.98.5.1"),
        "{:#}",
        scans[0]
    );
    assert_eq!(scans[0]["xen"]["name"], "web");
    assert_eq!(scans[0]["src_ip"], "10.98.5.2");

    // Other tools read the vif's counters from XenStore, where the toolstack's
    // backend/vif/5/0 is mirrored (counters_interval_s = 1 in the tests).
    let published = |xs: &mut Client| {
        xs.read("/local/domain/0/virtsec/vif/5/0")
            .ok()
            .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v).ok())
    };
    wait_for(
        "vif5.0's counters in XenStore",
        Duration::from_secs(5),
        || published(&mut dom0).is_some_and(|c| c["alerts"] == 2),
    );
    let c = published(&mut dom0).unwrap();
    assert_eq!(c["vif"], "vif5.0", "{c}");
    assert_eq!(c["domid"], 5, "{c}");
    assert_eq!(c["name"], "web", "{c}");
    assert_eq!(c["uuid"], web.uuid.as_str(), "{c}");
    assert_eq!(c["mode"], "passive", "{c}");
    assert!(c["frames"].as_u64().unwrap() >= 60, "{c}");
    assert_eq!(c["lost"], 0, "{c}");
    // Nothing lost: nothing said of losses.
    let log = std::fs::read_to_string(dir.path().join("virtsecd.log")).unwrap_or_default();
    assert!(!log.contains("lost to inspection"), "{log}");
    // The earlier run's node for a vif that is gone was removed.
    assert!(dom0.read("/local/domain/0/virtsec/vif/9").is_err());

    ts.destroy(5).unwrap();
    wait_for("vif5.0 detached", Duration::from_secs(5), || {
        status(dir.path())
            .map(|s| s["inspection"].get("vif5.0").is_none())
            .unwrap_or(false)
    });
    wait_for("vif5.0's counters removed", Duration::from_secs(5), || {
        dom0.read("/local/domain/0/virtsec/vif/5").is_err()
    });
}

/// A passive worker that cannot read (the service stopped with SIGSTOP) while its guest sends
/// more than the worker's capture socket holds (`ring_mib` or `queue_mib` = 1): the kernel
/// drops the rest.
/// When the service runs again it counts them (`capture_drops`, part of LOST): every datagram the
/// guest sent was either read or counted as dropped, whichever way the worker reads its vif.
fn frames_the_kernel_drops_are_counted(capture: &str, tag: &str, net: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (dd, g5, _ns) = vif_and_guest(tag, net);
    let _xs = lab_xenstored(dir.path(), &[]);
    let mut ts = Toolstack::new(Client::open(dir.path().join("xs.sock")).unwrap());
    ts.init_host().unwrap();
    let rules = dir.path().join("live.rules");
    std::fs::write(
        &rules,
        "alert tcp any any -> any 8080 (msg:\"marker\"; content:\"evil-payload\"; sid:7011; rev:1;)\n",
    )
    .unwrap();
    let eve = dir.path().join("eve.json");
    let extra = format!(
        "[inspect]\nrules = [{:?}]\neve = {:?}\ncapture = \"{capture}\"\n{capture}_mib = 1\n",
        rules.display().to_string(),
        eve.display().to_string()
    );
    let d = virtsecd_with(dir.path(), Some(&dd), &extra);
    ts.create(&GuestSpec::simple(5, "web", "xenbr0"), None)
        .unwrap();
    let vif = |key: &str| {
        status(dir.path())
            .and_then(|s| s["inspection"]["vif5.0"][key].as_u64())
            .unwrap_or(0)
    };
    wait_for("vif5.0 attached", Duration::from_secs(5), || {
        status(dir.path()).is_some_and(|s| s["inspection"]["vif5.0"]["attached"] == true)
    });
    let read_before = vif("frames");
    // 6,000 datagrams of 1,400 bytes: over 8 MiB, as the kernel accounts them.
    let sent = datagrams_while_stopped(d.pid(), &g5, &format!("{net}.1"));
    assert_eq!(sent, 6000, "the guest could not send its datagrams");
    let dropped = every_datagram_read_or_dropped(
        capture,
        sent,
        || vif("frames").saturating_sub(read_before),
        || vif("capture_drops"),
    );
    assert!(
        vif("lost") >= dropped,
        "drops are not in LOST: {}",
        vif("lost")
    );
    // The operator is told, with the guest's identity and the cause, within a second or two.
    let log = || std::fs::read_to_string(dir.path().join("virtsecd.log")).unwrap_or_default();
    wait_for(
        "the loss reported in the log",
        Duration::from_secs(5),
        || {
            log().lines().any(|l| {
                l.contains("WARN")
                    && l.contains("vif5.0 of domain 5 (web): ")
                    && l.contains(" frames lost to inspection since it was attached (")
                    && l.contains(
                        " with the capture queue or ring full): its worker did not keep up",
                    )
            })
        },
    );
    // Once: the next report waits a minute, however much more is lost.
    assert_eq!(log().matches("lost to inspection").count(), 1, "{}", log());
    // And the SIEM gets it as an EVE event with the guest's identity.
    let events: Vec<serde_json::Value> = std::fs::read_to_string(&eve)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &serde_json::Value| e["event_type"] == "lost")
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e["xen"]["vif"], "vif5.0", "{e}");
    assert_eq!(e["xen"]["domid"], 5, "{e}");
    assert_eq!(e["xen"]["name"], "web", "{e}");
    assert!(e["lost"]["capture_full"].as_u64().unwrap_or(0) > 0, "{e}");
    assert_eq!(e["lost"]["frames"], e["lost"]["capture_full"], "{e}");
    assert_eq!(e["lost"]["seconds"], serde_json::Value::Null, "{e}");
}

#[test]
fn frames_the_kernel_drops_for_a_passive_queue_are_counted() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED frames_the_kernel_drops_for_a_passive_queue_are_counted: needs root");
        return;
    }
    frames_the_kernel_drops_are_counted("queue", "q", "10.98.6");
}

#[test]
fn frames_the_kernel_drops_for_a_passive_ring_are_counted() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED frames_the_kernel_drops_for_a_passive_ring_are_counted: needs root");
        return;
    }
    frames_the_kernel_drops_are_counted("ring", "r", "10.98.7");
}
