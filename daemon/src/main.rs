//! The `metroblk` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use metroblk::config::NodeConfig;
use metroblk::{control, node};

/// metroblk: a synchronous block-device mirror across two sites.
///
/// Every write to the mirrored device completes only when both nodes have it.
#[derive(Parser)]
#[command(name = "metroblk", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run or inspect this node's daemon.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Show the role, disk state, link state and counters of every volume of a running node.
    Status {
        /// The node's config file (its control socket is read from it).
        #[arg(long, short, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The node's control socket, if no config is given.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the state of every volume of a running node, then one line per change (role,
    /// link, disk, sync, fence, resync progress, alerts, verify results) until interrupted.
    /// Runs the node's `on_event` hook per change.
    Events {
        /// The node's config file (its control socket and hook are read from it).
        #[arg(long, short)]
        config: PathBuf,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Initialise the metadata file (superblock and dirty bitmap) of a volume on this node.
    /// Refuses to overwrite an existing one unless --force.
    CreateMd {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The volume's name in that config.
        volume: String,
        /// Overwrite an existing metadata file (what it recorded is lost; resync in full).
        #[arg(long)]
        force: bool,
    },
    /// Resync a volume: copy the regions marked dirty from the primary to the secondary.
    /// A resync also starts by itself whenever the peer returns; this command starts one now,
    /// changes its rate, or resolves a split brain.
    Resync {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The volume's name in that config.
        volume: String,
        /// Copy every region, not only the dirty ones.
        #[arg(long)]
        full: bool,
        /// Send a region only when the peer's hash of it differs (saves the link when most
        /// marked regions are in fact equal).
        #[arg(long)]
        checksum: bool,
        /// Drop this node's changes (after a split brain): it becomes the sync target, and the
        /// regions either side changed are copied from the peer.
        #[arg(long)]
        discard_local: bool,
        /// Limit the resync to this many bytes of data per second (e.g. 100MiB; 0: unlimited).
        /// Ranges that read as zeros go with no payload and are not counted.
        #[arg(long)]
        rate: Option<String>,
        /// Wait until the copies are in sync, showing the progress.
        #[arg(long)]
        wait: bool,
    },
    /// Compare every region of a volume with the peer's, online (SHA-256 per region), print
    /// how many differ, and mark those out of sync so a resync repairs them. Run on the primary.
    Verify {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The volume's name in that config.
        volume: String,
    },
    /// Take a volume's disk back after it failed and was repaired or replaced: the node's copy
    /// is marked inconsistent and resynced in full from the peer when the node next runs (as
    /// the secondary). Run while the node is stopped.
    Attach {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The volume's name in that config.
        volume: String,
    },
    /// Let a primary that lost its peer go on alone: held writes complete locally and their
    /// regions are resynced when the peer returns (the peer is recorded outdated). Only when
    /// you know the peer is down, not just cut off: otherwise both sides may write (split
    /// brain).
    ResumeAlone {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The volume's name in that config.
        volume: String,
    },
    /// Planned switchover: the primary drains its I/O and hands its role to the peer through
    /// the witness; the peer then serves the volume and this node becomes secondary. Run on the
    /// primary, with the peer connected and in sync. Quiesce the application first (its device
    /// moves to the other node; I/O that arrives during the switch fails).
    Switchover {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The volume's name in that config.
        volume: String,
    },
    /// Make this node the primary of a volume that has no witness (the disaster-recovery
    /// runbook: the other site is gone). Refused while the primary is connected; a copy that
    /// is not up to date needs --force. Epoch + 1 and a new generation: the old primary's
    /// writes are refused here, and a later reconnect resyncs (or reports a split brain).
    Promote {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The volume's name in that config.
        volume: String,
        /// Promote even a copy that is outdated or inconsistent: it becomes the data.
        #[arg(long)]
        force: bool,
    },
    /// Make this node a secondary of a volume that has no witness: its device is deleted and
    /// it receives the peer's writes once the peer is primary. Refused while writes wait for
    /// the peer; needs --force when the peer is not connected and in sync or the device is in
    /// use (mounted).
    Demote {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The volume's name in that config.
        volume: String,
        /// Demote even though the peer lacks this node's latest writes, or the device is mounted.
        #[arg(long)]
        force: bool,
    },
    /// Start a primary and a secondary on loopback with a mirrored /dev/ublkb0 and show it
    /// working. On a kernel without ublk_drv it runs inside a QEMU VM (from a source checkout).
    Demo {
        /// Where the demo keeps its configs, logs and backing files.
        #[arg(long, default_value = "/tmp/metroblk-demo")]
        dir: PathBuf,
        /// Run the showcase (mkfs, mount, write, compare both copies) and exit, instead of
        /// waiting for Ctrl-C.
        #[arg(long)]
        scripted: bool,
        /// Use the VM even if this kernel has ublk_drv.
        #[arg(long)]
        vm: bool,
        /// Also export the volume over iSCSI (LIO, service address 192.0.2.100 on lo) and log
        /// this machine's open-iscsi in to it; with --scripted, instead of the filesystem
        /// showcase, a host writes through the export across a planned switchover to site B.
        /// Needs open-iscsi.
        #[arg(long)]
        export: bool,
    },
    /// Write the man pages or the shell completions (for packaging).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
    /// Run or manage a witness: the third site that decides which node may serve a volume
    /// when the nodes lose each other.
    Witness {
        #[command(subcommand)]
        cmd: metroblk_witness::cli::WitnessCommand,
    },
}

#[derive(Subcommand)]
enum Generate {
    /// One roff man page per command and subcommand (metroblk.1, metroblk-node-run.1, ...).
    Man { dir: PathBuf },
    /// Completions for bash (metroblk.bash), zsh (_metroblk) and fish (metroblk.fish).
    Completions { dir: PathBuf },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Run the node in the foreground with the given config (logs go to stderr; set
    /// METROBLK_LOG=debug for more).
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Check a config file and print what it configures, without starting anything.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn generate(what: Generate) -> Result<(), String> {
    use clap::CommandFactory;
    let (Generate::Man { dir } | Generate::Completions { dir }) = &what;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let fail = |e: std::io::Error| format!("{}: {e}", dir.display());
    let mut cmd = Cli::command();
    match what {
        Generate::Man { .. } => clap_mangen::generate_to(cmd, dir).map_err(fail),
        Generate::Completions { .. } => {
            use clap_complete::Shell;
            for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                clap_complete::generate_to(shell, &mut cmd, "metroblk", dir).map_err(fail)?;
            }
            Ok(())
        }
    }
}

fn init_logging() {
    // libublk logs every device and queue set-up at info; keep its warnings and errors.
    let filter = tracing_subscriber::EnvFilter::try_from_env("METROBLK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libublk=warn"));
    // Colour only on a terminal: logs redirected to a file stay greppable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("metroblk: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Node { command: NodeCommand::Run { config } } => {
            init_logging();
            let cfg = NodeConfig::load(&config).map_err(|e| e.to_string())?;
            node::run(cfg)
        }
        Command::Node { command: NodeCommand::Check { config } } => {
            let cfg = NodeConfig::load(&config).map_err(|e| e.to_string())?;
            println!("node {} (control socket {})", cfg.name, cfg.control_socket.display());
            for v in &cfg.volumes {
                let peer = match &v.peer {
                    Some(p) => format!("peer {} at {}", p.name, p.address),
                    None => "standalone (no peer)".to_string(),
                };
                println!("  volume {} {} bytes, {} on {}, {peer}", v.name, v.size, v.role, v.backing_file.display());
            }
            Ok(())
        }
        Command::Events { config, json } => metroblk::events::run(&config, json),
        Command::Generate { what } => generate(what),
        Command::CreateMd { config, volume, force } => {
            println!("{}", metroblk::metadata::create_md_command(&config, &volume, force)?);
            Ok(())
        }
        Command::Attach { config, volume } => {
            println!("{}", metroblk::metadata::attach_command(&config, &volume)?);
            Ok(())
        }
        Command::Verify { config, volume } => metroblk::resync::command::verify(&config, &volume).map(|_| ()),
        Command::Resync { config, volume, full, checksum, discard_local, rate, wait } => {
            let rate = match rate {
                Some(r) => Some(metroblk::config::parse_size(&r).map_err(|e| format!("--rate: {e}"))?),
                None => None,
            };
            let args = metroblk::resync::command::ResyncArgs { full, checksum, discard_local, rate, wait };
            metroblk::resync::command::resync(&config, &volume, &args)
        }
        Command::Switchover { config, volume } => {
            println!("{}", metroblk::resync::command::switchover(&config, &volume)?);
            Ok(())
        }
        Command::Promote { config, volume, force } => {
            println!("{}", metroblk::resync::command::change_role(&config, &volume, true, force)?);
            Ok(())
        }
        Command::Demote { config, volume, force } => {
            println!("{}", metroblk::resync::command::change_role(&config, &volume, false, force)?);
            Ok(())
        }
        Command::ResumeAlone { config, volume } => {
            println!("{}", metroblk::resync::command::resume_alone(&config, &volume)?);
            Ok(())
        }
        Command::Demo { dir, scripted, vm, export } => {
            metroblk::demo::run(metroblk::demo::DemoOptions { dir, scripted, force_vm: vm, export })
        }
        Command::Witness { cmd } => {
            if matches!(cmd, metroblk_witness::cli::WitnessCommand::Run { .. }) {
                init_logging();
            }
            metroblk_witness::cli::run_command(cmd)
        }
        Command::Status { config, socket, json } => {
            let path = match (config, socket) {
                // Status talks to the local control socket only: it needs no authkey.
                (Some(c), _) => {
                    NodeConfig::load_with(&c, metroblk::config::Keys::Skip).map_err(|e| e.to_string())?.control_socket
                }
                (None, Some(s)) => s,
                (None, None) => return Err("status needs --config FILE or --socket PATH".into()),
            };
            let s = control::query_status(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?);
            } else {
                print!("{}", control::render(&s));
            }
            Ok(())
        }
    }
}
