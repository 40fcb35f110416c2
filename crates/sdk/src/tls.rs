//! rustls client configuration (TLS 1.2 and 1.3, ring).

use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

use crate::Error;

/// Installs the ring provider as the process default (no-op if one is set).
pub(crate) fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn add_pem(roots: &mut RootCertStore, pem: &str) -> Result<(), Error> {
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
    Ok(())
}

fn add_system_roots(roots: &mut RootCertStore) {
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
}

/// A client config trusting the certificates in `ca_pem` (a chain or bundle is
/// fine), or the system roots when `None`.
pub(crate) fn client_config(ca_pem: Option<&str>) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = RootCertStore::empty();
    match ca_pem {
        Some(pem) => add_pem(&mut roots, pem)?,
        None => {
            add_system_roots(&mut roots);
            if roots.is_empty() {
                return Err(Error::Tls("no system root certificates found".into()));
            }
        }
    }
    with_roots(roots)
}

/// A client config trusting every PEM bundle in `pems` plus the system roots
/// (those best effort: a device without any still trusts `pems`). For links
/// to the cloud: IoT Hub presents a public chain, a self-hosted hub one from
/// the trust bundle.
pub fn client_config_upstream(pems: &[&str]) -> Result<Arc<rustls::ClientConfig>, Error> {
    let mut roots = RootCertStore::empty();
    for pem in pems {
        add_pem(&mut roots, pem)?;
    }
    add_system_roots(&mut roots);
    if roots.is_empty() {
        return Err(Error::Tls("no CA to trust".into()));
    }
    with_roots(roots)
}

fn with_roots(roots: RootCertStore) -> Result<Arc<rustls::ClientConfig>, Error> {
    install_provider();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_trusts_every_bundle_given() {
        let ca = |cn: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name.push(rcgen::DnType::CommonName, cn);
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            p.self_signed(&key).unwrap().pem()
        };
        let (a, b) = (ca("edge CA"), ca("cloud CA"));
        assert!(client_config_upstream(&[&a, &b]).is_ok());
        let e = client_config_upstream(&[&a, "not a certificate"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no certificate"), "{e}");
    }
}
