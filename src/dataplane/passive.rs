//! A passive worker: one capture socket on the vif (in the vif's fanout group when the vif
//! has several workers), read through its receive queue or a TPACKET_V3 ring
//! (`[inspect] capture`, `capture` module docs), nothing added to the guest's path.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Inspector;
use crate::capture::{self, CaptureError, Source, SourceKind};

/// How a passive worker reads its vif (`[inspect] capture`, `ring_mib` or `queue_mib`,
/// `block_timeout_ms`).
#[derive(Clone, Copy, Debug)]
pub(super) struct CaptureOptions {
    pub kind: SourceKind,
    /// The ring's size, or the most the queue holds, MiB.
    pub mib: usize,
    /// The ring's block timeout, ms; for the queue, the longest a frame waits while frames
    /// come.
    pub block_ms: u32,
}

pub(super) fn run(ins: Inspector, fanout: Option<u16>, opts: CaptureOptions) {
    if let Some(src) = open(&ins, opts, fanout) {
        inspect(ins, src, opts.kind);
    }
}

/// Opens the worker's source; netback creates the netdev after the backend appears in
/// XenStore, so a missing interface is waited for. `None`: stopped, or it cannot be opened
/// (logged).
fn open(ins: &Inspector, opts: CaptureOptions, fanout: Option<u16>) -> Option<Box<dyn Source>> {
    let vif = &ins.vif;
    loop {
        if vif.stopping() {
            return None;
        }
        match capture::open_source(opts.kind, &vif.ifname, opts.mib, opts.block_ms, fanout) {
            Ok(s) => return Some(s),
            Err(CaptureError::NoInterface(_)) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                log::error!("{}: {e}", vif.ifname);
                return None;
            }
        }
    }
}

fn inspect(mut ins: Inspector, mut src: Box<dyn Source>, kind: SourceKind) {
    let vif = ins.vif.clone();
    if let Some(f) = &vif.filter {
        match f.attach(&src.as_raw_fd()) {
            Ok(()) => ins.use_filter(f.clone(), src.ifindex(), None),
            Err(e) => log::warn!(
                "{}: capture filter not attached, copying whole frames: {e}",
                vif.ifname
            ),
        }
    }
    vif.counters.attached.store(true, Ordering::Relaxed);
    log::info!(
        "{}: inspection attached (passive, {})",
        vif.ifname,
        kind.as_str()
    );
    let mut last_drops = 0;
    while !vif.stopping() {
        ins.maybe_reload();
        let res = src.poll(Duration::from_millis(100), &mut |f| {
            ins.frame(
                f.data,
                f.ts_ns,
                !f.outgoing,
                (f.data.len() as u64) < u64::from(f.wire_len),
            );
        });
        if let Some(e) = src.take_error() {
            log::info!(
                "{}: the capture socket reported: {e} (capture resumes when the vif is up)",
                vif.ifname
            );
        }
        ins.sync_filter();
        ins.poll_counts();
        if let Err(e) = res {
            log::error!("{}: capture failed: {e}", vif.ifname);
            break;
        }
        // Workers of one vif add their own socket's drops.
        let st = src.stats();
        vif.counters
            .capture_drops
            .fetch_add(st.drops - last_drops, Ordering::Relaxed);
        last_drops = st.drops;
    }
    vif.counters.attached.store(false, Ordering::Relaxed);
    // Directions this worker bypassed are copied whole again (a later worker starts afresh).
    ins.restore_all();
}
