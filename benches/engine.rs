//! Criterion benches of the inspection hot paths, each beside a baseline measured in the same
//! run: decode (vs. just walking the frames), flow lookup (vs. a std HashMap of the same keys),
//! reassembly (vs. copying the payloads), and the matchers (vs. the raw aho-corasick crate's
//! overlapping search over the same bytes). Input: the committed 10 MB bench pcap, and for
//! the matchers also 16 MiB of random bytes in 64 KiB chunks: what a guest's bulk transfer
//! (iperf3's payload, GSO super-frames) gives a live worker to scan, which bounds how many
//! Gbit/s one worker can inspect every byte of.
//!
//! `cargo bench --bench engine` (results and ratios: docs/performance.md).

use std::collections::HashMap;
use std::io::Read;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use virtsec::decode::{decode_ethernet, DecodeStats, Packet};
use virtsec::detect::matcher::{AnyMatcher, Backend, Literal};
use virtsec::detect::rules::{RuleSet, Vars};
use virtsec::flow::stream::{StreamLimits, StreamStats, TcpStream};
use virtsec::flow::{FlowKey, FlowLimits, FlowTable};

fn frames() -> Vec<Vec<u8>> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/bench-10M.pcap.gz"
    );
    let mut gz = flate2::read::GzDecoder::new(std::fs::File::open(path).expect("fixture"));
    let mut buf = Vec::new();
    gz.read_to_end(&mut buf).expect("gunzip");
    let mut r = pcap_file::pcap::PcapReader::new(&buf[..]).expect("pcap");
    let mut out = Vec::new();
    while let Some(p) = r.next_packet() {
        out.push(p.expect("packet").data.into_owned());
    }
    out
}

fn literals(n: usize) -> Vec<Literal> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/bench-1000.rules"
    ))
    .expect("rules");
    let mut rs = RuleSet::default();
    rs.parse(&text, "bench", &Vars::default());
    rs.rules
        .iter()
        .take(n)
        .map(|r| Literal {
            bytes: r.contents[0].bytes.clone(),
            nocase: r.contents[0].nocase,
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let frames = frames();
    let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
    let mut st = DecodeStats::default();
    let pkts: Vec<Packet<'_>> = frames
        .iter()
        .filter_map(|f| decode_ethernet(f, &mut st).ok())
        .collect();
    let payload: u64 = pkts.iter().map(|p| p.payload.len() as u64).sum();

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function("baseline: walk frames", |b| {
        b.iter(|| frames.iter().map(|f| f[f.len() / 2] as u64).sum::<u64>())
    });
    g.bench_function("etherparse decode", |b| {
        b.iter(|| {
            let mut st = DecodeStats::default();
            frames
                .iter()
                .filter(|f| decode_ethernet(f, &mut st).is_ok())
                .count()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("flow lookup");
    g.throughput(Throughput::Elements(pkts.len() as u64));
    g.bench_function("baseline: std HashMap<FlowKey>", |b| {
        b.iter(|| {
            let mut m: HashMap<FlowKey, u64> = HashMap::new();
            for p in &pkts {
                *m.entry(FlowKey::of(p)).or_default() += 1;
            }
            m.len()
        })
    });
    g.bench_function("FlowTable::track", |b| {
        b.iter(|| {
            let mut t: FlowTable<()> = FlowTable::new(FlowLimits::default());
            for (i, p) in pkts.iter().enumerate() {
                t.track(p, i as u64);
            }
            t.len()
        })
    });
    g.finish();

    // Reassembly of every TCP direction, segments in capture order.
    let mut g = c.benchmark_group("reassembly");
    g.throughput(Throughput::Bytes(payload));
    g.bench_function("baseline: copy payloads", |b| {
        b.iter_batched(
            || Vec::with_capacity(payload as usize),
            |mut v: Vec<u8>| {
                for p in &pkts {
                    v.extend_from_slice(p.payload);
                }
                v.len()
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("TcpStream::segment", |b| {
        b.iter(|| {
            let mut streams: HashMap<(FlowKey, bool), TcpStream> = HashMap::new();
            let (lim, mut stats) = (StreamLimits::default(), StreamStats::default());
            let mut n = 0usize;
            for p in &pkts {
                let Some(t) = p.tcp else { continue };
                let s = streams
                    .entry((FlowKey::of(p), (p.src, p.sport) < (p.dst, p.dport)))
                    .or_default();
                if t.syn {
                    s.syn(t.seq);
                }
                s.segment(t.seq, p.payload, &lim, &mut stats, &mut |d| n += d.len());
            }
            n
        })
    });
    g.finish();

    // Matchers over the payload bytes (each packet as a chunk of one long stream).
    let payloads: Vec<&[u8]> = pkts.iter().map(|p| p.payload).collect();
    for n in [10usize, 1000] {
        matchers(c, &format!("matcher {n} literals"), "packet", n, &payloads);
    }

    // Matchers over random bytes in 64 KiB chunks (one stream), as a bulk transfer's
    // super-frames reach a live worker.
    let mut random = vec![0u8; 16 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in random.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let chunks: Vec<&[u8]> = random.chunks(65536).collect();
    for n in [100usize, 1000] {
        let group = format!("matcher {n} literals, random 64 KiB chunks");
        matchers(c, &group, "chunk", n, &chunks);
    }
}

/// The first `n` bench literals over `chunks` (one stream): the aho-corasick crate's
/// overlapping search per `unit` (the baseline), then virtsec's streaming backends.
fn matchers(c: &mut Criterion, group: &str, unit: &str, n: usize, chunks: &[&[u8]]) {
    let lits = literals(n);
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(
        chunks.iter().map(|c| c.len() as u64).sum(),
    ));
    let pats: Vec<Vec<u8>> = lits.iter().map(|l| l.bytes.clone()).collect();
    let raw = aho_corasick::AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(&pats)
        .expect("ac");
    g.bench_function(
        format!("baseline: aho-corasick crate, overlapping search per {unit}"),
        |b| {
            b.iter(|| {
                chunks
                    .iter()
                    .map(|c| raw.find_overlapping_iter(c).count())
                    .sum::<usize>()
            })
        },
    );
    for (name, backend) in [
        ("virtsec aho-corasick stream", Backend::Ac),
        ("virtsec hyperscan stream", Backend::Hs),
    ] {
        let Ok(m) = AnyMatcher::build(&lits, backend) else {
            eprintln!("{name}: backend unavailable, skipped");
            continue;
        };
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut st = m.new_stream();
                let mut hits = 0usize;
                for c in chunks {
                    m.scan(&mut st, c, &mut |_, _| hits += 1);
                }
                hits
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = engine;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500));
    targets = benches
}
criterion_main!(engine);
