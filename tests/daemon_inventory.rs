//! virtsecd against the lab xenstored: guests created, changed and destroyed exactly as libxl
//! does are followed by `virtsec domains --json` within 100 ms; hostile frontend writes are
//! ignored; a xenstored restart is survived with a full resync.

mod common;

use std::time::Duration;

use common::*;
use virtsec::lab::toolstack::{GuestSpec, Toolstack, VifSpec};
use virtsec::xenstore::Client;

const FOLLOW: Duration = Duration::from_millis(100);

fn vif(g: &serde_json::Value, devid: u32) -> &serde_json::Value {
    &g["vifs"][devid.to_string()]
}

fn connected(doms: &serde_json::Value, d: u32, devid: u32) -> bool {
    guest(doms, d)
        .map(|g| {
            vif(&g, devid)["state"] == "connected"
                && vif(&g, devid)["hotplug_status"] == "connected"
        })
        .unwrap_or(false)
}

#[test]
fn follows_libxl_lifecycle_within_100ms() {
    let dir = tempfile::tempdir().unwrap();
    let _xs = lab_xenstored(dir.path(), &[5, 6]);
    let mut ts = Toolstack::new(Client::open(dir.path().join("xs.sock")).unwrap());
    ts.init_host().unwrap();
    let _d = virtsecd(dir.path());
    assert_eq!(
        domains(dir.path()),
        serde_json::json!([]),
        "dom0 is not a guest"
    );
    // An operator following the inventory sees each change as one JSON line.
    let mut watcher = Proc(
        std::process::Command::new(VIRTSEC)
            .arg("--control-socket")
            .arg(dir.path().join("control.sock"))
            .args(["domains", "--follow", "--json"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let followed = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    {
        let out = watcher.0.stdout.take().unwrap();
        let followed = followed.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                let v = serde_json::from_str::<serde_json::Value>(&l).unwrap();
                followed.lock().unwrap().push(v);
            }
        });
    }
    // Waits until the follower printed an inventory for which `f` holds, at or after line
    // `from`; its index.
    let shown = |from: usize, what: &str, f: &dyn Fn(&serde_json::Value) -> bool| {
        let t0 = std::time::Instant::now();
        loop {
            if let Some(i) = followed.lock().unwrap().iter().skip(from).position(f) {
                return from + i;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "--follow never showed {what}: {:?}",
                followed.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    assert_eq!(
        shown(0, "the empty inventory", &|d| d == &serde_json::json!([])),
        0
    );

    // xl create, the guest's netfront writing through its own connection.
    let mut g5c = Client::open(dir.path().join("d5.sock")).unwrap();
    let mut web = GuestSpec::simple(5, "web", "xenbr0");
    web.vifs[0].ip = Some("192.0.2.5 2001:db8::5".into());
    ts.create(&web, Some(&mut g5c)).unwrap();
    let took = follow(dir.path(), "guest 5 connected", FOLLOW, |d| {
        connected(d, 5, 0)
    });
    eprintln!("create followed in {took:?}");
    let created = shown(0, "guest 5 connected", &|d| connected(d, 5, 0));
    let g = guest(&domains(dir.path()), 5).unwrap();
    assert_eq!(g["name"], "web");
    assert_eq!(g["uuid"], web.uuid.as_str());
    assert_eq!(g["introduced"], true);
    let v = vif(&g, 0);
    assert_eq!(v["ifname"], "vif5.0");
    assert_eq!(v["mac"], web.vifs[0].mac.as_str());
    assert_eq!(v["bridge"], "xenbr0");
    assert_eq!(v["ips"], serde_json::json!(["192.0.2.5", "2001:db8::5"]));
    assert_eq!(v["emu_ifname"], serde_json::Value::Null);

    // A second guest, HVM-style NIC with a vifname: the -emu twin is derived.
    let mut db = GuestSpec::simple(6, "db", "xenbr1");
    db.vifs[0].hvm = true;
    db.vifs[0].vifname = Some("db-eth0".into());
    ts.create(&db, None).unwrap();
    follow(dir.path(), "guest 6", FOLLOW, |d| connected(d, 6, 0));
    let db = shown(created, "guest 6", &|d| connected(d, 6, 0));
    let g = guest(&domains(dir.path()), 6).unwrap();
    assert_eq!(vif(&g, 0)["ifname"], "db-eth0");
    assert_eq!(vif(&g, 0)["emu_ifname"], "db-eth0-emu");

    // Change: netback throttled by the toolstack (rate key) is reflected.
    ts.client()
        .write("/local/domain/0/backend/vif/5/0/rate", "125000,50000")
        .unwrap();
    follow(dir.path(), "rate change", FOLLOW, |d| {
        guest(d, 5)
            .map(|g| vif(&g, 0)["rate"] == "125000,50000")
            .unwrap_or(false)
    });

    // Hot-plug and unplug a second vif.
    ts.add_vif(5, &VifSpec::pv(5, 1, "xenbr0")).unwrap();
    ts.connect_vif(5, 1, Some(&mut g5c)).unwrap();
    follow(dir.path(), "vif5.1", FOLLOW, |d| connected(d, 5, 1));
    ts.remove_vif(5, 1).unwrap();
    follow(dir.path(), "vif5.1 gone", FOLLOW, |d| {
        guest(d, 5)
            .map(|g| g["vifs"].get("1").is_none())
            .unwrap_or(false)
    });

    // Rename (xl rename writes name).
    ts.client()
        .write("/local/domain/5/name", "web-renamed")
        .unwrap();
    ts.client()
        .write(&format!("/vm/{}/name", web.uuid), "web-renamed")
        .unwrap();
    follow(dir.path(), "rename", FOLLOW, |d| {
        guest(d, 5)
            .map(|g| g["name"] == "web-renamed")
            .unwrap_or(false)
    });

    // xl destroy.
    ts.destroy(6).unwrap();
    let took = follow(dir.path(), "guest 6 gone", FOLLOW, |d| {
        guest(d, 6).is_none()
    });
    eprintln!("destroy followed in {took:?}");
    let gone = shown(db, "guest 6 gone", &|d| {
        guest(d, 5).is_some() && guest(d, 6).is_none()
    });

    // A new VM reuses domid 6: it inherits nothing of the old one.
    let fresh = GuestSpec {
        uuid: "0b5e55ed-0000-4000-8000-000000000006".into(),
        ..GuestSpec::simple(6, "fresh", "xenbr0")
    };
    ts.create(&fresh, None).unwrap();
    follow(dir.path(), "domid reuse", FOLLOW, |d| {
        guest(d, 6)
            .map(|g| {
                g["uuid"] == fresh.uuid.as_str()
                    && g["name"] == "fresh"
                    && vif(&g, 0)["emu_ifname"].is_null()
            })
            .unwrap_or(false)
    });

    // The follower printed each inventory above in order, one line per change (never the same
    // twice in a row), the last one being what is there now.
    let reused = shown(gone, "guest 6 reused", &|d| {
        guest(d, 6).map(|g| g["name"] == "fresh").unwrap_or(false)
    });
    std::thread::sleep(Duration::from_millis(100));
    watcher.sigkill();
    let lines = followed.lock().unwrap().clone();
    assert!(created < db && db < gone && gone < reused, "{lines:?}");
    assert!(lines.windows(2).all(|w| w[0] != w[1]), "{lines:?}");
    assert_eq!(lines.last(), Some(&domains(dir.path())));

    // A follower whose reader went away (`| head -1`) ends quietly at the next change.
    let mut short = std::process::Command::new(VIRTSEC)
        .arg("--control-socket")
        .arg(dir.path().join("control.sock"))
        .args(["domains", "--follow", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead as _;
        let mut first = String::new();
        std::io::BufReader::new(short.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.contains("fresh"), "{first}");
    }
    ts.destroy(6).unwrap();
    let t0 = std::time::Instant::now();
    let st = loop {
        if let Some(st) = short.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the follower did not end"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut short.stderr.take().unwrap(), &mut err).unwrap();
    assert!(st.success() && err.is_empty(), "{st:?}: {err}");

    // The human-readable forms work too.
    let out = cli(dir.path(), &["domains"]);
    assert!(out.status.success());
    let text = stdout(&out);
    assert!(
        text.contains("web-renamed") && text.contains("vif5.0"),
        "{text}"
    );
    let out = cli(dir.path(), &["status"]);
    assert!(
        stdout(&out).contains("xenstore: connected"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn hostile_frontend_writes_change_nothing_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let _xs = lab_xenstored(dir.path(), &[7]);
    let mut ts = Toolstack::new(Client::open(dir.path().join("xs.sock")).unwrap());
    ts.init_host().unwrap();
    let _d = virtsecd(dir.path());
    let mut guest_conn = Client::open(dir.path().join("d7.sock")).unwrap();
    ts.create(
        &GuestSpec::simple(7, "victim", "xenbr0"),
        Some(&mut guest_conn),
    )
    .unwrap();
    follow(dir.path(), "guest 7", FOLLOW, |d| connected(d, 7, 0));
    let before = domains(dir.path());

    // Debian's C client, connected as domain 7, writes nonsense into every frontend node it
    // owns, and tries the backend and the toolstack's nodes.
    let d7 = dir.path().join("d7.sock");
    let fe = "/local/domain/7/device/vif/0";
    for (k, v) in [
        ("mac", "de:ad:be:ef:00:01"),
        ("backend", "/local/domain/0/backend/vif/1/0"),
        ("backend-id", "3"),
        ("state", "4"),
        ("handle", "99"),
        ("ip", "0.0.0.0/0"),
    ] {
        let o = xs_util(&d7, "xenstore-write", &[&format!("{fe}/{k}"), v]);
        assert!(
            o.status.success(),
            "the guest may write its own frontend: {o:?}"
        );
    }
    for p in [
        "/local/domain/0/backend/vif/7/0/mac",
        "/local/domain/0/backend/vif/7/0/ip",
        "/local/domain/7/name",
        "/local/domain/7/vm",
        "/libxl/7/device/vif/0/mac",
    ] {
        let o = xs_util(&d7, "xenstore-write", &[p, "evil"]);
        assert!(!o.status.success(), "guest must not be able to write {p}");
    }
    // The writes are seen and counted.
    wait_for("untrusted writes counted", Duration::from_secs(2), || {
        status(dir.path())
            .map(|s| {
                s["warnings"]["untrusted_frontend_writes"]
                    .as_u64()
                    .unwrap_or(0)
                    >= 6
            })
            .unwrap_or(false)
    });
    // Force a full reconcile (toolstack touches the backend) and compare.
    ts.client()
        .write(
            "/local/domain/0/backend/vif/7/0/hotplug-status",
            "connected",
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(domains(dir.path()), before, "the inventory must not change");
    let s = status(dir.path()).unwrap();
    assert_eq!(s["warnings"]["frontend_mismatches"], 1, "{s:#}");
}

#[test]
fn survives_xenstored_restart_with_full_resync() {
    let dir = tempfile::tempdir().unwrap();
    let mut xs = lab_xenstored(dir.path(), &[]);
    let mut ts = Toolstack::new(Client::open(dir.path().join("xs.sock")).unwrap());
    ts.init_host().unwrap();
    let _d = virtsecd(dir.path());
    ts.create(&GuestSpec::simple(1, "a", "xenbr0"), None)
        .unwrap();
    ts.create(&GuestSpec::simple(2, "b", "xenbr0"), None)
        .unwrap();
    follow(dir.path(), "guests 1 and 2", FOLLOW, |d| {
        connected(d, 1, 0) && connected(d, 2, 0)
    });

    // xenstored dies: the service says so and keeps its last inventory.
    xs.sigkill();
    wait_for("disconnect noticed", Duration::from_secs(2), || {
        status(dir.path())
            .map(|s| s["xenstore"]["connected"] == false)
            .unwrap_or(false)
    });
    assert_eq!(domains(dir.path()).as_array().unwrap().len(), 2);

    // It comes back with a different truth (guest 2 gone, guest 3 new).
    let _xs2 = lab_xenstored(dir.path(), &[]);
    let mut ts = Toolstack::new(Client::open(dir.path().join("xs.sock")).unwrap());
    ts.init_host().unwrap();
    ts.create(&GuestSpec::simple(1, "a", "xenbr0"), None)
        .unwrap();
    ts.create(&GuestSpec::simple(3, "c", "xenbr0"), None)
        .unwrap();
    follow(
        dir.path(),
        "resync after restart",
        Duration::from_secs(3),
        |d| connected(d, 1, 0) && connected(d, 3, 0) && guest(d, 2).is_none(),
    );
    let s = status(dir.path()).unwrap();
    assert_eq!(s["xenstore"]["connected"], true);
    assert!(s["xenstore"]["connects"].as_u64().unwrap() >= 2, "{s:#}");
    // Watches were re-registered: a later change is followed promptly.
    ts.destroy(3).unwrap();
    follow(dir.path(), "destroy after restart", FOLLOW, |d| {
        guest(d, 3).is_none()
    });
}

#[test]
fn starts_before_xenstored_and_connects_when_it_appears() {
    let dir = tempfile::tempdir().unwrap();
    // virtsecd first: it must wait, not exit.
    let cfg = dir.path().join("v.toml");
    std::fs::write(
        &cfg,
        format!(
            "[xenstore]\npath = {:?}\nreconnect_min_ms = 20\nreconnect_max_ms = 100\n[control]\nsocket = {:?}\n[log]\ntarget = \"stderr\"\n",
            dir.path().join("xs.sock").display().to_string(),
            dir.path().join("control.sock").display().to_string()
        ),
    )
    .unwrap();
    let _d = Proc(
        std::process::Command::new(VIRTSECD)
            .arg("--config")
            .arg(&cfg)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("control socket", Duration::from_secs(5), || {
        status(dir.path()).is_some()
    });
    let s = status(dir.path()).unwrap();
    assert_eq!(s["xenstore"]["connected"], false);
    assert!(
        s["xenstore"]["last_error"]
            .as_str()
            .unwrap()
            .contains("xs.sock"),
        "{s:#}"
    );
    let _xs = lab_xenstored(dir.path(), &[]);
    wait_for("connected", Duration::from_secs(3), || {
        status(dir.path())
            .map(|s| s["xenstore"]["in_sync"] == true)
            .unwrap_or(false)
    });
}

#[test]
fn bad_configuration_is_refused_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[xenstore]\npath = \"/x\"\nretries = 3\n").unwrap();
    let out = std::process::Command::new(VIRTSECD)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:3:", cfg.display())) && err.contains("retries"),
        "{err}"
    );
    let out = std::process::Command::new(VIRTSECD)
        .arg("--config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[test]
fn control_socket_refuses_other_users() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED control_socket_refuses_other_users: needs root to act as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _xs = lab_xenstored(dir.path(), &[]);
    let _d = virtsecd(dir.path());
    let sock = dir.path().join("control.sock");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket must be root-only");
    // Open the file permission so only SO_PEERCRED stands in the way.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            VIRTSEC,
            "--control-socket",
        ])
        .arg(&sock)
        .args(["status", "--json"])
        .output()
        .expect("setpriv (util-linux)");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("root only"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status(dir.path()).unwrap()["control_refused_peers"], 1);
}

#[test]
fn driver_domain_degrades_cleanly_without_dom0_privilege() {
    let dir = tempfile::tempdir().unwrap();
    // Domain 3 is a network driver domain; guest 5's vif has its backend there.
    let _xs = lab_xenstored(dir.path(), &[3]);
    let mut dom0 = Toolstack::new(Client::open(dir.path().join("xs.sock")).unwrap());
    dom0.init_host().unwrap();
    dom0.create(&driver_domain_spec(3, "netdd"), None).unwrap();
    let mut ts = Toolstack::with_backend(Client::open(dir.path().join("xs.sock")).unwrap(), 3);

    // virtsecd in the driver domain: unprivileged connection, domid read from XenStore.
    let cfg = dir.path().join("dd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[xenstore]\npath = {:?}\n[control]\nsocket = {:?}\n[log]\ntarget = \"stderr\"\nlevel = \"debug\"\n",
            dir.path().join("d3.sock").display().to_string(),
            dir.path().join("control.sock").display().to_string()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("virtsecd.log")).unwrap();
    let _d = Proc(
        std::process::Command::new(VIRTSECD)
            .arg("--config")
            .arg(&cfg)
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for("virtsecd in sync", Duration::from_secs(5), || {
        status(dir.path())
            .map(|s| s["xenstore"]["in_sync"] == true)
            .unwrap_or(false)
    });
    assert_eq!(status(dir.path()).unwrap()["xenstore"]["self_domid"], 3);

    ts.create(&GuestSpec::simple(5, "tenant", "xenbr0"), None)
        .unwrap();
    follow(
        dir.path(),
        "guest 5 via the driver domain's backend tree",
        FOLLOW,
        |d| connected(d, 5, 0),
    );
    let g = guest(&domains(dir.path()), 5).unwrap();
    assert_eq!(vif(&g, 0)["ifname"], "vif5.0");
    assert_eq!(vif(&g, 0)["mac"], "00:16:3e:00:05:00");
    // What a driver domain may not read is absent, not guessed, and reported.
    assert!(g["name"].is_null() && g["uuid"].is_null(), "{g:#}");
    let s = status(dir.path()).unwrap();
    let denied = s["warnings"]["denied"].to_string();
    assert!(denied.contains("/local/domain"), "{s:#}");
    assert_eq!(s["xenstore"]["connected"], true);

    ts.destroy(5).unwrap();
    follow(dir.path(), "guest 5 gone", FOLLOW, |d| {
        guest(d, 5).is_none()
    });
}
