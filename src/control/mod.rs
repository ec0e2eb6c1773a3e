//! The operator control socket: one JSON object per line each way.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"domains"}` (with `"follow":true` the connection
//! stays open and gets the inventory again, one reply line each, whenever it changes),
//! `{"cmd":"alerts","after":N}`,
//! `{"cmd":"vif_ready","domid":D,"devid":N}`, `{"cmd":"quarantine","target":T,"action":A,
//! "reason":R,"who":W}`, `{"cmd":"release","target":T,"reason":R,"who":W}`,
//! `{"cmd":"quarantined"}`. Replies: `{"ok":true,"result":...}` or
//! `{"ok":false,"error":"..."}`. The socket file is created mode 0600 and every peer is checked
//! with `SO_PEERCRED`: only root and the service's own user are served, so tests can run the
//! whole stack unprivileged on a private socket while production stays root-only.
//!
//! The server side is non-blocking and lives on the daemon's mio loop; a malformed or
//! oversized request gets an error reply, never a panic.
//!
//! Following the inventory is pushed, not polled: a poll every 20 ms (what the real-Xen
//! harness did to time listings) cost a process's start and a reply each time, ~20% of a
//! dom0 vCPU in the client and as much in the service under emulation, and still showed a
//! change up to one interval late. A follower whose unread replies pass
//! [`MAX_FOLLOWER_BACKLOG`] is disconnected rather than buffered without bound.

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

/// Unsent bytes a follower may have queued before it is disconnected (it stopped reading).
pub const MAX_FOLLOWER_BACKLOG: usize = 4 << 20;

/// A request from the CLI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    Status,
    /// The inventory; with `follow`, again on every change over the same connection.
    Domains {
        #[serde(default)]
        follow: bool,
    },
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
    #[error("virtsecd closed the connection (stopped or restarted?)")]
    Closed,
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
    let (mut r, written) = send(socket, req, Some(Duration::from_secs(10)))?;
    let mut reply = String::new();
    let read = r.read_line(&mut reply);
    if reply.is_empty() {
        written?;
        read?;
    }
    parse_reply(&reply)
}

/// Sends `req` (`Domains { follow: true }`) and hands each reply's `result` to `each` until
/// the service closes the connection ([`ControlError::Closed`]) or `each` returns false.
pub fn follow(
    socket: &Path,
    req: &ControlRequest,
    each: &mut dyn FnMut(serde_json::Value) -> bool,
) -> Result<(), ControlError> {
    let (mut r, written) = send(socket, req, None)?;
    loop {
        let mut reply = String::new();
        let read = r.read_line(&mut reply);
        if reply.is_empty() {
            written?;
            read?;
            return Err(ControlError::Closed);
        }
        if !each(parse_reply(&reply)?) {
            return Ok(());
        }
    }
}

/// Connects and writes one request line: a reader of the replies and the write's outcome.
fn send(
    socket: &Path,
    req: &ControlRequest,
    timeout: Option<Duration>,
) -> Result<(BufReader<StdUnixStream>, std::io::Result<()>), ControlError> {
    let mut s = StdUnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    s.set_read_timeout(timeout)?;
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::BadReply(e.to_string()))?;
    line.push(b'\n');
    // A refused peer may find the socket closed before its request is written: the refusal
    // is still there to read, and it explains more than EPIPE.
    let written = s.write_all(&line);
    Ok((BufReader::new(s), written))
}

/// One reply line: its `result`, or the service's refusal.
fn parse_reply(reply: &str) -> Result<serde_json::Value, ControlError> {
    let v: serde_json::Value =
        serde_json::from_str(reply).map_err(|e| ControlError::BadReply(e.to_string()))?;
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
    /// For a connection following the inventory: the reply line it was sent last.
    follows: Option<Vec<u8>>,
}

impl Conn {
    /// Writes what the socket takes of `out`; false when the peer is gone.
    fn flush(&mut self) -> bool {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return false,
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }
}

/// A reply line: `{"ok":true,"result":...}` or `{"ok":false,"error":...}`, newline-terminated.
fn reply_line(r: Result<serde_json::Value, String>) -> Vec<u8> {
    let reply = match r {
        Ok(result) => serde_json::json!({"ok": true, "result": result}),
        Err(e) => serde_json::json!({"ok": false, "error": e}),
    };
    let mut v = serde_json::to_vec(&reply).unwrap_or_default();
    v.push(b'\n');
    v
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
                                follows: None,
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
            let (reply, follow) = match parse_request(&line) {
                Ok(req) => {
                    let follow = matches!(req, ControlRequest::Domains { follow: true });
                    (reply_line(handle(req)), follow)
                }
                Err(e) => (reply_line(Err(e)), false),
            };
            if follow {
                c.follows = Some(reply.clone());
            }
            c.out.extend_from_slice(&reply);
        }
        let broken = !c.flush();
        if broken || ((eof || c.closing) && c.out.is_empty()) {
            if let Some(mut c) = self.conns.remove(&t) {
                let _ = registry.deregister(&mut c.stream);
            }
        }
    }
}

impl ControlServer {
    /// Whether a connection follows the inventory (the caller then has it serialized for
    /// [`ControlServer::push_domains`] when it changes).
    pub fn has_followers(&self) -> bool {
        self.conns.values().any(|c| c.follows.is_some())
    }

    /// Sends `domains` (the inventory's reply value) to each follower that was last sent
    /// something else. A follower that stopped reading is disconnected once its backlog passes
    /// [`MAX_FOLLOWER_BACKLOG`].
    pub fn push_domains(&mut self, registry: &Registry, domains: serde_json::Value) {
        let line = reply_line(Ok(domains));
        let mut gone = Vec::new();
        for (t, c) in self.conns.iter_mut() {
            let Some(last) = c.follows.as_mut() else {
                continue;
            };
            if *last == line {
                continue;
            }
            last.clone_from(&line);
            c.out.extend_from_slice(&line);
            if !c.flush() {
                gone.push(*t);
            } else if c.out.len() > MAX_FOLLOWER_BACKLOG {
                log::warn!(
                    "control socket: a client following the inventory stopped reading ({} bytes unsent); disconnected",
                    c.out.len()
                );
                gone.push(*t);
            }
        }
        for t in gone {
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

#[cfg(test)]
mod tests {
    use super::*;
    use mio::Poll;

    /// A server on a private socket, with one connected client that sent `request`.
    fn served(
        dir: &Path,
        request: &str,
        answer: serde_json::Value,
    ) -> (Poll, ControlServer, BufReader<StdUnixStream>) {
        let poll = Poll::new().unwrap();
        let mut server =
            ControlServer::bind(&dir.join("c.sock"), poll.registry(), Token(1), 16).unwrap();
        let mut client = StdUnixStream::connect(dir.join("c.sock")).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        server.accept(poll.registry());
        client.write_all(request.as_bytes()).unwrap();
        server.on_ready(Token(16), poll.registry(), &mut |_| Ok(answer.clone()));
        (poll, server, BufReader::new(client))
    }

    fn next(r: &mut BufReader<StdUnixStream>) -> serde_json::Value {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        parse_reply(&l).unwrap()
    }

    #[test]
    fn a_follower_gets_each_change_once_and_a_plain_request_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let (poll, mut server, mut follower) = served(
            dir.path(),
            "{\"cmd\":\"domains\",\"follow\":true}\n",
            serde_json::json!([1]),
        );
        assert_eq!(next(&mut follower), serde_json::json!([1]));
        assert!(server.has_followers());
        // The same inventory again is not sent; a changed one is, once.
        server.push_domains(poll.registry(), serde_json::json!([1]));
        server.push_domains(poll.registry(), serde_json::json!([1, 2]));
        server.push_domains(poll.registry(), serde_json::json!([1, 2]));
        assert_eq!(next(&mut follower), serde_json::json!([1, 2]));
        follower
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut l = String::new();
        assert!(
            follower.read_line(&mut l).is_err(),
            "an unchanged inventory was sent again: {l}"
        );

        let plain = tempfile::tempdir().unwrap();
        let (poll, mut server, mut client) = served(
            plain.path(),
            "{\"cmd\":\"domains\"}\n",
            serde_json::json!([]),
        );
        assert_eq!(next(&mut client), serde_json::json!([]));
        assert!(!server.has_followers());
        server.push_domains(poll.registry(), serde_json::json!([3]));
        client
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(
            client.read_line(&mut l).is_err(),
            "pushed to a non-follower: {l}"
        );
    }

    #[test]
    fn a_follower_that_stops_reading_is_disconnected_not_buffered_forever() {
        let dir = tempfile::tempdir().unwrap();
        let (poll, mut server, follower) = served(
            dir.path(),
            "{\"cmd\":\"domains\",\"follow\":true}\n",
            serde_json::json!(0),
        );
        let filler = "x".repeat(64 * 1024);
        let mut pushed = 0;
        while server.has_followers() {
            pushed += 1;
            assert!(
                pushed * filler.len() < 3 * MAX_FOLLOWER_BACKLOG,
                "still connected after {pushed} unread pushes"
            );
            server.push_domains(poll.registry(), serde_json::json!([pushed, filler]));
        }
        assert!(pushed * filler.len() > MAX_FOLLOWER_BACKLOG);
        drop(follower);
    }
}
