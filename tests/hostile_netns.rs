//! Hostile guests against a running virtsecd:
//!
//! - A SYN flood from random source ports: the flow table stays at its cap (memory bounded),
//!   evictions are counted, the flood is reported, and another guest keeps talking.
//! - The same with the table failing closed (`flow_table_full = "closed"`) on an inline
//!   guest: new flows are refused and dropped, counted and alerted, the guest's established
//!   connection goes on, and another guest keeps opening connections.
//! - A guest hammering XenStore through its own domain socket (bursts of writes, values over
//!   the size limit, deep paths, nonsense in every node it can reach): nothing the service
//!   trusts changes, its memory stays flat, and it keeps following the host.
//!
//! Needs root; skipped otherwise.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use virtsec::lab::toolstack::{GuestSpec, Toolstack};
use virtsec::xenstore::Client;

/// `n` TCP SYNs from `ns` (its real MAC and address, random source ports) to `dst:80`,
/// written as raw frames on one socket.
fn syn_flood(ns: &str, mac: [u8; 6], src: [u8; 4], dst: [u8; 4], n: u32) -> u32 {
    virtsec::lab::net::in_netns(ns, move || {
        let ifindex = nix::net::if_::if_nametoindex("eth0").unwrap();
        // SAFETY: plain socket(2), checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                (libc::ETH_P_ALL as u16).to_be() as i32,
            )
        };
        assert!(fd >= 0);
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        let mut sent = 0;
        let mut x: u32 = 0x1234_5678;
        for i in 0..n {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let b = etherparse::PacketBuilder::ethernet2(mac, [0xff; 6])
                .ipv4(src, dst, 64)
                .tcp((x % 60000 + 1024) as u16, 80, x.wrapping_add(i), 1024)
                .syn();
            let mut f = Vec::with_capacity(b.size(0));
            b.write(&mut f, &[]).unwrap();
            // SAFETY: valid buffer and address of the sizes passed.
            let r = unsafe {
                libc::sendto(
                    fd,
                    f.as_ptr() as *const libc::c_void,
                    f.len(),
                    0,
                    &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if r > 0 {
                sent += 1;
            }
            // Paced so the veth's receive backlog (netdev_max_backlog) does not drop them
            // before the vif: the point is the flow table, not the kernel queue.
            if i % 100 == 99 {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(fd) };
        sent
    })
    .unwrap()
}

#[test]
fn a_syn_flood_hits_the_flow_cap_not_the_memory_and_others_keep_talking() {
    if !nix::unistd::geteuid().is_root() || Command::new("nft").arg("--version").output().is_err() {
        eprintln!("SKIPPED a_syn_flood_hits_the_flow_cap_not_the_memory_and_others_keep_talking: needs root, nft");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _log = LogOnPanic(dir.path().to_path_buf());
    let id = std::process::id();
    let (dd, g5, g6) = (format!("vhs{id}"), format!("vhs5{id}"), format!("vhs6{id}"));
    bridge_domain(&dd, Some("10.89.0.1/24"));
    let _ns = Netns(vec![dd.clone(), g5.clone(), g6.clone()]);
    let (_xs, mut ts) = lab_toolstack(dir.path());
    for (d, name) in [(5, "flooder"), (6, "db")] {
        let g = bridged_spec(d, name, "10.89.0");
        ts.create(&g, None).unwrap();
    }
    let rules = dir.path().join("r.rules");
    std::fs::write(
        &rules,
        "alert tcp any any -> any 80 (msg:\"web\"; content:\"GET\"; sid:1;)\n",
    )
    .unwrap();
    let extra = format!(
        "[inspect]\nrules = [{:?}]\neve = {:?}\nmax_flows = 2000\n[enforce]\nantispoof = true\n[behaviour]\nenabled = true\n",
        rules.display().to_string(),
        dir.path().join("eve.json").display().to_string()
    );
    let d = virtsecd_with(dir.path(), Some(&dd), &extra);
    bridged_guest(&dd, &g5, "vif5.0", "00:16:3e:00:05:00", "10.89.0.5/24");
    bridged_guest(&dd, &g6, "vif6.0", "00:16:3e:00:06:00", "10.89.0.6/24");
    wait_for(
        "guests attached and talking",
        Duration::from_secs(10),
        || {
            status(dir.path()).is_some_and(|s| s["inspection"]["vif5.0"]["attached"] == true)
                && ping(&g6, &["10.89.0.1"])
        },
    );
    let rss0 = rss_kb(d.pid());
    // To an address nobody answers: no RST closes the flows, each SYN is a new one.
    let sent = syn_flood(
        &g5,
        [0x00, 0x16, 0x3e, 0x00, 0x05, 0x00],
        [10, 89, 0, 5],
        [10, 89, 0, 77],
        20_000,
    );
    assert!(sent > 19_000, "only {sent} SYNs sent");
    wait_for("evictions counted", Duration::from_secs(10), || {
        status(dir.path()).is_some_and(|s| {
            s["inspection"]["vif5.0"]["flows_evicted"]
                .as_u64()
                .unwrap_or(0)
                > 2_000
        })
    });
    let s = status(dir.path()).unwrap();
    let v = &s["inspection"]["vif5.0"];
    assert!(
        v["flows"].as_u64().unwrap() <= 2000,
        "flow cap exceeded: {v}"
    );
    let rss1 = rss_kb(d.pid());
    assert!(
        rss1 < rss0 + 32 * 1024,
        "RSS {rss0} -> {rss1} kB under the flood"
    );
    // Reported, and the other guest is unaffected.
    wait_for("SYN flood alert", Duration::from_secs(5), || {
        stdout(&cli(dir.path(), &["alerts", "--json"]))
            .lines()
            .any(|l| l.contains("SYN flood") && l.contains("\"domid\":5"))
    });
    assert!(
        ping(&g6, &["10.89.0.1"]),
        "the other guest lost its connectivity"
    );
    eprintln!(
        "{sent} SYNs: flows {} (cap 2000), evicted {}, RSS {rss0} -> {rss1} kB",
        v["flows"], v["flows_evicted"]
    );
}

#[test]
fn a_guest_hammering_xenstore_changes_nothing_trusted() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED a_guest_hammering_xenstore_changes_nothing_trusted: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _log = LogOnPanic(dir.path().to_path_buf());
    let _xs = lab_xenstored(dir.path(), &[7]);
    let mut ts = Toolstack::new(Client::open(dir.path().join("xs.sock")).unwrap());
    ts.init_host().unwrap();
    let mut guest = Client::open(dir.path().join("d7.sock")).unwrap();
    let mut g = GuestSpec::simple(7, "victim", "xenbr0");
    g.vifs[0].ip = Some("192.0.2.7".into());
    ts.create(&g, Some(&mut guest)).unwrap();
    let d = virtsecd(dir.path());
    wait_for("guest listed", Duration::from_secs(5), || {
        guest_listed(dir.path(), 7)
    });
    let before = guest_json(dir.path(), 7);
    let writes0 = status(dir.path()).unwrap()["warnings"]["untrusted_frontend_writes"]
        .as_u64()
        .unwrap();
    let rss0 = rss_kb(d.pid());

    // Bursts of writes in every place the guest may write, until its quota stops it.
    let mut refused = 0;
    for i in 0..3000 {
        let p = format!("device/vif/0/junk{i}");
        if guest.write(&p, format!("{i}")).is_err() {
            refused += 1;
        }
    }
    assert!(refused > 0, "the guest's node quota never applied");
    // Values over the size limit and deep paths.
    assert!(guest
        .write("device/vif/0/mac", vec![b'A'; 1 << 16])
        .is_err());
    let deep = (0..200)
        .map(|i| format!("d{i}"))
        .collect::<Vec<_>>()
        .join("/");
    let _ = guest.write(&format!("device/vif/0/{deep}"), "x");
    // Nonsense in every node of its own frontend and data trees.
    for (k, v) in [
        ("device/vif/0/mac", "ff:ff:ff:ff:ff:ff"),
        ("device/vif/0/backend", "/local/domain/0/backend/vif/7/9"),
        ("device/vif/0/backend-id", "4294967296"),
        ("device/vif/0/state", "\u{0}\u{1}bogus"),
        ("device/vif/0/handle", "-1"),
        ("data/ip", "0.0.0.0/0"),
    ] {
        let _ = guest.write(k, v);
    }
    // What the guest may not touch stays as it was.
    assert!(guest
        .write("/local/domain/0/backend/vif/7/0/mac", "de:ad:be:ef:00:01")
        .is_err());
    assert!(guest.write("name", "dom0").is_err());

    wait_for("writes counted", Duration::from_secs(5), || {
        status(dir.path()).is_some_and(|s| {
            s["warnings"]["untrusted_frontend_writes"]
                .as_u64()
                .unwrap_or(0)
                > writes0
        })
    });
    // Nothing trusted changed; the service is in sync and its memory flat.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(guest_json(dir.path(), 7), before);
    let s = status(dir.path()).unwrap();
    assert_eq!(s["xenstore"]["in_sync"], true);
    let rss1 = rss_kb(d.pid());
    assert!(rss1 < rss0 + 8 * 1024, "RSS {rss0} -> {rss1} kB");
    // And it still follows the host.
    ts.destroy(7).unwrap();
    wait_for("guest gone", Duration::from_secs(5), || {
        !guest_listed(dir.path(), 7)
    });
}

fn guest_json(dir: &std::path::Path, domid: u32) -> Option<serde_json::Value> {
    guest(&domains(dir), domid)
}

fn guest_listed(dir: &std::path::Path, domid: u32) -> bool {
    guest_json(dir, domid).is_some()
}

#[test]
fn a_full_flow_table_fails_closed_when_configured() {
    if !nix::unistd::geteuid().is_root() || Command::new("nft").arg("--version").output().is_err() {
        eprintln!("SKIPPED a_full_flow_table_fails_closed_when_configured: needs root, nft");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _log = LogOnPanic(dir.path().to_path_buf());
    let id = std::process::id();
    let (dd, g5, g6) = (format!("vhc{id}"), format!("vhc5{id}"), format!("vhc6{id}"));
    bridge_domain(&dd, Some("10.88.0.1/24"));
    let _ns = Netns(vec![dd.clone(), g5.clone(), g6.clone()]);
    let (_xs, mut ts) = lab_toolstack(dir.path());
    for (d, name) in [(5, "flooder"), (6, "db")] {
        let g = bridged_spec(d, name, "10.88.0");
        ts.create(&g, None).unwrap();
    }
    let rules = dir.path().join("r.rules");
    std::fs::write(
        &rules,
        "alert tcp any any -> any 80 (msg:\"web\"; content:\"GET\"; sid:1;)\n",
    )
    .unwrap();
    let extra = format!(
        "[inspect]\nrules = [{:?}]\neve = {:?}\nmax_flows = 16\nflow_table_full = \"closed\"\n[enforce]\nantispoof = true\n[inspect.inline]\nmax_wait_us = 1000000\n[[policy]]\nname = \"flooder\"\nmode = \"inline\"\n",
        rules.display().to_string(),
        dir.path().join("eve.json").display().to_string()
    );
    let _d = virtsecd_with(dir.path(), Some(&dd), &extra);
    bridged_guest(&dd, &g5, "vif5.0", "00:16:3e:00:05:00", "10.88.0.5/24");
    bridged_guest(&dd, &g6, "vif6.0", "00:16:3e:00:06:00", "10.88.0.6/24");
    wait_for("guests attached", Duration::from_secs(10), || {
        status(dir.path()).is_some_and(|s| {
            s["inspection"]["vif5.0"]["attached"] == true
                && s["inspection"]["vif5.0"]["mode"] == "inline"
                && s["inspection"]["vif6.0"]["attached"] == true
        })
    });
    // An echo server on the host; the flooder holds one connection open across the flood.
    let server = Command::new("ip")
        .args(["netns", "exec", &dd, "python3", "-c", "import socket,threading\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('10.88.0.1', 7000)); s.listen(8); s.settimeout(20)\ndef echo(c):\n  while True:\n    b=c.recv(100)\n    if not b: break\n    c.sendall(b)\nwhile True:\n  c,_=s.accept(); threading.Thread(target=echo, args=(c,), daemon=True).start()\n"])
        .spawn()
        .unwrap();
    let go = dir.path().join("go");
    std::thread::sleep(Duration::from_millis(300));
    let held = Command::new("ip")
        .args(["netns", "exec", &g5, "python3", "-c", &format!("import socket,os,time\nc=socket.create_connection(('10.88.0.1', 7000), timeout=5)\nc.sendall(b'one'); assert c.recv(10)==b'one'\nwhile not os.path.exists({:?}): time.sleep(0.05)\nc.sendall(b'two'); assert c.recv(10)==b'two'\nprint('held connection ok')\n", go.display().to_string())])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let sent = syn_flood(
        &g5,
        [0x00, 0x16, 0x3e, 0x00, 0x05, 0x00],
        [10, 88, 0, 5],
        [10, 88, 0, 77],
        500,
    );
    assert!(sent > 450, "only {sent} SYNs sent");
    wait_for("refusals counted", Duration::from_secs(5), || {
        status(dir.path()).is_some_and(|s| {
            s["inspection"]["vif5.0"]["flows_refused"]
                .as_u64()
                .unwrap_or(0)
                > 400
        })
    });
    let s = status(dir.path()).unwrap();
    let v = &s["inspection"]["vif5.0"];
    assert!(v["flows"].as_u64().unwrap() <= 16, "flow cap exceeded: {v}");
    assert_eq!(v["flows_evicted"], 0, "fail closed must not evict: {v}");
    // Reported, naming the guest.
    wait_for("flow table full alert", Duration::from_secs(5), || {
        stdout(&cli(dir.path(), &["alerts", "--json"]))
            .lines()
            .any(|l| {
                l.contains("\"signature_id\":5")
                    && l.contains("flow table full")
                    && l.contains("\"domid\":5")
            })
    });
    // The established connection goes on...
    std::fs::write(&go, "").unwrap();
    let out = held.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("held connection ok"),
        "the flooder's established connection was cut: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... a new one from the flooder is dropped while its table is full ...
    let new = Command::new("ip")
        .args([
            "netns",
            "exec",
            &g5,
            "python3",
            "-c",
            "import socket\nsocket.create_connection(('10.88.0.1', 7000), timeout=1)",
        ])
        .output()
        .unwrap();
    assert!(
        !new.status.success(),
        "a new flow passed a full table failing closed"
    );
    // ... and another guest (its own table) keeps opening connections.
    let other = Command::new("ip")
        .args(["netns", "exec", &g6, "python3", "-c", "import socket\nc=socket.create_connection(('10.88.0.1', 7000), timeout=2); c.sendall(b'x'); assert c.recv(1)==b'x'"])
        .output()
        .unwrap();
    assert!(
        other.status.success(),
        "the other guest was affected: {}",
        String::from_utf8_lossy(&other.stderr)
    );
    let mut server = server;
    let _ = server.kill();
    let _ = server.wait();
}
