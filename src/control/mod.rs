//! The operator control socket: one JSON object per line each way.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"domains"}`, `{"cmd":"alerts","after":N}`,
//! `{"cmd":"vif_ready","domid":D,"devid":N}`, `{"cmd":"quarantine","target":T,"action":A,
//! "reason":R,"who":W}`, `{"cmd":"release","target":T,"reason":R,"who":W}`,
//! `{"cmd":"quarantined"}`. Replies: `{"ok":true,"result":...}` or
//! `{"ok":false,"error":"..."}`. The socket file is created mode 0600 and every peer is checked
//! with `SO_PEERCRED`: only root and the service's own user are served, so tests can run the
//! whole stack unprivileged on a private socket while production stays root-only.
//!
//! The server side is non-blocking and lives on the daemon's mio loop; a malformed or
//! oversized request gets an error reply, never a panic.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde::{Deserialize, Serialize};

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A request from the CLI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    Status,
    Domains,
    /// Alerts with a sequence number above `after` (the reply's `total` is the last one).
    Alerts {
        #[serde(default)]
        after: u64,
    },
    /// Whether the policy of vif `devid` of domain `domid` is in place (the hotplug gate asks
    /// before the backend is marked connected).
    VifReady {
        domid: u32,
        devid: u32,
    },
    /// Quarantine a VM (`target`: UUID, name or domid) with one action.
    Quarantine {
        target: String,
        action: String,
        reason: String,
        /// Who asks (the CLI sends the invoking user; audit records carry it).
        who: String,
    },
    /// Lift a VM's quarantine.
    Release {
        target: String,
        reason: String,
        who: String,
    },
    /// Quarantined VMs, unreadable state files and recent audit records.
    Quarantined,
    /// Reload the rule files (a failed load keeps the old rules).
    ReloadRules,
}

/// Parses one request line from a peer (untrusted bytes): the request or the reply's error.
pub fn parse_request(line: &[u8]) -> Result<ControlRequest, String> {
    serde_json::from_slice::<ControlRequest>(line).map_err(|e| format!("bad request: {e}"))
}

/// Errors on either side of the socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot reach virtsecd at {path}: {source}. Is the service running (systemctl status virtsecd)? Use --control-socket for a non-default socket")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("virtsecd sent an unreadable reply: {0}")]
    BadReply(String),
    #[error("virtsecd refused the request: {0}")]
    Refused(String),
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another virtsecd already serves {0}")]
    InUse(PathBuf),
}

/// Sends one request and returns its `result`.
pub fn call(socket: &Path, req: &ControlRequest) -> Result<serde_json::Value, ControlError> {
    let mut s = StdUnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::BadReply(e.to_string()))?;
    line.push(b'\n');
    // A refused peer may find the socket closed before its request is written: the refusal
    // is still there to read, and it explains more than EPIPE.
    let written = s.write_all(&line);
    let mut reply = String::new();
    let read = BufReader::new(s).read_line(&mut reply);
    if reply.is_empty() {
        written?;
        read?;
    }
    let v: serde_json::Value =
        serde_json::from_str(&reply).map_err(|e| ControlError::BadReply(e.to_string()))?;
    match v.get("ok").and_then(|o| o.as_bool()) {
        Some(true) => Ok(v.get("result").cloned().unwrap_or(serde_json::Value::Null)),
        _ => Err(ControlError::Refused(
            v.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("unknown error")
                .to_owned(),
        )),
    }
}

struct Conn {
    stream: UnixStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    closing: bool,
}

/// The listening side, driven by the daemon's event loop.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    conns: HashMap<Token, Conn>,
    base: usize,
    next: usize,
    allowed_uid: u32,
    /// Peers refused by the credential check.
    pub refused_peers: u64,
}

impl ControlServer {
    /// Binds `path` (mode 0600). Tokens `base..` are used for connections, `listener_token`
    /// for the listener.
    pub fn bind(
        path: &Path,
        registry: &Registry,
        listener_token: Token,
        base: usize,
    ) -> Result<ControlServer, ControlError> {
        let bind_err = |source| ControlError::Bind {
            path: path.to_owned(),
            source,
        };
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if m.file_type().is_socket() {
                if StdUnixStream::connect(path).is_ok() {
                    return Err(ControlError::InUse(path.to_owned()));
                }
                let _ = std::fs::remove_file(path);
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
        }
        let mut listener = UnixListener::bind(path).map_err(bind_err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        registry
            .register(&mut listener, listener_token, Interest::READABLE)
            .map_err(bind_err)?;
        Ok(ControlServer {
            listener,
            path: path.to_owned(),
            conns: HashMap::new(),
            base,
            next: base,
            allowed_uid: nix::unistd::geteuid().as_raw(),
            refused_peers: 0,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `t` belongs to one of this server's connections.
    pub fn owns(&self, t: Token) -> bool {
        t.0 >= self.base
    }

    /// Accepts pending connections.
    pub fn accept(&mut self, registry: &Registry) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let uid = getsockopt(&stream, PeerCredentials).map(|c| c.uid()).ok();
                    if !matches!(uid, Some(u) if u == 0 || u == self.allowed_uid) {
                        self.refused_peers += 1;
                        log::warn!("control socket: refused peer uid {uid:?} (root only)");
                        let _ = stream.write_all(
                            b"{\"ok\":false,\"error\":\"permission denied: root only\"}\n",
                        );
                        continue;
                    }
                    let tok = Token(self.next);
                    self.next += 1;
                    if registry
                        .register(&mut stream, tok, Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        self.conns.insert(
                            tok,
                            Conn {
                                stream,
                                inbuf: Vec::new(),
                                out: Vec::new(),
                                closing: false,
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("control socket: accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// Handles readiness of connection `t`, answering each complete line with `handle`.
    pub fn on_ready(
        &mut self,
        t: Token,
        registry: &Registry,
        handle: &mut dyn FnMut(ControlRequest) -> Result<serde_json::Value, String>,
    ) {
        let Some(c) = self.conns.get_mut(&t) else {
            return;
        };
        let mut buf = [0u8; 4096];
        let mut eof = false;
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    c.inbuf.extend_from_slice(&buf[..n]);
                    if c.inbuf.len() > MAX_REQUEST && !c.inbuf.contains(&b'\n') {
                        c.out
                            .extend_from_slice(b"{\"ok\":false,\"error\":\"request too large\"}\n");
                        c.inbuf.clear();
                        c.closing = true;
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        while let Some(nl) = c.inbuf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = c.inbuf.drain(..=nl).collect();
            let reply = match parse_request(&line) {
                Ok(req) => match handle(req) {
                    Ok(result) => serde_json::json!({"ok": true, "result": result}),
                    Err(e) => serde_json::json!({"ok": false, "error": e}),
                },
                Err(e) => serde_json::json!({"ok": false, "error": e}),
            };
            if let Ok(mut v) = serde_json::to_vec(&reply) {
                v.push(b'\n');
                c.out.extend_from_slice(&v);
            }
        }
        let mut broken = false;
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => {
                    broken = true;
                    break;
                }
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    broken = true;
                    break;
                }
            }
        }
        if broken || ((eof || c.closing) && c.out.is_empty()) {
            if let Some(mut c) = self.conns.remove(&t) {
                let _ = registry.deregister(&mut c.stream);
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
