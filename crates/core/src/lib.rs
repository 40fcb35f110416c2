//! The model every Verge process shares.
//!
//! Nothing here does I/O: these are the value types and their wire forms —
//! identities ([`id`]), SAS tokens ([`sas`]), connection strings ([`connstr`]),
//! messages with their MQTT property bag and storage encoding ([`message`]),
//! twins ([`twin`]), direct-method limits ([`method`]), and the deployment
//! manifest ([`manifest`]).
//! Every parser returns a typed error naming what was wrong; none panics on input.

pub mod connstr;
pub mod id;
pub mod manifest;
pub mod message;
pub mod method;
pub mod pull;
pub mod sas;
pub mod time;
pub mod twin;

pub use connstr::ConnectionString;
pub use id::{ClientId, DeviceId, HubHostname, IdError, ModuleId};
pub use message::{Message, SystemProperties};
pub use sas::{SasError, SasToken, SharedAccessKey};
pub use twin::Twin;

/// "a string", "an object", … for error messages about JSON input.
pub(crate) fn json_type_name(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
