//! Quarantine held in the kernel: nftables table `bridge virtsec_q`.
//!
//! ```text
//! chain prerouting (hook prerouting, priority -300)   iifname vmap @q_in     # from guests
//! chain forward    (hook forward,    priority -300)   oifname vmap @q_out    # to guests
//! chain output     (hook output,     priority -300)   oifname vmap @q_out    # host to guests
//! chain qi_<uuid> / qo_<uuid>                         # one pair per quarantined VM
//!     bridge:   (qo) iifname @q_bridged counter drop      # not from another such VM
//!     isolate:  allow-list (remediation), then counter drop
//!     throttle: limit rate over N kbytes/second counter drop, then accept
//! set q_bridged                                       # ports of VMs under `bridge`
//! ```
//!
//! `bridge` moves a VM's ports to the quarantine bridge (`enforce::bridge`) as isolated
//! ports; the `q_bridged` rule keeps two such VMs apart by interface name too, so it holds
//! from the pass that sees a new vif, before `vif-bridge` has put it on any bridge and before
//! the service has set its port isolation.
//!
//! Chains are keyed by the VM's UUID, map elements by interface name (every vif of the VM,
//! its `-emu` twin and its inline port), so a VM that reboots with a new domid gets its new
//! vifs mapped to the same chains in the same pass that sees them, before the anti-spoofing
//! chain that would let them pass. The table runs before the anti-spoofing table (priority
//! -300 < -200) and is separate from it: anti-spoofing is rebuilt from XenStore at start,
//! quarantine never is; it is reconciled from the state files and what the kernel holds, and
//! it stays in the kernel while the service is down. Each VM's change is one `nft -f`
//! transaction.

use std::collections::{BTreeMap, BTreeSet};

use super::{nft, EnforceError};

const TABLE: &str = "bridge virtsec_q";

/// A remediation flow an isolated guest keeps (e.g. DNS to the resolver).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Allow {
    /// `tcp` or `udp`.
    pub proto: Proto,
    pub port: u16,
    /// The remote host (IPv4 or IPv6); any host when absent.
    pub host: Option<std::net::IpAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

/// What the kernel does to one VM's traffic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    pub isolate: bool,
    /// Policer in kbytes/s per direction, when throttled.
    pub throttle_kbytes: Option<u32>,
    pub allow: Vec<Allow>,
    /// Under `bridge`: nothing from another VM under `bridge` reaches it.
    pub bridge: bool,
}

/// `5e1ab000-...` → `5e1ab000_...` (validated UUIDs only reach here).
fn key(uuid: &str) -> String {
    uuid.replace('-', "_")
}

fn rules(h: &Hold, from_guest: bool) -> Vec<String> {
    let mut r = Vec::new();
    if h.bridge && !from_guest {
        r.push("iifname @q_bridged counter drop comment \"quarantine-bridge\"".to_string());
    }
    if h.isolate {
        if !h.allow.is_empty() {
            r.push("ether type arp accept".to_string());
        }
        for a in &h.allow {
            let proto = match a.proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            };
            let (port, addr) = if from_guest {
                ("dport", "daddr")
            } else {
                ("sport", "saddr")
            };
            let host = match a.host {
                Some(std::net::IpAddr::V4(ip)) => format!("ip {addr} {ip} "),
                Some(std::net::IpAddr::V6(ip)) => format!("ip6 {addr} {ip} "),
                None => String::new(),
            };
            r.push(format!("{host}{proto} {port} {} accept", a.port));
        }
        r.push("counter drop comment \"quarantine-isolate\"".into());
    } else if let Some(k) = h.throttle_kbytes {
        r.push(format!(
            "limit rate over {k} kbytes/second counter drop comment \"quarantine-throttle\""
        ));
        r.push("accept".into());
    } else {
        r.push("accept".into());
    }
    r
}

/// The kernel side of quarantine.
pub struct Isolation {
    /// Per UUID: the hold and the interface names mapped to it.
    /// `None`: chains read back from the kernel at start, rules not parsed; the first sync
    /// rewrites them from the state record (in one transaction, without removing them first).
    applied: BTreeMap<String, (Option<Hold>, BTreeSet<String>)>,
    /// Chains found in the kernel at start whose VM has no state record (kept, reported).
    pub orphans: BTreeSet<String>,
    /// The elements of set `q_bridged`.
    bridged: BTreeSet<String>,
    /// VMs whose chains isolate, as read back at start.
    isolating: BTreeSet<String>,
}

impl Isolation {
    /// Creates the table if needed and reads back what a previous run left: chains and map
    /// elements stay exactly as they are (nothing is flushed at start).
    pub fn open() -> Result<Isolation, EnforceError> {
        let base = format!(
            "add table {TABLE}\n\
             add map {TABLE} q_in {{ type ifname : verdict; }}\n\
             add map {TABLE} q_out {{ type ifname : verdict; }}\n\
             add set {TABLE} q_bridged {{ type ifname; }}\n\
             add chain {TABLE} prerouting {{ type filter hook prerouting priority -300; policy accept; }}\n\
             add chain {TABLE} forward {{ type filter hook forward priority -300; policy accept; }}\n\
             add chain {TABLE} output {{ type filter hook output priority -300; policy accept; }}\n"
        );
        nft(&base, "quarantine table")?;
        let v = super::nft_json("list table bridge virtsec_q")?;
        let (iso, has_rule) = Isolation::read_back(&v);
        let mut s = String::new();
        if !has_rule[0] {
            s.push_str(&format!("add rule {TABLE} prerouting iifname vmap @q_in\n"));
        }
        if !has_rule[1] {
            s.push_str(&format!("add rule {TABLE} forward oifname vmap @q_out\n"));
        }
        if !has_rule[2] {
            s.push_str(&format!("add rule {TABLE} output oifname vmap @q_out\n"));
        }
        if !s.is_empty() {
            nft(&s, "quarantine hooks")?;
        }
        Ok(iso)
    }

    /// What a previous run left, from `nft -j list table bridge virtsec_q`: per VM its chains
    /// and mapped interfaces, which of them isolate, the `q_bridged` elements; and which base
    /// chains have their dispatch rule.
    fn read_back(v: &serde_json::Value) -> (Isolation, [bool; 3]) {
        let mut iso = Isolation {
            applied: BTreeMap::new(),
            orphans: BTreeSet::new(),
            bridged: BTreeSet::new(),
            isolating: BTreeSet::new(),
        };
        let mut has_rule = [false; 3];
        for item in v["nftables"].as_array().into_iter().flatten() {
            if let Some(c) = item.get("chain") {
                if let Some(k) = c["name"].as_str().and_then(|n| n.strip_prefix("qi_")) {
                    let uuid = k.replace('_', "-");
                    iso.applied
                        .entry(uuid)
                        .or_insert_with(|| (None, BTreeSet::new()));
                }
            }
            if let Some(r) = item.get("rule") {
                match r["chain"].as_str() {
                    Some("prerouting") => has_rule[0] = true,
                    Some("forward") => has_rule[1] = true,
                    Some("output") => has_rule[2] = true,
                    Some(c) if r["comment"] == "quarantine-isolate" => {
                        if let Some(k) = c.strip_prefix("qi_") {
                            iso.isolating.insert(k.replace('_', "-"));
                        }
                    }
                    _ => {}
                }
            }
            if let Some(set) = item.get("set").filter(|s| s["name"] == "q_bridged") {
                iso.bridged.extend(
                    set["elem"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|e| e.as_str().map(str::to_string)),
                );
            }
            if let Some(m) = item.get("map") {
                if m["name"] != "q_in" {
                    continue;
                }
                for e in m["elem"].as_array().into_iter().flatten() {
                    let (Some(ifname), Some(target)) =
                        (e[0].as_str(), e[1]["jump"]["target"].as_str())
                    else {
                        continue;
                    };
                    if let Some(k) = target.strip_prefix("qi_") {
                        let uuid = k.replace('_', "-");
                        iso.applied
                            .entry(uuid)
                            .or_insert_with(|| (None, BTreeSet::new()))
                            .1
                            .insert(ifname.to_string());
                    }
                }
            }
        }
        (iso, has_rule)
    }

    /// How the kernel holds `uuid`, as read back at start: `(isolates, on the quarantine
    /// bridge's list)`.
    pub fn held_as(&self, uuid: &str) -> (bool, bool) {
        let bridged = self
            .applied
            .get(uuid)
            .is_some_and(|(_, ports)| ports.iter().any(|p| self.bridged.contains(p)));
        (self.isolating.contains(uuid), bridged)
    }

    /// UUIDs the kernel holds (from a previous run or this one).
    pub fn held(&self) -> impl Iterator<Item = &str> {
        self.applied.keys().map(String::as_str)
    }

    /// Makes the kernel hold `want` (per UUID: the hold and the interface names), one
    /// transaction per VM. `keep`: UUIDs to leave untouched even if not wanted (a VM whose
    /// state file is unreadable keeps what the kernel holds).
    pub fn sync(
        &mut self,
        want: &BTreeMap<String, (Hold, BTreeSet<String>)>,
        keep: &BTreeSet<String>,
    ) -> Vec<EnforceError> {
        let mut errors = Vec::new();
        let uuids: BTreeSet<String> = want.keys().chain(self.applied.keys()).cloned().collect();
        for uuid in uuids {
            let cur = self.applied.get(&uuid);
            let next = want.get(&uuid);
            let same = match (cur, next) {
                (Some((Some(h), p)), Some((wh, wp))) => h == wh && p == wp,
                (None, None) => true,
                _ => false,
            };
            if same || (next.is_none() && keep.contains(&uuid)) {
                continue;
            }
            let k = key(&uuid);
            let mut s = String::new();
            let old_ports: BTreeSet<String> = cur.map(|c| c.1.clone()).unwrap_or_default();
            // This VM's elements of q_bridged: what it should have, what it has.
            let want_b: BTreeSet<String> = match next {
                Some((h, p)) if h.bridge => p.clone(),
                _ => BTreeSet::new(),
            };
            let mine: BTreeSet<String> = old_ports
                .iter()
                .chain(next.map(|n| &n.1).into_iter().flatten())
                .cloned()
                .collect();
            let have_b: BTreeSet<String> = self.bridged.intersection(&mine).cloned().collect();
            for p in have_b.difference(&want_b) {
                s.push_str(&format!("delete element {TABLE} q_bridged {{ \"{p}\" }}\n"));
            }
            for p in want_b.difference(&have_b) {
                s.push_str(&format!("add element {TABLE} q_bridged {{ \"{p}\" }}\n"));
            }
            match next {
                Some((hold, ports)) => {
                    if cur.and_then(|c| c.0.as_ref()) != Some(hold) {
                        for (dir, from_guest) in [("qi", true), ("qo", false)] {
                            s.push_str(&format!(
                                "add chain {TABLE} {dir}_{k}\nflush chain {TABLE} {dir}_{k}\n"
                            ));
                            for r in rules(hold, from_guest) {
                                s.push_str(&format!("add rule {TABLE} {dir}_{k} {r}\n"));
                            }
                        }
                    }
                    for p in old_ports.difference(ports) {
                        s.push_str(&format!(
                            "delete element {TABLE} q_in {{ \"{p}\" }}\ndelete element {TABLE} q_out {{ \"{p}\" }}\n"
                        ));
                    }
                    for p in ports.difference(&old_ports) {
                        s.push_str(&format!(
                            "add element {TABLE} q_in {{ \"{p}\" : jump qi_{k} }}\nadd element {TABLE} q_out {{ \"{p}\" : jump qo_{k} }}\n"
                        ));
                    }
                }
                None => {
                    for p in &old_ports {
                        s.push_str(&format!(
                            "delete element {TABLE} q_in {{ \"{p}\" }}\ndelete element {TABLE} q_out {{ \"{p}\" }}\n"
                        ));
                    }
                    for dir in ["qi", "qo"] {
                        s.push_str(&format!(
                            "add chain {TABLE} {dir}_{k}\nflush chain {TABLE} {dir}_{k}\ndelete chain {TABLE} {dir}_{k}\n"
                        ));
                    }
                }
            }
            match nft(&s, &format!("quarantine of {uuid}")) {
                Ok(()) => {
                    for p in &have_b {
                        self.bridged.remove(p);
                    }
                    self.bridged.extend(want_b);
                    match next {
                        Some(n) => {
                            self.applied
                                .insert(uuid.clone(), (Some(n.0.clone()), n.1.clone()));
                            self.orphans.remove(&uuid);
                        }
                        None => {
                            self.applied.remove(&uuid);
                            self.orphans.remove(&uuid);
                        }
                    }
                }
                Err(e) => errors.push(e),
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolate_keeps_the_allow_list_and_drops_the_rest() {
        let h = Hold {
            isolate: true,
            throttle_kbytes: None,
            bridge: false,
            allow: vec![Allow {
                proto: Proto::Udp,
                port: 53,
                host: "10.0.0.53".parse().ok(),
            }],
        };
        assert_eq!(
            rules(&h, true),
            vec![
                "ether type arp accept",
                "ip daddr 10.0.0.53 udp dport 53 accept",
                "counter drop comment \"quarantine-isolate\""
            ]
        );
        assert_eq!(
            rules(&h, false)[1],
            "ip saddr 10.0.0.53 udp sport 53 accept"
        );
        let t = Hold {
            isolate: false,
            throttle_kbytes: Some(100),
            allow: vec![],
            bridge: false,
        };
        assert!(rules(&t, true)[0].starts_with("limit rate over 100 kbytes/second"));
    }

    #[test]
    fn what_a_previous_run_left_is_read_back_with_its_kind() {
        // `nft -j list table bridge virtsec_q`, trimmed: VM ..05 isolated, ..07 bridged.
        let v: serde_json::Value = serde_json::from_str(
            r#"{"nftables":[
              {"table":{"family":"bridge","name":"virtsec_q"}},
              {"set":{"family":"bridge","name":"q_bridged","table":"virtsec_q","type":"ifname","elem":["vif7.0"]}},
              {"map":{"family":"bridge","name":"q_in","table":"virtsec_q","type":"ifname","map":"verdict",
                "elem":[["vif5.0",{"jump":{"target":"qi_5e1ab000_0000_4000_8000_000000000005"}}],
                        ["vif7.0",{"jump":{"target":"qi_5e1ab000_0000_4000_8000_000000000007"}}]]}},
              {"chain":{"family":"bridge","table":"virtsec_q","name":"prerouting"}},
              {"chain":{"family":"bridge","table":"virtsec_q","name":"qi_5e1ab000_0000_4000_8000_000000000005"}},
              {"chain":{"family":"bridge","table":"virtsec_q","name":"qi_5e1ab000_0000_4000_8000_000000000007"}},
              {"rule":{"family":"bridge","table":"virtsec_q","chain":"prerouting","expr":[]}},
              {"rule":{"family":"bridge","table":"virtsec_q","chain":"qi_5e1ab000_0000_4000_8000_000000000005","comment":"quarantine-isolate","expr":[]}},
              {"rule":{"family":"bridge","table":"virtsec_q","chain":"qi_5e1ab000_0000_4000_8000_000000000007","expr":[]}}
            ]}"#,
        )
        .unwrap();
        let (iso, has_rule) = Isolation::read_back(&v);
        assert_eq!(has_rule, [true, false, false]);
        assert_eq!(iso.held().count(), 2);
        assert_eq!(
            iso.held_as("5e1ab000-0000-4000-8000-000000000005"),
            (true, false)
        );
        assert_eq!(
            iso.held_as("5e1ab000-0000-4000-8000-000000000007"),
            (false, true)
        );
        assert_eq!(
            iso.held_as("5e1ab000-0000-4000-8000-0000000000ff"),
            (false, false)
        );
        // bridge: nothing from another bridged VM reaches it; its own frames are not limited
        // here (its bridge membership holds them).
        let b = Hold {
            isolate: false,
            throttle_kbytes: None,
            allow: vec![],
            bridge: true,
        };
        assert_eq!(
            rules(&b, false),
            vec![
                "iifname @q_bridged counter drop comment \"quarantine-bridge\"",
                "accept"
            ]
        );
        assert_eq!(rules(&b, true), vec!["accept"]);
        assert_eq!(
            key("5e1ab000-0000-4000-8000-000000000005"),
            "5e1ab000_0000_4000_8000_000000000005"
        );
    }
}
