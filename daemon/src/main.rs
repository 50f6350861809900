//! The `metroblk` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use metroblk::config::NodeConfig;
use metroblk::{control, metadata, node};

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
    /// Initialise a volume's metadata file (superblock and an empty bitmap), mode 0600. Refuses
    /// to overwrite an existing one unless --force is given.
    CreateMd {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The volume (its name in the config).
        volume: String,
        /// Replace an existing metadata file (its bitmap of regions to resync is lost).
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
    },
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
        Command::CreateMd { config, volume, force } => {
            let cfg = NodeConfig::load(&config).map_err(|e| e.to_string())?;
            let Some(v) = cfg.volumes.iter().find(|v| v.name == volume) else {
                return Err(format!("{}: no volume named '{volume}'", config.display()));
            };
            let sb = metadata::Superblock::new(v.uuid, &cfg.name, v.size, v.region_size);
            metadata::create_file(&v.metadata_file, &sb, force).map_err(|e| e.to_string())?;
            println!(
                "{}: created for volume {} ({}, {} bytes, {} regions of {} bytes) on node {}",
                v.metadata_file.display(),
                v.name,
                v.uuid,
                v.size,
                sb.regions(),
                v.region_size,
                cfg.name
            );
            Ok(())
        }
        Command::Demo { dir, scripted, vm } => {
            metroblk::demo::run(metroblk::demo::DemoOptions { dir, scripted, force_vm: vm })
        }
        Command::Status { config, socket, json } => {
            let path = match (config, socket) {
                (Some(c), _) => NodeConfig::load(&c).map_err(|e| e.to_string())?.control_socket,
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
