//! Service authentication: SAS tokens signed with a shared access policy's
//! key (`skn=iothubowner`), as IoT Hub's service SDKs send them in
//! `Authorization`. The token's `sr` must be this hub's host name (a `:port`
//! is ignored, because SDKs sign whatever `HostName` the connection string
//! holds) or a path below it.

use verge_core::{SasToken, SharedAccessKey};

/// One shared access policy with full rights.
pub struct ServiceAuth {
    hostname: String,
    policy: String,
    key: SharedAccessKey,
}

impl std::fmt::Debug for ServiceAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAuth")
            .field("hostname", &self.hostname)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn strip_port(h: &str) -> &str {
    match h.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => h,
    }
}

impl ServiceAuth {
    /// A policy named `policy` with `key`, for tokens addressed to `hostname`.
    pub fn new(
        hostname: impl Into<String>,
        policy: impl Into<String>,
        key: SharedAccessKey,
    ) -> Self {
        Self {
            hostname: hostname.into(),
            policy: policy.into(),
            key,
        }
    }

    /// The service connection string for this policy.
    pub fn connection_string(&self) -> String {
        format!(
            "HostName={};SharedAccessKeyName={};SharedAccessKey={}",
            self.hostname,
            self.policy,
            self.key.to_base64()
        )
    }

    /// The key blob SAS URLs are signed with (see `blob`): derived from the
    /// policy key, so a blob signature says nothing about the policy's.
    pub fn blob_key(&self) -> SharedAccessKey {
        self.key.derive("verge-blob-sas")
    }

    /// Checks an `Authorization` header value; the error says why (for logs).
    pub fn verify(&self, header: Option<&str>) -> Result<(), String> {
        let header = header.ok_or("no Authorization header")?;
        let token = SasToken::parse(header.trim()).map_err(|e| e.to_string())?;
        if token.key_name() != Some(self.policy.as_str()) {
            return Err(format!(
                "skn {:?} is not a shared access policy of this hub",
                token.key_name().unwrap_or("")
            ));
        }
        let sr_host = token.resource().split('/').next().unwrap_or_default();
        if !strip_port(sr_host).eq_ignore_ascii_case(strip_port(&self.hostname)) {
            return Err(format!(
                "token audience {:?} is not this hub ({})",
                token.resource(),
                self.hostname
            ));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        token.check_expiry(now).map_err(|e| e.to_string())?;
        token.verify_signature(&self.key).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn policy_tokens() {
        let key = SharedAccessKey::from_bytes(vec![7u8; 32]);
        let auth = ServiceAuth::new("hub.local:8443", "iothubowner", key.clone());
        let exp = 4_000_000_000;
        let good = SasToken::sign("hub.local:8443", &key, exp, Some("iothubowner")).to_string();
        assert_eq!(auth.verify(Some(&good)), Ok(()));
        // Same host, no port: still this hub.
        let no_port = SasToken::sign("hub.local", &key, exp, Some("iothubowner")).to_string();
        assert_eq!(auth.verify(Some(&no_port)), Ok(()));
        let other = SharedAccessKey::from_bytes(vec![8u8; 32]);
        let bad_sig = SasToken::sign("hub.local", &other, exp, Some("iothubowner")).to_string();
        assert!(auth.verify(Some(&bad_sig)).is_err());
        let bad_skn = SasToken::sign("hub.local", &key, exp, Some("device")).to_string();
        assert!(auth.verify(Some(&bad_skn)).unwrap_err().contains("skn"));
        let bad_host = SasToken::sign("other.hub", &key, exp, Some("iothubowner")).to_string();
        assert!(
            auth.verify(Some(&bad_host))
                .unwrap_err()
                .contains("audience")
        );
        let expired = SasToken::sign("hub.local", &key, 10, Some("iothubowner")).to_string();
        assert!(auth.verify(Some(&expired)).unwrap_err().contains("expired"));
        assert!(auth.verify(None).is_err());
        assert!(auth.verify(Some("Bearer x")).is_err());
    }
}
