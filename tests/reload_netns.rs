//! Rule hot reload: `virtsec rules reload` (and SIGHUP) swap the rules of a running virtsecd
//! without a restart: after the reload the new rule fires and the old one does not; a reload
//! that cannot load the files keeps the old rules and says why. The Prometheus endpoint
//! reports the vif's frames, flows and alerts by rule. Needs root; skipped otherwise.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use common::*;
use virtsec::lab::net::{send_segments, tcp_sink};
use virtsec::lab::toolstack::{GuestSpec, Toolstack};
use virtsec::xenstore::Client;

/// Alerts with `sid` that `virtsec alerts --json` (one EVE object per line) shows.
fn alerts(dir: &std::path::Path, sid: u64) -> usize {
    stdout(&cli(dir, &["alerts", "--json"]))
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|a| a["alert"]["signature_id"] == sid)
        .count()
}

/// `GET path` on the metrics address inside namespace `ns`.
fn scrape(ns: &str, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.0\r\n\r\n");
    virtsec::lab::net::in_netns(ns, move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9477").expect("metrics listener");
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .unwrap()
}

fn hit(dd: &str, g: &str, payload: &str) {
    let sink = tcp_sink(dd, 8080).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let dst = IpAddr::V4(Ipv4Addr::new(10, 93, 5, 1));
    send_segments(g, dst, 8080, vec![payload.as_bytes().to_vec()]).unwrap();
    let _ = sink.join();
}

#[test]
fn rules_reload_swaps_rules_and_a_failed_reload_keeps_the_old_ones() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIPPED rules_reload_swaps_rules_and_a_failed_reload_keeps_the_old_ones: needs root"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _log = LogOnPanic(dir.path().to_path_buf());
    let id = std::process::id();
    let (dd, g5) = (format!("vrl{id}"), format!("vrl5{id}"));
    ip(&["netns", "add", &dd]);
    let _ns = Netns(vec![dd.clone(), g5.clone()]);
    ip(&["-n", &dd, "link", "set", "lo", "up"]);
    guest_behind_vif(&dd, &g5, "vif5.0", "10.93.5.2/24", None);
    ip(&["-n", &dd, "addr", "add", "10.93.5.1/24", "dev", "vif5.0"]);
    ip(&["-n", &dd, "link", "set", "vif5.0", "up"]);
    let _xs = lab_xenstored(dir.path(), &[]);
    let mut ts = Toolstack::new(Client::open(dir.path().join("xs.sock")).unwrap());
    ts.init_host().unwrap();
    let rules = dir.path().join("r.rules");
    let rule = |sid: u32, content: &str| {
        format!("alert tcp any any -> any 8080 (msg:\"sid {sid}\"; content:\"{content}\"; sid:{sid}; rev:1;)\n")
    };
    std::fs::write(&rules, rule(7301, "first-secret")).unwrap();
    let extra = format!(
        "[metrics]\nlisten = \"127.0.0.1:9477\"\n[inspect]\nrules = [{:?}]\neve = {:?}\n",
        rules.display().to_string(),
        dir.path().join("eve.json").display().to_string()
    );
    let d = virtsecd_with(dir.path(), Some(&dd), &extra);
    ts.create(&GuestSpec::simple(5, "web", "xenbr0"), None)
        .unwrap();
    wait_for("vif5.0 attached", Duration::from_secs(5), || {
        status(dir.path()).is_some_and(|s| s["inspection"]["vif5.0"]["attached"] == true)
    });
    hit(&dd, &g5, "GET first-secret");
    wait_for("sid 7301", Duration::from_secs(3), || {
        alerts(dir.path(), 7301) == 1
    });
    // Prometheus sees the same.
    let m = scrape(&dd, "/metrics");
    assert!(m.starts_with("HTTP/1.0 200 OK"), "{m}");
    assert!(
        m.contains("virtsec_alerts_total{gid=\"1\",sid=\"7301\"} 1\n"),
        "{m}"
    );
    assert!(m.contains("virtsec_guests 1\n"), "{m}");
    let frames = m
        .lines()
        .find(|l| l.starts_with("virtsec_vif_frames_total{vif=\"vif5.0\",domid=\"5\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(frames > 0.0, "{m}");
    assert!(
        m.contains("virtsec_vif_flows{vif=\"vif5.0\",domid=\"5\"}"),
        "{m}"
    );
    assert!(scrape(&dd, "/nope").starts_with("HTTP/1.0 404"));

    // Reload with another rule: the new one fires, the old one no longer does.
    std::fs::write(&rules, rule(7302, "second-secret")).unwrap();
    let out = cli(dir.path(), &["rules", "reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).contains("1 rules loaded"), "{}", stdout(&out));
    std::thread::sleep(Duration::from_millis(300));
    hit(&dd, &g5, "GET second-secret and first-secret");
    wait_for("sid 7302", Duration::from_secs(3), || {
        alerts(dir.path(), 7302) == 1
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        alerts(dir.path(), 7301),
        1,
        "the old rule still fired after the reload"
    );

    // A reload that cannot read the files fails, says why, and keeps the rules in force.
    std::fs::remove_file(&rules).unwrap();
    let out = cli(dir.path(), &["rules", "reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(err.contains("r.rules"), "{err}");
    hit(&dd, &g5, "GET second-secret");
    wait_for("sid 7302 again", Duration::from_secs(3), || {
        alerts(dir.path(), 7302) == 2
    });

    // SIGHUP does the same as `rules reload`.
    std::fs::write(&rules, rule(7303, "third-secret")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for("SIGHUP reload logged", Duration::from_secs(3), || {
        std::fs::read_to_string(dir.path().join("virtsecd.log"))
            .unwrap_or_default()
            .contains("rules reloaded")
    });
    std::thread::sleep(Duration::from_millis(300));
    hit(&dd, &g5, "GET third-secret");
    wait_for("sid 7303", Duration::from_secs(3), || {
        alerts(dir.path(), 7303) == 1
    });

    // logrotate: the EVE file is moved away, SIGHUP, new alerts go to a new file.
    let eve = dir.path().join("eve.json");
    std::fs::rename(&eve, dir.path().join("eve.json.1")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    hit(&dd, &g5, "GET third-secret");
    wait_for(
        "the alert in the reopened EVE file",
        Duration::from_secs(3),
        || {
            std::fs::read_to_string(&eve)
                .unwrap_or_default()
                .contains("\"signature_id\":7303")
        },
    );
    assert!(std::fs::read_to_string(dir.path().join("eve.json.1"))
        .unwrap()
        .contains("\"signature_id\":7302"));
}
