//! Certificates for X.509 tests, made in the test (never committed keys):
//! a root CA, and leaves self-signed or signed by it, with a chosen CN and
//! validity, written as PEM files where a client reads them from disk.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

const DAY: i64 = 86_400;

/// Parameters for a certificate with CN `cn`, valid from `from_days` to
/// `to_days` around now (negative is the past), a CA if `ca`.
pub fn params(cn: &str, ca: bool, from_days: i64, to_days: i64) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let t = time::OffsetDateTime::from_unix_timestamp(now).unwrap();
    p.not_before = t + time::Duration::seconds(from_days * DAY);
    p.not_after = t + time::Duration::seconds(to_days * DAY);
    p
}

/// A root CA: its PEM and what signs with it.
pub struct Ca {
    /// The CA certificate, PEM.
    pub pem: String,
    /// Signs leaves.
    pub issuer: Issuer<'static, KeyPair>,
}

/// A root CA with CN `cn`, valid for 30 days.
pub fn root(cn: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let p = params(cn, true, -1, 30);
    let pem = p.self_signed(&key).unwrap().pem();
    Ca {
        pem,
        issuer: Issuer::new(p, key),
    }
}

/// A certificate and its key.
pub struct Leaf {
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// The certificate, PEM.
    pub pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
}

/// A certificate with CN `cn`, signed by `ca` (self-signed without one), a
/// CA itself if `is_ca`, valid over `days` (from, to) around now.
pub fn leaf(cn: &str, ca: Option<&Ca>, is_ca: bool, days: (i64, i64)) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let p = params(cn, is_ca, days.0, days.1);
    let cert = match ca {
        Some(ca) => p.signed_by(&key, &ca.issuer).unwrap(),
        None => p.self_signed(&key).unwrap(),
    };
    Leaf {
        der: cert.der().to_vec(),
        pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}

impl Leaf {
    /// Writes `{dir}/{name}.pem` and `{dir}/{name}.key`; returns both paths.
    pub fn write(&self, dir: &Path, name: &str) -> [PathBuf; 2] {
        let c = dir.join(format!("{name}.pem"));
        let k = dir.join(format!("{name}.key"));
        std::fs::write(&c, &self.pem).unwrap();
        std::fs::write(&k, &self.key_pem).unwrap();
        [c, k]
    }
}
