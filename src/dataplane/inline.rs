//! An inline worker: the guest's frames wait for the verdict.
//!
//! The vif is spliced out of its bridge (`capture::inline`) and this thread forwards between
//! the vif and the inspector side of its inline port, in batches (recvmmsg/sendmmsg), each frame with its
//! `virtio_net_hdr` so GSO super-frames and partial checksums pass untouched (guest offloads
//! stay on). A frame a `drop`/`reject` rule fired on, and the rest of its flow, is not
//! forwarded. Overload is measured, not guessed: a frame whose kernel receive time is more
//! than `max_wait_us` old means the worker is behind; such frames are forwarded uninspected
//! (`fail = "open"`) or dropped (`"closed"`), each counted, until the backlog is gone. When
//! the worker stops because the service stops, the splice stays (closed) or is undone (open);
//! when the vif left the inventory or its guest changed mode, it is undone.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::placement::{Placed, Placer};
use super::{Inspector, DETACH, UNPINNED};
use crate::capture::inline::{self as topo, Splice};
use crate::capture::irq::{IrqFollower, Placement};
use crate::capture::vnet::{wait_readable, VnetPort, VNET_HDR_LEN};
use crate::capture::CaptureError;
use crate::config::{self, FailMode, InlineConfig};
use crate::inspect::Verdict;

/// Frames read (one recvmmsg) and forwarded (one sendmmsg) from one side before looking at
/// the other: fairness between directions and one system call per batch, not per frame.
const BATCH: usize = 32;

/// Room for one GSO super-frame (64 KiB plus headers) and the virtio header.
const BUF: usize = 65536 + 1024;

/// How often a worker reads what the kernel dropped on its sockets (two system calls).
const DROPS_EVERY: Duration = Duration::from_millis(100);

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Runs the inline inspection of one vif with one worker per inspector in `inspectors`
/// (`workers_per_vif`): this thread splices the vif and forwards as worker 0, the others
/// forward their share of the flows (symmetric fanout on both sides, so both directions of a
/// flow meet in one worker), and this thread undoes the splice as the fail mode says.
pub(super) fn run(inspectors: Vec<Inspector>, cfg: &InlineConfig, groups: (u16, u16)) {
    let Some(vif) = inspectors.first().map(|i| i.vif.clone()) else {
        return;
    };
    let name = vif.ifname.clone();
    let n = inspectors.len();
    // Wait for netback's netdev and for the hotplug script to put it on its bridge.
    let (splice, ports) = loop {
        if vif.stopping() {
            return;
        }
        match open(&name, n, groups) {
            Ok(x) => break x,
            Err(Retry::Later) => std::thread::sleep(Duration::from_millis(50)),
            Err(Retry::Never(e)) => {
                log::error!("{name}: inline inspection not possible: {e}");
                return;
            }
        }
    };
    let mut inspectors = inspectors;
    // Held until the workers have stopped: dropping it detaches the kernel's forwarding.
    let fast = if cfg.fast_path {
        fast_path(&mut inspectors, &ports, cfg)
    } else {
        None
    };
    vif.counters
        .fast_path
        .store(fast.is_some(), Ordering::Relaxed);
    vif.counters.attached.store(true, Ordering::Relaxed);
    log::info!(
        "{name}: inspection attached (inline via {} on {}, {n} worker(s), fail {:?}, kernel fast path {})",
        splice.bport,
        splice.bridge,
        cfg.fail,
        fast.as_ref()
            .map_or("off".to_string(), |f| format!("on ({})", f.via()))
    );
    let fast_ref = fast.as_ref();
    std::thread::scope(|s| {
        let mut work = inspectors.into_iter().zip(ports);
        let first = work.next();
        for (i, (ins, (guest, sw))) in work.enumerate() {
            let spawned = std::thread::Builder::new()
                .name(format!("vif {name} inline/{}", i + 1))
                .spawn_scoped(s, move || forward(ins, &guest, &sw, cfg, fast_ref));
            if let Err(e) = spawned {
                log::error!("{name}: cannot start an inline worker: {e}");
            }
        }
        if let Some((ins, (guest, sw))) = first {
            forward(ins, &guest, &sw, cfg, fast_ref);
        }
    });
    drop(fast);
    vif.counters.fast_path.store(false, Ordering::Relaxed);
    vif.counters.attached.store(false, Ordering::Relaxed);
    let why = vif.stop.load(Ordering::Relaxed);
    if why == DETACH || cfg.fail == FailMode::Open {
        match topo::restore(&name) {
            Ok(true) => log::info!(
                "{name}: back on bridge {}",
                crate::enforce::bridge::port(&name)
                    .and_then(|p| p.master)
                    .unwrap_or_else(|| "(none)".into())
            ),
            Ok(false) => {}
            Err(e) => log::error!("{name}: cannot undo the inline splice: {e}"),
        }
    } else {
        log::info!(
            "{name}: left spliced out of {} (fail closed)",
            splice.bridge
        );
    }
}

/// Starts the kernel fast path (`capture::bpf::FastPath`) between the vif and its inline port
/// and the capture filter on every worker's ports, and has the workers hand directions to
/// them. All or nothing: a port without the filter would forward frames the kernel forwards
/// too. `None` (everything crosses the workers, as before) without the filter or a way to
/// attach the programs (tcx or tc).
fn fast_path(
    inspectors: &mut [Inspector],
    ports: &[(VnetPort, VnetPort)],
    cfg: &InlineConfig,
) -> Option<crate::capture::bpf::FastPath> {
    let first = inspectors.first()?;
    let name = first.vif.ifname.clone();
    let filter = first.vif.filter.clone()?;
    let (vif_index, port_index) = ports.first().map(|(g, s)| (g.ifindex(), s.ifindex()))?;
    // The workers renew the lease at least every `idle_wake_ms`; a second more covers a
    // descheduled thread on a loaded host. (After a SIGKILL the kernel forwards the flows
    // already handed over for at most this long, then nothing.)
    let lease_ns = 1_000_000_000 + 2_000_000 * u64::from(cfg.idle_wake_ms);
    let tc_only = cfg.fast_path_attach == crate::config::FastPathAttach::Tc;
    let fast = match filter.fast_path(vif_index, port_index, tc_only, lease_ns) {
        Ok(f) => f,
        Err(e) => {
            log::info!("{name}: no inline fast path, every frame crosses the worker: {e}");
            return None;
        }
    };
    for (guest, sw) in ports {
        if let Err(e) = filter
            .attach_inline(guest)
            .and_then(|()| filter.attach_inline(sw))
        {
            log::warn!("{name}: no inline fast path (capture filter not attached: {e})");
            return None;
        }
    }
    for ins in inspectors.iter_mut() {
        ins.use_filter(filter.clone(), vif_index, Some(port_index));
    }
    Some(fast)
}

/// A frame the capture filter copied headers-only (a handed-over direction's once-a-second
/// sample, forwarded by the kernel itself): shorter than its IP header says.
fn cut_short(frame: &[u8]) -> bool {
    let be16 = |i: usize| {
        frame
            .get(i..i + 2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    };
    match be16(12) {
        // IPv4 total length (0: a BIG TCP super-frame, length not in the header).
        Some(0x0800) => be16(16).is_some_and(|l| l != 0 && frame.len() < 14 + l),
        // IPv6 payload length after the 40-byte header.
        Some(0x86dd) => be16(18).is_some_and(|l| l != 0 && frame.len() < 54 + l),
        _ => false,
    }
}

/// One worker's forwarding loop between its guest-side and switch-side ports; it renews the
/// kernel fast path's lease (`fast`) while it runs.
fn forward(
    mut ins: Inspector,
    guest: &VnetPort,
    sw: &VnetPort,
    cfg: &InlineConfig,
    fast: Option<&crate::capture::bpf::FastPath>,
) {
    let vif = ins.vif.clone();
    let name = vif.ifname.clone();
    let max_wait = cfg.max_wait_us * 1000;
    // One batch of frame buffers, read with one recvmmsg and forwarded with one sendmmsg.
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; BUF]).collect();
    let mut got = Vec::with_capacity(BATCH);
    let mut pass: Vec<usize> = Vec::with_capacity(BATCH);
    let fds = [guest.raw_fd(), sw.raw_fd()];
    let c = &vif.counters;
    let spin = Duration::from_micros(cfg.spin_us);
    let mut last_active: Option<Instant> = None;
    let idle_ms = cfg.idle_wake_ms.clamp(1, 1000) as i32;
    let placement = cfg.placement();
    let mut irq = (placement == config::Placement::Irq).then(|| IrqFollower::new(&name, ins.index));
    let mut placer = (placement == config::Placement::Auto).then(|| {
        // The arrival counts are kept by the capture filter, on the ports only with the
        // fast path.
        let counts = fast.and(vif.filter.clone()).map(|f| (f, guest.ifindex()));
        Placer::new(&name, ins.index, counts)
    });
    // Where this worker is pinned, for `virtsec status`.
    let index = ins.index;
    let publish = |cpu: Option<usize>| {
        if let Some(w) = c.worker_cpus.get(index) {
            let cpu = cpu.and_then(|c| u32::try_from(c).ok());
            w.store(cpu.unwrap_or(UNPINNED), Ordering::Relaxed);
        }
    };
    // What the kernel dropped on this worker's two sockets, their queues being full.
    let take_drops = || {
        let n = guest.take_drops() + sw.take_drops();
        c.queue_drops.fetch_add(n, Ordering::Relaxed);
    };
    let mut drops_read = Instant::now();
    while !vif.stopping() {
        ins.maybe_reload();
        if let Some(p) = placer.as_mut() {
            if let Some(placed) = p.check(Instant::now()) {
                // Moves come and go with the traffic; a CPU it may not use is the operator's.
                let level = match placed {
                    Placed::NotAllowed { .. } => log::Level::Info,
                    _ => log::Level::Debug,
                };
                log::log!(level, "{name}: inline worker {index} {placed}");
                publish(p.cpu());
            }
        }
        if let Some(p) = irq.as_mut().and_then(|f| f.check()) {
            publish(match p {
                Placement::Pinned { cpu, .. } => Some(*cpu),
                _ => None,
            });
            match p {
                Placement::Pinned { irq, cpu } => log::info!(
                    "{name}: inline worker {} on CPU {cpu}, with its netback interrupt {irq}",
                    ins.index
                ),
                Placement::NoInterrupt => log::info!(
                    "{name}: no netback interrupt for inline worker {}: placed by the scheduler",
                    ins.index
                ),
                Placement::NotAllowed { irq, cpu, why } => log::warn!(
                    "{name}: inline worker {} cannot follow netback interrupt {irq} to CPU {cpu} ({why}): placed by the scheduler",
                    ins.index
                ),
            }
        }
        // (at most ten times a second, busy or idle: what the kernel forwarded is counted)
        ins.poll_counts();
        if drops_read.elapsed() >= DROPS_EVERY {
            drops_read = Instant::now();
            take_drops();
        }
        if let Some(f) = fast {
            f.renew();
        }
        let spinning = last_active.is_some_and(|t| t.elapsed() < spin);
        let ready = match wait_readable(&fds, if spinning { 0 } else { idle_ms }) {
            Ok(r) => r,
            Err(e) => {
                log::error!("{name}: poll failed: {e}");
                break;
            }
        };
        let any = ready.iter().any(|&r| r);
        if any {
            last_active = Some(Instant::now());
        } else if spinning {
            std::hint::spin_loop();
            continue;
        }
        for (side, is_ready) in ready.into_iter().enumerate() {
            if !is_ready {
                continue;
            }
            let (from, to, from_guest) = if side == 0 {
                (guest, sw, true)
            } else {
                (sw, guest, false)
            };
            if let Err(e) = from.recv_batch(&mut bufs, &mut got) {
                log::error!("{name}: read from {} failed: {e}", from.iface());
                continue;
            }
            pass.clear();
            let now = now_ns();
            for (i, r) in got.iter().enumerate() {
                if r.truncated || r.len < VNET_HDR_LEN {
                    c.truncated.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let frame = &bufs[i][VNET_HDR_LEN..r.len];
                if ins.trim.is_some() && cut_short(frame) {
                    // The kernel forwarded it; its headers keep the flow fresh here.
                    ins.frame(frame, r.ts_ns, from_guest, true);
                    continue;
                }
                let late = r.ts_ns != 0 && now.saturating_sub(r.ts_ns) > max_wait;
                if late {
                    match cfg.fail {
                        FailMode::Open => {
                            c.overload_bypassed.fetch_add(1, Ordering::Relaxed);
                        }
                        FailMode::Closed => {
                            c.overload_drops.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                } else if ins.frame(frame, r.ts_ns, from_guest, false) == Verdict::Drop {
                    c.verdict_drops.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                pass.push(i);
            }
            let frames: Vec<&[u8]> = pass.iter().map(|&i| &bufs[i][..got[i].len]).collect();
            let handed = now_ns();
            for &i in &pass {
                if got[i].ts_ns != 0 {
                    c.verdict_wait.record(handed.saturating_sub(got[i].ts_ns));
                }
            }
            let sent = to.send_batch(&frames);
            if sent < frames.len() {
                c.send_errors
                    .fetch_add((frames.len() - sent) as u64, Ordering::Relaxed);
            }
            // Handed to the kernel after this batch left, so that a direction's frames the
            // kernel forwards from now on do not overtake it.
            ins.sync_filter();
        }
        // (`last_active` is when this turn's frames were found ready.)
        if let (true, Some(p), Some(t)) = (any, placer.as_mut(), last_active) {
            p.worked(t.elapsed());
        }
    }
    take_drops();
    // The kernel forwards nothing this worker handed over any more.
    ins.restore_all();
}

enum Retry {
    Later,
    Never(String),
}

/// Creates the inline port, opens both sockets of each of `n` workers (in the two fanout
/// groups when `n > 1`), then splices (so no frame is forwarded by the bridge after the vif
/// left it without a socket to read it).
#[allow(clippy::type_complexity)]
fn open(
    vif: &str,
    n: usize,
    groups: (u16, u16),
) -> Result<(Splice, Vec<(VnetPort, VnetPort)>), Retry> {
    if !topo::exists(vif) {
        return Err(Retry::Later);
    }
    let splice = match topo::prepare(vif) {
        Ok(s) => s,
        Err(topo::TopologyError::NotBridged(_)) => return Err(Retry::Later),
        Err(e) => return Err(Retry::Never(e.to_string())),
    };
    let port = |name: &str, group: u16| match VnetPort::open(name, (n > 1).then_some(group)) {
        Ok(p) => Ok(p),
        Err(CaptureError::NoInterface(_)) => Err(Retry::Later),
        Err(e) => Err(Retry::Never(e.to_string())),
    };
    // Each worker joins the vif's group and then the port's, in the same order: member i of
    // one group is member i of the other.
    let mut ports = Vec::with_capacity(n);
    for _ in 0..n {
        ports.push((port(vif, groups.0)?, port(&splice.iport, groups.1)?));
    }
    topo::splice(&splice).map_err(|e| Retry::Never(e.to_string()))?;
    Ok((splice, ports))
}
