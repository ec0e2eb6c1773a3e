//! The `bridge` quarantine action's kernel side: a guest's bridge ports moved to a named
//! quarantine bridge and isolated there.
//!
//! The hold is the bridge membership itself, which the kernel keeps while the service is
//! down. On the quarantine bridge every moved port is a Linux bridge *isolated* port
//! (`bridge_slave isolated on`, Linux 4.18+): isolated ports forward only to non-isolated
//! ones, so quarantined guests reach what the administrator attached there (a remediation
//! host, a VLAN to a scanning service, a honeypot) and never each other.
//!
//! The backend domain's own stack is kept off the quarantine bridge: an nftables netdev ingress
//! chain on the bridge device (table `netdev virtsec_qbr`) drops every frame the bridge passes
//! up to the host, and the bridge has no IPv6. Without it a quarantined guest still reached
//! dom0: Linux answers ARP for any of its addresses on any interface (the real-Xen harness
//! found guest2's pings to dom0's `xenbr0` address answered through the quarantine bridge).
//! Remediation hosts are therefore other machines, VMs or namespaces attached to the bridge,
//! never the backend domain itself.
//!
//! Which bridge a new vif joins is decided by the toolstack's backend `bridge` key, which
//! `vif-bridge` reads once the hotplug gate (`vif-virtsec`) lets it run; the quarantine
//! manager rewrites that key for a quarantined VM's vifs and does not report a vif's policy in
//! place until XenStore shows it, so a quarantined VM that reboots joins the quarantine bridge
//! directly. What this module does is for vifs already on a bridge: move them, and back on
//! release.
//!
//! Commands go through `ip` (iproute2), like the inline splice, so what changed is what an
//! administrator reads back with `ip -d link` and `bridge link`.

use std::process::Command;

use super::EnforceError;

/// A bridge port as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    /// The bridge it is on, if any.
    pub master: Option<String>,
    /// Bridge port isolation.
    pub isolated: bool,
}

fn ip(args: &[&str]) -> Result<String, EnforceError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(EnforceError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(EnforceError::Ip {
            cmd: format!("ip {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Parses `ip -d -j link show dev X` output.
fn parse_port(json: &str) -> Option<Port> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let l = v.get(0)?;
    let name = l["ifname"].as_str()?.to_string();
    let master = l["master"].as_str().map(str::to_string);
    let info = &l["linkinfo"];
    let isolated = info["info_slave_kind"].as_str() == Some("bridge")
        && info["info_slave_data"]["isolated"].as_bool() == Some(true);
    Some(Port {
        name,
        master,
        isolated,
    })
}

/// The interface `ifname`, `None` if it does not exist.
pub fn port(ifname: &str) -> Option<Port> {
    parse_port(&ip(&["-d", "-j", "link", "show", "dev", ifname]).ok()?)
}

/// Creates the quarantine bridge if it does not exist (no address, no uplink: what reaches
/// it is what the administrator attached) and brings it up. An existing interface of that
/// name that is not a bridge is an error, never replaced.
pub fn ensure_bridge(name: &str) -> Result<(), EnforceError> {
    // One look: absent, a bridge, or something else.
    let kind = ip(&["-d", "-j", "link", "show", "dev", name])
        .ok()
        .and_then(|j| serde_json::from_str::<serde_json::Value>(&j).ok())
        .map(|v| v[0]["linkinfo"]["info_kind"].as_str() == Some("bridge"));
    match kind {
        None => {
            ip(&["link", "add", name, "type", "bridge"])?;
            log::info!("quarantine bridge {name} created");
        }
        Some(false) => return Err(EnforceError::NotABridge(name.into())),
        Some(true) => {}
    }
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    super::nft(&host_drop_script(name), "quarantine bridge host drop")?;
    ip(&["link", "set", name, "up"])?;
    Ok(())
}

/// The table that keeps the host's stack off quarantine bridges.
const HOST_TABLE: &str = "netdev virtsec_qbr";

/// Drops, at the bridge device's ingress, every frame the bridge passes up to the host.
/// Idempotent: re-adding the same chain is accepted (and re-hooks a re-created bridge on
/// kernels that drop the hook with the device).
fn host_drop_script(bridge: &str) -> String {
    let chain = super::chain_for("h_", bridge);
    format!(
        "add table {HOST_TABLE}\n\
         add chain {HOST_TABLE} {chain} {{ type filter hook ingress devices = {{ \"{bridge}\" }} priority -500; policy drop; }}\n"
    )
}

/// Puts `port` on `bridge` with port isolation `isolated` (the port keeps its up/down state).
pub fn move_port(port: &str, bridge: &str, isolated: bool) -> Result<(), EnforceError> {
    ip(&["link", "set", "dev", port, "master", bridge])?;
    set_isolated(port, isolated)
}

/// Sets bridge port isolation on `port` (which is on a bridge).
pub fn set_isolated(port: &str, isolated: bool) -> Result<(), EnforceError> {
    let on = if isolated { "on" } else { "off" };
    ip(&[
        "link",
        "set",
        "dev",
        port,
        "type",
        "bridge_slave",
        "isolated",
        on,
    ])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_drop_chain_names_the_bridge() {
        assert_eq!(
            host_drop_script("vs-quar.0"),
            "add table netdev virtsec_qbr\nadd chain netdev virtsec_qbr h_vs_quar_0 { type filter hook ingress devices = { \"vs-quar.0\" } priority -500; policy drop; }\n"
        );
    }

    #[test]
    fn a_bridge_port_is_read_from_ip_json() {
        // `ip -d -j link show dev vif5.0` on a bridge port, trimmed to the fields read.
        let j = r#"[{"ifindex":7,"ifname":"vif5.0","master":"vsquarantine","linkinfo":{"info_kind":"veth","info_slave_kind":"bridge","info_slave_data":{"state":"forwarding","isolated":true}}}]"#;
        assert_eq!(
            parse_port(j),
            Some(Port {
                name: "vif5.0".into(),
                master: Some("vsquarantine".into()),
                isolated: true,
            })
        );
        let j = r#"[{"ifindex":7,"ifname":"vif5.0","linkinfo":{"info_kind":"veth"}}]"#;
        assert_eq!(
            parse_port(j),
            Some(Port {
                name: "vif5.0".into(),
                master: None,
                isolated: false,
            })
        );
        assert_eq!(parse_port("[]"), None);
        assert_eq!(parse_port("not json"), None);
    }
}
