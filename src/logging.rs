//! Log sinks for the binaries: syslog (daemon facility) or stderr.
//!
//! Syslog messages are RFC 5424 by default: events for the security team (alerts, anti-spoofing
//! drops, quarantine actions) carry their fields as structured data, SD-ID `virtsec@32473`
//! (32473 is the private enterprise number RFC 5612 reserves for documentation; sites that
//! have their own may rewrite it in their collector), from the `log` key-values the code
//! attaches, and a MSGID naming the event kind. `[log] syslog_format = "rfc3164"` keeps the
//! classic BSD format.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;

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

/// The SD-ID of virtsec's structured data.
pub const SD_ID: &str = "virtsec@32473";

/// MSGID of a record: its target's last component for event targets
/// (`virtsec::event::alert` → `alert`), `-` otherwise.
fn msgid(target: &str) -> &str {
    target.strip_prefix("virtsec::event::").unwrap_or("-")
}

/// The record's key-values as one structured-data element.
fn structured(r: &log::Record<'_>) -> BTreeMap<String, BTreeMap<String, String>> {
    struct Collect(BTreeMap<String, String>);
    impl<'kvs> log::kv::VisitSource<'kvs> for Collect {
        fn visit_pair(
            &mut self,
            k: log::kv::Key<'kvs>,
            v: log::kv::Value<'kvs>,
        ) -> Result<(), log::kv::Error> {
            self.0.insert(k.to_string(), v.to_string());
            Ok(())
        }
    }
    let mut c = Collect(BTreeMap::new());
    let _ = r.key_values().visit(&mut c);
    let mut sd = BTreeMap::new();
    if !c.0.is_empty() {
        sd.insert(SD_ID.to_string(), c.0);
    }
    sd
}

/// RFC 5424 over the local syslog socket.
struct Syslog5424 {
    logger: Mutex<syslog::Logger<syslog::LoggerBackend, syslog::Formatter5424>>,
    level: log::LevelFilter,
}

impl log::Log for Syslog5424 {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= self.level
    }
    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // The crate takes a numeric MSGID; kinds are numbered in docs/configuration.md.
        let id = match msgid(r.target()) {
            "alert" => 1,
            "antispoof" => 2,
            "quarantine" => 3,
            _ => 0,
        };
        let msg = (id, structured(r), r.args().to_string());
        if let Ok(mut l) = self.logger.lock() {
            let _ = match r.level() {
                log::Level::Error => l.err(msg),
                log::Level::Warn => l.warning(msg),
                log::Level::Info => l.info(msg),
                log::Level::Debug | log::Level::Trace => l.debug(msg),
            };
        }
    }
    fn flush(&self) {}
}

/// Installs the global logger. Falls back to stderr (with a warning) if syslog is unreachable.
pub fn init(prog: &'static str, target: LogTarget, level: log::LevelFilter) {
    init_with(prog, target, level, true)
}

/// As [`init`], choosing RFC 5424 (`true`) or RFC 3164 syslog messages.
pub fn init_with(prog: &'static str, target: LogTarget, level: log::LevelFilter, rfc5424: bool) {
    if target == LogTarget::Syslog && rfc5424 {
        let fmt = syslog::Formatter5424 {
            facility: syslog::Facility::LOG_DAEMON,
            hostname: None,
            process: prog.into(),
            pid: std::process::id(),
        };
        match syslog::unix(fmt) {
            Ok(logger) => {
                let l = Syslog5424 {
                    logger: Mutex::new(logger),
                    level,
                };
                if log::set_boxed_logger(Box::new(l)).is_ok() {
                    log::set_max_level(level);
                }
                return;
            }
            Err(e) => eprintln!("{prog}: syslog unavailable ({e}); logging to stderr"),
        }
    } else if target == LogTarget::Syslog {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_become_structured_data_and_targets_msgids() {
        let kvs: &[(&str, &str)] = &[("domid", "5"), ("sid", "7001")];
        let args = format_args!("alert");
        let r = log::Record::builder()
            .target("virtsec::event::alert")
            .args(args)
            .key_values(&kvs)
            .build();
        let sd = structured(&r);
        assert_eq!(sd[SD_ID]["domid"], "5");
        assert_eq!(sd[SD_ID]["sid"], "7001");
        assert_eq!(msgid(r.target()), "alert");
        assert_eq!(msgid("virtsec::daemon"), "-");
        let plain = log::Record::builder().args(format_args!("x")).build();
        assert!(structured(&plain).is_empty());
    }
}
