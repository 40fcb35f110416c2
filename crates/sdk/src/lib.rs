//! verge-sdk: the device and module SDK of Verge.
//!
//! It speaks the same wire protocol as the Azure IoT device SDKs (MQTT 3.1.1
//! over TLS, clean_session = 0, SAS-token passwords, the `devices/…` and
//! `$iothub/…` topics, HTTPS for module-to-module direct methods), so it works
//! against `verge-hub`, an Azure IoT Edge hub or IoT Hub itself.
//!
//! * [`ModuleClient`]: a module of an edge device. Build it inside a module
//!   started by `verged` with [`ModuleClient::from_edge_environment`] (trust
//!   bundle and token signing through the workload API), or from a module
//!   connection string with [`ModuleClient::from_connection_string`]. A
//!   module that talks to the cloud directly rather than through the edge hub
//!   (verge-agent, as Azure's edgeAgent) uses
//!   [`ModuleClient::from_edge_upstream`].
//! * [`DeviceClient`]: a (downstream) device, from a device connection string;
//!   `GatewayHostName` is honoured (dialled, and used as TLS name).
//!
//! Reliability: sends resolve only after the hub's PUBACK; a send made while
//! disconnected waits for the reconnect (at most [`ClientOptions::send_queue`]
//! sends may wait, more fail with [`Error::QueueFull`]). The client
//! reconnects with exponential back-off, renews its SAS token before expiry by
//! reconnecting on the same persistent session, subscribes once per feature and
//! subscribes again only when the server reports it lost the session.
//!
//! # Module
//!
//! ```no_run
//! use verge_sdk::{Message, ModuleClient};
//!
//! # async fn demo() -> Result<(), verge_sdk::Error> {
//! let client = ModuleClient::from_edge_environment().await?;
//! let mut inputs = client.inputs().await?;
//! client
//!     .on_method(|req| async move { (200, serde_json::json!({ "echo": req.payload })) })
//!     .await?;
//! while let Some(input) = inputs.recv().await {
//!     let mut out = Message::new(input.message.body.clone());
//!     out.properties.insert("seen", "true");
//!     client.send_output("output1", out).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! # Device
//!
//! ```no_run
//! use verge_sdk::{DeviceClient, Message};
//!
//! # async fn demo(ca_pem: &str) -> Result<(), verge_sdk::Error> {
//! let cs = "HostName=myhub.azure-devices.net;DeviceId=leaf1;SharedAccessKey=…;GatewayHostName=edge.local";
//! let client = DeviceClient::from_connection_string(cs, Some(ca_pem)).await?;
//! client.send_event(Message::new(r#"{"t":21.5}"#)).await?;
//! let twin = client.get_twin().await?;
//! println!("desired: {}", twin["desired"]);
//! let mut c2d = client.c2d_messages().await?;
//! while let Some(msg) = c2d.recv().await {
//!     println!("cloud says {:?}", msg.body);
//! }
//! # Ok(()) }
//! ```
//!
//! Tests can move the ports off 8883/443 with [`ClientOptions`] (the Azure SDKs
//! cannot).
//!
//! # Example modules
//!
//! Two workspace crates built on this SDK, each a library (the module logic,
//! testable in-process) plus a binary that runs it with
//! [`ModuleClient::from_edge_environment`]:
//! `crates/simulated-temperature-sensor` (package
//! `verge-simulated-temperature-sensor`) and `crates/filter-module` (package
//! `verge-filter-module`). Their end-to-end test (sensor → filter → observer
//! through an in-process hub) is `crates/filter-module/tests/pipeline.rs`.

mod auth;
mod device;
mod edge;
mod engine;
mod methods;
mod module;
mod tls;

use std::time::Duration;

pub use device::DeviceClient;
pub use edge::EdgeEnvironment;
pub use engine::{Incoming, InputMessage, MethodRequest};
pub use methods::MethodResult;
pub use module::ModuleClient;
pub use tls::client_config_upstream as upstream_tls_config;
pub use verge_core::Message;

/// Resolves on SIGTERM or SIGINT: what a module's `main` waits for to stop.
///
/// A module in a container is PID 1, and the kernel gives PID 1 no default
/// action for SIGTERM: without a handler, `docker stop` (and so the agent
/// removing or updating the module) waits out its timeout and kills it.
pub async fn stop_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Errors of the SDK.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A connection string could not be parsed or is of the wrong kind.
    #[error("connection string: {0}")]
    ConnectionString(String),
    /// The module environment is incomplete.
    #[error("IoT Edge environment not configured correctly: {0}")]
    Environment(String),
    /// The workload API failed (trust bundle or signing).
    #[error("workload API: {0}")]
    Workload(String),
    /// TLS setup failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// Too many sends are waiting for the hub; nothing was queued.
    #[error("send queue is full")]
    QueueFull,
    /// The message exceeds IoT Hub's size limit.
    #[error("{0}")]
    MessageTooLarge(String),
    /// A topic the MQTT client refused (bad output name?).
    #[error("invalid topic {0:?}")]
    InvalidTopic(String),
    /// The hub refused a subscription.
    #[error("subscription to {0} refused")]
    SubscriptionRefused(String),
    /// A stream of this kind is already being received.
    #[error("{0} are already being received by another stream")]
    AlreadyReceiving(&'static str),
    /// Something did not happen in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// The service answered with an error status.
    #[error("service error {status}: {message}")]
    Service {
        /// Status code.
        status: u16,
        /// Body or message.
        message: String,
    },
    /// An HTTP request failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// The peer sent something unexpected.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The operation is not available for this client.
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    /// The client was closed.
    #[error("client closed")]
    Closed,
}

/// Connection options. The defaults match the Azure SDKs.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// MQTT-over-TLS port (default 8883).
    pub port: u16,
    /// HTTPS port for module-to-module method invocation (default 443).
    pub https_port: u16,
    /// MQTT keep-alive (default 60 s).
    pub keep_alive: Duration,
    /// Lifetime of the SAS tokens this client makes (default 1 h). Tokens are
    /// renewed 120 s before expiry (a quarter of the lifetime for short ones).
    pub sas_ttl: Duration,
    /// How many sends may wait for their PUBACK at once (default 1000).
    pub send_queue: usize,
    /// Capacity of each receive queue: inputs, C2D, desired patches (default 256).
    pub receive_queue: usize,
    /// Reconnect delay reached after the fast first retries (default 1 s):
    /// after a failed connection the client retries after 50 ms (or this, if
    /// shorter), doubling up to this value, then keeps doubling up to
    /// `reconnect_max`. Reset on every successful connection.
    pub reconnect_min: Duration,
    /// Longest reconnect delay (default 30 s).
    pub reconnect_max: Duration,
    /// Timeout of subscriptions and twin operations (default 60 s).
    pub operation_timeout: Duration,
    /// Appended to the `DeviceClientType` user agent.
    pub product_info: String,
    /// MQTT over WebSocket (`wss://{host}:{port}/$iothub/websocket`,
    /// subprotocol `mqtt`) instead of MQTT over TLS; `port` is then the
    /// WebSocket's (IoT Hub: 443). Default false.
    pub websocket: bool,
    /// The HTTP proxy a WebSocket connection tunnels through (CONNECT);
    /// ignored without `websocket`. Default none.
    pub proxy: Option<verge_dial::Proxy>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            port: 8883,
            https_port: 443,
            keep_alive: Duration::from_secs(60),
            sas_ttl: Duration::from_secs(3600),
            send_queue: 1000,
            receive_queue: 256,
            reconnect_min: Duration::from_secs(1),
            reconnect_max: Duration::from_secs(30),
            operation_timeout: Duration::from_secs(60),
            product_info: String::new(),
            websocket: false,
            proxy: None,
        }
    }
}
