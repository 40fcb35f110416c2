//! TLS server configuration: TLS 1.3 and 1.2 (the Python SDK only speaks 1.2),
//! asking for an optional client certificate (X.509 leaf devices; checked at
//! CONNECT by [`crate::auth`], see verge-x509).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Builds the acceptor from a PEM chain (leaf first) and a PEM private key.
pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    crate::install_crypto_provider();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{} holds no certificate", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading private key {}", key.display()))?;
    let config = verge_x509::server_config_builder()
        .context("TLS configuration")?
        .with_single_cert(certs, key)
        .context("TLS certificate and key do not form a valid identity")?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The server identity when it changes while the hub runs (certificates
/// issued by verged expire): handshakes take whatever [`SwappableCert::set`]
/// put in last; connections keep the certificate they were opened with.
#[derive(Debug)]
pub struct SwappableCert {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl SwappableCert {
    /// Starts with `initial`.
    pub fn new(initial: rustls::sign::CertifiedKey) -> Self {
        Self {
            current: std::sync::RwLock::new(Arc::new(initial)),
        }
    }

    /// Replaces the certificate for handshakes from now on.
    pub fn set(&self, next: rustls::sign::CertifiedKey) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
    }

    /// The certificate in force.
    pub fn current(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl rustls::server::ResolvesServerCert for SwappableCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current())
    }
}

/// A certified key from a PEM chain (leaf first) and a PEM private key.
pub fn certified_key(chain_pem: &str, key_pem: &str) -> anyhow::Result<rustls::sign::CertifiedKey> {
    crate::install_crypto_provider();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("parsing the certificate chain")?;
    if certs.is_empty() {
        anyhow::bail!("the certificate chain holds no certificate");
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("parsing the private key")?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key).context("unsupported private key")?;
    let ck = rustls::sign::CertifiedKey::new(certs, signing);
    ck.keys_match()
        .context("the certificate and the private key do not match")?;
    Ok(ck)
}

/// An acceptor (TLS 1.3 and 1.2) that takes its certificate from `certs` at
/// every handshake.
pub fn acceptor_with(certs: Arc<SwappableCert>) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    crate::install_crypto_provider();
    let config = verge_x509::server_config_builder()
        .context("TLS configuration")?
        .with_cert_resolver(certs);
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The certificate chain a client presented in the handshake (leaf first).
pub fn client_certs<IO>(
    stream: &tokio_rustls::server::TlsStream<IO>,
) -> Vec<CertificateDer<'static>> {
    verge_x509::client_chain(stream.get_ref().1)
}
