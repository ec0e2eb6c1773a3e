//! Enforcement held in the kernel: nftables rules on the bridge in front of the guests' vifs.
//!
//! One table, `bridge virtsec`, in the backend domain:
//!
//! ```text
//! chain prerouting (hook prerouting, priority -200)
//!     iifname vmap @vifs          # a known vif jumps to its own chain
//!     iifname "vif*" drop         # default deny: a vif with no policy yet passes nothing
//! chain g_vif5_0                  # one per vif, from the toolstack's backend mac/ip keys
//!     ether saddr != MAC drop, ARP sender MAC/IP checks, source IPv4/IPv6 checks,
//!     router advertisements, redirects and DHCP/DHCPv6 server replies from the guest dropped
//! ```
//!
//! Every change is one `nft -f` transaction (atomic: the kernel applies all of it or none):
//! the whole table at start (rebuilt from XenStore truth, replacing whatever a previous run
//! left, without a window where nothing is enforced), then one transaction per guest whose
//! policy changed, adding its chain and map element together. Kernel rules stay in place while
//! the service is down. Drop rules carry counters and comments; [`AntiSpoof::counters`] reads
//! them back per vif for `virtsec status`.
//!
//! Why nftables' text syntax rather than a crate: the `nftables` crate drives the `nft`
//! binary through its JSON syntax, and the netlink crates do not cover nftables' bridge family
//! expressions; the text syntax is what an administrator reads back with `nft list ruleset`,
//! and the transactions stay atomic either way. The text goes to libnftables in-process
//! ([`libnft`], the library `nft` itself is built on), or to `nft -f -` where the library does
//! not load. Counters are read back as `nft -j` prints them.

pub mod bridge;
pub mod domctl;
pub mod isolate;
pub mod libnft;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use crate::inventory::{Guests, MacAddr, Vif};

/// Errors applying rules.
#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error("cannot run nft: {0}. Install nftables (apt-get install nftables)")]
    Spawn(std::io::Error),
    #[error("nft refused the {what} transaction: {stderr}")]
    Nft { what: String, stderr: String },
    #[error("`{cmd}` failed: {stderr}")]
    Ip { cmd: String, stderr: String },
    #[error("{0} exists and is not a bridge: set [quarantine] bridge to a bridge's name, or to a name not in use")]
    NotABridge(String),
}

/// The policy of one vif, derived from trusted backend keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VifPolicy {
    pub domid: u32,
    pub ifname: String,
    pub mac: Option<MacAddr>,
    pub ips: Vec<IpAddr>,
}

impl VifPolicy {
    pub fn of(domid: u32, v: &Vif) -> Vec<VifPolicy> {
        let mut names = vec![v.ifname.clone()];
        names.extend(v.emu_ifname.clone());
        names
            .into_iter()
            .map(|ifname| VifPolicy {
                domid,
                ifname,
                mac: v.mac,
                ips: v.ips.clone(),
            })
            .collect()
    }
}

const TABLE: &str = "bridge virtsec";

/// The chain name of a vif (interface names may hold `.` and `-`).
pub fn chain_name(ifname: &str) -> String {
    chain_for("g_", ifname)
}

/// An nftables chain name for interface `ifname`: `prefix` and the name with every character
/// nft identifiers do not allow as `_`.
pub(crate) fn chain_for(prefix: &str, ifname: &str) -> String {
    let s: String = ifname
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("{prefix}{s}")
}

/// The rules of one vif's chain, in order (without the chain header).
pub fn vif_rules(p: &VifPolicy) -> Vec<String> {
    let mut r = Vec::new();
    if let Some(mac) = p.mac {
        r.push(format!(
            "ether saddr != {mac} counter drop comment \"spoof-mac\""
        ));
        r.push(format!(
            "ether type arp arp saddr ether != {mac} counter drop comment \"spoof-arp-mac\""
        ));
    }
    let v4: Vec<String> = p
        .ips
        .iter()
        .filter(|a| a.is_ipv4())
        .map(|a| a.to_string())
        .collect();
    let v6: Vec<String> = p
        .ips
        .iter()
        .filter(|a| a.is_ipv6())
        .map(|a| a.to_string())
        .collect();
    // Fast path: TCP from the guest's own address (its MAC was checked above) is what most
    // frames are, and none of the rules below can drop it (they are about UDP, ICMPv6, ARP
    // and other source addresses): accept it after two rules instead of ten.
    if !v4.is_empty() {
        r.push(format!(
            "ether type ip ip saddr {{ {} }} ip protocol tcp accept",
            v4.join(", ")
        ));
    }
    if !v6.is_empty() {
        r.push(format!(
            "ether type ip6 ip6 saddr {{ fe80::/10, {} }} meta l4proto tcp accept",
            v6.join(", ")
        ));
    }
    // A guest never answers as a DHCP server or a router.
    r.push("ether type ip udp sport 67 counter drop comment \"dhcp-server\"".into());
    r.push("ether type ip6 udp sport 547 counter drop comment \"dhcp6-server\"".into());
    r.push(
        "ether type ip6 icmpv6 type nd-router-advert counter drop comment \"router-advert\"".into(),
    );
    r.push("ether type ip6 icmpv6 type nd-redirect counter drop comment \"redirect\"".into());
    if !v4.is_empty() {
        let set = v4.join(", ");
        r.push(format!(
            "ether type arp arp saddr ip != {{ {set} }} counter drop comment \"spoof-arp-ip\""
        ));
        // DHCP discovery before the guest has its address.
        r.push("ether type ip ip saddr 0.0.0.0 udp sport 68 udp dport 67 accept".into());
        r.push(format!(
            "ether type ip ip saddr != {{ {set} }} counter drop comment \"spoof-ip4\""
        ));
    }
    if !v6.is_empty() {
        let set = v6.join(", ");
        // Neighbour advertisements may only claim the guest's own addresses: link-local, the
        // toolstack's, or its SLAAC (EUI-64) address in any prefix. The target sits at bit 64
        // of the ICMPv6 header; nft has no named field for it, so it is matched raw.
        let mut na =
            vec!["ether type ip6 icmpv6 type nd-neighbor-advert @th,64,10 != 0x3fa".to_string()];
        for a in p.ips.iter().filter_map(|a| match a {
            IpAddr::V6(v) => Some(u128::from(*v)),
            IpAddr::V4(_) => None,
        }) {
            na.push(format!("@th,64,128 != 0x{a:032x}"));
        }
        if let Some(mac) = p.mac {
            na.push(format!("@th,128,64 != 0x{:016x}", eui64(mac)));
        }
        na.push("counter drop comment \"spoof-na\"".into());
        r.push(na.join(" "));
        // Duplicate address detection comes from ::; link-local addresses are the guest's own.
        r.push("ether type ip6 ip6 saddr :: icmpv6 type nd-neighbor-solicit accept".into());
        if let Some(mac) = p.mac {
            // SLAAC: the guest's EUI-64 interface identifier in whatever prefix it learned.
            r.push(format!(
                "ether type ip6 ip6 saddr & ::ffff:ffff:ffff:ffff == {} accept",
                std::net::Ipv6Addr::from(u128::from(eui64(mac)))
            ));
        }
        r.push(format!(
            "ether type ip6 ip6 saddr != {{ fe80::/10, {set} }} counter drop comment \"spoof-ip6\""
        ));
    }
    r.push("accept".into());
    r
}

/// The modified EUI-64 interface identifier of a MAC (RFC 4291 appendix A): what SLAAC
/// without privacy extensions appends to a prefix.
pub fn eui64(mac: MacAddr) -> u64 {
    let m = mac.0;
    u64::from_be_bytes([m[0] ^ 0x02, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]])
}

fn base_script(vifs: &[VifPolicy]) -> String {
    let mut s = String::new();
    // Replace the table atomically: create (no-op if present), delete, recreate.
    s.push_str(&format!("add table {TABLE}\ndelete table {TABLE}\n"));
    s.push_str(&format!("table {TABLE} {{\n"));
    s.push_str("  map vifs { type ifname : verdict; }\n");
    for p in vifs {
        s.push_str(&format!("  chain {} {{\n", chain_name(&p.ifname)));
        for r in vif_rules(p) {
            s.push_str(&format!("    {r}\n"));
        }
        s.push_str("  }\n");
    }
    s.push_str("  chain prerouting {\n    type filter hook prerouting priority -200; policy accept;\n    iifname vmap @vifs\n    iifname \"vif*\" counter drop comment \"no-policy-yet\"\n    iifname \"vsb*\" counter drop comment \"no-policy-yet\"\n  }\n}\n");
    for p in vifs {
        s.push_str(&add_elements(p));
    }
    s
}

fn add_script(p: &VifPolicy, existed: bool) -> String {
    let c = chain_name(&p.ifname);
    let mut s = format!("add chain {TABLE} {c}\nflush chain {TABLE} {c}\n");
    for r in vif_rules(p) {
        s.push_str(&format!("add rule {TABLE} {c} {r}\n"));
    }
    if !existed {
        s.push_str(&add_elements(p));
    }
    s
}

/// The names whose frames enter the vif's chain: the vif and its inline port (the bridge
/// port that replaces it in inline mode; see `capture::inline`). The port's element is there
/// in passive mode too, so a guest switching modes never has a moment without policy.
fn ports(ifname: &str) -> Vec<String> {
    let mut v = vec![ifname.to_string()];
    v.extend(crate::capture::inline::port_names(ifname).map(|(b, _)| b));
    v
}

fn add_elements(p: &VifPolicy) -> String {
    let c = chain_name(&p.ifname);
    ports(&p.ifname)
        .iter()
        .map(|n| format!("add element {TABLE} vifs {{ \"{n}\" : jump {c} }}\n"))
        .collect()
}

fn remove_script(ifname: &str) -> String {
    let c = chain_name(ifname);
    let mut s = String::new();
    for n in ports(ifname) {
        s.push_str(&format!("delete element {TABLE} vifs {{ \"{n}\" }}\n"));
    }
    s.push_str(&format!(
        "flush chain {TABLE} {c}\ndelete chain {TABLE} {c}\n"
    ));
    s
}

/// Anti-spoofing drop counters: reason → packets, per chain (`*` for the default deny).
pub type Counters = BTreeMap<String, BTreeMap<String, u64>>;

/// Runs one nftables transaction: in-process through libnftables where it loads (see
/// [`libnft`]), else through `nft -f -`. Both apply the whole script or none of it.
pub(crate) fn nft(script: &str, what: &str) -> Result<(), EnforceError> {
    let failed = |stderr: String| EnforceError::Nft {
        what: what.into(),
        stderr,
    };
    if let Some(outcome) = libnft::run(script, false) {
        return outcome.map(drop).map_err(failed);
    }
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(EnforceError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(EnforceError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(EnforceError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// A listing as `nft -j` prints it (`command` is e.g. `list table bridge virtsec`), parsed.
/// A table that does not exist yet reads as `Null`.
pub(crate) fn nft_json(command: &str) -> Result<serde_json::Value, EnforceError> {
    let text = match libnft::run(command, true) {
        Some(outcome) => outcome.unwrap_or_default(),
        None => {
            let out = Command::new("nft")
                .arg("-j")
                .args(command.split_whitespace())
                .output()
                .map_err(EnforceError::Spawn)?;
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    Ok(serde_json::from_str(&text).unwrap_or_default())
}

/// Anti-spoofing rules for every vif of the inventory.
#[derive(Default)]
pub struct AntiSpoof {
    applied: BTreeMap<String, VifPolicy>,
}

impl AntiSpoof {
    /// Replaces the table with the policies of `guests` in one transaction.
    pub fn init(guests: &Guests) -> Result<AntiSpoof, EnforceError> {
        let want = Self::wanted(guests);
        let list: Vec<VifPolicy> = want.values().cloned().collect();
        nft(&base_script(&list), "initial table")?;
        Ok(AntiSpoof { applied: want })
    }

    fn wanted(guests: &Guests) -> BTreeMap<String, VifPolicy> {
        guests
            .values()
            .flat_map(|g| g.vifs.values().flat_map(move |v| VifPolicy::of(g.domid, v)))
            .map(|p| (p.ifname.clone(), p))
            .collect()
    }

    /// Applies what changed since the last call: one transaction per guest.
    pub fn sync(&mut self, guests: &Guests) -> Vec<EnforceError> {
        let want = Self::wanted(guests);
        let mut by_guest: BTreeMap<u32, String> = BTreeMap::new();
        let mut done: Vec<(u32, String, Option<VifPolicy>)> = Vec::new();
        for (name, p) in &want {
            match self.applied.get(name) {
                Some(old) if old == p => {}
                old => {
                    by_guest
                        .entry(p.domid)
                        .or_default()
                        .push_str(&add_script(p, old.is_some()));
                    done.push((p.domid, name.clone(), Some(p.clone())));
                }
            }
        }
        for (name, old) in &self.applied {
            if !want.contains_key(name) {
                by_guest
                    .entry(old.domid)
                    .or_default()
                    .push_str(&remove_script(name));
                done.push((old.domid, name.clone(), None));
            }
        }
        let mut errors = Vec::new();
        for (domid, script) in by_guest {
            match nft(&script, &format!("domain {domid}")) {
                Ok(()) => {
                    for (_, name, p) in done.iter().filter(|(d, _, _)| *d == domid) {
                        match p {
                            Some(p) => self.applied.insert(name.clone(), p.clone()),
                            None => self.applied.remove(name),
                        };
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }

    /// The vifs with a policy in the kernel, with their domain.
    pub fn vifs(&self) -> impl Iterator<Item = (&str, u32)> {
        self.applied.iter().map(|(n, p)| (n.as_str(), p.domid))
    }

    /// Whether `ifname`'s policy is in the kernel.
    pub fn has(&self, ifname: &str) -> bool {
        self.applied.contains_key(ifname)
    }

    /// Drop counters per vif and reason (`spoof-mac`, `spoof-ip4`, ...), plus the default deny
    /// (`no-policy-yet`, under the key `*`).
    pub fn counters() -> Counters {
        let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let Ok(v) = nft_json("list table bridge virtsec") else {
            return out;
        };
        for item in v["nftables"].as_array().into_iter().flatten() {
            let Some(rule) = item.get("rule") else {
                continue;
            };
            let (Some(chain), Some(comment)) = (rule["chain"].as_str(), rule["comment"].as_str())
            else {
                continue;
            };
            let packets = rule["expr"]
                .as_array()
                .into_iter()
                .flatten()
                .find_map(|e| e.get("counter").and_then(|c| c["packets"].as_u64()))
                .unwrap_or(0);
            let key = if chain == "prerouting" {
                "*".to_string()
            } else {
                chain.to_string()
            };
            // Several rules may share a reason (the default deny of `vif*` and `vsb*`).
            *out.entry(key)
                .or_default()
                .entry(comment.to_string())
                .or_insert(0) += packets;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_from_backend_keys() {
        let p = VifPolicy {
            domid: 5,
            ifname: "vif5.0".into(),
            mac: MacAddr::parse("00:16:3e:00:05:00"),
            ips: vec!["192.0.2.5".parse().unwrap(), "2001:db8::5".parse().unwrap()],
        };
        let r = vif_rules(&p).join("\n");
        assert!(r.contains("ether saddr != 00:16:3e:00:05:00 counter drop comment \"spoof-mac\""));
        assert!(r.contains("ip saddr != { 192.0.2.5 }"));
        assert!(r.contains("ip6 saddr != { fe80::/10, 2001:db8::5 }"));
        // The TCP fast path sits right after the MAC checks, before any other rule.
        let rules = vif_rules(&p);
        assert_eq!(
            rules[2],
            "ether type ip ip saddr { 192.0.2.5 } ip protocol tcp accept"
        );
        assert_eq!(
            rules[3],
            "ether type ip6 ip6 saddr { fe80::/10, 2001:db8::5 } meta l4proto tcp accept"
        );
        // SLAAC and neighbour advertisements.
        assert_eq!(
            eui64(MacAddr::parse("00:16:3e:00:05:00").unwrap()),
            0x0216_3eff_fe00_0500
        );
        assert!(r.contains("ip6 saddr & ::ffff:ffff:ffff:ffff == ::216:3eff:fe00:500 accept"));
        assert!(r.contains("@th,64,128 != 0x20010db8000000000000000000000005 @th,128,64 != 0x02163efffe000500 counter drop comment \"spoof-na\""));
        assert!(r.contains("nd-router-advert"));
        assert!(r.ends_with("accept"));
        assert_eq!(chain_name("vif5.0-emu"), "g_vif5_0_emu");
        // Without addresses only the MAC and the server/router rules apply.
        let bare = VifPolicy { ips: vec![], ..p };
        assert!(!vif_rules(&bare).join("\n").contains("spoof-ip4"));
        let s = base_script(&[bare]);
        assert!(s.starts_with("add table bridge virtsec\ndelete table bridge virtsec\n"));
        assert!(s.contains("iifname \"vif*\" counter drop"));
        assert!(s.contains("add element bridge virtsec vifs { \"vif5.0\" : jump g_vif5_0 }"));
        // The inline port of the vif shares its chain.
        assert!(s.contains("add element bridge virtsec vifs { \"vsb5.0\" : jump g_vif5_0 }"));
    }
}
