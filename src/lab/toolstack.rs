//! A simulated toolstack that writes XenStore exactly as libxl 4.17 does for a PV guest with
//! vifs (`tools/libs/light/libxl_create.c`, `libxl_dom.c`, `libxl_device.c`, `libxl_nic.c`),
//! and plays netback's and the hotplug script's parts on the backend and netfront's on the
//! frontend. It is how the lab and the integration tests create, change and destroy guests
//! without a hypervisor; tests/xen-e2e checks the same expectations against real `xl`.
//!
//! Frontend writes that the real guest makes (netfront's `state`) go through the guest's own
//! connection when one is given (a lab `--domain-socket`), so permissions apply as on Xen.

use crate::xenstore::perms::{Access, Perm};
use crate::xenstore::{Client, XsError};

/// One vif of a simulated guest.
#[derive(Clone, Debug)]
pub struct VifSpec {
    pub devid: u32,
    pub mac: String,
    /// Space-separated addresses for the backend `ip` key (libxl's `ip=`), if any.
    pub ip: Option<String>,
    pub bridge: String,
    /// libxl's `vifname=`, if set.
    pub vifname: Option<String>,
    /// An HVM guest's NIC (`type=vif_ioemu`: also an emulated `-emu` twin).
    pub hvm: bool,
}

impl VifSpec {
    /// A PV vif with a MAC derived from the domid and devid in Xen's OUI.
    pub fn pv(domid: u32, devid: u32, bridge: &str) -> VifSpec {
        VifSpec {
            devid,
            mac: format!(
                "00:16:3e:{:02x}:{:02x}:{:02x}",
                (domid >> 8) & 0xff,
                domid & 0xff,
                devid & 0xff
            ),
            ip: None,
            bridge: bridge.into(),
            vifname: None,
            hvm: false,
        }
    }
}

/// A simulated guest.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    pub domid: u32,
    pub name: String,
    pub uuid: String,
    pub vifs: Vec<VifSpec>,
}

impl GuestSpec {
    /// A guest with one PV vif on `bridge` and a UUID derived from its domid.
    pub fn simple(domid: u32, name: &str, bridge: &str) -> GuestSpec {
        GuestSpec {
            domid,
            name: name.into(),
            uuid: format!("5e1ab000-0000-4000-8000-{domid:012x}"),
            vifs: vec![VifSpec::pv(domid, 0, bridge)],
        }
    }
}

/// The simulated toolstack, connected as dom0.
pub struct Toolstack {
    xs: Client,
    backend_domid: u32,
}

const VIF_SCRIPT: &str = "/etc/xen/scripts/vif-bridge";

/// Removes a node if it exists, as libxl's `libxl__xs_rm_checked` (ENOENT is fine).
fn rm_quiet(xs: &mut Client, t: u32, path: &str) -> Result<(), XsError> {
    match xs.rm_tx(t, path) {
        Err(e) if e.is_errno("ENOENT") => Ok(()),
        other => other,
    }
}

impl Toolstack {
    /// A toolstack whose vif backends live in dom0.
    pub fn new(xs: Client) -> Toolstack {
        Toolstack::with_backend(xs, 0)
    }

    /// A toolstack whose vif backends live in a network driver domain (`backend=` in xl).
    pub fn with_backend(xs: Client, backend_domid: u32) -> Toolstack {
        Toolstack { xs, backend_domid }
    }

    pub fn client(&mut self) -> &mut Client {
        &mut self.xs
    }

    /// What `xen-init-dom0` writes at boot: dom0's home with its name and domid.
    pub fn init_host(&mut self) -> Result<(), XsError> {
        self.xs.transaction(|xs, t| {
            xs.write_tx(t, "/local/domain/0/name", "Domain-0")?;
            xs.write_tx(t, "/local/domain/0/domid", "0")?;
            xs.mkdir_tx(t, "/vm")?;
            xs.mkdir_tx(t, "/libxl")
        })
    }

    fn be_path(&self, domid: u32, devid: u32) -> String {
        format!(
            "/local/domain/{}/backend/vif/{domid}/{devid}",
            self.backend_domid
        )
    }

    /// `xl create`: builds the domain's nodes, introduces it, adds and connects its vifs.
    /// `guest` is the guest's own connection, if the lab has one for it.
    pub fn create(&mut self, g: &GuestSpec, guest: Option<&mut Client>) -> Result<(), XsError> {
        let d = g.domid;
        let dom = format!("/local/domain/{d}");
        let vm = format!("/vm/{}", g.uuid);
        let libxl = format!("/libxl/{d}");
        let ro = [Perm::new(Access::None, 0), Perm::new(Access::Read, d)];
        let rw = [Perm::new(Access::None, d)];
        let none = [Perm::new(Access::None, 0)];
        // libxl__domain_make
        self.xs.transaction(|xs, t| {
            rm_quiet(xs, t, &dom)?;
            xs.mkdir_tx(t, &dom)?;
            xs.set_perms_tx(t, &dom, &ro)?;
            rm_quiet(xs, t, &vm)?;
            xs.mkdir_tx(t, &vm)?;
            xs.set_perms_tx(t, &vm, &ro)?;
            rm_quiet(xs, t, &libxl)?;
            xs.mkdir_tx(t, &libxl)?;
            xs.set_perms_tx(t, &libxl, &none)?;
            for sub in ["device", "data", "drivers", "feature", "attr", "error"] {
                let p = format!("{dom}/{sub}");
                xs.mkdir_tx(t, &p)?;
                xs.set_perms_tx(t, &p, &rw)?;
            }
            xs.mkdir_tx(t, &format!("{dom}/control"))?;
            xs.set_perms_tx(t, &format!("{dom}/control"), &ro)?;
            xs.mkdir_tx(t, &format!("{dom}/control/shutdown"))?;
            xs.set_perms_tx(t, &format!("{dom}/control/shutdown"), &rw)?;
            xs.write_tx(t, &format!("{vm}/uuid"), &g.uuid)?;
            xs.write_tx(t, &format!("{vm}/name"), &g.name)?;
            xs.write_tx(t, &format!("{vm}/start_time"), "0.00")?;
            xs.write_tx(t, &format!("{dom}/vm"), &vm)?;
            xs.write_tx(t, &format!("{dom}/name"), &g.name)?;
            xs.write_tx(t, &format!("{libxl}/type"), "pv")?;
            xs.write_tx(
                t,
                &format!("{dom}/control/platform-feature-multiprocessor-suspend"),
                "1",
            )?;
            Ok(())
        })?;
        // libxl__build_post
        self.xs.transaction(|xs, t| {
            xs.write_tx(t, &format!("{dom}/memory/static-max"), "131072")?;
            xs.write_tx(t, &format!("{dom}/memory/target"), "131072")?;
            xs.write_tx(t, &format!("{dom}/domid"), d.to_string())?;
            xs.write_tx(t, &format!("{dom}/store/port"), "1")?;
            xs.write_tx(t, &format!("{dom}/store/ring-ref"), "1044476")?;
            Ok(())
        })?;
        self.xs.introduce(d, 1044476, 1)?;
        let mut guest = guest;
        for v in &g.vifs {
            self.add_vif(d, v)?;
            self.connect_vif(d, v.devid, guest.as_deref_mut())?;
        }
        Ok(())
    }

    /// `libxl__device_nic_add` + `libxl__device_generic_add`: backend, frontend and libxl's
    /// private copy, in one transaction, states Initialising.
    pub fn add_vif(&mut self, d: u32, v: &VifSpec) -> Result<(), XsError> {
        let be = self.be_path(d, v.devid);
        let fe = format!("/local/domain/{d}/device/vif/{}", v.devid);
        let lx = format!("/libxl/{d}/device/vif/{}", v.devid);
        let b = self.backend_domid;
        let be_perms = [Perm::new(Access::None, b), Perm::new(Access::Read, d)];
        let fe_perms = [Perm::new(Access::None, d), Perm::new(Access::Read, b)];
        let mut back: Vec<(&str, String)> = vec![
            ("frontend", fe.clone()),
            ("frontend-id", d.to_string()),
            ("online", "1".into()),
            ("state", "1".into()),
            ("script", VIF_SCRIPT.into()),
            ("mac", v.mac.clone()),
            ("bridge", v.bridge.clone()),
            ("handle", v.devid.to_string()),
            ("type", if v.hvm { "vif_ioemu" } else { "vif" }.into()),
        ];
        if let Some(ip) = &v.ip {
            back.push(("ip", ip.clone()));
        }
        if let Some(n) = &v.vifname {
            back.push(("vifname", n.clone()));
        }
        let front: Vec<(&str, String)> = vec![
            ("backend", be.clone()),
            ("backend-id", b.to_string()),
            ("state", "1".into()),
            ("handle", v.devid.to_string()),
            ("mac", v.mac.clone()),
        ];
        self.xs.transaction(|xs, t| {
            rm_quiet(xs, t, &be)?;
            rm_quiet(xs, t, &fe)?;
            xs.mkdir_tx(t, &fe)?;
            xs.set_perms_tx(t, &fe, &fe_perms)?;
            xs.mkdir_tx(t, &be)?;
            xs.set_perms_tx(t, &be, &be_perms)?;
            xs.write_tx(t, &format!("{lx}/frontend"), &fe)?;
            xs.write_tx(t, &format!("{lx}/backend"), &be)?;
            for (k, val) in &back {
                xs.write_tx(t, &format!("{be}/{k}"), val)?;
                xs.write_tx(t, &format!("{lx}/{k}"), val)?;
            }
            for (k, val) in &front {
                xs.write_tx(t, &format!("{fe}/{k}"), val)?;
            }
            Ok(())
        })
    }

    /// netback probes (InitWait), the hotplug script reports `connected`, netfront connects,
    /// netback connects.
    pub fn connect_vif(
        &mut self,
        d: u32,
        devid: u32,
        guest: Option<&mut Client>,
    ) -> Result<(), XsError> {
        let be = self.be_path(d, devid);
        let fe = format!("/local/domain/{d}/device/vif/{devid}");
        for (k, v) in [
            ("feature-sg", "1"),
            ("feature-gso-tcpv4", "1"),
            ("feature-gso-tcpv6", "1"),
            ("feature-rx-copy", "1"),
            ("multi-queue-max-queues", "2"),
        ] {
            self.xs.write(&format!("{be}/{k}"), v)?;
        }
        self.xs.write(&format!("{be}/state"), "2")?;
        self.xs
            .write(&format!("{be}/hotplug-status"), "connected")?;
        let front = [
            ("tx-ring-ref", "8"),
            ("rx-ring-ref", "9"),
            ("event-channel", "10"),
            ("request-rx-copy", "1"),
            ("feature-rx-notify", "1"),
            ("feature-sg", "1"),
            ("state", "4"),
        ];
        match guest {
            Some(g) => {
                for (k, v) in front {
                    g.write(&format!("{fe}/{k}"), v)?;
                }
            }
            None => {
                for (k, v) in front {
                    self.xs.write(&format!("{fe}/{k}"), v)?;
                }
            }
        }
        self.xs.write(&format!("{be}/state"), "4")
    }

    /// `xl network-detach`: backend offline and Closing, Closed, hotplug remove, then the
    /// nodes go.
    pub fn remove_vif(&mut self, d: u32, devid: u32) -> Result<(), XsError> {
        let be = self.be_path(d, devid);
        let fe = format!("/local/domain/{d}/device/vif/{devid}");
        let lx = format!("/libxl/{d}/device/vif/{devid}");
        self.xs.transaction(|xs, t| {
            xs.write_tx(t, &format!("{be}/online"), "0")?;
            xs.write_tx(t, &format!("{be}/state"), "5")
        })?;
        self.xs.write(&format!("{fe}/state"), "6")?;
        self.xs.write(&format!("{be}/state"), "6")?;
        self.xs.rm(&format!("{be}/hotplug-status"))?;
        let be_dom = format!("/local/domain/{}/backend/vif/{d}", self.backend_domid);
        self.xs.transaction(|xs, t| {
            rm_quiet(xs, t, &fe)?;
            rm_quiet(xs, t, &be)?;
            rm_quiet(xs, t, &lx)?;
            // libxl removes the per-frontend backend directory once it is empty.
            if xs
                .directory_tx(t, &be_dom)
                .map(|v| v.is_empty())
                .unwrap_or(false)
            {
                rm_quiet(xs, t, &be_dom)?;
            }
            Ok(())
        })
    }

    /// `xl destroy`: every vif removed, the domain's nodes removed, the domain released.
    pub fn destroy(&mut self, d: u32) -> Result<(), XsError> {
        let be_dom = format!("/local/domain/{}/backend/vif/{d}", self.backend_domid);
        let devids: Vec<u32> = match self.xs.directory(&be_dom) {
            Ok(v) => v.iter().filter_map(|s| s.parse().ok()).collect(),
            Err(e) if e.is_errno("ENOENT") => Vec::new(),
            Err(e) => return Err(e),
        };
        for devid in devids {
            self.remove_vif(d, devid)?;
        }
        let vm = self.xs.read_opt(&format!("/local/domain/{d}/vm"))?;
        self.xs.transaction(|xs, t| {
            xs.rm_tx(t, &format!("/local/domain/{d}"))?;
            if let Some(vm) = &vm {
                if vm.starts_with("/vm/") {
                    rm_quiet(xs, t, vm)?;
                }
            }
            rm_quiet(xs, t, &format!("/libxl/{d}"))
        })?;
        match self.xs.release(d) {
            Err(e) if e.is_errno("ENOENT") => Ok(()),
            other => other,
        }
    }
}
