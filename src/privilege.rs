//! Dropping privilege after setup.
//!
//! virtsecd runs as root (the xenstored socket, `/dev/xen/*` and the state directory are
//! root's) but needs only a few capabilities for what it does after start: nftables and links
//! (`CAP_NET_ADMIN`), AF_PACKET sockets for vifs that appear later (`CAP_NET_RAW`), pinned
//! capture rings (`CAP_IPC_LOCK`) and libxenctrl's privcmd hypercalls for `pause`
//! (`CAP_SYS_ADMIN`). `CAP_SYS_NICE` is used once, before the drop, for `[inspect] nice`.
//! Every other capability is removed from the bounding, permitted,
//! effective and inheritable sets, so neither the service nor the `nft`/`ip`/`xl` commands it
//! runs can regain them (for root, exec grants at most the bounding set). `no_new_privs` is set
//! too. The [`KEEP`] list is the whole contract; `tests/privilege.rs` reads it back from
//! `/proc/<pid>/status` of a running service.

use caps::{CapSet, Capability, CapsHashSet};

/// What the running service keeps.
pub const KEEP: [Capability; 4] = [
    Capability::CAP_NET_ADMIN,
    Capability::CAP_NET_RAW,
    Capability::CAP_IPC_LOCK,
    Capability::CAP_SYS_ADMIN,
];

/// Sets the calling thread's nice value, which the threads it starts afterwards inherit (on
/// Linux the nice value is per thread). Below 0 it needs CAP_SYS_NICE, so the service does it
/// before [`drop_to_service_set`].
pub fn set_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority takes no pointers; `0` is the calling thread.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS as _, 0, nice) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Errors dropping capabilities.
#[derive(Debug, thiserror::Error)]
#[error("cannot drop capabilities ({what}): {source}")]
pub struct PrivilegeError {
    what: &'static str,
    #[source]
    source: caps::errors::CapsError,
}

/// Drops every capability but [`KEEP`]. A process that does not hold them (an unprivileged
/// test run) keeps what it has of them; nothing is ever added.
pub fn drop_to_service_set() -> Result<CapsHashSet, PrivilegeError> {
    let keep: CapsHashSet = KEEP.iter().copied().collect();
    let err = |what| move |source| PrivilegeError { what, source };
    let bounding = caps::read(None, CapSet::Bounding).map_err(err("read bounding"))?;
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for c in bounding.difference(&keep) {
            caps::drop(None, CapSet::Bounding, *c).map_err(err("bounding"))?;
        }
    }
    let permitted = caps::read(None, CapSet::Permitted).map_err(err("read permitted"))?;
    let kept: CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new()).map_err(err("inheritable"))?;
    caps::set(None, CapSet::Effective, &kept).map_err(err("effective"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(err("permitted"))?;
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    Ok(kept)
}
