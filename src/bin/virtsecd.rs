//! `virtsecd`: the virtsec service.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use virtsec::config::{self, Config, LogTarget};

/// virtsec service: follows every guest on this Xen host from XenStore.
#[derive(Parser, Debug)]
#[command(name = "virtsecd", version, about)]
struct Args {
    /// Configuration file (TOML). Default /etc/virtsec/virtsecd.toml; a missing default file
    /// means built-in defaults.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Override [xenstore] path: xenstored socket or /dev/xen/xenbus.
    #[arg(long, value_name = "PATH")]
    xenstore_socket: Option<PathBuf>,
    /// Override [control] socket.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Log to stderr instead of the configured target.
    #[arg(long)]
    stderr: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let msg = virtsec::logging::render_error(&e);
            log::error!("{msg}");
            eprintln!("virtsecd: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let (path, explicit) = match &args.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(config::DEFAULT_PATH), false),
    };
    let mut cfg = Config::load(&path, explicit).context("invalid configuration")?;
    if let Some(p) = args.xenstore_socket {
        cfg.xenstore.path = p;
    }
    if let Some(p) = args.control_socket {
        cfg.control.socket = p;
    }
    if args.check_config {
        println!("{}: configuration OK", path.display());
        return Ok(());
    }
    let target = if args.stderr {
        LogTarget::Stderr
    } else {
        cfg.log.target
    };
    virtsec::logging::init("virtsecd", target, cfg.log.level.into());
    let control = cfg.control.socket.clone();
    let daemon = virtsec::daemon::Daemon::new(cfg)
        .with_context(|| format!("cannot start (control socket {})", control.display()))?;
    daemon.run().context("service stopped on an error")?;
    Ok(())
}
