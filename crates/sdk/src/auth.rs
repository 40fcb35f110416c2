//! SAS tokens for the MQTT password and the method-invoke `Authorization` header,
//! signed locally with a key or remotely through the workload API.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use verge_core::{ClientId, HubHostname, SasToken, SharedAccessKey};
use verge_workload::client::WorkloadClient;

use crate::Error;

/// Who signs SAS tokens.
#[derive(Clone)]
pub(crate) enum Signer {
    /// A device or module key from a connection string.
    Key(SharedAccessKey),
    /// The workload API of `verged` (module key never leaves the daemon).
    Workload(WorkloadClient),
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Key(_) => f.write_str("Signer::Key(<redacted>)"),
            Self::Workload(w) => f.debug_tuple("Signer::Workload").field(w).finish(),
        }
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Makes tokens for one identity.
#[derive(Debug, Clone)]
pub(crate) struct TokenSource {
    pub(crate) signer: Signer,
    pub(crate) hub: HubHostname,
    pub(crate) client: ClientId,
    pub(crate) ttl: Duration,
}

impl TokenSource {
    /// A fresh token valid for `ttl`; returns it and its expiry (Unix seconds).
    pub(crate) async fn token(&self) -> Result<(String, u64), Error> {
        let resource = self.client.audience(&self.hub);
        let expiry = unix_now() + self.ttl.as_secs().max(1);
        let token = match &self.signer {
            Signer::Key(key) => SasToken::sign(&resource, key, expiry, None),
            Signer::Workload(w) => {
                let data = SasToken::string_to_sign(&resource, expiry);
                let digest = w
                    .sign(data.as_bytes())
                    .await
                    .map_err(|e| Error::Workload(e.to_string()))?;
                SasToken::from_signature(&resource, digest, expiry, None)
            }
        };
        Ok((token.to_string(), expiry))
    }
}
