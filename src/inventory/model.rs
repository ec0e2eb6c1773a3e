//! What the service knows about each guest and each of its vifs.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

/// `enum xenbus_state` (`xen/include/public/io/xenbus.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum XenbusState {
    Unknown,
    Initialising,
    InitWait,
    Initialised,
    Connected,
    Closing,
    Closed,
    Reconfiguring,
    Reconfigured,
}

impl XenbusState {
    /// Parses the decimal value of a `state` node; anything else is `None`.
    pub fn parse(s: &str) -> Option<XenbusState> {
        Some(match s.trim() {
            "0" => XenbusState::Unknown,
            "1" => XenbusState::Initialising,
            "2" => XenbusState::InitWait,
            "3" => XenbusState::Initialised,
            "4" => XenbusState::Connected,
            "5" => XenbusState::Closing,
            "6" => XenbusState::Closed,
            "7" => XenbusState::Reconfiguring,
            "8" => XenbusState::Reconfigured,
            _ => return None,
        })
    }
}

/// A MAC address as the toolstack writes it (`00:16:3e:xx:xx:xx`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub fn parse(s: &str) -> Option<MacAddr> {
        let mut out = [0u8; 6];
        let mut parts = s.trim().split(':');
        for b in &mut out {
            let p = parts.next()?;
            if p.len() != 2 {
                return None;
            }
            *b = u8::from_str_radix(p, 16).ok()?;
        }
        parts.next().is_none().then_some(MacAddr(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One virtual interface, from the backend (trusted) tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Vif {
    pub devid: u32,
    /// The backend netdev: `vif<domid>.<devid>` or the toolstack's `vifname`.
    pub ifname: String,
    /// The emulated twin of an HVM guest's NIC (`<ifname>-emu`), present when the backend
    /// `type` is `vif_ioemu`.
    pub emu_ifname: Option<String>,
    pub mac: Option<MacAddr>,
    /// Addresses the toolstack allowed (`ip` key); empty means none were configured.
    pub ips: Vec<IpAddr>,
    pub bridge: Option<String>,
    pub script: Option<String>,
    pub state: Option<XenbusState>,
    pub hotplug_status: Option<String>,
    pub online: bool,
    /// netback credit scheduler setting (`<bytes>,<usecs>`), if set.
    pub rate: Option<String>,
    pub mtu: Option<u32>,
}

/// One guest domain.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Guest {
    pub domid: u32,
    /// From `/local/domain/<id>/vm` (`/vm/<uuid>`); `None` when unreadable (driver domain).
    pub uuid: Option<String>,
    pub name: Option<String>,
    /// The toolstack's policy label (`/vm/<uuid>/virtsec/label`), if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// `IS_DOMAIN_INTRODUCED`; `None` when it could not be asked.
    pub introduced: Option<bool>,
    pub vifs: BTreeMap<u32, Vif>,
}

/// The whole inventory, keyed by domid.
pub type Guests = BTreeMap<u32, Guest>;

/// Whether `name` is usable as a Linux interface name (`dev_valid_name`): 1–15 bytes, not
/// `.`/`..`, no `/`, `:` or whitespace.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// Whether `s` is a canonical textual UUID.
pub fn valid_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parse() {
        let m = MacAddr::parse("00:16:3e:0A:bb:01").unwrap();
        assert_eq!(m.to_string(), "00:16:3e:0a:bb:01");
        for bad in [
            "",
            "00:16:3e:0a:bb",
            "00:16:3e:0a:bb:01:02",
            "0:16:3e:0a:bb:01",
            "zz:16:3e:0a:bb:01",
        ] {
            assert!(MacAddr::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn names_and_uuids() {
        assert!(valid_ifname("vif5.0"));
        assert!(valid_ifname("vif5.0-emu"));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname("sixteen-chars-xx"));
        assert!(!valid_ifname("with space"));
        assert!(valid_uuid("6f2d1c2e-8a4b-4c3d-9e5f-0123456789ab"));
        assert!(!valid_uuid("6f2d1c2e-8a4b-4c3d-9e5f-0123456789a"));
        assert!(!valid_uuid("../../etc/passwd-xxxxxxxxxxxxxxxxxxxx"));
        assert_eq!(XenbusState::parse("4"), Some(XenbusState::Connected));
        assert_eq!(XenbusState::parse("9"), None);
    }
}
