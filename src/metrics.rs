//! Prometheus text metrics on a local address (`[metrics] listen`).
//!
//! A scrape is one short HTTP/1.0 exchange served on the daemon's event loop: the request is
//! read with a short timeout (anything but `GET /metrics` gets 404) and the whole exposition
//! is written in one go. The exposition format (version 0.0.4) is plain text and simple enough
//! that a dependency would add more than it saves.
//!
//! [`Histogram`] is a fixed-bucket latency histogram the data-plane workers record into with
//! one relaxed atomic add per sample (no lock, no allocation on the hot path), exposed as a
//! Prometheus histogram and summarised (p50, p99) in `virtsec status --json`. Fixed buckets
//! rather than an HDR histogram crate: the workers share one per vif across threads, and the
//! quantiles only need the precision of the buckets below.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of [`Histogram`]'s buckets in microseconds; a last bucket holds the rest.
/// Fine where inline latency is measured (tens of µs), coarse up to a second (an overloaded
/// worker, or a dom0 under emulation, waits milliseconds).
pub const BUCKETS_US: [u64; 21] = [
    5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000, 10000, 20000, 50000,
    100000, 1000000,
];

/// A latency histogram shared by threads: counts per bucket of [`BUCKETS_US`] (and one above
/// them) and the sum of the samples.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS_US.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one sample of `ns` nanoseconds.
    pub fn record(&self, ns: u64) {
        let i = BUCKETS_US.partition_point(|&b| b * 1000 < ns);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed)),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// The counts of a [`Histogram`] at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    pub counts: [u64; BUCKETS_US.len() + 1],
    pub sum_ns: u64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn mean_us(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum_ns as f64 / 1000.0 / n as f64)
    }

    /// The `q` quantile in microseconds, interpolated linearly inside its bucket (as
    /// Prometheus' `histogram_quantile` does); a quantile above the last bound is reported as
    /// that bound. `None` without samples.
    pub fn quantile_us(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * n as f64;
        let mut below = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            let Some(&hi) = BUCKETS_US.get(i) else {
                return BUCKETS_US.last().map(|&b| b as f64);
            };
            if c > 0 && (below + c) as f64 >= rank {
                let lo = if i == 0 { 0 } else { BUCKETS_US[i - 1] };
                let into = (rank - below as f64).max(0.0) / c as f64;
                return Some(lo as f64 + into * (hi - lo) as f64);
            }
            below += c;
        }
        BUCKETS_US.last().map(|&b| b as f64)
    }
}

/// One metric family being written.
pub struct Exposition {
    out: String,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Default for Exposition {
    fn default() -> Self {
        Self::new()
    }
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition { out: String::new() }
    }

    /// Starts a family: `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample with labels.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    /// One histogram's samples (`_bucket` with cumulative counts and `le` in seconds, `_sum`,
    /// `_count`) under family `name`, with `labels`.
    pub fn histogram(&mut self, name: &str, labels: &[(&str, &str)], h: &HistogramSnapshot) {
        let mut cumulative = 0u64;
        for (i, &c) in h.counts.iter().enumerate() {
            cumulative += c;
            let le = BUCKETS_US
                .get(i)
                .map_or("+Inf".to_string(), |&b| format!("{}", b as f64 / 1e6));
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&format!("{name}_bucket"), &l, cumulative as f64);
        }
        self.sample(&format!("{name}_sum"), labels, h.sum_ns as f64 / 1e9);
        self.sample(&format!("{name}_count"), labels, cumulative as f64);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// Answers one scrape on an accepted connection.
pub fn serve(mut stream: std::net::TcpStream, body: impl FnOnce() -> String) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut req = [0u8; 1024];
    let n = stream.read(&mut req).unwrap_or(0);
    let line = String::from_utf8_lossy(&req[..n]);
    let resp = if line.starts_with("GET /metrics ") || line.starts_with("GET / ") {
        let b = body();
        format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )
    } else {
        "HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_string()
    };
    let _ = stream.write_all(resp.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_quantiles_and_exposition() {
        let h = Histogram::default();
        assert_eq!(h.snapshot().quantile_us(0.5), None);
        // 30 samples of 42 µs (bucket 40..50), 10 of 180 µs (150..200), 1 of 2 s (above).
        for _ in 0..30 {
            h.record(42_000);
        }
        for _ in 0..10 {
            h.record(180_000);
        }
        h.record(2_000_000_000);
        let s = h.snapshot();
        assert_eq!(s.count(), 41);
        assert_eq!(s.counts[6], 30);
        assert_eq!(s.counts[10], 10);
        assert_eq!(s.counts[21], 1);
        // p50: rank 20.5 of the 30 in 40..50 µs.
        let p50 = s.quantile_us(0.5).unwrap();
        assert!((p50 - (40.0 + 10.0 * 20.5 / 30.0)).abs() < 1e-9, "{p50}");
        let p90 = s.quantile_us(0.9).unwrap();
        assert!(p90 > 150.0 && p90 <= 200.0, "{p90}");
        assert_eq!(s.quantile_us(1.0), Some(1_000_000.0));
        let mean = s.mean_us().unwrap();
        assert!((mean - (30.0 * 42.0 + 10.0 * 180.0 + 2_000_000.0) / 41.0).abs() < 1e-6);
        // A sample exactly on a bound belongs to that bound's bucket (`le`).
        let b = Histogram::default();
        b.record(5_000);
        b.record(5_001);
        assert_eq!(b.snapshot().counts[..2], [1, 1]);

        let mut e = Exposition::new();
        e.histogram("w", &[("vif", "vif5.0")], &s);
        let text = e.finish();
        assert!(
            text.contains("w_bucket{vif=\"vif5.0\",le=\"0.00005\"} 30\n"),
            "{text}"
        );
        assert!(
            text.contains("w_bucket{vif=\"vif5.0\",le=\"0.01\"} 40\n"),
            "{text}"
        );
        assert!(
            text.contains("w_bucket{vif=\"vif5.0\",le=\"1\"} 40\n"),
            "{text}"
        );
        assert!(
            text.contains("w_bucket{vif=\"vif5.0\",le=\"+Inf\"} 41\n"),
            "{text}"
        );
        assert!(text.contains("w_count{vif=\"vif5.0\"} 41\n"), "{text}");
    }

    #[test]
    fn exposition_format() {
        let mut e = Exposition::new();
        e.family(
            "virtsec_vif_frames_total",
            "counter",
            "Frames seen on a vif.",
        );
        e.sample(
            "virtsec_vif_frames_total",
            &[("vif", "vif5.0"), ("name", "we\"b")],
            12.0,
        );
        e.sample("virtsec_up", &[], 1.0);
        assert_eq!(
            e.finish(),
            "# HELP virtsec_vif_frames_total Frames seen on a vif.\n# TYPE virtsec_vif_frames_total counter\nvirtsec_vif_frames_total{vif=\"vif5.0\",name=\"we\\\"b\"} 12\nvirtsec_up 1\n"
        );
    }
}
