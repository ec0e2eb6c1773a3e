//! Errors of the XenStore client.

use std::io;
use std::path::PathBuf;

use super::wire::WireError;

/// What a XenStore operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum XsError {
    /// xenstored answered with an error; `errno` is its name (`ENOENT`, `EACCES`, ...).
    #[error("xenstored refused {op} {path:?}: {errno}")]
    Refused {
        op: &'static str,
        path: String,
        errno: String,
    },
    /// The endpoint could not be opened.
    #[error("cannot connect to xenstored at {path}: {source}. Check that xenstored runs (systemctl status xenstored) and that the path is right (xenstore.path in the config, or --xenstore-socket)")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The connection broke while a request was outstanding.
    #[error("connection to xenstored lost: {0}")]
    Io(#[from] io::Error),
    /// The peer broke the framing protocol.
    #[error("xenstored protocol violation: {0}")]
    Wire(#[from] WireError),
    /// A reply did not have the expected shape.
    #[error("unexpected reply to {op}: {why}")]
    BadReply { op: &'static str, why: String },
    /// No reply within the configured time.
    #[error("xenstored did not answer {op} within {ms} ms")]
    Timeout { op: &'static str, ms: u64 },
    /// A transaction still conflicted after every retry.
    #[error("transaction conflicted {0} times in a row (EAGAIN); giving up")]
    TooManyRetries(u32),
}

impl XsError {
    /// The errno name of a refusal, if this is one.
    pub fn errno(&self) -> Option<&str> {
        match self {
            XsError::Refused { errno, .. } => Some(errno),
            _ => None,
        }
    }

    pub fn is_errno(&self, name: &str) -> bool {
        self.errno() == Some(name)
    }

    /// Whether the connection itself is gone (as opposed to one request refused).
    pub fn is_connection_lost(&self) -> bool {
        matches!(
            self,
            XsError::Io(_) | XsError::Wire(_) | XsError::Connect { .. } | XsError::Timeout { .. }
        )
    }
}
