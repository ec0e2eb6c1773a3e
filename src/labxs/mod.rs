//! The lab XenStore server: xenstored's protocol and semantics for tests and the lab.
//!
//! It is a test and lab part: the service never depends on it. It exists because the real
//! xenstored (C or OCaml) cannot run without a hypervisor (`docs/xenstore.md`). Debian's C
//! clients (`xenstore-read`, `-write`, `-ls`, `-rm`, `-chmod`, `-watch`, ...) work against it
//! unmodified through `XENSTORED_PATH`, and the conformance suite
//! ([`crate::xenstore::conformance`]) runs against both it and the real daemon.

pub mod server;
pub mod store;

pub use server::{LabServerError, LabServerHandle, Server, ServerConfig};
pub use store::{Caller, Limits, Tree};
