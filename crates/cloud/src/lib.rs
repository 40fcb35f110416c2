//! verge-cloud: a self-hosted IoT Hub peer.
//!
//! The library is the cloud's core, [`CloudState`]: device and module
//! registry, twins, deployments, a durable D2C log, C2D queues with feedback
//! and direct methods. Two front ends call it: the service REST API in
//! [`api`] (what IoT Hub's service SDKs speak), and the device endpoint in
//! [`device`] (IoT Hub's MQTT dialect over TLS, and over WebSocket on the
//! service API's port with [`ws`]; verge-endpoint's code shared
//! with the edge hub) that authenticates clients with
//! [`CloudState::verify_device_token`], registers them with
//! [`CloudState::connect`], pushes the [`ConnectionEvent`]s it receives to
//! the client, and feeds back telemetry ([`CloudState::ingest`]), reported
//! properties ([`CloudState::patch_reported`]), method answers
//! ([`CloudState::method_response`]) and C2D settlements
//! ([`CloudState::c2d_settle`]).
//!
//! State lives in one fjall database under the data directory; see the `db` module
//! for the layout and why.

pub mod api;
pub mod c2d;
pub mod certs;
pub mod config;
pub mod conn;
pub mod d2c;
pub(crate) mod db;
pub mod device;
pub mod dps;
pub mod error;
pub mod registry;
mod state;
pub mod tls;
pub(crate) mod twins;
pub mod ws;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_x509;

pub use c2d::{C2dDelivery, Feedback, Settlement};
pub use conn::{Connection, ConnectionEvent, MethodRequest, MethodResponse};
pub use d2c::D2cEntry;
pub use error::CloudError;
pub use registry::{ConnInfo, DeviceRecord, DeviceSpec, DeviceStatus, ModuleRecord, ModuleSpec};
pub use state::{
    CloudOptions, CloudState, DesiredEvent, DeviceInfo, ModuleInfo, SYSTEM_MODULES, TwinInfo,
};
