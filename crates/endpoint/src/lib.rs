//! verge-endpoint: the device side of an IoT Hub, speaking IoT Hub's MQTT
//! 3.1.1 dialect, shared by the edge hub (`verge-hub`) and the self-hosted
//! cloud (`verge-cloud`). It owns the wire and the sessions; what a publish
//! *means* (routing, storage, twins, methods) belongs to a [`Backend`].
//!
//! | module | role |
//! |---|---|
//! | [`connection`] | one MQTT connection: CONNECT, keep-alive, packet loop, bounded inflight (any byte stream) |
//! | [`session`] | persistent sessions (subscriptions survive reconnects and restarts), takeover, outbound queues |
//! | [`topic`] | topic classification, filter matching, per-identity authorization |
//! | [`auth`] | what a client presents ([`auth::Credentials`]: ids, SAS password, TLS client certificates) and why it is refused ([`auth::AuthError`]) |
//! | [`ws`] | a WebSocket as a byte stream, for MQTT over WebSocket |
//!
//! A backend pushes to a connected client (method requests, desired
//! patches, C2D, module inputs) through [`session::Sessions::deliverable`]
//! or the [`session::ConnHandle`] it is given at connect: an
//! [`session::Outbound`] whose `ack` fires on the client's PUBACK.

pub mod auth;
pub mod connection;
pub mod session;
pub mod topic;
pub mod ws;

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use verge_core::ClientId;

use crate::auth::{AuthError, Credentials};
use crate::session::{ConnHandle, Sessions};

/// Protocol limits of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time a client has to send CONNECT.
    pub connect_timeout: Duration,
    /// Unacknowledged QoS 1 publishes to the client.
    pub max_inflight: usize,
    /// Largest packet accepted, bytes.
    pub max_packet_bytes: usize,
}

/// A backend's refusal of a request, with the status IoT Hub would answer
/// (used on twin response topics; a refused telemetry message closes the
/// connection, as it gets no PUBACK).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct Rejection {
    /// HTTP-style status (400, 404, 429, 500…).
    pub status: u16,
    /// Why (logged).
    pub message: String,
}

impl Rejection {
    /// A rejection with `status`.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }
}

/// What the endpoint asks of the IoT Hub behind it. Methods are called from
/// the connection's task; their futures must be `Send`.
///
/// Settlement of what the backend sends (C2D completion, a module input's
/// checkpoint) is not a method: the backend puts a oneshot in
/// [`session::Outbound::ack`], fired when the client PUBACKs that publish and
/// dropped if the connection ends first.
pub trait Backend: Send + Sync + 'static {
    /// Kept for the life of one connection (from [`Backend::connected`] to
    /// [`Backend::disconnected`]), e.g. a registration with the backend.
    type Link: Send;

    /// The connection limits.
    fn limits(&self) -> Limits;

    /// The session registry clients attach to.
    fn sessions(&self) -> &Sessions;

    /// Who the CONNECT is from; any error answers CONNACK 5 (not authorized).
    fn authenticate(
        &self,
        creds: &Credentials<'_>,
    ) -> impl Future<Output = Result<ClientId, AuthError>> + Send;

    /// The client is authenticated and attached to its session (`conn` is
    /// its outbound queue); called before CONNACK. An error refuses the
    /// connection (CONNACK 3, server unavailable).
    fn connected(
        &self,
        client: &ClientId,
        conn: &ConnHandle,
    ) -> impl Future<Output = Result<Self::Link, Rejection>> + Send;

    /// The connection ended (after it left its session).
    fn disconnected(&self, client: &ClientId, link: Self::Link) -> impl Future<Output = ()> + Send {
        let _ = client;
        async move { drop(link) }
    }

    /// What [`Backend::telemetry_submit`] hands back for a message whose
    /// durability may still be pending (e.g. a store receipt).
    type Pending: Send;

    /// Accepts telemetry `{bag}` + `payload` from `client` and starts making
    /// it durable. Calls made by one connection must take effect in call
    /// order (so its messages keep their order), and the returned future
    /// should finish as soon as the message is queued: the connection keeps
    /// several submissions in flight and sends each PUBACK only after
    /// [`Backend::telemetry_wait`] on it returned `Ok`. An error (here or
    /// there) closes the connection, the message unacknowledged.
    fn telemetry_submit(
        &self,
        client: &ClientId,
        bag: &str,
        payload: Bytes,
    ) -> impl Future<Output = Result<Self::Pending, Rejection>> + Send;

    /// Completes once the submitted message is durable (`Ok` = PUBACK may be
    /// sent). Must be cancel-safe: the connection polls it from a `select!`
    /// and calls it again on the same `pending` until it completes.
    fn telemetry_wait(
        &self,
        pending: &mut Self::Pending,
    ) -> impl Future<Output = Result<(), Rejection>> + Send;

    /// The twin as a device GETs it: `{"desired": {…}, "reported": {…}}`.
    fn twin_get(&self, client: &ClientId) -> impl Future<Output = Result<Value, Rejection>> + Send;

    /// Merges a reported-properties patch; returns the new reported version.
    fn twin_patch_reported(
        &self,
        client: &ClientId,
        patch: Value,
    ) -> impl Future<Output = Result<u64, Rejection>> + Send;

    /// The client's answer (`$iothub/methods/res/{status}/?$rid={rid}`) to a
    /// method request the backend pushed.
    fn method_response(
        &self,
        client: &ClientId,
        rid: &str,
        status: i64,
        payload: Bytes,
    ) -> impl Future<Output = ()> + Send;
}
