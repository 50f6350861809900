//! The operator's `metroblk witness ...` commands.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use metroblk_protocol::witness::{hex_encode, Reply, Request};
use rand::RngCore;

use crate::config::{read_authkey, WitnessConfig};

/// The name the status command authenticates as (any authenticated name may ask for status).
const STATUS_CLIENT_NAME: &str = "witness-cli";

/// Run or inspect a witness, the third site that decides which node of a volume may serve.
#[derive(Debug, Subcommand)]
pub enum WitnessCommand {
    /// Run the witness in the foreground (logs go to stderr; set METROBLK_LOG=debug for more).
    /// It refuses to start when its state file is torn or corrupt.
    Run {
        /// The witness's config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Write the authkey file named by the config (mode 0600). Every node's peer authkey for
    /// volumes using this witness must be the same key.
    SetAuthkey {
        /// The witness's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The key (at least 16 bytes); a random 32-byte key in hex when omitted.
        key: Option<String>,
    },
    /// Print the authkey (to copy it to the nodes).
    PrintAuthkey {
        /// The witness's config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Change the port in the config file, keeping the rest of it as it is. Restart the witness
    /// (and point the nodes at the new port) for it to take effect.
    SetPort {
        /// The witness's config file.
        #[arg(long, short)]
        config: PathBuf,
        port: u16,
    },
    /// Print the port the config sets.
    PrintPort {
        /// The witness's config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Ask the running witness (on this host) for every volume's epoch, primary, disk states
    /// and lease, and the nodes connected to it.
    Status {
        /// The witness's config file (port and authkey are read from it).
        #[arg(long, short)]
        config: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one witness command.
pub fn run_command(cmd: WitnessCommand) -> Result<(), String> {
    match cmd {
        WitnessCommand::Run { config } => crate::server::run(WitnessConfig::load(&config)?),
        WitnessCommand::SetAuthkey { config, key } => {
            let cfg = WitnessConfig::load(&config)?;
            let key = match key {
                Some(k) => k,
                None => {
                    let mut raw = [0u8; 32];
                    rand::rngs::OsRng.fill_bytes(&mut raw);
                    hex_encode(&raw)
                }
            };
            write_authkey(&cfg.authkey_file, key.trim())?;
            println!("wrote {}", cfg.authkey_file.display());
            Ok(())
        }
        WitnessCommand::PrintAuthkey { config } => {
            let key = WitnessConfig::load(&config)?.read_authkey()?;
            println!("{}", String::from_utf8_lossy(&key));
            Ok(())
        }
        WitnessCommand::SetPort { config, port } => set_port(&config, port),
        WitnessCommand::PrintPort { config } => {
            println!("{}", WitnessConfig::load(&config)?.port);
            Ok(())
        }
        WitnessCommand::Status { config, json } => status(&config, json),
    }
}

fn write_authkey(path: &Path, key: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    if key.len() < crate::config::AUTHKEY_BYTES_MIN {
        return Err(format!("an authkey needs at least {} bytes", crate::config::AUTHKEY_BYTES_MIN));
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    // Created 0600: the key is never readable by others, not even for a moment.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    f.write_all(format!("{key}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), path.display()))
}

fn set_port(config: &Path, port: u16) -> Result<(), String> {
    let text = std::fs::read_to_string(config).map_err(|e| format!("{}: cannot read config: {e}", config.display()))?;
    // Check the whole config first: a broken file is reported, not edited.
    WitnessConfig::parse(config, &text)?;
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| format!("{}: {e}", config.display()))?;
    doc["port"] = toml_edit::value(i64::from(port));
    let new = doc.to_string();
    WitnessConfig::parse(config, &new)?;
    std::fs::write(config, new).map_err(|e| format!("{}: cannot write: {e}", config.display()))?;
    println!("port {port} set in {}; restart the witness for it to take effect", config.display());
    Ok(())
}

fn status(config: &Path, json: bool) -> Result<(), String> {
    let cfg = WitnessConfig::load(config)?;
    let key = read_authkey(&cfg.authkey_file).map_err(|m| format!("{}: authkey_file: {m}", config.display()))?;
    // The witness runs here: ask it on loopback (of the family it listens on).
    let ip: IpAddr = if cfg.listen.is_ipv6() { "::1".parse().unwrap_or(cfg.listen) } else { [127, 0, 0, 1].into() };
    let addr = SocketAddr::new(ip, cfg.port);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let reply = rt.block_on(async {
        let t = Duration::from_secs(5);
        let tls = cfg.tls_setup(&key, &ip.to_string())?;
        let mut c = crate::client::Client::connect_over(addr, STATUS_CLIENT_NAME, &key, tls.as_ref(), t).await?;
        c.request(&Request::Status, t).await
    })?;
    let (volumes, nodes) = match reply {
        Reply::Status { volumes, nodes_connected } => (volumes, nodes_connected),
        Reply::Refused { reason, .. } => return Err(format!("the witness refused: {reason}")),
        Reply::Granted { .. } => return Err("the witness answered status with a grant".into()),
    };
    if json {
        let v = serde_json::json!({ "volumes": volumes, "nodes_connected": nodes });
        println!("{}", serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?);
        return Ok(());
    }
    println!("{} volume(s)", volumes.len());
    for v in &volumes {
        let disks: Vec<String> = v.disk_states.iter().map(|(n, s)| format!("{n} {s}")).collect();
        println!(
            "  {:<20} epoch {:<6} primary {:<16} lease {} ms ({} ms left)  {}",
            v.name,
            v.epoch,
            v.primary.as_deref().unwrap_or("-"),
            v.lease_ms,
            v.lease_left_ms,
            disks.join(", ")
        );
    }
    println!("{} connection(s)", nodes.len());
    for n in &nodes {
        println!("  {:<20} from {:<24} for {} s", n.node, n.address, n.connected_ms / 1000);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_port_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.toml");
        std::fs::write(&p, "# the witness\nlisten = \"127.0.0.1\" # here\nauthkey_file = \"k\"\nstate_file = \"s\"\n")
            .unwrap();
        set_port(&p, 7000).unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.starts_with("# the witness\nlisten = \"127.0.0.1\" # here\n"), "{text}");
        assert_eq!(WitnessConfig::load(&p).unwrap().port, 7000);
        set_port(&p, 7001).unwrap();
        assert_eq!(WitnessConfig::load(&p).unwrap().port, 7001);
    }

    #[test]
    fn set_authkey_writes_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.toml");
        std::fs::write(&p, "authkey_file = \"k\"\nstate_file = \"s\"\n").unwrap();
        run_command(WitnessCommand::SetAuthkey { config: p.clone(), key: None }).unwrap();
        let k = dir.path().join("k");
        assert_eq!(std::fs::metadata(&k).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read_authkey(&k).unwrap().len(), 64);
        assert!(run_command(WitnessCommand::SetAuthkey { config: p.clone(), key: Some("short".into()) }).is_err());
        run_command(WitnessCommand::SetAuthkey { config: p, key: Some("0123456789abcdef".into()) }).unwrap();
        assert_eq!(read_authkey(&k).unwrap(), b"0123456789abcdef");
    }
}
