//! One reconcile pass: read XenStore truth, build the inventory.
//!
//! A [`Pass`] is a small state machine with no I/O of its own: it emits requests into an
//! outbox (tagged with [`Tag`]) and consumes replies. The daemon pipes them through its
//! non-blocking engine; tests pipe them through a map. The first round lists `/local/domain`
//! and the backend tree, the second reads each domain's trusted keys and lists each
//! frontend's vifs, the third reads every vif's backend keys. Replies may arrive in any order.
//!
//! Trust: only nodes the toolstack or the backend owns are used: `/local/domain/<id>/vm` and
//! `name` (created by libxl read-only for the guest) and the backend directory (owned by the
//! backend domain, read-only for the guest). The frontend `mac` is read only to count guests
//! whose frontend disagrees with the backend; it never feeds the inventory. Values are
//! validated (MAC syntax, IP syntax, interface-name rules, UUID syntax, `frontend-id` equal to
//! the directory it sits in); a bad value is dropped and counted, never trusted.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::model::{valid_ifname, valid_uuid, Guest, Guests, MacAddr, Vif, XenbusState};
use crate::xenstore::wire::{split_list, strip_nul, Request};

/// Backend keys read for every vif.
pub const VIF_KEYS: [&str; 12] = [
    "frontend-id",
    "online",
    "state",
    "script",
    "vifname",
    "mac",
    "ip",
    "bridge",
    "type",
    "hotplug-status",
    "rate",
    "mtu",
];

/// Domain keys read for every guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomKey {
    Vm,
    Name,
    Introduced,
    /// `/vm/<uuid>/virtsec/label`: a policy label the toolstack (dom0) may set; the guest
    /// cannot write under `/vm`.
    Label,
    /// In a driver domain: the guest's identity as dom0's service publishes it
    /// ([`super::identity`]).
    Dom0Identity,
}

/// What a reply is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tag {
    DomainList,
    FrontendList,
    Dom(u32, DomKey),
    VifList(u32),
    VifKey(u32, u32, usize),
    FrontendMac(u32, u32),
}

/// Problems found in one pass; they degrade the inventory but never stop it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PassReport {
    /// Backend or toolstack values that failed validation and were ignored.
    pub invalid_values: u64,
    /// Vifs whose guest-written frontend MAC differs from the backend's.
    pub frontend_mismatches: u64,
    /// Reads refused for lack of permission (expected in a driver domain).
    pub denied: Vec<String>,
    /// Other read errors.
    pub errors: Vec<String>,
}

#[derive(Default, Debug)]
struct VifAcc {
    keys: [Option<String>; VIF_KEYS.len()],
    frontend_mac: Option<String>,
}

#[derive(Default, Debug)]
struct GuestAcc {
    vm: Option<String>,
    name: Option<String>,
    label: Option<String>,
    introduced: Option<bool>,
    /// From dom0's service, used where this domain's own reads are refused.
    identity: Option<super::identity::Identity>,
    vifs: BTreeMap<u32, VifAcc>,
}

/// One reconcile pass in flight.
#[derive(Debug)]
pub struct Pass {
    self_domid: u32,
    backend_root: String,
    outstanding: usize,
    guests: BTreeMap<u32, GuestAcc>,
    report: PassReport,
}

fn parse_id(b: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(b).ok()?;
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn text(payload: &[u8]) -> String {
    String::from_utf8_lossy(strip_nul(payload)).into_owned()
}

impl Pass {
    /// Starts a pass for a backend running in domain `self_domid`; pushes the first requests.
    pub fn start(self_domid: u32, outbox: &mut Vec<(Request, Tag)>) -> Pass {
        let backend_root = format!("/local/domain/{self_domid}/backend/vif");
        outbox.push((Request::Directory("/local/domain".into()), Tag::DomainList));
        outbox.push((Request::Directory(backend_root.clone()), Tag::FrontendList));
        Pass {
            self_domid,
            backend_root,
            outstanding: 2,
            guests: BTreeMap::new(),
            report: PassReport::default(),
        }
    }

    /// Requests not yet answered.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    fn push(&mut self, outbox: &mut Vec<(Request, Tag)>, req: Request, tag: Tag) {
        self.outstanding += 1;
        outbox.push((req, tag));
    }

    fn note_error(&mut self, what: String, errno: &str) {
        if errno == "EACCES" || errno == "EPERM" {
            self.report.denied.push(what);
        } else {
            self.report.errors.push(format!("{what}: {errno}"));
        }
    }

    fn is_guest(&self, d: u32) -> bool {
        d != 0 && d != self.self_domid
    }

    /// Consumes one reply. Returns the finished inventory once the last reply is in.
    pub fn on_reply(
        &mut self,
        tag: Tag,
        result: Result<Vec<u8>, String>,
        outbox: &mut Vec<(Request, Tag)>,
    ) -> Option<(Guests, PassReport)> {
        self.outstanding = self.outstanding.saturating_sub(1);
        match (tag, result) {
            (Tag::DomainList, Ok(p)) => {
                for name in split_list(&p) {
                    match parse_id(name) {
                        Some(d) if self.is_guest(d) => {
                            self.guests.entry(d).or_default();
                            let base = format!("/local/domain/{d}");
                            self.push(
                                outbox,
                                Request::Read(format!("{base}/vm")),
                                Tag::Dom(d, DomKey::Vm),
                            );
                            self.push(
                                outbox,
                                Request::Read(format!("{base}/name")),
                                Tag::Dom(d, DomKey::Name),
                            );
                            self.push(
                                outbox,
                                Request::IsDomainIntroduced(d),
                                Tag::Dom(d, DomKey::Introduced),
                            );
                        }
                        Some(_) => {}
                        None => self.report.invalid_values += 1,
                    }
                }
            }
            (Tag::DomainList, Err(e)) => self.note_error("/local/domain".into(), &e),
            (Tag::FrontendList, Ok(p)) => {
                for name in split_list(&p) {
                    match parse_id(name) {
                        Some(fe) if self.is_guest(fe) => {
                            self.guests.entry(fe).or_default();
                            let dir = format!("{}/{fe}", self.backend_root);
                            self.push(outbox, Request::Directory(dir), Tag::VifList(fe));
                            if self.self_domid != 0 {
                                let node = super::identity::node(self.self_domid, fe);
                                self.push(
                                    outbox,
                                    Request::Read(node),
                                    Tag::Dom(fe, DomKey::Dom0Identity),
                                );
                            }
                        }
                        _ => self.report.invalid_values += 1,
                    }
                }
            }
            (Tag::FrontendList, Err(e)) if e == "ENOENT" => {}
            (Tag::FrontendList, Err(e)) => {
                let root = self.backend_root.clone();
                self.note_error(root, &e)
            }
            (Tag::Dom(d, key), res) => {
                let g = self.guests.entry(d).or_default();
                match (key, res) {
                    (DomKey::Vm, Ok(p)) => {
                        let vm = text(&p);
                        if vm.strip_prefix("/vm/").is_some_and(valid_uuid) {
                            let label = format!("{vm}/virtsec/label");
                            g.vm = Some(vm);
                            self.push(outbox, Request::Read(label), Tag::Dom(d, DomKey::Label));
                        } else {
                            g.vm = Some(vm);
                        }
                    }
                    (DomKey::Label, Ok(p)) => g.label = Some(text(&p)),
                    (DomKey::Name, Ok(p)) => g.name = Some(text(&p)),
                    (DomKey::Introduced, Ok(p)) => g.introduced = Some(strip_nul(&p) != b"F"),
                    (DomKey::Dom0Identity, Ok(p)) => match super::identity::parse(&p) {
                        Some(id) => g.identity = Some(id),
                        None => self.report.invalid_values += 1,
                    },
                    // dom0's service does not publish for this domain (not configured, or
                    // not yet): the guest stays without a UUID, as before.
                    (DomKey::Dom0Identity, Err(_)) => {}
                    (_, Err(e)) if e == "ENOENT" => {}
                    (key, Err(e)) => self.note_error(format!("domain {d} {key:?}"), &e),
                }
            }
            (Tag::VifList(fe), Ok(p)) => {
                for name in split_list(&p) {
                    let Some(devid) = parse_id(name) else {
                        self.report.invalid_values += 1;
                        continue;
                    };
                    self.guests
                        .entry(fe)
                        .or_default()
                        .vifs
                        .insert(devid, VifAcc::default());
                    let dir = format!("{}/{fe}/{devid}", self.backend_root);
                    for (i, k) in VIF_KEYS.iter().enumerate() {
                        self.push(
                            outbox,
                            Request::Read(format!("{dir}/{k}")),
                            Tag::VifKey(fe, devid, i),
                        );
                    }
                    let fe_mac = format!("/local/domain/{fe}/device/vif/{devid}/mac");
                    self.push(outbox, Request::Read(fe_mac), Tag::FrontendMac(fe, devid));
                }
            }
            (Tag::VifList(_), Err(e)) if e == "ENOENT" => {}
            (Tag::VifList(fe), Err(e)) => {
                self.note_error(format!("backend vifs of domain {fe}"), &e)
            }
            (Tag::VifKey(fe, devid, i), res) => match res {
                Ok(p) => {
                    if let Some(v) = self.vif_mut(fe, devid) {
                        v.keys[i] = Some(text(&p));
                    }
                }
                Err(e) if e == "ENOENT" => {}
                Err(e) => self.note_error(format!("vif {fe}/{devid} {}", VIF_KEYS[i]), &e),
            },
            (Tag::FrontendMac(fe, devid), Ok(p)) => {
                if let Some(v) = self.vif_mut(fe, devid) {
                    v.frontend_mac = Some(text(&p));
                }
            }
            // The frontend is informational only: any error is ignored.
            (Tag::FrontendMac(..), Err(_)) => {}
        }
        if self.outstanding == 0 {
            Some(self.finish())
        } else {
            None
        }
    }

    fn vif_mut(&mut self, fe: u32, devid: u32) -> Option<&mut VifAcc> {
        self.guests.get_mut(&fe)?.vifs.get_mut(&devid)
    }

    fn finish(&mut self) -> (Guests, PassReport) {
        let mut out = Guests::new();
        let mut report = std::mem::take(&mut self.report);
        for (domid, g) in std::mem::take(&mut self.guests) {
            let (id_uuid, id_name) = match g.identity {
                Some(id) => (Some(id.uuid), id.name),
                None => (None, None),
            };
            // What this domain reads itself wins over what dom0's service published.
            let uuid =
                g.vm.and_then(|vm| {
                    let u = vm.strip_prefix("/vm/").unwrap_or(&vm).to_owned();
                    if valid_uuid(&u) {
                        Some(u.to_ascii_lowercase())
                    } else {
                        report.invalid_values += 1;
                        None
                    }
                })
                .or(id_uuid);
            let name = g.name.or(id_name).filter(|n| {
                let ok = !n.is_empty() && n.len() <= 256 && !n.chars().any(char::is_control);
                if !ok {
                    report.invalid_values += 1;
                }
                ok
            });
            let label = g.label.filter(|l| {
                let ok = !l.is_empty()
                    && l.len() <= 64
                    && l.bytes()
                        .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(&c));
                if !ok {
                    report.invalid_values += 1;
                }
                ok
            });
            let mut vifs = BTreeMap::new();
            for (devid, acc) in g.vifs {
                if let Some(v) = build_vif(domid, devid, acc, &mut report) {
                    vifs.insert(devid, v);
                }
            }
            out.insert(
                domid,
                Guest {
                    domid,
                    uuid,
                    name,
                    label,
                    introduced: g.introduced,
                    vifs,
                },
            );
        }
        (out, report)
    }
}

fn key<'a>(acc: &'a VifAcc, name: &str) -> Option<&'a str> {
    let i = VIF_KEYS.iter().position(|k| *k == name)?;
    acc.keys[i].as_deref()
}

fn build_vif(domid: u32, devid: u32, acc: VifAcc, report: &mut PassReport) -> Option<Vif> {
    // A backend directory claiming another frontend is not trusted at all.
    if let Some(fe) = key(&acc, "frontend-id") {
        if fe.trim() != domid.to_string() {
            report.invalid_values += 1;
            return None;
        }
    }
    let mut bad = 0u64;
    let ifname = match key(&acc, "vifname") {
        Some(n) if valid_ifname(n) => n.to_owned(),
        Some(_) => {
            bad += 1;
            format!("vif{domid}.{devid}")
        }
        None => format!("vif{domid}.{devid}"),
    };
    let emu_ifname = (key(&acc, "type") == Some("vif_ioemu")).then(|| format!("{ifname}-emu"));
    let mac = key(&acc, "mac").and_then(|m| {
        let parsed = MacAddr::parse(m);
        if parsed.is_none() {
            bad += 1;
        }
        parsed
    });
    let mut ips = Vec::new();
    for tok in key(&acc, "ip").unwrap_or("").split_whitespace() {
        // libxl accepts "addr" and "addr/prefix"; the address is what anti-spoofing needs.
        let addr = tok.split('/').next().unwrap_or(tok);
        match addr.parse::<IpAddr>() {
            Ok(a) if !ips.contains(&a) => ips.push(a),
            Ok(_) => {}
            Err(_) => bad += 1,
        }
    }
    let state = key(&acc, "state").and_then(|s| {
        let st = XenbusState::parse(s);
        if st.is_none() {
            bad += 1;
        }
        st
    });
    let clean = |v: Option<&str>| {
        v.filter(|s| !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control))
            .map(str::to_owned)
    };
    let mtu = key(&acc, "mtu").and_then(|m| m.trim().parse().ok());
    if let (Some(fm), Some(bm)) = (acc.frontend_mac.as_deref(), mac) {
        if MacAddr::parse(fm) != Some(bm) {
            report.frontend_mismatches += 1;
        }
    }
    report.invalid_values += bad;
    Some(Vif {
        devid,
        ifname,
        emu_ifname,
        mac,
        ips,
        bridge: clean(key(&acc, "bridge")),
        script: clean(key(&acc, "script")),
        state,
        hotplug_status: clean(key(&acc, "hotplug-status")),
        online: key(&acc, "online").map(str::trim) == Some("1"),
        rate: clean(key(&acc, "rate")),
        mtu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Answers requests from a map, the way xenstored would for dom0.
    fn run(store: &HashMap<String, String>, self_domid: u32) -> (Guests, PassReport) {
        let mut outbox = Vec::new();
        let mut pass = Pass::start(self_domid, &mut outbox);
        loop {
            let batch: Vec<_> = std::mem::take(&mut outbox);
            assert!(!batch.is_empty(), "pass stalled");
            for (req, tag) in batch {
                let res = match &req {
                    Request::Read(p) => store
                        .get(p)
                        .map(|v| v.clone().into_bytes())
                        .ok_or("ENOENT".to_string()),
                    Request::Directory(p) => {
                        let prefix = format!("{p}/");
                        let mut kids: Vec<&str> = store
                            .keys()
                            .filter_map(|k| k.strip_prefix(&prefix))
                            .map(|rest| rest.split('/').next().unwrap_or(rest))
                            .collect();
                        kids.sort();
                        kids.dedup();
                        if kids.is_empty() {
                            Err("ENOENT".to_string())
                        } else {
                            Ok(crate::xenstore::wire::join_list(kids))
                        }
                    }
                    Request::IsDomainIntroduced(_) => Ok(b"T\0".to_vec()),
                    other => panic!("unexpected {other:?}"),
                };
                if let Some(done) = pass.on_reply(tag, res, &mut outbox) {
                    return done;
                }
            }
        }
    }

    fn libxl_guest(store: &mut HashMap<String, String>, d: u32, name: &str) {
        let uuid = format!("00000000-0000-4000-8000-{d:012}");
        store.insert(format!("/local/domain/{d}/vm"), format!("/vm/{uuid}"));
        store.insert(format!("/local/domain/{d}/name"), name.into());
        let be = format!("/local/domain/0/backend/vif/{d}/0");
        for (k, v) in [
            ("frontend-id", d.to_string()),
            ("online", "1".into()),
            ("state", "4".into()),
            ("mac", "00:16:3e:00:00:05".into()),
            ("ip", "10.0.0.5 fd00::5".into()),
            ("bridge", "xenbr0".into()),
            ("hotplug-status", "connected".into()),
            ("type", "vif".into()),
        ] {
            store.insert(format!("{be}/{k}"), v);
        }
        store.insert(
            format!("/local/domain/{d}/device/vif/0/mac"),
            "00:16:3e:00:00:05".into(),
        );
    }

    #[test]
    fn builds_guest_from_backend_and_toolstack_nodes() {
        let mut s = HashMap::new();
        s.insert("/local/domain/0/name".into(), "Domain-0".into());
        libxl_guest(&mut s, 5, "web1");
        let (g, report) = run(&s, 0);
        assert_eq!(g.len(), 1, "dom0 is not a guest");
        let web = &g[&5];
        assert_eq!(web.name.as_deref(), Some("web1"));
        assert_eq!(web.label, None);
        // The toolstack's label under /vm; a label-looking node the guest wrote in its own
        // tree is not read.
        s.insert(
            "/vm/00000000-0000-4000-8000-000000000005/virtsec/label".into(),
            "dmz".into(),
        );
        s.insert(
            "/local/domain/5/data/virtsec/label".into(),
            "trusted".into(),
        );
        let (g2, _) = run(&s, 0);
        assert_eq!(g2[&5].label.as_deref(), Some("dmz"));
        s.insert(
            "/vm/00000000-0000-4000-8000-000000000005/virtsec/label".into(),
            "bad label/../x".into(),
        );
        let (g3, r3) = run(&s, 0);
        assert_eq!(g3[&5].label, None);
        assert!(r3.invalid_values >= 1);
        s.remove("/vm/00000000-0000-4000-8000-000000000005/virtsec/label");
        assert_eq!(
            web.uuid.as_deref(),
            Some("00000000-0000-4000-8000-000000000005")
        );
        let v = &web.vifs[&0];
        assert_eq!(v.ifname, "vif5.0");
        assert_eq!(v.emu_ifname, None);
        assert_eq!(v.mac.unwrap().to_string(), "00:16:3e:00:00:05");
        assert_eq!(v.ips.len(), 2);
        assert_eq!(v.state, Some(XenbusState::Connected));
        assert!(v.online);
        assert_eq!(report, PassReport::default());
    }

    #[test]
    fn hostile_and_invalid_values_are_counted_not_trusted() {
        let mut s = HashMap::new();
        libxl_guest(&mut s, 7, "db");
        // The guest rewrote its frontend MAC: the inventory keeps the backend's.
        s.insert(
            "/local/domain/7/device/vif/0/mac".into(),
            "de:ad:be:ef:00:01".into(),
        );
        // Garbage in backend values (as if a buggy toolstack wrote them).
        s.insert(
            "/local/domain/0/backend/vif/7/0/ip".into(),
            "10.0.0.7 not-an-ip".into(),
        );
        s.insert(
            "/local/domain/0/backend/vif/7/0/vifname".into(),
            "../../evil name".into(),
        );
        s.insert(
            "/local/domain/0/backend/vif/7/0/type".into(),
            "vif_ioemu".into(),
        );
        let (g, report) = run(&s, 0);
        let v = &g[&7].vifs[&0];
        assert_eq!(v.mac.unwrap().to_string(), "00:16:3e:00:00:05");
        assert_eq!(v.ips, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(v.ifname, "vif7.0");
        assert_eq!(v.emu_ifname.as_deref(), Some("vif7.0-emu"));
        assert_eq!(report.frontend_mismatches, 1);
        assert_eq!(report.invalid_values, 2);
    }

    #[test]
    fn backend_claiming_another_frontend_is_dropped() {
        let mut s = HashMap::new();
        libxl_guest(&mut s, 8, "x");
        s.insert(
            "/local/domain/0/backend/vif/8/0/frontend-id".into(),
            "9".into(),
        );
        let (g, report) = run(&s, 0);
        assert!(g[&8].vifs.is_empty());
        assert_eq!(report.invalid_values, 1);
    }

    #[test]
    fn driver_domain_sees_guests_from_backend_only() {
        let mut s = HashMap::new();
        // Backend in domain 3; no /local/domain listing (nothing under it but the backend).
        s.insert(
            "/local/domain/3/backend/vif/12/0/frontend-id".into(),
            "12".into(),
        );
        s.insert(
            "/local/domain/3/backend/vif/12/0/mac".into(),
            "00:16:3e:00:00:0c".into(),
        );
        let (g, _) = run(&s, 3);
        assert_eq!(g.keys().copied().collect::<Vec<_>>(), vec![12]);
        assert_eq!(g[&12].name, None);
        assert_eq!(g[&12].uuid, None);
        assert_eq!(g[&12].vifs[&0].ifname, "vif12.0");
        // dom0's service publishes who guest 12 is (inventory::identity).
        s.insert(
            "/local/domain/0/virtsec/dd/3/vm/12".into(),
            r#"{"uuid":"5e1ab000-0000-4000-8000-00000000000c","name":"web"}"#.into(),
        );
        let (g, r) = run(&s, 3);
        assert_eq!(
            g[&12].uuid.as_deref(),
            Some("5e1ab000-0000-4000-8000-00000000000c")
        );
        assert_eq!(g[&12].name.as_deref(), Some("web"));
        assert_eq!(r.invalid_values, 0);
        // A malformed one is counted and ignored.
        s.insert(
            "/local/domain/0/virtsec/dd/3/vm/12".into(),
            r#"{"uuid":"../../../vm","name":"web"}"#.into(),
        );
        let (g, r) = run(&s, 3);
        assert_eq!(g[&12].uuid, None);
        assert_eq!(r.invalid_values, 1);
    }
}

/// Drives a pass with replies cut from `data` (chunks separated by `0xff`; a chunk starting
/// with `0xfe` is an error reply). Used by the fuzz target and property tests: must never
/// panic, whatever the replies.
pub fn fuzz_pass(data: &[u8]) -> usize {
    let mut chunks = data.split(|&b| b == 0xff);
    let mut outbox = Vec::new();
    // An odd first byte runs the pass as a driver domain's (domain 3), which also reads the
    // identities dom0's service publishes.
    let self_domid = if data.first().is_some_and(|b| b % 2 == 1) {
        3
    } else {
        0
    };
    let mut pass = Pass::start(self_domid, &mut outbox);
    let mut handled = 0;
    while let Some((_, tag)) = outbox.pop() {
        handled += 1;
        if handled > 20_000 {
            break;
        }
        let res = match chunks.next() {
            Some([0xfe, rest @ ..]) => Err(String::from_utf8_lossy(rest).into_owned()),
            Some(c) => Ok(c.to_vec()),
            None => Err("ENOENT".to_string()),
        };
        if let Some((guests, _)) = pass.on_reply(tag, res, &mut outbox) {
            return guests.len();
        }
    }
    0
}

#[cfg(test)]
mod prop {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_replies_finish_without_panic(data in proptest::collection::vec(any::<u8>(), 0..4000)) {
            super::fuzz_pass(&data);
        }
    }
}
