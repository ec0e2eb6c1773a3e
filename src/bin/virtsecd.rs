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
    /// Run in the background (SysV init): the parent exits 0 once the service is ready, 1 if
    /// it is not within --ready-timeout seconds.
    #[arg(long)]
    daemonize: bool,
    /// Write the service's pid here.
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,
    #[arg(long, default_value_t = 30)]
    ready_timeout: u64,
}

/// Forks; the parent waits for the child's readiness byte and exits with its verdict.
fn daemonize(timeout_s: u64) -> anyhow::Result<()> {
    use nix::unistd::{fork, pipe, setsid, ForkResult};
    let (r, w) = pipe().context("pipe")?;
    // SAFETY: called before any thread is started (nothing else runs in this process yet).
    match unsafe { fork() }.context("fork")? {
        ForkResult::Parent { .. } => {
            drop(w);
            let mut pfd = [nix::poll::PollFd::new(
                std::os::fd::AsFd::as_fd(&r),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = (timeout_s * 1000).min(i32::MAX as u64) as i32;
            let ready = nix::poll::poll(
                &mut pfd,
                nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX),
            )
            .map(|n| n > 0)
            .unwrap_or(false)
                && {
                    let mut b = [0u8; 1];
                    matches!(
                        nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&r), &mut b),
                        Ok(1)
                    )
                };
            std::process::exit(if ready { 0 } else { 1 });
        }
        ForkResult::Child => {
            drop(r);
            let _ = setsid();
            virtsec::notify::set_ready_pipe(w);
            Ok(())
        }
    }
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
    if args.daemonize {
        daemonize(args.ready_timeout)?;
    }
    if let Some(p) = &args.pidfile {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write the pid file {}", p.display()))?;
    }
    let target = if args.stderr {
        LogTarget::Stderr
    } else {
        cfg.log.target
    };
    virtsec::logging::init_with(
        "virtsecd",
        target,
        cfg.log.level.into(),
        cfg.log.syslog_format == config::SyslogFormat::Rfc5424,
    );
    let control = cfg.control.socket.clone();
    let nice = cfg.inspect.nice;
    let daemon = virtsec::daemon::Daemon::new(cfg)
        .with_context(|| format!("cannot start (control socket {})", control.display()))?;
    // Before the drop (below 0 needs CAP_SYS_NICE); the threads started later inherit it.
    if nice != 0 {
        match virtsec::privilege::set_nice(nice) {
            Ok(()) => log::info!("nice {nice}: inspection runs before ordinary work"),
            Err(e) => log::warn!(
                "cannot set nice {nice} ({e}); inspection runs at the default priority and may lose frames when CPUs are busy"
            ),
        }
    }
    // Setup is done (sockets bound, state loaded): keep only what the running service uses.
    // Threads started from here on (the data-plane workers) inherit the reduced sets.
    match virtsec::privilege::drop_to_service_set() {
        Ok(kept) => log::info!("capabilities kept: {kept:?}"),
        Err(e) => log::warn!("{e}; continuing with the capabilities the process has"),
    }
    daemon.run().context("service stopped on an error")?;
    Ok(())
}
