//! The witness's config file (TOML).
//!
//! ```toml
//! listen = "0.0.0.0"          # address to listen on (default 0.0.0.0)
//! port = 9095                 # default 9095
//! authkey_file = "authkey"    # the shared key, mode 0600; relative to this file's directory
//! state_file = "state.json"   # where decisions are kept
//! metrics_listen = "127.0.0.1:9943"  # Prometheus /metrics (optional)
//! ```
//!
//! Parsing is strict (an unknown field is an error, so a typo is not silently ignored) and every
//! error is one line: `FILE: FIELD: problem`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use metroblk_tls::{TlsKeys, TlsSetup, Transport};
use serde::Deserialize;

/// Default TCP port of the witness.
pub const WITNESS_PORT_DEFAULT: u16 = 9095;
/// What the witness link derives its TLS keys for (`metroblk_tls::keys`).
pub const WITNESS_TLS_LABEL: &str = "metroblk-witness";
/// Shortest authkey accepted, in bytes (the node config's rule).
pub const AUTHKEY_BYTES_MIN: usize = 16;

/// A checked witness config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessConfig {
    /// The config file it was read from.
    pub path: PathBuf,
    pub listen: IpAddr,
    pub port: u16,
    /// Resolved against the config file's directory.
    pub authkey_file: PathBuf,
    /// Resolved against the config file's directory.
    pub state_file: PathBuf,
    /// The nodes' links: "tcp" (default) or "tls" (TLS 1.3, keys from the authkey unless
    /// `tls_cert`, `tls_key` and `tls_ca` are set, resolved like the other paths).
    pub transport: Transport,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    /// Where Prometheus metrics are served on `/metrics` (`metrics.rs`); `None`: nowhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    port: Option<u16>,
    authkey_file: PathBuf,
    state_file: PathBuf,
    transport: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    metrics_listen: Option<String>,
}

impl WitnessConfig {
    pub fn load(path: &Path) -> Result<WitnessConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot read config: {e}", path.display()))?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<WitnessConfig, String> {
        let err = |field: &str, problem: String| format!("{}: {field}: {problem}", path.display());
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // toml's message is multi-line (it quotes the source); keep its first line and where.
            let msg = e.message().lines().next().unwrap_or_default().to_owned();
            let at = e
                .span()
                .map(|s| format!(" (line {})", text[..s.start.min(text.len())].lines().count().max(1)))
                .unwrap_or_default();
            format!("{}: {msg}{at}", path.display())
        })?;
        let listen = match &raw.listen {
            None => IpAddr::from([0, 0, 0, 0]),
            Some(s) => {
                s.parse().map_err(|_| err("listen", format!("'{s}' is not an IP address like 0.0.0.0 or ::")))?
            }
        };
        let port = raw.port.unwrap_or(WITNESS_PORT_DEFAULT);
        if port == 0 {
            return Err(err("port", "0 is not a port a node can reach".into()));
        }
        let transport = match &raw.transport {
            None => Transport::Tcp,
            Some(t) => Transport::parse(t).map_err(|m| err("transport", m))?,
        };
        let r = |p: &Option<PathBuf>| p.as_ref().map(|p| resolve(path, p));
        let (tls_cert, tls_key, tls_ca) = (r(&raw.tls_cert), r(&raw.tls_key), r(&raw.tls_ca));
        match (transport, TlsKeys::from_fields(&[], tls_cert.clone(), tls_key.clone(), tls_ca.clone())) {
            (_, Err((field, m))) => return Err(err(field, m)),
            (Transport::Tcp, Ok(TlsKeys::Files { .. })) => {
                return Err(err("tls_cert", "certificates need transport = \"tls\"".into()))
            }
            _ => {}
        }
        let metrics_listen = match &raw.metrics_listen {
            None => None,
            Some(s) => Some(s.parse().map_err(|_| {
                err("metrics_listen", format!("'{s}' is not an address like 127.0.0.1:9943 or [::]:9943"))
            })?),
        };
        Ok(WitnessConfig {
            path: path.to_path_buf(),
            listen,
            port,
            metrics_listen,
            authkey_file: resolve(path, &raw.authkey_file),
            state_file: resolve(path, &raw.state_file),
            transport,
            tls_cert,
            tls_key,
            tls_ca,
        })
    }

    /// The TLS configs of this witness (None with transport = "tcp"), keys derived from
    /// `authkey` unless certificate files are set. `name`: what a client (`status`) expects
    /// the certificate to name.
    pub fn tls_setup(&self, authkey: &[u8], name: &str) -> Result<Option<TlsSetup>, String> {
        if self.transport == Transport::Tcp {
            return Ok(None);
        }
        let keys = TlsKeys::from_fields(authkey, self.tls_cert.clone(), self.tls_key.clone(), self.tls_ca.clone())
            .map_err(|(f, m)| format!("{}: {f}: {m}", self.path.display()))?;
        TlsSetup::new(&keys, WITNESS_TLS_LABEL, name).map(Some).map_err(|m| format!("{}: {m}", self.path.display()))
    }

    /// Reads the authkey: `FILE: authkey_file: problem` on error.
    pub fn read_authkey(&self) -> Result<Vec<u8>, String> {
        read_authkey(&self.authkey_file).map_err(|m| format!("{}: authkey_file: {m}", self.path.display()))
    }
}

/// Relative paths are relative to the config file's directory, not the cwd, so a config means
/// the same thing whoever starts the witness.
fn resolve(config: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// An authkey is the file's content with surrounding whitespace trimmed, at least 16 bytes, in a
/// file only its owner can read (like ssh with a private key).
pub fn read_authkey(path: &Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} is accessible by group or others (mode {mode:04o}); make it private: chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    let raw = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let key = raw.trim_ascii().to_vec();
    if key.len() < AUTHKEY_BYTES_MIN {
        return Err(format!(
            "{} holds {} bytes; an authkey needs at least {AUTHKEY_BYTES_MIN}",
            path.display(),
            key.len()
        ));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_relative_paths() {
        let c = WitnessConfig::parse(Path::new("/etc/mb/w.toml"), "authkey_file = \"k\"\nstate_file = \"/var/s\"\n")
            .unwrap();
        assert_eq!(c.listen, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(c.port, 9095);
        assert_eq!(c.authkey_file, Path::new("/etc/mb/k"));
        assert_eq!(c.state_file, Path::new("/var/s"));
        assert_eq!(c.metrics_listen, None);
        let c = WitnessConfig::parse(
            Path::new("w.toml"),
            "listen = \"::1\"\nport = 7000\nauthkey_file = \"k\"\nstate_file = \"s\"\n",
        )
        .unwrap();
        assert_eq!((c.listen, c.port), ("::1".parse().unwrap(), 7000));
    }

    #[test]
    fn errors_are_one_line_naming_file_and_field() {
        let p = Path::new("w.toml");
        for (text, want) in [
            ("authkey_file = \"k\"\nstate_file = \"s\"\nlisten = \"nowhere\"\n", "w.toml: listen: 'nowhere'"),
            ("authkey_file = \"k\"\nstate_file = \"s\"\nport = 0\n", "w.toml: port: 0"),
            ("authkey_file = \"k\"\nstate_file = \"s\"\nprot = 1\n", "w.toml: unknown field `prot`"),
            ("authkey_file = \"k\"\n", "w.toml: missing field `state_file`"),
            ("authkey_file = \"k\"\nstate_file = \"s\"\nport = 70000\n", "w.toml: "),
            ("authkey_file = \"k\"\nstate_file = \"s\"\ntransport = \"ssl\"\n", "w.toml: transport: 'ssl'"),
            (
                "authkey_file = \"k\"\nstate_file = \"s\"\ntls_cert = \"c\"\ntls_key = \"k\"\ntls_ca = \"a\"\n",
                "w.toml: tls_cert: certificates need",
            ),
            ("authkey_file = \"k\"\nstate_file = \"s\"\ntransport = \"tls\"\ntls_cert = \"c\"\n", "w.toml: tls_key: "),
            ("authkey_file = \"k\"\nstate_file = \"s\"\nmetrics_listen = \"9943\"\n", "w.toml: metrics_listen: '9943'"),
        ] {
            let e = WitnessConfig::parse(p, text).unwrap_err();
            assert!(e.starts_with(want) && !e.contains('\n'), "{text:?}: {e}");
        }
    }

    #[test]
    fn authkey_must_be_private_and_long_enough() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        std::fs::write(&k, "0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_authkey(&k).unwrap_err().contains("chmod 600"));
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_authkey(&k).unwrap(), b"0123456789abcdef");
        std::fs::write(&k, "short").unwrap();
        assert!(read_authkey(&k).unwrap_err().contains("at least 16"));
    }
}
