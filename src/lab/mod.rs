//! `virtsec lab`: a simulated Xen host on one machine, and the default scenario that shows
//! virtsec following it.
//!
//! The lab runs the lab xenstored (a thread of this process, the same server as `virtsec lab
//! xenstored`), a simulated toolstack writing XenStore as libxl does ([`toolstack`]), one
//! domain socket per guest so guests write their own frontend nodes with their own
//! permissions, and a real `virtsecd` process pointed at it. Every step of the scenario is
//! checked against what `virtsecd` reports through its control socket; the run fails if any
//! expected effect does not happen in time.
//!
//! Two scenarios: `default` ([`scenario`], root) adds the network (namespaces, a bridge,
//! `vif<D>.0` veths, real traffic) and the whole service (inspection, anti-spoofing,
//! quarantine); `xenstore` (this file, no root needed) follows the XenStore side alone.

pub mod net;
pub mod scenario;
pub mod toolstack;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::control::{self, ControlRequest};
use crate::labxs::{LabServerHandle, Limits, ServerConfig};
use crate::xenstore::Client;
use toolstack::{GuestSpec, Toolstack, VifSpec};

/// Options of `virtsec lab`.
#[derive(Clone, Debug)]
pub struct LabOptions {
    pub guests: u32,
    pub run_dir: PathBuf,
    pub json: bool,
    pub virtsecd: PathBuf,
    /// How long each step may take to be reflected.
    pub step_timeout: Duration,
    /// Leave the host running after the scenario (until Ctrl-C or `virtsec lab down`).
    pub keep: bool,
}

/// One step of the timeline.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    pub step: usize,
    pub name: String,
    pub ok: bool,
    /// Time from the toolstack's last write to virtsecd reporting the expected state.
    pub ms: f64,
    pub detail: String,
}

/// Errors that stop the lab before or between steps.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Server(#[from] crate::labxs::LabServerError),
    #[error("XenStore operation failed: {0}")]
    Xs(#[from] crate::xenstore::XsError),
    #[error("cannot start {path}: {source}. Build it first (cargo build --release)")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lab setup failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("interrupted")]
    Interrupted,
    #[error("virtsecd did not become ready within {0:?}; see {1}")]
    NotReady(Duration, PathBuf),
    #[error("a lab is already running (pid {0}, {1}); stop it with `sudo virtsec lab down`")]
    Running(i32, PathBuf),
    #[error(transparent)]
    Net(#[from] net::NetError),
}

/// Prints one step of a timeline: a JSON line, or the human table row.
fn print_step(json: bool, r: &StepRecord) {
    if json {
        if let Ok(line) = serde_json::to_string(r) {
            println!("{line}");
        }
    } else {
        println!(
            "[{:>2}] {} {:<62} {:>7.1} ms  {}",
            r.step,
            if r.ok { "PASS" } else { "FAIL" },
            r.name,
            r.ms,
            r.detail
        );
    }
}

/// Stops a child the lab started: SIGTERM, up to 3 s to exit, then SIGKILL.
fn stop_child(mut child: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Default run directory: `/run/virtsec-lab` as root, else under the user's runtime dir.
pub fn default_run_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/run/virtsec-lab")
    } else if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        Path::new(&d).join("virtsec-lab")
    } else {
        std::env::temp_dir().join(format!("virtsec-lab-{}", nix::unistd::geteuid()))
    }
}

/// Everything the lab started; dropping it tears it all down (also after a failure).
struct Host {
    server: Option<LabServerHandle>,
    daemon: Option<Child>,
    run_dir: PathBuf,
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(child) = self.daemon.take() {
            stop_child(child);
        }
        if let Some(s) = self.server.take() {
            let _ = s.stop();
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

struct Scenario<'a> {
    opts: &'a LabOptions,
    control: PathBuf,
    records: Vec<StepRecord>,
    stop: Arc<AtomicBool>,
}

fn domains(control: &Path) -> Option<serde_json::Value> {
    control::call(control, &ControlRequest::Domains { follow: false }).ok()
}

fn find_guest(doms: &serde_json::Value, domid: u32) -> Option<&serde_json::Value> {
    doms.as_array()?
        .iter()
        .find(|g| g["domid"].as_u64() == Some(domid as u64))
}

impl Scenario<'_> {
    /// Polls virtsecd until `check` holds, records the step.
    fn expect(
        &mut self,
        name: &str,
        started: Instant,
        check: impl Fn(&serde_json::Value, &serde_json::Value) -> Result<String, String>,
    ) -> Result<bool, LabError> {
        let deadline = Instant::now() + self.opts.step_timeout;
        let mut last = String::from("no answer from virtsecd");
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(LabError::Interrupted);
            }
            let status = control::call(&self.control, &ControlRequest::Status).ok();
            if let (Some(d), Some(s)) = (domains(&self.control), status) {
                match check(&d, &s) {
                    Ok(detail) => {
                        let ms = started.elapsed().as_secs_f64() * 1e3;
                        self.record(name, true, ms, detail);
                        return Ok(true);
                    }
                    Err(why) => last = why,
                }
            }
            if Instant::now() >= deadline {
                let ms = started.elapsed().as_secs_f64() * 1e3;
                self.record(name, false, ms, last);
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(2));
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
        print_step(self.opts.json, &r);
        self.records.push(r);
    }
}

fn vif_state(g: &serde_json::Value, devid: u32) -> Option<(&str, &str)> {
    let v = &g["vifs"][devid.to_string()];
    Some((v["state"].as_str()?, v["hotplug_status"].as_str()?))
}

/// Runs the XenStore-only scenario. Returns the step records; the caller exits non-zero if
/// any failed.
pub fn run_xenstore(opts: &LabOptions) -> Result<Vec<StepRecord>, LabError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let run_dir = opts.run_dir.clone();
    let xs_sock = run_dir.join("xenstored.sock");
    // Refuse to start over a running lab before touching anything.
    if std::os::unix::net::UnixStream::connect(&xs_sock).is_ok() {
        return Err(crate::labxs::LabServerError::InUse(xs_sock).into());
    }
    std::fs::create_dir_all(&run_dir)?;
    let guests: Vec<GuestSpec> = (1..=opts.guests)
        .map(|i| {
            let mut g = GuestSpec::simple(i, &format!("guest{i}"), "xenbr0");
            g.vifs[0].ip = Some(format!("192.0.2.{i} 2001:db8::{i:x}"));
            g
        })
        .collect();
    let dom_socks: Vec<(u32, PathBuf)> = guests
        .iter()
        .map(|g| (g.domid, run_dir.join(format!("dom{}.sock", g.domid))))
        .collect();
    let mut host = Host {
        server: None,
        daemon: None,
        run_dir: run_dir.clone(),
    };
    host.server = Some(LabServerHandle::spawn(ServerConfig {
        socket: xs_sock.clone(),
        domain_sockets: dom_socks.clone(),
        limits: Limits::default(),
    })?);
    let mut ts = Toolstack::new(Client::open(&xs_sock)?);
    ts.init_host()?;

    let control = run_dir.join("control.sock");
    let cfg_path = run_dir.join("virtsecd.toml");
    std::fs::write(
        &cfg_path,
        format!(
            "[xenstore]\npath = {:?}\n[control]\nsocket = {:?}\n[log]\ntarget = \"stderr\"\nlevel = \"info\"\n",
            xs_sock.display().to_string(),
            control.display().to_string()
        ),
    )?;
    let log_path = run_dir.join("virtsecd.log");
    let log_file = std::fs::File::create(&log_path)?;
    let child = Command::new(&opts.virtsecd)
        .arg("--config")
        .arg(&cfg_path)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .map_err(|source| LabError::Spawn {
            path: opts.virtsecd.clone(),
            source,
        })?;
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
            "virtsec lab: simulated Xen host in {} (lab xenstored, {} guest(s), virtsecd pid {})",
            run_dir.display(),
            guests.len(),
            host.daemon.as_ref().map(|c| c.id()).unwrap_or(0)
        );
        println!("Each step: what the toolstack or a guest did, checked against `virtsec domains`/`status`; ms = until virtsecd reported it.");
    }
    let mut sc = Scenario {
        opts,
        control: control.clone(),
        records: Vec::new(),
        stop: stop.clone(),
    };
    let mut guest_conns: Vec<Client> = Vec::new();
    for (_, p) in &dom_socks {
        guest_conns.push(Client::open(p)?);
    }

    // 1. Guests boot as `xl create` would make them.
    for (g, conn) in guests.iter().zip(guest_conns.iter_mut()) {
        let t = Instant::now();
        ts.create(g, Some(conn))?;
        let (d, name, uuid, mac) = (
            g.domid,
            g.name.clone(),
            g.uuid.clone(),
            g.vifs[0].mac.clone(),
        );
        sc.expect(
            &format!("xl create {name}: domain {d} and vif{d}.0 connected"),
            t,
            |doms, _| {
                let guest = find_guest(doms, d).ok_or("guest not listed")?;
                if guest["name"] != name.as_str() || guest["uuid"] != uuid.as_str() {
                    return Err(format!("identity {} {}", guest["name"], guest["uuid"]));
                }
                let v = &guest["vifs"]["0"];
                if v["mac"] != mac.as_str() || v["ifname"] != format!("vif{d}.0").as_str() {
                    return Err(format!("vif {v}"));
                }
                match vif_state(guest, 0) {
                    Some(("connected", "connected")) => Ok(format!(
                        "uuid {uuid}, {} mac {mac}, bridge xenbr0",
                        v["ifname"].as_str().unwrap_or("")
                    )),
                    other => Err(format!("vif state {other:?}")),
                }
            },
        )?;
    }

    // 2. A guest writes nonsense into its own frontend: nothing trusted changes.
    if let Some(first) = guests.first() {
        let d = first.domid;
        let before = domains(&control).unwrap_or_default();
        let writes_before = control::call(&control, &ControlRequest::Status)
            .map(|s| {
                s["warnings"]["untrusted_frontend_writes"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        let t = Instant::now();
        let fe = "device/vif/0";
        let conn = &mut guest_conns[0];
        conn.write(&format!("{fe}/mac"), "de:ad:be:ef:00:01")?;
        conn.write(&format!("{fe}/backend"), "/local/domain/0/backend/vif/99/0")?;
        conn.write(&format!("{fe}/handle"), "77")?;
        sc.expect(
            &format!("guest{d} forges its frontend mac/backend/handle: ignored"),
            t,
            |doms, status| {
                let n = status["warnings"]["untrusted_frontend_writes"]
                    .as_u64()
                    .unwrap_or(0);
                if n < writes_before + 3 {
                    return Err(format!("{n} untrusted writes counted"));
                }
                if find_guest(doms, d) != find_guest(&before, d) {
                    return Err("inventory changed".into());
                }
                Ok(format!(
                    "{} untrusted writes counted, inventory unchanged",
                    n - writes_before
                ))
            },
        )?;
    }

    // 3. Hot-plug a second vif, then detach it.
    if let Some(first) = guests.first() {
        let d = first.domid;
        let v = VifSpec::pv(d, 1, "xenbr0");
        let t = Instant::now();
        ts.add_vif(d, &v)?;
        ts.connect_vif(d, 1, Some(&mut guest_conns[0]))?;
        sc.expect(
            &format!("xl network-attach guest{d}: vif{d}.1 appears"),
            t,
            |doms, _| {
                let g = find_guest(doms, d).ok_or("guest gone")?;
                match vif_state(g, 1) {
                    Some(("connected", "connected")) => Ok(format!("vif{d}.1 connected")),
                    other => Err(format!("vif1 {other:?}")),
                }
            },
        )?;
        let t = Instant::now();
        ts.remove_vif(d, 1)?;
        sc.expect(
            &format!("xl network-detach guest{d} 1: vif{d}.1 gone"),
            t,
            |doms, _| {
                let g = find_guest(doms, d).ok_or("guest gone")?;
                if g["vifs"].get("1").is_some() {
                    return Err("vif1 still listed".into());
                }
                Ok("detached".into())
            },
        )?;
    }

    // 4. The last guest is destroyed.
    if let Some(last) = guests.last() {
        let d = last.domid;
        let t = Instant::now();
        ts.destroy(d)?;
        let remaining = guests.len() - 1;
        sc.expect(
            &format!("xl destroy guest{d}: domain {d} gone"),
            t,
            |doms, _| {
                if find_guest(doms, d).is_some() {
                    return Err("still listed".into());
                }
                let n = doms.as_array().map(Vec::len).unwrap_or(0);
                if n != remaining {
                    return Err(format!("{n} guests listed"));
                }
                Ok(format!("{remaining} guest(s) remain"))
            },
        )?;
    }

    // 5. A domid is reused by a new VM: new identity, nothing inherited.
    if let Some(last) = guests.last() {
        let d = last.domid;
        let mut g = GuestSpec::simple(d, "reuse", "xenbr0");
        g.uuid = format!("5e1ab000-0000-4000-8000-{:012x}", 0xbeef_u32);
        let t = Instant::now();
        let conn = guest_conns.last_mut();
        ts.create(&g, conn)?;
        let uuid = g.uuid.clone();
        sc.expect(
            &format!("domid {d} reused by VM 'reuse': new identity"),
            t,
            |doms, _| {
                let guest = find_guest(doms, d).ok_or("not listed")?;
                if guest["uuid"] != uuid.as_str() || guest["name"] != "reuse" {
                    return Err(format!("identity {} {}", guest["name"], guest["uuid"]));
                }
                Ok(format!("uuid {uuid}"))
            },
        )?;
    }

    let status = control::call(&control, &ControlRequest::Status).ok();
    if !opts.json {
        let passed = sc.records.iter().filter(|r| r.ok).count();
        println!("virtsec lab: {passed} of {} steps passed", sc.records.len());
        if passed != sc.records.len() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            println!("last lines of the virtsecd log:");
            for l in &lines[lines.len().saturating_sub(30)..] {
                println!("  {l}");
            }
        }
        if let Some(s) = status {
            println!(
                "virtsecd: {} guests, {} vifs, {} reconcile passes, last {:.2} ms",
                s["guests"],
                s["vifs"],
                s["xenstore"]["reconciles"],
                s["xenstore"]["last_reconcile_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
    let records = std::mem::take(&mut sc.records);
    drop(host);
    Ok(records)
}
