//! Diagnostics shared by the `verge` CLI and the agent (edgeAgent's
//! `GetModuleLogs`/`UploadSupportBundle` methods): `since`/`until` values
//! as `iotedge logs` takes them ([`times`]) and the support bundle's
//! secret scrubbing and archive ([`bundle`]). No I/O beyond the writer given.

pub mod bundle;
pub mod times;
