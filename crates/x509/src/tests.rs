//! Unit tests: certificates made with rcgen here, never stored.
#![allow(clippy::unwrap_used)]

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use super::*;

const DAY: i64 = 86_400;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn params(cn: &str, ca: bool, from_days: i64, to_days: i64) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    let t = time_of(now() as i64);
    p.not_before = t + time::Duration::seconds(from_days * DAY);
    p.not_after = t + time::Duration::seconds(to_days * DAY);
    p
}

fn time_of(secs: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(secs).unwrap()
}

struct Ca {
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(cn: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let p = params(cn, true, -1, 30);
    let cert = p.self_signed(&key).unwrap();
    Ca {
        der: cert.der().clone(),
        issuer: Issuer::new(p, key),
    }
}

fn leaf(cn: &str, ca: Option<&Ca>, is_ca: bool, from: i64, to: i64) -> CertificateDer<'static> {
    let key = KeyPair::generate().unwrap();
    let p = params(cn, is_ca, from, to);
    match ca {
        Some(ca) => p.signed_by(&key, &ca.issuer).unwrap().der().clone(),
        None => p.self_signed(&key).unwrap().der().clone(),
    }
}

fn self_signed(t: &str) -> X509Auth {
    X509Auth::SelfSigned {
        primary: Some("00".repeat(20)),
        secondary: Some(t.to_owned()),
    }
}

#[test]
fn self_signed_by_either_thumbprint_and_either_hash() {
    let c = leaf("d1", None, false, -1, 1);
    let (sha1, sha256) = thumbprints(&c);
    assert_eq!((sha1.len(), sha256.len()), (40, 64));
    for t in [&sha1, &sha256, &sha256.to_ascii_lowercase()] {
        verify_device(std::slice::from_ref(&c), "d1", &self_signed(t), &[], now()).unwrap();
    }
    // The id does not matter for thumbprints (IoT Hub does not check the CN).
    verify_device(
        std::slice::from_ref(&c),
        "other",
        &self_signed(&sha1),
        &[],
        now(),
    )
    .unwrap();
    let wrong = leaf("d1", None, false, -1, 1);
    assert!(matches!(
        verify_device(&[wrong], "d1", &self_signed(&sha1), &[], now()),
        Err(X509Error::Thumbprint { .. })
    ));
    let none = X509Auth::SelfSigned {
        primary: None,
        secondary: Some(String::new()),
    };
    assert_eq!(
        verify_device(std::slice::from_ref(&c), "d1", &none, &[], now()),
        Err(X509Error::NoThumbprint)
    );
    assert_eq!(
        verify_device(&[], "d1", &self_signed(&sha1), &[], now()),
        Err(X509Error::NoCertificate)
    );
}

#[test]
fn validity_is_checked() {
    let expired = leaf("d1", None, false, -3, -1);
    let future = leaf("d1", None, false, 1, 3);
    for (c, want_expired) in [(expired, true), (future, false)] {
        let (sha1, _) = thumbprints(&c);
        let e = verify_device(&[c], "d1", &self_signed(&sha1), &[], now()).unwrap_err();
        assert_eq!(matches!(e, X509Error::Expired(_)), want_expired, "{e}");
        assert_eq!(matches!(e, X509Error::NotYetValid(_)), !want_expired, "{e}");
    }
}

#[test]
fn ca_signed_rules() {
    let root = ca("root");
    let other = ca("other");
    let auth = X509Auth::CertificateAuthority;
    let good = leaf("d1", Some(&root), false, -1, 1);
    verify_device(
        std::slice::from_ref(&good),
        "d1",
        &auth,
        std::slice::from_ref(&root.der),
        now(),
    )
    .unwrap();
    // CN must equal the id, exactly.
    assert!(matches!(
        verify_device(
            std::slice::from_ref(&good),
            "D1",
            &auth,
            std::slice::from_ref(&root.der),
            now()
        ),
        Err(X509Error::CommonName { .. })
    ));
    // Issued by a CA the edge does not trust.
    assert!(matches!(
        verify_device(
            std::slice::from_ref(&good),
            "d1",
            &auth,
            std::slice::from_ref(&other.der),
            now()
        ),
        Err(X509Error::Untrusted(_))
    ));
    assert!(matches!(
        verify_device(std::slice::from_ref(&good), "d1", &auth, &[], now()),
        Err(X509Error::Untrusted(_))
    ));
    // A CA certificate (signed by the trusted root) used as a leaf.
    let sub_ca = leaf("d1", Some(&root), true, -1, 1);
    assert_eq!(
        verify_device(
            &[sub_ca],
            "d1",
            &auth,
            std::slice::from_ref(&root.der),
            now()
        ),
        Err(X509Error::LeafIsCa)
    );
    // The trusted root itself presented as a leaf.
    assert_eq!(
        verify_device(
            std::slice::from_ref(&root.der),
            "root",
            &auth,
            std::slice::from_ref(&root.der),
            now()
        ),
        Err(X509Error::LeafIsCa)
    );
    let expired = leaf("d1", Some(&root), false, -3, -1);
    assert!(matches!(
        verify_device(
            &[expired],
            "d1",
            &auth,
            std::slice::from_ref(&root.der),
            now()
        ),
        Err(X509Error::Expired(_))
    ));
    // A self-signed certificate with the right CN does not pass as CA-signed.
    let own = leaf("d1", None, false, -1, 1);
    assert!(matches!(
        verify_device(&[own], "d1", &auth, std::slice::from_ref(&root.der), now()),
        Err(X509Error::Untrusted(_))
    ));
}

#[test]
fn intermediates_come_from_the_client() {
    let root = ca("root");
    let key = KeyPair::generate().unwrap();
    let p = params("intermediate", true, -1, 10);
    let inter_der = p.signed_by(&key, &root.issuer).unwrap().der().clone();
    let inter = Ca {
        der: inter_der,
        issuer: Issuer::new(p, key),
    };
    let l = leaf("d1", Some(&inter), false, -1, 1);
    let auth = X509Auth::CertificateAuthority;
    let trusted = [root.der.clone()];
    verify_device(
        &[l.clone(), inter.der.clone()],
        "d1",
        &auth,
        &trusted,
        now(),
    )
    .unwrap();
    // Without its intermediate the chain cannot be built.
    assert!(matches!(
        verify_device(std::slice::from_ref(&l), "d1", &auth, &trusted, now()),
        Err(X509Error::Untrusted(_))
    ));
    // Trusting the intermediate alone is enough.
    verify_device(&[l], "d1", &auth, std::slice::from_ref(&inter.der), now()).unwrap();
}

#[test]
fn proof_of_possession() {
    let root = ca("root");
    let other = ca("other");
    let v = leaf("CODE123", Some(&root), false, -1, 1);
    verify_proof_of_possession(&root.der, &v, "CODE123").unwrap();
    assert!(verify_proof_of_possession(&root.der, &v, "CODE124").is_err());
    assert!(verify_proof_of_possession(&other.der, &v, "CODE123").is_err());
    let forged = leaf("CODE123", Some(&other), false, -1, 1);
    assert!(verify_proof_of_possession(&root.der, &forged, "CODE123").is_err());
}

#[test]
fn thumbprint_and_cert_text_forms() {
    let t = "ab:CD ".repeat(10);
    assert_eq!(normalize_thumbprint(&t).unwrap(), "ABCD".repeat(10));
    assert!(normalize_thumbprint(&"A".repeat(41)).is_err());
    assert!(normalize_thumbprint(&"G".repeat(40)).is_err());
    assert!(normalize_thumbprint(&"a".repeat(64)).is_ok());
    let key = KeyPair::generate().unwrap();
    let cert = params("root", true, -1, 1).self_signed(&key).unwrap();
    let pem = cert.pem();
    let der = cert.der().clone();
    // Base64 of the DER without armour, as IoT Hub's certificate API carries it.
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert_eq!(parse_certs(&b64).unwrap(), vec![der.clone()]);
    assert_eq!(parse_certs(&pem).unwrap(), vec![der.clone()]);
    assert!(parse_certs("not a cert").is_err());
    assert!(parse_certs("-----BEGIN FOO-----\nAAAA\n-----END FOO-----\n").is_err());
    assert_eq!(common_name(&der).as_deref(), Some("root"));
    assert!(is_ca(&der).unwrap());
}
