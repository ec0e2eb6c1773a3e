//! virtsec: a security service for Xen hosts.
//!
//! Data flows one way through the modules (see `docs/architecture.md`):
//!
//! ```text
//! xenstore → inventory → capture → decode → flow/stream → detect → policy → enforce → outputs
//! ```
//!
//! Present today: [`xenstore`] (wire protocol, clients), [`inventory`] (guests and vifs from
//! XenStore truth), [`daemon`] (the service's event loop), [`control`] (operator socket),
//! [`config`]; and the lab parts [`labxs`] (a XenStore server) and [`lab`] (a simulated host).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod capture;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod decode;
pub mod detect;
pub mod enforce;
pub mod flow;
pub mod inspect;
pub mod inventory;
pub mod lab;
pub mod labxs;
pub mod logging;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod privilege;
pub mod quarantine;
pub mod xenstore;
