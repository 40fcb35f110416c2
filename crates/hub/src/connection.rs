//! The hub behind the MQTT endpoint: [`HubState`] as a
//! [`verge_endpoint::Backend`]. The wire (CONNECT, keep-alive, packet loop,
//! bounded inflight, sessions) is verge-endpoint's; here a publish becomes a
//! routed, stored message ([`crate::router`]), a twin operation on the hub's
//! twins, or the answer to a pending method call.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use verge_core::ClientId;
use verge_endpoint::session::{ConnHandle, Sessions};
use verge_endpoint::{Backend, Limits, Rejection};

use crate::HubState;
use crate::auth::{AuthError, Credentials};

/// Serves one client stream (already TLS-terminated) to the end.
pub async fn serve<S>(state: Arc<HubState>, stream: S, peer: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    verge_endpoint::connection::serve(state, stream, peer).await;
}

/// [`serve`] for a client that presented a certificate chain in TLS, over
/// `transport` (TLS or a WebSocket).
pub async fn serve_with_certs<S>(
    state: Arc<HubState>,
    certs: Vec<verge_endpoint::auth::CertificateDer<'static>>,
    stream: S,
    peer: String,
    transport: verge_endpoint::session::Transport,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    verge_endpoint::connection::serve_with_certs(state, stream, peer, certs, transport).await;
}

impl Backend for HubState {
    // Nothing beyond the session: the hub's pumps find clients through it.
    type Link = ();

    fn limits(&self) -> Limits {
        Limits {
            connect_timeout: Duration::from_secs(self.cfg.limits.connect_timeout_secs),
            max_inflight: self.cfg.limits.max_inflight,
            max_packet_bytes: self.cfg.limits.max_packet_bytes,
        }
    }

    fn sessions(&self) -> &Sessions {
        &self.sessions
    }

    async fn authenticate(&self, creds: &Credentials<'_>) -> Result<ClientId, AuthError> {
        let r = self.auth.authenticate(creds);
        if let Err(e) = &r {
            let reason = match e {
                AuthError::BadClientId(_) => "bad_client_id",
                AuthError::UsernameMismatch { .. } => "username_mismatch",
                AuthError::NoCredentials => "no_credentials",
                AuthError::UnknownIdentity(_) => "unknown_identity",
                AuthError::Token(_) => "bad_token",
                _ => "not_authorized",
            };
            self.metrics.client_connect_failed(creds.client_id, reason);
        }
        r
    }

    async fn connected(&self, client: &ClientId, _conn: &ConnHandle) -> Result<(), Rejection> {
        let id = client.to_string();
        self.metrics.client_connected(&id);
        self.clients.connected(&id);
        Ok(())
    }

    async fn disconnected(&self, client: &ClientId, (): ()) {
        let id = client.to_string();
        self.metrics.client_disconnected(&id);
        self.clients.disconnected(&id);
    }

    type Pending = crate::router::Pending;

    async fn telemetry_submit(
        &self,
        client: &ClientId,
        bag: &str,
        payload: Bytes,
    ) -> Result<crate::router::Pending, Rejection> {
        crate::router::ingest_submit(self, client, bag, payload)
            .await
            .map_err(|e| Rejection::bad_request(e.to_string()))
    }

    async fn telemetry_wait(&self, pending: &mut crate::router::Pending) -> Result<(), Rejection> {
        pending
            .wait(self)
            .await
            .map(|_| ())
            .map_err(|e| Rejection::bad_request(e.to_string()))
    }

    async fn twin_get(&self, client: &ClientId) -> Result<Value, Rejection> {
        let id = client.to_string();
        self.metrics.gettwin(&id);
        Ok(self.twins.client_json(&id))
    }

    async fn twin_patch_reported(&self, client: &ClientId, patch: Value) -> Result<u64, Rejection> {
        let id = client.to_string();
        self.metrics.reported_properties(&id);
        self.twins
            .patch_reported(&id, &patch)
            .await
            .map_err(|e| match e {
                crate::twins::PatchError::Refused(e) => Rejection::bad_request(e.to_string()),
                // Not on disk: the client must not take it as accepted.
                crate::twins::PatchError::NotSaved(e) => Rejection::new(500, e.to_string()),
            })
    }

    async fn method_response(&self, client: &ClientId, rid: &str, status: i64, payload: Bytes) {
        self.complete_method(&client.to_string(), rid, status, payload);
    }
}
