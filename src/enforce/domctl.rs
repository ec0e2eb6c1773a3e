//! Domain control for quarantine: pausing and unpausing a domain, detaching a vif.
//!
//! dom0 pauses through libxenctrl (`xc_domain_pause`), loaded with `dlopen` so the binary
//! runs (and its tests pass) where Xen is absent; without the library the toolstack's `xl` is
//! used. Xen's pause is reference-counted per caller: the quarantine manager records which
//! domid it paused and unpauses exactly once. Detaching goes through the toolstack
//! (`xl network-detach`), which removes the backend as libxl does.

use std::ffi::c_void;
use std::process::{Command, Stdio};

/// Errors controlling a domain.
#[derive(Debug, thiserror::Error)]
pub enum DomCtlError {
    #[error("no way to {what} domain {domid}: libxenctrl is not loadable and xl is not installed (pause and detach need Xen's toolstack in dom0)")]
    Unavailable { what: &'static str, domid: u32 },
    #[error("{how} could not {what} domain {domid}: {detail}")]
    Failed {
        how: &'static str,
        what: &'static str,
        domid: u32,
        detail: String,
    },
}

/// What quarantine needs from the hypervisor and toolstack.
pub trait DomainControl: Send {
    fn pause(&mut self, domid: u32) -> Result<(), DomCtlError>;
    fn unpause(&mut self, domid: u32) -> Result<(), DomCtlError>;
    fn detach_vif(&mut self, domid: u32, devid: u32) -> Result<(), DomCtlError>;
    /// How it acts (`xenctrl`, `xl`, `none`), for status and audit records.
    fn how(&self) -> &'static str;
    /// How the background detaches that ended since the last call went.
    fn take_reports(&mut self) -> Vec<DetachReport> {
        Vec::new()
    }
}

/// How a background `xl network-detach` ended, for the quarantine audit trail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DetachReport {
    pub domid: u32,
    pub devid: u32,
    /// Tries made (1 when the first succeeded).
    pub tries: u32,
    /// `None` when the toolstack detached the vif, else why it did not.
    pub error: Option<String>,
}

/// Where background detaches leave their [`DetachReport`]s, and how they wake the owner's
/// event loop to read them.
#[derive(Clone, Default)]
pub struct Reports {
    queue: std::sync::Arc<std::sync::Mutex<Vec<DetachReport>>>,
    wake: Option<std::sync::Arc<dyn Fn() + Send + Sync>>,
}

impl Reports {
    /// Reports that call `wake` after each one arrives.
    pub fn waking(wake: std::sync::Arc<dyn Fn() + Send + Sync>) -> Reports {
        Reports {
            queue: Default::default(),
            wake: Some(wake),
        }
    }

    fn push(&self, r: DetachReport) {
        match self.queue.lock() {
            Ok(mut q) => q.push(r),
            // (a thread panicked holding it; the outcome is in the log already)
            Err(_) => return,
        }
        if let Some(w) = &self.wake {
            w();
        }
    }

    fn take(&self) -> Vec<DetachReport> {
        self.queue
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default()
    }
}

type XcOpen = unsafe extern "C" fn(*mut c_void, *mut c_void, u32) -> *mut c_void;
type XcDom = unsafe extern "C" fn(*mut c_void, u32) -> i32;

/// libxenctrl through dlopen.
pub struct XenCtrl {
    /// Detaching goes through the toolstack.
    xl: Xl,
    _lib: libloading::Library,
    xch: *mut c_void,
    pause: XcDom,
    unpause: XcDom,
}

// SAFETY: the xc handle is used from one thread at a time (`&mut self`); libxenctrl handles
// may move between threads.
unsafe impl Send for XenCtrl {}

impl XenCtrl {
    /// Loads libxenctrl and opens a handle (needs /dev/xen/privcmd, i.e. dom0).
    pub fn open(reports: Reports) -> Option<XenCtrl> {
        for name in ["libxenctrl.so", "libxenctrl.so.4.17", "libxenctrl.so.4.16"] {
            // SAFETY: loading a system library; its initialisers are Xen's own.
            let Ok(lib) = (unsafe { libloading::Library::new(name) }) else {
                continue;
            };
            // SAFETY: the symbols have these C signatures in every libxenctrl since 4.x.
            let syms = unsafe {
                (
                    lib.get::<XcOpen>(b"xc_interface_open\0").map(|s| *s),
                    lib.get::<XcDom>(b"xc_domain_pause\0").map(|s| *s),
                    lib.get::<XcDom>(b"xc_domain_unpause\0").map(|s| *s),
                )
            };
            let (Ok(open), Ok(pause), Ok(unpause)) = syms else {
                continue;
            };
            // SAFETY: NULL loggers are allowed; the result is checked.
            let xch = unsafe { open(std::ptr::null_mut(), std::ptr::null_mut(), 0) };
            if xch.is_null() {
                return None;
            }
            return Some(XenCtrl {
                xl: Xl { reports },
                _lib: lib,
                xch,
                pause,
                unpause,
            });
        }
        None
    }

    fn call(&mut self, f: XcDom, what: &'static str, domid: u32) -> Result<(), DomCtlError> {
        // SAFETY: `xch` is the live handle opened above; domid is plain data.
        let rc = unsafe { f(self.xch, domid) };
        if rc == 0 {
            Ok(())
        } else {
            Err(DomCtlError::Failed {
                how: "libxenctrl",
                what,
                domid,
                detail: std::io::Error::last_os_error().to_string(),
            })
        }
    }
}

impl DomainControl for XenCtrl {
    fn pause(&mut self, domid: u32) -> Result<(), DomCtlError> {
        let f = self.pause;
        self.call(f, "pause", domid)
    }
    fn unpause(&mut self, domid: u32) -> Result<(), DomCtlError> {
        let f = self.unpause;
        self.call(f, "unpause", domid)
    }
    fn detach_vif(&mut self, domid: u32, devid: u32) -> Result<(), DomCtlError> {
        self.xl.detach_vif(domid, devid)
    }
    fn how(&self) -> &'static str {
        "xenctrl"
    }
    fn take_reports(&mut self) -> Vec<DetachReport> {
        self.xl.take_reports()
    }
}

/// The `xl` toolstack.
#[derive(Default)]
pub struct Xl {
    reports: Reports,
}

/// How often the service runs `xl network-detach` for one vif before it gives up, and how
/// long it waits between tries. libxl gives the backend domain 10 s per try, so a vif whose
/// backend domain never removes it is given up after about a minute.
const DETACH_TRIES: u32 = 5;
const DETACH_RETRY: std::time::Duration = std::time::Duration::from_secs(3);

/// Runs `<program> network-detach <domid> <devid>` until it succeeds, at most `tries` times,
/// `delay` apart; `first` is the already started first try. Each failure but the last is
/// logged as a warning; the report says how it ended.
fn detach_until_done(
    program: &std::ffi::OsStr,
    first: std::process::Child,
    domid: u32,
    devid: u32,
    tries: u32,
    delay: std::time::Duration,
) -> DetachReport {
    let report = |tries, error| DetachReport {
        domid,
        devid,
        tries,
        error,
    };
    let mut child = Ok(first);
    let mut attempt = 1;
    loop {
        let o = match child.and_then(|c| c.wait_with_output()) {
            Ok(o) => o,
            Err(e) => return report(attempt, Some(format!("cannot run xl: {e}"))),
        };
        if o.status.success() {
            return report(attempt, None);
        }
        let why = String::from_utf8_lossy(&o.stderr).trim().to_string();
        if attempt >= tries {
            return report(attempt, Some(why));
        }
        log::warn!(
            "quarantine: xl could not detach vif {devid} of domain {domid} (try {attempt} of {tries}), trying again in {} s: {why}",
            delay.as_secs_f32()
        );
        std::thread::sleep(delay);
        child = spawn_detach(program, domid, devid);
        attempt += 1;
    }
}

fn spawn_detach(
    program: &std::ffi::OsStr,
    domid: u32,
    devid: u32,
) -> std::io::Result<std::process::Child> {
    Command::new(program)
        .args(["network-detach", &domid.to_string(), &devid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
}

fn xl(args: &[String], what: &'static str, domid: u32) -> Result<(), DomCtlError> {
    let out = Command::new("xl")
        .args(args)
        .output()
        .map_err(|_| DomCtlError::Unavailable { what, domid })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DomCtlError::Failed {
            how: "xl",
            what,
            domid,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

impl DomainControl for Xl {
    fn pause(&mut self, domid: u32) -> Result<(), DomCtlError> {
        xl(&["pause".into(), domid.to_string()], "pause", domid)
    }
    fn unpause(&mut self, domid: u32) -> Result<(), DomCtlError> {
        xl(&["unpause".into(), domid.to_string()], "unpause", domid)
    }
    fn detach_vif(&mut self, domid: u32, devid: u32) -> Result<(), DomCtlError> {
        // `xl network-detach` waits for the guest's frontend to close: seconds, up to libxl's
        // timeout when the guest does not answer (1.6 s in the real-Xen harness). It runs in
        // the background so the service's event loop (XenStore, new vifs' policy, the
        // control socket) does not wait with it; its outcome is logged when it ends.
        let program = std::ffi::OsStr::new("xl");
        let child = spawn_detach(program, domid, devid).map_err(|_| DomCtlError::Unavailable {
            what: "detach a vif of",
            domid,
        })?;
        // libxl gives the backend domain 10 s to remove its backend. A busy driver domain
        // can take longer (seen under emulation: netdd's `xl devd` removed it 10-25 s late):
        // libxl then reports failure and keeps the vif in its records (`xl network-list`).
        // Another `xl network-detach` a few seconds later finds the backend gone and
        // completes the removal, so the service tries until one succeeds (bounded).
        let reports = self.reports.clone();
        let report = move |first| {
            let r = detach_until_done(program, first, domid, devid, DETACH_TRIES, DETACH_RETRY);
            match (&r.error, r.tries) {
                (None, 1) => log::info!(
                    "quarantine: vif {devid} of domain {domid} detached (xl network-detach)"
                ),
                (None, n) => log::info!(
                    "quarantine: vif {devid} of domain {domid} detached (xl network-detach) on try {n}"
                ),
                (Some(why), n) => log::error!(
                    "quarantine: xl could not detach vif {devid} of domain {domid} in {n} tries, gave up: {why}"
                ),
            }
            reports.push(r);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("xl network-detach".into())
            .spawn(move || report(child))
        {
            // (the detach goes on; only its outcome is not reported)
            log::warn!("quarantine: cannot follow xl network-detach {domid} {devid}: {e}");
        }
        Ok(())
    }
    fn how(&self) -> &'static str {
        "xl"
    }
    fn take_reports(&mut self) -> Vec<DetachReport> {
        self.reports.take()
    }
}

/// No Xen here (the lab): pause and detach are refused with a clear error.
pub struct NoXen;

impl DomainControl for NoXen {
    fn pause(&mut self, domid: u32) -> Result<(), DomCtlError> {
        Err(DomCtlError::Unavailable {
            what: "pause",
            domid,
        })
    }
    fn unpause(&mut self, domid: u32) -> Result<(), DomCtlError> {
        Err(DomCtlError::Unavailable {
            what: "unpause",
            domid,
        })
    }
    fn detach_vif(&mut self, domid: u32, _devid: u32) -> Result<(), DomCtlError> {
        Err(DomCtlError::Unavailable {
            what: "detach a vif of",
            domid,
        })
    }
    fn how(&self) -> &'static str {
        "none"
    }
}

/// One domain-control operation, as a network driver domain asks dom0's service for it
/// (`quarantine::delegate`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum DomainOp {
    Pause { domid: u32 },
    Unpause { domid: u32 },
    Detach { domid: u32, devid: u32 },
}

impl DomainOp {
    pub fn domid(&self) -> u32 {
        match self {
            DomainOp::Pause { domid }
            | DomainOp::Unpause { domid }
            | DomainOp::Detach { domid, .. } => *domid,
        }
    }

    /// Runs it with `ctl`.
    pub fn run(&self, ctl: &mut dyn DomainControl) -> Result<(), DomCtlError> {
        match *self {
            DomainOp::Pause { domid } => ctl.pause(domid),
            DomainOp::Unpause { domid } => ctl.unpause(domid),
            DomainOp::Detach { domid, devid } => ctl.detach_vif(domid, devid),
        }
    }
}

impl std::fmt::Display for DomainOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DomainOp::Pause { domid } => write!(f, "pause domain {domid}"),
            DomainOp::Unpause { domid } => write!(f, "unpause domain {domid}"),
            DomainOp::Detach { domid, devid } => write!(f, "detach vif {devid} of domain {domid}"),
        }
    }
}

/// A network driver domain: pause and detach are asked of dom0's virtsec. Each operation is
/// queued for the daemon, which writes it to dom0's request directory for this domain
/// (`quarantine::delegate`); dom0's answer is logged when it comes.
pub struct Dom0 {
    outbox: std::sync::Arc<std::sync::Mutex<Vec<DomainOp>>>,
}

impl Dom0 {
    /// The control and the queue the daemon drains.
    #[allow(clippy::type_complexity)]
    pub fn new() -> (Dom0, std::sync::Arc<std::sync::Mutex<Vec<DomainOp>>>) {
        let q = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        (Dom0 { outbox: q.clone() }, q)
    }

    fn ask(&mut self, op: DomainOp) -> Result<(), DomCtlError> {
        match self.outbox.lock() {
            Ok(mut q) => {
                q.push(op);
                Ok(())
            }
            Err(_) => Err(DomCtlError::Unavailable {
                what: "ask dom0 to act on",
                domid: op.domid(),
            }),
        }
    }
}

impl DomainControl for Dom0 {
    fn pause(&mut self, domid: u32) -> Result<(), DomCtlError> {
        self.ask(DomainOp::Pause { domid })
    }
    fn unpause(&mut self, domid: u32) -> Result<(), DomCtlError> {
        self.ask(DomainOp::Unpause { domid })
    }
    fn detach_vif(&mut self, domid: u32, devid: u32) -> Result<(), DomCtlError> {
        self.ask(DomainOp::Detach { domid, devid })
    }
    fn how(&self) -> &'static str {
        "dom0"
    }
}

/// `[quarantine] domain_control`: "auto" tries libxenctrl, then xl, then none. ("dom0" is
/// built by the daemon with [`Dom0::new`], which also returns its queue.)
pub fn open(choice: &str, reports: Reports) -> Box<dyn DomainControl> {
    let has_xl = || {
        Command::new("xl")
            .arg("help")
            .output()
            .map(|o| o.status.success() || !o.stdout.is_empty())
            .unwrap_or(false)
    };
    match choice {
        "xl" => Box::new(Xl { reports }),
        "none" => Box::new(NoXen),
        "xenctrl" => match XenCtrl::open(reports) {
            Some(x) => Box::new(x),
            None => Box::new(NoXen),
        },
        _ => {
            if let Some(x) = XenCtrl::open(reports.clone()) {
                Box::new(x)
            } else if has_xl() {
                Box::new(Xl { reports })
            } else {
                Box::new(NoXen)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    /// A stand-in `xl` that records each call and fails until its `succeed_on`-th call
    /// (never when 0), with libxl's timeout message on stderr.
    fn fake_xl(dir: &std::path::Path, succeed_on: u32) -> std::path::PathBuf {
        let calls = dir.join("calls");
        let prog = dir.join("xl");
        std::fs::write(
            &prog,
            format!(
                "#!/bin/sh\necho \"$*\" >> {calls}\nn=$(wc -l < {calls})\n\
                 [ {succeed_on} -ne 0 ] && [ \"$n\" -ge {succeed_on} ] && exit 0\n\
                 echo \"libxl: error: timed out while waiting for backend to be removed (call $n)\" >&2\nexit 1\n",
                calls = calls.display()
            ),
        )
        .expect("write the fake xl");
        std::fs::set_permissions(&prog, std::fs::Permissions::from_mode(0o755))
            .expect("make the fake xl executable");
        prog
    }

    fn calls(dir: &std::path::Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Detaches vif `devid` of `domid` through a stand-in xl that succeeds on call
    /// `succeed_on` (never when 0): the report and the calls xl received.
    fn detach_with(
        succeed_on: u32,
        domid: u32,
        devid: u32,
        tries: u32,
        delay: Duration,
    ) -> (DetachReport, Vec<String>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let xl = fake_xl(dir.path(), succeed_on);
        let first = spawn_detach(xl.as_os_str(), domid, devid).expect("run the fake xl");
        let report = detach_until_done(xl.as_os_str(), first, domid, devid, tries, delay);
        (report, calls(dir.path()))
    }

    #[test]
    fn a_slow_backend_domain_is_waited_for_with_more_tries() {
        let (outcome, calls) = detach_with(3, 7, 1, 5, Duration::from_millis(10));
        assert_eq!((outcome.tries, outcome.error), (3, None));
        assert_eq!(calls, vec!["network-detach 7 1"; 3]);
    }

    #[test]
    fn detach_gives_up_after_its_last_try_with_the_last_reason() {
        let (outcome, calls) = detach_with(0, 9, 0, 4, Duration::from_millis(10));
        assert_eq!(
            outcome,
            DetachReport {
                domid: 9,
                devid: 0,
                tries: 4,
                error: Some(
                    "libxl: error: timed out while waiting for backend to be removed (call 4)"
                        .into()
                )
            }
        );
        assert_eq!(calls.len(), 4);
    }

    #[test]
    fn a_detach_that_succeeds_at_once_runs_xl_once() {
        let (outcome, calls) = detach_with(1, 3, 0, 5, Duration::from_secs(30));
        assert_eq!((outcome.tries, outcome.error), (1, None));
        assert_eq!(calls.len(), 1);
    }
}
