#!/usr/bin/env python3
"""Live data-plane benchmark: what inspection costs guests, in one run, configurations alternated.

A simulated backend domain (network namespace `vsbench-d0`, bridge xenbr0) with two guests
(namespaces behind veths vif1.0 and vif2.0, 169.254.77.1/.2, MTU 1500, guest offloads left on),
both listed in a lab XenStore as libxl writes them. For each configuration, in alternating
rounds: iperf3 guest-to-guest with 1 and 4 streams (with guest 1 pinging guest 2 every 10 ms
during the 4 streams: the latency a guest's other traffic sees behind its own bulk transfer,
and the share of those pings never answered), ping (p50/p99), sockperf TCP ping-pong
(64 B, p50/p99), the inspector's CPU per Gbit/s and its capture losses. For inline
configurations, the p50 of how long the ping's frames waited in the worker for their verdict
(the service's `virtsec_inline_verdict_wait_seconds`, read before and after the pings): each
ping crosses the worker twice, and what the round trip adds beyond twice that wait is the
kernel's handing over of frames (and, on a slow host, waking the pinging process).

Configurations:
  none         no inspection (the baseline every ratio is against: each round's throughput
               over the baseline's in the same round, then the median and range of those)
  passive      virtsecd, 1,000 content rules, anti-spoofing, every vif passive (the default
               capture: a packet socket's queue, read with recvmmsg)
  *-ring       passive vifs read through a TPACKET_V3 ring (`capture = "ring"`): the kernel
               copies each frame on the guest's path instead of the worker on its own CPU
  inline       virtsecd, same rules, vif1.0 inline (AF_PACKET + PACKET_VNET_HDR bridge), vif2.0
               passive (Suricata's inline modes in ../shared/docs/inline-peers.md bridge vif1.0)
  *-bypass     the same with inspect_past_depth = false (stop inspecting a connection
               direction after its first MiB, like Suricata's stream bypass)
  inline-busy  inline workers keep polling between frames (spin_us = 10 ms): no thread
               wake-up per frame, a core per worker
  *-sNus       inline workers keep polling N µs after forwarding frames before they sleep
               (`spin_us`; default 50)
  *-sched      inline workers left where the scheduler puts them (`placement = "scheduler"`)
               instead of beside their guest's frames while idle (the default, "auto")
  *-tc         inline with its kernel fast path attached as tc cls_bpf filters (kernels
               without tcx) instead of tcx links
  *-wNms       inline with `max_wait_us` = N ms (default 20 ms, 2 ms before 2026-11-29): the
               overload threshold past which frames are dropped (fail closed, as here)
  *-qNmib      passive vifs read through a queue bounded at N MiB (`queue_mib`; default 64,
               16 before 2026-12-07)
  antispoof    virtsecd with anti-spoofing only (no rules: nothing captured): what the
               kernel rules every other virtsec configuration has cost on their own
  suricata-ids Suricata 7 AF_PACKET IDS on vif1.0, same rules (when suricata is installed);
               its "frames lost" also counts the packets its ring truncated (GSO super-frames
               longer than its ring frame: decoded as invalid, never inspected), read from
               its stats.log, which the run switches on (needs python3-yaml)
  suricata-ips Suricata 7 AF_PACKET copy-mode IPS between vif1.0 and a veth into xenbr0 (the
               topology of ../shared/docs/inline-peers.md), same rules, with the guests'
               checksum and segmentation offloads turned off for the run (with them on its
               TCP never connects): Suricata's inline mode as it can run, the peer of `inline`

--own-cpu: the inspector (virtsecd or Suricata) runs on CPUs 1..n-1 and the guests' programs
(iperf3, ping, sockperf, and so the kernel's forwarding of their frames) on CPU 0, the baseline
too: Xen's topology, where the guests' vCPUs are not dom0's, instead of the default's, where
guests and inspector share every CPU. Its table goes between the `dataplane-own-cpu` markers.
--backend-cpu (with --own-cpu): the vifs' received frames are steered (RPS) to the service's
CPUs, so the guests' frames enter the backend's stack and are forwarded there, as netback's
NAPI poll does on a dom0 vCPU; the baseline too (its frames then cross CPUs as on Xen).
--section NAME writes between `NAME` markers instead (a section of its own).

--small-frames adds a column: guest 1 sends 64-byte UDP datagrams to guest 2 as fast as one
iperf3 sender goes; thousands of frames a second guest 2 received, and the inspector's CPU time
per frame sent (the per-frame cost that bulk transfers hide).

usage: sudo benches/dataplane.py [--rounds 3] [--secs 5] [--work /tmp/virtsec-dp] [--own-cpu] [--small-frames]
                                 [--configs none,passive,inline,suricata-ids] [--write docs/performance.md]
Needs: root, iproute2, nftables, iperf3, sockperf, python3; release binaries (built first).
"""
import argparse, json, os, re, signal, statistics, subprocess, sys, time
from pathlib import Path

repo = Path(__file__).resolve().parent.parent
bench = Path(os.environ.get("BENCH_DIR", repo.parent / "shared" / "bench"))
# VIRTSEC_BIN_DIR: binaries from elsewhere (benches/bundle.sh), with --no-build.
BIN = Path(os.environ.get("VIRTSEC_BIN_DIR", repo / "target/release"))
VIRTSEC = BIN / "virtsec"
VIRTSECD = BIN / "virtsecd"
DD, G = "vsbench-d0", ["vsbench-g1", "vsbench-g2"]
# Inspection threads per vif (--workers; default: 1 on small machines, 4 from 8 CPUs up).
WORKERS = 1
# --own-cpu: what the guests' programs and the inspector run under (taskset), else nothing.
GUEST_PIN, SERVICE_PIN = [], []
# --backend-cpu: the RPS mask (hex) that steers the vifs' received frames to the service's CPUs.
BACKEND_RPS = ""
# virtsecd's Prometheus endpoint inside the backend domain's namespace.
METRICS_PORT = 9977
ADDR = ["169.254.77.1", "169.254.77.2"]
MAC = ["02:00:00:00:77:01", "02:00:00:00:77:02"]


def sh(*cmd, check=True, **kw):
    return subprocess.run([str(c) for c in cmd], check=check, text=True, capture_output=True, **kw)


def ns(n, *cmd, **kw):
    return sh("ip", "netns", "exec", n, *cmd, **kw)


def teardown():
    for n in [DD] + G:
        sh("ip", "netns", "del", n, check=False)


def setup():
    teardown()
    sh("ip", "netns", "add", DD)
    sh("ip", "-n", DD, "link", "add", "xenbr0", "type", "bridge")
    sh("ip", "-n", DD, "link", "set", "xenbr0", "up")
    sh("ip", "-n", DD, "link", "set", "lo", "up")
    for i, g in enumerate(G):
        vif = f"vif{i + 1}.0"
        sh("ip", "netns", "add", g)
        sh("ip", "-n", DD, "link", "add", vif, "type", "veth", "peer", "name", "eth0", "netns", g)
        sh("ip", "-n", DD, "link", "set", vif, "master", "xenbr0", "up")
        if BACKEND_RPS:
            # --backend-cpu: what the guest sends is taken into the backend's stack on the
            # service's CPUs, as netback's NAPI poll does on a dom0 vCPU.
            ns(DD, "sh", "-c", f"echo {BACKEND_RPS} > /sys/class/net/{vif}/queues/rx-0/rps_cpus")
        sh("ip", "-n", g, "link", "set", "eth0", "address", MAC[i])
        sh("ip", "-n", g, "addr", "add", ADDR[i] + "/16", "dev", "eth0")
        sh("ip", "-n", g, "link", "set", "eth0", "up")
        sh("ip", "-n", g, "link", "set", "lo", "up")


def lab_xenstore(work):
    """Starts a lab XenStore on `work`/xs.sock and lists the two guests in it as libxl writes
    them (after setup()); returns its process, for the caller to terminate."""
    xs = subprocess.Popen([str(VIRTSEC), "lab", "xenstored", "--socket", str(work / "xs.sock")],
                          stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        for i in (1, 2):
            sh(VIRTSEC, "lab", "guest", "--xenstore-socket", work / "xs.sock", "create", "--domid", i,
               "--name", f"g{i}", "--mac", MAC[i - 1], "--ip", ADDR[i - 1])
    except BaseException:
        xs.terminate()
        raise
    return xs


def cpu_s(pid):
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Virtsec:
    def __init__(self, work, config, rules):
        mode = config.split("-")[0]
        past = "false" if "-bypass" in config else "true"
        # -busy: inline workers poll without sleeping between frames ~100 times a second or
        # more (spin_us = 10 ms), trading a core per worker for no thread wake-up per frame.
        keys = ["spin_us = 10000"] if "-busy" in config else []
        # -sNus: inline workers keep polling N µs after forwarding (`spin_us`, default 50).
        spin = re.search(r"-s(\d+)us", config)
        if spin:
            keys.append(f"spin_us = {int(spin.group(1))}")
        # -tc: the inline fast path attached as tc cls_bpf filters (what kernels without tcx,
        # such as Debian 12's 6.1, get) instead of tcx links.
        if config.endswith("-tc"):
            keys.append('fast_path_attach = "tc"')
        # -wNms: the overload threshold (`max_wait_us`) at N ms instead of the default.
        wait = re.search(r"-w(\d+)ms", config)
        if wait:
            keys.append(f"max_wait_us = {int(wait.group(1)) * 1000}")
        # -sched: inline workers never pinned (the default before `placement = "auto"`).
        if "-sched" in config:
            keys.append('placement = "scheduler"')
        # -ring: passive vifs read through a TPACKET_V3 ring instead of the socket's queue.
        passive_keys = 'capture = "ring"\n' if "-ring" in config else ""
        # -qNmib: the queue's bound (`queue_mib`) at N MiB instead of the default.
        bound = re.search(r"-q(\d+)mib", config)
        if bound:
            passive_keys += f"queue_mib = {int(bound.group(1))}\n"
        inline_section = "".join(f"{k}\n" for k in ["[inspect.inline]"] + keys) if keys else ""

        self.work, self.mode = work, config
        cfg = work / f"virtsecd-{config}.toml"
        # antispoof: the kernel rules alone (no rules loaded: no capture, no inspection).
        rule_files = "" if mode == "antispoof" else f'"{rules}"'
        cfg.write_text(
            f'[xenstore]\npath = "{work}/xs.sock"\n[control]\nsocket = "{work}/control.sock"\n'
            f'[log]\ntarget = "stderr"\nlevel = "warn"\n'
            f'[inspect]\nrules = [{rule_files}]\neve = "{work}/eve.json"\nmode = "passive"\n'
            f'inspect_past_depth = {past}\nworkers_per_vif = {WORKERS}\n{passive_keys}'
            # Here the guests share the service's CPUs (on Xen they have their own vCPUs): the
            # workers get them first, as they would get dom0's (docs/configuration.md, `nice`).
            f'nice = -10\n'
            f'[enforce]\nantispoof = true\n'
            f'[metrics]\nlisten = "127.0.0.1:{METRICS_PORT}"\n'
            # Inline on guest 1's vif only, as Suricata's inline modes bridge vif1.0 only;
            # vif2.0 stays passive (still inspected).
            + inline_section + ('[[policy]]\nname = "g1"\nmode = "inline"\n' if mode == "inline" else ""))
        self.log = open(work / f"virtsecd-{mode}.log", "a")
        self.p = subprocess.Popen(["ip", "netns", "exec", DD, *SERVICE_PIN, str(VIRTSECD), "--config", str(cfg)],
                                  stderr=self.log, stdout=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline:
            st = self.status()
            vifs = (st or {}).get("inspection", {})
            if mode == "antispoof":
                if all(f"vif{i}.0" in ((st or {}).get("antispoof") or {}) for i in (1, 2)):
                    break
            elif all(vifs.get(f"vif{i}.0", {}).get("attached") for i in (1, 2)):
                break
            time.sleep(0.1)
        else:
            self.stop()
            sys.exit(f"virtsecd ({mode}) did not attach; see {work}/virtsecd-{mode}.log")

    def pid(self):
        return self.p.pid

    def status(self):
        r = sh(VIRTSEC, "--control-socket", self.work / "control.sock", "status", "--json", check=False)
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def waits(self):
        """Inline vif1.0's verdict-wait histogram now: {upper bound in µs (inf last): count}."""
        r = ns(DD, sys.executable, "-c", "import urllib.request,sys; sys.stdout.write(urllib.request."
               f"urlopen('http://127.0.0.1:{METRICS_PORT}/metrics', timeout=5).read().decode())", check=False)
        out = {}
        for m in re.finditer(r'virtsec_inline_verdict_wait_seconds_bucket\{vif="vif1\.0",le="([^"]+)"\} (\S+)',
                             r.stdout):
            out[float("inf") if m.group(1) == "+Inf" else float(m.group(1)) * 1e6] = float(m.group(2))
        return out

    def losses(self):
        st = self.status() or {}
        lost = seen = 0
        for v in st.get("inspection", {}).values():
            # Frames the capture filter counted in the kernel without copying passed too.
            seen += v.get("frames", 0) + v.get("uncopied", 0)
            # Every cause the service counts: ring or receive-queue drops in the kernel,
            # overload drops, frames too long to read, refused sends.
            lost += v.get("lost", 0)
        return lost, seen

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(timeout=20)
        # Inline vifs stay spliced (fail closed): put them back for the next configuration.
        ns(DD, VIRTSEC, "inline", "restore", check=False)
        ns(DD, "nft", "delete", "table", "bridge", "virtsec", check=False)
        ns(DD, "nft", "delete", "table", "netdev", "virtsec_inline", check=False)


def enable_stats(y):
    """Switches on Suricata's stats.log (totals, every second) in config `y`, so the run can
    read how many packets its ring truncated. False without python3-yaml."""
    try:
        import yaml
    except ImportError:
        return False
    c = yaml.safe_load(y.read_text().replace("%YAML 1.1", ""))
    c["stats"] = {**(c.get("stats") or {}), "enabled": True, "interval": 1}
    outputs = c.setdefault("outputs", [])
    st = {"enabled": True, "filename": "stats.log", "append": False, "totals": True, "threads": False}
    for o in outputs:
        if "stats" in o:
            o["stats"] = {**(o["stats"] or {}), **st}
            break
    else:
        outputs.append({"stats": st})
    y.write_text("%YAML 1.1\n---\n" + yaml.safe_dump(c, sort_keys=False))
    return True


class Suricata:
    def __init__(self, work, rules, iface="vif1.0"):
        self.dir = work / ("suricata-live" if iface else "suricata-ips")
        self.dir.mkdir(exist_ok=True)
        y = self.dir / "suricata.yaml"
        if os.environ.get("SURICATA_YAML"):
            y.write_text(Path(os.environ["SURICATA_YAML"]).read_text())
        elif not y.exists():
            sh(sys.executable, bench / "make_suricata_yaml.py", y)
        self.stats = enable_stats(y)
        for f in ("suricata.log", "eve.json"):
            (self.dir / f).unlink(missing_ok=True)
        self.out = open(self.dir / "stdout.txt", "w")
        self.p = subprocess.Popen(
            ["ip", "netns", "exec", DD, *SERVICE_PIN, "suricata", "-c", str(y), "-S", str(rules), "-l", str(self.dir),
             "-k", "none", f"--af-packet={iface}" if iface else "--af-packet", "--runmode", "workers",
             "-vv"],
            stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            if "Engine started" in (self.dir / "stdout.txt").read_text(errors="replace"):
                break
            time.sleep(0.2)
        else:
            self.stop()
            sys.exit("suricata did not start; see " + str(self.dir / "stdout.txt"))
        time.sleep(1)

    def pid(self):
        return self.p.pid

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(timeout=60)

    def truncated(self):
        """Packets Suricata's ring cut short (`decoder.event.afpacket.trunc_pkt`: a GSO
        super-frame longer than its ring frame), decoded as invalid and not inspected; None
        without stats (no python3-yaml to switch them on)."""
        if not self.stats:
            return None
        try:
            t = (self.dir / "stats.log").read_text(errors="replace")
        except OSError:
            return None
        last = re.findall(r"^decoder\.event\.afpacket\.trunc_pkt\s*\|\s*Total\s*\|\s*(\d+)", t, re.M)
        return int(last[-1]) if last else 0

    def losses(self):
        t = (self.dir / "stdout.txt").read_text(errors="replace")
        pk = sum(int(x) for x in re.findall(r"device: vif1\.0: packets: (\d+), drops: \d+", t))
        dr = sum(int(x) for x in re.findall(r"device: vif1\.0: packets: \d+, drops: (\d+)", t))
        return dr, pk


# The guests' offloads Suricata's copy-mode IPS cannot carry (partial checksums, GSO).
OFFLOADS = ["tx", "sg", "tso", "gso", "gro"]


def guest_offloads(on):
    for g in G:
        ns(g, "ethtool", "-K", "eth0", *[x for o in OFFLOADS for x in (o, "on" if on else "off")],
           check=False)


class SuricataIps(Suricata):
    """Suricata's AF_PACKET copy-mode IPS: vif1.0 leaves xenbr0, a veth pair (vif1.0-br in the
    bridge, vif1.0-ips for Suricata) takes its place, and Suricata copies frames between vif1.0
    and vif1.0-ips after inspection. Guest offloads off while it runs."""

    def __init__(self, work, rules):
        guest_offloads(False)
        sh("ip", "-n", DD, "link", "set", "vif1.0", "nomaster")
        sh("ip", "-n", DD, "link", "add", "vif1.0-br", "type", "veth", "peer", "name", "vif1.0-ips")
        sh("ip", "-n", DD, "link", "set", "vif1.0-br", "master", "xenbr0", "up")
        sh("ip", "-n", DD, "link", "set", "vif1.0-ips", "up")
        d = work / "suricata-ips"
        d.mkdir(exist_ok=True)
        # The IDS column's configuration (SURICATA_YAML: a bundle's) with both sides as IPS.
        base = Path(os.environ.get("SURICATA_YAML") or d / "base.yaml")
        if not base.exists():
            sh(sys.executable, bench / "make_suricata_yaml.py", base)
        import yaml  # python3-yaml (checked in main)
        c = yaml.safe_load(base.read_text().replace("%YAML 1.1", ""))
        side = lambda a, b, cid: {"interface": a, "threads": 1, "copy-mode": "ips", "copy-iface": b,
                                  "cluster-id": cid, "cluster-type": "cluster_flow", "defrag": False,
                                  "use-mmap": True}
        c["af-packet"] = [side("vif1.0", "vif1.0-ips", 98), side("vif1.0-ips", "vif1.0", 97)]
        y = d / "suricata.yaml"
        y.write_text("%YAML 1.1\n---\n" + yaml.safe_dump(c, sort_keys=False))
        saved = os.environ.get("SURICATA_YAML")
        os.environ["SURICATA_YAML"] = str(y)
        try:
            super().__init__(work, rules, iface=None)
        finally:
            if saved is None:
                del os.environ["SURICATA_YAML"]
            else:
                os.environ["SURICATA_YAML"] = saved

    def stop(self):
        super().stop()
        sh("ip", "-n", DD, "link", "del", "vif1.0-br", check=False)
        sh("ip", "-n", DD, "link", "set", "vif1.0", "master", "xenbr0", "up")
        guest_offloads(True)


def iperf(streams, secs):
    r = ns(G[0], *GUEST_PIN, "iperf3", "-c", ADDR[1], "-t", secs, "-P", streams, "-J", check=False)
    try:
        return json.loads(r.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError):
        return 0.0


def small_frames(secs):
    """Guest 1 sends 64-byte UDP datagrams to guest 2 for `secs` seconds as fast as one iperf3
    sender goes; returns (frames sent, frames received), 0s when iperf3 failed."""
    r = ns(G[0], *GUEST_PIN, "iperf3", "-c", ADDR[1], "-u", "-l", "64", "-b", "0", "-t", secs, "-J",
           check=False)
    try:
        e = json.loads(r.stdout)["end"]["sum"]
        return e["packets"], e["packets"] - e["lost_packets"]
    except (ValueError, KeyError):
        return 0, 0


def pings_during(secs, run):
    """Guest 1 pings guest 2 every 10 ms while `run()` runs (a bulk transfer of about `secs`
    seconds, in the same direction as the pings' requests); returns (what `run()` returned,
    p50 and p99 round trip in µs of the answered pings, the fraction never answered)."""
    count = max(1, secs * 100 - 50)
    p = subprocess.Popen(["ip", "netns", "exec", G[0], *GUEST_PIN, "ping", "-c", str(count), "-i", "0.01", ADDR[1]],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        out = run()
    finally:
        text = p.communicate(timeout=secs + 30)[0]
    p50, p99, answered = rtts(text)
    return out, (p50, p99, 1 - answered / count)


def rtts(text):
    """p50 and p99 in µs of the round trips in ping's output `text` (0.0 when none), and how
    many there were."""
    t = sorted(float(x) * 1000 for x in re.findall(r"time=([\d.]+) ms", text))
    if not t:
        return 0.0, 0.0, 0
    return t[len(t) // 2], t[min(len(t) - 1, int(len(t) * 0.99))], len(t)


def ping(count, cpu=None):
    """p50 and p99 round trip in µs of guest 1's pings to guest 2 (on `cpu` if given)."""
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else GUEST_PIN
    r = ns(G[0], *pin, "ping", "-c", count, "-i", "0.005", ADDR[1], check=False)
    return rtts(r.stdout)[:2]


def sockperf(secs):
    """TCP ping-pong round trip (p50, p99) in µs, or None when sockperf failed three times (a
    failed run is left out of the medians, never counted as 0)."""
    for _ in range(3):
        r = sockperf_once(secs)
        if r:
            return r
        time.sleep(1)
    return None


def sockperf_once(secs):
    # A fresh server each time: a connection cut by a previous configuration (inline restore,
    # a service stop) must not leave the next measurement talking to a stuck server.
    srv = subprocess.Popen(["ip", "netns", "exec", G[1], *GUEST_PIN, "sockperf", "server", "--tcp", "-i", ADDR[1],
                            "-p", "11111"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    try:
        r = ns(G[0], *GUEST_PIN, "sockperf", "ping-pong", "--tcp", "-i", ADDR[1], "-p", "11111", "-m", "64", "-t",
               secs, check=False, timeout=secs + 20)
        out = r.stdout + r.stderr
    except subprocess.TimeoutExpired:
        out = ""
    finally:
        srv.terminate()
        srv.wait()
    p50 = re.search(r"percentile 50\.000 =\s+([\d.]+)", out)
    p99 = re.search(r"percentile 99\.000 =\s+([\d.]+)", out)
    if not (p50 and p99):
        return None
    # sockperf reports half the round trip (latency = RTT/2); report the round trip.
    return (2 * float(p50.group(1)), 2 * float(p99.group(1)))


def wait_p50(before, after):
    """p50 in µs of the verdict waits recorded between two `Virtsec.waits()` (cumulative
    buckets), interpolated in its bucket as the service does; None without samples."""
    bounds = sorted(after)
    counts, prev = [], 0.0
    for b in bounds:
        cum = after[b] - before.get(b, 0.0)
        counts.append(cum - prev)
        prev = cum
    n = sum(counts)
    if n <= 0:
        return None
    rank, below, lo = n / 2, 0.0, 0.0
    for b, c in zip(bounds, counts):
        if c > 0 and below + c >= rank:
            return lo if b == float("inf") else lo + (rank - below) / c * (b - lo)
        below += c
        lo = b
    return lo


def med(xs):
    return statistics.median(xs) if xs else 0.0


def paired(xs, base):
    """Each round's value over the baseline's value in the same round (rounds where the
    baseline measured nothing are left out)."""
    return [x / b for x, b in zip(xs, base) if b > 0]


def spread(ratios):
    return f"{min(ratios):.2f}–{max(ratios):.2f}" if ratios else "–"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--work", default="/tmp/virtsec-dp")
    ap.add_argument("--configs", default="none,antispoof,passive,passive-bypass,inline,inline-bypass,suricata-ids")
    ap.add_argument("--rules", default=str(repo / "tests/fixtures/bench-1000.rules"))
    ap.add_argument("--write")
    ap.add_argument("--section", help="the markers --write replaces (default: dataplane, or "
                    "dataplane-own-cpu with --own-cpu)")
    ap.add_argument("--no-build", action="store_true", help="use the binaries as they are")
    ap.add_argument("--workers", type=int, default=4 if (os.cpu_count() or 1) >= 8 else 1,
                    help="workers_per_vif (default: 4 from 8 CPUs up, else 1)")
    ap.add_argument("--small-frames", action="store_true",
                    help="add 64-byte UDP frames a second and the inspector's CPU per frame")
    ap.add_argument("--backend-cpu", action="store_true",
                    help="with --own-cpu: the guests' frames enter the backend's stack on the "
                         "service's CPUs (RPS on the vifs), as netback delivers them on dom0's")
    ap.add_argument("--own-cpu", action="store_true",
                    help="the inspector on CPUs 1..n-1, the guests on CPU 0 (Xen's topology)")
    a = ap.parse_args()
    global WORKERS, GUEST_PIN, SERVICE_PIN, BACKEND_RPS
    WORKERS = a.workers
    if a.own_cpu:
        n = os.cpu_count() or 1
        if n < 2:
            sys.exit("--own-cpu needs 2 CPUs or more")
        GUEST_PIN = ["taskset", "-c", "0"]
        SERVICE_PIN = ["taskset", "-c", f"1-{n - 1}"]
        if a.backend_cpu:
            BACKEND_RPS = format(((1 << n) - 1) & ~1, "x")
    elif a.backend_cpu:
        sys.exit("--backend-cpu needs --own-cpu")
    if os.geteuid() != 0:
        sys.exit("needs root (namespaces, nftables)")
    configs = a.configs.split(",")
    for c in ("suricata-ids", "suricata-ips"):
        if c in configs and sh("which", "suricata", check=False).returncode:
            print(f"suricata not installed: skipping the {c} column", file=sys.stderr)
            configs.remove(c)
    if "suricata-ips" in configs:
        try:
            import yaml  # noqa: F401 (SuricataIps writes its af-packet section with it)
        except ImportError:
            print("python3-yaml not installed: skipping the suricata-ips column", file=sys.stderr)
            configs.remove("suricata-ips")
        if "suricata-ips" in configs and sh("which", "ethtool", check=False).returncode:
            print("ethtool not installed: skipping the suricata-ips column", file=sys.stderr)
            configs.remove("suricata-ips")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if not a.no_build:
        sh("cargo", "build", "--release", "--quiet", cwd=repo)
    setup()
    xs = lab_xenstore(work)
    srv = []
    try:
        srv.append(subprocess.Popen(["ip", "netns", "exec", G[1], *GUEST_PIN, "iperf3", "-s"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(1)
        res = {c: {"g1": [], "g4": [], "ping": [], "rr": [], "cpu": [], "lost": [], "seen": [], "wait": [],
                   "trunc": [], "loaded": [], "small": []}
               for c in configs}
        for rnd in range(a.rounds):
            for c in configs:
                svc = None
                if c.startswith(("passive", "inline", "antispoof")):
                    svc = Virtsec(work, c, a.rules)
                elif c == "suricata-ids":
                    svc = Suricata(work, a.rules)
                elif c == "suricata-ips":
                    svc = SuricataIps(work, a.rules)
                ping(50)  # warm ARP and the flow tables
                c0, t0 = (cpu_s(svc.pid()) if svc else 0.0), time.time()
                g1 = iperf(1, a.secs)
                g4, loaded = pings_during(a.secs, lambda: iperf(4, a.secs))
                c1, t1 = (cpu_s(svc.pid()) if svc else 0.0), time.time()
                inline = isinstance(svc, Virtsec) and c.startswith("inline")
                w0 = svc.waits() if inline else {}
                p = ping(1000 if a.secs >= 5 else 200)
                if inline:
                    wp = wait_p50(w0, svc.waits())
                    if wp is not None:
                        res[c]["wait"].append(wp)
                rr = sockperf(max(2, a.secs // 2))
                if a.small_frames:
                    c2 = cpu_s(svc.pid()) if svc else 0.0
                    secs = max(2, a.secs // 2)
                    sent, got = small_frames(secs)
                    us = ((cpu_s(svc.pid()) if svc else 0.0) - c2) * 1e6 / sent if sent else 0.0
                    res[c]["small"].append((got / secs / 1e3, us))
                if svc:
                    if isinstance(svc, Suricata):
                        svc.stop()
                        lost, seen = svc.losses()
                        tr = svc.truncated()
                        if tr is not None:
                            res[c]["trunc"].append(tr)
                    else:
                        lost, seen = svc.losses()
                        svc.stop()
                else:
                    lost, seen = 0, 0
                r = res[c]
                r["g1"].append(g1); r["g4"].append(g4); r["ping"].append(p); r["loaded"].append(loaded)
                if rr:
                    r["rr"].append(rr)
                r["cpu"].append((c1 - c0) / (t1 - t0) * 100 if svc else 0.0)
                r["lost"].append(lost); r["seen"].append(seen)
                wt = f" (verdict wait p50 {r['wait'][-1]:.0f} us)" if inline and r["wait"] else ""
                if isinstance(svc, Suricata) and r["trunc"]:
                    wt += f" ({r['trunc'][-1]} packets truncated)"
                print(f"round {rnd + 1} {c:>12}: {g1:6.2f} / {g4:6.2f} Gbit/s, ping p50 {p[0]:.0f} us{wt}, "
                      f"RR p50 {f'{rr[0]:.0f} us' if rr else 'failed'}, cpu {r['cpu'][-1]:.0f}%, lost {lost}/{seen}", flush=True)
    finally:
        for s in srv:
            s.terminate()
        xs.terminate()
        teardown()
    base = res[configs[0]]
    rows = []
    for c in configs:
        r = res[c]
        g1, g4 = med(r["g1"]), med(r["g4"])
        # Each round's throughput against the baseline's in the same round (its neighbour in
        # time), then the median and the spread of those ratios: the host's drift between
        # rounds cancels out, which a ratio of two medians does not do.
        q1, q4 = paired(r["g1"], base["g1"]), paired(r["g4"], base["g4"])
        # Added latency the same way: each round's p50 minus the baseline's in that round.
        added = [p[0] - b[0] for p, b in zip(r["ping"], base["ping"])]
        p50, p99 = med([p[0] for p in r["ping"]]), med([p[1] for p in r["ping"]])
        rr = (f"{med([x[0] for x in r['rr']]):.0f} / {med([x[1] for x in r['rr']]):.0f}"
              if r["rr"] else "n/a (sockperf failed)")
        cpu = med(r["cpu"])
        gbps_avg = (g1 + g4) / 2
        lost, seen = sum(r["lost"]), sum(r["seen"])
        rows.append(
            f"| {c} | {g1:.2f} / {g4:.2f} | {med(q1):.2f}x / {med(q4):.2f}x | {spread(q1)} / {spread(q4)} | "
            f"{p50:.0f} / {p99:.0f} | "
            f"{med(added):+.0f}" + (f" (wait {med(r['wait']):.0f})" if r["wait"] else "") + " | "
            f"{med([x[0] for x in r['loaded']]):.0f} / {med([x[1] for x in r['loaded']]):.0f} "
            f"({100 * med([x[2] for x in r['loaded']]):.0f}%) | {rr} | "
            + (f"{cpu:.0f}% ({cpu / gbps_avg:.1f}% per Gbit/s)" if c != "none" else "–") + " | "
            + (f"{lost} of {seen} ({100 * lost / seen:.2f}%)" if seen else ("–" if c == "none" else f"{lost}"))
            + (f"; {sum(r['trunc'])} truncated ({100 * sum(r['trunc']) / seen:.0f}%), not inspected"
               if r["trunc"] and seen else "")
            + " |"
            + (f" {med([x[0] for x in r['small']]):.0f}"
               + (f" ({med([x[1] for x in r['small']]):.2f} µs)" if c != "none" else "") + " |"
               if a.small_frames else ""))
    cmd = (f"sudo benches/dataplane.py --rounds {a.rounds} --secs {a.secs} --workers {a.workers} "
           + ("--own-cpu " if a.own_cpu else "") + ("--backend-cpu " if a.backend_cpu else "")
           + ("--small-frames " if a.small_frames else "")
           + f"--configs {','.join(configs)}")
    table = "\n".join([
        "| configuration | Gbit/s 1 / 4 streams | vs none (paired) | rounds' ratios, min–max | ping p50 / p99 µs | "
        "ping p50 added µs (inline: verdict wait p50) | ping during 4 streams p50 / p99 µs (unanswered) | "
        "TCP RR p50 / p99 µs | inspector CPU (% of a core) | frames lost |"
        + (" 64 B UDP kframes/s received (inspector CPU per frame) |" if a.small_frames else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if a.small_frames else ""), *rows])
    print(f"\n`{cmd}` ({a.rounds} alternating rounds, medians; \"vs none\" and \"added\": medians of "
          f"each round's ratio to, or difference from, that round's baseline)\n\n{table}")
    if a.write:
        doc = Path(a.write)
        text = doc.read_text()
        name = a.section or ("dataplane-own-cpu" if a.own_cpu else "dataplane")
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        block = f"{begin}\n`{cmd}` ({a.rounds} alternating rounds, medians, ratios paired by round; {os.cpu_count()} CPUs, " \
                f"kernel {os.uname().release})\n\n{table}\n{end}"
        if begin in text:
            text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
        else:
            text += "\n" + block + "\n"
        doc.write_text(text)


if __name__ == "__main__":
    main()
