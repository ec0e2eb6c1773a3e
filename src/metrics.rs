//! Prometheus text metrics on a local address (`[metrics] listen`).
//!
//! A scrape is one short HTTP/1.0 exchange served on the daemon's event loop: the request is
//! read with a short timeout (anything but `GET /metrics` gets 404) and the whole exposition
//! is written in one go. The exposition format (version 0.0.4) is plain text and simple enough
//! that a dependency would add more than it saves.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::time::Duration;

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
