//! `virtsec`: the operator CLI.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use virtsec::control::{self, ControlRequest};
use virtsec::lab::{self, LabOptions};
use virtsec::labxs::{Limits, Server, ServerConfig};

const DEFAULT_CONTROL: &str = "/run/virtsec/control.sock";

/// virtsec operator CLI.
#[derive(Parser, Debug)]
#[command(name = "virtsec", version, about)]
struct Cli {
    /// virtsecd's control socket.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_CONTROL)]
    control_socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Health of the running service: XenStore connection, watches, counts, warnings.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Every guest and vif the running service knows.
    Domains {
        #[arg(long)]
        json: bool,
        /// Keep running and print the inventory again each time it changes (with --json, one
        /// line per change); the service sends each change as it happens.
        #[arg(long)]
        follow: bool,
    },
    /// Alerts of the running service (live traffic), oldest first.
    Alerts {
        #[arg(long)]
        json: bool,
        /// Keep printing new alerts as they come.
        #[arg(long)]
        follow: bool,
    },
    /// Wait until virtsecd has a vif's policy in place (for hotplug scripts). Exits 0 when
    /// ready, 1 after the timeout or if the service does not answer.
    Attach {
        /// The vif's backend path (the hotplug script's XENBUS_PATH),
        /// /local/domain/<backend>/backend/vif/<domid>/<devid>.
        #[arg(
            long,
            value_name = "PATH",
            required_unless_present = "vm",
            conflicts_with = "vm"
        )]
        backend: Option<String>,
        /// Every vif of the VM with this UUID (for XAPI's vif-hotplug hook, which names the VM
        /// and not the vif).
        #[arg(long, value_name = "UUID")]
        vm: Option<String>,
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Run a simulated Xen host and show virtsec following it (no Xen needed).
    Lab {
        #[command(subcommand)]
        sub: Option<LabCmd>,
        /// Number of simulated guests (at least 3 in the default scenario).
        #[arg(long, default_value_t = 3)]
        guests: u32,
        /// "default" (namespaces, bridge, traffic, the whole service; root) or "xenstore"
        /// (the XenStore side only; no root needed).
        #[arg(long, default_value = "default")]
        scenario: String,
        /// Leave the simulated host running after the scenario (Ctrl-C or `lab down` ends it).
        #[arg(long)]
        keep: bool,
        /// Emit the timeline as JSON lines.
        #[arg(long)]
        json: bool,
        /// Directory for the lab's sockets and state (default /run/virtsec-lab as root).
        #[arg(long, value_name = "DIR")]
        run_dir: Option<PathBuf>,
        /// virtsecd binary (default: next to this one).
        #[arg(long, value_name = "PATH")]
        virtsecd: Option<PathBuf>,
    },
    /// Inspect pcap/pcapng files with Suricata-syntax rules; alerts as EVE JSON.
    Inspect {
        #[command(flatten)]
        detect: DetectArgs,
        /// Bytes of each stream direction inspected.
        #[arg(long, default_value_t = 1 << 20)]
        stream_depth: u64,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
        #[arg(value_name = "PCAP", required = true)]
        pcaps: Vec<PathBuf>,
    },
    /// Capture from a (vif) interface passively and inspect live; alerts as EVE JSON.
    Capture {
        /// Interface to capture from, e.g. vif5.0.
        #[arg(long, value_name = "IFACE")]
        iface: String,
        #[command(flatten)]
        detect: DetectArgs,
        /// Stop after this many seconds (default: until SIGINT/SIGTERM).
        #[arg(long, value_name = "SECONDS")]
        duration: Option<f64>,
        /// Create this file once capturing (for scripts and tests).
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
        /// How frames are read: queue (the socket's receive queue) or ring (TPACKET_V3), as
        /// `[inspect] capture`.
        #[arg(long, default_value = "queue")]
        capture: virtsec::capture::SourceKind,
    },
    /// Rule files.
    Rules {
        #[command(subcommand)]
        sub: RulesCmd,
    },
    /// Self-tests against this host's xenstored.
    Selftest {
        #[command(subcommand)]
        sub: SelftestCmd,
    },
    /// Quarantine a VM (by UUID, name or running domid): it stays quarantined across
    /// reboots and service restarts until released.
    Quarantine {
        /// UUID, name or domid.
        target: String,
        /// throttle, isolate, bridge, pause or detach.
        #[arg(long)]
        action: String,
        /// Why (kept in the audit record).
        #[arg(long)]
        reason: String,
    },
    /// Lift a VM's quarantine.
    Release {
        target: String,
        #[arg(long)]
        reason: String,
    },
    /// List quarantined VMs.
    Quarantined {
        #[arg(long)]
        json: bool,
    },
    /// Inline-mode kernel objects (the vif splices).
    Inline {
        #[command(subcommand)]
        sub: InlineCmd,
    },
}

#[derive(Subcommand, Debug)]
enum InlineCmd {
    /// Put every spliced vif back on its bridge. Run by the init system after virtsecd stops:
    /// with --config, acts only if that file says `[inspect.inline] fail = "open"`.
    Restore {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// List the vifs spliced out of their bridge for inline inspection.
    List,
}

#[derive(Subcommand, Debug)]
enum LabCmd {
    /// Stop a lab kept with --keep (or killed) and remove everything it created.
    Down {
        #[arg(long, value_name = "DIR")]
        run_dir: Option<PathBuf>,
    },
    /// Write a guest into a (lab) XenStore as libxl does for a PV guest with one vif, or
    /// remove it as libxl does on destroy.
    Guest {
        /// The XenStore socket (privileged).
        #[arg(long, value_name = "PATH")]
        xenstore_socket: PathBuf,
        #[command(subcommand)]
        sub: LabGuestCmd,
    },
    /// Run the lab XenStore server in the foreground.
    Xenstored {
        /// The privileged (dom0) socket.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// An unprivileged domain's socket, DOMID=PATH (repeatable).
        #[arg(long = "domain-socket", value_name = "DOMID=PATH")]
        domain_sockets: Vec<String>,
        /// Largest value in bytes.
        #[arg(long, default_value_t = Limits::default().entry_size)]
        entry_size: usize,
        /// Nodes an unprivileged domain may own.
        #[arg(long, default_value_t = Limits::default().nodes_per_domain)]
        nodes_per_domain: usize,
        /// Watches per unprivileged connection.
        #[arg(long, default_value_t = Limits::default().watches_per_conn)]
        watches_per_conn: usize,
        /// Open transactions per unprivileged connection.
        #[arg(long, default_value_t = Limits::default().transactions_per_conn)]
        transactions_per_conn: usize,
    },
}

#[derive(Subcommand, Debug)]
enum LabGuestCmd {
    Create {
        #[arg(long)]
        domid: u32,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "xenbr0")]
        bridge: String,
        /// The vif's MAC (default 00:16:3e:00:DD:00 from the domid).
        #[arg(long)]
        mac: Option<String>,
        /// The backend `ip` key (space-separated addresses).
        #[arg(long)]
        ip: Option<String>,
    },
    Destroy {
        #[arg(long)]
        domid: u32,
    },
}

/// Options shared by `inspect` and `capture`.
#[derive(clap::Args, Debug)]
struct DetectArgs {
    /// Rule file (repeatable).
    #[arg(long = "rules", value_name = "FILE", required = true)]
    rules: Vec<PathBuf>,
    /// Where alert lines go, EVE JSON ("-" for stdout; `capture` appends).
    #[arg(long, value_name = "PATH|-")]
    eve: Option<PathBuf>,
    /// Literal matcher: auto (Hyperscan if available), ac (aho-corasick) or hs.
    #[arg(long, default_value = "auto")]
    matcher: virtsec::detect::matcher::Backend,
}

impl DetectArgs {
    fn options(
        self,
        limits: virtsec::flow::FlowLimits,
        progress: bool,
    ) -> virtsec::inspect::InspectOptions {
        virtsec::inspect::InspectOptions {
            rules: self.rules,
            eve: self.eve,
            backend: self.matcher,
            limits,
            progress,
        }
    }
}

#[derive(Subcommand, Debug)]
enum RulesCmd {
    /// Parse rule files; list every skipped rule with its reason. Exits 1 if any was skipped.
    Check {
        #[arg(value_name = "FILE", required = true)]
        files: Vec<PathBuf>,
    },
    /// Make the running virtsecd reload its rule files (compiled off the packet path and
    /// swapped atomically; a failed load keeps the old rules and says why).
    Reload,
}

#[derive(Subcommand, Debug)]
enum SelftestCmd {
    /// Check that xenstored behaves as virtsec expects (scratch subtree, removed after).
    Xenstore {
        #[arg(long, value_name = "PATH", default_value = virtsec::xenstore::transport::DEFAULT_SOCKET)]
        xenstore_socket: PathBuf,
    },
}

/// The default lab needs `ip` (iproute2) and `nft` (nftables); on Debian they are installed
/// when missing.
fn lab_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = [("ip", "iproute2"), ("nft", "nftables")]
        .into_iter()
        .filter(|(bin, _)| std::process::Command::new(bin).arg("-V").output().is_err())
        .map(|(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("virtsec lab: installing {}", missing.join(" "));
    let install = || {
        std::process::Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    // A fresh machine may have no package lists yet.
    let ok = install()
        || (std::process::Command::new("apt-get")
            .args(["update", "-q"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
            && install());
    if !ok {
        bail!(
            "the lab needs {}: install them (apt-get install {})",
            missing.join(" and "),
            missing.join(" ")
        );
    }
    Ok(())
}

/// Who runs the CLI, for audit records: the sudo user if any, and the uid.
fn invoker() -> String {
    let uid = nix::unistd::getuid();
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "?".into());
    format!("{user} (uid {uid})")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("virtsec: {}", virtsec::logging::render_error(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Status { json } => {
            let s = control::call(&cli.control_socket, &ControlRequest::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Domains { json, follow } => {
            // Written with writeln! (println! panics when the reader went away, e.g. `| head`).
            let print = |d: &serde_json::Value| -> anyhow::Result<()> {
                use std::io::Write as _;
                let mut out = std::io::stdout().lock();
                match (json, follow) {
                    (true, false) => writeln!(out, "{}", serde_json::to_string_pretty(d)?)?,
                    (true, true) => writeln!(out, "{}", serde_json::to_string(d)?)?,
                    (false, false) => print_domains(&mut out, d)?,
                    (false, true) => {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default();
                        writeln!(
                            out,
                            "-- {}",
                            virtsec::inspect::eve::format_ts(now.as_micros() as u64)
                        )?;
                        print_domains(&mut out, d)?;
                    }
                }
                out.flush()?;
                Ok(())
            };
            if !follow {
                let d = control::call(
                    &cli.control_socket,
                    &ControlRequest::Domains { follow: false },
                )?;
                print(&d)?;
                return Ok(ExitCode::SUCCESS);
            }
            // The service pushes the inventory on each change; stdout closing (the reader
            // went away, `| head`) ends the loop without an error.
            let mut failed = None;
            control::follow(
                &cli.control_socket,
                &ControlRequest::Domains { follow: true },
                &mut |d| match print(&d) {
                    Ok(()) => true,
                    Err(e) => {
                        let gone = e
                            .downcast_ref::<std::io::Error>()
                            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe);
                        if !gone {
                            failed = Some(e);
                        }
                        false
                    }
                },
            )?;
            match failed {
                Some(e) => Err(e),
                None => Ok(ExitCode::SUCCESS),
            }
        }
        Cmd::Attach {
            backend,
            vm,
            timeout,
        } => {
            let wanted = match (&backend, &vm) {
                (Some(b), _) => Attach::Vif(parse_backend(b)?),
                (None, Some(u)) if virtsec::inventory::model::valid_uuid(u) => {
                    Attach::Vm(u.clone())
                }
                (None, Some(u)) => bail!("{u:?} is not a VM UUID"),
                (None, None) => bail!("--backend or --vm is required"),
            };
            let started = std::time::Instant::now();
            let deadline = started + Duration::from_secs_f64(timeout);
            let mut last;
            loop {
                match attach_ready(&cli.control_socket, &wanted) {
                    Ok(Ok(ready)) => {
                        // The hotplug script runs once netback created the netdev: this
                        // wait is what the vif's creation-to-policy time adds to the guest.
                        println!(
                            "{}: policy in place (waited {} ms)",
                            ready.join(", "),
                            started.elapsed().as_millis()
                        );
                        return Ok(ExitCode::SUCCESS);
                    }
                    Ok(Err(why)) => last = why,
                    Err(e) => last = e.to_string(),
                }
                if std::time::Instant::now() >= deadline {
                    eprintln!("virtsec attach: {wanted} not ready after {timeout} s: {last}");
                    return Ok(ExitCode::FAILURE);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Cmd::Quarantine {
            target,
            action,
            reason,
        } => {
            let r = control::call(
                &cli.control_socket,
                &ControlRequest::Quarantine {
                    target,
                    action,
                    reason,
                    who: invoker(),
                },
            )?;
            println!(
                "VM {} ({}) quarantined: {}",
                r["uuid"].as_str().unwrap_or("?"),
                r["name"].as_str().unwrap_or("?"),
                r["actions"]
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Release { target, reason } => {
            let r = control::call(
                &cli.control_socket,
                &ControlRequest::Release {
                    target,
                    reason,
                    who: invoker(),
                },
            )?;
            println!(
                "VM {} ({}) released",
                r["uuid"].as_str().unwrap_or("?"),
                r["name"].as_str().unwrap_or("?")
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Quarantined { json } => {
            let r = control::call(&cli.control_socket, &ControlRequest::Quarantined)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(ExitCode::SUCCESS);
            }
            let list = r["quarantined"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no VM is quarantined");
            }
            for q in list {
                println!(
                    "{}  {:<16} domid {:<5} {}  since {}  by {}: {}",
                    q["uuid"].as_str().unwrap_or("?"),
                    q["name"].as_str().unwrap_or("?"),
                    q["domid"]
                        .as_u64()
                        .map(|d| d.to_string())
                        .unwrap_or("-".into()),
                    q["actions"],
                    q["since"],
                    q["by"].as_str().unwrap_or("?"),
                    q["reason"].as_str().unwrap_or("")
                );
            }
            for c in r["corrupt"].as_array().into_iter().flatten() {
                println!("UNREADABLE STATE: {}", c.as_str().unwrap_or("?"));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Alerts { json, follow } => {
            let mut after = 0u64;
            loop {
                let r = control::call(&cli.control_socket, &ControlRequest::Alerts { after })?;
                for a in r["alerts"].as_array().into_iter().flatten() {
                    if json {
                        println!("{}", serde_json::to_string(a)?);
                    } else {
                        let x = &a["xen"];
                        println!(
                            "{} [{}:{}:{}] {} | domain {} ({}) {} | {} {}:{} -> {}:{}",
                            a["timestamp"].as_str().unwrap_or("?"),
                            a["alert"]["gid"],
                            a["alert"]["signature_id"],
                            a["alert"]["rev"],
                            a["alert"]["signature"].as_str().unwrap_or(""),
                            x["domid"],
                            x["name"].as_str().unwrap_or("?"),
                            x["vif"].as_str().unwrap_or("?"),
                            a["proto"].as_str().unwrap_or("?"),
                            a["src_ip"].as_str().unwrap_or("?"),
                            a["src_port"],
                            a["dest_ip"].as_str().unwrap_or("?"),
                            a["dest_port"]
                        );
                    }
                }
                use std::io::Write as _;
                std::io::stdout().flush()?;
                after = r["total"].as_u64().unwrap_or(after);
                if !follow {
                    return Ok(ExitCode::SUCCESS);
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        Cmd::Lab {
            sub:
                Some(LabCmd::Xenstored {
                    socket,
                    domain_sockets,
                    entry_size,
                    nodes_per_domain,
                    watches_per_conn,
                    transactions_per_conn,
                }),
            ..
        } => {
            let mut doms = Vec::new();
            for spec in domain_sockets {
                let (d, p) = spec
                    .split_once('=')
                    .with_context(|| format!("--domain-socket {spec:?}: expected DOMID=PATH"))?;
                let d: u32 = d
                    .parse()
                    .with_context(|| format!("--domain-socket {spec:?}: {d:?} is not a domid"))?;
                if d == 0 {
                    bail!("--domain-socket {spec:?}: domain 0 is the privileged --socket");
                }
                doms.push((d, PathBuf::from(p)));
            }
            let cfg = ServerConfig {
                socket,
                domain_sockets: doms,
                limits: Limits {
                    entry_size,
                    nodes_per_domain,
                    watches_per_conn,
                    transactions_per_conn,
                    ..Limits::default()
                },
            };
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, stop.clone())?;
            }
            let server = Server::bind(&cfg)?;
            eprintln!(
                "virtsec lab xenstored: serving {} ({} domain socket(s))",
                cfg.socket.display(),
                cfg.domain_sockets.len()
            );
            server.run(&stop)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Lab {
            sub:
                Some(LabCmd::Guest {
                    xenstore_socket,
                    sub,
                }),
            ..
        } => {
            use virtsec::lab::toolstack::{GuestSpec, Toolstack};
            let xs = virtsec::xenstore::Client::open(&xenstore_socket).with_context(|| {
                format!("cannot reach XenStore at {}", xenstore_socket.display())
            })?;
            let mut ts = Toolstack::new(xs);
            ts.init_host()?;
            match sub {
                LabGuestCmd::Create {
                    domid,
                    name,
                    bridge,
                    mac,
                    ip,
                } => {
                    let mut g = GuestSpec::simple(domid, &name, &bridge);
                    if let Some(m) = mac {
                        g.vifs[0].mac = m;
                    }
                    g.vifs[0].ip = ip;
                    ts.create(&g, None)?;
                    println!("domain {domid} ({name}) created, vif{domid}.0 on {bridge}");
                }
                LabGuestCmd::Destroy { domid } => {
                    ts.destroy(domid)?;
                    println!("domain {domid} destroyed");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Lab {
            sub: Some(LabCmd::Down { run_dir }),
            ..
        } => {
            let dir = run_dir.unwrap_or_else(lab::default_run_dir);
            let done = lab::scenario::down(&dir);
            if done.is_empty() {
                println!("no lab to remove");
            }
            for d in done {
                println!("{d}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Lab {
            sub: None,
            guests,
            scenario,
            keep,
            json,
            run_dir,
            virtsecd,
        } => {
            let virtsecd = match virtsecd {
                Some(p) => p,
                None => std::env::current_exe()?
                    .parent()
                    .context("cannot locate this binary's directory")?
                    .join("virtsecd"),
            };
            let opts = LabOptions {
                guests: guests.max(1),
                run_dir: run_dir.unwrap_or_else(lab::default_run_dir),
                json,
                virtsecd,
                step_timeout: Duration::from_secs(2),
                keep,
            };
            let started = std::time::Instant::now();
            let records = match scenario.as_str() {
                "default" => {
                    if !nix::unistd::geteuid().is_root() {
                        bail!("the default lab builds network namespaces, a bridge and nftables rules: run it as root (sudo), or use --scenario xenstore for the XenStore-only timeline");
                    }
                    lab_packages()?;
                    lab::scenario::run(&opts)?
                }
                "xenstore" => lab::run_xenstore(&opts)?,
                other => bail!("unknown scenario {other:?}: expected default or xenstore"),
            };
            let failed = records.iter().filter(|r| !r.ok).count();
            if !json {
                println!("lab ran {:.1} s", started.elapsed().as_secs_f64());
                println!("{} passed, {} failed", records.len() - failed, failed);
            }
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Inspect {
            detect,
            stream_depth,
            json,
            pcaps,
        } => {
            let mut limits = virtsec::flow::FlowLimits::default();
            limits.stream.depth = stream_depth;
            let to_stdout = detect.eve.as_deref().is_some_and(|p| p.as_os_str() == "-");
            let opts = detect.options(limits, true);
            let s = virtsec::inspect::run(&opts, &pcaps, &mut |w| eprintln!("warning: {w}"))?;
            let text = if json {
                serde_json::to_string_pretty(&s)?
            } else {
                format!(
                    "{} packets, {:.1} MB, {} flows, {} alerts\n{} rules loaded, {} skipped ({} literals, {} matcher, loaded in {:.3} s)\ninspected in {:.3} s: {:.2} Gb/s",
                    s.packets,
                    s.bytes as f64 / 1e6,
                    s.flows,
                    s.alerts,
                    s.rules_loaded,
                    s.rules_skipped,
                    s.literals,
                    s.matcher,
                    s.rule_load_s,
                    s.inspect_s,
                    s.gbit_per_s
                )
            };
            if to_stdout {
                eprintln!("{text}");
            } else {
                println!("{text}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Capture {
            iface,
            detect,
            duration,
            ready_file,
            capture,
        } => {
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, stop.clone())?;
            }
            let opts = detect.options(virtsec::flow::FlowLimits::default(), false);
            let mut ready = || {
                eprintln!("virtsec capture: capturing on {iface}");
                if let Some(f) = &ready_file {
                    let _ = std::fs::write(f, b"ready\n");
                }
            };
            let s = virtsec::inspect::live(
                &iface,
                capture,
                &opts,
                duration.map(Duration::from_secs_f64),
                &stop,
                &mut ready,
                &mut |w| eprintln!("warning: {w}"),
            )?;
            eprintln!("{}", serde_json::to_string(&s)?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rules {
            sub: RulesCmd::Reload,
        } => {
            let r = control::call(&cli.control_socket, &ControlRequest::ReloadRules)?;
            println!("rules reloaded: {}", r["summary"].as_str().unwrap_or("?"));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Rules {
            sub: RulesCmd::Check { files },
        } => {
            let rs = virtsec::inspect::load_rules(&files)?;
            for w in &rs.skipped {
                println!("{w}");
            }
            println!("{}", rs.summary());
            Ok(if rs.skipped.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Inline {
            sub: InlineCmd::List,
        } => {
            for v in virtsec::capture::inline::spliced() {
                println!("{v}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Inline {
            sub: InlineCmd::Restore { config },
        } => {
            if let Some(path) = config {
                let cfg = virtsec::config::Config::load(&path, true)?;
                if cfg.inspect.inline.fail != virtsec::config::FailMode::Open {
                    println!(
                        "fail = \"closed\" in {}: spliced vifs stay cut off until virtsecd is back",
                        path.display()
                    );
                    return Ok(ExitCode::SUCCESS);
                }
            }
            let mut failed = false;
            for v in virtsec::capture::inline::spliced() {
                match virtsec::capture::inline::restore(&v) {
                    Ok(_) => println!("{v}: back on its bridge"),
                    Err(e) => {
                        failed = true;
                        eprintln!("virtsec: {v}: {e}");
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::Selftest {
            sub: SelftestCmd::Xenstore { xenstore_socket },
        } => {
            let results = virtsec::xenstore::conformance::run(&xenstore_socket)?;
            let mut failed = 0;
            for r in &results {
                match &r.outcome {
                    Ok(()) => println!("ok   {}", r.name),
                    Err(why) => {
                        failed += 1;
                        println!("FAIL {}: {why}", r.name);
                    }
                }
            }
            println!("{} passed, {} failed", results.len() - failed, failed);
            Ok(if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn print_status(s: &serde_json::Value) {
    let xs = &s["xenstore"];
    println!(
        "virtsecd {} (pid {}), up {:.0} s",
        s["version"].as_str().unwrap_or("?"),
        s["pid"],
        s["uptime_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "xenstore: {} at {} (domain {}), {} watches, {} reconcile passes{}",
        if xs["connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "DISCONNECTED"
        },
        xs["path"].as_str().unwrap_or("?"),
        xs["self_domid"],
        xs["watches"].as_array().map(Vec::len).unwrap_or(0),
        xs["reconciles"],
        if xs["in_sync"].as_bool() == Some(true) {
            ", in sync"
        } else {
            ""
        }
    );
    if let Some(err) = xs["last_error"].as_str() {
        println!("last xenstore error: {err}");
    }
    println!("inventory: {} guests, {} vifs", s["guests"], s["vifs"]);
    let w = &s["warnings"];
    println!(
        "warnings: {} untrusted frontend writes, {} frontend mismatches, {} invalid values, {} watch failures",
        w["untrusted_frontend_writes"], w["frontend_mismatches"], w["invalid_values"], w["watch_failures"]
    );
    for d in w["denied"].as_array().into_iter().flatten() {
        println!("  denied: {}", d.as_str().unwrap_or("?"));
    }
    let cf = &s["capture_filter"];
    if !cf.is_null() {
        if cf["loaded"].as_bool() == Some(true) {
            println!(
                "capture filter: loaded, {} directions handed to the kernel, {} given back, {} not handed over (map full)",
                cf["bypassed"], cf["restored"], cf["map_full"]
            );
        } else {
            println!(
                "capture filter: NOT LOADED ({}); passive capture copies whole frames",
                cf["error"].as_str().unwrap_or("?")
            );
        }
    }
    let Some(vifs) = s["inspection"].as_object().filter(|v| !v.is_empty()) else {
        return;
    };
    println!(
        "{:<12} {:>5} {:<8} {:<8} {:>12} {:>10} {:>12} {:>8} {:>9} {:>8} {:>8} {:>7}  per worker",
        "VIF",
        "DOMID",
        "MODE",
        "ATTACHED",
        "FRAMES",
        "TRIMMED",
        "UNCOPIED",
        "LOST",
        "FLOWS",
        "EVICTED",
        "REFUSED",
        "ALERTS"
    );
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    for (name, v) in vifs {
        let workers: Vec<String> = v["workers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|w| n(w).to_string())
            .collect();
        println!(
            "{:<12} {:>5} {:<8} {:<8} {:>12} {:>10} {:>12} {:>8} {:>9} {:>8} {:>8} {:>7}  {}",
            name,
            n(&v["domid"]),
            v["mode"].as_str().unwrap_or("?"),
            if v["attached"].as_bool() == Some(true) {
                "yes"
            } else {
                "NO"
            },
            n(&v["frames"]),
            n(&v["trimmed"]),
            n(&v["uncopied"]),
            n(&v["lost"]),
            n(&v["flows"]),
            n(&v["flows_evicted"]),
            n(&v["flows_refused"]),
            n(&v["alerts"]),
            workers.join("/")
        );
    }
    // Per inline vif: whether the kernel fast path is on, and how long its frames waited
    // for their verdict (the latency inline adds on top of forwarding, per crossing).
    let (mut fast, mut waits, mut pinned) = (Vec::new(), Vec::new(), Vec::new());
    for (name, v) in vifs.iter().filter(|(_, v)| v["inline"].is_object()) {
        // `placement`: the workers pinned beside their guest's frames or netback interrupt.
        let cpus: Vec<String> = v["inline"]["worker_cpus"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
            .filter_map(|(i, c)| c.as_u64().map(|c| format!("worker {i} on CPU {c}")))
            .collect();
        if !cpus.is_empty() {
            pinned.push(format!("{name} {}", cpus.join(", ")));
        }
        let on = v["inline"]["fast_path"].as_bool() == Some(true);
        fast.push(format!("{name} {}", if on { "on" } else { "OFF" }));
        let w = &v["inline"]["verdict_wait_us"];
        let us = |k: &str| w[k].as_f64().map_or("-".to_string(), |x| format!("{x:.0}"));
        waits.push(format!(
            "{name} p50 {} µs, p99 {} µs ({} frames)",
            us("p50"),
            us("p99"),
            n(&w["frames"])
        ));
    }
    if !fast.is_empty() {
        // OFF: every frame crosses the worker (Linux < 6.6 or no capture filter; the log says).
        println!("inline kernel fast path: {}", fast.join(", "));
        println!("inline verdict wait: {}", waits.join("; "));
    }
    if !pinned.is_empty() {
        println!("inline workers pinned: {}", pinned.join("; "));
    }
}

/// What `virtsec attach` waits for.
enum Attach {
    /// One vif: (domid, devid).
    Vif((u32, u32)),
    /// Every vif of a VM, by UUID.
    Vm(String),
}

impl std::fmt::Display for Attach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attach::Vif((domid, devid)) => write!(f, "vif {domid}/{devid}"),
            Attach::Vm(uuid) => write!(f, "VM {uuid}"),
        }
    }
}

/// (domid, devid) from a vif backend path, `/local/domain/<b>/backend/vif/<domid>/<devid>`.
fn parse_backend(backend: &str) -> anyhow::Result<(u32, u32)> {
    let parts: Vec<&str> = backend.trim_end_matches('/').rsplit('/').take(3).collect();
    match parts.as_slice() {
        [devid, domid, "vif"] => Ok((
            domid
                .parse::<u32>()
                .with_context(|| format!("{backend}: bad domid"))?,
            devid
                .parse::<u32>()
                .with_context(|| format!("{backend}: bad devid"))?,
        )),
        _ => bail!(
            "{backend} is not a vif backend path (/local/domain/<b>/backend/vif/<domid>/<devid>)"
        ),
    }
}

/// One look: `Ok(names)` of the vifs in place when all are, `Err(why not)` otherwise.
fn attach_ready(
    socket: &std::path::Path,
    wanted: &Attach,
) -> anyhow::Result<Result<Vec<String>, String>> {
    let vifs: Vec<(u32, u32)> = match wanted {
        Attach::Vif(v) => vec![*v],
        Attach::Vm(uuid) => {
            let d = control::call(socket, &ControlRequest::Domains { follow: false })?;
            let guest = d
                .as_array()
                .into_iter()
                .flatten()
                .find(|g| g["uuid"].as_str() == Some(uuid.as_str()));
            let Some(g) = guest else {
                return Ok(Err("not in virtsecd's inventory yet".into()));
            };
            let domid = g["domid"].as_u64().unwrap_or(0) as u32;
            let devids: Vec<(u32, u32)> = g["vifs"]
                .as_object()
                .into_iter()
                .flat_map(|m| m.values())
                .filter_map(|v| v["devid"].as_u64())
                .map(|devid| (domid, devid as u32))
                .collect();
            if devids.is_empty() {
                return Ok(Err(format!("domain {domid} has no vif yet")));
            }
            devids
        }
    };
    let mut ready = Vec::new();
    for (domid, devid) in vifs {
        let r = control::call(socket, &ControlRequest::VifReady { domid, devid })?;
        if r["ready"] != true {
            return Ok(Err(format!("vif {domid}/{devid}: {r}")));
        }
        ready.push(format!(
            "vif {domid}/{devid} ({})",
            r["ifname"].as_str().unwrap_or("?")
        ));
    }
    Ok(Ok(ready))
}

fn print_domains(out: &mut dyn std::io::Write, d: &serde_json::Value) -> std::io::Result<()> {
    writeln!(
        out,
        "{:>5}  {:<20} {:<36}  {:<12} {:<17} {:<10} {:<11} hotplug",
        "DOMID", "NAME", "UUID", "VIF", "MAC", "BRIDGE", "STATE"
    )?;
    for g in d.as_array().into_iter().flatten() {
        let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
        let vifs = g["vifs"].as_object();
        if vifs.map(|v| v.is_empty()).unwrap_or(true) {
            writeln!(
                out,
                "{:>5}  {:<20} {:<36}  -",
                g["domid"],
                s(&g["name"]),
                s(&g["uuid"])
            )?;
            continue;
        }
        for v in vifs.into_iter().flat_map(|m| m.values()) {
            writeln!(
                out,
                "{:>5}  {:<20} {:<36}  {:<12} {:<17} {:<10} {:<11} {}",
                g["domid"],
                s(&g["name"]),
                s(&g["uuid"]),
                s(&v["ifname"]),
                s(&v["mac"]),
                s(&v["bridge"]),
                s(&v["state"]),
                s(&v["hotplug_status"])
            )?;
        }
    }
    Ok(())
}
