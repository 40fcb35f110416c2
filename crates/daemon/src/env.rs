//! The environment verged injects into modules (reference §7.4).

use std::collections::BTreeMap;
use std::path::Path;

use crate::api::{MANAGEMENT_API_VERSION, WORKLOAD_API_VERSION};
use crate::keys::{ModuleIdentity, runtime_name};

/// How a module finds its workload socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkloadUriStyle {
    /// Process modules: `unix://<host path of the module's own socket>`.
    HostSocket,
    /// Containers: the socket is bind-mounted at this URI (`[connect] workload_uri`).
    Fixed(String),
}

/// Device-wide facts for the environment.
#[derive(Debug, Clone)]
pub struct EnvContext {
    /// IoT hub hostname.
    pub iothub_hostname: String,
    /// Device id.
    pub device_id: String,
    /// This device's hostname.
    pub hostname: String,
    /// Parent hostname (nested edge).
    pub parent_hostname: Option<String>,
    /// Workload URI style.
    pub workload_uri: WorkloadUriStyle,
}

/// True for `edgeAgent`/`edgeHub` (either name form).
pub fn is_system_module(name: &str) -> bool {
    matches!(runtime_name(name), "edgeAgent" | "edgeHub")
}

/// The environment of a module: `user_env` plus the injected variables (which win).
pub fn module_env(
    ctx: &EnvContext,
    identity: &ModuleIdentity,
    socket_path: &Path,
    user_env: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut env = user_env.clone();
    let workload_uri = match &ctx.workload_uri {
        WorkloadUriStyle::HostSocket => format!("unix://{}", socket_path.display()),
        WorkloadUriStyle::Fixed(u) => u.clone(),
    };
    let mut set = |k: &str, v: &str| {
        env.insert(k.to_owned(), v.to_owned());
    };
    set("IOTEDGE_WORKLOADURI", &workload_uri);
    set("IOTEDGE_AUTHSCHEME", "sasToken");
    set("IOTEDGE_MODULEGENERATIONID", &identity.generation_id);
    set("IOTEDGE_IOTHUBHOSTNAME", &ctx.iothub_hostname);
    set("IOTEDGE_DEVICEID", &ctx.device_id);
    set("IOTEDGE_MODULEID", &identity.module_id);
    set("IOTEDGE_APIVERSION", WORKLOAD_API_VERSION);
    if is_system_module(&identity.module_id) {
        set("EdgeDeviceHostName", &ctx.hostname);
        if let Some(parent) = &ctx.parent_hostname {
            set("IOTEDGE_GATEWAYHOSTNAME", parent);
        }
    } else {
        set("IOTEDGE_GATEWAYHOSTNAME", &ctx.hostname);
        if let Some(parent) = &ctx.parent_hostname {
            set("IOTEDGE_PARENTHOSTNAME", parent);
        }
    }
    env
}

/// The agent's environment: the module environment plus the management URI,
/// the workload socket directory, the docker network and `Mode=iotedged`.
pub fn agent_env(
    ctx: &EnvContext,
    identity: &ModuleIdentity,
    socket_path: &Path,
    user_env: &BTreeMap<String, String>,
    management_uri: &str,
    workload_dir: &Path,
    network: Option<&str>,
) -> BTreeMap<String, String> {
    let mut env = module_env(ctx, identity, socket_path, user_env);
    env.insert("IOTEDGE_APIVERSION".into(), MANAGEMENT_API_VERSION.into());
    env.insert("IOTEDGE_MANAGEMENTURI".into(), management_uri.into());
    env.insert(
        "IOTEDGE_WORKLOADLISTEN_MNTURI".into(),
        format!("unix://{}", workload_dir.display()),
    );
    if let Some(n) = network {
        env.insert("NetworkId".into(), n.into());
    }
    env.insert("Mode".into(), "iotedged".into());
    env
}

/// Where a process agent serves its metrics unless its environment says:
/// it shares the host's network with the edge hub, which keeps edgeHub's
/// 9600 (in Docker each has its own network, and both use 9600 as in IoT
/// Edge).
pub const PROCESS_AGENT_METRICS_LISTEN: &str = "0.0.0.0:9601";

/// Gives a process agent its own metrics port (see
/// [`PROCESS_AGENT_METRICS_LISTEN`]) unless its environment sets one.
pub fn process_agent_metrics(env: &mut BTreeMap<String, String>) {
    if !env.contains_key("VERGE_AGENT_METRICS_LISTEN")
        && !env.contains_key("Metrics__Listener__Port")
    {
        env.insert(
            "VERGE_AGENT_METRICS_LISTEN".into(),
            PROCESS_AGENT_METRICS_LISTEN.into(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_agent_leaves_9600_to_the_hub_unless_told() {
        let mut env = BTreeMap::new();
        process_agent_metrics(&mut env);
        assert_eq!(env["VERGE_AGENT_METRICS_LISTEN"], "0.0.0.0:9601");
        for (k, v) in [
            ("VERGE_AGENT_METRICS_LISTEN", "127.0.0.1:9700"),
            ("Metrics__Listener__Port", "9800"),
        ] {
            let mut env = BTreeMap::from([(k.to_owned(), v.to_owned())]);
            process_agent_metrics(&mut env);
            assert_eq!(env.len(), 1, "{env:?}");
        }
    }

    fn ctx(parent: Option<&str>) -> EnvContext {
        EnvContext {
            iothub_hostname: "hub.example.net".into(),
            device_id: "dev1".into(),
            hostname: "edge1.local".into(),
            parent_hostname: parent.map(str::to_owned),
            workload_uri: WorkloadUriStyle::HostSocket,
        }
    }

    fn ident(id: &str) -> ModuleIdentity {
        ModuleIdentity {
            module_id: id.into(),
            generation_id: "637000000000000001".into(),
            managed_by: "iotedge".into(),
            auth_type: "Sas".into(),
        }
    }

    #[test]
    fn user_module_env() {
        let mut user = BTreeMap::new();
        user.insert("A".to_owned(), "1".to_owned());
        user.insert("IOTEDGE_MODULEID".to_owned(), "spoofed".to_owned());
        let e = module_env(
            &ctx(None),
            &ident("modA"),
            Path::new("/h/mnt/modA.sock"),
            &user,
        );
        assert_eq!(e["A"], "1");
        assert_eq!(e["IOTEDGE_MODULEID"], "modA");
        assert_eq!(e["IOTEDGE_WORKLOADURI"], "unix:///h/mnt/modA.sock");
        assert_eq!(e["IOTEDGE_AUTHSCHEME"], "sasToken");
        assert_eq!(e["IOTEDGE_APIVERSION"], "2019-01-30");
        assert_eq!(e["IOTEDGE_GATEWAYHOSTNAME"], "edge1.local");
        assert_eq!(e["IOTEDGE_IOTHUBHOSTNAME"], "hub.example.net");
        assert_eq!(e["IOTEDGE_DEVICEID"], "dev1");
        assert_eq!(e["IOTEDGE_MODULEGENERATIONID"], "637000000000000001");
        assert!(!e.contains_key("EdgeDeviceHostName"));
        let nested = module_env(&ctx(Some("p")), &ident("modA"), Path::new("/s"), &user);
        assert_eq!(nested["IOTEDGE_PARENTHOSTNAME"], "p");
    }

    #[test]
    fn system_module_env() {
        let e = module_env(
            &ctx(None),
            &ident("$edgeHub"),
            Path::new("/s"),
            &BTreeMap::new(),
        );
        assert_eq!(e["EdgeDeviceHostName"], "edge1.local");
        assert!(!e.contains_key("IOTEDGE_GATEWAYHOSTNAME"));
        let e = module_env(
            &ctx(Some("parent")),
            &ident("$edgeHub"),
            Path::new("/s"),
            &BTreeMap::new(),
        );
        assert_eq!(e["IOTEDGE_GATEWAYHOSTNAME"], "parent");
        let mut c = ctx(None);
        c.workload_uri = WorkloadUriStyle::Fixed("unix:///var/run/iotedge/workload.sock".into());
        let a = agent_env(
            &c,
            &ident("$edgeAgent"),
            Path::new("/s"),
            &BTreeMap::new(),
            "unix:///h/mgmt.sock",
            Path::new("/h/mnt"),
            Some("azure-iot-edge"),
        );
        assert_eq!(a["IOTEDGE_APIVERSION"], "2022-08-03");
        assert_eq!(a["IOTEDGE_MANAGEMENTURI"], "unix:///h/mgmt.sock");
        assert_eq!(
            a["IOTEDGE_WORKLOADURI"],
            "unix:///var/run/iotedge/workload.sock"
        );
        assert_eq!(a["NetworkId"], "azure-iot-edge");
        assert_eq!(a["Mode"], "iotedged");
    }
}
