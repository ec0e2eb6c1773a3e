//! Anti-spoofing held in the kernel, on a simulated backend domain: a bridge `xenbr0` with
//! guests' veths `vif5.0`/`vif6.0` in virtsecd's namespace, guests behind them, the lab XenStore
//! holding the toolstack's `mac` and `ip` keys. The guest's real traffic passes; a spoofed
//! source IP or MAC is dropped and counted; a vif with no policy yet passes nothing until its
//! guest appears in XenStore. Needs root and nftables; reports itself skipped otherwise.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use virtsec::lab::toolstack::{GuestSpec, Toolstack};
use virtsec::xenstore::Client;

fn counter(dir: &std::path::Path, chain: &str, reason: &str) -> u64 {
    status(dir)
        .and_then(|s| s["antispoof"][chain]["drops"][reason].as_u64())
        .unwrap_or(0)
}

#[test]
fn spoofed_sources_are_dropped_and_counted_real_traffic_passes() {
    if !nix::unistd::geteuid().is_root() || Command::new("nft").arg("--version").output().is_err() {
        eprintln!("SKIPPED spoofed_sources_are_dropped_and_counted_real_traffic_passes: needs root and nft");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let id = std::process::id();
    let (dd, g5, g6) = (format!("vas{id}"), format!("vag5{id}"), format!("vag6{id}"));
    ip(&["netns", "add", &dd]);
    let _ns = Netns(vec![dd.clone(), g5.clone(), g6.clone()]);
    ip(&["-n", &dd, "link", "add", "xenbr0", "type", "bridge"]);
    ip(&["-n", &dd, "addr", "add", "10.97.0.1/24", "dev", "xenbr0"]);
    ip(&["-n", &dd, "link", "set", "xenbr0", "up"]);
    bridged_guest(&dd, &g5, "vif5.0", "00:16:3e:00:05:00", "10.97.0.5/24");

    let _xs = lab_xenstored(dir.path(), &[]);
    let mut ts = Toolstack::new(Client::open(dir.path().join("xs.sock")).unwrap());
    ts.init_host().unwrap();
    let mut g = GuestSpec::simple(5, "web", "xenbr0");
    g.vifs[0].ip = Some("10.97.0.5".into());
    ts.create(&g, None).unwrap();

    let _d = virtsecd_with(dir.path(), Some(&dd), "[enforce]\nantispoof = true\n");
    wait_for("anti-spoofing installed", Duration::from_secs(10), || {
        status(dir.path())
            .map(|s| s["antispoof"]["vif5.0"]["domid"] == 5)
            .unwrap_or(false)
    });

    // The guest's own address passes.
    assert!(ping(&g5, &["10.97.0.1"]), "legitimate traffic must pass");
    // A source address the toolstack did not give it is dropped and counted.
    ip(&["-n", &g5, "addr", "add", "10.97.0.66/24", "dev", "eth0"]);
    assert!(
        !ping(&g5, &["-I", "10.97.0.66", "10.97.0.1"]),
        "spoofed IPv4 source passed"
    );
    assert!(counter(dir.path(), "vif5.0", "spoof-ip4") >= 1);
    assert!(
        counter(dir.path(), "vif5.0", "spoof-arp-ip") + counter(dir.path(), "vif5.0", "spoof-ip4")
            >= 1
    );
    // A forged MAC is dropped and counted.
    ip(&[
        "-n",
        &g5,
        "link",
        "set",
        "eth0",
        "address",
        "00:16:3e:99:99:99",
    ]);
    assert!(!ping(&g5, &["10.97.0.1"]), "spoofed MAC passed");
    assert!(counter(dir.path(), "vif5.0", "spoof-mac") >= 1);
    ip(&[
        "-n",
        &g5,
        "link",
        "set",
        "eth0",
        "address",
        "00:16:3e:00:05:00",
    ]);
    assert!(ping(&g5, &["10.97.0.1"]), "restored MAC must pass again");

    // A vif the inventory does not know yet passes nothing...
    bridged_guest(&dd, &g6, "vif6.0", "00:16:3e:00:06:00", "10.97.0.6/24");
    assert!(
        !ping(&g6, &["10.97.0.1"]),
        "a vif without policy passed traffic"
    );
    assert!(counter(dir.path(), "*", "no-policy-yet") >= 1);
    // ... until its guest appears in XenStore with its policy.
    let mut g6spec = GuestSpec::simple(6, "db", "xenbr0");
    g6spec.vifs[0].ip = Some("10.97.0.6".into());
    ts.create(&g6spec, None).unwrap();
    wait_for("vif6.0 policy", Duration::from_secs(5), || {
        status(dir.path())
            .map(|s| s["antispoof"]["vif6.0"]["name"] == "db")
            .unwrap_or(false)
    });
    // (its neighbour entries failed while it was blocked: allow a few retries)
    wait_for(
        "guest 6 passing once its policy is attached",
        Duration::from_secs(5),
        || ping(&g6, &["10.97.0.1"]),
    );

    // The rules stay in the kernel while the service is down.
    drop(_d);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !ping(&g5, &["-I", "10.97.0.66", "10.97.0.1"]),
        "spoofing passed while the service was down"
    );
    assert!(ping(&g5, &["10.97.0.1"]));
    // Destroying a guest removes its chain (the vif falls back to no-policy).
    let _ = Command::new("ip")
        .args([
            "netns", "exec", &dd, "nft", "delete", "table", "bridge", "virtsec",
        ])
        .status();
}

/// Builds frames as a compromised guest would and sends them raw from its namespace.
mod forge {
    use std::net::Ipv6Addr;

    pub const MAC: [u8; 6] = [0x00, 0x16, 0x3e, 0x00, 0x05, 0x00];

    fn eth(src: [u8; 6], dst: [u8; 6], ethertype: u16, body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    /// ARP request "who has `target`, tell `sender_ip` at `sender_mac`".
    pub fn arp(sender_mac: [u8; 6], sender_ip: [u8; 4], target: [u8; 4]) -> Vec<u8> {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend_from_slice(&sender_mac);
        a.extend_from_slice(&sender_ip);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&target);
        eth(MAC, [0xff; 6], 0x0806, &a)
    }

    pub fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2(MAC, [0xff; 6])
            .ipv4(src, dst, 64)
            .udp(sport, dport);
        let mut f = Vec::new();
        b.write(&mut f, b"forged").unwrap();
        f
    }

    /// A TCP segment (the anti-spoofing fast path's traffic) from `src`.
    pub fn tcp4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2(MAC, [0xff; 6])
            .ipv4(src, dst, 64)
            .tcp(4000, 80, 1, 64240);
        let mut f = Vec::new();
        b.write(&mut f, b"forged").unwrap();
        f
    }

    pub fn tcp6(src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2(MAC, [0x33, 0x33, 0, 0, 0, 1])
            .ipv6(src.octets(), dst.octets(), 64)
            .tcp(4000, 80, 1, 64240);
        let mut f = Vec::new();
        b.write(&mut f, b"forged").unwrap();
        f
    }

    pub fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2(MAC, [0x33, 0x33, 0, 0, 0, 1])
            .ipv6(src.octets(), dst.octets(), 64)
            .udp(sport, dport);
        let mut f = Vec::new();
        b.write(&mut f, b"forged").unwrap();
        f
    }

    /// ICMPv6 of `ty` (134 RA, 136 NA, 137 redirect) from `src`, `rest` after the 4-byte
    /// type/code/checksum header.
    pub fn icmp6(ty: u8, src: Ipv6Addr, rest: &[u8]) -> Vec<u8> {
        let dst: Ipv6Addr = "ff02::1".parse().unwrap();
        let b = etherparse::PacketBuilder::ethernet2(MAC, [0x33, 0x33, 0, 0, 0, 1])
            .ipv6(src.octets(), dst.octets(), 255)
            .icmpv6(etherparse::Icmpv6Type::Unknown {
                type_u8: ty,
                code_u8: 0,
                bytes5to8: [rest[0], rest[1], rest[2], rest[3]],
            });
        let mut f = Vec::new();
        b.write(&mut f, &rest[4..]).unwrap();
        f
    }

    /// A neighbour advertisement claiming `target`.
    pub fn na(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
        let mut rest = vec![0x60, 0, 0, 0];
        rest.extend_from_slice(&target.octets());
        icmp6(136, src, &rest)
    }
}

#[test]
fn every_kind_of_forgery_is_dropped_and_counted_real_ipv4_and_ipv6_pass() {
    if !nix::unistd::geteuid().is_root() || Command::new("nft").arg("--version").output().is_err() {
        eprintln!("SKIPPED every_kind_of_forgery_is_dropped_and_counted_real_ipv4_and_ipv6_pass: needs root and nft");
        return;
    }
    use std::net::Ipv6Addr;
    let dir = tempfile::tempdir().unwrap();
    let _log = LogOnPanic(dir.path().to_path_buf());
    let id = std::process::id();
    let (dd, g5) = (format!("vaf{id}"), format!("vaf5{id}"));
    ip(&["netns", "add", &dd]);
    let _ns = Netns(vec![dd.clone(), g5.clone()]);
    ip(&["-n", &dd, "link", "add", "xenbr0", "type", "bridge"]);
    ip(&["-n", &dd, "addr", "add", "10.94.0.1/24", "dev", "xenbr0"]);
    ip(&[
        "-n",
        &dd,
        "addr",
        "add",
        "2001:db8:94::1/64",
        "dev",
        "xenbr0",
        "nodad",
    ]);
    ip(&["-n", &dd, "link", "set", "xenbr0", "up"]);
    bridged_guest(&dd, &g5, "vif5.0", "00:16:3e:00:05:00", "10.94.0.5/24");
    ip(&[
        "-n",
        &g5,
        "addr",
        "add",
        "2001:db8:94::5/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    let _xs = lab_xenstored(dir.path(), &[]);
    let mut ts = Toolstack::new(Client::open(dir.path().join("xs.sock")).unwrap());
    ts.init_host().unwrap();
    let mut g = GuestSpec::simple(5, "web", "xenbr0");
    g.vifs[0].ip = Some("10.94.0.5 2001:db8:94::5".into());
    ts.create(&g, None).unwrap();
    let _d = virtsecd_with(dir.path(), Some(&dd), "[enforce]\nantispoof = true\n");
    wait_for("anti-spoofing installed", Duration::from_secs(10), || {
        status(dir.path())
            .map(|s| s["antispoof"]["vif5.0"]["name"] == "web")
            .unwrap_or(false)
    });

    // The guest's own IPv4 and IPv6 (toolstack's, link-local, SLAAC EUI-64) pass.
    assert!(ping(&g5, &["10.94.0.1"]), "IPv4 must pass");
    wait_for("IPv6 passes", Duration::from_secs(5), || {
        ping(&g5, &["-6", "2001:db8:94::1"])
    });
    ip(&[
        "-n",
        &g5,
        "addr",
        "add",
        "2001:db8:94::216:3eff:fe00:500/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    assert!(
        ping(
            &g5,
            &[
                "-6",
                "-I",
                "2001:db8:94::216:3eff:fe00:500",
                "2001:db8:94::1"
            ]
        ),
        "the guest's SLAAC (EUI-64) address must pass"
    );

    let own6: Ipv6Addr = "2001:db8:94::5".parse().unwrap();
    let ll: Ipv6Addr = "fe80::216:3eff:fe00:500".parse().unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "spoof-ip4",
            forge::udp4([10, 94, 0, 66], [10, 94, 0, 1], 4000, 4000),
        ),
        (
            "spoof-ip6",
            forge::udp6(
                "2001:db8:94::66".parse().unwrap(),
                "2001:db8:94::1".parse().unwrap(),
                4000,
                4000,
            ),
        ),
        // TCP from another address: not taken by the TCP fast path.
        ("spoof-ip4", forge::tcp4([10, 94, 0, 66], [10, 94, 0, 1])),
        (
            "spoof-ip6",
            forge::tcp6(
                "2001:db8:94::66".parse().unwrap(),
                "2001:db8:94::1".parse().unwrap(),
            ),
        ),
        (
            "spoof-arp-ip",
            forge::arp(forge::MAC, [10, 94, 0, 66], [10, 94, 0, 1]),
        ),
        (
            "spoof-arp-mac",
            forge::arp(
                [0x00, 0x16, 0x3e, 0x99, 0x99, 0x99],
                [10, 94, 0, 5],
                [10, 94, 0, 1],
            ),
        ),
        (
            "router-advert",
            forge::icmp6(134, ll, &[64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0]),
        ),
        ("redirect", forge::icmp6(137, ll, &[0; 36])),
        (
            "dhcp-server",
            forge::udp4([10, 94, 0, 5], [255, 255, 255, 255], 67, 68),
        ),
        (
            "dhcp6-server",
            forge::udp6(ll, "ff02::1:2".parse().unwrap(), 547, 546),
        ),
        ("spoof-na", forge::na(ll, "2001:db8:94::1".parse().unwrap())),
    ];
    for (reason, frame) in cases {
        let before = counter(dir.path(), "vif5.0", reason);
        virtsec::lab::net::send_frame(&g5, "eth0", frame).unwrap();
        wait_for(&format!("{reason} counted"), Duration::from_secs(3), || {
            counter(dir.path(), "vif5.0", reason) > before
        });
    }
    // Advertising its own addresses is fine.
    let before = counter(dir.path(), "vif5.0", "spoof-na");
    for target in [own6, ll, "2001:db8:94::216:3eff:fe00:500".parse().unwrap()] {
        virtsec::lab::net::send_frame(&g5, "eth0", forge::na(ll, target)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counter(dir.path(), "vif5.0", "spoof-na"), before);
    // Every drop is reported with the guest's identity.
    let s = status(dir.path()).unwrap();
    assert_eq!(s["antispoof"]["vif5.0"]["domid"], 5);
    assert_eq!(s["antispoof"]["vif5.0"]["uuid"], g.uuid.as_str());
    assert!(ping(&g5, &["-6", "2001:db8:94::1"]), "IPv6 still passes");
    // ... and as events for the security team: EVE `antispoof` lines (and syslog).
    wait_for("antispoof events", Duration::from_secs(5), || {
        let eve = std::fs::read_to_string(dir.path().join("eve.json")).unwrap_or_default();
        ["spoof-ip6", "spoof-na", "router-advert", "dhcp-server"]
            .iter()
            .all(|r| {
                eve.lines().any(|l| {
                    l.contains("\"event_type\":\"antispoof\"")
                        && l.contains(&format!("\"reason\":\"{r}\""))
                        && l.contains("\"vif\":\"vif5.0\"")
                        && l.contains("\"name\":\"web\"")
                })
            })
    });
}
