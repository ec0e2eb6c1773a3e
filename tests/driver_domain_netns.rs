//! A network driver domain's virtsec quarantines its guests by VM UUID, with the identities
//! dom0's virtsec publishes for it (`inventory::identity`).
//!
//! The lab XenStore holds dom0, a driver domain (domain 3, "netdd", with its own domain
//! socket, so xenstored enforces its permissions) and guests whose backends are in the driver
//! domain. Two services run: dom0's (`[xenstore] driver_domains = ["netdd"]`) and the driver
//! domain's (`dom0_identities = true`, in a network namespace with the bridge and the guests'
//! vifs, real nftables). Needs root; reports itself skipped otherwise.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use virtsec::lab::toolstack::{GuestSpec, Toolstack};
use virtsec::xenstore::Client;

fn spec(domid: u32, name: &str, n: u32) -> GuestSpec {
    let mut g = GuestSpec::simple(domid, name, "xenbr0");
    g.uuid = format!("5e1ab000-0000-4000-8000-{n:012x}");
    g.vifs[0].mac = format!("00:16:3e:00:{n:02x}:00");
    g.vifs[0].ip = Some(format!("10.96.0.{n}"));
    g
}

/// A virtsecd with its own directory (config, control socket, state, EVE), on XenStore
/// socket `xs`, in namespace `netns` if given; `extra` goes in `[xenstore]`, `quarantine` in
/// `[quarantine]`; `bin` first on its PATH.
fn service(
    dir: &Path,
    xs: &Path,
    netns: Option<&str>,
    extra: &str,
    quarantine: &str,
    bin: Option<&Path>,
) -> Proc {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("virtsecd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[xenstore]\npath = {:?}\nreconnect_min_ms = 20\nreconnect_max_ms = 200\n{extra}\n[control]\nsocket = {:?}\n[log]\ntarget = \"stderr\"\nlevel = \"debug\"\n[inspect]\neve = {:?}\n[quarantine]\nstate_dir = {:?}\n{quarantine}\n",
            xs.display().to_string(),
            dir.join("control.sock").display().to_string(),
            dir.join("eve.json").display().to_string(),
            dir.join("state").display().to_string(),
        ),
    )
    .unwrap();
    spawn_virtsecd(dir, &cfg, netns, bin)
}

#[test]
fn a_driver_domain_quarantines_by_the_identities_dom0_publishes() {
    if !nix::unistd::geteuid().is_root() || Command::new("nft").arg("--version").output().is_err() {
        eprintln!(
            "SKIPPED a_driver_domain_quarantines_by_the_identities_dom0_publishes: needs root and nft"
        );
        return;
    }
    let _serial = serial();
    let id = std::process::id();
    let dir = tempfile::tempdir().unwrap();
    let (d0, d3) = (dir.path().join("dom0"), dir.path().join("dd"));
    let _log = LogOnPanic(d3.clone());
    let ddns = format!("vdd{id}");
    let (g5, g7) = (format!("vdd5{id}"), format!("vdd7{id}"));
    ip(&["netns", "add", &ddns]);
    let _ns = Netns(vec![ddns.clone(), g5.clone(), g7.clone()]);
    ip(&["-n", &ddns, "link", "add", "xenbr0", "type", "bridge"]);
    ip(&["-n", &ddns, "link", "set", "xenbr0", "up"]);

    let _xs = lab_xenstored(dir.path(), &[3, 5]);
    let xs = dir.path().join("xs.sock");
    let mut dom0 = Toolstack::new(Client::open(&xs).unwrap());
    dom0.init_host().unwrap();
    dom0.create(&driver_domain_spec(3, "netdd"), None).unwrap();
    // Guests 5 and 7 have their vifs in the driver domain; guest 6 in dom0.
    let mut ts = Toolstack::with_backend(Client::open(&xs).unwrap(), 3);
    let mut guest5 = Client::open(dir.path().join("d5.sock")).unwrap();
    ts.create(&spec(5, "web", 5), Some(&mut guest5)).unwrap();
    ts.create(&spec(7, "db", 7), None).unwrap();
    dom0.create(&spec(6, "other", 6), None).unwrap();
    bridged_guest(&ddns, &g5, "vif5.0", "00:16:3e:00:05:00", "10.96.0.5/24");
    bridged_guest(&ddns, &g7, "vif7.0", "00:16:3e:00:07:00", "10.96.0.7/24");

    let _dd = service(
        &d3,
        &dir.path().join("d3.sock"),
        Some(&ddns),
        "dom0_identities = true\n[enforce]\nantispoof = true",
        "domain_control = \"dom0\"",
        None,
    );
    assert_eq!(status(&d3).unwrap()["xenstore"]["self_domid"], 3);
    wait_for("guests talk", Duration::from_secs(5), || {
        ping(&g5, &["10.96.0.7"])
    });
    // Without dom0's service the driver domain cannot tell who guest 5 is: it cannot
    // quarantine it, and the hotplug gate does not report its vif in place.
    let q = cli(
        &d3,
        &[
            "quarantine",
            "5",
            "--action",
            "isolate",
            "--reason",
            "case 9",
        ],
    );
    assert!(!q.status.success());
    assert!(
        String::from_utf8_lossy(&q.stderr).contains("no readable VM UUID"),
        "{}",
        String::from_utf8_lossy(&q.stderr)
    );
    let a = cli(
        &d3,
        &[
            "attach",
            "--backend",
            "/local/domain/3/backend/vif/5/0",
            "--timeout",
            "1",
        ],
    );
    assert!(
        !a.status.success(),
        "attach reported a vif of an unknown VM"
    );

    // Nor can it publish its status: a domain cannot create /local/domain/<self>/virtsec.
    let mut c = Client::open(&xs).unwrap();
    assert!(c.read("/local/domain/3/virtsec/status").is_err());

    // dom0's service publishes the identities of the driver domain's guests, and only those.
    // dom0's toolstack here is a stand-in `xl` that records what it is asked.
    let (bin, xl_log) = stand_in_xl(dir.path(), "");
    let _d0 = service(
        &d0,
        &xs,
        None,
        "driver_domains = [\"netdd\"]",
        "domain_control = \"xl\"",
        Some(&bin),
    );
    wait_for(
        "guest 5 identified in the driver domain",
        Duration::from_secs(5),
        || {
            guest(&domains(&d3), 5).is_some_and(|g| {
                g["uuid"] == "5e1ab000-0000-4000-8000-000000000005" && g["name"] == "web"
            })
        },
    );
    // It also makes the driver domain its own directory, where the driver domain's service
    // then publishes what it could not before.
    wait_for(
        "the driver domain's status published",
        Duration::from_secs(5),
        || c.read("/local/domain/3/virtsec/status").is_ok(),
    );
    let listed = c.directory("/local/domain/0/virtsec/dd/3/vm").unwrap();
    assert_eq!(listed, vec!["5".to_string(), "7".to_string()]);
    // The guest can neither read nor forge it.
    assert!(guest5.read("/local/domain/0/virtsec/dd/3/vm/5").is_err());
    assert!(guest5
        .write(
            "/local/domain/0/virtsec/dd/3/vm/5",
            "{\"uuid\":\"5e1ab000-0000-4000-8000-0000000000ff\"}"
        )
        .is_err());
    succeeded(cli(
        &d3,
        &[
            "attach",
            "--backend",
            "/local/domain/3/backend/vif/5/0",
            "--timeout",
            "5",
        ],
    ));

    // The driver domain quarantines by UUID.
    succeeded(cli(
        &d3,
        &[
            "quarantine",
            "web",
            "--action",
            "isolate",
            "--reason",
            "case 9",
        ],
    ));
    assert!(!ping(&g5, &["10.96.0.7"]), "isolated guest still talks");
    assert!(d3
        .join("state/quarantine/5e1ab000-0000-4000-8000-000000000005.json")
        .exists());

    // web reboots as domain 8: its vif is reported in place only once the driver domain
    // knows who it is, and by then it is held.
    ts.destroy(5).unwrap();
    ip(&["-n", &ddns, "link", "del", "vif5.0"]);
    ts.create(&spec(8, "web", 5), None).unwrap();
    succeeded(cli(
        &d3,
        &[
            "attach",
            "--backend",
            "/local/domain/3/backend/vif/8/0",
            "--timeout",
            "5",
        ],
    ));
    bridged_guest(&ddns, &g5, "vif8.0", "00:16:3e:00:05:00", "10.96.0.5/24");
    assert!(!ping(&g5, &["10.96.0.7"]), "the rebooted VM was let out");
    let listed = c.directory("/local/domain/0/virtsec/dd/3/vm").unwrap();
    assert_eq!(listed, vec!["7".to_string(), "8".to_string()]);

    succeeded(cli(&d3, &["release", "web", "--reason", "clean"]));
    wait_for("released guest talks", Duration::from_secs(5), || {
        ping(&g5, &["10.96.0.7"])
    });

    // pause needs dom0: the driver domain asks dom0's service, which pauses through its
    // toolstack and remembers the pause; the release unpauses exactly that.
    let xl = || std::fs::read_to_string(&xl_log).unwrap_or_default();
    succeeded(cli(
        &d3,
        &[
            "quarantine",
            "web",
            "--action",
            "pause",
            "--reason",
            "case 10",
        ],
    ));
    wait_for("dom0 paused domain 8", Duration::from_secs(5), || {
        xl().lines().any(|l| l == "pause 8")
    });
    wait_for("the pause recorded in dom0", Duration::from_secs(5), || {
        c.read("/local/domain/0/virtsec/dd/3/paused/8").is_ok()
    });
    wait_for(
        "dom0's answer read and removed",
        Duration::from_secs(5),
        || {
            c.directory("/local/domain/0/virtsec/dd/3/response")
                .is_ok_and(|l| l.is_empty())
        },
    );
    succeeded(cli(&d3, &["release", "web", "--reason", "paused enough"]));
    wait_for("dom0 unpaused domain 8", Duration::from_secs(5), || {
        xl().lines().any(|l| l == "unpause 8")
    });
    wait_for(
        "the pause forgotten in dom0",
        Duration::from_secs(5),
        || c.read("/local/domain/0/virtsec/dd/3/paused/8").is_err(),
    );

    // Automation in dom0 drives the driver domain's service through XenStore, as it does
    // dom0's: a request in the driver domain's request directory. The node dom0 creates there
    // is owned by the driver domain (it inherits the directory's owner, on oxenstored as here),
    // and it is obeyed: nobody but dom0 and the driver domain can write there.
    c.write(
        "/local/domain/3/virtsec/request/auto1",
        r#"{"op":"quarantine","target":"web","action":"isolate","reason":"SOAR case 11"}"#,
    )
    .unwrap();
    wait_for("dom0's request answered", Duration::from_secs(5), || {
        c.read("/local/domain/3/virtsec/response/auto1").is_ok()
    });
    let answer: serde_json::Value =
        serde_json::from_slice(&c.read("/local/domain/3/virtsec/response/auto1").unwrap()).unwrap();
    assert_eq!(answer["ok"], true, "{answer}");
    assert!(!ping(&g5, &["10.96.0.7"]), "isolated guest still talks");
    c.write(
        "/local/domain/3/virtsec/request/auto2",
        r#"{"op":"release","target":"web","reason":"SOAR case 11 closed"}"#,
    )
    .unwrap();
    wait_for("released through XenStore", Duration::from_secs(5), || {
        ping(&g5, &["10.96.0.7"])
    });
    // Another domain cannot write there at all.
    let mut g5c = Client::open(dir.path().join("d5.sock")).unwrap();
    assert!(g5c
        .write(
            "/local/domain/3/virtsec/request/evil",
            r#"{"op":"release","target":"web","reason":"me"}"#
        )
        .is_err());

    // What the driver domain may not have done for it: another backend's guest, a pause it
    // did not ask for, anything from a guest.
    let mut dd = Client::open(dir.path().join("d3.sock")).unwrap();
    for (id, req) in [
        ("x1", r#"{"op":"pause","domid":6}"#),
        ("x2", r#"{"op":"unpause","domid":7}"#),
        ("x3", r#"{"op":"detach","domid":0,"devid":0}"#),
        ("x4", r#"{"op":"shutdown","domid":7}"#),
    ] {
        dd.write(&format!("/local/domain/0/virtsec/dd/3/request/{id}"), req)
            .unwrap();
    }
    // Each refused in dom0 (audited) and answered; the driver domain's service logs the
    // answers.
    let refused = || {
        std::fs::read_to_string(d0.join("eve.json"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"refused\"") && l.contains("driver domain 3 (netdd)"))
            .count()
    };
    wait_for(
        "four refusals audited in dom0",
        Duration::from_secs(5),
        || refused() == 4,
    );
    wait_for(
        "the driver domain read the answers",
        Duration::from_secs(5),
        || {
            std::fs::read_to_string(d3.join("virtsecd.log"))
                .unwrap_or_default()
                .matches("dom0's virtsec refused or failed")
                .count()
                == 4
        },
    );
    let mut guest8 = Client::open(dir.path().join("d5.sock")).unwrap();
    assert!(guest8
        .write(
            "/local/domain/0/virtsec/dd/3/request/g1",
            r#"{"op":"pause","domid":7}"#
        )
        .is_err());
    let log = xl();
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        vec!["pause 8", "unpause 8"],
        "dom0's toolstack was asked for more"
    );
    let eve = std::fs::read_to_string(d0.join("eve.json")).unwrap_or_default();
    assert!(
        eve.lines()
            .filter(|l| l.contains("\"delegated\"") && l.contains("driver domain 3 (netdd)"))
            .count()
            == 2,
        "{eve}"
    );
}
