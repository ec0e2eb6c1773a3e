//! A passive worker: one capture socket on the vif (in the vif's fanout group when the vif
//! has several workers), read through its receive queue or a TPACKET_V3 ring
//! (`[inspect] capture`, `capture` module docs), nothing added to the guest's path.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Inspector;
use crate::capture::queue::Queue;
use crate::capture::{CaptureError, Ring, RingConfig, Source};
use crate::config::PassiveCapture;

/// Block size of a worker's ring: a 64 KiB GSO super-frame always fits; `ring_mib` sets
/// how many blocks (kernel memory pinned per worker).
const BLOCK: usize = 256 << 10;

/// How a passive worker reads its vif (`[inspect] capture`, `ring_mib`, `block_timeout_ms`).
#[derive(Clone, Copy, Debug)]
pub(super) struct CaptureOptions {
    pub kind: PassiveCapture,
    /// The ring's size, or the most the queue holds, MiB.
    pub mib: usize,
    /// The ring's block timeout, ms; for the queue, the longest a frame waits while frames
    /// come.
    pub block_ms: u32,
}

pub(super) fn run(ins: Inspector, fanout: Option<u16>, opts: CaptureOptions) {
    let ring = RingConfig {
        block_size: BLOCK,
        blocks: (opts.mib << 20) / BLOCK,
        // A partly filled block reaches the worker after `block_ms`: detection (and so
        // quarantine) latency on a quiet vif is bounded by this, not by traffic filling the
        // block; each expiry costs a timer on the guests' CPUs.
        retire_ms: opts.block_ms,
        fanout,
    };
    let delay = Duration::from_millis(opts.block_ms.into());
    match opts.kind {
        PassiveCapture::Queue => {
            if let Some(q) = open(&ins, |i| Queue::open(i, opts.mib << 20, delay, fanout)) {
                inspect(ins, q, "queue");
            }
        }
        PassiveCapture::Ring => {
            if let Some(r) = open(&ins, |i| Ring::open(i, ring)) {
                inspect(ins, r, "ring");
            }
        }
    }
}

/// Opens the worker's source; netback creates the netdev after the backend appears in
/// XenStore, so a missing interface is waited for. `None`: stopped, or it cannot be opened
/// (logged).
fn open<S>(ins: &Inspector, open: impl Fn(&str) -> Result<S, CaptureError>) -> Option<S> {
    let vif = &ins.vif;
    loop {
        if vif.stopping() {
            return None;
        }
        match open(&vif.ifname) {
            Ok(s) => return Some(s),
            Err(CaptureError::NoInterface(_)) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                log::error!("{}: {e}", vif.ifname);
                return None;
            }
        }
    }
}

fn inspect(mut ins: Inspector, mut src: impl Source, kind: &str) {
    let vif = ins.vif.clone();
    if let Some(f) = &vif.filter {
        match f.attach(&src) {
            Ok(()) => ins.use_filter(f.clone(), src.ifindex(), None),
            Err(e) => log::warn!(
                "{}: capture filter not attached, copying whole frames: {e}",
                vif.ifname
            ),
        }
    }
    vif.counters.attached.store(true, Ordering::Relaxed);
    log::info!("{}: inspection attached (passive, {kind})", vif.ifname);
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
            .ring_drops
            .fetch_add(st.drops - last_drops, Ordering::Relaxed);
        last_drops = st.drops;
    }
    vif.counters.attached.store(false, Ordering::Relaxed);
    // Directions this worker bypassed are copied whole again (a later worker starts afresh).
    ins.restore_all();
}
