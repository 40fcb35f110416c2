//! [`DeviceClient`]: a device (typically a downstream device of an edge hub).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use verge_core::{ClientId, ConnectionString, Message};

use crate::auth::{Signer, TokenSource};
use crate::engine::{Engine, Identity, Incoming, MethodHandler, MethodRequest};
use crate::{ClientOptions, Error};

/// A device client. Cheap to clone; the connection closes when the last clone
/// is dropped (or on [`DeviceClient::close`]).
#[derive(Clone)]
pub struct DeviceClient {
    engine: Arc<Engine>,
}

impl std::fmt::Debug for DeviceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceClient")
            .field("client", &self.engine.link.id.client)
            .field("dial_host", &self.engine.link.id.dial_host)
            .finish_non_exhaustive()
    }
}

impl DeviceClient {
    /// From a device connection string with a `SharedAccessKey`.
    /// `GatewayHostName`, when present, is dialled and used as the TLS name
    /// (username and token audience keep `HostName`). `ca_pem`: the CA to
    /// trust (an edge CA), or the system roots when `None`.
    pub async fn from_connection_string(cs: &str, ca_pem: Option<&str>) -> Result<Self, Error> {
        Self::from_connection_string_with(cs, ca_pem, ClientOptions::default()).await
    }

    /// [`Self::from_connection_string`] with options.
    pub async fn from_connection_string_with(
        cs: &str,
        ca_pem: Option<&str>,
        opts: ClientOptions,
    ) -> Result<Self, Error> {
        let cs = ConnectionString::parse(cs).map_err(|e| Error::ConnectionString(e.to_string()))?;
        if cs.module_id.is_some() {
            return Err(Error::ConnectionString(
                "has a ModuleId: use ModuleClient for module connection strings".into(),
            ));
        }
        let key = cs.shared_access_key.clone().ok_or_else(|| {
            Error::ConnectionString("no SharedAccessKey (X.509 is not supported)".into())
        })?;
        let id = Identity {
            hub: cs.host_name.clone(),
            client: cs.client_id(),
            dial_host: cs.dial_host().to_owned(),
            gateway: cs.gateway_host_name.clone(),
        };
        let tls = crate::tls::client_config(ca_pem)?;
        let tokens = TokenSource {
            signer: Signer::Key(key),
            hub: id.hub.clone(),
            client: id.client.clone(),
            ttl: opts.sas_ttl,
        };
        let engine = Engine::start(id, opts, tokens, tls).await?;
        Ok(Self {
            engine: Arc::new(engine),
        })
    }

    /// The device id.
    pub fn client_id(&self) -> &ClientId {
        &self.engine.link.id.client
    }

    /// True while the MQTT connection is up.
    pub fn is_connected(&self) -> bool {
        self.engine.link.is_connected()
    }

    /// How many MQTT connections this client has established so far
    /// (reconnects and token renewals each add one).
    pub fn connections(&self) -> u64 {
        self.engine.link.connections()
    }

    /// Waits until the MQTT connection is up.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<(), Error> {
        self.engine.link.wait_connected(timeout).await
    }

    /// Sends telemetry (`devices/{d}/messages/events/{bag}`); resolves after
    /// the hub's PUBACK.
    pub async fn send_event(&self, msg: Message) -> Result<(), Error> {
        let link = &self.engine.link;
        link.send_message(link.events_topic(&msg), &msg).await
    }

    /// Cloud-to-device messages (`devices/{d}/messages/devicebound/#`,
    /// subscribed on the first call); each is acknowledged (PUBACK) when received
    /// from the stream. One stream at a time.
    pub async fn c2d_messages(&self) -> Result<Incoming<Message>, Error> {
        let link = &self.engine.link;
        let filter = format!("devices/{}/messages/devicebound/#", link.id.client.device);
        link.stream(&link.c2d, &filter, "cloud-to-device messages")
            .await
    }

    /// The twin: `{"desired": {…}, "reported": {…}}`.
    pub async fn get_twin(&self) -> Result<Value, Error> {
        self.engine.link.get_twin().await
    }

    /// Patches reported properties; returns the new `$version` when reported.
    pub async fn patch_reported(&self, patch: &Value) -> Result<Option<u64>, Error> {
        self.engine.link.patch_reported(patch).await
    }

    /// Desired-property patches, each with its `$version`. One stream at a time.
    pub async fn desired_patches(&self) -> Result<Incoming<Value>, Error> {
        self.engine.link.desired_patches().await
    }

    /// Sets the direct-method handler and enables methods.
    pub async fn on_method<F, Fut>(&self, handler: F) -> Result<(), Error>
    where
        F: Fn(MethodRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = (i32, Value)> + Send + 'static,
    {
        let h: MethodHandler = Arc::new(move |req| Box::pin(handler(req)));
        self.engine.link.set_method_handler(h).await
    }

    /// Closes the connection now, for this handle and every clone of it.
    pub fn close(&self) {
        self.engine.abort();
    }
}
