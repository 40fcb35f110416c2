//! The service API's TLS identity: configured cert/key files, or a private CA
//! and server certificate generated with rcgen on first start and kept in
//! `{data_dir}/tls/` (clients trust `ca.pem`, e.g. with `REQUESTS_CA_BUNDLE`).
//! A CA plus leaf rather than one self-signed leaf, because strict verifiers
//! (OpenSSL with X509_STRICT, rustls/webpki) refuse a CA:FALSE trust anchor.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Where the certificate came from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// The generated CA clients must trust (only when generated).
    pub ca: Option<PathBuf>,
}

/// Uses `cert`/`key` when both are given; otherwise generates (once) a CA
/// and a server certificate for `hostname`, `localhost` and `127.0.0.1`.
pub fn ensure_files(
    data_dir: &Path,
    hostname: &str,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> anyhow::Result<TlsFiles> {
    match (cert, key) {
        (Some(c), Some(k)) => {
            return Ok(TlsFiles {
                cert: c.to_owned(),
                key: k.to_owned(),
                ca: None,
            });
        }
        (None, None) => {}
        _ => return Err(anyhow!("tls.cert and tls.key must be given together")),
    }
    let dir = data_dir.join("tls");
    let files = TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        ca: Some(dir.join("ca.pem")),
    };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "verge-cloud CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let host = hostname
        .rsplit_once(':')
        .filter(|(h, p)| !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(hostname, |(h, _)| h);
    let mut names = vec![host.to_owned()];
    for n in ["localhost", "127.0.0.1"] {
        if !names.iter().any(|x| x == n) {
            names.push(n.to_owned());
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name.push(DnType::CommonName, host);
    let cert = params.signed_by(&key, &issuer)?;
    write_private(&files.key, key.serialize_pem().as_bytes())?;
    std::fs::write(&files.cert, cert.pem())
        .with_context(|| format!("writing {}", files.cert.display()))?;
    if let Some(ca) = &files.ca {
        std::fs::write(ca, ca_cert.pem()).with_context(|| format!("writing {}", ca.display()))?;
    }
    Ok(files)
}

fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// A rustls server config from PEM files.
pub fn server_config(files: &TlsFiles) -> anyhow::Result<Arc<ServerConfig>> {
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .with_context(|| format!("tls.cert {}", files.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("tls.cert {}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(anyhow!(
            "tls.cert {} holds no certificate",
            files.cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .with_context(|| format!("tls.key {}", files.key.display()))?;
    // An optional client certificate: X.509 devices (checked at CONNECT).
    let mut cfg = verge_x509::server_config_builder()?
        .with_single_cert(certs, key)
        .context("tls.cert and tls.key do not match")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
