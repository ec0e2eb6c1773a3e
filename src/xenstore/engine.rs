//! Non-blocking, pipelined XenStore connection for the service's mio event loop.
//!
//! The event loop owns the [`Engine`]: it registers [`Engine::raw_fd`] with mio, calls
//! [`Engine::on_readable`] / [`Engine::flush`] on readiness and gets back [`Completion`]s.
//! Requests are pipelined: a reconcile pass sends every read it needs at once and the replies
//! come back tagged with whatever `T` the caller attached, so one pass over a host costs a few
//! round trips, not one per node. Watch events are routed apart from replies (they carry no
//! `req_id` of ours). Directory listings transparently fall back to `DIRECTORY_PART` when
//! `DIRECTORY` answers `E2BIG` (a host with ~1,000 domains overflows one 4 KiB payload).
//!
//! The engine never blocks: a write that does not fit the socket buffer waits in `out` until
//! the socket is writable again.
//!
//! On the xenbus device (a driver domain) requests are not pipelined: one is written only
//! once the previous one has its reply, as libxenstore does. The kernel takes one message per
//! `write` into a per-file buffer and queues it for its xenbus thread with the payload still
//! pointing into that buffer (Linux `xenbus_dev_request_and_reply`); the payload reaches the
//! ring only when that thread runs. A second `write` before then overwrites the first
//! request's payload: in the real-Xen harness's driver domain, oxenstored answered `EINVAL`
//! to bursts of the service's reads (the status listed every key of a vif as `EINVAL` and a
//! request from automation went unanswered), and a corrupted `WRITE` could as well have
//! written another request's bytes to another node. A reply proves the kernel has sent the
//! request, so serial requests are safe. (A `WATCH` or `UNWATCH` is sent synchronously inside
//! `write`, `xs_talkv`, and was seen to block there for good when written behind pipelined
//! requests: serial requests avoid that too.) A reconcile pass there costs one round trip
//! per node instead of a few in all; a driver domain backs few vifs.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

use super::client::{parse_directory, DirPartAcc, DirPartStep};
use super::error::XsError;
use super::transport::Stream;
use super::wire::{Decoder, Message, MsgType, Request, WatchEvent};

/// A finished request or an event.
#[derive(Debug)]
pub enum Completion<T> {
    /// The reply to a request submitted with `tag`: its payload, or xenstored's errno name.
    /// Directory requests complete with the NUL-joined child names.
    Reply(T, Result<Vec<u8>, String>),
    /// A watch fired.
    Event(WatchEvent),
}

#[derive(Debug)]
enum Kind {
    Plain,
    Dir {
        path: String,
        tx: u32,
    },
    DirPart {
        path: String,
        tx: u32,
        acc: DirPartAcc,
    },
}

#[derive(Debug)]
struct Pending<T> {
    tag: T,
    ty: MsgType,
    kind: Kind,
}

/// One connection to xenstored driven by an event loop.
#[derive(Debug)]
pub struct Engine<T> {
    stream: Stream,
    dec: Decoder,
    out: Vec<u8>,
    pending: HashMap<u32, Pending<T>>,
    next_req: u32,
    /// xenbus device only: requests waiting for the reply in `pending` (see the module
    /// documentation), in submission order.
    held: VecDeque<(u32, Request, T)>,
}

impl<T> Engine<T> {
    /// Connects without blocking on I/O afterwards.
    pub fn connect(path: &Path) -> Result<Engine<T>, XsError> {
        Ok(Engine {
            stream: Stream::open(path, true)?,
            dec: Decoder::with_limit(super::wire::CLIENT_REPLY_MAX),
            out: Vec::new(),
            pending: HashMap::new(),
            next_req: 1,
            held: VecDeque::new(),
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Requests still waiting for a reply (sent or held back).
    pub fn outstanding(&self) -> usize {
        self.pending.len() + self.held.len()
    }

    /// Whether a request must wait in `held` rather than be written now: on the xenbus
    /// device while another request waits for its reply.
    fn must_hold(&self) -> bool {
        matches!(self.stream, Stream::Device(_))
            && (!self.held.is_empty() || !self.pending.is_empty())
    }

    /// Sends the next held request once nothing waits for a reply.
    fn release_held(&mut self) -> Result<(), XsError> {
        if !self.pending.is_empty() {
            return Ok(());
        }
        match self.held.pop_front() {
            Some((tx, req, tag)) => self.submit_now(tx, req, tag),
            None => Ok(()),
        }
    }

    /// Whether bytes wait for the socket to become writable.
    pub fn wants_write(&self) -> bool {
        !self.out.is_empty()
    }

    /// Queues `req` in transaction `tx`; its reply comes back as `Completion::Reply(tag, ..)`.
    pub fn submit(&mut self, tx: u32, req: Request, tag: T) -> Result<(), XsError> {
        if self.must_hold() {
            self.held.push_back((tx, req, tag));
            return Ok(());
        }
        self.submit_now(tx, req, tag)
    }

    fn submit_now(&mut self, tx: u32, req: Request, tag: T) -> Result<(), XsError> {
        let kind = match &req {
            Request::Directory(p) => Kind::Dir {
                path: p.clone(),
                tx,
            },
            _ => Kind::Plain,
        };
        self.send(
            tx,
            req,
            Pending {
                tag,
                ty: MsgType::Read,
                kind,
            },
        )
    }

    fn send(&mut self, tx: u32, req: Request, mut p: Pending<T>) -> Result<(), XsError> {
        let id = self.next_req;
        self.next_req = self.next_req.wrapping_add(1).max(1);
        p.ty = req.msg_type();
        Message::new(req.msg_type(), id, tx, req.emit()).encode(&mut self.out)?;
        self.pending.insert(id, p);
        self.flush()
    }

    /// Writes queued bytes until the socket would block.
    pub fn flush(&mut self) -> Result<(), XsError> {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => return Err(std::io::Error::from(ErrorKind::WriteZero).into()),
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Reads everything available and appends completions to `sink`. An error means the
    /// connection is gone: drop the engine and reconnect.
    pub fn on_readable(&mut self, sink: &mut Vec<Completion<T>>) -> Result<(), XsError> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.drain_frames(sink)?;
                    return Err(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "xenstored closed the connection",
                    )
                    .into());
                }
                Ok(n) => {
                    self.dec.feed(&buf[..n]);
                    self.drain_frames(sink)?;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.release_held()?;
        self.flush()
    }

    fn drain_frames(&mut self, sink: &mut Vec<Completion<T>>) -> Result<(), XsError> {
        while let Some(m) = self.dec.next_message()? {
            if m.ty == MsgType::WatchEvent {
                if let Some(ev) = WatchEvent::parse(&m.payload) {
                    sink.push(Completion::Event(ev));
                }
                continue;
            }
            let Some(p) = self.pending.remove(&m.req_id) else {
                // Not ours (xenstored echoes req_id); ignore rather than desynchronise.
                continue;
            };
            self.complete(m, p, sink)?;
        }
        Ok(())
    }

    fn complete(
        &mut self,
        m: Message,
        p: Pending<T>,
        sink: &mut Vec<Completion<T>>,
    ) -> Result<(), XsError> {
        let err = m.error_name().map(str::to_owned);
        if err.is_none() && m.ty != p.ty {
            sink.push(Completion::Reply(
                p.tag,
                Err(format!("EPROTO (reply type {:?})", m.ty)),
            ));
            return Ok(());
        }
        match (p.kind, err) {
            (Kind::Dir { path, tx }, Some(e)) if e == "E2BIG" => {
                let next = Pending {
                    tag: p.tag,
                    ty: MsgType::DirectoryPart,
                    kind: Kind::DirPart {
                        path: path.clone(),
                        tx,
                        acc: DirPartAcc::default(),
                    },
                };
                self.send(tx, Request::DirectoryPart(path, 0), next)
            }
            (Kind::Dir { .. }, None) => {
                let names = parse_directory(&m.payload);
                sink.push(Completion::Reply(p.tag, Ok(join(&names))));
                Ok(())
            }
            (Kind::DirPart { path, tx, mut acc }, None) => match acc.absorb(&m.payload) {
                Ok(DirPartStep::Done(names)) => {
                    sink.push(Completion::Reply(p.tag, Ok(join(&names))));
                    Ok(())
                }
                Ok(DirPartStep::Next(off)) => {
                    let next = Pending {
                        tag: p.tag,
                        ty: MsgType::DirectoryPart,
                        kind: Kind::DirPart {
                            path: path.clone(),
                            tx,
                            acc,
                        },
                    };
                    self.send(tx, Request::DirectoryPart(path, off), next)
                }
                Err(why) => {
                    sink.push(Completion::Reply(p.tag, Err(format!("EPROTO ({why})"))));
                    Ok(())
                }
            },
            (_, Some(e)) => {
                sink.push(Completion::Reply(p.tag, Err(e)));
                Ok(())
            }
            (Kind::Plain, None) => {
                sink.push(Completion::Reply(p.tag, Ok(m.payload)));
                Ok(())
            }
        }
    }
}

fn join(names: &[String]) -> Vec<u8> {
    super::wire::join_list(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds xenstored's bytes as if read from the stream.
    fn feed(e: &mut Engine<&'static str>, m: Message) -> Vec<Completion<&'static str>> {
        let mut bytes = Vec::new();
        m.encode(&mut bytes).unwrap();
        e.dec.feed(&bytes);
        let mut sink = Vec::new();
        e.drain_frames(&mut sink).unwrap();
        e.release_held().unwrap();
        sink
    }

    #[test]
    fn on_the_xenbus_device_one_request_at_a_time() {
        // /dev/null is a character device: the engine treats it as the xenbus device.
        let mut e: Engine<&'static str> = Engine::connect(Path::new("/dev/null")).unwrap();
        e.submit(0, Request::Read("/a".into()), "a").unwrap();
        e.submit(0, Request::Write("/b".into(), b"1".to_vec()), "b")
            .unwrap();
        e.submit(0, Request::Watch("/w".into(), "t".into()), "w")
            .unwrap();
        // Only the first read went out; the rest wait, in order.
        assert_eq!(e.pending.len(), 1);
        assert_eq!(e.outstanding(), 3);
        let done = feed(&mut e, Message::new(MsgType::Read, 1, 0, b"x".to_vec()));
        assert!(matches!(done[..], [Completion::Reply("a", Ok(_))]));
        // The write went out (request 2), the watch still waits for its reply.
        let ids: Vec<_> = e.pending.iter().map(|(id, p)| (*id, p.tag)).collect();
        assert_eq!(ids, vec![(2, "b")]);
        assert_eq!(e.held.len(), 1);
        // An error reply releases the next one as well.
        let done = feed(
            &mut e,
            Message::new(MsgType::Error, 2, 0, b"EACCES\0".to_vec()),
        );
        assert!(matches!(&done[..], [Completion::Reply("b", Err(x))] if x == "EACCES"));
        let ids: Vec<_> = e.pending.iter().map(|(id, p)| (*id, p.tag)).collect();
        assert_eq!(ids, vec![(3, "w")]);
        assert!(e.held.is_empty());
    }

    #[test]
    fn on_the_xenbus_device_a_directory_fallback_keeps_one_request_outstanding() {
        let mut e: Engine<&'static str> = Engine::connect(Path::new("/dev/null")).unwrap();
        e.submit(0, Request::Directory("/big".into()), "dir")
            .unwrap();
        e.submit(0, Request::Read("/after".into()), "after")
            .unwrap();
        // E2BIG: the engine asks again with DIRECTORY_PART, still before the held read.
        let done = feed(
            &mut e,
            Message::new(MsgType::Error, 1, 0, b"E2BIG\0".to_vec()),
        );
        assert!(done.is_empty());
        let ids: Vec<_> = e.pending.iter().map(|(id, p)| (*id, p.tag)).collect();
        assert_eq!(ids, vec![(2, "dir")]);
        assert_eq!(e.held.len(), 1);
    }

    #[test]
    fn on_a_socket_requests_are_pipelined_as_they_come() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xs.sock");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut e: Engine<&'static str> = Engine::connect(&path).unwrap();
        e.submit(0, Request::Read("/a".into()), "a").unwrap();
        e.submit(0, Request::Watch("/w".into(), "t".into()), "w")
            .unwrap();
        assert_eq!(e.pending.len(), 2);
        assert!(e.held.is_empty());
    }
}
