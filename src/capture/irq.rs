//! Where a vif's frames are delivered: its netback interrupt, and an inline worker placed there.
//!
//! A guest's frames reach dom0 (or a driver domain) through netback: the guest notifies the
//! vif queue's event channel, which Linux sees as an interrupt named `vif<D>.<N>-q<Q>-tx`
//! (`vif<D>.<N>-q<Q>` when the frontend asked for one event channel per queue instead of
//! separate transmit and receive ones), and netback's NAPI poll hands the frames to the
//! network stack on the vCPU that interrupt is bound to. That is where an inline worker
//! sleeping in `poll()` is woken from. Woken on that same vCPU, the worker runs as soon as
//! the interrupt's softirq is done; woken on another, idle vCPU, it first waits for an
//! inter-processor interrupt and, under a hypervisor, for that vCPU to be scheduled again.
//! benches/wakeup.py measures the difference (docs/performance.md): it is most of the
//! latency inline mode adds to a quiet guest's round trip.
//!
//! [`IrqFollower`] pins the calling worker thread to the CPU of its vif's netback interrupt
//! (`[inspect.inline] placement = "irq"`) and follows the interrupt when it moves (irqbalance, an
//! operator's `smp_affinity_list`). It only reads the interrupt's placement: spreading the
//! vifs' interrupts over dom0's vCPUs stays with whoever does it today, and a worker never
//! fights irqbalance. A vif without a netback interrupt (an HVM guest's `-emu` tap, a veth in
//! tests) leaves its worker where the scheduler puts it.
//!
//! The trade-off: a worker on its interrupt's vCPU shares that vCPU with the vif's netback
//! work, so one busy vif gets one vCPU instead of two in a pipeline. The default placement
//! (`dataplane::placement`, "auto") pins only idle workers, beside where their frames arrive,
//! and uses [`IrqFollower::locate`] only where the capture filter cannot count that.

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// How often a follower looks at its interrupt again.
const RECHECK: Duration = Duration::from_secs(2);

/// The interrupt's name netback gives queue `queue` of `vif`: the transmit (guest to
/// backend) one with split event channels, else the queue's only one.
fn irq_names(vif: &str, queue: usize) -> [String; 2] {
    [format!("{vif}-q{queue}-tx"), format!("{vif}-q{queue}")]
}

/// The number of the interrupt named for `vif`'s queue `queue` in `/proc/interrupts`' text
/// (the name is a line's last field; the transmit interrupt wins over a single one).
pub fn find_irq(interrupts: &str, vif: &str, queue: usize) -> Option<u32> {
    let names = irq_names(vif, queue);
    let mut single = None;
    for line in interrupts.lines() {
        let Some((num, _)) = line.trim_start().split_once(':') else {
            continue;
        };
        let Ok(num) = num.parse::<u32>() else {
            continue;
        };
        match line.split_whitespace().last() {
            Some(n) if n == names[0] => return Some(num),
            Some(n) if n == names[1] => single = single.or(Some(num)),
            _ => {}
        }
    }
    single
}

/// The first CPU of a kernel CPU list (`"3"`, `"0-3,8"`); `None` when empty or not one.
pub fn first_cpu(list: &str) -> Option<usize> {
    let first = list.trim().split(',').next()?;
    first.split('-').next()?.trim().parse().ok()
}

/// What a [`IrqFollower::check`] changed, for the worker's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Pinned to `cpu`, where interrupt `irq` is delivered.
    Pinned { irq: u32, cpu: usize },
    /// The vif has no netback interrupt (any more): placed by the scheduler.
    NoInterrupt,
    /// The interrupt's CPU is not one this process may run on (a cpuset, systemd's
    /// `CPUAffinity=`): placed by the scheduler.
    NotAllowed { irq: u32, cpu: usize, why: String },
}

/// Keeps the calling thread on the CPU of a vif queue's netback interrupt (module docs).
pub struct IrqFollower {
    vif: String,
    queue: usize,
    /// Where `/proc` and `/sys` are (`/` but in tests).
    root: PathBuf,
    irq: Option<u32>,
    pin: ThreadPin,
    last: Option<Placement>,
    next: Instant,
}

impl IrqFollower {
    /// A follower for `vif`'s queue `queue` (an inline worker's index: worker i follows queue
    /// i's interrupt), for the calling thread.
    pub fn new(vif: &str, queue: usize) -> IrqFollower {
        IrqFollower::with_root(vif, queue, PathBuf::from("/"))
    }

    fn with_root(vif: &str, queue: usize, root: PathBuf) -> IrqFollower {
        IrqFollower {
            vif: vif.to_string(),
            queue,
            root,
            irq: None,
            pin: ThreadPin::default(),
            last: None,
            next: Instant::now(),
        }
    }

    fn read(&self, path: &str) -> io::Result<String> {
        std::fs::read_to_string(self.root.join(path))
    }

    /// Whether interrupt `irq` is still the one named for this queue (a vif that reconnected
    /// gets new interrupts; numbers are reused). Kernels without `/sys/kernel/irq` are asked
    /// `/proc/interrupts` again.
    fn still_ours(&self, irq: u32) -> Option<bool> {
        let actions = self.read(&format!("sys/kernel/irq/{irq}/actions")).ok()?;
        let names = irq_names(&self.vif, self.queue);
        Some(
            actions
                .split(',')
                .any(|a| names.contains(&a.trim().to_string())),
        )
    }

    /// Where the queue's interrupt is now: its number and CPU.
    pub(crate) fn locate(&mut self) -> Option<(u32, Option<usize>)> {
        let irq = match self.irq.filter(|&i| self.still_ours(i) == Some(true)) {
            Some(i) => i,
            None => find_irq(&self.read("proc/interrupts").ok()?, &self.vif, self.queue)?,
        };
        self.irq = Some(irq);
        // The CPU the interrupt is delivered to; the list it may go to where the kernel does
        // not say (an interrupt goes to one CPU of it at a time).
        let cpu = ["effective_affinity_list", "smp_affinity_list"]
            .iter()
            .find_map(|f| first_cpu(&self.read(&format!("proc/irq/{irq}/{f}")).ok()?));
        Some((irq, cpu))
    }

    /// Looks at the interrupt at most every two seconds and moves the calling thread to its
    /// CPU; returns what changed since the last call that changed something.
    pub fn check(&mut self) -> Option<&Placement> {
        let now = Instant::now();
        if now < self.next {
            return None;
        }
        self.next = now + RECHECK;
        let placement = match self.locate() {
            Some((irq, Some(cpu))) if self.pin.cpu() == Some(cpu) => Placement::Pinned { irq, cpu },
            Some((irq, Some(cpu))) => match self.pin.pin(cpu) {
                Ok(()) => Placement::Pinned { irq, cpu },
                Err(e) => {
                    self.pin.unpin(&self.vif);
                    Placement::NotAllowed {
                        irq,
                        cpu,
                        why: e.to_string(),
                    }
                }
            },
            _ => {
                self.irq = None;
                self.pin.unpin(&self.vif);
                Placement::NoInterrupt
            }
        };
        if self.last.as_ref() == Some(&placement) {
            return None;
        }
        self.last = Some(placement);
        self.last.as_ref()
    }
}

/// Why a worker was not pinned to a CPU.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The CPU is outside the affinity the service was started with (`taskset`, systemd's
    /// `CPUAffinity=`): a thread may widen its own affinity, so this is checked here, not by
    /// the kernel.
    #[error(
        "CPU {cpu} is not one of the service's CPUs ({allowed}: taskset or systemd's CPUAffinity=)"
    )]
    NotInAffinity { cpu: usize, allowed: String },
    /// The kernel refused (a cpuset without that CPU, a CPU that does not exist).
    #[error("the kernel refused the CPU: {0}")]
    Refused(#[from] nix::Error),
}

/// The CPUs in `set`, in order.
pub(crate) fn cpus_of(set: &CpuSet) -> Vec<usize> {
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// A CPU set as the kernel writes CPU lists (`"1"`, `"0-3,8"`).
fn cpu_list(set: &CpuSet) -> String {
    let cpus = cpus_of(set);
    let mut parts = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// The calling thread pinned to one CPU of those it was allowed to run on, or left where it
/// was allowed to run.
#[derive(Default)]
pub struct ThreadPin {
    cpu: Option<usize>,
    /// The thread's affinity before it was first pinned (inherited from the service's:
    /// the operator's choice), the only CPUs it is pinned to and what `unpin` restores.
    allowed: Option<CpuSet>,
}

impl ThreadPin {
    /// The CPU the thread is pinned to, if it is.
    pub fn cpu(&self) -> Option<usize> {
        self.cpu
    }

    /// Pins the calling thread to `cpu`; a CPU outside the thread's affinity from before its
    /// first pinning, or one the kernel refuses (a cpuset), is an error and leaves the thread
    /// as it was.
    pub fn pin(&mut self, cpu: usize) -> Result<(), PinError> {
        let allowed = match self.allowed {
            Some(a) => a,
            None => *self.allowed.insert(sched_getaffinity(Pid::from_raw(0))?),
        };
        if !allowed.is_set(cpu).unwrap_or(false) {
            return Err(PinError::NotInAffinity {
                cpu,
                allowed: cpu_list(&allowed),
            });
        }
        let mut set = CpuSet::new();
        set.set(cpu)?;
        // Pid 0: the calling thread.
        sched_setaffinity(Pid::from_raw(0), &set)?;
        self.cpu = Some(cpu);
        Ok(())
    }

    /// Gives the calling thread its affinity from before it was pinned (`vif`: for the log).
    pub fn unpin(&mut self, vif: &str) {
        if let (Some(_), Some(all)) = (self.cpu.take(), self.allowed.as_ref()) {
            if let Err(e) = sched_setaffinity(Pid::from_raw(0), all) {
                log::warn!("{vif}: cannot undo the worker's CPU pinning: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // /proc/interrupts of a PV dom0 (Linux 6.1 on Xen 4.17) with one guest's vif.
    const DOM0: &str = "           CPU0       CPU1
  8:          0          0  xen-pirq    -ioapic-edge  rtc0
 24:       1650          0  xen-percpu    -virq      timer0
 71:         13          0  xen-dyn    -event     vif12.0-q0-tx
 72:          9          0  xen-dyn    -event     vif12.0-q0-rx
 73:          4          0  xen-dyn    -event     vif12.01-q0-tx
 74:          2          0  xen-dyn    -event     vif3.0-q0
 75:          2          0  xen-dyn    -event     vif3.0-q1
NMI:          0          0   Non-maskable interrupts
";

    #[test]
    fn finds_the_transmit_interrupt_of_a_queue() {
        assert_eq!(find_irq(DOM0, "vif12.0", 0), Some(71));
        assert_eq!(find_irq(DOM0, "vif12.01", 0), Some(73));
        // One event channel per queue.
        assert_eq!(find_irq(DOM0, "vif3.0", 0), Some(74));
        assert_eq!(find_irq(DOM0, "vif3.0", 1), Some(75));
        // No such queue, no such vif, a prefix of a name.
        assert_eq!(find_irq(DOM0, "vif12.0", 1), None);
        assert_eq!(find_irq(DOM0, "vif1.0", 0), None);
        assert_eq!(find_irq(DOM0, "vif12", 0), None);
        assert_eq!(find_irq("", "vif12.0", 0), None);
    }

    #[test]
    fn reads_cpu_lists() {
        assert_eq!(first_cpu("1\n"), Some(1));
        assert_eq!(first_cpu("0-3,8"), Some(0));
        assert_eq!(first_cpu("5,7"), Some(5));
        assert_eq!(first_cpu(""), None);
        assert_eq!(first_cpu("\n"), None);
        assert_eq!(first_cpu("x"), None);
    }

    /// A fake `/proc` and `/sys` with vif12.0's interrupt 71 on `cpu`.
    fn tree(cpu: usize, actions: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("temp dir");
        let p = d.path();
        std::fs::create_dir_all(p.join("proc/irq/71")).expect("mkdir");
        std::fs::create_dir_all(p.join("sys/kernel/irq/71")).expect("mkdir");
        std::fs::write(p.join("proc/interrupts"), DOM0).expect("write");
        std::fs::write(
            p.join("proc/irq/71/effective_affinity_list"),
            format!("{cpu}\n"),
        )
        .expect("write");
        std::fs::write(p.join("proc/irq/71/smp_affinity_list"), "0-1\n").expect("write");
        std::fs::write(p.join("sys/kernel/irq/71/actions"), actions).expect("write");
        d
    }

    /// Runs `f` on a thread of its own: the follower pins the calling thread.
    fn on_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().expect("test thread")
    }

    fn my_cpus() -> Vec<usize> {
        cpus_of(&sched_getaffinity(Pid::from_raw(0)).expect("affinity"))
    }

    #[test]
    fn pins_the_thread_to_the_interrupts_cpu_and_follows_it() {
        let cpus = my_cpus();
        let (first, last) = (cpus[0], *cpus.last().expect("a CPU"));
        let d = tree(last, "vif12.0-q0-tx\n");
        let root = d.path().to_path_buf();
        let (placed, moved, pinned_to) = on_thread(move || {
            let mut f = IrqFollower::with_root("vif12.0", 0, root.clone());
            let placed = f.check().cloned();
            // Within two seconds nothing is looked at again.
            assert!(f.check().is_none());
            std::fs::write(
                root.join("proc/irq/71/effective_affinity_list"),
                format!("{first}"),
            )
            .expect("write");
            f.next = Instant::now();
            let moved = f.check().cloned();
            (placed, moved, my_cpus())
        });
        assert_eq!(placed, Some(Placement::Pinned { irq: 71, cpu: last }));
        assert_eq!(
            moved,
            Some(Placement::Pinned {
                irq: 71,
                cpu: first
            })
        );
        assert_eq!(pinned_to, vec![first]);
    }

    #[test]
    fn a_vif_without_an_interrupt_stays_where_the_scheduler_puts_it() {
        let before = my_cpus();
        let d = tree(0, "vif12.0-q0-tx\n");
        let root = d.path().to_path_buf();
        let (placed, after) = on_thread(move || {
            let mut f = IrqFollower::with_root("vif5.0", 0, root);
            (f.check().cloned(), my_cpus())
        });
        assert_eq!(placed, Some(Placement::NoInterrupt));
        assert_eq!(after, before);
    }

    #[test]
    fn a_reused_interrupt_number_is_looked_up_again_and_the_pinning_undone() {
        let before = my_cpus();
        let cpu = before[0];
        let d = tree(cpu, "vif12.0-q0-tx\n");
        let root = d.path().to_path_buf();
        let (placed, gone, after) = on_thread(move || {
            let mut f = IrqFollower::with_root("vif12.0", 0, root.clone());
            let placed = f.check().cloned();
            // vif12.0 went away and interrupt 71 now serves something else.
            std::fs::write(root.join("sys/kernel/irq/71/actions"), "xhci_hcd\n").expect("write");
            std::fs::write(
                root.join("proc/interrupts"),
                "  71:  1  0  x  y  xhci_hcd\n",
            )
            .expect("write");
            f.next = Instant::now();
            let gone = f.check().cloned();
            (placed, gone, my_cpus())
        });
        assert_eq!(placed, Some(Placement::Pinned { irq: 71, cpu }));
        assert_eq!(gone, Some(Placement::NoInterrupt));
        assert_eq!(after, before);
    }

    #[test]
    fn writes_cpu_lists_as_the_kernel_does() {
        let set = |cpus: &[usize]| {
            let mut s = CpuSet::new();
            for &c in cpus {
                s.set(c).expect("cpu");
            }
            s
        };
        assert_eq!(cpu_list(&set(&[1])), "1");
        assert_eq!(cpu_list(&set(&[0, 1, 2, 3, 8])), "0-3,8");
        assert_eq!(cpu_list(&set(&[5, 7])), "5,7");
        assert_eq!(cpu_list(&set(&[])), "");
    }

    /// An operator who confines the service (`taskset`, systemd's `CPUAffinity=`) confines
    /// its workers: the kernel would let a thread widen its own affinity, so the pin must
    /// refuse a CPU outside it (needs two CPUs the test may use).
    #[test]
    fn a_cpu_outside_the_affinity_the_service_was_given_is_refused() {
        let cpus = my_cpus();
        if cpus.len() < 2 {
            eprintln!("skipped: needs two CPUs");
            return;
        }
        let (given, other) = (cpus[0], cpus[1]);
        let (res, after, inside) = on_thread(move || {
            let mut one = CpuSet::new();
            one.set(given).expect("cpu");
            sched_setaffinity(Pid::from_raw(0), &one).expect("confine the thread");
            let mut pin = ThreadPin::default();
            let res = pin.pin(other).map_err(|e| e.to_string());
            let after = my_cpus();
            // A CPU inside the affinity is still pinned to.
            let inside = pin.pin(given).is_ok() && pin.cpu() == Some(given);
            (res, after, inside)
        });
        let why = res.expect_err("pinned outside the service's CPUs");
        assert!(
            why.contains(&format!(
                "CPU {other} is not one of the service's CPUs ({given}"
            )),
            "{why}"
        );
        assert_eq!(after, vec![given]);
        assert!(inside);
    }

    #[test]
    fn a_cpu_outside_the_process_affinity_is_reported_not_forced() {
        let d = tree(CpuSet::count() - 1, "vif12.0-q0-tx\n");
        let root = d.path().to_path_buf();
        let placed = on_thread(move || IrqFollower::with_root("vif12.0", 0, root).check().cloned());
        assert!(
            matches!(placed, Some(Placement::NotAllowed { irq: 71, .. })),
            "{placed:?}"
        );
    }
}
