//! rustls client configuration (TLS 1.2 and 1.3, aws-lc-rs).

use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use crate::Error;

/// Installs the aws-lc-rs provider as the process default (no-op if one is set).
pub(crate) fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// A client config trusting the certificates in `ca_pem` (a chain or bundle is
/// fine), or the system roots when `None`.
pub(crate) fn client_config(ca_pem: Option<&str>) -> Result<Arc<rustls::ClientConfig>, Error> {
    install_provider();
    let mut roots = RootCertStore::empty();
    match ca_pem {
        Some(pem) => {
            let mut n = 0;
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let cert = cert.map_err(|e| Error::Tls(format!("bad CA PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::Tls(format!("bad CA certificate: {e}")))?;
                n += 1;
            }
            if n == 0 {
                return Err(Error::Tls("CA PEM holds no certificate".into()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(Error::Tls("no system root certificates found".into()));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
