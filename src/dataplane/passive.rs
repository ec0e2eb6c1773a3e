//! A passive worker: one TPACKET_V3 ring on the vif (in the vif's fanout group when the vif
//! has several workers), frames inspected in place, nothing added to the guest's path.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::Inspector;
use crate::capture::{CaptureError, Ring, RingConfig};

/// Block size of a worker's ring: a 64 KiB GSO super-frame always fits; `ring_mib` sets
/// how many blocks (kernel memory pinned per worker).
const BLOCK: usize = 256 << 10;

/// `ring`: its size (MiB) and block timeout (ms).
pub(super) fn run(mut ins: Inspector, fanout: Option<u16>, (ring_mib, block_ms): (usize, u32)) {
    let vif = ins.vif.clone();
    let cfg = RingConfig {
        block_size: BLOCK,
        blocks: (ring_mib << 20) / BLOCK,
        // A partly filled block reaches the worker after `block_ms`: detection (and so
        // quarantine) latency on a quiet vif is bounded by this, not by traffic filling the
        // block; each expiry costs a timer on the guests' CPUs.
        retire_ms: block_ms,
        fanout,
    };
    // netback creates the netdev after the backend appears in XenStore: wait for it.
    let mut ring = loop {
        if vif.stopping() {
            return;
        }
        match Ring::open(&vif.ifname, cfg) {
            Ok(r) => break r,
            Err(CaptureError::NoInterface(_)) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                log::error!("{}: {e}", vif.ifname);
                return;
            }
        }
    };
    if let Some(f) = &vif.filter {
        match f.attach(&ring) {
            Ok(()) => ins.use_filter(f.clone(), ring.ifindex(), None),
            Err(e) => log::warn!(
                "{}: capture filter not attached, copying whole frames: {e}",
                vif.ifname
            ),
        }
    }
    vif.counters.attached.store(true, Ordering::Relaxed);
    log::info!("{}: inspection attached (passive)", vif.ifname);
    let mut last_drops = 0;
    while !vif.stopping() {
        ins.maybe_reload();
        let res = ring.poll(Duration::from_millis(100), &mut |f| {
            ins.frame(
                f.data,
                f.ts_ns,
                !f.outgoing,
                (f.data.len() as u64) < u64::from(f.wire_len),
            );
        });
        if let Some(e) = ring.take_error() {
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
        // Workers of one vif add their own ring's drops.
        let st = ring.stats();
        vif.counters
            .ring_drops
            .fetch_add(st.drops - last_drops, Ordering::Relaxed);
        last_drops = st.drops;
    }
    vif.counters.attached.store(false, Ordering::Relaxed);
    // Directions this worker bypassed are copied whole again (a later worker starts afresh).
    ins.restore_all();
}
