//! The lab's network: a "driver domain" network namespace with bridge `xenbr0`, and one
//! namespace per guest behind a veth named `vif<D>.0` in it (what netback and `vif-bridge`
//! make in a real backend domain). Every object is named with the `vslab-` prefix so
//! [`teardown`] can find and remove whatever a lab left behind, even one killed with SIGKILL.
//!
//! Guest-side traffic is made by this process itself: [`in_netns`] runs a closure on a thread
//! that has joined a guest's namespace (`setns(2)` changes only the calling thread), so the
//! lab needs no ping, nc or python in the guests.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Namespace of the driver domain (where virtsecd runs).
pub const DD: &str = "vslab-dd";
/// Prefix of every lab namespace.
pub const PREFIX: &str = "vslab-";
/// The bridge's (the backend domain's own) address.
pub const HOST_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 254);

/// Errors building the lab network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`{cmd}` failed: {stderr}. The lab needs root, iproute2 and nftables")]
    Cmd { cmd: String, stderr: String },
    #[error("cannot enter network namespace {ns}: {source}")]
    Setns {
        ns: String,
        #[source]
        source: std::io::Error,
    },
}

pub fn guest_ns(domid: u32) -> String {
    format!("{PREFIX}g{domid}")
}

pub fn guest_v4(domid: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, domid as u8)
}

pub fn guest_v6(domid: u32) -> std::net::Ipv6Addr {
    format!("2001:db8:77::{domid:x}")
        .parse()
        .unwrap_or(std::net::Ipv6Addr::LOCALHOST)
}

pub fn guest_mac(domid: u32) -> String {
    format!("00:16:3e:00:{:02x}:00", domid & 0xff)
}

fn run(args: &[&str]) -> Result<String, NetError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| NetError::Cmd {
            cmd: args.join(" "),
            stderr: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Cmd {
            cmd: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Lab namespaces that exist now.
pub fn namespaces() -> Vec<String> {
    run(&["ip", "netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_string)
        .collect()
}

/// Removes every lab namespace (their veths, bridge and nftables tables go with them).
pub fn teardown() -> Vec<String> {
    let ns = namespaces();
    for n in &ns {
        let _ = run(&["ip", "netns", "del", n]);
    }
    ns
}

/// The driver domain: namespace, loopback, bridge with the host address.
pub fn create_host() -> Result<(), NetError> {
    run(&["ip", "netns", "add", DD])?;
    run(&["ip", "-n", DD, "link", "set", "lo", "up"])?;
    run(&["ip", "-n", DD, "link", "add", "xenbr0", "type", "bridge"])?;
    let host = format!("{HOST_V4}/24");
    run(&["ip", "-n", DD, "addr", "add", &host, "dev", "xenbr0"])?;
    run(&["ip", "-n", DD, "link", "set", "xenbr0", "up"])?;
    Ok(())
}

/// What netback does when the guest's vif connects: the backend netdev `vif<D>.0` appears
/// (down), with the guest's end in the guest's namespace, addressed and up.
pub fn plug_vif(domid: u32) -> Result<String, NetError> {
    let ns = guest_ns(domid);
    let vif = format!("vif{domid}.0");
    if !namespaces().contains(&ns) {
        run(&["ip", "netns", "add", &ns])?;
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
    }
    run(&[
        "ip", "-n", DD, "link", "add", &vif, "type", "veth", "peer", "name", "eth0", "netns", &ns,
    ])?;
    let mac = guest_mac(domid);
    run(&["ip", "-n", &ns, "link", "set", "eth0", "address", &mac])?;
    let v4 = format!("{}/24", guest_v4(domid));
    run(&["ip", "-n", &ns, "addr", "add", &v4, "dev", "eth0"])?;
    let v6 = format!("{}/64", guest_v6(domid));
    run(&["ip", "-n", &ns, "addr", "add", &v6, "dev", "eth0", "nodad"])?;
    run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
    Ok(vif)
}

/// What `vif-bridge` does once the hotplug gate says the vif's policy is in place.
pub fn bridge_vif(domid: u32) -> Result<(), NetError> {
    let vif = format!("vif{domid}.0");
    run(&[
        "ip", "-n", DD, "link", "set", &vif, "master", "xenbr0", "up",
    ])?;
    Ok(())
}

/// netback removing the vif on destroy, and the guest going away.
pub fn unplug(domid: u32) {
    let _ = run(&["ip", "-n", DD, "link", "del", &format!("vif{domid}.0")]);
    let _ = run(&["ip", "netns", "del", &guest_ns(domid)]);
}

/// Runs `f` on a thread inside network namespace `ns`.
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetError> {
    let path = format!("/run/netns/{ns}");
    let ns_name = ns.to_string();
    let h = std::thread::spawn(move || -> Result<T, NetError> {
        let fd = File::open(&path).map_err(|source| NetError::Setns {
            ns: ns_name.clone(),
            source,
        })?;
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
            NetError::Setns {
                ns: ns_name,
                source: std::io::Error::from(e),
            }
        })?;
        Ok(f())
    });
    h.join().unwrap_or_else(|_| {
        Err(NetError::Cmd {
            cmd: "lab traffic thread".into(),
            stderr: "panicked".into(),
        })
    })
}

/// A small TCP echo service on port 7 in a guest's namespace, until `stop`.
pub fn echo_server(ns: &str, stop: Arc<AtomicBool>) -> Result<(), NetError> {
    let path = format!("/run/netns/{ns}");
    let ns_name = ns.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let setup = File::open(&path)
            .map_err(|e| e.to_string())
            .and_then(|fd| {
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| e.to_string())
            })
            .and_then(|_| TcpListener::bind("[::]:7").map_err(|e| e.to_string()));
        let l = match setup {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        let _ = l.set_nonblocking(true);
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                    let mut b = [0u8; 4096];
                    while let Ok(n) = s.read(&mut b) {
                        if n == 0 || s.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    match rx.recv_timeout(Duration::from_secs(2)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(NetError::Cmd {
            cmd: format!("echo service in {ns_name}"),
            stderr: e,
        }),
        Err(_) => Err(NetError::Cmd {
            cmd: format!("echo service in {ns_name}"),
            stderr: "did not start".into(),
        }),
    }
}

/// From `ns`, a round trip through `dst`'s echo service; `Err` with why it failed.
pub fn talk(ns: &str, dst: IpAddr) -> Result<Duration, String> {
    in_netns(ns, move || {
        let t = std::time::Instant::now();
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::new(dst, 7), Duration::from_millis(400))
                .map_err(|e| format!("connect {dst}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_millis(400)))
            .map_err(|e| e.to_string())?;
        s.write_all(b"hello").map_err(|e| e.to_string())?;
        let mut b = [0u8; 5];
        s.read_exact(&mut b)
            .map_err(|e| format!("echo from {dst}: {e}"))?;
        Ok(t.elapsed())
    })
    .map_err(|e| e.to_string())?
}

/// From `ns`, TCP to `dst:port` with `parts` each sent as its own segment.
pub fn send_segments(ns: &str, dst: IpAddr, port: u16, parts: Vec<Vec<u8>>) -> Result<(), String> {
    in_netns(ns, move || {
        let mut s =
            TcpStream::connect_timeout(&SocketAddr::new(dst, port), Duration::from_millis(500))
                .map_err(|e| format!("connect {dst}:{port}: {e}"))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        for p in parts {
            s.write_all(&p).map_err(|e| e.to_string())?;
            std::thread::sleep(Duration::from_millis(30));
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?
}

/// A TCP sink on `port` in `ns` that accepts one connection and returns what it read.
pub fn tcp_sink(ns: &str, port: u16) -> Result<std::thread::JoinHandle<Vec<u8>>, NetError> {
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let l = File::open(&path)
            .ok()
            .and_then(|fd| nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).ok())
            .and_then(|_| TcpListener::bind(("0.0.0.0", port)).ok());
        let _ = tx.send(l.is_some());
        let mut got = Vec::new();
        if let Some(l) = l {
            let _ = l.set_nonblocking(true);
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            while std::time::Instant::now() < deadline {
                if let Ok((mut s, _)) = l.accept() {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_millis(700)));
                    let _ = s.read_to_end(&mut got);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        got
    });
    if rx.recv_timeout(Duration::from_secs(2)).unwrap_or(false) {
        Ok(h)
    } else {
        Err(NetError::Cmd {
            cmd: format!("TCP sink on port {port} in {ns}"),
            stderr: "cannot listen".into(),
        })
    }
}

/// From `ns`, connection attempts to `ports` on `dst` (a port scan); returns how many were
/// answered (accepted or refused).
pub fn scan(ns: &str, dst: Ipv4Addr, ports: std::ops::Range<u16>) -> Result<usize, String> {
    in_netns(ns, move || {
        let mut answered = 0;
        for p in ports {
            match TcpStream::connect_timeout(
                &SocketAddr::new(IpAddr::V4(dst), p),
                Duration::from_millis(100),
            ) {
                Ok(_) => answered += 1,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => answered += 1,
                Err(_) => {}
            }
        }
        answered
    })
    .map_err(|e| e.to_string())
}

/// From `ns`, a UDP datagram to `dst:port` with a forged IPv4 source, written as a raw frame
/// on the guest's `eth0` (what a compromised guest can do). Returns the frame's length.
pub fn send_spoofed_udp(
    ns: &str,
    src_mac: [u8; 6],
    forged_src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
) -> Result<usize, String> {
    let b = etherparse::PacketBuilder::ethernet2(src_mac, [0xff; 6])
        .ipv4(forged_src.octets(), dst.octets(), 64)
        .udp(40000, port);
    let payload = b"virtsec lab: forged source";
    let mut frame = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut frame, payload).map_err(|e| e.to_string())?;
    send_frame(ns, "eth0", frame)
}

/// From `ns`, one raw Ethernet frame out of `iface` (AF_PACKET): any bytes a guest's kernel
/// could put on the wire.
pub fn send_frame(ns: &str, iface: &str, frame: Vec<u8>) -> Result<usize, String> {
    let iface = iface.to_string();
    in_netns(ns, move || -> Result<usize, String> {
        let ifindex = nix::net::if_::if_nametoindex(iface.as_str()).map_err(|e| e.to_string())?;
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                (libc::ETH_P_ALL as u16).to_be() as i32,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        // SAFETY: `fd` is a fresh descriptor this function owns.
        let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; the needed fields are set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        sll.sll_halen = 6;
        // SAFETY: `frame` and `sll` are valid for the sizes passed.
        let n = unsafe {
            libc::sendto(
                std::os::fd::AsRawFd::as_raw_fd(&owned),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(n as usize)
    })
    .map_err(|e| e.to_string())?
}

/// A UDP receiver on `port` in `ns`; the handle returns the datagrams received in `window`.
pub fn udp_sink(
    ns: &str,
    port: u16,
    window: Duration,
) -> Result<std::thread::JoinHandle<usize>, NetError> {
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let s = File::open(&path)
            .ok()
            .and_then(|fd| nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).ok())
            .and_then(|_| UdpSocket::bind(("0.0.0.0", port)).ok());
        let _ = tx.send(s.is_some());
        let Some(s) = s else { return 0 };
        let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
        let end = std::time::Instant::now() + window;
        let mut n = 0;
        let mut b = [0u8; 2048];
        while std::time::Instant::now() < end {
            if s.recv(&mut b).is_ok() {
                n += 1;
            }
        }
        n
    });
    if rx.recv_timeout(Duration::from_secs(2)).unwrap_or(false) {
        Ok(h)
    } else {
        Err(NetError::Cmd {
            cmd: format!("UDP sink on port {port} in {ns}"),
            stderr: "cannot bind".into(),
        })
    }
}

/// From `ns`, an ordinary UDP datagram (the guest's real address) to `dst:port`.
pub fn send_udp(ns: &str, dst: Ipv4Addr, port: u16) -> Result<(), String> {
    in_netns(ns, move || {
        let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        s.send_to(b"virtsec lab: real source", (dst, port))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .map_err(|e| e.to_string())?
}
