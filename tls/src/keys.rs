//! What a TLS link authenticates with, and the rustls configs made from it.
//!
//! **Keys from the authkey (the default).** rustls has no API for TLS 1.3 external PSKs, so
//! the shared authkey becomes a shared *key pair* instead: HKDF-SHA256 (salt
//! `metroblk-tls-v1`, the link's label as info) derives an Ed25519 seed, from which both
//! nodes build the same self-signed certificate (fixed serial, validity and name; Ed25519
//! signatures are deterministic). Each side presents it and accepts exactly that certificate
//! from the other (pinned, byte for byte), with the handshake signature checked against it:
//! only a holder of the authkey can complete the handshake, as with a PSK, and the key
//! exchange is still ephemeral (ECDHE), so a leaked authkey does not decrypt recorded
//! traffic. No files to distribute, nothing expires; rotating the authkey rotates the
//! certificate.
//!
//! **Certificate files.** `tls_cert` (PEM chain), `tls_key` (PEM private key) and `tls_ca`
//! (PEM roots): the usual PKI. The dialer checks the listener's chain against the CA and the
//! name it expects (the peer's node name; for the witness, its address); the listener
//! requires a client certificate chaining to the CA. For sites whose security policy wants
//! per-node identities, expiry and revocation by re-issuing.
//!
//! Either way: TLS 1.3 only, AES-GCM or ChaCha20-Poly1305 (all three have kTLS support),
//! no session tickets or resumption (a ticket would arrive after the handshake, as a
//! non-data record, which kTLS refuses to read as data), and secret extraction enabled for
//! the kTLS hand-off.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};

/// A link's transport setting (`transport = "tcp"` or `"tls"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Plain TCP: the HMAC handshake authenticates, frames carry crc32c only.
    #[default]
    Tcp,
    /// TLS 1.3, then kTLS on the data nodes' links.
    Tls,
}

impl Transport {
    pub fn parse(s: &str) -> Result<Transport, String> {
        match s {
            "tcp" => Ok(Transport::Tcp),
            "tls" => Ok(Transport::Tls),
            other => Err(format!("'{other}' is not a transport (use \"tcp\" or \"tls\")")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a TLS link's keys come from.
#[derive(Clone, PartialEq, Eq)]
pub enum TlsKeys {
    /// Derived from the shared authkey (module doc).
    Authkey(Vec<u8>),
    /// Certificate files (PEM).
    Files { cert: PathBuf, key: PathBuf, ca: PathBuf },
}

impl std::fmt::Debug for TlsKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Never print the key.
            TlsKeys::Authkey(_) => f.write_str("Authkey(..)"),
            TlsKeys::Files { cert, key, ca } => {
                f.debug_struct("Files").field("cert", cert).field("key", key).field("ca", ca).finish()
            }
        }
    }
}

impl TlsKeys {
    /// The keys of a config section's `tls_cert`/`tls_key`/`tls_ca` fields (all three or
    /// none; none: derived from `authkey`). Errors name the field.
    pub fn from_fields(
        authkey: &[u8],
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> Result<TlsKeys, (&'static str, String)> {
        match (cert, key, ca) {
            (None, None, None) => Ok(TlsKeys::Authkey(authkey.to_vec())),
            (Some(cert), Some(key), Some(ca)) => Ok(TlsKeys::Files { cert, key, ca }),
            (c, k, _) => {
                let missing = if c.is_none() {
                    "tls_cert"
                } else if k.is_none() {
                    "tls_key"
                } else {
                    "tls_ca"
                };
                Err((missing, "set tls_cert, tls_key and tls_ca together (or none: keys from the authkey)".into()))
            }
        }
    }
}

/// HKDF salt of the derivation; a new version of the scheme changes it.
const DERIVE_SALT: &[u8] = b"metroblk-tls-v1";
/// The DNS name in a derived certificate (and the name the dialer asks for; the pinned
/// verifier compares whole certificates, so it is not what authenticates).
const DERIVED_NAME: &str = "metroblk";
/// PKCS#8 v1 prefix of an Ed25519 private key (RFC 8410): the 32-byte seed follows.
const ED25519_PKCS8_PREFIX: [u8; 16] =
    [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];

/// Both ends' rustls configs for one kind of link.
#[derive(Clone)]
pub struct TlsSetup {
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
    /// The name the dialer asks the listener's certificate for.
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

/// ring, not aws-lc-rs: no cmake or C toolchain beyond cc for the build. rustls marks it
/// deprecated for lacking post-quantum key exchange; X25519 ECDHE is what it negotiates.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsSetup {
    /// The configs for `keys`. `label` separates kinds of links (the peer links and the
    /// witness link derive different keys from their authkeys); `peer_name` is the name the
    /// dialer expects in the listener's certificate with certificate files.
    pub fn new(keys: &TlsKeys, label: &str, peer_name: &str) -> Result<TlsSetup, String> {
        match keys {
            TlsKeys::Authkey(k) => Self::from_authkey(k, label),
            TlsKeys::Files { cert, key, ca } => Self::from_files(cert, key, ca, peer_name),
        }
    }

    /// Keys derived from the authkey, certificate pinned (module doc).
    pub fn from_authkey(authkey: &[u8], label: &str) -> Result<TlsSetup, String> {
        let (cert, key) = derived_identity(authkey, label)?;
        let pinned = Arc::new(Pinned { cert: cert.clone(), algorithms: provider().signature_verification_algorithms });
        let p = provider();
        let client = ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS setup: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(pinned.clone())
            .with_client_auth_cert(vec![cert.clone()], key.clone_key())
            .map_err(|e| format!("TLS setup: {e}"))?;
        let server = ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_client_cert_verifier(pinned)
            .with_single_cert(vec![cert], key)
            .map_err(|e| format!("TLS setup: {e}"))?;
        let server_name = ServerName::try_from(DERIVED_NAME).map_err(|e| e.to_string())?.to_owned();
        Ok(finish(client, server, server_name))
    }

    /// Certificate files: `cert` (PEM chain), `key` (PEM private key), `ca` (PEM roots).
    pub fn from_files(cert: &Path, key: &Path, ca: &Path, peer_name: &str) -> Result<TlsSetup, String> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: cannot read a PEM certificate chain: {e}", cert.display()))?;
        if chain.is_empty() {
            return Err(format!("{}: no certificate in it", cert.display()));
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| format!("{}: cannot read a PEM private key: {e}", key.display()))?;
        let mut roots = RootCertStore::empty();
        let cas = CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: cannot read PEM CA certificates: {e}", ca.display()))?;
        let (added, _) = roots.add_parsable_certificates(cas);
        if added == 0 {
            return Err(format!("{}: no usable CA certificate in it", ca.display()));
        }
        let roots = Arc::new(roots);
        let p = provider();
        let client = ClientConfig::builder_with_provider(p.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, p.clone())
            .build()
            .map_err(|e| format!("{}: {e}", ca.display()))?;
        let server = ServerConfig::builder_with_provider(p)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        let server_name = ServerName::try_from(peer_name.to_string())
            .map_err(|_| format!("'{peer_name}' is not a name a certificate can carry"))?;
        Ok(finish(client, server, server_name))
    }
}

/// What both key sources share: no resumption or tickets, secrets extractable for kTLS.
fn finish(mut client: ClientConfig, mut server: ServerConfig, server_name: ServerName<'static>) -> TlsSetup {
    client.resumption = Resumption::disabled();
    client.enable_secret_extraction = true;
    server.send_tls13_tickets = 0;
    server.enable_secret_extraction = true;
    TlsSetup { client: Arc::new(client), server: Arc::new(server), server_name }
}

/// The certificate and key both holders of `authkey` derive for links labelled `label`.
pub fn derived_identity(
    authkey: &[u8],
    label: &str,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), String> {
    let mut seed = [0u8; 32];
    hkdf::Hkdf::<sha2::Sha256>::new(Some(DERIVE_SALT), authkey)
        .expand(label.as_bytes(), &mut seed)
        .map_err(|e| format!("deriving the TLS key: {e}"))?;
    let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
    pkcs8.extend_from_slice(&seed);
    let key_der = PrivatePkcs8KeyDer::from(pkcs8);
    let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key_der, &rcgen::PKCS_ED25519)
        .map_err(|e| format!("deriving the TLS key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(vec![DERIVED_NAME.to_string()])
        .map_err(|e| format!("deriving the TLS certificate: {e}"))?;
    // Everything fixed, so both nodes build the same bytes.
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(9999, 12, 31);
    params.serial_number = Some(rcgen::SerialNumber::from(1u64));
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, label);
    params.distinguished_name = dn;
    let cert = params.self_signed(&key_pair).map_err(|e| format!("deriving the TLS certificate: {e}"))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(key_der)))
}

/// Accepts exactly one certificate, the one derived from the authkey, at both ends.
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

/// The one line a node logs when the peer's certificate is not the derived one.
pub const NOT_OUR_AUTHKEY: &str =
    "the peer's certificate is not the one derived from this link's authkey (the two ends have different authkeys)";

#[derive(Debug)]
struct NotOurAuthkey;

impl std::fmt::Display for NotOurAuthkey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(NOT_OUR_AUTHKEY)
    }
}

impl std::error::Error for NotOurAuthkey {}

impl Pinned {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() && intermediates.is_empty() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                NotOurAuthkey,
            )))))
        }
    }
}

/// TLS 1.2 is never negotiated (the configs allow TLS 1.3 only).
fn no_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates).map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// The same checks for the dialer's certificate, at the listener.
impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates).map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        ServerCertVerifier::verify_tls13_signature(self, m, c, d)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        ServerCertVerifier::supported_verify_schemes(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_holders_of_an_authkey_derive_the_same_certificate_and_others_do_not() {
        let (a, _) = derived_identity(b"0123456789abcdef0123", "metroblk-peer").unwrap();
        let (b, _) = derived_identity(b"0123456789abcdef0123", "metroblk-peer").unwrap();
        let (c, _) = derived_identity(b"0123456789abcdef0124", "metroblk-peer").unwrap();
        let (d, _) = derived_identity(b"0123456789abcdef0123", "metroblk-witness").unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c, "another authkey");
        assert_ne!(a, d, "another kind of link");
    }

    #[test]
    fn cert_fields_come_all_three_or_none() {
        assert!(matches!(TlsKeys::from_fields(b"k", None, None, None), Ok(TlsKeys::Authkey(_))));
        let p = || Some(PathBuf::from("x.pem"));
        assert!(matches!(TlsKeys::from_fields(b"k", p(), p(), p()), Ok(TlsKeys::Files { .. })));
        assert_eq!(TlsKeys::from_fields(b"k", p(), None, p()).unwrap_err().0, "tls_key");
        assert_eq!(TlsKeys::from_fields(b"k", None, p(), p()).unwrap_err().0, "tls_cert");
        assert_eq!(TlsKeys::from_fields(b"k", p(), p(), None).unwrap_err().0, "tls_ca");
    }

    #[test]
    fn transports_parse_and_print() {
        for t in [Transport::Tcp, Transport::Tls] {
            assert_eq!(Transport::parse(t.as_str()), Ok(t));
        }
        assert!(Transport::parse("ssl").unwrap_err().contains("\"tcp\" or \"tls\""));
    }
}
