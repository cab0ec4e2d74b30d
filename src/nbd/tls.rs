//! TLS for NBD connections (`NBD_OPT_STARTTLS`): the server's certificate chain and key,
//! and optionally a CA whose client certificates are then required (mutual TLS).
//!
//! Invariants:
//! - In [`TlsMode::Require`] (the default once a certificate is configured) a session serves
//!   no option but STARTTLS and ABORT before the upgrade, and ends on a plain
//!   `NBD_OPT_EXPORT_NAME`: export names, sizes and data never cross the wire in clear (the
//!   spec's FORCEDTLS mode).
//! - [`TlsMode::Allow`] offers the upgrade and still serves plain clients (SELECTIVETLS with
//!   no TLS-only export).
//! - Everything negotiated before the upgrade is forgotten after it (a man in the middle
//!   may have chosen it); the client negotiates again over TLS.
//! - The crypto provider is named here (aws-lc-rs, which the S3 client links already), so no
//!   process-wide default has to be installed and none can be picked by accident.
//! - [`TlsConfig::reload`] (the daemon calls it on SIGHUP) reads the same files again and
//!   swaps the configuration new handshakes use, so a renewed certificate is served without
//!   a restart; sessions already upgraded keep theirs. A file that fails to load leaves the
//!   old configuration in place. The mode, and whether client certificates are required,
//!   stay as started.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Whether plain clients are served besides TLS ones (`--tls require|allow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// Only after STARTTLS (FORCEDTLS).
    Require,
    /// STARTTLS offered, plain connections served too (SELECTIVETLS).
    Allow,
}

/// What sessions need to upgrade a connection. Clones share one acceptor slot, which
/// [`TlsConfig::reload`] replaces.
#[derive(Clone)]
pub struct TlsConfig {
    acceptor: Arc<Mutex<TlsAcceptor>>,
    files: Arc<TlsFiles>,
    pub mode: TlsMode,
    /// Client certificates are verified against a CA (for the log line at start).
    pub client_auth: bool,
}

/// Where the configuration was loaded from, to load it again.
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl TlsConfig {
    /// The acceptor for a handshake starting now.
    pub fn acceptor(&self) -> TlsAcceptor {
        crate::util::lock(&self.acceptor).clone()
    }

    /// Load the certificate, key and client CA again from the files given at start, and
    /// use them for every handshake from now on. On an error nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let f = &self.files;
        let fresh = acceptor(&f.cert, &f.key, f.client_ca.as_deref())?;
        *crate::util::lock(&self.acceptor) = fresh;
        Ok(())
    }

    /// For the log line at start.
    pub fn describe(&self) -> &'static str {
        match (self.mode, self.client_auth) {
            (TlsMode::Require, false) => "required",
            (TlsMode::Require, true) => "required, client certificates",
            (TlsMode::Allow, false) => "offered",
            (TlsMode::Allow, true) => "offered, client certificates",
        }
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("mode", &self.mode)
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

/// Why a TLS configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path}: no certificate in it")]
    NoCertificate { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn pem_error(path: &Path, e: impl fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        reason: e.to_string(),
    }
}

/// Every certificate in a PEM file, in order (a chain: leaf first).
fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Load a server configuration: `cert` (PEM chain, leaf first) and `key` (PEM private key:
/// PKCS#8, PKCS#1 or SEC1); with `client_ca`, clients must present a certificate it signed.
pub fn load(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    mode: TlsMode,
) -> Result<TlsConfig, TlsError> {
    Ok(TlsConfig {
        acceptor: Arc::new(Mutex::new(acceptor(cert, key, client_ca)?)),
        files: Arc::new(TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            client_ca: client_ca.map(Path::to_owned),
        }),
        mode,
        client_auth: client_ca.is_some(),
    })
}

/// The acceptor of [`load`] (and of [`TlsConfig::reload`]).
fn acceptor(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<TlsAcceptor, TlsError> {
    let chain = certificates(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error(key, e))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::aws_lc_rs::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in certificates(ca)? {
                roots.add(c).map_err(|e| pem_error(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(format!("certificate and key: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
