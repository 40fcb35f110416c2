//! Shared access signature (SAS) tokens, as IoT Hub and the Azure SDKs use them.
//!
//! `SharedAccessSignature sr={url-encoded resource}&sig={url-encoded base64 signature}&se={expiry}[&skn={key name}]`
//! where signature = base64(HMAC-SHA256(base64-decoded key, "{url-encoded resource}\n{expiry}")).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sha2::Sha256;

use crate::id::ClientId;

type HmacSha256 = Hmac<Sha256>;

/// What Python's `urllib.parse.quote(s, safe="")` leaves alone: letters, digits and `_ . - ~`.
/// The Azure SDKs encode SAS fields (and property bags) with exactly this set.
pub const URL_ENCODE_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

const PREFIX: &str = "SharedAccessSignature ";

/// Percent-encodes like the Azure SDKs do.
pub fn url_encode(s: &str) -> String {
    utf8_percent_encode(s, URL_ENCODE_SET).to_string()
}

/// A symmetric key (device, module or policy key).
#[derive(Clone, PartialEq, Eq)]
pub struct SharedAccessKey(Vec<u8>);

/// A key that is not valid base64.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("shared access key is not valid base64 ({reason})")]
pub struct KeyError {
    /// Why decoding failed.
    pub reason: String,
}

impl SharedAccessKey {
    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// Decodes a base64 key as found in connection strings.
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        let bytes = B64.decode(s.trim()).map_err(|e| KeyError {
            reason: e.to_string(),
        })?;
        if bytes.is_empty() {
            return Err(KeyError {
                reason: "empty key".into(),
            });
        }
        Ok(Self(bytes))
    }

    /// The key in base64.
    pub fn to_base64(&self) -> String {
        B64.encode(&self.0)
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// HMAC-SHA256 of `data`, base64-encoded (what the workload API's `sign` returns).
    pub fn sign(&self, data: &[u8]) -> String {
        B64.encode(self.mac(data).finalize().into_bytes())
    }

    /// Derives a child key: HMAC-SHA256(self, `label`). Lets a device check
    /// tokens of identities it derived keys for while it is offline.
    pub fn derive(&self, label: &str) -> SharedAccessKey {
        SharedAccessKey(self.mac(label.as_bytes()).finalize().into_bytes().to_vec())
    }

    /// The key of module `module` (generation `generation_id`) on the device
    /// whose key this is. verged derives module keys this way so that the
    /// device, its hub and the cloud (which all know the device key) agree on
    /// them without a round trip, and a recreated module (new generation id)
    /// never reuses an old key.
    pub fn derive_module_key(
        &self,
        module: &crate::id::ModuleId,
        generation_id: &str,
    ) -> SharedAccessKey {
        self.derive(&format!("verge-module-key/{module}/{generation_id}"))
    }

    fn mac(&self, data: &[u8]) -> HmacSha256 {
        // HMAC takes keys of any length, so this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(data);
        mac
    }
}

impl fmt::Debug for SharedAccessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedAccessKey(<redacted>)")
    }
}

/// Why a token was refused. Each failure has its own variant so the hub can log
/// (and count) the reason while the client only sees "not authorized".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    /// The text is not a SAS token.
    #[error("malformed SAS token: {0}")]
    Malformed(String),
    /// `se` is in the past.
    #[error("SAS token expired at {expiry} (now {now})")]
    Expired {
        /// The token's expiry, Unix seconds.
        expiry: u64,
        /// The time of the check, Unix seconds.
        now: u64,
    },
    /// `sr` names another resource.
    #[error("SAS token is for {actual:?}, expected {expected:?}")]
    WrongAudience {
        /// What the verifier expected.
        expected: String,
        /// What the token says.
        actual: String,
    },
    /// The signature does not match the key.
    #[error("SAS token signature does not match")]
    BadSignature,
}

/// A parsed or freshly built SAS token.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    /// `sr` exactly as it stands in the token (percent-encoded): the signed text uses it.
    sr_encoded: String,
    /// `sr` decoded.
    resource: String,
    /// The base64 signature (decoded from the token's percent-encoding).
    signature: String,
    expiry: u64,
    key_name: Option<String>,
}

impl SasToken {
    /// The text that gets signed: `"{url-encoded resource}\n{expiry}"`.
    pub fn string_to_sign(resource: &str, expiry: u64) -> String {
        format!("{}\n{}", url_encode(resource), expiry)
    }

    /// Builds and signs a token for `resource` (decoded form, e.g. `hub/devices/d`).
    pub fn sign(
        resource: &str,
        key: &SharedAccessKey,
        expiry: u64,
        key_name: Option<&str>,
    ) -> Self {
        let signature = key.sign(Self::string_to_sign(resource, expiry).as_bytes());
        Self::from_signature(resource, signature, expiry, key_name)
    }

    /// Assembles a token from a signature computed elsewhere (the workload API).
    pub fn from_signature(
        resource: &str,
        signature: String,
        expiry: u64,
        key_name: Option<&str>,
    ) -> Self {
        Self {
            sr_encoded: url_encode(resource),
            resource: resource.to_owned(),
            signature,
            expiry,
            key_name: key_name.map(str::to_owned),
        }
    }

    /// Parses `SharedAccessSignature sr=…&sig=…&se=…[&skn=…]`.
    pub fn parse(token: &str) -> Result<Self, SasError> {
        let bad = |m: &str| SasError::Malformed(m.to_owned());
        let rest = token
            .strip_prefix(PREFIX)
            .ok_or_else(|| bad("must start with \"SharedAccessSignature \""))?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for field in rest.split('&') {
            let (k, v) = field
                .split_once('=')
                .ok_or_else(|| SasError::Malformed(format!("field {field:?} has no '='")))?;
            let slot = match k {
                "sr" => &mut sr,
                "sig" => &mut sig,
                "se" => &mut se,
                "skn" => &mut skn,
                other => return Err(SasError::Malformed(format!("unknown field {other:?}"))),
            };
            if slot.replace(v).is_some() {
                return Err(SasError::Malformed(format!("field {k:?} appears twice")));
            }
        }
        let sr_encoded = sr.ok_or_else(|| bad("missing sr"))?;
        let sig = sig.ok_or_else(|| bad("missing sig"))?;
        let se = se.ok_or_else(|| bad("missing se"))?;
        let decode = |name: &str, v: &str| {
            percent_decode_str(v)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| {
                    SasError::Malformed(format!("{name} is not valid percent-encoded UTF-8"))
                })
        };
        let resource = decode("sr", sr_encoded)?;
        if resource.is_empty() {
            return Err(bad("empty sr"));
        }
        let signature = decode("sig", sig)?;
        if B64.decode(&signature).is_err() {
            return Err(bad("sig is not base64"));
        }
        if se.is_empty() || !se.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("se must be Unix seconds"));
        }
        let expiry = se.parse().map_err(|_| bad("se is out of range"))?;
        let key_name = skn.map(|k| decode("skn", k)).transpose()?;
        Ok(Self {
            sr_encoded: sr_encoded.to_owned(),
            resource,
            signature,
            expiry,
            key_name,
        })
    }

    /// The resource (`sr`), decoded.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// Expiry, Unix seconds.
    pub fn expiry(&self) -> u64 {
        self.expiry
    }

    /// The policy key name (`skn`), if any.
    pub fn key_name(&self) -> Option<&str> {
        self.key_name.as_deref()
    }

    /// The base64 signature.
    pub fn signature(&self) -> &str {
        &self.signature
    }

    /// Fails when the token expired at or before `now` (Unix seconds).
    pub fn check_expiry(&self, now: u64) -> Result<(), SasError> {
        if self.expiry <= now {
            return Err(SasError::Expired {
                expiry: self.expiry,
                now,
            });
        }
        Ok(())
    }

    /// Checks that `sr` names `client` on one of `hosts` (hostnames compare
    /// case-insensitively, ids exactly). An edge hub passes both the IoT hub's
    /// name and its own.
    pub fn check_audience(&self, hosts: &[&str], client: &ClientId) -> Result<(), SasError> {
        let wrong = || SasError::WrongAudience {
            expected: format!(
                "{}{}",
                hosts.first().copied().unwrap_or(""),
                client.resource()
            ),
            actual: self.resource.clone(),
        };
        let (host, path) = self.resource.split_once('/').ok_or_else(wrong)?;
        if !hosts.iter().any(|h| h.eq_ignore_ascii_case(host)) {
            return Err(wrong());
        }
        match ClientId::parse_resource(path) {
            Ok(c) if &c == client => Ok(()),
            _ => Err(wrong()),
        }
    }

    /// Checks the signature against `key`, in constant time.
    pub fn verify_signature(&self, key: &SharedAccessKey) -> Result<(), SasError> {
        let sig = B64
            .decode(&self.signature)
            .map_err(|_| SasError::BadSignature)?;
        let signed = format!("{}\n{}", self.sr_encoded, self.expiry);
        key.mac(signed.as_bytes())
            .verify_slice(&sig)
            .map_err(|_| SasError::BadSignature)
    }

    /// All checks in order: audience, expiry, signature.
    pub fn verify(
        &self,
        key: &SharedAccessKey,
        hosts: &[&str],
        client: &ClientId,
        now: u64,
    ) -> Result<(), SasError> {
        self.check_audience(hosts, client)?;
        self.check_expiry(now)?;
        self.verify_signature(key)
    }
}

impl fmt::Display for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}sr={}&sig={}&se={}",
            self.sr_encoded,
            url_encode(&self.signature),
            self.expiry
        )?;
        if let Some(k) = &self.key_name {
            write!(f, "&skn={}", url_encode(k))?;
        }
        Ok(())
    }
}

impl fmt::Debug for SasToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SasToken")
            .field("resource", &self.resource)
            .field("expiry", &self.expiry)
            .field("key_name", &self.key_name)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{DeviceId, ModuleId};
    use proptest::prelude::*;

    /// Vectors from `tests/vectors/gen_sas.py` (Python's hmac/hashlib/urllib only).
    fn vectors() -> Vec<Vec<&'static str>> {
        include_str!("../tests/vectors/sas.tsv")
            .lines()
            .map(|l| l.split('\t').collect())
            .collect()
    }

    #[test]
    fn matches_independent_python_vectors() {
        let v = vectors();
        assert_eq!(v.len(), 4);
        for row in v {
            let key = SharedAccessKey::from_base64(row[0]).unwrap();
            let expiry: u64 = row[2].parse().unwrap();
            assert_eq!(
                SasToken::string_to_sign(row[1], expiry),
                row[3].replace("\\n", "\n")
            );
            let tok = SasToken::sign(row[1], &key, expiry, None);
            assert_eq!(tok.signature(), row[4]);
            assert_eq!(tok.to_string(), row[5]);
            let parsed = SasToken::parse(row[5]).unwrap();
            assert_eq!(parsed.resource(), row[1]);
            parsed.verify_signature(&key).unwrap();
        }
    }

    fn module() -> ClientId {
        ClientId::module(
            DeviceId::new("edge1").unwrap(),
            ModuleId::new("filter").unwrap(),
        )
    }

    #[test]
    fn distinct_errors() {
        let key = SharedAccessKey::from_base64("c2VjcmV0LWtleS1mb3ItbW9kdWxl").unwrap();
        let hub = "myhub.azure-devices.net";
        let tok = SasToken::sign(
            &format!("{hub}/devices/edge1/modules/filter"),
            &key,
            1000,
            None,
        );
        let parsed = SasToken::parse(&tok.to_string()).unwrap();
        assert_eq!(parsed.verify(&key, &[hub], &module(), 999), Ok(()));
        assert_eq!(
            parsed.verify(&key, &[hub], &module(), 1000),
            Err(SasError::Expired {
                expiry: 1000,
                now: 1000
            })
        );
        assert!(matches!(
            parsed.verify(&key, &["otherhub"], &module(), 1),
            Err(SasError::WrongAudience { .. })
        ));
        let other = ClientId::module(
            DeviceId::new("edge1").unwrap(),
            ModuleId::new("sensor").unwrap(),
        );
        assert!(matches!(
            parsed.verify(&key, &[hub], &other, 1),
            Err(SasError::WrongAudience { .. })
        ));
        let wrong_key = SharedAccessKey::from_bytes(b"nope".to_vec());
        assert_eq!(
            parsed.verify(&wrong_key, &[hub], &module(), 1),
            Err(SasError::BadSignature)
        );
        // Case-insensitive hub name, and the edge's own hostname as an alternative.
        assert_eq!(
            parsed.check_audience(&["edge.local", "MYHUB.azure-devices.net"], &module()),
            Ok(())
        );
        // A tampered expiry breaks the signature.
        let tampered = tok.to_string().replace("se=1000", "se=9999");
        assert_eq!(
            SasToken::parse(&tampered).unwrap().verify_signature(&key),
            Err(SasError::BadSignature)
        );
    }

    #[test]
    fn malformed_tokens() {
        for t in [
            "",
            "sr=a&sig=b&se=1",
            "SharedAccessSignature ",
            "SharedAccessSignature sr=a&sig=AAAA",
            "SharedAccessSignature sr=a&sig=AAAA&se=x",
            "SharedAccessSignature sr=a&sig=AAAA&se=-1",
            "SharedAccessSignature sr=a&sig=AAAA&se=99999999999999999999999",
            "SharedAccessSignature sr=a&sig=!!!&se=1",
            "SharedAccessSignature sr=a&sig=AAAA&se=1&foo=2",
            "SharedAccessSignature sr=a&sr=b&sig=AAAA&se=1",
            "SharedAccessSignature sr=%ff&sig=AAAA&se=1",
            "SharedAccessSignature sr=&sig=AAAA&se=1",
            "SharedAccessSignature sr",
        ] {
            assert!(
                matches!(SasToken::parse(t), Err(SasError::Malformed(_))),
                "{t:?} should be malformed"
            );
        }
        let ok = SasToken::parse("SharedAccessSignature sr=a%2Fb&sig=AAAA&se=1&skn=iothubowner")
            .unwrap();
        assert_eq!(ok.key_name(), Some("iothubowner"));
        assert_eq!(ok.resource(), "a/b");
    }

    #[test]
    fn keys() {
        assert!(SharedAccessKey::from_base64("not base64!").is_err());
        assert!(SharedAccessKey::from_base64("").is_err());
        let k = SharedAccessKey::from_base64("AAECAwQFBgcICQoLDA0ODw==").unwrap();
        assert_eq!(k.to_base64(), "AAECAwQFBgcICQoLDA0ODw==");
        assert_eq!(format!("{k:?}"), "SharedAccessKey(<redacted>)");
        assert_ne!(k.derive("a"), k.derive("b"));
        assert_eq!(k.derive("a"), k.derive("a"));
        let m = ModuleId::new("filter").unwrap();
        assert_ne!(k.derive_module_key(&m, "1"), k.derive_module_key(&m, "2"));
        // Independent check: Python hmac.new(key, b"verge-module-key/filter/1", sha256).
        assert_eq!(
            k.derive_module_key(&m, "1").to_base64(),
            "73xhk7OmZtlCn2M9NWZALXtTbmWR3uVUXoyYjl5swUo="
        );
    }

    proptest! {
        #[test]
        fn build_parse_verify_round_trip(
            resource in "[ -~]{1,80}",
            key in proptest::collection::vec(any::<u8>(), 1..64),
            expiry in 1u64..u64::MAX,
            skn in proptest::option::of("[a-zA-Z0-9 &=%]{1,12}"),
        ) {
            let key = SharedAccessKey::from_bytes(key);
            let tok = SasToken::sign(&resource, &key, expiry, skn.as_deref());
            let parsed = SasToken::parse(&tok.to_string()).unwrap();
            prop_assert_eq!(parsed.resource(), resource.as_str());
            prop_assert_eq!(parsed.expiry(), expiry);
            prop_assert_eq!(parsed.key_name(), skn.as_deref());
            prop_assert_eq!(&parsed, &tok);
            prop_assert!(parsed.verify_signature(&key).is_ok());
        }

        #[test]
        fn parse_never_panics(s in ".{0,200}") {
            let _ = SasToken::parse(&s);
            let _ = SasToken::parse(&format!("SharedAccessSignature {s}"));
        }
    }
}
