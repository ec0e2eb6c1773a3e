//! Readiness: telling the init system the service is up.
//!
//! `virtsecd` is ready once its first reconcile pass is done and the policy of every vif
//! present is in place. Then it sends `READY=1` to systemd (`Type=notify`, the datagram
//! socket named in `NOTIFY_SOCKET`, written here directly: the protocol is one datagram and
//! not worth a dependency) and writes one byte to the pipe a `--daemonize` parent waits on
//! (SysV init: the init script returns only when the service is ready, or fails).

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

static READY_PIPE: Mutex<Option<OwnedFd>> = Mutex::new(None);

/// The write end of the `--daemonize` parent's pipe.
pub fn set_ready_pipe(fd: OwnedFd) {
    if let Ok(mut p) = READY_PIPE.lock() {
        *p = Some(fd);
    }
}

/// Sends `state` (e.g. `READY=1\nSTATUS=...`) to systemd if it asked for notifications.
pub fn sd_notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

/// The service is ready: tell systemd and a waiting `--daemonize` parent (once).
pub fn ready(status: &str) {
    match sd_notify(&format!("READY=1\nSTATUS={status}")) {
        Ok(_) => {}
        Err(e) => log::warn!("cannot notify systemd of readiness: {e}"),
    }
    if let Ok(mut p) = READY_PIPE.lock() {
        if let Some(fd) = p.take() {
            let mut f = std::fs::File::from(fd);
            let _ = f.write_all(b"1");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifies_a_listening_socket() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify");
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // Safe here: this test is the only user of NOTIFY_SOCKET in this process's tests.
        std::env::set_var("NOTIFY_SOCKET", &path);
        assert!(sd_notify("READY=1\nSTATUS=test").unwrap());
        std::env::remove_var("NOTIFY_SOCKET");
        let mut b = [0u8; 64];
        let n = listener.recv(&mut b).unwrap();
        assert_eq!(&b[..n], b"READY=1\nSTATUS=test");
        assert!(!sd_notify("READY=1").unwrap());
    }
}
