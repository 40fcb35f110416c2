//! The deployment manifest: `$edgeAgent` and `$edgeHub` desired properties.

pub mod hub;

pub use hub::{DEFAULT_ROUTE_PRIORITY, RouteSpec};
