//! `verged`, Verge's security daemon (the counterpart of aziot-edged).
//!
//! * [`config`]: the TOML config file (aziot `config.toml` shape).
//! * [`keys`]: the device key on disk, module identities, derived module keys.
//! * [`ca`]: the edge CA, issued certificates, renewal.
//! * [`cloud_identities`]: module identities registered in the hub as the
//!   device, with the derived keys, so module tokens work in the cloud too.
//! * [`crypto`]: the workload API's encrypt/decrypt scheme.
//! * [`workload`]: the workload API, one Unix socket per module.
//! * [`mgmt`]: the management API for the agent (and the CLI's read-only extensions).
//! * [`supervision`]: the supervised agent's state, for the management API.
//! * [`resources`]: host and per-module resource use from `/proc`.
//! * [`env`]: the environment injected into modules.
//! * [`api`], [`client`]: the APIs' JSON bodies and a small client for both
//!   APIs, defined in `verge-workload` and re-exported here (the hub uses
//!   [`client::WorkloadClient::server_certificate`] for its TLS certificate
//!   and [`client::WorkloadClient::hub_identities`] for the module keys it
//!   checks tokens with, through `verge-workload`).
//! * [`daemon`]: startup, agent watchdog, shutdown.
//!
//! Module keys are never stored: `device_key.derive_module_key(module, generation_id)`
//! (see `verge_core::sas::SharedAccessKey::derive_module_key`), so a hub that
//! knows the device key can verify module SAS tokens offline. A hub run by
//! verged gets the module keys (never the device key) from the workload API
//! instead (`GET /modules/$edgeHub/identities`, see [`workload`]).

pub mod api;
pub mod ca;
pub mod cli;
pub mod client;
pub mod cloud_identities;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod dps;
pub mod env;
pub mod http;
pub mod keys;
pub mod mgmt;
pub mod pulls;
pub mod resources;
pub mod supervision;
pub mod system_images;
pub mod workload;
