#!/usr/bin/env python3
"""What a TPACKET_V3 ring's block timeout costs the guests, with nothing else running.

Sets up the data-plane benchmark's two guests (benches/dataplane.py: namespaces, bridge
xenbr0, veths vif1.0 and vif2.0, offloads on) and measures guest-to-guest iperf3 (one stream)
with no capture, then with an AF_PACKET socket on each vif that keeps nothing (a classic BPF
filter returning 0): without a ring, and with a TPACKET_V3 ring of each block timeout given.
No frame ever reaches a ring, so what differs is the kernel's block-retire timer alone.
Configurations alternate within each round; medians. This is the measured reason for
`[inspect] block_timeout_ms` (docs/performance.md).

usage: sudo benches/ring_timeout.py [--timeouts 1,10,20,100] [--rounds 3] [--secs 3]
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataplane as d  # noqa: E402

# The capture side: sockets on vif1.0 and vif2.0 (argv: "plain" or a block timeout in ms).
TAP = r'''
import ctypes, mmap, socket, struct, sys, time
keep = []
for vif in ("vif1.0", "vif2.0"):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    if sys.argv[1] != "plain":
        s.setsockopt(263, 10, 2)  # PACKET_VERSION: TPACKET_V3
        bs, nb = 256 << 10, 16  # virtsec's passive ring: 16 blocks of 256 KiB
        s.setsockopt(263, 5, struct.pack("7I", bs, nb, 2048, bs // 2048 * nb, int(sys.argv[1]), 0, 0))
        keep.append(mmap.mmap(s.fileno(), bs * nb))
    ret0 = ctypes.create_string_buffer(struct.pack("HBBI", 6, 0, 0, 0), 8)  # ret #0
    s.setsockopt(socket.SOL_SOCKET, 26, struct.pack("HL", 1, ctypes.addressof(ret0)))  # SO_ATTACH_FILTER
    s.bind((vif, 0))
    keep += [s, ret0]
print("ready", flush=True)
time.sleep(3600)
'''


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--timeouts", default="1,10,20,100")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=int, default=3)
    a = ap.parse_args()
    configs = ["none", "plain"] + [f"{t}" for t in a.timeouts.split(",")]
    d.setup()
    srv = subprocess.Popen(["ip", "netns", "exec", d.G[1], "iperf3", "-s"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = {c: [] for c in configs}
    try:
        time.sleep(0.5)
        d.ping(20)
        for rnd in range(a.rounds):
            for c in configs:
                tap = None
                if c != "none":
                    tap = subprocess.Popen(["ip", "netns", "exec", d.DD, sys.executable, "-c", TAP, c],
                                           stdout=subprocess.PIPE, text=True)
                    tap.stdout.readline()
                g = d.iperf(1, a.secs)
                if tap:
                    tap.kill()
                    tap.wait()
                res[c].append(g)
                print(f"round {rnd + 1} {c:>6}: {g:6.2f} Gbit/s", flush=True)
    finally:
        srv.terminate()
        d.teardown()
    base = statistics.median(res["none"])
    print(f"\n`sudo benches/ring_timeout.py --timeouts {a.timeouts} --rounds {a.rounds} --secs {a.secs}`\n")
    print("| capture socket on each vif | Gbit/s (1 stream) | vs none |\n|---|---|---|")
    names = {"none": "none", "plain": "socket, no ring"}
    for c in configs:
        m = statistics.median(res[c])
        print(f"| {names.get(c, f'TPACKET_V3 ring, block timeout {c} ms')} | {m:.2f} | {m / base:.2f}x |")


if __name__ == "__main__":
    main()
