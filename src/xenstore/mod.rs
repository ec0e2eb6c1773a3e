//! XenStore: the wire protocol, a blocking client, and a non-blocking engine for the service.
//!
//! # Why not the `xenstore-rs` crate
//!
//! The design card names `xenstore-rs`. Its 0.8 release was evaluated and not used (details in
//! `docs/xenstore.md`): its blocking client has no watch support and rejects a reply of another
//! type, so a watch event arriving between a request and its reply breaks it; its watch
//! support lives in a tokio client, while the service runs one mio loop; its frame reader is a
//! blocking `read_from(impl Read)`, unusable for incremental non-blocking decoding; and it is
//! GPL-3.0-only, which would bind the whole service. The protocol is small (16-byte header,
//! NUL-separated strings), so this module implements it directly and is tested against
//! Debian's C clients (through our lab server) and the real xenstored (tests/xen-e2e).
//!
//! # Layout
//! - [`wire`]: header, frames, the stream [`wire::Decoder`], request `parse`/`emit`.
//! - [`perms`]: permission entries and xenstored's access rule.
//! - [`client`]: blocking client (CLI, lab toolstack, tests), transactions with EAGAIN retry.
//! - [`engine`]: pipelined non-blocking connection driven by the daemon's mio loop.
//! - [`conformance`]: checks run against any xenstored (ours or the real one).

pub mod client;
pub mod conformance;
pub mod engine;
pub mod error;
pub mod path;
pub mod perms;
pub mod transport;
pub mod wire;

pub use client::Client;
pub use engine::{Completion, Engine};
pub use error::XsError;
pub use perms::{Access, Perm};
pub use wire::{Request, WatchEvent};
