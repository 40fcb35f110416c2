//! The workload/management API client, defined in `verge-workload` and
//! re-exported here for the daemon's own code and its tests.

pub use verge_workload::client::*;
