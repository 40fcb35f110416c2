//! Client authentication: who is this CONNECT (or HTTP request) from?
//!
//! [`Authenticator`] is a trait so that X.509 client certificates can be added
//! next to [`SasAuthenticator`] without touching the connection code. The
//! credential types and the username check are verge-endpoint's, shared
//! with verge-cloud.
//!
//! # The key table
//!
//! [`SasAuthenticator`] checks tokens against one table, identity → keys,
//! merged from three sources and swapped whole (readers never see half an
//! update):
//!
//! 1. the configuration file: the edge device's `device_key`, `[modules]`
//!    keys derived from it, `[devices]` keys (these win over the others);
//! 2. module identities from verged ([`SasAuthenticator::set_modules`],
//!    edge-environment mode, see [`crate::identity`]);
//! 3. child devices from the cloud's device scope
//!    ([`SasAuthenticator::set_scope_devices`], see [`crate::identity_scope`]).
//!
//! # X.509 (leaf devices only)
//!
//! A CONNECT with an empty password and a client certificate is checked by
//! verge-x509 against the device's entry in the cached device scope
//! ([`SasAuthenticator::set_scope_x509`]: `selfSigned` thumbprints or
//! `certificateAuthority`) and, for CA-signed leaves, the edge's trust
//! bundle ([`SasAuthenticator::set_trust_bundle`]). Modules are refused, as
//! edgeHub refuses them; a non-empty password keeps the SAS path.
//!
//! A token for an unknown identity, or one whose signature does not match,
//! bumps [`SasAuthenticator::misses`] so the sources can refresh early (a
//! module created or rotated since the last fetch is accepted on its retry).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use verge_core::{ClientId, DeviceId, ModuleId, SasError, SasToken, SharedAccessKey};

use crate::config::Config;

pub use verge_endpoint::auth::{AuthError, Credentials, check_username, unix_now};

/// Authenticates clients.
pub trait Authenticator: Send + Sync + 'static {
    /// Returns the authenticated identity, or why not.
    fn authenticate(&self, creds: &Credentials<'_>) -> Result<ClientId, AuthError>;
}

/// The keys of one identity: a token signed with either is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityKeys {
    /// Primary key (the one the hub signs with on the identity's behalf).
    pub primary: SharedAccessKey,
    /// Secondary key, if the source has one.
    pub secondary: Option<SharedAccessKey>,
}

impl IdentityKeys {
    /// One key.
    pub fn single(key: SharedAccessKey) -> Self {
        Self {
            primary: key,
            secondary: None,
        }
    }
}

/// Identity → keys.
pub type KeyTable = HashMap<ClientId, IdentityKeys>;

/// A leaf device registered for X.509 in the edge's device scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509Identity {
    /// Thumbprints or CA.
    pub auth: verge_x509::X509Auth,
    /// A disabled device is refused (with that reason in the log).
    pub enabled: bool,
}

/// Device → its X.509 registration.
pub type X509Table = HashMap<ClientId, X509Identity>;

/// Checks SAS tokens against the merged key table (see the module docs).
pub struct SasAuthenticator {
    hosts: Vec<String>,
    /// From the configuration file; fixed for the hub's lifetime.
    fixed: KeyTable,
    /// Module identities from verged and child devices from the cloud.
    dynamic: Mutex<(KeyTable, KeyTable)>,
    /// The merged table in force.
    table: RwLock<Arc<KeyTable>>,
    /// Counts authentication misses; every source watches it.
    misses: tokio::sync::watch::Sender<u64>,
    /// X.509 leaf devices from the cloud's device scope.
    x509: RwLock<Arc<X509Table>>,
    /// The CA certificates a CA-signed leaf must chain to (the edge's trust bundle).
    trust_bundle: RwLock<Arc<Vec<verge_x509::CertificateDer<'static>>>>,
}

impl SasAuthenticator {
    /// Builds the key table from the configuration.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Self> {
        let edge = DeviceId::new(cfg.device_id.as_str())?;
        let mut keys = HashMap::new();
        // Empty in edge-environment mode: module keys come from verged.
        if !cfg.device_key.is_empty() {
            let device_key = SharedAccessKey::from_base64(&cfg.device_key)
                .map_err(|e| anyhow::anyhow!("device_key: {}", e.reason))?;
            for (m, gen_id) in &cfg.modules {
                let module = ModuleId::new(m.as_str())?;
                let key = device_key.derive_module_key(&module, gen_id);
                keys.insert(
                    ClientId::module(edge.clone(), module),
                    IdentityKeys::single(key),
                );
            }
            keys.insert(ClientId::device(edge), IdentityKeys::single(device_key));
        }
        for (d, k) in &cfg.devices {
            let key = SharedAccessKey::from_base64(k)
                .map_err(|e| anyhow::anyhow!("devices.{d}: {}", e.reason))?;
            keys.insert(
                ClientId::device(DeviceId::new(d.as_str())?),
                IdentityKeys::single(key),
            );
        }
        let mut hosts = vec![cfg.iothub_hostname.clone(), cfg.hostname.clone()];
        if let Some(edge) = &cfg.edge
            && !hosts.contains(&edge.gateway_hostname)
        {
            // Clients of an edge-environment hub sign for the name they dial.
            hosts.push(edge.gateway_hostname.clone());
        }
        Ok(Self {
            hosts,
            table: RwLock::new(Arc::new(keys.clone())),
            fixed: keys,
            dynamic: Mutex::new((HashMap::new(), HashMap::new())),
            misses: tokio::sync::watch::Sender::new(0),
            x509: RwLock::new(Arc::default()),
            trust_bundle: RwLock::new(Arc::default()),
        })
    }

    /// Replaces the X.509 leaf devices from the cloud's device scope (whole).
    pub fn set_scope_x509(&self, devices: X509Table) {
        *self.x509.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(devices);
    }

    /// The X.509 leaf devices in force.
    pub fn x509_devices(&self) -> Arc<X509Table> {
        self.x509.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the trust bundle CA-signed leaves are checked against.
    pub fn set_trust_bundle(&self, certs: Vec<verge_x509::CertificateDer<'static>>) {
        *self.trust_bundle.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(certs);
    }

    /// Checks a client certificate chain for `client` (see the module docs).
    pub fn verify_x509(
        &self,
        client: &ClientId,
        chain: &[verge_x509::CertificateDer<'static>],
    ) -> Result<(), AuthError> {
        if client.module.is_some() {
            return Err(AuthError::ModuleCertificate(client.to_string()));
        }
        let table = self.x509_devices();
        let Some(entry) = table.get(client) else {
            if self.keys().contains_key(client) {
                return Err(AuthError::NotX509(client.to_string()));
            }
            // Perhaps registered since the last scope fetch.
            self.missed();
            return Err(AuthError::UnknownIdentity(client.to_string()));
        };
        if !entry.enabled {
            return Err(AuthError::Disabled(client.to_string()));
        }
        let trusted = self
            .trust_bundle
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        verge_x509::verify_device(
            chain,
            client.device.as_str(),
            &entry.auth,
            &trusted,
            unix_now(),
        )?;
        Ok(())
    }

    /// Replaces the module identities from verged (whole).
    pub fn set_modules(&self, modules: KeyTable) {
        let mut d = self.dynamic.lock().unwrap_or_else(|p| p.into_inner());
        d.0 = modules;
        self.merge(&d);
    }

    /// Replaces the child devices from the cloud's device scope (whole).
    pub fn set_scope_devices(&self, devices: KeyTable) {
        let mut d = self.dynamic.lock().unwrap_or_else(|p| p.into_inner());
        d.1 = devices;
        self.merge(&d);
    }

    /// Builds the merged table and swaps it in. Called with `dynamic` locked,
    /// so concurrent updates cannot swap in each other's stale halves.
    fn merge(&self, dynamic: &(KeyTable, KeyTable)) {
        let (modules, scope) = dynamic;
        let mut table = scope.clone();
        table.extend(modules.iter().map(|(k, v)| (k.clone(), v.clone())));
        table.extend(self.fixed.iter().map(|(k, v)| (k.clone(), v.clone())));
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
    }

    /// The merged key table in force (every identity the hub holds keys for).
    pub fn keys(&self) -> Arc<KeyTable> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The key the hub holds for `id` (primary), if any: what the upstream
    /// signs with on the identity's behalf.
    pub fn key_for(&self, id: &ClientId) -> Option<SharedAccessKey> {
        self.keys().get(id).map(|k| k.primary.clone())
    }

    /// Changes whenever a token for an unknown identity or with a wrong
    /// signature was seen (each identity source keeps a receiver).
    pub fn misses(&self) -> tokio::sync::watch::Receiver<u64> {
        self.misses.subscribe()
    }

    fn missed(&self) {
        self.misses.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Verifies a bare SAS token for `client` (HTTP callers).
    pub fn verify_token(&self, client: &ClientId, token: &str) -> Result<(), AuthError> {
        let table = self.keys();
        let Some(keys) = table.get(client) else {
            self.missed();
            return Err(AuthError::UnknownIdentity(client.to_string()));
        };
        let token = SasToken::parse(token)?;
        let hosts: Vec<&str> = self.hosts.iter().map(String::as_str).collect();
        match token.verify(&keys.primary, &hosts, client, unix_now()) {
            Err(SasError::BadSignature) => {
                if let Some(second) = &keys.secondary
                    && token.verify_signature(second).is_ok()
                {
                    return Ok(());
                }
                // Perhaps a module rotated since the last fetch.
                self.missed();
                Err(AuthError::Token(SasError::BadSignature))
            }
            other => Ok(other?),
        }
    }
}

impl Authenticator for SasAuthenticator {
    fn authenticate(&self, creds: &Credentials<'_>) -> Result<ClientId, AuthError> {
        let client = ClientId::parse(creds.client_id)
            .map_err(|_| AuthError::BadClientId(creds.client_id.to_owned()))?;
        if let Some(username) = creds.username {
            check_username(username, creds.client_id)?;
        }
        if creds.wants_x509() {
            self.verify_x509(&client, creds.client_certs)?;
            return Ok(client);
        }
        let password = creds.password.ok_or(AuthError::NoCredentials)?;
        let token = std::str::from_utf8(password).map_err(|_| AuthError::NotUtf8)?;
        self.verify_token(&client, token)?;
        Ok(client)
    }
}

/// Paces the early refreshes [`SasAuthenticator::misses`] asks an identity
/// source for: the first at once (a client deployed just after the source's
/// last fetch is let in on its first retry), later ones at least `min` apart
/// (a client with bad credentials cannot make the source hammer its origin).
pub(crate) struct MissPacer {
    min: std::time::Duration,
    last: Option<tokio::time::Instant>,
}

impl MissPacer {
    pub(crate) fn new(min: std::time::Duration) -> Self {
        Self { min, last: None }
    }

    /// Waits until a refresh after a miss may run.
    pub(crate) async fn wait(&mut self) {
        if let Some(t) = self.last {
            tokio::time::sleep_until(t + self.min).await;
        }
        self.last = Some(tokio::time::Instant::now());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg() -> Config {
        Config::from_toml(
            "iothub_hostname = \"hub\"\ndevice_id = \"edge\"\nstorage_dir = \"/tmp/x\"\n\
             [devices]\nleaf = \"AAAAAAAAAAAAAAAAAAAAAA==\"\n",
        )
        .unwrap()
    }

    fn token(id: &ClientId, key: &SharedAccessKey) -> String {
        let resource = match &id.module {
            Some(m) => format!("hub/devices/{}/modules/{m}", id.device),
            None => format!("hub/devices/{}", id.device),
        };
        SasToken::sign(&resource, key, unix_now() + 600, None).to_string()
    }

    #[tokio::test]
    async fn table_is_swapped_whole_and_config_wins() {
        let auth = SasAuthenticator::from_config(&cfg()).unwrap();
        let mut misses = auth.misses();
        let m = ClientId::parse("edge/modA").unwrap();
        let leaf = ClientId::parse("leaf").unwrap();
        let child = ClientId::parse("child").unwrap();
        let k1 = SharedAccessKey::from_bytes(vec![1u8; 32]);
        let k2 = SharedAccessKey::from_bytes(vec![2u8; 32]);
        assert!(matches!(
            auth.verify_token(&m, &token(&m, &k1)),
            Err(AuthError::UnknownIdentity(_))
        ));
        // The miss was signalled.
        assert!(misses.has_changed().unwrap());
        misses.mark_unchanged();
        auth.set_modules(HashMap::from([(
            m.clone(),
            IdentityKeys::single(k1.clone()),
        )]));
        auth.verify_token(&m, &token(&m, &k1)).unwrap();
        // A scope entry for a configured device does not replace it.
        auth.set_scope_devices(HashMap::from([
            (leaf.clone(), IdentityKeys::single(k2.clone())),
            (
                child.clone(),
                IdentityKeys {
                    primary: k1.clone(),
                    secondary: Some(k2.clone()),
                },
            ),
        ]));
        assert!(auth.verify_token(&leaf, &token(&leaf, &k2)).is_err());
        auth.verify_token(&child, &token(&child, &k2)).unwrap();
        // Modules survive a scope update, and the other way round.
        auth.verify_token(&m, &token(&m, &k1)).unwrap();
        auth.set_modules(HashMap::from([(
            m.clone(),
            IdentityKeys::single(k2.clone()),
        )]));
        assert!(matches!(
            auth.verify_token(&m, &token(&m, &k1)),
            Err(AuthError::Token(SasError::BadSignature))
        ));
        auth.verify_token(&child, &token(&child, &k1)).unwrap();
        assert_eq!(auth.key_for(&m), Some(k2));
        assert_eq!(auth.keys().len(), 3);
    }
}
