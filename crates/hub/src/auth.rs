//! Client authentication: who is this CONNECT (or HTTP request) from?
//!
//! [`Authenticator`] is a trait so that X.509 client certificates can be added
//! next to [`SasAuthenticator`] without touching the connection code. The
//! credential types and the username check are verge-endpoint's, shared
//! with verge-cloud.

use std::collections::HashMap;

use verge_core::{ClientId, DeviceId, ModuleId, SasToken, SharedAccessKey};

use crate::config::Config;

pub use verge_endpoint::auth::{AuthError, Credentials, check_username, unix_now};

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
