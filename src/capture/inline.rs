//! The kernel topology of inline mode: the vif is spliced out of its bridge and the service
//! forwards between it and a veth pair that takes its place.
//!
//! ```text
//! passive:  guest ── vif5.0 ──────────────────────────── xenbr0
//! inline:   guest ── vif5.0 ⇄ [virtsecd] ⇄ vsi5.0 ── vsb5.0 ── xenbr0
//! ```
//!
//! `vsb<rest>` (bridge side) and `vsi<rest>` (inspector side) are named from the vif's name
//! without its `vif` prefix, so `vif32767.15-emu` still fits Linux's 15-character limit and
//! the enforcement layer can name the port without asking the kernel: the anti-spoofing chain
//! of `vif5.0` also applies to frames entering the bridge from `vsb5.0`. A vif with a custom
//! name too long for the prefix cannot go inline (it stays passive, with a warning).
//!
//! The vif and `vsi` get an nftables netdev ingress chain that drops everything (table
//! `netdev virtsec_inline`): AF_PACKET taps see frames before the ingress hook, so the service
//! still reads every frame while the backend domain's own stack never processes guest frames
//! on a vif that is no longer a bridge port (it would answer ARP for its own addresses there).
//! (tc would do the same, but the matchall classifier and gact action are often not built.)
//!
//! What happens when the service is not forwarding is the fail mode: **closed** leaves the
//! splice in place (the guest is cut off until the service is back), **open** calls
//! [`restore`], putting the vif back on its bridge. Because a SIGKILLed service cannot restore
//! anything, the systemd unit runs `virtsec inline restore` after the service stops; it acts
//! only when the configuration says `fail = "open"`.
//!
//! Commands go through `ip` (iproute2) and `nft`, as enforcement does: the same objects an
//! administrator inspects with `ip link` and `nft list ruleset`.

use std::process::Command;

use crate::enforce::bridge;

/// Errors changing the topology.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot run {cmd}: {source}. Install iproute2")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{cmd}` failed: {stderr}")]
    Failed { cmd: String, stderr: String },
    #[error("{0} is not a bridge port; inline mode needs the vif on a bridge (vif-bridge)")]
    NotBridged(String),
    #[error("{0}: the name is too long for the inline port names (15 characters); left passive")]
    NameTooLong(String),
}

/// The veth pair that replaces a vif on its bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Splice {
    pub vif: String,
    pub bridge: String,
    /// Bridge side.
    pub bport: String,
    /// Inspector side.
    pub iport: String,
}

/// The address netback gives every vif (never a bridge's lowest port address).
const NETBACK_MAC: &str = "fe:ff:ff:ff:ff:ff";

/// The inline port names of a vif: `(bridge side, inspector side)`.
pub fn port_names(vif: &str) -> Option<(String, String)> {
    let rest = vif.strip_prefix("vif").unwrap_or(vif);
    if rest.is_empty() || rest.len() + 3 > 15 {
        return None;
    }
    Some((format!("vsb{rest}"), format!("vsi{rest}")))
}

/// The vif a bridge-side port stands for (inverse of [`port_names`] for `vif*` names; the
/// port's alias holds the exact name).
pub fn vif_of_port(bport: &str) -> Option<String> {
    bport.strip_prefix("vsb").map(|r| format!("vif{r}"))
}

fn run(args: &[&str]) -> Result<String, TopologyError> {
    let cmd = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|source| TopologyError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(TopologyError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// `(master, mtu)` of an interface, `None` if it does not exist.
fn link(ifname: &str) -> Option<(Option<String>, u64)> {
    let out = run(&["ip", "-j", "link", "show", "dev", ifname]).ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    let l = v.get(0)?;
    Some((
        l["master"].as_str().map(str::to_string),
        l["mtu"].as_u64().unwrap_or(1500),
    ))
}

pub fn exists(ifname: &str) -> bool {
    link(ifname).is_some()
}

/// Keeps the backend domain's own stack off the vif and the inspector side: an nftables
/// netdev ingress chain that drops everything. AF_PACKET taps see frames before the ingress
/// hook, so the service still reads them; nothing else does (no ARP answers or IP delivery on
/// a vif that is no longer a bridge port).
fn ingress_drop(vif: &str, iport: &str) -> Result<(), TopologyError> {
    let chain = ingress_chain(vif);
    let script = format!(
        "add table {INGRESS_TABLE}\nadd chain {INGRESS_TABLE} {chain} {{ type filter hook ingress devices = {{ \"{vif}\", \"{iport}\" }} priority -500; policy drop; }}\n"
    );
    nft(&script)
}

/// The nftables table of the ingress drops (separate from the bridge table, which is rebuilt
/// from XenStore truth at start).
const INGRESS_TABLE: &str = "netdev virtsec_inline";

fn ingress_chain(vif: &str) -> String {
    crate::enforce::chain_for("i_", vif)
}

/// One `nft -f` transaction, through the enforcement layer's runner.
fn nft(script: &str) -> Result<(), TopologyError> {
    crate::enforce::nft(script, "inline ingress drop").map_err(|e| TopologyError::Failed {
        cmd: "nft -f -".into(),
        stderr: e.to_string(),
    })
}

fn enforce_failed(e: crate::enforce::EnforceError) -> TopologyError {
    TopologyError::Failed {
        cmd: "ip link set type bridge_slave".into(),
        stderr: e.to_string(),
    }
}

fn no_ipv6(ifname: &str) {
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1",
    );
}

/// Creates (or finds, after a restart) the veth pair of `vif`, without splicing yet.
pub fn prepare(vif: &str) -> Result<Splice, TopologyError> {
    let (bport, iport) = port_names(vif).ok_or_else(|| TopologyError::NameTooLong(vif.into()))?;
    let (vif_master, mtu) = link(vif).ok_or_else(|| TopologyError::NotBridged(vif.into()))?;
    if let Some((Some(br), _)) = link(&bport) {
        // Spliced by an earlier run (fail-closed restart): reuse.
        return Ok(Splice {
            vif: vif.into(),
            bridge: br,
            bport,
            iport,
        });
    }
    let bridge = vif_master.ok_or_else(|| TopologyError::NotBridged(vif.into()))?;
    if exists(&bport) {
        run(&["ip", "link", "del", &bport])?;
    }
    let mtu = mtu.to_string();
    // The bridge-side port gets netback's vif address, fe:ff:ff:ff:ff:ff, for netback's
    // reason: a Linux bridge without an assigned address takes its lowest port's, and a
    // random one here could become the bridge's, changing the host's address under every
    // guest's ARP cache (the real-Xen harness lost dom0's connectivity that way).
    run(&[
        "ip",
        "link",
        "add",
        &bport,
        "address",
        NETBACK_MAC,
        "mtu",
        &mtu,
        "type",
        "veth",
        "peer",
        "name",
        &iport,
        "mtu",
        &mtu,
    ])?;
    // The vif's name in the port's alias: `virtsec inline restore` finds it from the kernel.
    run(&["ip", "link", "set", "dev", &bport, "alias", vif])?;
    no_ipv6(&iport);
    no_ipv6(&bport);
    run(&["ip", "link", "set", &iport, "up"])?;
    Ok(Splice {
        vif: vif.into(),
        bridge,
        bport,
        iport,
    })
}

/// Takes the vif off its bridge and puts the bridge-side port in its place. The caller has
/// its sockets open on the vif and the inspector side already.
pub fn splice(s: &Splice) -> Result<(), TopologyError> {
    no_ipv6(&s.vif);
    ingress_drop(&s.vif, &s.iport)?;
    // The port takes the vif's place with its isolation (a quarantined guest's port on the
    // quarantine bridge, or an administrator's isolated port, stays isolated).
    let isolated = bridge::port(&s.vif).is_some_and(|p| p.isolated);
    run(&["ip", "link", "set", &s.vif, "nomaster"])?;
    run(&["ip", "link", "set", &s.bport, "master", &s.bridge, "up"])?;
    if isolated {
        bridge::set_isolated(&s.bport, true).map_err(enforce_failed)?;
    }
    Ok(())
}

/// Puts `vif` back on the bridge of its inline port and removes the pair. Works after a
/// crash (it needs only the kernel's state). Returns whether there was a splice.
pub fn restore(vif: &str) -> Result<bool, TopologyError> {
    let Some((bport, _)) = port_names(vif) else {
        return Ok(false);
    };
    let Some((bridge, _)) = link(&bport) else {
        return Ok(false);
    };
    if exists(vif) {
        if let Some(br) = &bridge {
            let isolated = bridge::port(&bport).is_some_and(|p| p.isolated);
            run(&["ip", "link", "set", vif, "master", br])?;
            if isolated {
                bridge::set_isolated(vif, true).map_err(enforce_failed)?;
            }
        }
        // A fast-path filter a killed service left (inert once its lease ran out).
        if let Ok(ix) = nix::net::if_::if_nametoindex(vif) {
            super::tc::remove(ix);
        }
    }
    run(&["ip", "link", "del", &bport])?;
    let _ = nft(&format!(
        "delete chain {INGRESS_TABLE} {}\n",
        ingress_chain(vif)
    ));
    Ok(true)
}

/// Every inline port in this network namespace, as the vif it stands for.
pub fn spliced() -> Vec<String> {
    let Ok(out) = run(&["ip", "-j", "link", "show", "type", "veth"]) else {
        return Vec::new();
    };
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["ifname"].as_str().is_some_and(|n| n.starts_with("vsb")))
        .filter_map(|l| {
            l["ifalias"]
                .as_str()
                .map(str::to_string)
                .or_else(|| l["ifname"].as_str().and_then(vif_of_port))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names_fit_ifnamsiz() {
        assert_eq!(
            port_names("vif5.0"),
            Some(("vsb5.0".into(), "vsi5.0".into()))
        );
        let (b, i) = port_names("vif32767.15-emu").expect("fits");
        assert_eq!((b.len(), i.len()), (15, 15));
        assert_eq!(vif_of_port(&b).as_deref(), Some("vif32767.15-emu"));
        assert_eq!(
            port_names("web1"),
            Some(("vsbweb1".into(), "vsiweb1".into()))
        );
        assert_eq!(port_names("a-very-long-nm"), None);
        assert_eq!(port_names("vif"), None);
    }
}
