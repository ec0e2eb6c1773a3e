//! Automation through XenStore: a quarantine request written by dom0 under the service's
//! request directory is executed and answered; the same request written by a guest (through
//! its own domain socket) is refused by xenstored (the directory is the service's), and one
//! whose node dom0 did not create is refused by the service and audited; neither changes
//! anything. Runs virtsecd in a network namespace (real nftables). Needs
//! root; skipped otherwise.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use virtsec::lab::toolstack::{GuestSpec, Toolstack};
use virtsec::xenstore::Client;

/// The reasons of the VMs quarantined now.
fn quarantined(dir: &std::path::Path) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&stdout(&cli(dir, &["quarantined", "--json"]))).unwrap();
    v["quarantined"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["reason"].as_str().unwrap_or("").to_string())
        .collect()
}

fn response(xs: &mut Client, id: &str) -> Option<serde_json::Value> {
    let v = xs
        .read(&format!("/local/domain/0/virtsec/response/{id}"))
        .ok()?;
    serde_json::from_slice(&v).ok()
}

#[test]
fn dom0_requests_are_executed_and_guest_requests_refused() {
    if !nix::unistd::geteuid().is_root() || Command::new("nft").arg("--version").output().is_err() {
        eprintln!(
            "SKIPPED dom0_requests_are_executed_and_guest_requests_refused: needs root and nft"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _log = LogOnPanic(dir.path().to_path_buf());
    let dd = format!("vxr{}", std::process::id());
    ip(&["netns", "add", &dd]);
    let _ns = Netns(vec![dd.clone()]);
    let _xs = lab_xenstored(dir.path(), &[5]);
    let mut ts = Toolstack::new(Client::open(dir.path().join("xs.sock")).unwrap());
    ts.init_host().unwrap();
    let mut guest = Client::open(dir.path().join("d5.sock")).unwrap();
    ts.create(&GuestSpec::simple(5, "web", "xenbr0"), Some(&mut guest))
        .unwrap();
    let _d = virtsecd_with(dir.path(), Some(&dd), "");
    let mut dom0 = Client::open(dir.path().join("xs.sock")).unwrap();
    wait_for("the request directory", Duration::from_secs(5), || {
        dom0.get_perms("/local/domain/0/virtsec/request").is_ok()
    });

    // dom0 (the toolstack, orchestration) asks: executed and answered.
    dom0.write(
        "/local/domain/0/virtsec/request/ir42",
        r#"{"op":"quarantine","target":"web","action":"isolate","reason":"IR-42 from orchestration"}"#,
    )
    .unwrap();
    wait_for("dom0's request answered", Duration::from_secs(5), || {
        response(&mut dom0, "ir42").is_some()
    });
    let r = response(&mut dom0, "ir42").unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["record"]["actions"], serde_json::json!(["isolate"]));
    assert!(
        dom0.read("/local/domain/0/virtsec/request/ir42").is_err(),
        "request not removed"
    );
    assert_eq!(quarantined(dir.path()), vec!["IR-42 from orchestration"]);
    // The state is published for other tools: the record and the service's summary.
    let rec = dom0
        .read("/local/domain/0/virtsec/quarantine/5e1ab000-0000-4000-8000-000000000005")
        .unwrap();
    assert!(String::from_utf8_lossy(&rec).contains("IR-42 from orchestration"));
    wait_for("status summary published", Duration::from_secs(5), || {
        dom0.read("/local/domain/0/virtsec/status")
            .ok()
            .and_then(|v| serde_json::from_slice::<serde_json::Value>(&v).ok())
            .is_some_and(|v| v["quarantined"] == 1 && v["guests"] == 1)
    });
    let nft = Command::new("ip")
        .args([
            "netns",
            "exec",
            &dd,
            "nft",
            "list",
            "table",
            "bridge",
            "virtsec_q",
        ])
        .output()
        .unwrap();
    assert!(stdout(&nft).contains("qi_5e1ab000_0000_4000_8000_000000000005"));

    // The guest writes the same kind of request to free itself: xenstored refuses the write
    // (the directory is the service's), nothing changes.
    let err = guest
        .write(
            "/local/domain/0/virtsec/request/free-me",
            r#"{"op":"release","target":"web","reason":"trust me"}"#,
        )
        .unwrap_err();
    assert!(err.to_string().contains("EACCES"), "{err}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(response(&mut dom0, "free-me").is_none());
    assert_eq!(
        quarantined(dir.path()),
        vec!["IR-42 from orchestration"],
        "the guest's request changed the state"
    );
    // A request node that dom0 did not create (a driver domain's, say) is refused by the
    // service itself: here dom0 hands the node to domain 5 in the same transaction.
    dom0.transaction(|c, t| {
        c.write_tx(
            t,
            "/local/domain/0/virtsec/request/handed",
            r#"{"op":"release","target":"web","reason":"not dom0's"}"#,
        )?;
        c.set_perms_tx(
            t,
            "/local/domain/0/virtsec/request/handed",
            &["n5".parse().unwrap()],
        )
    })
    .unwrap();
    wait_for(
        "the handed request answered",
        Duration::from_secs(5),
        || response(&mut dom0, "handed").is_some(),
    );
    let r = response(&mut dom0, "handed").unwrap();
    assert_eq!(r["ok"], false);
    assert!(
        r["error"].as_str().unwrap().contains("owned by domain 5"),
        "{r}"
    );
    assert_eq!(quarantined(dir.path()), vec!["IR-42 from orchestration"]);
    let eve = std::fs::read_to_string(dir.path().join("eve.json")).unwrap_or_default();
    assert!(
        eve.lines()
            .any(|l| l.contains("\"op\":\"refused\"") && l.contains("handed")),
        "{eve}"
    );
    // A guest cannot read the answers.
    assert!(guest.read("/local/domain/0/virtsec/response/ir42").is_err());

    // dom0 releases through XenStore too.
    dom0.write(
        "/local/domain/0/virtsec/request/ir42-done",
        r#"{"op":"release","target":"web","reason":"IR-42 closed"}"#,
    )
    .unwrap();
    wait_for("release answered", Duration::from_secs(5), || {
        response(&mut dom0, "ir42-done").is_some_and(|r| r["ok"] == true)
    });
    assert!(quarantined(dir.path()).is_empty());
}
