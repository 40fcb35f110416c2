//! verge-x509: X.509 client-certificate authentication of devices, the rules
//! IoT Hub and edgeHub apply (reference `x509-dps.md` §1), shared by
//! verge-hub (leaf devices, offline from its cached device scope) and
//! verge-cloud (its own registry and verified CA certificates).
//!
//! * [`verify_device`]: a presented chain (leaf first, as the TLS stack
//!   received it) against a device's [`X509Auth`]:
//!   - `selfSigned`: the leaf is within its validity and its SHA-1 or SHA-256
//!     hex thumbprint equals the primary or secondary one (case-insensitive);
//!   - `certificateAuthority`: the leaf's CN equals the device id, it is
//!     within its validity, it is not a CA itself, and it chains (signatures
//!     checked) through the presented intermediates to a trusted certificate.
//! * [`verify_proof_of_possession`]: a CA certificate's owner signed a
//!   verification certificate whose CN is the code the cloud issued.
//! * [`AnyClientCert`]: the TLS side. As in edgeHub, the handshake asks for
//!   an optional client certificate and accepts any (proof of possession of
//!   its key is still checked by TLS); who it belongs to is decided at
//!   CONNECT, where the client id names the identity to check it against.

mod verifier;

pub use rustls_pki_types::CertificateDer;
pub use verifier::{AnyClientCert, client_chain, server_config_builder};

use std::time::Duration;

use rustls_pki_types::UnixTime;
use serde::{Deserialize, Serialize};
use sha1::Digest as _;
use x509_parser::prelude::{FromDer as _, X509Certificate};

/// How a device identity authenticates by certificate (IoT Hub's
/// `authentication.type` `selfSigned` or `certificateAuthority`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum X509Auth {
    /// The leaf's thumbprint is registered (SHA-1 or SHA-256 hex).
    #[serde(rename_all = "camelCase")]
    SelfSigned {
        /// Primary thumbprint, normalized by [`normalize_thumbprint`].
        primary: Option<String>,
        /// Secondary thumbprint.
        secondary: Option<String>,
    },
    /// The leaf is issued by a trusted CA and its CN is the device id.
    CertificateAuthority,
}

/// Why a certificate was refused: logged by the caller (the client only
/// learns "not authorized").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum X509Error {
    /// The client sent no certificate.
    #[error("no client certificate was presented")]
    NoCertificate,
    /// Not a parsable X.509 certificate.
    #[error("the client certificate cannot be parsed: {0}")]
    Malformed(String),
    /// `notAfter` is in the past.
    #[error("the client certificate expired at {0} (Unix seconds)")]
    Expired(i64),
    /// `notBefore` is in the future.
    #[error("the client certificate is not valid before {0} (Unix seconds)")]
    NotYetValid(i64),
    /// Neither registered thumbprint matches.
    #[error(
        "the certificate's thumbprint (SHA-1 {sha1}, SHA-256 {sha256}) matches neither registered thumbprint"
    )]
    Thumbprint {
        /// The leaf's SHA-1 thumbprint.
        sha1: String,
        /// The leaf's SHA-256 thumbprint.
        sha256: String,
    },
    /// A `selfSigned` identity without any thumbprint.
    #[error("the identity has no registered thumbprint")]
    NoThumbprint,
    /// The leaf's CN is not the device id.
    #[error("the certificate's CN {cn:?} is not the device id {device:?}")]
    CommonName {
        /// The leaf's CN (empty if none).
        cn: String,
        /// The device id.
        device: String,
    },
    /// A CA certificate presented as a device certificate.
    #[error(
        "the client certificate is a CA certificate (basicConstraints CA=true), not a device certificate"
    )]
    LeafIsCa,
    /// The chain does not reach a trusted certificate.
    #[error("the certificate chain does not lead to a trusted CA: {0}")]
    Untrusted(String),
    /// Proof of possession: the verification certificate is wrong.
    #[error("proof of possession failed: {0}")]
    ProofOfPossession(String),
}

/// SHA-1 and SHA-256 thumbprints of a DER certificate, upper-case hex.
pub fn thumbprints(der: &[u8]) -> (String, String) {
    (
        hex_upper(&sha1::Sha1::digest(der)),
        hex_upper(&sha2::Sha256::digest(der)),
    )
}

fn hex_upper(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02X}");
        s
    })
}

/// A registered thumbprint, upper-case: 40 hex digits (SHA-1) or 64 (SHA-256).
/// Colons and spaces some tools print between bytes are dropped.
pub fn normalize_thumbprint(t: &str) -> Result<String, String> {
    let t: String = t
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    if !(t.len() == 40 || t.len() == 64) || !t.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "a thumbprint is 40 (SHA-1) or 64 (SHA-256) hex digits, got {t:?}"
        ));
    }
    Ok(t.to_ascii_uppercase())
}

/// Certificates from PEM text; a body without PEM armour is taken as one
/// base64 DER certificate (how IoT Hub's certificate API carries them).
pub fn parse_certs(text: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject as _;
    if text.contains("-----BEGIN") {
        let certs = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("bad PEM: {e}"))?;
        if certs.is_empty() {
            return Err("no CERTIFICATE block in the PEM text".into());
        }
        return Ok(certs);
    }
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let der = base64_decode(&compact).ok_or("neither PEM nor base64 DER")?;
    X509Certificate::from_der(&der).map_err(|e| format!("not a certificate: {e}"))?;
    Ok(vec![CertificateDer::from(der)])
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    // PEM parsing above already needs a base64 decoder; wrapping the DER in
    // armour reuses it instead of adding another dependency.
    use rustls_pki_types::pem::PemObject as _;
    let pem = format!("-----BEGIN CERTIFICATE-----\n{s}\n-----END CERTIFICATE-----\n");
    CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}

/// The subject CN of a DER certificate, if it has one.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, c) = X509Certificate::from_der(der).ok()?;
    cn_of(&c)
}

fn cn_of(c: &X509Certificate<'_>) -> Option<String> {
    c.subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_owned)
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, X509Error> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| X509Error::Malformed(e.to_string()))
}

fn check_validity(c: &X509Certificate<'_>, now: i64) -> Result<(), X509Error> {
    let v = c.validity();
    if now < v.not_before.timestamp() {
        return Err(X509Error::NotYetValid(v.not_before.timestamp()));
    }
    if now > v.not_after.timestamp() {
        return Err(X509Error::Expired(v.not_after.timestamp()));
    }
    Ok(())
}

/// Checks `chain` (leaf first) for device `device_id` registered with
/// `auth`; `trusted` are the CA certificates a `certificateAuthority` leaf
/// must chain to; `now` is Unix seconds.
pub fn verify_device(
    chain: &[CertificateDer<'_>],
    device_id: &str,
    auth: &X509Auth,
    trusted: &[CertificateDer<'_>],
    now: u64,
) -> Result<(), X509Error> {
    let leaf_der = chain.first().ok_or(X509Error::NoCertificate)?;
    let leaf = parse(leaf_der)?;
    let now_i = i64::try_from(now).unwrap_or(i64::MAX);
    check_validity(&leaf, now_i)?;
    match auth {
        X509Auth::SelfSigned { primary, secondary } => {
            let registered: Vec<&str> = [primary, secondary]
                .into_iter()
                .filter_map(|t| t.as_deref())
                .filter(|t| !t.is_empty())
                .collect();
            if registered.is_empty() {
                return Err(X509Error::NoThumbprint);
            }
            let (sha1, sha256) = thumbprints(leaf_der);
            let hit = registered
                .iter()
                .any(|t| t.eq_ignore_ascii_case(&sha1) || t.eq_ignore_ascii_case(&sha256));
            if hit {
                Ok(())
            } else {
                Err(X509Error::Thumbprint { sha1, sha256 })
            }
        }
        X509Auth::CertificateAuthority => {
            let cn = cn_of(&leaf).unwrap_or_default();
            // Ordinal comparison, as IoT Hub and edgeHub do.
            if cn != device_id {
                return Err(X509Error::CommonName {
                    cn,
                    device: device_id.to_owned(),
                });
            }
            if leaf.is_ca() {
                return Err(X509Error::LeafIsCa);
            }
            verify_chain(chain, trusted, now)
        }
    }
}

/// Signatures from the leaf through `chain[1..]` to one of `trusted`.
fn verify_chain(
    chain: &[CertificateDer<'_>],
    trusted: &[CertificateDer<'_>],
    now: u64,
) -> Result<(), X509Error> {
    let leaf = chain.first().ok_or(X509Error::NoCertificate)?;
    let anchors: Vec<_> = trusted
        .iter()
        .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
        .collect();
    if anchors.is_empty() {
        return Err(X509Error::Untrusted(
            "no trusted CA certificate is configured".into(),
        ));
    }
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| X509Error::Malformed(format!("{e:?}")))?;
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &chain[1..],
        UnixTime::since_unix_epoch(Duration::from_secs(now)),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| X509Error::Untrusted(format!("{e:?}")))
}

/// Proof of possession of a CA's key: `verification` (DER) has CN = `code`
/// and is signed by `ca` (DER).
pub fn verify_proof_of_possession(
    ca: &[u8],
    verification: &[u8],
    code: &str,
) -> Result<(), X509Error> {
    let ca = parse(ca)?;
    let v = parse(verification)?;
    let cn = cn_of(&v).unwrap_or_default();
    if cn != code {
        return Err(X509Error::ProofOfPossession(format!(
            "the verification certificate's CN {cn:?} is not the verification code"
        )));
    }
    v.verify_signature(Some(ca.public_key())).map_err(|e| {
        X509Error::ProofOfPossession(format!(
            "the verification certificate is not signed by the CA's key: {e}"
        ))
    })
}

/// Validity of a DER certificate: (notBefore, notAfter), Unix seconds.
pub fn validity(der: &[u8]) -> Result<(i64, i64), X509Error> {
    let c = parse(der)?;
    Ok((
        c.validity().not_before.timestamp(),
        c.validity().not_after.timestamp(),
    ))
}

/// True for a CA certificate (basicConstraints CA=true).
pub fn is_ca(der: &[u8]) -> Result<bool, X509Error> {
    Ok(parse(der)?.is_ca())
}

#[cfg(test)]
mod tests;
