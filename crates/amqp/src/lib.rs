//! verge-amqp: the device side of an IoT Hub over AMQP 1.0, the AMQP sibling
//! of `verge-endpoint` (MQTT). It speaks the wire (security layer, `$cbs`,
//! IoT Hub link addresses, message mapping) and hands what a transfer
//! *means* to the same [`verge_endpoint::Backend`] the MQTT endpoint uses, so
//! every backend that serves MQTT serves AMQP by plugging in.
//!
//! | module | role |
//! |---|---|
//! | [`connection`] | one AMQP connection: header sniffing, SASL, sessions, links, token expiry |
//! | [`sasl`] | the SASL mechanisms clients use: ANONYMOUS, MSSBCBS, PLAIN |
//! | [`cbs`] | the `$cbs` node: put-token per identity, typed replies |
//! | [`address`] | IoT Hub link addresses → identity and link kind |
//! | [`convert`] | AMQP message ↔ IoT Hub property bag |
//! | `links` | what the backend's deliveries become on which link; twin and method messages |
//! | [`Checked`] | the endpoint's inbound frame check, for a client's connection (the hub's AMQP upstream) |
//!
//! Authorization is per link: every link names its identity in its address
//! and is only opened when that identity holds a valid token on this
//! connection (from `$cbs` or SASL PLAIN), or, with no token, when the
//! backend authenticates that identity by the client certificate of the TLS
//! handshake ([`serve_with_certs`]: X.509 devices, as over MQTT); a token
//! that expires closes that identity's links with `amqp:unauthorized-access`.

pub mod address;
pub mod cbs;
pub mod connection;
pub mod convert;
mod encoding;
mod links;
pub mod sasl;
mod stream;

use std::time::Duration;

pub use connection::{serve, serve_with_certs};
pub use stream::Checked;

/// Limits and deadlines of the AMQP endpoint.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Time a client has from its first byte to a completed OPEN (protocol
    /// header, SASL, OPEN).
    pub open_timeout: Duration,
    /// A connection with no valid token (put-token or PLAIN) for this long
    /// is closed.
    pub auth_timeout: Duration,
    /// Largest AMQP frame accepted (and offered in OPEN).
    pub max_frame_size: u32,
    /// Largest message accepted on a link (IoT Hub's 256 KB plus room for
    /// the AMQP sections around the body).
    pub max_message_size: u64,
    /// Idle timeout offered in OPEN: the client must send something (a
    /// heartbeat) at least this often.
    pub idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            open_timeout: Duration::from_secs(10),
            auth_timeout: Duration::from_secs(60),
            max_frame_size: 64 * 1024,
            max_message_size: (verge_core::message::MAX_MESSAGE_SIZE + 64 * 1024) as u64,
            idle_timeout: Duration::from_secs(240),
        }
    }
}
