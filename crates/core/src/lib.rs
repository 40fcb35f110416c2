//! The model every Verge process shares.
//!
//! Nothing here does I/O: these are the value types and their wire forms —
//! identities ([`id`]), SAS tokens ([`sas`]), connection strings ([`connstr`]),
//! messages with their MQTT property bag and storage encoding ([`message`]),
//! twins ([`twin`]), and the deployment manifest ([`manifest`]).
//! Every parser returns a typed error naming what was wrong; none panics on input.

pub mod connstr;
pub mod id;
pub mod manifest;
pub mod message;
pub mod sas;
pub mod time;
pub mod twin;

pub use connstr::ConnectionString;
pub use id::{ClientId, DeviceId, HubHostname, IdError, ModuleId};
pub use message::{Message, SystemProperties};
pub use sas::{SasError, SasToken, SharedAccessKey};
pub use twin::Twin;
