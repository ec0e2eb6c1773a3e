#!/usr/bin/env python3
"""Where an inline vif's added ping latency goes: waking the worker, or the worker's work.

An inline worker sleeps in poll() when its vif is quiet; a guest's ping then wakes it, and
the round trip pays for that wake-up on top of the worker's two crossings (request and
reply). How much the wake-up costs depends on where the worker wakes: on the CPU that
delivered the frame (it runs as soon as that CPU's softirq is done) or on another, idle
vCPU (an inter-processor interrupt, and on a virtualised host the hypervisor waking that
vCPU). On Xen, the CPU that delivers a guest's frames to the worker is the dom0 vCPU that
takes the vif's netback interrupt (`vifD.N-q0-tx`, or `vifD.N-q0` with one event channel);
in this bench, where a guest is a namespace, it is the CPU the pinging process runs on.

Same setup as benches/dataplane.py (two guests behind vif1.0 and vif2.0 on xenbr0 in a
backend namespace, 1,000 content rules, anti-spoofing, vif1.0 inline). The pinging
process runs on CPU 0 in every configuration; each round runs every configuration once,
in turn; ping 600 x 5 ms (no other load, or with `--after-load S` right after iperf3
guest-to-guest with 1 and then 4 streams for S seconds each, as benches/dataplane.py's ping
column is measured):

  none         no service (the baseline: added latency is each round's p50 minus the
               baseline's p50 in the same round; the median of those is reported)
  inline       the default, `[inspect.inline] placement = "auto"`: the idle worker pinned
               by the service to the CPU its vif's frames arrive on (counted per CPU in the
               kernel: CPU 0 here; on Xen the vCPU of the vif's netback interrupt)
  inline-sched the worker where the scheduler puts it (`placement = "scheduler"`)
  inline-same  the worker pinned by this script to CPU 0, where the frames are delivered
               (`placement = "scheduler"`): what "auto" should amount to here
  inline-other the worker pinned by this script to CPU 1 (`placement = "scheduler"`)
  inline-busy  the default placement, the worker polling without sleeping between frames
               (spin_us = 10 ms: no wake-up, a core kept busy)

usage: sudo benches/wakeup.py [--rounds 5] [--configs none,inline,...] [--after-load S]
Needs: root, 2 CPUs or more, iproute2, nftables, iperf3, python3; release binaries
(`cargo build --release`).
"""
import argparse, os, sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.dont_write_bytecode = True
import dataplane as d  # noqa: E402

CONFIGS = ["none", "inline", "inline-sched", "inline-same", "inline-other", "inline-busy"]
PINGER_CPU = 0


def ping(count):
    """p50 in µs of `count` pings from CPU 0; None when none was answered."""
    return d.ping(count, cpu=PINGER_CPU)[0] or None


def pin_workers(pid, cpu):
    """Pins the service's inline worker threads (named `vif vif1.0 inline`) to `cpu`."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text()
        except OSError:
            continue
        if "inli" in comm:
            os.sched_setaffinity(int(tid), {cpu})
            n += 1
    if n == 0:
        sys.exit("no inline worker thread found to pin")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rules", default=str(d.repo / "tests/fixtures/bench-1000.rules"))
    ap.add_argument("--work", default="/tmp/virtsec-wakeup")
    ap.add_argument("--after-load", type=int, default=0, metavar="S",
                    help="iperf3 1 and 4 streams for S seconds each before the pings")
    a = ap.parse_args()
    configs = a.configs.split(",")
    if configs[0] != "none" or any(c not in CONFIGS for c in configs):
        sys.exit(f"--configs: 'none' first, then any of {CONFIGS[1:]}")
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs 2 CPUs or more")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    d.WORKERS = 1
    p50 = {c: [] for c in configs}
    waits = {c: [] for c in configs}
    d.setup()
    xs = d.lab_xenstore(work)
    try:
        for r in range(a.rounds):
            for c in configs:
                svc = None
                if c != "none":
                    svc = d.Virtsec(work, c if c in ("inline", "inline-busy") else "inline-sched",
                                    a.rules)
                    if c in ("inline-same", "inline-other"):
                        pin_workers(svc.pid(), PINGER_CPU if c == "inline-same" else 1)
                ping(50)  # warm-up: ARP, flows
                if a.after_load:
                    d.iperf(1, a.after_load)
                    d.iperf(4, a.after_load)
                before = svc.waits() if svc else {}
                p = ping(600)
                if svc:
                    waits[c].append(d.wait_p50(before, svc.waits()))
                    svc.stop()
                p50[c].append(p)
                print(f"round {r + 1} {c}: ping p50 {p} µs", flush=True)
    finally:
        xs.terminate()
        d.teardown()
    base = p50["none"]
    load = f" --after-load {a.after_load}" if a.after_load else ""
    print(f"\n`sudo benches/wakeup.py --rounds {a.rounds} --configs {a.configs}{load}` "
          f"({a.rounds} rounds, {os.cpu_count()} CPUs, kernel {os.uname().release})\n")
    print("| configuration | ping p50 µs | added p50 µs (paired) | rounds' added, min–max "
          "| worker's verdict wait p50 µs (each crossing) |")
    print("|---|---|---|---|---|")
    for c in configs:
        xs_ = [x for x in p50[c] if x is not None]
        added = [x - b for x, b in zip(p50[c], base) if x is not None and b is not None]
        w = [x for x in waits[c] if x is not None]
        print(f"| {c} | {d.med(xs_):.0f} | {'+0' if c == 'none' else f'{d.med(added):+.0f}'} | "
              f"{'–' if c == 'none' or not added else f'{min(added):+.0f} – {max(added):+.0f}'} | "
              f"{'–' if not w else f'{d.med(w):.0f}'} |")


if __name__ == "__main__":
    main()
