//! JSON bodies of the workload and management APIs: defined in
//! `verge-workload` (so the hub, the SDK and the agent need not depend on the
//! daemon), re-exported here for the daemon's own code.

pub use verge_workload::api::*;

impl From<crate::keys::ModuleIdentity> for IdentityJson {
    fn from(i: crate::keys::ModuleIdentity) -> Self {
        Self {
            module_id: i.module_id,
            managed_by: i.managed_by,
            generation_id: i.generation_id,
            auth_type: i.auth_type,
        }
    }
}
