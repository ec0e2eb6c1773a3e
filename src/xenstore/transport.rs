//! The byte stream to xenstored: the Unix socket of dom0 (`/run/xenstored/socket`) or the
//! xenbus device any domain has (`/dev/xen/xenbus`). Both carry the same framed protocol; the
//! device must get each message in a single `write`, which [`Stream::write_all`] callers
//! guarantee by writing whole encoded frames.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::error::XsError;

/// Default dom0 socket.
pub const DEFAULT_SOCKET: &str = "/run/xenstored/socket";
/// Device every domain (driver domains too) can use.
pub const XENBUS_DEVICE: &str = "/dev/xen/xenbus";

/// An open connection to xenstored.
#[derive(Debug)]
pub enum Stream {
    Unix(UnixStream),
    Device(File),
}

impl Stream {
    /// Opens `path`: a character device is opened as the xenbus device, anything else is
    /// connected to as a Unix socket.
    pub fn open(path: &Path, nonblocking: bool) -> Result<Stream, XsError> {
        let connect_err = |source| XsError::Connect {
            path: path.to_owned(),
            source,
        };
        let is_dev = std::fs::metadata(path)
            .map(|m| m.file_type().is_char_device())
            .unwrap_or(false);
        if is_dev {
            let mut opts = OpenOptions::new();
            opts.read(true).write(true);
            if nonblocking {
                opts.custom_flags(nix::libc::O_NONBLOCK);
            }
            let f = opts.open(path).map_err(connect_err)?;
            Ok(Stream::Device(f))
        } else {
            let s = UnixStream::connect(path).map_err(connect_err)?;
            s.set_nonblocking(nonblocking).map_err(connect_err)?;
            Ok(Stream::Unix(s))
        }
    }

    /// Waits until the stream is readable or `deadline` passes. Returns false on timeout.
    pub fn wait_readable(&self, deadline: Instant) -> io::Result<bool> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(0) if Instant::now() >= deadline => return Ok(false),
                Ok(0) => continue,
                Ok(_) => return Ok(true),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Device(f) => f.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Device(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Device(f) => f.as_raw_fd(),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Device(f) => f.as_fd(),
        }
    }
}
