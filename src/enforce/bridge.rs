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
//! Changes go through `ip` (iproute2), like the inline splice, so what changed is what an
//! administrator reads back with `ip -d link` and `bridge link`; reading a port's state is
//! two sysfs reads.

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

/// The interface `ifname`, `None` if it does not exist. Read from sysfs (`master` link,
/// `brport/isolated`), not from `ip`: the quarantine's sync pass asks for every port of every
/// VM held on the bridge, each time, and a process per port would be its main cost.
pub fn port(ifname: &str) -> Option<Port> {
    port_in(std::path::Path::new("/sys/class/net"), ifname)
}

fn port_in(sys: &std::path::Path, ifname: &str) -> Option<Port> {
    // A name with a `/` (or `..`) would leave the directory; the kernel allows neither.
    if ifname.is_empty() || ifname.contains('/') || ifname == "." || ifname == ".." {
        return None;
    }
    let dir = sys.join(ifname);
    if !dir.exists() {
        return None;
    }
    let master = std::fs::read_link(dir.join("master"))
        .ok()
        .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()));
    let isolated =
        std::fs::read_to_string(dir.join("brport/isolated")).is_ok_and(|v| v.trim() == "1");
    Some(Port {
        name: ifname.to_string(),
        master,
        isolated,
    })
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
    fn a_bridge_port_is_read_from_sysfs() {
        // The layout of /sys/class/net for a bridge port and for a lone interface.
        let sys = tempfile::tempdir().unwrap();
        let port = sys.path().join("vif5.0");
        std::fs::create_dir_all(port.join("brport")).unwrap();
        std::fs::create_dir_all(sys.path().join("vsquarantine")).unwrap();
        std::os::unix::fs::symlink("../vsquarantine", port.join("master")).unwrap();
        std::fs::write(port.join("brport/isolated"), "1\n").unwrap();
        assert_eq!(
            port_in(sys.path(), "vif5.0"),
            Some(Port {
                name: "vif5.0".into(),
                master: Some("vsquarantine".into()),
                isolated: true,
            })
        );
        std::fs::write(port.join("brport/isolated"), "0\n").unwrap();
        assert_eq!(
            port_in(sys.path(), "vif5.0").map(|p| p.isolated),
            Some(false)
        );
        std::fs::create_dir_all(sys.path().join("vif6.0")).unwrap();
        assert_eq!(
            port_in(sys.path(), "vif6.0"),
            Some(Port {
                name: "vif6.0".into(),
                master: None,
                isolated: false,
            })
        );
        assert_eq!(port_in(sys.path(), "vif7.0"), None);
        assert_eq!(port_in(sys.path(), ".."), None);
        assert_eq!(port_in(sys.path(), "../vif5.0"), None);
    }

    #[test]
    fn a_real_bridge_port_is_read() {
        // The loopback device exists everywhere and is nobody's bridge port.
        let lo = port("lo").unwrap();
        assert_eq!((lo.master, lo.isolated), (None, false));
    }
}
