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
                println!(
                    "  volume {} {} bytes, {} on {}, peer {} at {}",
                    v.name,
                    v.size,
                    v.role,
                    v.backing_file.display(),
                    v.peer.name,
                    v.peer.address
                );
            }
            Ok(())
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
