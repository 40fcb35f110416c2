//! Client authentication: who is this CONNECT (or HTTP request) from?
//!
//! [`Authenticator`] is a trait so that X.509 client certificates can be added
//! next to [`SasAuthenticator`] without touching the connection code.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use verge_core::{ClientId, DeviceId, ModuleId, SasToken, SharedAccessKey};

use crate::config::Config;

/// What a client presented.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// MQTT client id (`{d}` or `{d}/{m}`), or the `x-ms-edge-moduleId` header.
    pub client_id: &'a str,
    /// MQTT username (`{hub}/{d}[/{m}]/?api-version=…`); `None` for HTTP.
    pub username: Option<&'a str>,
    /// The password / Authorization header (a SAS token).
    pub password: Option<&'a [u8]>,
}

/// Why authentication failed. The client only ever learns "not authorized";
/// the reason is logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The client id is not `{d}` or `{d}/{m}`.
    #[error("bad client id {0:?}")]
    BadClientId(String),
    /// The username is malformed or names another identity.
    #[error("username {username:?} does not match client id {client_id:?}")]
    UsernameMismatch {
        /// The username.
        username: String,
        /// The client id.
        client_id: String,
    },
    /// No password (and no other credential).
    #[error("no credentials")]
    NoCredentials,
    /// The identity is not known to this hub.
    #[error("unknown identity {0}")]
    UnknownIdentity(String),
    /// The token was refused.
    #[error("SAS token refused: {0}")]
    Token(#[from] verge_core::SasError),
    /// The password is not UTF-8.
    #[error("password is not UTF-8")]
    NotUtf8,
}

/// Authenticates clients.
pub trait Authenticator: Send + Sync + 'static {
    /// Returns the authenticated identity, or why not.
    fn authenticate(&self, creds: &Credentials<'_>) -> Result<ClientId, AuthError>;
}

/// Checks SAS tokens signed with device keys or module keys derived from the
/// edge device's key.
pub struct SasAuthenticator {
    hosts: Vec<String>,
    keys: HashMap<ClientId, SharedAccessKey>,
}

impl SasAuthenticator {
    /// Builds the key table from the configuration.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Self> {
        let device_key = SharedAccessKey::from_base64(&cfg.device_key)
            .map_err(|e| anyhow::anyhow!("device_key: {}", e.reason))?;
        let edge = DeviceId::new(cfg.device_id.as_str())?;
        let mut keys = HashMap::new();
        for (m, gen_id) in &cfg.modules {
            let module = ModuleId::new(m.as_str())?;
            let key = device_key.derive_module_key(&module, gen_id);
            keys.insert(ClientId::module(edge.clone(), module), key);
        }
        for (d, k) in &cfg.devices {
            let key = SharedAccessKey::from_base64(k)
                .map_err(|e| anyhow::anyhow!("devices.{d}: {}", e.reason))?;
            keys.insert(ClientId::device(DeviceId::new(d.as_str())?), key);
        }
        keys.insert(ClientId::device(edge), device_key);
        Ok(Self {
            hosts: vec![cfg.iothub_hostname.clone(), cfg.hostname.clone()],
            keys,
        })
    }

    /// Verifies a bare SAS token for `client` (HTTP callers).
    pub fn verify_token(&self, client: &ClientId, token: &str) -> Result<(), AuthError> {
        let key = self
            .keys
            .get(client)
            .ok_or_else(|| AuthError::UnknownIdentity(client.to_string()))?;
        let token = SasToken::parse(token)?;
        let hosts: Vec<&str> = self.hosts.iter().map(String::as_str).collect();
        token.verify(key, &hosts, client, unix_now())?;
        Ok(())
    }
}

impl Authenticator for SasAuthenticator {
    fn authenticate(&self, creds: &Credentials<'_>) -> Result<ClientId, AuthError> {
        let client = ClientId::parse(creds.client_id)
            .map_err(|_| AuthError::BadClientId(creds.client_id.to_owned()))?;
        if let Some(username) = creds.username {
            check_username(username, creds.client_id)?;
        }
        let password = creds.password.ok_or(AuthError::NoCredentials)?;
        let token = std::str::from_utf8(password).map_err(|_| AuthError::NotUtf8)?;
        self.verify_token(&client, token)?;
        Ok(client)
    }
}

/// Checks `{hub}/{clientId}/?api-version=…` (or the variant without `?`):
/// the identity part must equal the client id and `api-version` must be present.
pub fn check_username(username: &str, client_id: &str) -> Result<(), AuthError> {
    let mismatch = || AuthError::UsernameMismatch {
        username: username.to_owned(),
        client_id: client_id.to_owned(),
    };
    let (_host, rest) = username.split_once('/').ok_or_else(mismatch)?;
    let (identity, query) = if let Some((id, q)) = rest.split_once("/?") {
        (id, q)
    } else {
        // `{d}[/{m}]/api-version=…`: the query is the last segment.
        let (id, q) = rest.rsplit_once('/').ok_or_else(mismatch)?;
        (id, q)
    };
    if identity != client_id {
        return Err(mismatch());
    }
    let has_api_version = query
        .split('&')
        .any(|kv| kv.split('=').next() == Some("api-version"));
    if !has_api_version {
        return Err(mismatch());
    }
    Ok(())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_forms() {
        assert!(
            check_username(
                "h/d1/m1/?api-version=2019-10-01&DeviceClientType=x",
                "d1/m1"
            )
            .is_ok()
        );
        assert!(check_username("h/d1/?api-version=2019-10-01", "d1").is_ok());
        assert!(check_username("h/d1/api-version=2019-10-01&x=y", "d1").is_ok());
        assert!(check_username("h/d1/m1/api-version=1", "d1/m1").is_ok());
        assert!(check_username("h/d2/?api-version=1", "d1").is_err());
        assert!(check_username("h/d1/m2/?api-version=1", "d1/m1").is_err());
        assert!(check_username("h/d1/?foo=1", "d1").is_err());
        assert!(check_username("nothing", "d1").is_err());
    }
}
