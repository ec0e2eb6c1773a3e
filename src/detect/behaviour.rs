//! Behaviour detectors per guest: port scan, host sweep, SYN flood and packet flood, over
//! fixed time windows of the guest's *outbound* traffic (what the guest sends).
//!
//! - **port scan**: more than `scan_ports` distinct destination ports on one host in a window
//!   (TCP SYNs without ACK, and UDP);
//! - **host sweep**: more than `sweep_hosts` distinct destination hosts in a window;
//! - **SYN flood**: more than `syn_per_s` TCP SYNs per second, averaged over the window;
//! - **packet flood**: more than `packets_per_s` packets per second over the window.
//!
//! Each finding fires at most once per window. Memory is bounded: at most `max_tracked`
//! destinations per window are remembered (a scanner past that already crossed the
//! thresholds). Findings are alerts with gid 9 and the sids below, so they flow through the
//! same EVE/syslog/`virtsec alerts` path as signatures.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use serde::Deserialize;

use super::rules::{Action, AddrSpec, FlowOpts, PortSpec, ProtoSel, Rule};
use crate::decode::{Packet, Proto};

/// Thresholds (`[behaviour]` in virtsecd.toml).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BehaviourConfig {
    pub enabled: bool,
    pub window_s: u64,
    pub scan_ports: usize,
    pub sweep_hosts: usize,
    pub syn_per_s: u64,
    pub packets_per_s: u64,
}

impl Default for BehaviourConfig {
    fn default() -> Self {
        BehaviourConfig {
            enabled: false,
            window_s: 10,
            scan_ports: 100,
            sweep_hosts: 64,
            syn_per_s: 500,
            packets_per_s: 100_000,
        }
    }
}

const MAX_TRACKED: usize = 4096;

/// What a detector found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finding {
    PortScan {
        dst: IpAddr,
        ports: usize,
    },
    HostSweep {
        hosts: usize,
    },
    SynFlood {
        per_s: u64,
    },
    PacketFlood {
        per_s: u64,
    },
    /// Not a traffic threshold: the guest's flow table is full and refuses new flows
    /// (`flow_table_full = "closed"`); raised by the data plane, sid 5.
    FlowTableFull {
        refused: u64,
    },
}

impl Finding {
    /// Signature id (gid 9).
    pub fn sid(&self) -> u32 {
        match self {
            Finding::PortScan { .. } => 1,
            Finding::HostSweep { .. } => 2,
            Finding::SynFlood { .. } => 3,
            Finding::PacketFlood { .. } => 4,
            Finding::FlowTableFull { .. } => 5,
        }
    }

    /// The pseudo-rule the alert names (message with the measured figure).
    pub fn rule(&self, window_s: u64) -> Rule {
        let (msg, class) = match self {
            Finding::PortScan { dst, ports } => (
                format!("virtsec behaviour: port scan ({ports} ports on {dst} in {window_s} s)"),
                "attempted-recon",
            ),
            Finding::HostSweep { hosts } => (
                format!("virtsec behaviour: host sweep ({hosts} hosts in {window_s} s)"),
                "attempted-recon",
            ),
            Finding::SynFlood { per_s } => (
                format!("virtsec behaviour: SYN flood ({per_s} SYN/s)"),
                "attempted-dos",
            ),
            Finding::PacketFlood { per_s } => (
                format!("virtsec behaviour: packet flood ({per_s} packets/s)"),
                "attempted-dos",
            ),
            Finding::FlowTableFull { refused } => (
                format!("virtsec: flow table full, new flows refused ({refused} so far)"),
                "attempted-dos",
            ),
        };
        Rule {
            action: Action::Alert,
            proto: ProtoSel::Ip,
            src: AddrSpec::Any,
            sport: PortSpec::Any,
            bidirectional: false,
            dst: AddrSpec::Any,
            dport: PortSpec::Any,
            msg,
            contents: Vec::new(),
            flow: FlowOpts::default(),
            sid: self.sid(),
            rev: 1,
            gid: 9,
            classtype: Some(class.into()),
            priority: Some(2),
            metadata: Vec::new(),
            references: Vec::new(),
            origin: "virtsec behaviour detectors".into(),
        }
    }
}

/// One guest's detector state.
#[derive(Debug)]
pub struct Behaviour {
    cfg: BehaviourConfig,
    window_start: u64,
    ports: HashMap<IpAddr, HashSet<u16>>,
    hosts: HashSet<IpAddr>,
    syns: u64,
    packets: u64,
    fired: [bool; 4],
    /// The last TCP segment's endpoints (source, destination), to name a flood the kernel
    /// counted (`on_uncopied`).
    last_tcp: Option<((IpAddr, u16), (IpAddr, u16))>,
}

impl Behaviour {
    pub fn new(cfg: BehaviourConfig) -> Behaviour {
        Behaviour {
            cfg,
            window_start: 0,
            ports: HashMap::new(),
            hosts: HashSet::new(),
            syns: 0,
            packets: 0,
            fired: [false; 4],
            last_tcp: None,
        }
    }

    /// The endpoints of the last TCP segment the guest sent.
    pub fn last_tcp(&self) -> Option<((IpAddr, u16), (IpAddr, u16))> {
        self.last_tcp
    }

    pub fn window_s(&self) -> u64 {
        self.cfg.window_s
    }

    /// Starts a new window if `ts_us` is past the current one.
    fn roll(&mut self, ts_us: u64) {
        let win = self.cfg.window_s.max(1) * 1_000_000;
        if ts_us.saturating_sub(self.window_start) >= win {
            self.window_start = ts_us;
            self.ports.clear();
            self.hosts.clear();
            self.syns = 0;
            self.packets = 0;
            self.fired = [false; 4];
        }
    }

    /// Notes `n` packets the guest sent that only the kernel counted (segments of
    /// established TCP flows handed to the capture filter: no SYN among them, so only the
    /// packet-flood threshold can be crossed); returns what crossed it.
    pub fn on_uncopied(&mut self, n: u64, ts_us: u64) -> Vec<Finding> {
        let mut out = Vec::new();
        if !self.cfg.enabled || n == 0 {
            return out;
        }
        self.roll(ts_us);
        self.packets += n;
        self.check_packet_flood(&mut out);
        out
    }

    fn check_packet_flood(&mut self, out: &mut Vec<Finding>) {
        let secs = self.cfg.window_s.max(1);
        if self.packets > self.cfg.packets_per_s * secs && !self.fired[3] {
            self.fired[3] = true;
            out.push(Finding::PacketFlood {
                per_s: self.packets / secs,
            });
        }
    }

    /// Notes one packet the guest sent at `ts_us`; returns what crossed a threshold.
    pub fn on_packet(&mut self, p: &Packet<'_>, ts_us: u64) -> Vec<Finding> {
        let mut out = Vec::new();
        if !self.cfg.enabled {
            return out;
        }
        self.roll(ts_us);
        self.packets += 1;
        if p.proto == Proto::Tcp {
            self.last_tcp = Some(((p.src, p.sport), (p.dst, p.dport)));
        }
        let probe = match (p.proto, p.tcp) {
            (Proto::Tcp, Some(t)) if t.syn && !t.ack_flag => {
                self.syns += 1;
                true
            }
            (Proto::Udp, _) => true,
            _ => false,
        };
        if probe {
            if self.hosts.len() < MAX_TRACKED {
                self.hosts.insert(p.dst);
            }
            if self.ports.len() < MAX_TRACKED {
                let set = self.ports.entry(p.dst).or_default();
                if set.len() < MAX_TRACKED {
                    set.insert(p.dport);
                }
            }
            let n = self.ports.get(&p.dst).map(HashSet::len).unwrap_or(0);
            if n > self.cfg.scan_ports && !self.fired[0] {
                self.fired[0] = true;
                out.push(Finding::PortScan {
                    dst: p.dst,
                    ports: n,
                });
            }
            if self.hosts.len() > self.cfg.sweep_hosts && !self.fired[1] {
                self.fired[1] = true;
                out.push(Finding::HostSweep {
                    hosts: self.hosts.len(),
                });
            }
        }
        let secs = self.cfg.window_s.max(1);
        if self.syns > self.cfg.syn_per_s * secs && !self.fired[2] {
            self.fired[2] = true;
            out.push(Finding::SynFlood {
                per_s: self.syns / secs,
            });
        }
        self.check_packet_flood(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::TcpInfo;

    fn syn(dst: &str, dport: u16) -> Packet<'static> {
        Packet {
            src: "10.0.0.5".parse().unwrap(),
            dst: dst.parse().unwrap(),
            proto: Proto::Tcp,
            sport: 40000,
            dport,
            tcp: Some(TcpInfo {
                seq: 1,
                ack: 0,
                syn: true,
                ack_flag: false,
                fin: false,
                rst: false,
            }),
            payload: b"",
        }
    }

    #[test]
    fn scan_and_sweep_fire_once_per_window() {
        let cfg = BehaviourConfig {
            enabled: true,
            scan_ports: 10,
            sweep_hosts: 5,
            ..BehaviourConfig::default()
        };
        let mut b = Behaviour::new(cfg);
        let mut found = Vec::new();
        for port in 1..=30 {
            found.extend(b.on_packet(&syn("10.0.0.1", port), 1_000_000));
        }
        assert_eq!(
            found,
            vec![Finding::PortScan {
                dst: "10.0.0.1".parse().unwrap(),
                ports: 11
            }]
        );
        let mut found = Vec::new();
        for h in 2..=10 {
            found.extend(b.on_packet(&syn(&format!("10.0.0.{h}"), 22), 2_000_000));
        }
        assert_eq!(found, vec![Finding::HostSweep { hosts: 6 }]);
        // A new window starts clean and can fire again.
        let mut found = Vec::new();
        for port in 1..=30 {
            found.extend(b.on_packet(&syn("10.0.0.1", port), 20_000_000));
        }
        assert_eq!(found.len(), 1);
        // Normal traffic (a few connections) fires nothing.
        let mut quiet = Behaviour::new(BehaviourConfig {
            enabled: true,
            ..BehaviourConfig::default()
        });
        for port in [80, 443, 53] {
            assert!(quiet.on_packet(&syn("10.0.0.9", port), 1).is_empty());
        }
    }

    #[test]
    fn syn_flood() {
        let cfg = BehaviourConfig {
            enabled: true,
            window_s: 1,
            syn_per_s: 100,
            ..BehaviourConfig::default()
        };
        let mut b = Behaviour::new(cfg);
        let n: usize = (0..500)
            .map(|_| {
                b.on_packet(&syn("10.0.0.1", 80), 5)
                    .iter()
                    .filter(|f| matches!(f, Finding::SynFlood { .. }))
                    .count()
            })
            .sum();
        assert_eq!(n, 1);
        assert_eq!(Finding::SynFlood { per_s: 1 }.rule(1).gid, 9);
    }

    #[test]
    fn frames_counted_in_the_kernel_feed_the_packet_flood() {
        let cfg = BehaviourConfig {
            enabled: true,
            window_s: 2,
            packets_per_s: 1000,
            ..BehaviourConfig::default()
        };
        let mut b = Behaviour::new(cfg);
        // 1,500 packets in the window: under 1,000/s over 2 s.
        assert!(b.on_uncopied(1500, 1_000_000).is_empty());
        assert!(b.on_packet(&syn("10.0.0.1", 80), 1_100_000).is_empty());
        // 600 more: 2,101 > 2,000.
        let f = b.on_uncopied(600, 1_200_000);
        assert!(
            matches!(f.as_slice(), [Finding::PacketFlood { per_s: 1050 }]),
            "{f:?}"
        );
        // Once per window; a new window starts from zero.
        assert!(b.on_uncopied(5000, 1_300_000).is_empty());
        assert!(b.on_uncopied(10, 3_500_000).is_empty());
    }
}
