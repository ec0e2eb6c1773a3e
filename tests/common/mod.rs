//! Shared helpers of the integration tests: real processes (the lab xenstored, virtsecd, the
//! CLI, Debian's xenstore-utils) on private sockets in a temporary directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const VIRTSEC: &str = env!("CARGO_BIN_EXE_virtsec");
pub const VIRTSECD: &str = env!("CARGO_BIN_EXE_virtsecd");

/// Kills the child on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn sigkill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
    /// Asks for a clean stop (SIGTERM) and waits for the exit.
    pub fn sigterm(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.sigkill();
    }
}

pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts `virtsec lab xenstored` with domain sockets for `domids`.
pub fn lab_xenstored(dir: &Path, domids: &[u32]) -> Proc {
    let mut cmd = Command::new(VIRTSEC);
    cmd.args(["lab", "xenstored", "--socket"])
        .arg(dir.join("xs.sock"));
    for d in domids {
        cmd.arg("--domain-socket")
            .arg(format!("{d}={}", dir.join(format!("d{d}.sock")).display()));
    }
    let child = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn lab xenstored");
    let sock = dir.join("xs.sock");
    wait_for("lab xenstored socket", Duration::from_secs(5), || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    Proc(child)
}

/// Starts virtsecd on the lab socket and waits until its first reconcile is done.
pub fn virtsecd(dir: &Path) -> Proc {
    virtsecd_with(dir, None, "")
}

/// Starts virtsecd on the lab socket, inside network namespace `netns` if given, with `extra`
/// TOML sections appended to the test configuration, and waits until it is in sync.
pub fn virtsecd_with(dir: &Path, netns: Option<&str>, extra: &str) -> Proc {
    virtsecd_with_bin(dir, netns, extra, None)
}

/// [`virtsecd_with`], with `bin` first on the service's PATH (stand-ins for tools it runs).
pub fn virtsecd_with_bin(dir: &Path, netns: Option<&str>, extra: &str, bin: Option<&Path>) -> Proc {
    let cfg = dir.join("virtsecd.toml");
    // EVE output and quarantine state stay in the test's directory.
    let extra = if extra.contains("[inspect]") {
        extra.to_string()
    } else {
        format!(
            "{extra}\n[inspect]\neve = {:?}\n",
            dir.join("eve.json").display().to_string()
        )
    };
    let extra = if extra.contains("[quarantine]") {
        extra.to_string()
    } else {
        format!(
            "{extra}\n[quarantine]\nstate_dir = {:?}\n",
            dir.join("state").display().to_string()
        )
    };
    std::fs::write(
        &cfg,
        format!(
            "[xenstore]\npath = {:?}\nreconnect_min_ms = 20\nreconnect_max_ms = 200\ncounters_interval_s = 1\n[control]\nsocket = {:?}\n[log]\ntarget = \"stderr\"\nlevel = \"debug\"\n{extra}",
            dir.join("xs.sock").display().to_string(),
            dir.join("control.sock").display().to_string()
        ),
    )
    .unwrap();
    spawn_virtsecd(dir, &cfg, netns, bin)
}

/// Starts virtsecd with configuration `cfg` (whose control socket is `dir/control.sock`),
/// logging to `dir/virtsecd.log`, inside network namespace `netns` if given and with `bin`
/// first on its PATH (stand-ins for tools it runs); waits until it is in sync.
pub fn spawn_virtsecd(dir: &Path, cfg: &Path, netns: Option<&str>, bin: Option<&Path>) -> Proc {
    let log = std::fs::File::create(dir.join("virtsecd.log")).unwrap();
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, VIRTSECD]);
            c
        }
        None => Command::new(VIRTSECD),
    };
    if let Some(b) = bin {
        let path = std::env::var("PATH").unwrap_or_default();
        cmd.env("PATH", format!("{}:{path}", b.display()));
    }
    let child = cmd
        .arg("--config")
        .arg(cfg)
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn virtsecd");
    let p = Proc(child);
    wait_for("virtsecd in sync", Duration::from_secs(10), || {
        status(dir)
            .map(|s| s["xenstore"]["in_sync"] == true)
            .unwrap_or(false)
    });
    p
}

/// A network driver domain as dom0's toolstack creates it: a domain without vifs.
pub fn driver_domain_spec(domid: u32, name: &str) -> virtsec::lab::toolstack::GuestSpec {
    virtsec::lab::toolstack::GuestSpec {
        vifs: vec![],
        ..virtsec::lab::toolstack::GuestSpec::simple(domid, name, "-")
    }
}

/// `out`, after asserting that its command succeeded (its stderr otherwise).
#[track_caller]
pub fn succeeded(out: Output) -> Output {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the CLI with the test's control socket.
pub fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(VIRTSEC)
        .arg("--control-socket")
        .arg(dir.join("control.sock"))
        .args(args)
        .output()
        .expect("run virtsec")
}

pub fn status(dir: &Path) -> Option<serde_json::Value> {
    let out = cli(dir, &["status", "--json"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// `virtsec domains --json`, parsed.
pub fn domains(dir: &Path) -> serde_json::Value {
    let out = cli(dir, &["domains", "--json"]);
    assert!(
        out.status.success(),
        "virtsec domains failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("domains JSON")
}

pub fn guest(doms: &serde_json::Value, domid: u32) -> Option<serde_json::Value> {
    doms.as_array()?
        .iter()
        .find(|g| g["domid"] == domid)
        .cloned()
}

/// Polls `virtsec domains --json` until `pred` holds; returns how long it took.
pub fn follow(
    dir: &Path,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    let t = Instant::now();
    loop {
        let d = domains(dir);
        if pred(&d) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < timeout,
            "virtsec domains did not show {what} within {timeout:?}; last: {d:#}\nvirtsecd log:\n{}",
            std::fs::read_to_string(dir.join("virtsecd.log")).unwrap_or_default()
        );
    }
}

/// Debian's xenstore-utils binary `name`, run against `socket`.
pub fn xs_util(socket: &Path, name: &str, args: &[&str]) -> Output {
    let path = PathBuf::from("/usr/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: install Debian's xenstore-utils (apt-get install xenstore-utils); .ci/run does",
        path.display()
    );
    Command::new(path)
        .args(args)
        .env("XENSTORED_PATH", socket)
        .output()
        .expect("run xenstore util")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Network namespaces deleted on drop (also when a test fails).
pub struct Netns(pub Vec<String>);

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

/// Runs `ip ARGS`, failing the test if it fails.
pub fn ip(args: &[&str]) {
    let ok = Command::new("ip")
        .args(args)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "ip {args:?} failed (iproute2 installed? root?)");
}

/// A "driver domain" namespace `dd` and a guest namespace `guest` joined by a veth whose
/// backend end is named `vif` (in `dd`, left down and unaddressed) and whose guest end is
/// `eth0` with `addr` and `mac` (if given), up.
pub fn guest_behind_vif(dd: &str, guest: &str, vif: &str, addr: &str, mac: Option<&str>) {
    ip(&["netns", "add", guest]);
    ip(&[
        "-n", dd, "link", "add", vif, "type", "veth", "peer", "name", "eth0", "netns", guest,
    ]);
    if let Some(m) = mac {
        ip(&["-n", guest, "link", "set", "eth0", "address", m]);
    }
    ip(&["-n", guest, "addr", "add", addr, "dev", "eth0"]);
    ip(&["-n", guest, "link", "set", "eth0", "up"]);
}

/// A backend domain `vsd<tag><pid>` whose `vif5.0` has `<net>.1/24`, with a guest namespace
/// `vsg<tag><pid>` behind it at `<net>.2/24`; both namespaces go when the guard drops.
pub fn vif_and_guest(tag: &str, net: &str) -> (String, String, Netns) {
    let id = std::process::id();
    let (dd, g5) = (format!("vsd{tag}{id}"), format!("vsg{tag}{id}"));
    ip(&["netns", "add", &dd]);
    let guard = Netns(vec![dd.clone(), g5.clone()]);
    guest_behind_vif(&dd, &g5, "vif5.0", &format!("{net}.2/24"), None);
    let addr = format!("{net}.1/24");
    ip(&["-n", &dd, "addr", "add", &addr, "dev", "vif5.0"]);
    ip(&["-n", &dd, "link", "set", "vif5.0", "up"]);
    (dd, g5, guard)
}

/// Stops process `pid` (SIGSTOP) while guest namespace `guest` sends 6,000 UDP datagrams of
/// 1,400 bytes to `to` (port 9), then lets it run again; returns how many the guest sent.
pub fn datagrams_while_stopped(pid: u32, guest: &str, to: &str) -> u64 {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", guest, "python3", "-c"])
        .arg(format!(
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nn=0\n\
             for _ in range(6000):\n  n+=s.sendto(b'x'*1400,('{to}',9))>0\nprint(n)\n"
        ))
        .output();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    out.map(|o| stdout(&o).trim().parse().unwrap_or(0))
        .unwrap_or(0)
}

/// Waits until every one of `sent` datagrams was either read by the worker (`read()`, frames
/// since the stop) or counted as dropped by the kernel (`dropped()`, some of them); prints
/// the split and returns the drops.
pub fn every_datagram_read_or_dropped(
    what: &str,
    sent: u64,
    read: impl Fn() -> u64,
    dropped: impl Fn() -> u64,
) -> u64 {
    wait_for(
        "every datagram read by the worker or counted as dropped",
        Duration::from_secs(10),
        || {
            let d = dropped();
            d > 0 && read() + d >= sent
        },
    );
    let d = dropped();
    eprintln!(
        "{what}: sent {sent}, read {}, dropped in the kernel {d}",
        read()
    );
    d
}

/// Prints virtsecd's log (`dir/virtsecd.log`) if the test fails while this guard is alive.
pub struct LogOnPanic(pub PathBuf);

impl Drop for LogOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.0.join("virtsecd.log")).unwrap_or_default();
            eprintln!("--- virtsecd.log ---\n{log}--- end ---");
        }
    }
}

/// `ping -c 1 -W 1 ARGS` from namespace `ns`: whether a reply came back.
pub fn ping(ns: &str, args: &[&str]) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-c", "1", "-W", "1"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// What netback and `vif-bridge` make for a guest: namespace `ns` (created if missing) behind
/// a veth whose backend end `vif` is on `xenbr0` in `dd`; the guest end `eth0` has `mac` and
/// `addr` and is up.
pub fn bridged_guest(dd: &str, ns: &str, vif: &str, mac: &str, addr: &str) {
    if !Path::new(&format!("/run/netns/{ns}")).exists() {
        ip(&["netns", "add", ns]);
    }
    ip(&[
        "-n", dd, "link", "add", vif, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ]);
    ip(&["-n", dd, "link", "set", vif, "master", "xenbr0", "up"]);
    ip(&["-n", ns, "link", "set", "eth0", "address", mac]);
    ip(&["-n", ns, "addr", "add", addr, "dev", "eth0"]);
    ip(&["-n", ns, "link", "set", "eth0", "up"]);
}

/// Resident memory of process `pid`, kB.
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Serializes the tests of one test binary that measure timing (they run in parallel by
/// default and would load the same two CPUs). Poisoning is ignored: a failed test must not
/// fail the next one.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A simulated backend domain: network namespace `dd` with bridge `xenbr0` up, holding host
/// address `addr` (CIDR) if given.
pub fn bridge_domain(dd: &str, addr: Option<&str>) {
    ip(&["netns", "add", dd]);
    ip(&["-n", dd, "link", "add", "xenbr0", "type", "bridge"]);
    if let Some(a) = addr {
        ip(&["-n", dd, "addr", "add", a, "dev", "xenbr0"]);
    }
    ip(&["-n", dd, "link", "set", "xenbr0", "up"]);
}

/// The lab XenStore in `dir` and the simulated toolstack on it, host nodes written.
pub fn lab_toolstack(dir: &Path) -> (Proc, virtsec::lab::toolstack::Toolstack) {
    let xs = lab_xenstored(dir, &[]);
    let client = virtsec::xenstore::Client::open(dir.join("xs.sock")).expect("lab xenstored");
    let mut ts = virtsec::lab::toolstack::Toolstack::new(client);
    ts.init_host().expect("host nodes");
    (xs, ts)
}

/// Guest `domid` (< 10) with one vif on `xenbr0`, MAC `00:16:3e:00:0<domid>:00` and address
/// `<net>.<domid>` in the toolstack's keys.
pub fn bridged_spec(domid: u32, name: &str, net: &str) -> virtsec::lab::toolstack::GuestSpec {
    let mut g = virtsec::lab::toolstack::GuestSpec::simple(domid, name, "xenbr0");
    g.vifs[0].mac = format!("00:16:3e:00:0{domid}:00");
    g.vifs[0].ip = Some(format!("{net}.{domid}"));
    g
}

/// A stand-in `xl` in `dir/bin` (created if missing, replaced if there) that appends its
/// arguments to `dir/xl.log`, then runs the shell lines `then`. Returns the `bin` directory
/// (to put first on virtsecd's PATH) and the log.
pub fn stand_in_xl(dir: &Path, then: &str) -> (PathBuf, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let log = dir.join("xl.log");
    let xl = bin.join("xl");
    std::fs::write(
        &xl,
        format!("#!/bin/sh\necho \"$*\" >> {}\n{then}\n", log.display()),
    )
    .unwrap();
    std::fs::set_permissions(&xl, std::fs::Permissions::from_mode(0o755)).unwrap();
    (bin, log)
}
