//! Blocking XenStore client for the CLI, the lab toolstack and tests.
//!
//! One request is outstanding at a time. Watch events that arrive between a request and its
//! reply are queued apart ([`Client::next_event`]), never mistaken for the reply: replies are
//! matched by `req_id`. The service itself uses the non-blocking [`super::engine::Engine`].

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::error::XsError;
use super::perms::Perm;
use super::transport::Stream;
use super::wire::{split_list, strip_nul, Decoder, Message, MsgType, Request, WatchEvent};

/// How often a conflicting transaction is retried before giving up.
pub const TRANSACTION_RETRIES: u32 = 16;

/// Transaction id 0: outside any transaction.
pub const NO_TX: u32 = 0;

/// Accumulates a `DIRECTORY_PART` listing (Xen 4.9+), used when a directory's child list does
/// not fit one payload and `DIRECTORY` answers `E2BIG`.
///
/// Each reply is `generation\0child\0child\0...`; the final chunk ends with an extra NUL. If
/// the generation changes between chunks the directory changed: restart from offset 0.
#[derive(Debug, Default)]
pub struct DirPartAcc {
    gen: Option<Vec<u8>>,
    buf: Vec<u8>,
    restarts: u32,
}

/// What to do after absorbing one `DIRECTORY_PART` reply.
#[derive(Debug, PartialEq, Eq)]
pub enum DirPartStep {
    /// Ask for the next chunk at this offset.
    Next(u32),
    /// The listing is complete.
    Done(Vec<String>),
}

impl DirPartAcc {
    /// Absorbs one reply payload.
    pub fn absorb(&mut self, payload: &[u8]) -> Result<DirPartStep, String> {
        let nul = payload
            .iter()
            .position(|&c| c == 0)
            .ok_or("DIRECTORY_PART reply without generation")?;
        let (gen, rest) = (&payload[..nul], &payload[nul + 1..]);
        match &self.gen {
            Some(g) if g.as_slice() != gen => {
                self.restarts += 1;
                if self.restarts > TRANSACTION_RETRIES {
                    return Err("directory kept changing during DIRECTORY_PART".into());
                }
                self.gen = None;
                self.buf.clear();
                return Ok(DirPartStep::Next(0));
            }
            _ => self.gen = Some(gen.to_vec()),
        }
        self.buf.extend_from_slice(rest);
        let complete = rest.is_empty() || rest.ends_with(&[0, 0]) || rest == [0];
        if complete {
            // Drop the terminating empty string.
            let body = self.buf.strip_suffix(&[0]).unwrap_or(&self.buf);
            let names = split_list(body)
                .into_iter()
                .filter(|n| !n.is_empty())
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect();
            Ok(DirPartStep::Done(names))
        } else {
            let off = u32::try_from(self.buf.len()).map_err(|_| "directory too large")?;
            Ok(DirPartStep::Next(off))
        }
    }
}

/// Parses a `DIRECTORY` reply into child names.
pub fn parse_directory(payload: &[u8]) -> Vec<String> {
    split_list(payload)
        .into_iter()
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

/// Parses a `GET_PERMS` reply.
pub fn parse_perms(payload: &[u8]) -> Result<Vec<Perm>, String> {
    split_list(payload)
        .into_iter()
        .map(|p| {
            std::str::from_utf8(p)
                .map_err(|_| "permission not UTF-8".to_string())?
                .parse::<Perm>()
                .map_err(|e| e.to_string())
        })
        .collect()
}

/// A blocking connection to xenstored.
#[derive(Debug)]
pub struct Client {
    stream: Stream,
    path: PathBuf,
    dec: Decoder,
    next_req: u32,
    events: VecDeque<WatchEvent>,
    timeout: Duration,
}

impl Client {
    /// Connects to the socket or device at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Client, XsError> {
        let path = path.as_ref();
        Ok(Client {
            stream: Stream::open(path, false)?,
            path: path.to_owned(),
            dec: Decoder::with_limit(super::wire::CLIENT_REPLY_MAX),
            next_req: 1,
            events: VecDeque::new(),
            timeout: Duration::from_secs(10),
        })
    }

    /// Sets how long a request waits for its reply.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read_message(&mut self, deadline: Instant, op: &'static str) -> Result<Message, XsError> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(m) = self.dec.next_message()? {
                return Ok(m);
            }
            if !self.stream.wait_readable(deadline)? {
                return Err(XsError::Timeout {
                    op,
                    ms: self.timeout.as_millis() as u64,
                });
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return Err(std::io::Error::from(ErrorKind::UnexpectedEof).into()),
                Ok(n) => self.dec.feed(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends `req` in transaction `tx` and returns the reply payload.
    pub fn call(&mut self, tx: u32, req: &Request) -> Result<Vec<u8>, XsError> {
        let op = op_name(req.msg_type());
        let req_id = self.next_req;
        self.next_req = self.next_req.wrapping_add(1).max(1);
        let mut out = Vec::new();
        Message::new(req.msg_type(), req_id, tx, req.emit()).encode(&mut out)?;
        self.stream.write_all(&out)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let m = self.read_message(deadline, op)?;
            if m.ty == MsgType::WatchEvent {
                if let Some(ev) = WatchEvent::parse(&m.payload) {
                    self.events.push_back(ev);
                }
                continue;
            }
            if m.req_id != req_id {
                // A reply to an abandoned request (after a timeout): skip it.
                continue;
            }
            if let Some(errno) = m.error_name() {
                return Err(XsError::Refused {
                    op,
                    path: request_path(req),
                    errno: errno.to_owned(),
                });
            }
            if m.ty != req.msg_type() {
                return Err(XsError::BadReply {
                    op,
                    why: format!("reply type {:?}", m.ty),
                });
            }
            return Ok(m.payload);
        }
    }

    pub fn read(&mut self, path: &str) -> Result<Vec<u8>, XsError> {
        self.read_tx(NO_TX, path)
    }

    /// Reads a value as text (lossy UTF-8).
    pub fn read_string(&mut self, path: &str) -> Result<String, XsError> {
        Ok(String::from_utf8_lossy(&self.read(path)?).into_owned())
    }

    /// Reads a value, mapping `ENOENT` to `None`.
    pub fn read_opt(&mut self, path: &str) -> Result<Option<String>, XsError> {
        match self.read_string(path) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_errno("ENOENT") => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn write(&mut self, path: &str, value: impl AsRef<[u8]>) -> Result<(), XsError> {
        self.write_tx(NO_TX, path, value)
    }

    pub fn mkdir(&mut self, path: &str) -> Result<(), XsError> {
        self.call(NO_TX, &Request::Mkdir(path.into())).map(drop)
    }

    pub fn rm(&mut self, path: &str) -> Result<(), XsError> {
        self.rm_tx(NO_TX, path)
    }

    pub fn directory(&mut self, path: &str) -> Result<Vec<String>, XsError> {
        self.directory_tx(NO_TX, path)
    }

    pub fn get_perms(&mut self, path: &str) -> Result<Vec<Perm>, XsError> {
        let p = self.call(NO_TX, &Request::GetPerms(path.into()))?;
        parse_perms(&p).map_err(|why| XsError::BadReply {
            op: "GET_PERMS",
            why,
        })
    }

    pub fn set_perms(&mut self, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        self.set_perms_tx(NO_TX, path, perms)
    }

    pub fn watch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        self.call(NO_TX, &Request::Watch(path.into(), token.into()))
            .map(drop)
    }

    pub fn unwatch(&mut self, path: &str, token: &str) -> Result<(), XsError> {
        self.call(NO_TX, &Request::Unwatch(path.into(), token.into()))
            .map(drop)
    }

    pub fn get_domain_path(&mut self, domid: u32) -> Result<String, XsError> {
        let p = self.call(NO_TX, &Request::GetDomainPath(domid))?;
        Ok(String::from_utf8_lossy(strip_nul(&p)).into_owned())
    }

    pub fn is_domain_introduced(&mut self, domid: u32) -> Result<bool, XsError> {
        let p = self.call(NO_TX, &Request::IsDomainIntroduced(domid))?;
        Ok(strip_nul(&p) != b"F")
    }

    /// Tells xenstored about a new domain (toolstack only; fires `@introduceDomain`).
    pub fn introduce(&mut self, domid: u32, mfn: u64, port: u32) -> Result<(), XsError> {
        self.call(NO_TX, &Request::Introduce(domid, mfn, port))
            .map(drop)
    }

    /// Releases a domain (toolstack only; fires `@releaseDomain`).
    pub fn release(&mut self, domid: u32) -> Result<(), XsError> {
        self.call(NO_TX, &Request::Release(domid)).map(drop)
    }

    /// The next queued or arriving watch event, waiting at most `timeout`.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<WatchEvent>, XsError> {
        if let Some(ev) = self.events.pop_front() {
            return Ok(Some(ev));
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_message(deadline, "watch") {
                Ok(m) if m.ty == MsgType::WatchEvent => {
                    if let Some(ev) = WatchEvent::parse(&m.payload) {
                        return Ok(Some(ev));
                    }
                }
                Ok(_) => continue,
                Err(XsError::Timeout { .. }) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    // --- transactional forms ---

    pub fn read_tx(&mut self, tx: u32, path: &str) -> Result<Vec<u8>, XsError> {
        self.call(tx, &Request::Read(path.into()))
    }

    pub fn write_tx(
        &mut self,
        tx: u32,
        path: &str,
        value: impl AsRef<[u8]>,
    ) -> Result<(), XsError> {
        self.call(tx, &Request::Write(path.into(), value.as_ref().to_vec()))
            .map(drop)
    }

    pub fn mkdir_tx(&mut self, tx: u32, path: &str) -> Result<(), XsError> {
        self.call(tx, &Request::Mkdir(path.into())).map(drop)
    }

    pub fn rm_tx(&mut self, tx: u32, path: &str) -> Result<(), XsError> {
        self.call(tx, &Request::Rm(path.into())).map(drop)
    }

    pub fn set_perms_tx(&mut self, tx: u32, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        let perms = perms.iter().map(Perm::to_string).collect();
        self.call(tx, &Request::SetPerms(path.into(), perms))
            .map(drop)
    }

    /// Lists a directory, falling back to `DIRECTORY_PART` when the list exceeds one payload.
    pub fn directory_tx(&mut self, tx: u32, path: &str) -> Result<Vec<String>, XsError> {
        match self.call(tx, &Request::Directory(path.into())) {
            Ok(p) => Ok(parse_directory(&p)),
            Err(e) if e.is_errno("E2BIG") => {
                let mut acc = DirPartAcc::default();
                let mut off = 0;
                loop {
                    let p = self.call(tx, &Request::DirectoryPart(path.into(), off))?;
                    match acc.absorb(&p).map_err(|why| XsError::BadReply {
                        op: "DIRECTORY_PART",
                        why,
                    })? {
                        DirPartStep::Next(o) => off = o,
                        DirPartStep::Done(names) => return Ok(names),
                    }
                }
            }
            Err(e) => Err(e),
        }
    }

    pub fn transaction_start(&mut self) -> Result<u32, XsError> {
        let p = self.call(NO_TX, &Request::TransactionStart)?;
        let s = String::from_utf8_lossy(strip_nul(&p)).into_owned();
        s.parse().map_err(|_| XsError::BadReply {
            op: "TRANSACTION_START",
            why: format!("transaction id {s:?}"),
        })
    }

    /// Ends transaction `tx`; `commit == false` aborts. A conflict is `Refused` with `EAGAIN`.
    pub fn transaction_end(&mut self, tx: u32, commit: bool) -> Result<(), XsError> {
        self.call(tx, &Request::TransactionEnd(commit)).map(drop)
    }

    /// Runs `body` in a transaction and commits it, retrying the whole body while xenstored
    /// reports a conflict (`EAGAIN`). An error from `body` aborts the transaction.
    pub fn transaction<T>(
        &mut self,
        mut body: impl FnMut(&mut Client, u32) -> Result<T, XsError>,
    ) -> Result<T, XsError> {
        for _ in 0..TRANSACTION_RETRIES {
            let tx = self.transaction_start()?;
            let value = match body(self, tx) {
                Ok(v) => v,
                Err(e) => {
                    // The abort's own failure is secondary to the body's.
                    let _ = self.transaction_end(tx, false);
                    return Err(e);
                }
            };
            match self.transaction_end(tx, true) {
                Ok(()) => return Ok(value),
                Err(e) if e.is_errno("EAGAIN") => continue,
                Err(e) => return Err(e),
            }
        }
        Err(XsError::TooManyRetries(TRANSACTION_RETRIES))
    }
}

/// Operation name for messages.
pub fn op_name(t: MsgType) -> &'static str {
    match t {
        MsgType::Read => "READ",
        MsgType::Write => "WRITE",
        MsgType::Mkdir => "MKDIR",
        MsgType::Rm => "RM",
        MsgType::Directory => "DIRECTORY",
        MsgType::DirectoryPart => "DIRECTORY_PART",
        MsgType::GetPerms => "GET_PERMS",
        MsgType::SetPerms => "SET_PERMS",
        MsgType::Watch => "WATCH",
        MsgType::Unwatch => "UNWATCH",
        MsgType::TransactionStart => "TRANSACTION_START",
        MsgType::TransactionEnd => "TRANSACTION_END",
        MsgType::GetDomainPath => "GET_DOMAIN_PATH",
        MsgType::IsDomainIntroduced => "IS_DOMAIN_INTRODUCED",
        MsgType::Introduce => "INTRODUCE",
        MsgType::Release => "RELEASE",
        MsgType::ResetWatches => "RESET_WATCHES",
        _ => "request",
    }
}

/// The path a request is about, for error messages.
pub fn request_path(req: &Request) -> String {
    match req {
        Request::Read(p)
        | Request::Write(p, _)
        | Request::Mkdir(p)
        | Request::Rm(p)
        | Request::Directory(p)
        | Request::DirectoryPart(p, _)
        | Request::GetPerms(p)
        | Request::SetPerms(p, _)
        | Request::Watch(p, _)
        | Request::Unwatch(p, _) => p.clone(),
        Request::GetDomainPath(d)
        | Request::IsDomainIntroduced(d)
        | Request::Introduce(d, ..)
        | Request::Release(d) => format!("domain {d}"),
        Request::TransactionStart | Request::TransactionEnd(_) | Request::ResetWatches => {
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_part_single_chunk() {
        let mut acc = DirPartAcc::default();
        assert_eq!(
            acc.absorb(b"1a\0x\0y\0\0").unwrap(),
            DirPartStep::Done(vec!["x".into(), "y".into()])
        );
    }

    #[test]
    fn dir_part_multi_chunk_and_restart() {
        let mut acc = DirPartAcc::default();
        assert_eq!(acc.absorb(b"7\0aa\0bb\0").unwrap(), DirPartStep::Next(6));
        // Generation changed: restart from 0.
        assert_eq!(acc.absorb(b"8\0cc\0").unwrap(), DirPartStep::Next(0));
        assert_eq!(acc.absorb(b"8\0aa\0").unwrap(), DirPartStep::Next(3));
        assert_eq!(
            acc.absorb(b"8\0cc\0\0").unwrap(),
            DirPartStep::Done(vec!["aa".into(), "cc".into()])
        );
        // An offset past the end answers just the terminator.
        let mut acc = DirPartAcc::default();
        assert_eq!(acc.absorb(b"3\0\0").unwrap(), DirPartStep::Done(vec![]));
        assert!(DirPartAcc::default().absorb(b"nogen").is_err());
    }
}
