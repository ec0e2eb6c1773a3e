//! The XenStore wire format (Xen `xen/include/public/io/xs_wire.h`, `docs/misc/xenstore.txt`).
//!
//! Every message is a 16-byte header of four native-endian `u32` (`type`, `req_id`, `tx_id`,
//! `len`) followed by `len` bytes of payload, `len <= 4096`. Strings in a payload are
//! NUL-terminated, lists are NUL-separated.
//!
//! The shape follows smoltcp: [`Header`] is the zero-copy view of the 16 bytes, [`Message`] an
//! owned frame, and [`Request`] the parsed meaning of a request payload with `parse`/`emit` as
//! inverses. [`Decoder`] turns a byte stream (split reads, several messages per read) into
//! frames; it never panics on garbage: a header whose length exceeds the protocol maximum is a
//! [`WireError::Oversize`], which both real xenstored implementations treat as a broken peer.

use std::fmt;

/// Size of the message header.
pub const HEADER_LEN: usize = 16;
/// `XENSTORE_PAYLOAD_MAX` from `xs_wire.h`.
pub const PAYLOAD_MAX: usize = 4096;
/// `XENSTORE_ABS_PATH_MAX` from `xs_wire.h`.
pub const ABS_PATH_MAX: usize = 3072;
/// `XENSTORE_REL_PATH_MAX` from `xs_wire.h`.
pub const REL_PATH_MAX: usize = 2048;

/// Message types (`enum xsd_sockmsg_type`). Unknown numbers are kept so a server can answer
/// them with `EINVAL` rather than dropping the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsgType {
    Control,
    Directory,
    Read,
    GetPerms,
    Watch,
    Unwatch,
    TransactionStart,
    TransactionEnd,
    Introduce,
    Release,
    GetDomainPath,
    Write,
    Mkdir,
    Rm,
    SetPerms,
    WatchEvent,
    Error,
    IsDomainIntroduced,
    Resume,
    SetTarget,
    ResetWatches,
    DirectoryPart,
    Unknown(u32),
}

impl From<u32> for MsgType {
    fn from(v: u32) -> Self {
        use MsgType::*;
        match v {
            0 => Control,
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            8 => Introduce,
            9 => Release,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            17 => IsDomainIntroduced,
            18 => Resume,
            19 => SetTarget,
            // 20 was XS_RESTRICT, removed in Xen 4.9.
            21 => ResetWatches,
            22 => DirectoryPart,
            other => Unknown(other),
        }
    }
}

impl From<MsgType> for u32 {
    fn from(t: MsgType) -> u32 {
        use MsgType::*;
        match t {
            Control => 0,
            Directory => 1,
            Read => 2,
            GetPerms => 3,
            Watch => 4,
            Unwatch => 5,
            TransactionStart => 6,
            TransactionEnd => 7,
            Introduce => 8,
            Release => 9,
            GetDomainPath => 10,
            Write => 11,
            Mkdir => 12,
            Rm => 13,
            SetPerms => 14,
            WatchEvent => 15,
            Error => 16,
            IsDomainIntroduced => 17,
            Resume => 18,
            SetTarget => 19,
            ResetWatches => 21,
            DirectoryPart => 22,
            Unknown(v) => v,
        }
    }
}

/// Errors of the framing layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// A peer announced a payload larger than the protocol allows; the stream cannot be
    /// resynchronised and the connection must be dropped.
    #[error("peer sent a {0}-byte payload, more than the {1} bytes accepted; the connection is out of sync")]
    Oversize(u32, usize),
    /// We were asked to send a payload the protocol cannot carry.
    #[error("payload of {0} bytes exceeds XENSTORE_PAYLOAD_MAX ({PAYLOAD_MAX})")]
    PayloadTooLarge(usize),
    /// A request payload does not have the shape its type requires.
    #[error("malformed {ty:?} payload: {why}")]
    Malformed { ty: MsgType, why: &'static str },
}

/// Zero-copy view of a message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub ty: MsgType,
    pub req_id: u32,
    pub tx_id: u32,
    pub len: u32,
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes of `b`. Returns `None` when `b` is shorter.
    pub fn parse(b: &[u8]) -> Option<Header> {
        let b = b.get(..HEADER_LEN)?;
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Some(Header {
            ty: MsgType::from(word(0)),
            req_id: word(4),
            tx_id: word(8),
            len: word(12),
        })
    }

    /// Writes the header into `out`.
    pub fn emit(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&u32::from(self.ty).to_ne_bytes());
        out.extend_from_slice(&self.req_id.to_ne_bytes());
        out.extend_from_slice(&self.tx_id.to_ne_bytes());
        out.extend_from_slice(&self.len.to_ne_bytes());
    }
}

/// One owned frame.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub ty: MsgType,
    pub req_id: u32,
    pub tx_id: u32,
    pub payload: Vec<u8>,
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("ty", &self.ty)
            .field("req_id", &self.req_id)
            .field("tx_id", &self.tx_id)
            .field("payload", &String::from_utf8_lossy(&self.payload))
            .finish()
    }
}

impl Message {
    pub fn new(ty: MsgType, req_id: u32, tx_id: u32, payload: Vec<u8>) -> Message {
        Message {
            ty,
            req_id,
            tx_id,
            payload,
        }
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        if self.payload.len() > PAYLOAD_MAX {
            return Err(WireError::PayloadTooLarge(self.payload.len()));
        }
        self.emit_unchecked(out);
        Ok(())
    }

    /// Appends the frame whatever its size (a server answering over a socket, as oxenstored
    /// does; tests).
    pub fn emit_unchecked(&self, out: &mut Vec<u8>) {
        Header {
            ty: self.ty,
            req_id: self.req_id,
            tx_id: self.tx_id,
            len: self.payload.len() as u32,
        }
        .emit(out);
        out.extend_from_slice(&self.payload);
    }

    /// The `ERROR` payload as an errno name, when this is an error reply.
    pub fn error_name(&self) -> Option<&str> {
        if self.ty != MsgType::Error {
            return None;
        }
        Some(std::str::from_utf8(strip_nul(&self.payload)).unwrap_or("EINVAL"))
    }
}

/// Largest reply a client accepts from xenstored. oxenstored does not cap replies on its Unix
/// socket at [`PAYLOAD_MAX`] (measured: a 6,300-byte `DIRECTORY` reply to dom0), so clients
/// accept more, still bounded so a broken peer cannot make us allocate without limit.
pub const CLIENT_REPLY_MAX: usize = 1 << 20;

/// Incremental stream decoder: feed it whatever `read` returned, take frames out.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
    limit: usize,
}

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder::new()
    }
}

impl Decoder {
    /// A decoder enforcing the protocol's [`PAYLOAD_MAX`] (what a server must do).
    pub fn new() -> Decoder {
        Decoder::with_limit(PAYLOAD_MAX)
    }

    /// A decoder accepting payloads up to `limit` bytes.
    pub fn with_limit(limit: usize) -> Decoder {
        Decoder {
            buf: Vec::new(),
            start: 0,
            limit,
        }
    }

    /// Appends bytes read from the peer.
    pub fn feed(&mut self, data: &[u8]) {
        // Compact lazily so a long-lived connection does not grow its buffer forever.
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes received but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Returns the next complete frame, `Ok(None)` when more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, WireError> {
        let avail = &self.buf[self.start..];
        let Some(h) = Header::parse(avail) else {
            return Ok(None);
        };
        if h.len as usize > self.limit {
            return Err(WireError::Oversize(h.len, self.limit));
        }
        let total = HEADER_LEN + h.len as usize;
        if avail.len() < total {
            return Ok(None);
        }
        let payload = avail[HEADER_LEN..total].to_vec();
        self.start += total;
        Ok(Some(Message {
            ty: h.ty,
            req_id: h.req_id,
            tx_id: h.tx_id,
            payload,
        }))
    }
}

/// Removes one trailing NUL, if present.
pub fn strip_nul(b: &[u8]) -> &[u8] {
    b.strip_suffix(&[0]).unwrap_or(b)
}

/// Splits a NUL-separated list. A trailing NUL terminates the last element rather than
/// starting an empty one (`"a\0b\0"` is `["a", "b"]`, `""` is `[]`).
pub fn split_list(b: &[u8]) -> Vec<&[u8]> {
    if b.is_empty() {
        return Vec::new();
    }
    let body = strip_nul(b);
    body.split(|&c| c == 0).collect()
}

/// Builds a payload of NUL-terminated strings.
pub fn join_list<I, S>(items: I) -> Vec<u8>
where
    I: IntoIterator<Item = S>,
    S: AsRef<[u8]>,
{
    let mut out = Vec::new();
    for s in items {
        out.extend_from_slice(s.as_ref());
        out.push(0);
    }
    out
}

/// The parsed meaning of a request payload. `emit` and `parse` are inverses for every variant
/// (tested on literal bytes below).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Read(String),
    /// Path and value; the value is raw bytes and carries no NUL terminator on the wire.
    Write(String, Vec<u8>),
    Mkdir(String),
    Rm(String),
    Directory(String),
    /// Path and byte offset into the child-name list.
    DirectoryPart(String, u32),
    GetPerms(String),
    SetPerms(String, Vec<String>),
    Watch(String, String),
    Unwatch(String, String),
    TransactionStart,
    /// `true` commits, `false` aborts.
    TransactionEnd(bool),
    GetDomainPath(u32),
    IsDomainIntroduced(u32),
    Introduce(u32, u64, u32),
    Release(u32),
    ResetWatches,
}

impl Request {
    pub fn msg_type(&self) -> MsgType {
        match self {
            Request::Read(_) => MsgType::Read,
            Request::Write(..) => MsgType::Write,
            Request::Mkdir(_) => MsgType::Mkdir,
            Request::Rm(_) => MsgType::Rm,
            Request::Directory(_) => MsgType::Directory,
            Request::DirectoryPart(..) => MsgType::DirectoryPart,
            Request::GetPerms(_) => MsgType::GetPerms,
            Request::SetPerms(..) => MsgType::SetPerms,
            Request::Watch(..) => MsgType::Watch,
            Request::Unwatch(..) => MsgType::Unwatch,
            Request::TransactionStart => MsgType::TransactionStart,
            Request::TransactionEnd(_) => MsgType::TransactionEnd,
            Request::GetDomainPath(_) => MsgType::GetDomainPath,
            Request::IsDomainIntroduced(_) => MsgType::IsDomainIntroduced,
            Request::Introduce(..) => MsgType::Introduce,
            Request::Release(_) => MsgType::Release,
            Request::ResetWatches => MsgType::ResetWatches,
        }
    }

    /// Encodes the payload as libxenstore does.
    pub fn emit(&self) -> Vec<u8> {
        match self {
            Request::Read(p)
            | Request::Mkdir(p)
            | Request::Rm(p)
            | Request::Directory(p)
            | Request::GetPerms(p) => join_list([p]),
            Request::Write(p, v) => {
                let mut out = join_list([p]);
                out.extend_from_slice(v);
                out
            }
            Request::DirectoryPart(p, off) => join_list([p.clone(), off.to_string()]),
            Request::SetPerms(p, perms) => {
                join_list(std::iter::once(p).chain(perms.iter()).map(String::as_bytes))
            }
            Request::Watch(p, t) | Request::Unwatch(p, t) => join_list([p, t]),
            Request::TransactionStart | Request::ResetWatches => vec![0],
            Request::TransactionEnd(commit) => join_list([if *commit { "T" } else { "F" }]),
            Request::GetDomainPath(d) | Request::IsDomainIntroduced(d) | Request::Release(d) => {
                join_list([d.to_string()])
            }
            Request::Introduce(d, mfn, port) => {
                join_list([d.to_string(), mfn.to_string(), port.to_string()])
            }
        }
    }

    /// Parses a request payload of type `ty`. Unknown types are `None`.
    pub fn parse(ty: MsgType, payload: &[u8]) -> Result<Option<Request>, WireError> {
        let bad = |why| WireError::Malformed { ty, why };
        let text = |b: &[u8]| -> Result<String, WireError> {
            std::str::from_utf8(b)
                .map(str::to_owned)
                .map_err(|_| bad("not UTF-8"))
        };
        let single = || -> Result<String, WireError> {
            // xenstored accepts a path with or without its terminating NUL, but not with an
            // embedded one.
            let body = strip_nul(payload);
            if body.contains(&0) {
                return Err(bad("embedded NUL"));
            }
            text(body)
        };
        let number = |s: &[u8]| -> Result<u32, WireError> {
            std::str::from_utf8(s)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(bad("not a decimal number"))
        };
        let req = match ty {
            MsgType::Read => Request::Read(single()?),
            MsgType::Mkdir => Request::Mkdir(single()?),
            MsgType::Rm => Request::Rm(single()?),
            MsgType::Directory => Request::Directory(single()?),
            MsgType::GetPerms => Request::GetPerms(single()?),
            MsgType::Write => {
                let nul = payload
                    .iter()
                    .position(|&c| c == 0)
                    .ok_or(bad("no NUL after path"))?;
                Request::Write(text(&payload[..nul])?, payload[nul + 1..].to_vec())
            }
            MsgType::DirectoryPart => match split_list(payload).as_slice() {
                [p, off] => Request::DirectoryPart(text(p)?, number(off)?),
                _ => return Err(bad("expected path and offset")),
            },
            MsgType::SetPerms => {
                let items = split_list(payload);
                let (p, perms) = items.split_first().ok_or(bad("no path"))?;
                if perms.is_empty() {
                    return Err(bad("no permissions"));
                }
                let perms = perms.iter().map(|s| text(s)).collect::<Result<_, _>>()?;
                Request::SetPerms(text(p)?, perms)
            }
            MsgType::Watch | MsgType::Unwatch => match split_list(payload).as_slice() {
                [p, t] => {
                    let (p, t) = (text(p)?, text(t)?);
                    if ty == MsgType::Watch {
                        Request::Watch(p, t)
                    } else {
                        Request::Unwatch(p, t)
                    }
                }
                _ => return Err(bad("expected path and token")),
            },
            MsgType::TransactionStart => Request::TransactionStart,
            MsgType::ResetWatches => Request::ResetWatches,
            MsgType::TransactionEnd => match strip_nul(payload) {
                b"T" => Request::TransactionEnd(true),
                b"F" => Request::TransactionEnd(false),
                _ => return Err(bad("expected T or F")),
            },
            MsgType::GetDomainPath | MsgType::IsDomainIntroduced | MsgType::Release => {
                let d = number(strip_nul(payload))?;
                match ty {
                    MsgType::GetDomainPath => Request::GetDomainPath(d),
                    MsgType::IsDomainIntroduced => Request::IsDomainIntroduced(d),
                    _ => Request::Release(d),
                }
            }
            MsgType::Introduce => match split_list(payload).as_slice() {
                [d, mfn, port] => {
                    let mfn = std::str::from_utf8(mfn)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or(bad("mfn is not a number"))?;
                    Request::Introduce(number(d)?, mfn, number(port)?)
                }
                _ => return Err(bad("expected domid, mfn and port")),
            },
            _ => return Ok(None),
        };
        Ok(Some(req))
    }
}

/// A watch event: the path that changed (as the watch was registered: relative watches get
/// relative paths) and the watch's token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub path: String,
    pub token: String,
}

impl WatchEvent {
    /// Parses a `WATCH_EVENT` payload (`path\0token\0`).
    pub fn parse(payload: &[u8]) -> Option<WatchEvent> {
        let items = split_list(payload);
        let path = std::str::from_utf8(items.first()?).ok()?.to_owned();
        let token = std::str::from_utf8(items.get(1)?).ok()?.to_owned();
        Some(WatchEvent { path, token })
    }

    pub fn emit(&self) -> Vec<u8> {
        join_list([&self.path, &self.token])
    }
}

/// Feeds arbitrary bytes through the decoder and the request parser; used by the fuzz target
/// and by property tests. Must never panic.
pub fn fuzz_one(data: &[u8]) -> usize {
    let mut dec = Decoder::new();
    let mut frames = 0;
    // Feed in uneven chunks to exercise split reads.
    for chunk in data.chunks(7) {
        dec.feed(chunk);
        loop {
            match dec.next_message() {
                Ok(Some(m)) => {
                    frames += 1;
                    if let Ok(Some(req)) = Request::parse(m.ty, &m.payload) {
                        let again = Request::parse(req.msg_type(), &req.emit());
                        debug_assert!(matches!(again, Ok(Some(_))));
                    }
                    let _ = WatchEvent::parse(&m.payload);
                    let _ = m.error_name();
                }
                Ok(None) => break,
                Err(_) => return frames,
            }
        }
    }
    frames
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A READ of "/local/domain/0/name" with req_id 7, tx 0, as libxenstore sends it on x86.
    const READ_BYTES: &[u8] =
        b"\x02\x00\x00\x00\x07\x00\x00\x00\x00\x00\x00\x00\x15\x00\x00\x00/local/domain/0/name\x00";

    #[test]
    fn header_parse_and_emit_literal() {
        let h = Header::parse(READ_BYTES).unwrap();
        assert_eq!(
            h,
            Header {
                ty: MsgType::Read,
                req_id: 7,
                tx_id: 0,
                len: 21
            }
        );
        let mut out = Vec::new();
        h.emit(&mut out);
        assert_eq!(out, &READ_BYTES[..16]);
    }

    #[test]
    fn request_emit_matches_literal() {
        let req = Request::Read("/local/domain/0/name".into());
        let m = Message::new(req.msg_type(), 7, 0, req.emit());
        let mut out = Vec::new();
        m.encode(&mut out).unwrap();
        assert_eq!(out, READ_BYTES);
        assert_eq!(Request::parse(m.ty, &m.payload).unwrap(), Some(req));
    }

    #[test]
    fn write_has_no_trailing_nul_on_value() {
        let req = Request::Write("a/b".into(), b"val".to_vec());
        assert_eq!(req.emit(), b"a/b\0val");
        assert_eq!(
            Request::parse(MsgType::Write, b"a/b\0val").unwrap(),
            Some(req)
        );
        // An empty value is legal (mkdir-like write).
        assert_eq!(
            Request::parse(MsgType::Write, b"a\0").unwrap(),
            Some(Request::Write("a".into(), vec![]))
        );
    }

    #[test]
    fn every_request_round_trips() {
        let all = vec![
            Request::Read("/a".into()),
            Request::Write("/a".into(), b"x\0y".to_vec()),
            Request::Mkdir("/a".into()),
            Request::Rm("/a".into()),
            Request::Directory("/a".into()),
            Request::DirectoryPart("/a".into(), 4000),
            Request::GetPerms("/a".into()),
            Request::SetPerms("/a".into(), vec!["n0".into(), "r5".into()]),
            Request::Watch("@releaseDomain".into(), "tok".into()),
            Request::Unwatch("/a".into(), "tok".into()),
            Request::TransactionStart,
            Request::TransactionEnd(true),
            Request::TransactionEnd(false),
            Request::GetDomainPath(5),
            Request::IsDomainIntroduced(5),
            Request::Introduce(5, 1234, 3),
            Request::Release(5),
            Request::ResetWatches,
        ];
        for req in all {
            let back = Request::parse(req.msg_type(), &req.emit()).unwrap();
            assert_eq!(back, Some(req));
        }
    }

    #[test]
    fn split_reads_and_coalesced_messages() {
        let mut stream = Vec::new();
        for i in 0..3u32 {
            Message::new(MsgType::Read, i, 0, format!("/p{i}\0").into_bytes())
                .encode(&mut stream)
                .unwrap();
        }
        // One byte at a time.
        let mut dec = Decoder::new();
        let mut got = Vec::new();
        for b in &stream {
            dec.feed(std::slice::from_ref(b));
            while let Some(m) = dec.next_message().unwrap() {
                got.push(m.req_id);
            }
        }
        assert_eq!(got, vec![0, 1, 2]);
        // All at once.
        let mut dec = Decoder::new();
        dec.feed(&stream);
        let mut n = 0;
        while dec.next_message().unwrap().is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn max_payload_accepted_and_one_more_refused() {
        let mut out = Vec::new();
        Message::new(MsgType::Write, 1, 0, vec![b'a'; PAYLOAD_MAX])
            .encode(&mut out)
            .unwrap();
        let mut dec = Decoder::new();
        dec.feed(&out);
        assert_eq!(
            dec.next_message().unwrap().unwrap().payload.len(),
            PAYLOAD_MAX
        );
        assert_eq!(
            Message::new(MsgType::Write, 1, 0, vec![b'a'; PAYLOAD_MAX + 1]).encode(&mut out),
            Err(WireError::PayloadTooLarge(PAYLOAD_MAX + 1))
        );
        let mut hdr = Vec::new();
        Header {
            ty: MsgType::Write,
            req_id: 0,
            tx_id: 0,
            len: PAYLOAD_MAX as u32 + 1,
        }
        .emit(&mut hdr);
        let mut dec = Decoder::new();
        dec.feed(&hdr);
        assert_eq!(
            dec.next_message(),
            Err(WireError::Oversize(PAYLOAD_MAX as u32 + 1, PAYLOAD_MAX))
        );
        // A client accepts oxenstored's larger socket replies.
        let mut big = Vec::new();
        Message::new(MsgType::Directory, 1, 0, vec![b'a'; 6300]).emit_unchecked(&mut big);
        let mut dec = Decoder::with_limit(CLIENT_REPLY_MAX);
        dec.feed(&big);
        assert_eq!(dec.next_message().unwrap().unwrap().payload.len(), 6300);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Request::parse(MsgType::Read, b"a\0b\0").is_err());
        assert!(Request::parse(MsgType::Write, b"no-nul").is_err());
        assert!(Request::parse(MsgType::Watch, b"only-path\0").is_err());
        assert!(Request::parse(MsgType::TransactionEnd, b"X\0").is_err());
        assert!(Request::parse(MsgType::GetDomainPath, b"-1\0").is_err());
        assert!(Request::parse(MsgType::SetPerms, b"/a\0").is_err());
        assert!(Request::parse(MsgType::Read, &[0xff, 0xfe, 0]).is_err());
        assert_eq!(Request::parse(MsgType::Unknown(99), b"x").unwrap(), None);
        assert_eq!(fuzz_one(&[0xff; 100]), 0);
    }

    #[test]
    fn watch_event_round_trip() {
        let ev = WatchEvent {
            path: "/local/domain/0/backend/vif/5/0/state".into(),
            token: "backend".into(),
        };
        assert_eq!(WatchEvent::parse(&ev.emit()), Some(ev));
        assert_eq!(WatchEvent::parse(b"only\0"), None);
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn decoder_never_panics(data in proptest::collection::vec(any::<u8>(), 0..9000)) {
                fuzz_one(&data);
            }

            #[test]
            fn frames_survive_any_chunking(
                payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 1..8),
                cut in 1usize..50,
            ) {
                let mut stream = Vec::new();
                for (i, p) in payloads.iter().enumerate() {
                    Message::new(MsgType::Write, i as u32, 3, p.clone()).encode(&mut stream).unwrap();
                }
                let mut dec = Decoder::new();
                let mut got = Vec::new();
                for chunk in stream.chunks(cut) {
                    dec.feed(chunk);
                    while let Some(m) = dec.next_message().unwrap() {
                        got.push(m.payload);
                    }
                }
                prop_assert_eq!(got, payloads);
            }
        }
    }
}
