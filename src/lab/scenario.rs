//! The default lab scenario: a simulated Xen host with real traffic.
//!
//! The host is the lab xenstored (a thread of this process), the simulated toolstack
//! ([`super::toolstack`]), the network of [`super::net`] (a driver-domain namespace with bridge
//! `xenbr0`, guest namespaces behind `vif<D>.0` veths) and a real `virtsecd` running in the
//! driver-domain namespace with the sample policy and rules shipped in `xen-config/lab/`.
//!
//! The timeline, every step checked (traffic results and what `virtsecd` reports):
//! guests boot and are gated (the vif joins the bridge only once virtsecd says its policy is
//! in place, as `vif-virtsec` does), benign IPv4/IPv6 traffic flows and is inspected, a guest
//! forging its source address is dropped and counted, another sends a signature split across
//! TCP segments (alert, first ladder step: throttle) and scans (behaviour alert, second step:
//! isolate) while the others keep talking, an operator releases it, a guest is destroyed and
//! everything of it goes. Anything the lab created is removed when it ends, on Ctrl-C, after a
//! failure, and by `virtsec lab down` after a SIGKILL.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::net::{self, DD};
use super::toolstack::{GuestSpec, Toolstack};
use super::{LabError, LabOptions, StepRecord};
use crate::control::{self, ControlRequest};
use crate::labxs::{LabServerHandle, Limits, ServerConfig};
use crate::xenstore::Client;

const RULES: &str = include_str!("../../xen-config/lab/lab.rules");
const POLICY: &str = include_str!("../../xen-config/lab/policy.toml");

/// The lab's lock: namespaces and the bridge have fixed names, so one lab per machine. It
/// holds the lab's pid and run directory; a second lab refuses to start while it names a live
/// process.
pub const LOCK: &str = "/run/virtsec-lab.pid";

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

fn lock() -> Option<(i32, PathBuf)> {
    let text = std::fs::read_to_string(LOCK).ok()?;
    let (pid, dir) = text.trim().split_once(' ')?;
    Some((pid.parse().ok()?, PathBuf::from(dir)))
}

/// The pid and run directory of a running lab, if any.
pub fn running() -> Option<(i32, PathBuf)> {
    lock().filter(|(pid, _)| *pid != std::process::id() as i32 && alive(*pid))
}

/// `virtsec lab down`: stops a kept (or killed) lab and removes everything it left.
pub fn down(run_dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    // The lab named by the lock wins over the default directory.
    let run_dir = lock()
        .map(|(_, d)| d)
        .unwrap_or_else(|| run_dir.to_path_buf());
    let run_dir = run_dir.as_path();
    if let Some((pid, _)) = running() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        done.push(format!("stopped lab process {pid}"));
    }
    if let Ok(p) = std::fs::read_to_string(run_dir.join("virtsecd.pid")) {
        if let Ok(pid) = p.trim().parse::<i32>() {
            if alive(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                done.push(format!("killed virtsecd {pid}"));
            }
        }
    }
    for ns in net::teardown() {
        done.push(format!("removed namespace {ns}"));
    }
    if run_dir.exists() && std::fs::remove_dir_all(run_dir).is_ok() {
        done.push(format!("removed {}", run_dir.display()));
    }
    if lock().is_some_and(|(pid, _)| pid != std::process::id() as i32) {
        let _ = std::fs::remove_file(LOCK);
    }
    done
}

/// Everything the lab started; dropping it tears it all down.
struct Host {
    server: Option<LabServerHandle>,
    daemon: Option<Child>,
    run_dir: PathBuf,
    stop_echo: Arc<AtomicBool>,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop_echo.store(true, Ordering::Relaxed);
        if let Some(child) = self.daemon.take() {
            super::stop_child(child);
        }
        if let Some(s) = self.server.take() {
            let _ = s.stop();
        }
        net::teardown();
        let _ = std::fs::remove_dir_all(&self.run_dir);
        let _ = std::fs::remove_file(LOCK);
    }
}

struct Timeline<'a> {
    opts: &'a LabOptions,
    records: Vec<StepRecord>,
    stop: Arc<AtomicBool>,
}

impl Timeline<'_> {
    /// Polls `check` until it holds or `timeout` passes; records the step.
    fn step(
        &mut self,
        name: &str,
        started: Instant,
        timeout: Duration,
        mut check: impl FnMut() -> Result<String, String>,
    ) -> Result<bool, LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(LabError::Interrupted);
            }
            let r = check();
            let done = r.is_ok() || Instant::now() >= deadline;
            if done {
                let ms = started.elapsed().as_secs_f64() * 1e3;
                let ok = r.is_ok();
                self.record(name, ok, ms, r.unwrap_or_else(|e| e));
                return Ok(ok);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn record(&mut self, name: &str, ok: bool, ms: f64, detail: String) {
        let r = StepRecord {
            step: self.records.len() + 1,
            name: name.into(),
            ok,
            ms,
            detail,
        };
        super::print_step(self.opts.json, &r);
        self.records.push(r);
    }
}

fn call(control: &Path, req: &ControlRequest) -> Result<serde_json::Value, String> {
    control::call(control, req).map_err(|e| e.to_string())
}

/// The quarantine record of VM `uuid`, as `virtsec quarantined --json` shows it.
fn quarantine_record(control: &Path, uuid: &str) -> Result<serde_json::Value, String> {
    let r = call(control, &ControlRequest::Quarantined)?;
    r["quarantined"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|q| q["uuid"] == uuid)
        .cloned()
        .ok_or_else(|| format!("VM {uuid} not quarantined"))
}

fn mac_bytes(domid: u32) -> [u8; 6] {
    [0x00, 0x16, 0x3e, 0x00, (domid & 0xff) as u8, 0x00]
}

/// Runs the default scenario (root). Returns the step records.
pub fn run(opts: &LabOptions) -> Result<Vec<StepRecord>, LabError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let run_dir = opts.run_dir.clone();
    if let Some((pid, dir)) = running() {
        return Err(LabError::Running(pid, dir));
    }
    // Leftovers of a lab that was killed: gone before anything new is made.
    let stale = down(&run_dir);
    if !stale.is_empty() && !opts.json {
        println!(
            "virtsec lab: removed leftovers of an earlier lab ({})",
            stale.join(", ")
        );
    }
    std::fs::create_dir_all(&run_dir)?;
    std::fs::write(
        LOCK,
        format!("{} {}", std::process::id(), run_dir.display()),
    )?;
    let mut host = Host {
        server: None,
        daemon: None,
        run_dir: run_dir.clone(),
        stop_echo: Arc::new(AtomicBool::new(false)),
    };
    let t_host = Instant::now();
    net::create_host()?;
    let xs_sock = run_dir.join("xenstored.sock");
    host.server = Some(LabServerHandle::spawn(ServerConfig {
        socket: xs_sock.clone(),
        domain_sockets: Vec::new(),
        limits: Limits::default(),
    })?);
    let mut ts = Toolstack::new(Client::open(&xs_sock)?);
    ts.init_host()?;

    // virtsecd in the driver domain, with the shipped sample policy and rules.
    let control = run_dir.join("control.sock");
    let rules = run_dir.join("lab.rules");
    std::fs::write(&rules, RULES)?;
    let eve = run_dir.join("eve.json");
    let policy = POLICY
        .replace(
            "[inspect]\n",
            &format!(
                "[inspect]\nrules = [{:?}]\neve = {:?}\n",
                rules.display().to_string(),
                eve.display().to_string()
            ),
        )
        .replace(
            "[quarantine]\n",
            &format!(
                "[quarantine]\nstate_dir = {:?}\n",
                run_dir.join("state").display().to_string()
            ),
        );
    let cfg_path = run_dir.join("virtsecd.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[xenstore]\npath = {:?}\n[control]\nsocket = {:?}\n[log]\ntarget = \"stderr\"\nlevel = \"info\"\n{policy}",
            xs_sock.display().to_string(),
            control.display().to_string()
        ),
    )?;
    let log_path = run_dir.join("virtsecd.log");
    let log_file = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", DD])
        .arg(&opts.virtsecd)
        .arg("--config")
        .arg(&cfg_path)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    // SAFETY: prctl in the child before exec; async-signal-safe. virtsecd dies with the lab
    // even if the lab is SIGKILLed.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| LabError::Spawn {
        path: opts.virtsecd.clone(),
        source,
    })?;
    std::fs::write(run_dir.join("virtsecd.pid"), child.id().to_string())?;
    host.daemon = Some(child);
    let ready_deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(LabError::Interrupted);
        }
        if let Ok(s) = control::call(&control, &ControlRequest::Status) {
            if s["xenstore"]["in_sync"].as_bool() == Some(true) {
                break;
            }
        }
        if Instant::now() > ready_deadline {
            return Err(LabError::NotReady(Duration::from_secs(10), log_path));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if !opts.json {
        println!(
            "virtsec lab: simulated Xen host ready in {:.1} s: namespace {DD} (bridge xenbr0, virtsecd pid {}), lab XenStore {}",
            t_host.elapsed().as_secs_f64(),
            host.daemon.as_ref().map(|c| c.id()).unwrap_or(0),
            xs_sock.display()
        );
        println!("Each step: what the toolstack, a guest or the operator did, checked in the traffic and through virtsecd; ms = until the effect was seen.");
    }
    let mut tl = Timeline {
        opts,
        records: Vec::new(),
        stop: stop.clone(),
    };
    let n = opts.guests.max(3);
    let specs: Vec<GuestSpec> = (1..=n)
        .map(|d| {
            let mut g = GuestSpec::simple(d, &format!("guest{d}"), "xenbr0");
            g.vifs[0].mac = net::guest_mac(d);
            g.vifs[0].ip = Some(format!("{} {}", net::guest_v4(d), net::guest_v6(d)));
            g
        })
        .collect();

    // 1. Guests boot; each vif joins the bridge only when virtsecd has its policy in place.
    for g in &specs {
        let d = g.domid;
        let t = Instant::now();
        ts.create(g, None)?;
        net::plug_vif(d)?;
        let ctl = control.clone();
        let ok = tl.step(
            &format!("xl create guest{d}: vif{d}.0 gated until its policy is in place"),
            t,
            Duration::from_secs(5),
            || {
                let r = call(&ctl, &ControlRequest::VifReady { domid: d, devid: 0 })?;
                if r["ready"] == true {
                    Ok(format!(
                        "anti-spoofing {} inspection {}, then vif{d}.0 joined xenbr0",
                        r["antispoof"], r["inspection"]
                    ))
                } else {
                    Err(format!("not ready: {r}"))
                }
            },
        )?;
        if ok {
            net::bridge_vif(d)?;
        }
        net::echo_server(&net::guest_ns(d), host.stop_echo.clone())?;
    }

    // 2. Benign traffic between guests and to the host, IPv4 and IPv6.
    let (a, b, c) = (1u32, 2u32, 3u32);
    let t = Instant::now();
    tl.step(
        "benign traffic: guests talk over IPv4 and IPv6 through xenbr0",
        t,
        Duration::from_secs(5),
        || {
            let mut rtt = Vec::new();
            for (from, to) in [(a, b), (b, c), (c, a)] {
                let v4 = net::talk(&net::guest_ns(from), IpAddr::V4(net::guest_v4(to)))?;
                let v6 = net::talk(&net::guest_ns(from), IpAddr::V6(net::guest_v6(to)))?;
                rtt.push(v4.max(v6));
            }
            let worst = rtt.iter().max().copied().unwrap_or_default();
            Ok(format!(
                "3 pairs both ways, slowest round trip {:.2} ms",
                worst.as_secs_f64() * 1e3
            ))
        },
    )?;
    let ctl = control.clone();
    let t = Instant::now();
    tl.step(
        "the traffic was inspected on every vif",
        t,
        Duration::from_secs(3),
        || {
            let s = call(&ctl, &ControlRequest::Status)?;
            let mut parts = Vec::new();
            for d in 1..=3 {
                let f = s["inspection"][format!("vif{d}.0")]["frames"]
                    .as_u64()
                    .unwrap_or(0);
                if f == 0 {
                    return Err(format!("vif{d}.0 saw no frames"));
                }
                parts.push(format!("vif{d}.0 {f}"));
            }
            Ok(format!("frames: {}", parts.join(", ")))
        },
    )?;

    // 3. guest3 forges its source address: dropped at its vif, counted, named.
    let sink = net::udp_sink(&net::guest_ns(a), 5353, Duration::from_millis(600))?;
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    net::send_spoofed_udp(
        &net::guest_ns(c),
        mac_bytes(c),
        "10.77.0.99".parse().unwrap_or(net::HOST_V4),
        net::guest_v4(a),
        5353,
    )
    .map_err(|e| LabError::Io(std::io::Error::other(e)))?;
    let got = sink.join().unwrap_or(0);
    let ctl = control.clone();
    tl.step(
        "guest3 forges its IPv4 source: dropped at vif3.0 and counted",
        t,
        Duration::from_secs(3),
        || {
            if got != 0 {
                return Err(format!("{got} forged datagram(s) reached guest1"));
            }
            let s = call(&ctl, &ControlRequest::Status)?;
            let v = &s["antispoof"]["vif3.0"];
            let drops = v["drops"]["spoof-ip4"].as_u64().unwrap_or(0);
            if drops == 0 {
                return Err(format!("no spoof-ip4 drop counted: {v}"));
            }
            Ok(format!(
                "0 reached guest1; spoof-ip4 drops {drops} for domain {} ({})",
                v["domid"],
                v["name"].as_str().unwrap_or("?")
            ))
        },
    )?;
    let sink = net::udp_sink(&net::guest_ns(a), 5354, Duration::from_millis(400))?;
    std::thread::sleep(Duration::from_millis(50));
    let _ = net::send_udp(&net::guest_ns(c), net::guest_v4(a), 5354);
    let got_real = sink.join().unwrap_or(0);
    let t = Instant::now();
    tl.step(
        "guest3's datagram from its real address still passes",
        t,
        Duration::from_millis(10),
        || {
            if got_real == 1 {
                Ok("1 of 1 received".into())
            } else {
                Err(format!("{got_real} received"))
            }
        },
    )?;

    // 4. guest2 attacks guest1: a signature split across two TCP segments.
    let sink = net::tcp_sink(&net::guest_ns(a), 8080)?;
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    let _ = net::send_segments(
        &net::guest_ns(b),
        IpAddr::V4(net::guest_v4(a)),
        8080,
        vec![
            b"GET /?q=virtsec-lab-".to_vec(),
            b"exploit HTTP/1.0\r\n\r\n".to_vec(),
        ],
    );
    let _ = sink.join();
    let ctl = control.clone();
    let uuid_b = specs[1].uuid.clone();
    tl.step(
        "guest2 sends a signature split across TCP segments: alert",
        t,
        Duration::from_secs(3),
        || {
            let r = call(&ctl, &ControlRequest::Alerts { after: 0 })?;
            let hit = r["alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["alert"]["signature_id"] == 1_000_001)
                .ok_or("no sid 1000001 alert")?;
            Ok(format!(
                "sid 1000001 from domain {} ({}) on {}",
                hit["xen"]["domid"],
                hit["xen"]["name"].as_str().unwrap_or("?"),
                hit["xen"]["vif"].as_str().unwrap_or("?")
            ))
        },
    )?;
    let ctl = control.clone();
    let t = Instant::now();
    tl.step(
        "policy ladder, step 1: guest2 throttled",
        t,
        Duration::from_secs(3),
        || {
            let q = quarantine_record(&ctl, &uuid_b)?;
            if q["actions"] == serde_json::json!(["throttle"]) {
                Ok(format!("actions {}, by {}", q["actions"], q["by"]))
            } else {
                Err(format!("actions {}", q["actions"]))
            }
        },
    )?;

    // 5. guest2 scans guest1: behaviour alert, ladder step 2 isolates it.
    let t = Instant::now();
    let answered = net::scan(&net::guest_ns(b), net::guest_v4(a), 9000..9040)
        .map_err(|e| LabError::Io(std::io::Error::other(e)))?;
    let ctl = control.clone();
    tl.step(
        "guest2 scans 40 ports of guest1: port-scan alert",
        t,
        Duration::from_secs(3),
        || {
            let r = call(&ctl, &ControlRequest::Alerts { after: 0 })?;
            let hit = r["alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["alert"]["gid"] == 9 && a["xen"]["domid"] == b)
                .ok_or(format!("no behaviour alert ({answered} ports answered)"))?;
            Ok(hit["alert"]["signature"]
                .as_str()
                .unwrap_or("?")
                .to_string())
        },
    )?;
    let ctl = control.clone();
    let uuid_b = specs[1].uuid.clone();
    let t = Instant::now();
    tl.step(
        "policy ladder, step 2: guest2 isolated, the others keep talking",
        t,
        Duration::from_secs(3),
        || {
            let q = quarantine_record(&ctl, &uuid_b)?;
            if !q["actions"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "isolate"))
            {
                return Err(format!("actions {}", q["actions"]));
            }
            if net::talk(&net::guest_ns(b), IpAddr::V4(net::guest_v4(a))).is_ok() {
                return Err("guest2 still reaches guest1".into());
            }
            net::talk(&net::guest_ns(a), IpAddr::V4(net::guest_v4(c)))?;
            net::talk(&net::guest_ns(c), IpAddr::V6(net::guest_v6(a)))?;
            Ok(format!(
                "actions {}; guest2 cut off; guest1 <-> guest3 fine",
                q["actions"]
            ))
        },
    )?;

    // 6. The operator releases guest2.
    let t = Instant::now();
    let rel = call(
        &control,
        &ControlRequest::Release {
            target: "guest2".into(),
            reason: "lab: investigated, false positive".into(),
            who: "virtsec lab".into(),
        },
    );
    let eve2 = eve.clone();
    tl.step(
        "operator releases guest2: traffic restored, audit record written",
        t,
        Duration::from_secs(3),
        || {
            rel.as_ref().map_err(|e| e.clone())?;
            net::talk(&net::guest_ns(b), IpAddr::V4(net::guest_v4(a)))?;
            let audit = std::fs::read_to_string(&eve2).unwrap_or_default();
            if !audit.lines().any(|l| {
                l.contains("\"event_type\":\"quarantine\"")
                    && l.contains("\"op\":\"release\"")
                    && l.contains("false positive")
            }) {
                return Err("no release audit record in the EVE file".into());
            }
            Ok("guest2 reaches guest1; EVE quarantine/release record".into())
        },
    )?;

    // 7. guest3 is destroyed: its vif, policy and inspection go.
    let t = Instant::now();
    ts.destroy(c)?;
    net::unplug(c);
    let ctl = control.clone();
    tl.step(
        "xl destroy guest3: vif, kernel policy and inspection removed",
        t,
        Duration::from_secs(3),
        || {
            let s = call(&ctl, &ControlRequest::Status)?;
            if s["inspection"].get("vif3.0").is_some() {
                return Err("vif3.0 still inspected".into());
            }
            if s["antispoof"].get("vif3.0").is_some() {
                return Err("vif3.0 still has anti-spoofing rules".into());
            }
            let d = call(&ctl, &ControlRequest::Domains { follow: false })?;
            let doms = d.as_array().cloned().unwrap_or_default();
            if doms.iter().any(|g| g["domid"] == c) {
                return Err("domain 3 still listed".into());
            }
            Ok(format!("{} guest(s) remain", doms.len()))
        },
    )?;

    let records = std::mem::take(&mut tl.records);
    let failed = records.iter().filter(|r| !r.ok).count();
    if !opts.json {
        println!(
            "virtsec lab: {} of {} steps passed",
            records.len() - failed,
            records.len()
        );
        if failed > 0 {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            println!("last lines of the virtsecd log:");
            for l in &lines[lines.len().saturating_sub(30)..] {
                println!("  {l}");
            }
        }
    }
    if opts.keep && !stop.load(Ordering::Relaxed) {
        let me = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "virtsec".into());
        println!("\nThe lab keeps running (Ctrl-C or `sudo {me} lab down` removes it). Try:");
        for c in [
            "status",
            "domains",
            "alerts",
            "quarantine guest1 --action isolate --reason test",
            "quarantined",
            "release guest1 --reason test",
        ] {
            println!("  sudo {me} --control-socket {} {c}", control.display());
        }
        println!(
            "  sudo ip netns exec {} ping 10.77.0.2     # a guest's shell: ip netns exec vslab-g<D> ...",
            net::guest_ns(1)
        );
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    drop(host);
    Ok(records)
}
