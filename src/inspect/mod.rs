//! Offline inspection (`virtsec inspect`): pcap/pcapng → decode → flow/stream → detect → EVE.
//!
//! The same engine serves the live data plane later: [`Engine::packet`] takes one frame with
//! its timestamp and returns nothing but counters and alerts, so the source of frames
//! (a file here, an AF_PACKET ring there) is the caller's business.

pub mod eve;

use std::fs::File;
use std::io::{BufReader, IsTerminal, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pcap_file::pcap::PcapReader;
use pcap_file::pcapng::{Block, PcapNgReader};
use pcap_file::DataLink;

use crate::decode::{self, DecodeStats, Packet, Proto};
use crate::detect::matcher::Backend;
use crate::detect::rules::{Action, Rule, RuleSet, Vars};
use crate::detect::{Ctx, Detector, DirState};
use crate::flow::stream::StreamStats;
use crate::flow::{DirTuple, Flow, Handed};
use crate::flow::{FlowLimits, FlowStats, FlowTable};

/// Errors of `virtsec inspect`.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a pcap or pcapng file: {why}")]
    Format { path: PathBuf, why: String },
    #[error(transparent)]
    Matcher(#[from] crate::detect::matcher::MatcherError),
    #[error("cannot write alerts: {0}")]
    Output(std::io::Error),
}

/// Per-flow detection state.
#[derive(Default)]
pub struct FlowDetect {
    dirs: [Option<DirState>; 2],
    alerted: Vec<u32>,
    /// A `drop`/`reject` rule fired on this flow: inline mode drops the rest of it.
    dropped: bool,
}

/// What inline mode does with a packet after inspection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// A `drop` or `reject` rule fired on the packet's flow (now or earlier): like Suricata's
    /// IPS mode, the packet and the rest of the flow are dropped.
    Drop,
}

/// One alert.
#[derive(Clone, Debug)]
pub struct Alert {
    pub ts_us: u64,
    pub flow_id: u64,
    pub rule: u32,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub proto: Proto,
    pub to_server: bool,
}

/// Packets a TCP flow carries before the kernel counts its segments without payload rather
/// than copying them: short connections never touch the kernel's map.
pub const HANDOVER_AFTER: u64 = 64;

/// Hands direction `dir` of a live TCP flow to the capture's kernel filter as `want` says
/// (`All`: every frame; `Empty`: segments without payload), and the other direction's
/// segments without payload with it, once the flow is established and has carried
/// `HANDOVER_AFTER` packets; gives both back when the flow ends (FIN or RST), so that its
/// last segments and any reuse of the tuple are copied. Records changes in `out`.
/// With `empty` false (inline) nothing is handed over `Empty`: only directions whole.
fn handover(
    out: &mut Vec<(DirTuple, Handed)>,
    flow: &mut Flow<FlowDetect>,
    dir: usize,
    want: Handed,
    empty: bool,
) {
    if flow.key.proto != Proto::Tcp {
        return;
    }
    if flow.closing {
        for d in 0..2 {
            if flow.handed[d] != Handed::Copied {
                flow.handed[d] = Handed::Copied;
                out.push((flow.dir_tuple(d), Handed::Copied));
            }
        }
        return;
    }
    // A direction past the stream depth goes at once; otherwise only busy established flows.
    let ready = (want == Handed::All && flow.bypassed[dir])
        || (flow.established && flow.packets[0] + flow.packets[1] >= HANDOVER_AFTER);
    if !ready {
        return;
    }
    for (d, h) in [(dir, want), (1 - dir, Handed::Empty)] {
        if h == Handed::Empty && !empty {
            continue;
        }
        // `All` is never taken back to `Empty` (only given back whole).
        if flow.handed[d] == Handed::Copied || (h == Handed::All && flow.handed[d] == Handed::Empty)
        {
            flow.handed[d] = h;
            out.push((flow.dir_tuple(d), h));
        }
    }
}

/// The inspection engine for one thread.
pub struct Engine {
    pub detector: Detector,
    pub flows: FlowTable<FlowDetect>,
    pub decode: DecodeStats,
    pub alerts: u64,
    pub payload_bytes: u64,
    /// Live capture with a kernel filter (`capture::bpf`): directions whose handling in the
    /// kernel changed, for the data plane to pass on (`Handed::Copied`: give it back). `None`
    /// (offline, inline): not recorded.
    pub bypass: Option<Vec<(crate::flow::DirTuple, Handed)>>,
    /// Whether segments without payload may be handed over (`Handed::Empty`). Inline mode
    /// hands over whole directions only: with the kernel forwarding the pure ACKs of busy
    /// connections, one in four bulk transfers over four inline workers stalled (cause not
    /// isolated; docs/inline.md).
    pub hand_empty: bool,
    fired: Vec<u32>,
}

impl Engine {
    pub fn new(detector: Detector, limits: FlowLimits) -> Engine {
        Engine {
            detector,
            flows: FlowTable::new(limits),
            decode: DecodeStats::default(),
            alerts: 0,
            payload_bytes: 0,
            bypass: None,
            hand_empty: true,
            fired: Vec::new(),
        }
    }

    /// Inspects one decoded packet; alerts go to `sink`. The verdict matters in inline mode
    /// only (passive mode and offline runs ignore it).
    pub fn packet(
        &mut self,
        p: &Packet<'_>,
        ts_us: u64,
        sink: &mut dyn FnMut(&Alert, &Rule),
    ) -> Verdict {
        let det = &self.detector;
        let stream_limits = self.flows.limits.stream;
        let Some(seen) = self.flows.track(p, ts_us) else {
            // The flow table is full and fails closed: a flow it cannot follow is not let
            // through inline (passive mode and offline runs only count it).
            return Verdict::Drop;
        };
        let flow = seen.flow;
        let dir = seen.dir;
        if let Some(out) = self.bypass.as_mut() {
            handover(out, flow, dir, Handed::Empty, self.hand_empty);
        }
        let stream_stats = seen.stream;
        let ctx = Ctx {
            proto: p.proto,
            src: p.src,
            sport: p.sport,
            dst: p.dst,
            dport: p.dport,
            to_server: dir == 0,
            established: flow.established,
        };
        self.fired.clear();
        let fired = &mut self.fired;
        let FlowDetect {
            dirs,
            alerted,
            dropped,
        } = &mut flow.user;
        if *dropped {
            return Verdict::Drop;
        }
        match p.tcp {
            Some(t) => {
                if t.syn && flow.tcp[dir].delivered() == 0 {
                    flow.tcp[dir].syn(t.seq);
                }
                if p.payload.is_empty() {
                    return Verdict::Pass;
                }
                if flow.tcp[dir].delivered() >= stream_limits.depth {
                    if !stream_limits.inspect_past_depth {
                        flow.bypassed[dir] = true;
                        if let Some(out) = self.bypass.as_mut() {
                            handover(out, flow, dir, Handed::All, self.hand_empty);
                        }
                        return Verdict::Pass;
                    }
                    // Past the stream depth: keep inspecting each packet on its own (as
                    // Suricata's packet payload inspection does) rather than going blind.
                    let mut st = det.new_dir();
                    det.inspect(&mut st, p.payload, &ctx, alerted, fired);
                    self.payload_bytes += p.payload.len() as u64;
                } else {
                    let st = dirs[dir].get_or_insert_with(|| det.new_dir());
                    let mut inspected = 0u64;
                    flow.tcp[dir].segment(
                        t.seq,
                        p.payload,
                        &stream_limits,
                        stream_stats,
                        &mut |chunk| {
                            inspected += chunk.len() as u64;
                            det.inspect(st, chunk, &ctx, alerted, fired);
                        },
                    );
                    self.payload_bytes += inspected;
                }
            }
            None => {
                // Datagrams are inspected one by one, when some rule could fire on them: an
                // echo request crossing an inline worker under TCP-only rules is not scanned
                // (with cold caches a scan is most of the worker's time on such a frame).
                if p.payload.is_empty() || !det.inspects(p.proto) {
                    return Verdict::Pass;
                }
                let mut st = det.new_dir();
                det.inspect(&mut st, p.payload, &ctx, alerted, fired);
                self.payload_bytes += p.payload.len() as u64;
            }
        }
        for &ri in fired.iter() {
            self.alerts += 1;
            let a = Alert {
                ts_us,
                flow_id: flow.id,
                rule: ri,
                src: p.src,
                sport: p.sport,
                dst: p.dst,
                dport: p.dport,
                proto: p.proto,
                to_server: dir == 0,
            };
            let rule = &det.rules()[ri as usize];
            if matches!(rule.action, Action::Drop | Action::Reject) {
                *dropped = true;
            }
            sink(&a, rule);
        }
        if *dropped {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }

    /// Follows a packet's flow state (handshake, timeouts) without inspecting its payload:
    /// for frames inspected elsewhere (a local guest's frame at the sender's vif). Once the
    /// flow is established and busy, the kernel counts that direction instead of copying it.
    pub fn track(&mut self, p: &Packet<'_>, ts_us: u64) {
        if let Some(seen) = self.flows.track(p, ts_us) {
            if let Some(out) = self.bypass.as_mut() {
                handover(out, seen.flow, seen.dir, Handed::All, self.hand_empty);
            }
        }
    }

    /// Every direction this engine handed to the kernel (live flows and released ones), for
    /// giving them back when the engine is replaced or stops.
    pub fn take_bypassed(&mut self) -> Vec<crate::flow::DirTuple> {
        let mut all = std::mem::take(&mut self.flows.released);
        self.flows.for_each(|f| {
            for dir in 0..2 {
                if f.handed[dir] != Handed::Copied {
                    f.handed[dir] = Handed::Copied;
                    all.push(f.dir_tuple(dir));
                }
            }
        });
        if let Some(b) = self.bypass.as_mut() {
            b.clear();
        }
        all
    }

    pub fn flow_stats(&self) -> &FlowStats {
        &self.flows.stats
    }

    /// Forgets which rules each flow already alerted on (one alert per rule and flow): the
    /// next match alerts again. What a `drop` rule decided for a flow stands.
    pub fn forget_alerts(&mut self) {
        self.flows.for_each(|f| f.user.alerted.clear());
    }
}

/// Options of `virtsec inspect`.
#[derive(Clone, Debug)]
pub struct InspectOptions {
    pub rules: Vec<PathBuf>,
    /// `None`: no alert file; `Some("-")`: stdout.
    pub eve: Option<PathBuf>,
    pub backend: Backend,
    pub limits: FlowLimits,
    pub progress: bool,
}

/// What a run did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub packets: u64,
    pub bytes: u64,
    pub payload_bytes: u64,
    pub flows: u64,
    pub alerts: u64,
    pub rules_loaded: usize,
    pub rules_skipped: usize,
    pub literals: usize,
    pub matcher: &'static str,
    pub rule_load_s: f64,
    pub inspect_s: f64,
    pub gbit_per_s: f64,
    pub decode: DecodeStats,
    pub flow: FlowStats,
    pub stream: StreamStats,
}

/// Loads rule files; warnings for skipped rules are returned with the set.
pub fn load_rules(paths: &[PathBuf]) -> Result<RuleSet, InspectError> {
    let mut rs = RuleSet::default();
    let vars = Vars::default();
    for p in paths {
        let text = std::fs::read_to_string(p).map_err(|source| InspectError::Read {
            path: p.clone(),
            source,
        })?;
        rs.parse(&text, &p.display().to_string(), &vars);
    }
    Ok(rs)
}

enum Source {
    Pcap(PcapReader<BufReader<File>>),
    PcapNg(PcapNgReader<BufReader<File>>),
}

fn open(path: &Path) -> Result<Source, InspectError> {
    let read_err = |source| InspectError::Read {
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let mut magic = [0u8; 4];
    f.read_exact(&mut magic).map_err(read_err)?;
    let f = File::open(path).map_err(read_err)?;
    let r = BufReader::with_capacity(1 << 20, f);
    let fmt = |e: pcap_file::PcapError| InspectError::Format {
        path: path.to_owned(),
        why: e.to_string(),
    };
    if magic == [0x0a, 0x0d, 0x0d, 0x0a] {
        Ok(Source::PcapNg(PcapNgReader::new(r).map_err(fmt)?))
    } else {
        Ok(Source::Pcap(PcapReader::new(r).map_err(fmt)?))
    }
}

fn decode_link<'a>(link: DataLink, data: &'a [u8], st: &mut DecodeStats) -> Option<Packet<'a>> {
    match link {
        DataLink::ETHERNET => decode::decode_ethernet(data, st).ok(),
        DataLink::RAW | DataLink::IPV4 | DataLink::IPV6 => decode::decode_ip(data, st).ok(),
        _ => {
            st.frames += 1;
            st.bytes += data.len() as u64;
            st.not_ip += 1;
            None
        }
    }
}

/// Runs `virtsec inspect` over `pcaps`.
pub fn run(
    opts: &InspectOptions,
    pcaps: &[PathBuf],
    warn: &mut dyn FnMut(&str),
) -> Result<Summary, InspectError> {
    let t_load = Instant::now();
    let rs = load_rules(&opts.rules)?;
    for w in &rs.skipped {
        warn(&w.to_string());
    }
    let (loaded, skipped) = (rs.rules.len(), rs.skipped.len());
    let detector = Detector::new(rs.rules, opts.backend)?;
    let rule_load_s = t_load.elapsed().as_secs_f64();
    let literals = detector.literals();
    let matcher = detector.matcher_name();
    let mut engine = Engine::new(detector, opts.limits);

    let mut out: Option<Box<dyn Write>> = match &opts.eve {
        None => None,
        Some(p) if p.as_os_str() == "-" => {
            Some(Box::new(std::io::BufWriter::new(std::io::stdout().lock())))
        }
        Some(p) => Some(Box::new(std::io::BufWriter::with_capacity(
            1 << 16,
            File::create(p).map_err(InspectError::Output)?,
        ))),
    };
    let mut write_err: Option<std::io::Error> = None;
    let mut sink = |a: &Alert, r: &Rule| {
        if let Some(w) = out.as_mut() {
            if let Err(e) = eve::write_alert(w, a, r) {
                write_err.get_or_insert(e);
            }
        }
    };
    let total: u64 = pcaps
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let show = opts.progress && std::io::stderr().is_terminal();
    let t0 = Instant::now();
    let mut last_progress = t0;
    for path in pcaps {
        match open(path)? {
            Source::Pcap(mut r) => {
                let link = r.header().datalink;
                while let Some(pkt) = r.next_packet() {
                    let pkt = pkt.map_err(|e| InspectError::Format {
                        path: path.clone(),
                        why: e.to_string(),
                    })?;
                    let ts = pkt.timestamp.as_micros() as u64;
                    if let Some(p) = decode_link(link, &pkt.data, &mut engine.decode) {
                        engine.packet(&p, ts, &mut sink);
                    }
                    if show
                        && engine.decode.frames % 4096 == 0
                        && last_progress.elapsed() > Duration::from_millis(500)
                    {
                        last_progress = Instant::now();
                        progress(engine.decode.bytes, total, t0, engine.alerts);
                    }
                }
            }
            Source::PcapNg(mut r) => {
                let mut links: Vec<DataLink> = Vec::new();
                while let Some(block) = r.next_block() {
                    let block = block.map_err(|e| InspectError::Format {
                        path: path.clone(),
                        why: e.to_string(),
                    })?;
                    match block {
                        Block::InterfaceDescription(idb) => links.push(idb.linktype),
                        Block::EnhancedPacket(epb) => {
                            let link = links
                                .get(epb.interface_id as usize)
                                .copied()
                                .unwrap_or(DataLink::ETHERNET);
                            let ts = epb.timestamp.as_micros() as u64;
                            if let Some(p) = decode_link(link, &epb.data, &mut engine.decode) {
                                engine.packet(&p, ts, &mut sink);
                            }
                        }
                        Block::SimplePacket(spb) => {
                            let link = links.first().copied().unwrap_or(DataLink::ETHERNET);
                            if let Some(p) = decode_link(link, &spb.data, &mut engine.decode) {
                                engine.packet(&p, 0, &mut sink);
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
    let inspect_s = t0.elapsed().as_secs_f64();
    if show {
        eprintln!();
    }
    if let Some(mut w) = out {
        w.flush().map_err(InspectError::Output)?;
    }
    if let Some(e) = write_err {
        return Err(InspectError::Output(e));
    }
    Ok(Summary {
        packets: engine.decode.frames,
        bytes: engine.decode.bytes,
        payload_bytes: engine.payload_bytes,
        flows: engine.flows.stats.created,
        alerts: engine.alerts,
        rules_loaded: loaded,
        rules_skipped: skipped,
        literals,
        matcher,
        rule_load_s,
        inspect_s,
        gbit_per_s: engine.decode.bytes as f64 * 8.0 / inspect_s.max(1e-9) / 1e9,
        decode: engine.decode.clone(),
        flow: engine.flows.stats.clone(),
        stream: engine.flows.stats.stream.clone(),
    })
}

/// What a live capture did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LiveSummary {
    pub iface: String,
    pub seconds: f64,
    pub frames: u64,
    pub bytes: u64,
    pub alerts: u64,
    /// The capture socket's counters (ring or queue).
    pub ring: crate::capture::RingStats,
    pub decode: DecodeStats,
    pub flow: FlowStats,
}

/// Captures from `iface` (passive, reading it as `capture` says) and inspects until `stop`
/// is set or `duration` passes. `ready` is called once the capture socket is open.
pub fn live(
    iface: &str,
    capture: crate::capture::SourceKind,
    opts: &InspectOptions,
    duration: Option<Duration>,
    stop: &std::sync::atomic::AtomicBool,
    ready: &mut dyn FnMut(),
    warn: &mut dyn FnMut(&str),
) -> Result<LiveSummary, LiveError> {
    let rs = load_rules(&opts.rules)?;
    for w in &rs.skipped {
        warn(&w.to_string());
    }
    let detector = Detector::new(rs.rules, opts.backend).map_err(InspectError::from)?;
    let mut engine = Engine::new(detector, opts.limits);
    let mut src = crate::capture::open_source(capture, iface, capture.default_mib(), 20, None)?;
    let mut out: Option<Box<dyn Write>> = match &opts.eve {
        None => None,
        Some(p) if p.as_os_str() == "-" => Some(Box::new(std::io::stdout())),
        Some(p) => Some(Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(InspectError::Output)?,
        )),
    };
    ready();
    let t0 = Instant::now();
    let mut write_err = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed)
        && duration.is_none_or(|d| t0.elapsed() < d)
    {
        src.poll(Duration::from_millis(100), &mut |f| {
            if let Ok(p) = decode::decode_ethernet(f.data, &mut engine.decode) {
                engine.packet(&p, f.ts_ns / 1000, &mut |a, r| {
                    if let Some(w) = out.as_mut() {
                        if let Err(e) = eve::write_alert(w, a, r).and_then(|_| w.flush()) {
                            write_err.get_or_insert(e);
                        }
                    }
                });
            }
        })?;
    }
    if let Some(e) = write_err {
        return Err(InspectError::Output(e).into());
    }
    Ok(LiveSummary {
        iface: iface.into(),
        seconds: t0.elapsed().as_secs_f64(),
        frames: engine.decode.frames,
        bytes: engine.decode.bytes,
        alerts: engine.alerts,
        ring: src.stats(),
        decode: engine.decode.clone(),
        flow: engine.flows.stats.clone(),
    })
}

/// Errors of a live capture.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error(transparent)]
    Inspect(#[from] InspectError),
    #[error(transparent)]
    Capture(#[from] crate::capture::CaptureError),
}

fn progress(done: u64, total: u64, t0: Instant, alerts: u64) {
    let pct = if total > 0 {
        done as f64 * 100.0 / total as f64
    } else {
        0.0
    };
    let rate = done as f64 * 8.0 / t0.elapsed().as_secs_f64().max(1e-9) / 1e9;
    eprint!(
        "\r  {pct:5.1}%  {:>8.1} MB  {rate:5.2} Gb/s  {alerts} alerts ",
        done as f64 / 1e6
    );
}

/// Feeds `data`, cut into frames by 2-byte big-endian length prefixes, through decode, the
/// flow table, reassembly and a small rule set. For the fuzz target and property tests: must
/// never panic, whatever the frames.
pub fn fuzz_frames(data: &[u8]) -> u64 {
    use std::sync::OnceLock;
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    let rules = RULES.get_or_init(|| {
        let mut rs = RuleSet::default();
        rs.parse(
            "alert tcp any any -> any any (content:\"evil\"; nocase; sid:1;)\nalert ip any any -> any any (content:\"AB\"; content:\"CD\"; distance:1; within:4; sid:2;)\nalert udp any any -> any 53 (content:\"|00 01|\"; offset:2; depth:2; sid:3;)\n",
            "fuzz",
            &Vars::default(),
        );
        rs.rules
    });
    let Ok(det) = Detector::new(rules.clone(), Backend::Ac) else {
        return 0;
    };
    // The first byte picks the live data plane's options: bit 0 a tiny stream depth with
    // bypass (directions handed to the kernel, as `capture::bpf` gets them), bit 1 a table
    // that fails closed.
    let flags = data.first().copied().unwrap_or(0);
    let mut limits = FlowLimits {
        max_flows: 64,
        ..FlowLimits::default()
    };
    if flags & 1 != 0 {
        limits.stream.depth = 64;
        limits.stream.inspect_past_depth = false;
    }
    if flags & 2 != 0 {
        limits.max_flows = 16;
        limits.when_full = crate::flow::WhenFull::Closed;
    }
    let mut engine = Engine::new(det, limits);
    if flags & 1 != 0 {
        engine.bypass = Some(Vec::new());
    }
    let mut rest = data.get(1..).unwrap_or_default();
    let mut ts = 0u64;
    while rest.len() >= 2 {
        let len = u16::from_be_bytes([rest[0], rest[1]]);
        let n = usize::from(len & 0x7fff).min(rest.len() - 2);
        let frame = &rest[2..2 + n];
        rest = &rest[2 + n..];
        ts += 1000;
        // The length's top bit: a frame the kernel trimmed to its headers.
        if len & 0x8000 != 0 {
            if let Ok(p) = decode::decode_ethernet_headers(frame, &mut engine.decode) {
                engine.track(&p, ts);
            }
        } else if let Ok(p) = decode::decode_ethernet(frame, &mut engine.decode) {
            engine.packet(&p, ts, &mut |_, _| {});
        }
        if let Some(b) = engine.bypass.as_mut() {
            b.clear();
        }
        engine.flows.released.clear();
    }
    let _ = engine.take_bypassed();
    engine.alerts
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tcp(seq: u32, syn: bool, payload: &[u8]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 8080, seq, 65535);
        let b = if syn { b.syn() } else { b.ack(1) };
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).expect("builds");
        out
    }

    /// A `drop` rule on a payload 1 MiB + into a connection: past the stream depth it is still
    /// found (and the flow dropped) when `inspect_past_depth`, and not looked at otherwise.
    fn run_past_depth(inspect_past_depth: bool) -> (u64, Vec<Verdict>) {
        let mut rs = RuleSet::default();
        rs.parse(
            "drop tcp any any -> any 8080 (msg:\"late\"; content:\"needle-in-bulk\"; sid:1;)\n",
            "t.rules",
            &Vars::default(),
        );
        let det = Detector::new(rs.rules, Backend::Ac).expect("matcher");
        let mut limits = FlowLimits::default();
        limits.stream.inspect_past_depth = inspect_past_depth;
        let mut e = Engine::new(det, limits);
        let mut verdicts = Vec::new();
        let feed = |e: &mut Engine, f: &[u8]| {
            let mut st = DecodeStats::default();
            let p = decode::decode_ethernet(f, &mut st).expect("decodes");
            e.packet(&p, 1, &mut |_, _| {})
        };
        feed(&mut e, &tcp(1000, true, b""));
        let filler = vec![b'x'; 1400];
        let mut seq = 1001u32;
        while (seq - 1001) as u64 <= (1 << 20) {
            assert_eq!(feed(&mut e, &tcp(seq, false, &filler)), Verdict::Pass);
            seq += filler.len() as u32;
        }
        verdicts.push(feed(&mut e, &tcp(seq, false, b"GET needle-in-bulk")));
        seq += 18;
        verdicts.push(feed(&mut e, &tcp(seq, false, b"after")));
        (e.alerts, verdicts)
    }

    /// An ICMP echo request carrying `payload`.
    fn echo(payload: &[u8]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .icmpv4_echo_request(7, 1);
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).expect("builds");
        out
    }

    /// Datagrams of a protocol no rule accepts are not scanned; with a rule that accepts them
    /// they are, and fire.
    #[test]
    fn datagrams_are_scanned_only_when_some_rule_accepts_their_protocol() {
        let run = |rules: &str| {
            let mut rs = RuleSet::default();
            rs.parse(rules, "t.rules", &Vars::default());
            let mut e = Engine::new(
                Detector::new(rs.rules, Backend::Ac).expect("matcher"),
                FlowLimits::default(),
            );
            let mut st = DecodeStats::default();
            let f = echo(b"ping-tunnel-marker");
            let p = decode::decode_ethernet(&f, &mut st).expect("decodes");
            e.packet(&p, 1, &mut |_, _| {});
            (e.payload_bytes, e.alerts)
        };
        let tcp_only = "alert tcp any any -> any any (msg:\"t\"; content:\"tunnel\"; sid:1;)\n";
        assert_eq!(run(tcp_only), (0, 0));
        for rule in [
            "alert icmp any any -> any any (msg:\"i\"; content:\"tunnel\"; sid:2;)\n",
            "alert ip any any -> any any (msg:\"p\"; content:\"tunnel\"; sid:3;)\n",
        ] {
            assert_eq!(run(&format!("{tcp_only}{rule}")), (18, 1), "{rule}");
        }
    }

    #[test]
    fn past_depth_is_inspected_per_packet_or_bypassed_as_configured() {
        assert_eq!(
            run_past_depth(true),
            (1, vec![Verdict::Drop, Verdict::Drop])
        );
        assert_eq!(
            run_past_depth(false),
            (0, vec![Verdict::Pass, Verdict::Pass])
        );
    }

    /// One segment between 10.0.0.1:40000 (client) and 10.0.0.2:8080, `up` from the client.
    fn seg(up: bool, syn: bool, fin: bool, payload: &[u8]) -> Vec<u8> {
        let (src, dst, sport, dport) = if up {
            ([10, 0, 0, 1], [10, 0, 0, 2], 40000, 8080)
        } else {
            ([10, 0, 0, 2], [10, 0, 0, 1], 8080, 40000)
        };
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(src, dst, 64)
            .tcp(sport, dport, if up { 1000 } else { 5000 }, 65535);
        let b = match (syn, up) {
            (true, true) => b.syn(),
            (true, false) => b.syn().ack(1001),
            _ => b.ack(1),
        };
        let b = if fin { b.fin() } else { b };
        let mut out = Vec::with_capacity(b.size(payload.len()));
        b.write(&mut out, payload).expect("builds");
        out
    }

    /// Live capture with the kernel filter: a busy established connection has its segments
    /// without payload handed to the kernel (both directions), a connection inspected at the
    /// other guest's vif has that direction handed whole, and a FIN gives both back.
    #[test]
    fn busy_established_flows_are_handed_over_and_given_back_at_fin() {
        let up: DirTuple = (
            ("10.0.0.1".parse().unwrap(), 40000),
            ("10.0.0.2".parse().unwrap(), 8080),
        );
        let down: DirTuple = (up.1, up.0);
        for elsewhere in [false, true] {
            let det = Detector::new(Vec::new(), Backend::Ac).expect("matcher");
            let mut e = Engine::new(det, FlowLimits::default());
            e.bypass = Some(Vec::new());
            let feed = |e: &mut Engine, f: Vec<u8>, up: bool| {
                let mut st = DecodeStats::default();
                let p = decode::decode_ethernet(&f, &mut st).expect("decodes");
                if elsewhere && up {
                    // The client is another local guest: its frames were inspected at its vif.
                    e.track(&p, 1);
                } else {
                    e.packet(&p, 1, &mut |_, _| {});
                }
            };
            feed(&mut e, seg(true, true, false, b""), true);
            feed(&mut e, seg(false, true, false, b""), false);
            for i in 2..HANDOVER_AFTER - 1 {
                feed(&mut e, seg(i % 2 == 0, false, false, b"data"), i % 2 == 0);
            }
            assert_eq!(e.bypass.as_deref(), Some(&[][..]), "not busy yet");
            // The 64th packet (from the client).
            feed(&mut e, seg(true, false, false, b"data"), true);
            let want = if elsewhere {
                Handed::All
            } else {
                Handed::Empty
            };
            assert_eq!(
                e.bypass.as_deref(),
                Some(&[(up, want), (down, Handed::Empty)][..]),
                "elsewhere: {elsewhere}"
            );
            e.bypass.as_mut().unwrap().clear();
            feed(&mut e, seg(false, false, false, b"more"), false);
            assert!(e.bypass.as_ref().unwrap().is_empty(), "nothing changed");
            // The connection ends: both directions come back, and stay back.
            feed(&mut e, seg(true, false, true, b""), true);
            assert_eq!(
                e.bypass.as_deref(),
                Some(&[(up, Handed::Copied), (down, Handed::Copied)][..])
            );
            e.bypass.as_mut().unwrap().clear();
            feed(&mut e, seg(false, false, false, b"late"), false);
            assert!(e.bypass.as_ref().unwrap().is_empty());
            assert!(e.take_bypassed().is_empty());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_frames_never_panic(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            super::fuzz_frames(&data);
        }
    }
}
