//! Where an inline worker runs: beside its guest's frames while it is idle, wherever the
//! scheduler puts it while it is busy (`[inspect.inline] placement = "auto"`, the default).
//!
//! An idle inline worker sleeps in `poll()`; a guest's frame wakes it from the CPU the kernel
//! delivered the frame on (netback's NAPI poll on the vCPU of the vif's interrupt, a veth
//! sender's softirq, a tap's writer). If the worker last ran on another, idle CPU, the wake-up
//! is an inter-processor interrupt and, under a hypervisor, that vCPU being scheduled again:
//! on a 2-vCPU VM about half of what inline mode adds to a quiet guest's round trip
//! (benches/wakeup.py, docs/performance.md). Pinned to the delivering CPU, it runs as soon as
//! that CPU's softirq is done.
//!
//! A busy worker is the opposite case: the frames' delivery (netback's copy from the guest,
//! or in a bench the sending guest itself) and the worker's scan are a pipeline, and on one
//! CPU they would take turns. So the worker measures how much of each 100 ms it spent reading,
//! inspecting and forwarding frames (not its idle wake-ups, nor the short polling after a
//! burst: those are the same for a quiet vif and a busy one), and:
//!
//! - busy under a quarter of the time: pinned to the CPU where most of the vif's frames
//!   arrived in that window (nothing arrived: left where it is);
//! - busy over half the time: unpinned, given back the CPUs it was allowed before;
//! - in between: left as it is, so that a worker near one threshold does not move every
//!   window.
//!
//! Where the frames arrive is counted in the kernel: the capture filter on an inline port
//! adds each arriving frame to a per-CPU counter of its interface (`capture::bpf`), one map
//! read every 100 ms here. Without the filter (no eBPF, or `fast_path = false`) the vif's
//! netback transmit interrupt stands in for it (`capture::irq`, looked at every 2 s), and a
//! vif with neither (an HVM `-emu` tap without eBPF) is left to the scheduler.
//!
//! With several workers per vif the counts are the vif's, not each worker's (flows reach
//! workers by hash): idle workers then share the CPU most frames arrive on, which costs
//! nothing while they are idle, and each leaves it as soon as it is busy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::capture::bpf::CaptureFilter;
use crate::capture::irq::{IrqFollower, ThreadPin};

/// How often the worker's busy share and its frames' CPUs are looked at.
const WINDOW: Duration = Duration::from_millis(100);
/// The interrupt, where it stands in for the counts, is looked at this often.
const IRQ_WINDOW: Duration = Duration::from_secs(2);
/// Busy under this share of a window: pinned beside the frames.
const IDLE_BELOW: f64 = 0.25;
/// Busy over this share: unpinned.
const BUSY_ABOVE: f64 = 0.5;

/// What to do with the worker after a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Pin(usize),
    Unpin,
    Keep,
}

/// The decision for a worker pinned to `pinned` (if it is) that was busy `busy` (0 to 1) of
/// the last window, during which `arrived[c]` of the vif's frames arrived on CPU `c`.
pub fn decide(pinned: Option<usize>, busy: f64, arrived: &[u64]) -> Decision {
    if busy > BUSY_ABOVE {
        return if pinned.is_some() {
            Decision::Unpin
        } else {
            Decision::Keep
        };
    }
    if busy >= IDLE_BELOW {
        return Decision::Keep;
    }
    // The CPU most frames arrived on (the lowest on a tie).
    let best = arrived
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(&a.0)));
    match best {
        Some((cpu, _)) if pinned != Some(cpu) => Decision::Pin(cpu),
        _ => Decision::Keep,
    }
}

/// Where a worker was placed, for the log and `virtsec status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placed {
    /// Pinned to `cpu`, where its vif's frames arrive (`by`: how that was known).
    Beside { cpu: usize, by: &'static str },
    /// Busy: placed by the scheduler.
    Busy,
    /// The CPU the frames arrive on is not one this process may run on.
    NotAllowed { cpu: usize, why: String },
}

impl std::fmt::Display for Placed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Placed::Beside { cpu, by } => write!(f, "on CPU {cpu}, beside {by}"),
            Placed::Busy => write!(f, "busy: placed by the scheduler"),
            Placed::NotAllowed { cpu, why } => write!(
                f,
                "cannot run on CPU {cpu}, where its frames arrive ({why}): placed by the scheduler"
            ),
        }
    }
}

/// How the CPU the frames arrive on is known.
enum Source {
    /// The capture filter's per-CPU arrival counts of the vif (its ifindex), and the last
    /// read of them.
    Counts {
        filter: Arc<CaptureFilter>,
        ifindex: u32,
        last: Vec<u64>,
    },
    /// The vif queue's netback interrupt, read every [`IRQ_WINDOW`]: its CPU gets every
    /// arrival.
    Irq {
        follower: Box<IrqFollower>,
        cpu: Option<usize>,
        next: Instant,
    },
}

impl Source {
    /// Frames per CPU since the last call (`None`: nothing known).
    fn arrived(&mut self, now: Instant) -> Option<Vec<u64>> {
        match self {
            Source::Counts {
                filter,
                ifindex,
                last,
            } => {
                let cur = filter.delivered(*ifindex)?;
                let delta = cur
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| n.saturating_sub(last.get(i).copied().unwrap_or(0)))
                    .collect();
                *last = cur;
                Some(delta)
            }
            Source::Irq {
                follower,
                cpu,
                next,
            } => {
                if now >= *next {
                    *next = now + IRQ_WINDOW;
                    *cpu = follower.locate().and_then(|(_, c)| c);
                }
                let c = (*cpu)?;
                let mut v = vec![0; c + 1];
                v[c] = 1;
                Some(v)
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Source::Counts { .. } => "its frames",
            Source::Irq { .. } => "its netback interrupt",
        }
    }
}

/// One inline worker's placement (module docs); used from the worker's own thread.
pub struct Placer {
    vif: String,
    source: Source,
    pin: ThreadPin,
    window: Instant,
    /// Time spent on frames in this window.
    work: Duration,
    last: Option<Placed>,
}

impl Placer {
    /// A placer for worker `index` of `vif`, with the capture filter's counts on the vif's
    /// `ifindex` where the filter is attached, else the vif's netback interrupt.
    pub fn new(vif: &str, index: usize, counts: Option<(Arc<CaptureFilter>, u32)>) -> Placer {
        let source = match counts {
            Some((filter, ifindex)) => Source::Counts {
                last: filter.delivered(ifindex).unwrap_or_default(),
                filter,
                ifindex,
            },
            None => Source::Irq {
                follower: Box::new(IrqFollower::new(vif, index)),
                cpu: None,
                next: Instant::now(),
            },
        };
        Placer {
            vif: vif.to_string(),
            source,
            pin: ThreadPin::default(),
            window: Instant::now(),
            work: Duration::ZERO,
            last: None,
        }
    }

    /// Records time the worker spent on frames (reading, inspecting, forwarding).
    pub fn worked(&mut self, d: Duration) {
        self.work += d;
    }

    /// At the end of a window, places the worker; returns the new placement when it changed.
    pub fn check(&mut self, now: Instant) -> Option<&Placed> {
        let span = now.saturating_duration_since(self.window);
        if span < WINDOW {
            return None;
        }
        let busy = self.work.as_secs_f64() / span.as_secs_f64();
        self.window = now;
        self.work = Duration::ZERO;
        let arrived = self.source.arrived(now).unwrap_or_default();
        let placed = match decide(self.pin.cpu(), busy, &arrived) {
            Decision::Keep => return None,
            Decision::Unpin => {
                self.pin.unpin(&self.vif);
                Placed::Busy
            }
            Decision::Pin(cpu) => match self.pin.pin(cpu) {
                Ok(()) => Placed::Beside {
                    cpu,
                    by: self.source.name(),
                },
                Err(e) => {
                    self.pin.unpin(&self.vif);
                    Placed::NotAllowed {
                        cpu,
                        why: e.to_string(),
                    }
                }
            },
        };
        if self.last.as_ref() == Some(&placed) {
            return None;
        }
        self.last = Some(placed);
        self.last.as_ref()
    }

    /// The CPU the worker is pinned to, if it is.
    pub fn cpu(&self) -> Option<usize> {
        self.pin.cpu()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_worker_goes_where_most_frames_arrive() {
        assert_eq!(decide(None, 0.0, &[0, 20, 3]), Decision::Pin(1));
        assert_eq!(decide(Some(0), 0.1, &[2, 20, 3]), Decision::Pin(1));
        // Already there, or nothing arrived: stays.
        assert_eq!(decide(Some(1), 0.1, &[2, 20, 3]), Decision::Keep);
        assert_eq!(decide(Some(1), 0.0, &[0, 0, 0]), Decision::Keep);
        assert_eq!(decide(None, 0.0, &[]), Decision::Keep);
        // A tie: the lower CPU, every time (no flapping between equals).
        assert_eq!(decide(None, 0.0, &[0, 5, 5]), Decision::Pin(1));
        assert_eq!(decide(Some(1), 0.0, &[0, 5, 5]), Decision::Keep);
    }

    #[test]
    fn a_busy_worker_is_unpinned_and_the_middle_keeps_what_is() {
        assert_eq!(decide(Some(1), 0.9, &[0, 20]), Decision::Unpin);
        assert_eq!(decide(None, 0.9, &[0, 20]), Decision::Keep);
        // Between the thresholds: neither pinned nor unpinned.
        assert_eq!(decide(None, 0.3, &[0, 20]), Decision::Keep);
        assert_eq!(decide(Some(0), 0.3, &[0, 20]), Decision::Keep);
        assert_eq!(decide(Some(0), 0.5, &[0, 20]), Decision::Keep);
        assert_eq!(decide(None, 0.24, &[0, 20]), Decision::Pin(1));
    }

    /// The worker thread itself, pinned and unpinned by quiet and busy windows (its own
    /// affinity read back from the kernel), with the interrupt standing in for the counts in
    /// a fake `/proc` (needs two CPUs the test may use).
    #[test]
    fn quiet_and_busy_windows_pin_and_unpin_the_thread() {
        use nix::sched::sched_getaffinity;
        use nix::unistd::Pid;
        let allowed = sched_getaffinity(Pid::from_raw(0)).unwrap();
        let cpus = crate::capture::irq::cpus_of(&allowed);
        if cpus.len() < 2 {
            eprintln!("skipped: needs two CPUs");
            return;
        }
        std::thread::spawn(move || {
            let target = cpus[1];
            let mut p = Placer {
                vif: "vif9.0".into(),
                source: Source::Irq {
                    follower: Box::new(IrqFollower::new("vif9.0", 0)),
                    cpu: Some(target),
                    next: Instant::now() + Duration::from_secs(3600),
                },
                pin: ThreadPin::default(),
                window: Instant::now(),
                work: Duration::ZERO,
                last: None,
            };
            let start = p.window;
            // Not a window yet: nothing.
            assert!(p.check(start + Duration::from_millis(50)).is_none());
            // A quiet window (5% on frames): pinned where the frames arrive.
            p.worked(Duration::from_millis(5));
            let placed = p.check(start + WINDOW).cloned();
            assert_eq!(
                placed,
                Some(Placed::Beside {
                    cpu: target,
                    by: "its netback interrupt"
                })
            );
            let now = sched_getaffinity(Pid::from_raw(0)).unwrap();
            assert!(now.is_set(target).unwrap());
            assert_eq!(crate::capture::irq::cpus_of(&now).len(), 1);
            // A busy window (90% on frames): given its CPUs back.
            p.worked(Duration::from_millis(90));
            assert_eq!(p.check(start + 2 * WINDOW).cloned(), Some(Placed::Busy));
            assert_eq!(sched_getaffinity(Pid::from_raw(0)).unwrap(), allowed);
            assert_eq!(p.cpu(), None);
            // Quiet again: back beside the frames.
            p.worked(Duration::from_millis(1));
            assert!(p.check(start + 3 * WINDOW).is_some());
            assert_eq!(p.cpu(), Some(target));
        })
        .join()
        .unwrap();
    }
}
