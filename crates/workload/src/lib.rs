//! verged's workload and management APIs as seen by their clients: the JSON
//! bodies ([`api`], field names as aziot's) and a small client for the daemon's
//! Unix sockets ([`client`]).
//!
//! It is its own crate so that the hub, the SDK and the agent can talk to
//! verged without depending on the daemon (and through it on the module
//! runtime and Docker): only `verge-daemon` and `verge-runtime` see Docker.
//! `scripts/test.sh` checks that `verge-sdk` and `verge-hub` stay free of
//! bollard.

pub mod api;
pub mod client;
