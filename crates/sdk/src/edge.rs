//! The module environment injected by `verged` (and Azure's aziot-edged).

use crate::Error;

/// The seven `IOTEDGE_*` variables a module is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeEnvironment {
    /// `IOTEDGE_IOTHUBHOSTNAME`: the IoT hub (username and token audience).
    pub iothub_hostname: String,
    /// `IOTEDGE_DEVICEID`.
    pub device_id: String,
    /// `IOTEDGE_MODULEID`.
    pub module_id: String,
    /// `IOTEDGE_GATEWAYHOSTNAME`: the edge hub, dialled and used as TLS name
    /// (for [`Self::from_env_upstream`]: the parent, or else the IoT hub).
    pub gateway_hostname: String,
    /// `IOTEDGE_MODULEGENERATIONID`.
    pub generation_id: String,
    /// `IOTEDGE_WORKLOADURI`, `unix:///path/to/workload.sock`.
    pub workload_uri: String,
    /// `IOTEDGE_APIVERSION` (informational: the workload client sends the
    /// version `verged` implements).
    pub api_version: String,
}

const VARS: [&str; 7] = [
    "IOTEDGE_IOTHUBHOSTNAME",
    "IOTEDGE_DEVICEID",
    "IOTEDGE_MODULEID",
    "IOTEDGE_GATEWAYHOSTNAME",
    "IOTEDGE_MODULEGENERATIONID",
    "IOTEDGE_WORKLOADURI",
    "IOTEDGE_APIVERSION",
];

impl EdgeEnvironment {
    /// Reads all seven variables; the error names the missing ones.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Same, from any lookup function (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        Self::lookup(get, false)
    }

    /// The environment of a client that talks to the cloud directly, as
    /// edgeAgent does: verged gives edgeAgent and edgeHub no
    /// `IOTEDGE_GATEWAYHOSTNAME` unless the device is nested (reference §7.4),
    /// so it is optional here and [`Self::gateway_hostname`] becomes the host
    /// to dial: the parent when nested, else `IOTEDGE_IOTHUBHOSTNAME`.
    pub fn from_env_upstream() -> Result<Self, Error> {
        Self::from_lookup_upstream(|k| std::env::var(k).ok())
    }

    /// [`Self::from_env_upstream`] from any lookup function (tests).
    pub fn from_lookup_upstream(get: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        Self::lookup(get, true)
    }

    fn lookup(get: impl Fn(&str) -> Option<String>, upstream: bool) -> Result<Self, Error> {
        let values: Vec<Option<String>> = VARS
            .iter()
            .map(|k| {
                let v = get(k).filter(|v| !v.is_empty());
                if upstream && *k == "IOTEDGE_GATEWAYHOSTNAME" {
                    v.or_else(|| get("IOTEDGE_IOTHUBHOSTNAME").filter(|v| !v.is_empty()))
                } else {
                    v
                }
            })
            .collect();
        let missing: Vec<&str> = VARS
            .iter()
            .zip(&values)
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| *k)
            .collect();
        if !missing.is_empty() {
            return Err(Error::Environment(format!(
                "missing {}",
                missing.join(", ")
            )));
        }
        let mut it = values.into_iter().flatten();
        let mut next = || it.next().unwrap_or_default();
        Ok(Self {
            iothub_hostname: next(),
            device_id: next(),
            module_id: next(),
            gateway_hostname: next(),
            generation_id: next(),
            workload_uri: next(),
            api_version: next(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_all_seven_and_names_missing_ones() {
        let full = |k: &str| Some(format!("v-{k}"));
        let env = EdgeEnvironment::from_lookup(full).unwrap();
        assert_eq!(env.module_id, "v-IOTEDGE_MODULEID");
        assert_eq!(env.api_version, "v-IOTEDGE_APIVERSION");
        let partial = |k: &str| (k != "IOTEDGE_WORKLOADURI").then(|| "x".to_owned());
        let e = EdgeEnvironment::from_lookup(partial)
            .unwrap_err()
            .to_string();
        assert!(e.contains("IOTEDGE_WORKLOADURI"), "{e}");
        assert!(!e.contains("IOTEDGE_DEVICEID"), "{e}");
    }

    #[test]
    fn upstream_dials_the_hub_unless_nested() {
        let agent = |k: &str| (k != "IOTEDGE_GATEWAYHOSTNAME").then(|| format!("v-{k}"));
        assert!(EdgeEnvironment::from_lookup(agent).is_err());
        let env = EdgeEnvironment::from_lookup_upstream(agent).unwrap();
        assert_eq!(env.gateway_hostname, "v-IOTEDGE_IOTHUBHOSTNAME");
        let nested = |k: &str| Some(format!("v-{k}"));
        let env = EdgeEnvironment::from_lookup_upstream(nested).unwrap();
        assert_eq!(env.gateway_hostname, "v-IOTEDGE_GATEWAYHOSTNAME");
        let none = |k: &str| (k != "IOTEDGE_WORKLOADURI").then(|| "x".to_owned());
        let e = EdgeEnvironment::from_lookup_upstream(none)
            .unwrap_err()
            .to_string();
        assert!(e.contains("IOTEDGE_WORKLOADURI"), "{e}");
    }
}
