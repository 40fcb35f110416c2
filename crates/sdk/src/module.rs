//! [`ModuleClient`]: a module of an edge device.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use verge_core::{ClientId, ConnectionString, DeviceId, HubHostname, Message, ModuleId};
use verge_workload::client::{WorkloadClient, socket_path_from_uri};

use crate::auth::{Signer, TokenSource};
use crate::edge::EdgeEnvironment;
use crate::engine::{Engine, Identity, Incoming, InputMessage, MethodHandler, MethodRequest};
use crate::methods::MethodResult;
use crate::{ClientOptions, Error};

/// A module client. Cheap to clone; the connection closes when the last clone
/// is dropped (or on [`ModuleClient::close`]).
#[derive(Clone)]
pub struct ModuleClient {
    engine: Arc<Engine>,
    http: reqwest::Client,
}

impl std::fmt::Debug for ModuleClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleClient")
            .field("client", &self.engine.link.id.client)
            .field("dial_host", &self.engine.link.id.dial_host)
            .finish_non_exhaustive()
    }
}

fn env_err(e: impl std::fmt::Display) -> Error {
    Error::Environment(e.to_string())
}

impl ModuleClient {
    /// Inside a module started by `verged` / IoT Edge: reads the `IOTEDGE_*`
    /// variables, fetches the trust bundle from the workload API and signs
    /// tokens through it. If those variables are incomplete, falls back to the
    /// local-debug pair `EdgeHubConnectionString` + `EdgeModuleCACertificateFile`.
    pub async fn from_edge_environment() -> Result<Self, Error> {
        Self::from_edge_environment_with(ClientOptions::default()).await
    }

    /// [`Self::from_edge_environment`] with options.
    pub async fn from_edge_environment_with(opts: ClientOptions) -> Result<Self, Error> {
        match EdgeEnvironment::from_env() {
            Ok(env) => Self::from_edge(&env, opts).await,
            Err(e) => {
                let (Ok(cs), Ok(ca)) = (
                    std::env::var("EdgeHubConnectionString"),
                    std::env::var("EdgeModuleCACertificateFile"),
                ) else {
                    return Err(e);
                };
                let pem = tokio::fs::read_to_string(&ca)
                    .await
                    .map_err(|e| Error::Environment(format!("{ca}: {e}")))?;
                Self::from_connection_string_with(&cs, Some(&pem), opts).await
            }
        }
    }

    /// From an explicit [`EdgeEnvironment`] (what [`Self::from_edge_environment`] reads).
    pub async fn from_edge(env: &EdgeEnvironment, opts: ClientOptions) -> Result<Self, Error> {
        let socket = socket_path_from_uri(&env.workload_uri).ok_or_else(|| {
            Error::Environment(format!(
                "IOTEDGE_WORKLOADURI {:?} is not unix:///path",
                env.workload_uri
            ))
        })?;
        let workload = WorkloadClient::new(socket, &env.module_id, &env.generation_id);
        let ca = workload
            .trust_bundle()
            .await
            .map_err(|e| Error::Workload(format!("trust bundle: {e}")))?;
        let client = ClientId::module(
            DeviceId::new(env.device_id.as_str()).map_err(env_err)?,
            ModuleId::new(env.module_id.as_str()).map_err(env_err)?,
        );
        let id = Identity {
            hub: HubHostname::new(env.iothub_hostname.as_str()).map_err(env_err)?,
            client,
            dial_host: env.gateway_hostname.clone(),
            gateway: Some(env.gateway_hostname.clone()),
        };
        Self::start(id, Signer::Workload(workload), Some(&ca), opts).await
    }

    /// A module talking to the cloud directly rather than through the edge
    /// hub, as Azure's edgeAgent does: it dials `env.gateway_hostname` (see
    /// [`EdgeEnvironment::from_env_upstream`]: the IoT hub, or the parent
    /// device when nested) on `opts.port`, signs tokens through the workload
    /// API, and trusts the workload API's trust bundle, `extra_ca_pem` and the
    /// system roots. Direct-method invocation through a gateway is only
    /// available when nested.
    pub async fn from_edge_upstream(
        env: &EdgeEnvironment,
        opts: ClientOptions,
        extra_ca_pem: Option<&str>,
    ) -> Result<Self, Error> {
        let socket = socket_path_from_uri(&env.workload_uri).ok_or_else(|| {
            Error::Environment(format!(
                "IOTEDGE_WORKLOADURI {:?} is not unix:///path",
                env.workload_uri
            ))
        })?;
        let workload = WorkloadClient::new(socket, &env.module_id, &env.generation_id);
        let bundle = workload
            .trust_bundle()
            .await
            .map_err(|e| Error::Workload(format!("trust bundle: {e}")))?;
        let mut pems = vec![bundle.as_str()];
        pems.extend(extra_ca_pem);
        let tls = crate::tls::client_config_upstream(&pems)?;
        let client = ClientId::module(
            DeviceId::new(env.device_id.as_str()).map_err(env_err)?,
            ModuleId::new(env.module_id.as_str()).map_err(env_err)?,
        );
        let hub = HubHostname::new(env.iothub_hostname.as_str()).map_err(env_err)?;
        let nested = !env.gateway_hostname.eq_ignore_ascii_case(hub.as_str());
        let id = Identity {
            hub,
            client,
            dial_host: env.gateway_hostname.clone(),
            gateway: nested.then(|| env.gateway_hostname.clone()),
        };
        Self::start_with_tls(id, Signer::Workload(workload), tls, opts).await
    }

    /// From a module connection string with a `SharedAccessKey` (tokens signed
    /// locally). `GatewayHostName`, when present, is dialled and enables
    /// [`Self::invoke_method`]. `ca_pem`: the CA to trust (the edge CA), or the
    /// system roots when `None`.
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
        if cs.module_id.is_none() {
            return Err(Error::ConnectionString(
                "no ModuleId: use DeviceClient for device connection strings".into(),
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
        Self::start(id, Signer::Key(key), ca_pem, opts).await
    }

    async fn start(
        id: Identity,
        signer: Signer,
        ca_pem: Option<&str>,
        opts: ClientOptions,
    ) -> Result<Self, Error> {
        let tls = crate::tls::client_config(ca_pem)?;
        Self::start_with_tls(id, signer, tls, opts).await
    }

    async fn start_with_tls(
        id: Identity,
        signer: Signer,
        tls: Arc<rustls::ClientConfig>,
        opts: ClientOptions,
    ) -> Result<Self, Error> {
        let tokens = TokenSource {
            signer,
            hub: id.hub.clone(),
            client: id.client.clone(),
            ttl: opts.sas_ttl,
        };
        let engine = Engine::start(id, opts, tokens, tls).await?;
        let http = crate::methods::http_client(&engine.link)?;
        Ok(Self {
            engine: Arc::new(engine),
            http,
        })
    }

    /// `{deviceId}/{moduleId}`.
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

    /// Sends telemetry (`devices/{d}/modules/{m}/messages/events/{bag}`);
    /// resolves after the hub's PUBACK.
    pub async fn send_event(&self, msg: Message) -> Result<(), Error> {
        let link = &self.engine.link;
        link.send_message(link.events_topic(&msg), &msg).await
    }

    /// Sends `msg` to output `output` (`$.on` in the property bag); resolves
    /// after the hub's PUBACK.
    pub async fn send_output(&self, output: &str, mut msg: Message) -> Result<(), Error> {
        msg.system.output_name = Some(output.to_owned());
        self.send_event(msg).await
    }

    /// Messages arriving on any input (`devices/{d}/modules/{m}/inputs/#`,
    /// subscribed on the first call). One stream at a time.
    pub async fn inputs(&self) -> Result<Incoming<InputMessage>, Error> {
        let link = &self.engine.link;
        let filter = format!(
            "{}/inputs/#",
            link.id.client.resource().trim_start_matches('/')
        );
        link.stream(&link.inputs, &filter, "inputs").await
    }

    /// The twin as the device sees it: `{"desired": {…}, "reported": {…}}`.
    pub async fn get_twin(&self) -> Result<Value, Error> {
        self.engine.link.get_twin().await
    }

    /// Patches reported properties (`null` deletes); returns the new `$version`
    /// when the hub reports it.
    pub async fn patch_reported(&self, patch: &Value) -> Result<Option<u64>, Error> {
        self.engine.link.patch_reported(patch).await
    }

    /// Desired-property patches, each with its `$version`. One stream at a time.
    pub async fn desired_patches(&self) -> Result<Incoming<Value>, Error> {
        self.engine.link.desired_patches().await
    }

    /// Sets the direct-method handler (replacing an earlier one) and enables
    /// methods. The handler returns the status and JSON payload of the answer.
    pub async fn on_method<F, Fut>(&self, handler: F) -> Result<(), Error>
    where
        F: Fn(MethodRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = (i32, Value)> + Send + 'static,
    {
        let h: MethodHandler = Arc::new(move |req| Box::pin(handler(req)));
        self.engine.link.set_method_handler(h).await
    }

    /// Invokes method `method` on `device` (or on its module `module`) through
    /// the edge hub's HTTPS API. Needs a gateway (edge environment, or a
    /// connection string with `GatewayHostName`).
    pub async fn invoke_method(
        &self,
        device: &str,
        module: Option<&str>,
        method: &str,
        payload: Value,
        timeout: Duration,
    ) -> Result<MethodResult, Error> {
        crate::methods::invoke(
            &self.engine.link,
            &self.http,
            device,
            module,
            method,
            payload,
            timeout,
        )
        .await
    }

    /// Closes the connection now, for this handle and every clone of it.
    pub fn close(&self) {
        self.engine.abort();
    }
}
