//! Log sinks for the binaries: syslog (daemon facility) or stderr.

use std::io::Write;

use crate::config::LogTarget;

struct Stderr {
    prog: &'static str,
    level: log::LevelFilter,
}

impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.level
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let _ = writeln!(
                std::io::stderr().lock(),
                "{}[{}]: {}: {}",
                self.prog,
                std::process::id(),
                r.level(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

/// Installs the global logger. Falls back to stderr (with a warning) if syslog is unreachable.
pub fn init(prog: &'static str, target: LogTarget, level: log::LevelFilter) {
    if target == LogTarget::Syslog {
        let fmt = syslog::Formatter3164 {
            facility: syslog::Facility::LOG_DAEMON,
            hostname: None,
            process: prog.into(),
            pid: std::process::id(),
        };
        match syslog::unix(fmt) {
            Ok(logger) => {
                if log::set_boxed_logger(Box::new(syslog::BasicLogger::new(logger))).is_ok() {
                    log::set_max_level(level);
                }
                return;
            }
            Err(e) => eprintln!("{prog}: syslog unavailable ({e}); logging to stderr"),
        }
    }
    if log::set_boxed_logger(Box::new(Stderr { prog, level })).is_ok() {
        log::set_max_level(level);
    }
}

/// Renders an error chain for the operator, skipping causes already quoted by the message
/// above them (library errors often include their source's text).
pub fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}
