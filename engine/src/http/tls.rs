//! HTTPS between hosts, as xapi calls other hosts by default (`migration_https_only`): the
//! server's TLS listener (certificate and key from PEM files) and the client's trust.
//!
//! The client trusts what the process was told to trust ([`set_trust`]): with a CA bundle, a
//! server must present a certificate that chains to it and names the host the URL names (as
//! xapi's `verify_dest` checks against the pool's bundle); without one, any certificate is
//! taken and the connection is encrypted but the server not authenticated (xapi's
//! `verify_dest = false`, a migration between pools). Either way the host secret still
//! authenticates the caller to the server.
//!
//! An NBD connection handed over after a `PUT` is a descriptor another process (a datapath)
//! reads and writes in plain NBD; over TLS, [`relay`] gives it one end of a socket pair and
//! carries the bytes between the other end and the TLS stream, in this process, as xapi's
//! stunnel does for tapdisk.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("TLS: {0}")]
pub struct TlsError(String);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server side: the certificate chain and private key in `cert` and `key` (PEM).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsError(format!("{}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError(format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err(TlsError(format!("{}: no certificate in it", cert.display())));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            TlsError(format!("{}: no private key in it (an encrypted key is not taken: `openssl pkey -in KEY -out PLAIN` decrypts it)", key.display()))
        }
        e => TlsError(format!("{}: {e}", key.display())),
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| TlsError(format!("{} with {}: {e}", cert.display(), key.display())))?;
    Ok(Arc::new(config))
}

/// The client configuration, and whether it authenticates servers.
static TRUST: OnceLock<(Arc<rustls::ClientConfig>, bool)> = OnceLock::new();

/// Sets whom this process's HTTPS calls trust: the CAs in `ca` (PEM), or, without one, any
/// server (encrypted, not authenticated). Once per process, before the first call; later
/// calls change nothing and say so.
pub fn set_trust(ca: Option<&Path>) -> Result<(), TlsError> {
    let config = client_config(ca)?;
    TRUST.set((config, ca.is_some())).map_err(|_| TlsError("the trust of this process is set already".into()))
}

/// Whether HTTPS calls authenticate the server (a CA bundle was set).
pub fn verifies() -> bool {
    TRUST.get().is_some_and(|(_, verifies)| *verifies)
}

fn client_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let Some(ca) = ca else { return Ok(any_server()) };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| TlsError(format!("{}: {e}", ca.display())))? {
        let cert = cert.map_err(|e| TlsError(format!("{}: {e}", ca.display())))?;
        roots.add(cert).map_err(|e| TlsError(format!("{}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(TlsError(format!("{}: no certificate in it", ca.display())));
    }
    Ok(Arc::new(client_builder().with_root_certificates(roots).with_no_client_auth()))
}

/// A client taking any server's certificate (still checking that it holds the key).
fn any_server() -> Arc<rustls::ClientConfig> {
    Arc::new(client_builder().dangerous().with_custom_certificate_verifier(Arc::new(AnyServer(provider()))).with_no_client_auth())
}

fn client_builder() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    // ring offers every default protocol version, so this does not fail; were it to, the
    // process's default provider (ring too, the only one built) would serve.
    rustls::ClientConfig::builder_with_provider(provider()).with_safe_default_protocol_versions().unwrap_or_else(|_| rustls::ClientConfig::builder())
}

/// The client configuration calls use: what [`set_trust`] set, or trust in any server.
pub(super) fn client() -> Arc<rustls::ClientConfig> {
    TRUST.get_or_init(|| (any_server(), false)).0.clone()
}

/// The name a server's certificate must carry for `authority` (`host:port`, `[v6]:port`).
pub(super) fn server_name(authority: &str) -> io::Result<ServerName<'static>> {
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: not a host name for TLS ({e})")))
}

/// Takes any certificate, but still checks that the server holds its key (the handshake's
/// signatures): what xapi's `verify_dest = false` connections get from stunnel.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(&self, _: &CertificateDer<'_>, _: &[CertificateDer<'_>], _: &ServerName<'_>, _: &[u8], _: UnixTime) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(&self, message: &[u8], cert: &CertificateDer<'_>, dss: &DigitallySignedStruct) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Gives `stream`'s plaintext to another process: answers one end of a socket pair, in
/// blocking mode, and carries bytes both ways between the other end and `stream` in a task of
/// this process until either side closes. Must be called inside the runtime.
pub(super) fn relay<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(mut stream: S) -> io::Result<OwnedFd> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    let mut ours = tokio::net::UnixStream::from_std(ours)?;
    tokio::spawn(async move {
        if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut ours).await {
            tracing::debug!(error = %e, "a relayed TLS connection ended with an error");
        }
    });
    Ok(theirs.into())
}
