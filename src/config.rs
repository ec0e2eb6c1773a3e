//! `virtsecd` configuration (TOML). Every option is documented in `docs/configuration.md` and
//! in the sample `xen-config/virtsecd.toml`. Unknown keys and bad values are rejected with the
//! file, line and reason: a typo must not silently fall back to a default in a security
//! service.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

/// Where the configuration is read from when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/virtsec/virtsecd.toml";

/// Errors loading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {reason}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        reason: String,
    },
}

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub xenstore: XenstoreConfig,
    pub control: ControlConfig,
    pub log: LogConfig,
    pub inspect: InspectConfig,
    pub enforce: EnforceConfig,
    pub behaviour: crate::detect::behaviour::BehaviourConfig,
    pub quarantine: crate::quarantine::QuarantineConfig,
    pub metrics: MetricsConfig,
    /// `[[policy]]`: per-guest choices, first match wins (see [`crate::policy`]).
    pub policy: Vec<crate::policy::PolicyEntry>,
}

/// `[metrics]`: Prometheus text metrics.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` to serve `GET /metrics` on (keep it local); unset: off.
    pub listen: Option<std::net::SocketAddr>,
}

/// `[enforce]`: rules held in the kernel.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EnforceConfig {
    /// nftables anti-spoofing on the bridge from the toolstack's mac/ip keys, with a
    /// default-deny for vifs that have no policy yet.
    pub antispoof: bool,
}

/// `[inspect]`: the live data plane.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct InspectConfig {
    /// Suricata-syntax rule files; none means no traffic inspection.
    pub rules: Vec<PathBuf>,
    /// EVE JSON file alerts are appended to.
    pub eve: PathBuf,
    /// Literal matcher: "auto" (Hyperscan when libhs.so.5 loads), "ac" or "hs".
    pub matcher: MatcherChoice,
    /// Default mode for guests no `[[policy]]` names.
    pub mode: Mode,
    /// Inspection threads per vif, sharing its traffic by a symmetric flow hash (fanout).
    #[serde(deserialize_with = "workers_1_to_64")]
    pub workers_per_vif: usize,
    /// Flows one worker tracks; what happens past it is `flow_table_full`.
    #[serde(deserialize_with = "flows_range")]
    pub max_flows: usize,
    /// A full flow table: "open" evicts the least recently seen flow, "closed" refuses new
    /// flows (inline drops their packets; both count them and raise an alert).
    pub flow_table_full: crate::flow::WhenFull,
    /// Passive mode: how a worker reads its vif, `queue` (the kernel queues references to
    /// frames, the worker copies them on its own CPU) or `ring` (the kernel copies frames
    /// into a TPACKET_V3 ring on the guest's path): `capture` module docs.
    pub capture: crate::capture::SourceKind,
    /// Passive mode, `capture = "ring"`: the ring's size per worker, MiB (kernel memory
    /// pinned while the vif is inspected). What absorbs bursts.
    #[serde(deserialize_with = "mib_1_to_1024")]
    pub ring_mib: usize,
    /// Passive mode, `capture = "queue"`: the most frame memory one worker's queue holds,
    /// MiB (nothing while the worker keeps up). What absorbs bursts and the worker's stalls.
    #[serde(deserialize_with = "mib_1_to_1024")]
    pub queue_mib: usize,
    /// Passive mode: a partly filled ring block reaches the worker after this long, ms. What
    /// an alert on a quiet vif may wait; each expiry is a kernel timer on the guests' CPUs
    /// (1 ms cost guest-to-guest throughput 15-20% on 2 vCPUs, 20 ms nothing measurable:
    /// docs/performance.md).
    #[serde(deserialize_with = "ms_1_to_1000")]
    pub block_timeout_ms: u32,
    /// The service's nice value, set at start before capabilities are dropped and inherited
    /// by every thread: below 0 the inspection workers run before ordinary work on contended
    /// CPUs (2 vCPUs shared with the guests: passive lost 1.3-1.6% of frames at 0,
    /// 0.06-0.13% at -10), and before the toolstack and device models too, so it is the
    /// operator's choice. 0 (the default) leaves it alone. -20 to 19.
    #[serde(deserialize_with = "nice_range")]
    pub nice: i32,
    /// Past the 1 MiB stream depth of a connection direction: keep inspecting each packet
    /// (true) or stop inspecting that direction (false, Suricata's stream bypass).
    pub inspect_past_depth: bool,
    /// `[inspect.inline]`
    pub inline: InlineConfig,
}

impl InspectConfig {
    /// The memory bound of the passive source `capture` chooses, MiB.
    pub fn capture_mib(&self) -> usize {
        match self.capture {
            crate::capture::SourceKind::Ring => self.ring_mib,
            crate::capture::SourceKind::Queue => self.queue_mib,
        }
    }
}

impl Default for InspectConfig {
    fn default() -> Self {
        InspectConfig {
            rules: Vec::new(),
            eve: PathBuf::from("/var/log/virtsec/eve.json"),
            matcher: MatcherChoice::Auto,
            mode: Mode::Passive,
            workers_per_vif: 1,
            max_flows: 1 << 18,
            flow_table_full: crate::flow::WhenFull::Open,
            capture: crate::capture::SourceKind::Queue,
            ring_mib: crate::capture::DEFAULT_RING_MIB,
            queue_mib: crate::capture::DEFAULT_QUEUE_MIB,
            block_timeout_ms: 20,
            nice: 0,
            inspect_past_depth: true,
            inline: InlineConfig::default(),
        }
    }
}

/// Where inspection sits on the guest's path.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A copy of the traffic (TPACKET_V3 ring): nothing added to the guest's path; verdicts
    /// act through kernel rules.
    Passive,
    /// The guest's frames wait for the verdict (AF_PACKET bridge with PACKET_VNET_HDR).
    Inline,
}

/// What inline mode does with frames it cannot inspect in time, or when the service is gone.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Forward uninspected (availability first).
    Open,
    /// Drop (security first).
    Closed,
}

/// `[inspect.inline]`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct InlineConfig {
    pub fail: FailMode,
    /// A frame that waited longer than this (kernel receive time to verdict) means overload:
    /// it and the frames behind it are handled by `fail` until the backlog is gone. 20 ms by
    /// default: a worker behind a bulk transfer keeps a queue of a few ms that TCP regulates
    /// itself; a bound under it (2 ms before) drops frames TCP then retransmits and the
    /// guest's other traffic with them (docs/performance.md).
    #[serde(deserialize_with = "micros_1_to_10s")]
    pub max_wait_us: u64,
    /// After forwarding, keep polling without sleeping this long: the reply to what was
    /// just forwarded is picked up without a wake-up (a sleeping thread's wake-up is tens of
    /// microseconds on a virtual CPU). 0: always sleep.
    #[serde(deserialize_with = "spin_range")]
    pub spin_us: u64,
    /// An idle worker still wakes this often, ms: a virtual CPU that a thread wakes every
    /// millisecond answers the next frame's wake-up tens of microseconds sooner than one left
    /// in deep idle (ping p50 +38 µs instead of +59 µs on 2 vCPUs); at 1 ms an idle inline
    /// worker uses ~2% of a core there. 1–1000.
    #[serde(deserialize_with = "ms_1_to_1000")]
    pub idle_wake_ms: u32,
    /// Where the workers run (`dataplane::placement`): `auto` (beside the vif's arriving
    /// frames while idle, where the scheduler puts them while busy), `irq` (always on the
    /// vif's netback interrupt's CPU, `capture::irq`), `scheduler` (never pinned).
    pub placement: Placement,
    /// `true`: the same as `placement = "irq"` (the key before `placement` existed).
    pub follow_irq: bool,
    /// Let the kernel forward the directions there is nothing left to inspect in (past the
    /// stream depth when not inspected there; another local guest's once busy).
    pub fast_path: bool,
    /// How the fast path's programs are attached: `auto` (tcx where the kernel has it, Linux
    /// 6.6, else a tc `cls_bpf` filter) or `tc` (always the filter).
    pub fast_path_attach: FastPathAttach,
}

/// `[inspect.inline] placement`
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    Auto,
    Irq,
    Scheduler,
}

impl InlineConfig {
    /// The placement in effect (`follow_irq = true` is `irq`).
    pub fn placement(&self) -> Placement {
        if self.follow_irq {
            Placement::Irq
        } else {
            self.placement
        }
    }
}

/// `[inspect.inline] fast_path_attach`
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FastPathAttach {
    Auto,
    Tc,
}

impl Default for InlineConfig {
    fn default() -> Self {
        InlineConfig {
            fail: FailMode::Closed,
            max_wait_us: 20_000,
            spin_us: 50,
            idle_wake_ms: 1,
            placement: Placement::Auto,
            follow_irq: false,
            fast_path: true,
            fast_path_attach: FastPathAttach::Auto,
        }
    }
}

/// A value within `lo..=hi`, else "<v> is out of range: expected <lo> to <hi> <unit>" (the
/// parser adds the file and line).
fn in_range<'de, D, T>(d: D, lo: T, hi: T, unit: &str) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + PartialOrd + std::fmt::Display,
{
    let v = T::deserialize(d)?;
    if lo <= v && v <= hi {
        Ok(v)
    } else {
        Err(serde::de::Error::custom(format!(
            "{v} is out of range: expected {lo} to {hi} {unit}"
        )))
    }
}

fn spin_range<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    in_range(d, 0, 10_000, "microseconds")
}

fn micros_1_to_10s<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    in_range(d, 1, 10_000_000, "microseconds")
}

fn flows_range<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    in_range(d, 16, 1 << 24, "flows")
}

fn mib_1_to_1024<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    in_range(d, 1, 1024, "MiB")
}

fn ms_1_to_1000<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    in_range(d, 1, 1000, "ms")
}

fn nice_range<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    in_range(d, -20, 19, "(a nice value)")
}

fn workers_1_to_64<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    in_range(d, 1, 64, "workers")
}

/// `[inspect] matcher`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MatcherChoice {
    Auto,
    Ac,
    Hs,
}

impl From<MatcherChoice> for crate::detect::matcher::Backend {
    fn from(m: MatcherChoice) -> Self {
        match m {
            MatcherChoice::Auto => crate::detect::matcher::Backend::Auto,
            MatcherChoice::Ac => crate::detect::matcher::Backend::Ac,
            MatcherChoice::Hs => crate::detect::matcher::Backend::Hs,
        }
    }
}

/// `[xenstore]`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct XenstoreConfig {
    /// Socket (`/run/xenstored/socket`, dom0) or device (`/dev/xen/xenbus`, any domain).
    pub path: PathBuf,
    /// The domain the service runs in (the backend domain of the vifs it guards). Unset:
    /// read from XenStore (`domid` under the service's own domain path), 0 if absent.
    pub domid: Option<u32>,
    /// How long one request may wait for xenstored before the connection is considered dead.
    #[serde(deserialize_with = "millis_1_to_600000")]
    pub request_timeout_ms: u64,
    /// First reconnect delay after xenstored goes away; doubles up to `reconnect_max_ms`.
    #[serde(deserialize_with = "millis_1_to_600000")]
    pub reconnect_min_ms: u64,
    #[serde(deserialize_with = "millis_1_to_600000")]
    pub reconnect_max_ms: u64,
    /// Watch each guest's frontend tree to count (never trust) what the guest writes there.
    pub watch_frontends: bool,
    /// Publish each vif's counters at `/local/domain/<self>/virtsec/vif/<vif>` at most this
    /// often (seconds; only what changed is written). 0: not published.
    #[serde(deserialize_with = "seconds_0_to_3600")]
    pub counters_interval_s: u64,
    /// dom0: the network driver domains (by name) whose virtsec gets the identities (VM UUID,
    /// name) of the guests each one backs (`inventory::identity`).
    pub driver_domains: Vec<String>,
    /// A driver domain: take guest identities from dom0's service, and report a vif's policy
    /// in place only once its guest's identity is known (a quarantined VM that reboots is
    /// held before its first packet).
    pub dom0_identities: bool,
}

impl Default for XenstoreConfig {
    fn default() -> Self {
        XenstoreConfig {
            path: PathBuf::from(crate::xenstore::transport::DEFAULT_SOCKET),
            domid: None,
            request_timeout_ms: 5000,
            reconnect_min_ms: 100,
            reconnect_max_ms: 5000,
            watch_frontends: true,
            counters_interval_s: 10,
            driver_domains: Vec::new(),
            dom0_identities: false,
        }
    }
}

/// `[control]`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// The operator socket (`virtsec status`, `virtsec domains`). Only root and the service's
    /// own user may use it (checked with SO_PEERCRED).
    pub socket: PathBuf,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: PathBuf::from("/run/virtsec/control.sock"),
        }
    }
}

/// Where logs go.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogTarget {
    Syslog,
    Stderr,
}

/// Log verbosity.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(l: LogLevel) -> log::LevelFilter {
        match l {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// `[log]`
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub target: LogTarget,
    pub level: LogLevel,
    /// Syslog message format: "rfc5424" (events carry structured data) or "rfc3164".
    pub syslog_format: SyslogFormat,
}

/// `[log] syslog_format`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyslogFormat {
    Rfc5424,
    Rfc3164,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            target: LogTarget::Syslog,
            level: LogLevel::Info,
            syslog_format: SyslogFormat::Rfc5424,
        }
    }
}

fn seconds_0_to_3600<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    in_range(d, 0, 3600, "seconds")
}

fn millis_1_to_600000<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    in_range(d, 1, 600_000, "milliseconds")
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, col)
}

impl Config {
    /// Parses `text`, naming `path` in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                reason: e.message().to_owned(),
            }
        })?;
        if cfg.xenstore.reconnect_min_ms > cfg.xenstore.reconnect_max_ms {
            let off = text.find("reconnect_min_ms").unwrap_or(0);
            let (line, column) = line_col(text, off);
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                reason: "reconnect_min_ms must not exceed reconnect_max_ms".into(),
            });
        }
        Ok(cfg)
    }

    /// Loads `path`. A missing file at the default location means "all defaults"; a missing
    /// file named explicitly is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/etc/virtsec/virtsecd.toml"))
    }

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(parse("").unwrap(), Config::default());
        let c = parse("[xenstore]\npath = \"/dev/xen/xenbus\"\ndomid = 3\n[log]\ntarget = \"stderr\"\nlevel = \"debug\"\n").unwrap();
        assert_eq!(c.xenstore.path, PathBuf::from("/dev/xen/xenbus"));
        assert_eq!(c.xenstore.domid, Some(3));
        assert_eq!(c.log.target, LogTarget::Stderr);
    }

    #[test]
    fn inline_placement_and_its_older_key() {
        assert_eq!(
            parse("").unwrap().inspect.inline.placement(),
            Placement::Auto
        );
        let p = |s: &str| parse(s).map(|c| c.inspect.inline.placement());
        assert_eq!(
            p("[inspect.inline]\nplacement = \"scheduler\"\n").unwrap(),
            Placement::Scheduler
        );
        assert_eq!(
            p("[inspect.inline]\nfollow_irq = true\n").unwrap(),
            Placement::Irq
        );
        assert_eq!(
            p("[inspect.inline]\nplacement = \"scheduler\"\nfollow_irq = false\n").unwrap(),
            Placement::Scheduler
        );
        let e = p("[inspect.inline]\nplacement = \"here\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":2:") && e.contains("here"), "{e}");
    }

    #[test]
    fn the_shipped_sample_parses_to_the_defaults() {
        let sample = include_str!("../xen-config/virtsecd.toml");
        assert_eq!(parse(sample).unwrap(), Config::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_file_and_line() {
        let e = parse("[xenstore]\npath = \"/x\"\npaht = \"/y\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/virtsec/virtsecd.toml:3:"), "{e}");
        assert!(e.contains("paht"), "{e}");
        let e = parse("[log]\nlevel = \"loud\"\n").unwrap_err().to_string();
        assert!(e.contains(":2:") && e.contains("loud"), "{e}");
        let e = parse("[xenstore]\nrequest_timeout_ms = 0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":2:") && e.contains("out of range"), "{e}");
        let e = parse("[xenstore]\nreconnect_min_ms = 900\nreconnect_max_ms = 100\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":2:"), "{e}");
        let e = parse("[bogus]\n").unwrap_err().to_string();
        assert!(e.contains(":1:") && e.contains("bogus"), "{e}");
        let e = parse("[inspect]\ncapture = \"mmap\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":2:") && e.contains("mmap"), "{e}");
        let c = parse("[inspect]\ncapture = \"ring\"\n").unwrap();
        assert_eq!(c.inspect.capture, crate::capture::SourceKind::Ring);
        // Each source has its own bound: a queue holds nothing while its worker keeps up, so
        // it may be larger than a ring, which is pinned.
        let c = parse("").unwrap();
        assert_eq!((c.inspect.ring_mib, c.inspect.queue_mib), (16, 64));
        let c = parse("[inspect]\nqueue_mib = 256\n").unwrap();
        assert_eq!((c.inspect.ring_mib, c.inspect.queue_mib), (16, 256));
        assert_eq!(c.inspect.capture_mib(), 256);
        let c = parse("[inspect]\ncapture = \"ring\"\nqueue_mib = 256\n").unwrap();
        assert_eq!(c.inspect.capture_mib(), 16);
        let e = parse("[inspect]\nqueue_mib = 2048\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":2:") && e.contains("out of range"), "{e}");
    }
}
