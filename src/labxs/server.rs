//! The lab xenstored: the XenStore protocol over Unix sockets, single-threaded on mio.
//!
//! The main socket acts as dom0 (privileged), like `/run/xenstored/socket`. Each
//! `--domain-socket DOMID=PATH` acts as that unprivileged domain, like the shared ring a guest
//! reaches through `/dev/xen/xenbus`: relative paths resolve under its
//! `/local/domain/<domid>`, permissions and quotas apply to it.
//!
//! Transactions take a copy of the tree and log the generation of every node they touch; at
//! commit the log is checked against the live tree (any change: `EAGAIN`) and the logged
//! operations are replayed, firing watches then. This is C xenstored's conflict rule with a
//! simpler implementation: copying is fine at lab sizes (tens of thousands of nodes).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token};

use super::store::{AccessLog, Caller, Changed, Errno, Limits, Tree};
use crate::xenstore::path::{self, canonicalize, is_subpath};
use crate::xenstore::perms::{access_for, Perm};
use crate::xenstore::wire::{join_list, Decoder, Message, MsgType, Request, WatchEvent};

/// Errors starting the lab server.
#[derive(Debug, thiserror::Error)]
pub enum LabServerError {
    #[error("another XenStore server already answers on {0}; stop it first (virtsec lab down) or choose another --socket")]
    InUse(PathBuf),
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotSocket { path: PathBuf },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("event loop failed: {0}")]
    Poll(#[from] io::Error),
}

/// What to listen on.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The privileged (dom0) socket.
    pub socket: PathBuf,
    /// Unprivileged per-domain sockets.
    pub domain_sockets: Vec<(u32, PathBuf)>,
    pub limits: Limits,
}

const MAX_OUT_BYTES: usize = 1 << 20;
const SPECIAL_WATCHES: [&str; 2] = ["@introduceDomain", "@releaseDomain"];

#[derive(Debug)]
struct Watch {
    /// Absolute path or special name.
    abs: String,
    token: String,
    /// Set for relative watches: the prefix to strip from event paths.
    strip: Option<String>,
}

#[derive(Debug)]
struct Conn {
    stream: UnixStream,
    caller: Caller,
    dec: Decoder,
    out: Vec<u8>,
    watches: Vec<Watch>,
    txs: HashSet<u32>,
    dropped_events: u64,
}

#[derive(Debug)]
enum Op {
    Write(String, Vec<u8>),
    Mkdir(String),
    Rm(String),
    SetPerms(String, Vec<Perm>),
}

#[derive(Debug)]
struct Tx {
    owner: Token,
    tree: Tree,
    log: AccessLog,
    ops: Vec<Op>,
}

/// The server state.
pub struct Server {
    poll: Poll,
    listeners: Vec<(UnixListener, Caller, PathBuf)>,
    conns: HashMap<Token, Conn>,
    tree: Tree,
    limits: Limits,
    introduced: BTreeSet<u32>,
    txs: HashMap<u32, Tx>,
    next_tx: u32,
    next_token: usize,
}

const LISTENER_BASE: usize = 0;
const CONN_BASE: usize = 1024;

fn prepare_socket_path(path: &Path) -> Result<(), LabServerError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(LabServerError::InUse(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
            Ok(())
        }
        Ok(_) => Err(LabServerError::NotSocket {
            path: path.to_owned(),
        }),
        Err(_) => Ok(()),
    }
}

impl Server {
    /// Binds every socket. Fails if one is already served.
    pub fn bind(cfg: &ServerConfig) -> Result<Server, LabServerError> {
        let poll = Poll::new()?;
        let mut listeners = Vec::new();
        let mut all = vec![(Caller::DOM0, cfg.socket.clone())];
        all.extend(
            cfg.domain_sockets
                .iter()
                .map(|(d, p)| (Caller::domain(*d), p.clone())),
        );
        for (i, (caller, p)) in all.into_iter().enumerate() {
            prepare_socket_path(&p)?;
            if let Some(dir) = p.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let mut l = UnixListener::bind(&p).map_err(|source| LabServerError::Bind {
                path: p.clone(),
                source,
            })?;
            poll.registry()
                .register(&mut l, Token(LISTENER_BASE + i), Interest::READABLE)?;
            listeners.push((l, caller, p));
        }
        Ok(Server {
            poll,
            listeners,
            conns: HashMap::new(),
            tree: Tree::new(),
            limits: cfg.limits.clone(),
            introduced: BTreeSet::from([0]),
            txs: HashMap::new(),
            next_tx: 1,
            next_token: CONN_BASE,
        })
    }

    /// Serves until `stop` is set. Removes its socket files on return.
    pub fn run(mut self, stop: &AtomicBool) -> Result<(), LabServerError> {
        let mut events = Events::with_capacity(256);
        while !stop.load(Ordering::Relaxed) {
            match self
                .poll
                .poll(&mut events, Some(Duration::from_millis(100)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
            for ev in events.iter() {
                let t = ev.token();
                if t.0 < CONN_BASE {
                    self.accept(t.0 - LISTENER_BASE);
                } else {
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        self.read_conn(t);
                    }
                    if ev.is_writable() {
                        self.flush_conn(t);
                    }
                }
            }
            self.flush_all();
        }
        for (_, _, p) in &self.listeners {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }

    fn accept(&mut self, idx: usize) {
        loop {
            let Some((l, caller, _)) = self.listeners.get(idx) else {
                return;
            };
            let caller = *caller;
            match l.accept() {
                Ok((mut stream, _)) => {
                    let tok = Token(self.next_token);
                    self.next_token += 1;
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, tok, Interest::READABLE | Interest::WRITABLE)
                        .is_err()
                    {
                        continue;
                    }
                    self.conns.insert(
                        tok,
                        Conn {
                            stream,
                            caller,
                            dec: Decoder::new(),
                            out: Vec::new(),
                            watches: Vec::new(),
                            txs: HashSet::new(),
                            dropped_events: 0,
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("lab xenstored: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn close(&mut self, tok: Token) {
        if let Some(mut c) = self.conns.remove(&tok) {
            let _ = self.poll.registry().deregister(&mut c.stream);
            for tx in c.txs {
                self.txs.remove(&tx);
            }
        }
    }

    fn read_conn(&mut self, tok: Token) {
        let mut buf = [0u8; 16 * 1024];
        let mut msgs = Vec::new();
        let mut closed = false;
        {
            let Some(c) = self.conns.get_mut(&tok) else {
                return;
            };
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => c.dec.feed(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
            loop {
                match c.dec.next_message() {
                    Ok(Some(m)) => msgs.push(m),
                    Ok(None) => break,
                    Err(e) => {
                        // Both real daemons drop a client that breaks framing.
                        log::warn!("lab xenstored: dropping client: {e}");
                        closed = true;
                        break;
                    }
                }
            }
        }
        for m in msgs {
            self.handle(tok, m);
        }
        if closed {
            self.flush_conn(tok);
            self.close(tok);
        }
    }

    fn flush_conn(&mut self, tok: Token) {
        let mut broken = false;
        if let Some(c) = self.conns.get_mut(&tok) {
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
        }
        if broken {
            self.close(tok);
        }
    }

    fn flush_all(&mut self) {
        let toks: Vec<Token> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.out.is_empty())
            .map(|(t, _)| *t)
            .collect();
        for t in toks {
            self.flush_conn(t);
        }
    }

    fn send(&mut self, tok: Token, m: Message) {
        if let Some(c) = self.conns.get_mut(&tok) {
            // Encoding fails only for oversized payloads, which replies never are.
            let _ = m.encode(&mut c.out);
        }
    }

    fn handle(&mut self, tok: Token, m: Message) {
        let Some(caller) = self.conns.get(&tok).map(|c| c.caller) else {
            return;
        };
        let mut changes = Vec::new();
        let mut specials = Vec::new();
        let mut initial: Option<WatchEvent> = None;
        let result = match Request::parse(m.ty, &m.payload) {
            Ok(Some(req)) => self.execute(
                tok,
                caller,
                m.tx_id,
                req,
                &mut changes,
                &mut specials,
                &mut initial,
            ),
            Ok(None) => Err("EINVAL"),
            Err(_) => Err("EINVAL"),
        };
        let reply = match result {
            Ok(payload) => Message::new(m.ty, m.req_id, m.tx_id, payload),
            Err(errno) => Message::new(MsgType::Error, m.req_id, m.tx_id, join_list([errno])),
        };
        self.send(tok, reply);
        if let Some(ev) = initial {
            self.send(tok, Message::new(MsgType::WatchEvent, 0, 0, ev.emit()));
        }
        self.fire(&changes);
        for s in specials {
            self.fire_special(s);
        }
    }

    fn resolve(caller: Caller, p: &str) -> Result<String, Errno> {
        if path::is_special(p) {
            return Err("EINVAL");
        }
        canonicalize(p, caller.domid).ok_or("EINVAL")
    }

    #[allow(clippy::too_many_arguments)]
    fn execute(
        &mut self,
        tok: Token,
        caller: Caller,
        tx_id: u32,
        req: Request,
        changes: &mut Vec<Changed>,
        specials: &mut Vec<&'static str>,
        initial: &mut Option<WatchEvent>,
    ) -> Result<Vec<u8>, Errno> {
        let ok = || Ok(join_list(["OK"]));
        // Transaction-scoped view.
        if tx_id != 0 {
            match self.txs.get(&tx_id) {
                Some(tx) if tx.owner == tok => {}
                _ => return Err("ENOENT"),
            }
        }
        let limits = self.limits.clone();
        match req {
            Request::Read(p) => {
                let p = Self::resolve(caller, &p)?;
                self.with_view(tx_id, |t, log| t.read(caller, &p, log))
            }
            Request::Directory(p) => {
                let p = Self::resolve(caller, &p)?;
                let (_, names) = self.with_view(tx_id, |t, log| t.directory(caller, &p, log))?;
                let payload = join_list(&names);
                if payload.len() > crate::xenstore::wire::PAYLOAD_MAX {
                    return Err("E2BIG");
                }
                Ok(payload)
            }
            Request::DirectoryPart(p, off) => {
                let p = Self::resolve(caller, &p)?;
                let (gen, names) = self.with_view(tx_id, |t, log| t.directory(caller, &p, log))?;
                Ok(directory_part(gen, &names, off as usize))
            }
            Request::GetPerms(p) => {
                let p = Self::resolve(caller, &p)?;
                let perms = self.with_view(tx_id, |t, log| t.get_perms(caller, &p, log))?;
                Ok(join_list(perms.iter().map(|p| p.to_string())))
            }
            Request::Write(p, v) => {
                let p = Self::resolve(caller, &p)?;
                self.mutate(tx_id, caller, Op::Write(p, v), &limits, changes)?;
                ok()
            }
            Request::Mkdir(p) => {
                let p = Self::resolve(caller, &p)?;
                self.mutate(tx_id, caller, Op::Mkdir(p), &limits, changes)?;
                ok()
            }
            Request::Rm(p) => {
                let p = Self::resolve(caller, &p)?;
                self.mutate(tx_id, caller, Op::Rm(p), &limits, changes)?;
                ok()
            }
            Request::SetPerms(p, perms) => {
                let p = Self::resolve(caller, &p)?;
                let perms = perms
                    .iter()
                    .map(|s| s.parse::<Perm>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| "EINVAL")?;
                self.mutate(tx_id, caller, Op::SetPerms(p, perms), &limits, changes)?;
                ok()
            }
            Request::Watch(p, token) => {
                let (abs, strip) = if path::is_special(&p) {
                    if !SPECIAL_WATCHES.contains(&p.as_str()) {
                        return Err("EINVAL");
                    }
                    (p.clone(), None)
                } else {
                    let abs = canonicalize(&p, caller.domid).ok_or("EINVAL")?;
                    let strip =
                        (!p.starts_with('/')).then(|| format!("/local/domain/{}/", caller.domid));
                    (abs, strip)
                };
                let c = self.conns.get_mut(&tok).ok_or("EINVAL")?;
                if c.watches.iter().any(|w| w.abs == abs && w.token == token) {
                    return Err("EEXIST");
                }
                if !caller.privileged && c.watches.len() >= limits.watches_per_conn {
                    return Err("EQUOTA");
                }
                c.watches.push(Watch {
                    abs,
                    token: token.clone(),
                    strip,
                });
                *initial = Some(WatchEvent { path: p, token });
                ok()
            }
            Request::Unwatch(p, token) => {
                let abs = if path::is_special(&p) {
                    p
                } else {
                    canonicalize(&p, caller.domid).ok_or("EINVAL")?
                };
                let c = self.conns.get_mut(&tok).ok_or("EINVAL")?;
                let before = c.watches.len();
                c.watches.retain(|w| !(w.abs == abs && w.token == token));
                if c.watches.len() == before {
                    return Err("ENOENT");
                }
                ok()
            }
            Request::ResetWatches => {
                if let Some(c) = self.conns.get_mut(&tok) {
                    c.watches.clear();
                }
                ok()
            }
            Request::TransactionStart => {
                if tx_id != 0 {
                    return Err("EBUSY");
                }
                let c = self.conns.get_mut(&tok).ok_or("EINVAL")?;
                if !caller.privileged && c.txs.len() >= limits.transactions_per_conn {
                    return Err("EQUOTA");
                }
                let id = self.next_tx;
                self.next_tx = self.next_tx.wrapping_add(1).max(1);
                c.txs.insert(id);
                self.txs.insert(
                    id,
                    Tx {
                        owner: tok,
                        tree: self.tree.clone(),
                        log: AccessLog::new(),
                        ops: Vec::new(),
                    },
                );
                Ok(join_list([id.to_string()]))
            }
            Request::TransactionEnd(commit) => {
                if tx_id == 0 {
                    return Err("ENOENT");
                }
                let tx = self.txs.remove(&tx_id).ok_or("ENOENT")?;
                if let Some(c) = self.conns.get_mut(&tok) {
                    c.txs.remove(&tx_id);
                }
                if !commit {
                    return ok();
                }
                if !self.tree.unchanged_since(&tx.log) {
                    return Err("EAGAIN");
                }
                for op in tx.ops {
                    // Validated above: replay reproduces what the transaction saw.
                    if let Ok(ch) = apply(&mut self.tree, caller, op, &limits, None) {
                        changes.extend(ch);
                    }
                }
                ok()
            }
            Request::GetDomainPath(d) => Ok(join_list([format!("/local/domain/{d}")])),
            Request::IsDomainIntroduced(d) => Ok(join_list([if self.introduced.contains(&d) {
                "T"
            } else {
                "F"
            }])),
            Request::Introduce(d, _, _) => {
                if !caller.privileged {
                    return Err("EACCES");
                }
                if self.introduced.insert(d) {
                    specials.push("@introduceDomain");
                }
                ok()
            }
            Request::Release(d) => {
                if !caller.privileged {
                    return Err("EACCES");
                }
                if d == 0 || !self.introduced.remove(&d) {
                    return Err("ENOENT");
                }
                specials.push("@releaseDomain");
                ok()
            }
        }
    }

    fn with_view<T>(
        &mut self,
        tx_id: u32,
        f: impl FnOnce(&Tree, Option<&mut AccessLog>) -> Result<T, Errno>,
    ) -> Result<T, Errno> {
        if tx_id == 0 {
            f(&self.tree, None)
        } else {
            let tx = self.txs.get_mut(&tx_id).ok_or("ENOENT")?;
            f(&tx.tree, Some(&mut tx.log))
        }
    }

    fn mutate(
        &mut self,
        tx_id: u32,
        caller: Caller,
        op: Op,
        limits: &Limits,
        changes: &mut Vec<Changed>,
    ) -> Result<(), Errno> {
        if tx_id == 0 {
            changes.extend(apply(&mut self.tree, caller, op, limits, None)?);
            return Ok(());
        }
        let tx = self.txs.get_mut(&tx_id).ok_or("ENOENT")?;
        let logged = match &op {
            Op::Write(p, v) => Op::Write(p.clone(), v.clone()),
            Op::Mkdir(p) => Op::Mkdir(p.clone()),
            Op::Rm(p) => Op::Rm(p.clone()),
            Op::SetPerms(p, x) => Op::SetPerms(p.clone(), x.clone()),
        };
        apply(&mut tx.tree, caller, op, limits, Some(&mut tx.log))?;
        tx.ops.push(logged);
        Ok(())
    }

    fn queue_event(c: &mut Conn, w_idx: usize, path: &str) {
        let w = &c.watches[w_idx];
        let shown = match &w.strip {
            Some(prefix) => path.strip_prefix(prefix.as_str()).unwrap_or(path),
            None => path,
        };
        if c.out.len() > MAX_OUT_BYTES {
            c.dropped_events += 1;
            return;
        }
        let ev = WatchEvent {
            path: shown.to_owned(),
            token: w.token.clone(),
        };
        let _ = Message::new(MsgType::WatchEvent, 0, 0, ev.emit()).encode(&mut c.out);
    }

    fn fire(&mut self, changes: &[Changed]) {
        for ch in changes {
            for c in self.conns.values_mut() {
                if !access_for(&ch.perms, c.caller.domid, c.caller.privileged).can_read() {
                    continue;
                }
                for i in 0..c.watches.len() {
                    let w = &c.watches[i];
                    if path::is_special(&w.abs) {
                        continue;
                    }
                    if is_subpath(&w.abs, &ch.path) {
                        Self::queue_event(c, i, &ch.path.clone());
                    } else if ch.subtree_removed && is_subpath(&ch.path, &w.abs) {
                        let p = w.abs.clone();
                        Self::queue_event(c, i, &p);
                    }
                }
            }
        }
    }

    fn fire_special(&mut self, name: &str) {
        for c in self.conns.values_mut() {
            if !c.caller.privileged {
                continue;
            }
            for i in 0..c.watches.len() {
                if c.watches[i].abs == name {
                    Self::queue_event(c, i, name);
                }
            }
        }
    }
}

fn apply(
    tree: &mut Tree,
    caller: Caller,
    op: Op,
    limits: &Limits,
    log: Option<&mut AccessLog>,
) -> Result<Vec<Changed>, Errno> {
    match op {
        Op::Write(p, v) => tree.write(caller, &p, &v, limits, log),
        Op::Mkdir(p) => tree.mkdir(caller, &p, limits, log),
        Op::Rm(p) => tree.rm(caller, &p, log),
        Op::SetPerms(p, perms) => tree.set_perms(caller, &p, perms, log),
    }
}

/// Builds a `DIRECTORY_PART` reply as xenstored does: `generation\0` then as many whole
/// child names from byte offset `off` as fit, and an extra NUL when the list is complete.
fn directory_part(gen: u64, names: &[String], off: usize) -> Vec<u8> {
    let all = join_list(names);
    let mut out = format!("{gen:x}").into_bytes();
    out.push(0);
    if off >= all.len() {
        out.push(0);
        return out;
    }
    let max = crate::xenstore::wire::PAYLOAD_MAX - out.len() - 1;
    let mut len = 0;
    let rest = &all[off..];
    while off + len < all.len() {
        let next = rest[len..]
            .iter()
            .position(|&c| c == 0)
            .map(|i| i + 1)
            .unwrap_or(rest.len() - len);
        if len + next > max {
            break;
        }
        len += next;
    }
    out.extend_from_slice(&rest[..len]);
    if off + len == all.len() {
        out.push(0);
    }
    out
}

/// A lab server running on a thread of this process (used by `virtsec lab` and tests).
pub struct LabServerHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), LabServerError>>>,
}

impl LabServerHandle {
    /// Binds synchronously (so errors surface here), then serves on a thread.
    pub fn spawn(cfg: ServerConfig) -> Result<LabServerHandle, LabServerError> {
        let server = Server::bind(&cfg)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("lab-xenstored".into())
            .spawn(move || server.run(&flag))
            .map_err(LabServerError::Poll)?;
        Ok(LabServerHandle {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the server and waits for it.
    pub fn stop(mut self) -> Result<(), LabServerError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), LabServerError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t.join().unwrap_or(Ok(())),
            None => Ok(()),
        }
    }
}

impl Drop for LabServerHandle {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_part_chunks_reassemble() {
        let names: Vec<String> = (0..1500).map(|i| format!("child{i}")).collect();
        let mut acc = crate::xenstore::client::DirPartAcc::default();
        let mut off = 0;
        let mut rounds = 0;
        loop {
            let reply = directory_part(42, &names, off);
            assert!(reply.len() <= crate::xenstore::wire::PAYLOAD_MAX);
            rounds += 1;
            match acc.absorb(&reply).unwrap() {
                crate::xenstore::client::DirPartStep::Next(o) => off = o as usize,
                crate::xenstore::client::DirPartStep::Done(got) => {
                    assert_eq!(got, names);
                    break;
                }
            }
        }
        assert!(rounds > 2);
    }
}
