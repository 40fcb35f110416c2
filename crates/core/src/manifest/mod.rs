//! The deployment manifest: `$edgeAgent` and `$edgeHub` desired properties,
//! in Azure IoT Edge's JSON schema, unchanged.
//!
//! Parsing is validation: a manifest either becomes typed values or a
//! [`ManifestError`] carrying the deployment status code Azure reports
//! (400 with the field named, 412 for a schema version, 417 for an empty
//! configuration) — so a refused manifest never reaches the runtime.

pub mod agent;
pub mod hub;

use std::collections::BTreeMap;

use serde_json::{Map, Value};

pub use agent::{
    DesiredStatus, EdgeAgentDesired, ImagePullPolicy, ModuleSpec, RegistryCredential,
    RestartPolicy, RuntimeSettings, SystemModules,
};
pub use hub::{
    DEFAULT_ROUTE_PRIORITY, DEFAULT_TTL_SECS, EdgeHubDesired, RouteSpec, StoreAndForward,
};

/// `lastDesiredStatus.code` values edgeAgent reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeploymentStatusCode {
    /// 200: every module reached its desired state.
    Ok,
    /// 400: the desired properties could not be read.
    ConfigFormatError,
    /// 406: unknown, or the agent is not running.
    Unknown,
    /// 412: unsupported `schemaVersion`.
    InvalidSchemaVersion,
    /// 417: no deployment yet.
    ConfigEmpty,
    /// 500: applying the deployment failed.
    Failed,
}

impl DeploymentStatusCode {
    /// The numeric code.
    pub fn as_u16(self) -> u16 {
        match self {
            Self::Ok => 200,
            Self::ConfigFormatError => 400,
            Self::Unknown => 406,
            Self::InvalidSchemaVersion => 412,
            Self::ConfigEmpty => 417,
            Self::Failed => 500,
        }
    }
}

/// A refused manifest: the code to report, the field, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {path}: {message}", code.as_u16())]
pub struct ManifestError {
    /// What edgeAgent reports for it.
    pub code: DeploymentStatusCode,
    /// The JSON path of the offending field, e.g. `modules.filter.restartPolicy`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl ManifestError {
    pub(crate) fn bad(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: DeploymentStatusCode::ConfigFormatError,
            path: path.into(),
            message: message.into(),
        }
    }
}

/// A whole deployment: `{"modulesContent": {"$edgeAgent": …, "$edgeHub": …, "<module>": …}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Deployment {
    /// `$edgeAgent` desired properties.
    pub agent: EdgeAgentDesired,
    /// `$edgeHub` desired properties.
    pub hub: EdgeHubDesired,
    /// Desired properties for other module twins, by module name.
    pub module_twins: BTreeMap<String, Value>,
}

impl Deployment {
    /// Parses and validates a deployment manifest from JSON text.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| ManifestError::bad("", format!("not valid JSON: {e}")))?;
        Self::from_value(&v)
    }

    /// Parses and validates a deployment manifest.
    pub fn from_value(v: &Value) -> Result<Self, ManifestError> {
        let root = obj(v, "")?;
        let content = obj(req(root, "", "modulesContent")?, "modulesContent")?;
        let desired = |name: &str| -> Result<&Value, ManifestError> {
            let path = format!("modulesContent.{name}");
            let section = obj(req(content, "modulesContent", name)?, &path)?;
            req(section, &path, "properties.desired")
        };
        let agent = EdgeAgentDesired::from_value(desired("$edgeAgent")?)
            .map_err(|e| prefix(e, "modulesContent.$edgeAgent.properties.desired"))?;
        let hub = EdgeHubDesired::from_value(desired("$edgeHub")?)
            .map_err(|e| prefix(e, "modulesContent.$edgeHub.properties.desired"))?;
        let mut module_twins = BTreeMap::new();
        for (name, section) in content {
            if name == "$edgeAgent" || name == "$edgeHub" {
                continue;
            }
            let path = format!("modulesContent.{name}");
            let d = req(obj(section, &path)?, &path, "properties.desired")?;
            obj(d, &format!("{path}.properties.desired"))?;
            module_twins.insert(name.clone(), d.clone());
        }
        Ok(Self {
            agent,
            hub,
            module_twins,
        })
    }
}

fn prefix(mut e: ManifestError, p: &str) -> ManifestError {
    e.path = if e.path.is_empty() {
        p.to_owned()
    } else {
        format!("{p}.{}", e.path)
    };
    e
}

pub(crate) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

pub(crate) use crate::json_type_name as type_name;

pub(crate) fn obj<'a>(v: &'a Value, path: &str) -> Result<&'a Map<String, Value>, ManifestError> {
    v.as_object().ok_or_else(|| {
        ManifestError::bad(path, format!("expected an object, found {}", type_name(v)))
    })
}

pub(crate) fn req<'a>(
    m: &'a Map<String, Value>,
    path: &str,
    key: &str,
) -> Result<&'a Value, ManifestError> {
    m.get(key)
        .ok_or_else(|| ManifestError::bad(join(path, key), "is required"))
}

pub(crate) fn opt_str<'a>(
    m: &'a Map<String, Value>,
    path: &str,
    key: &str,
) -> Result<Option<&'a str>, ManifestError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ManifestError::bad(
            join(path, key),
            format!("expected a string, found {}", type_name(other)),
        )),
    }
}

pub(crate) fn req_str<'a>(
    m: &'a Map<String, Value>,
    path: &str,
    key: &str,
) -> Result<&'a str, ManifestError> {
    opt_str(m, path, key)?.ok_or_else(|| ManifestError::bad(join(path, key), "is required"))
}

/// Parses `major.minor[.patch]`; `None` when it is not a version.
pub(crate) fn parse_version(s: &str) -> Option<(u64, u64)> {
    let mut it = s.trim().split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next().map_or(Some(0), |m| m.parse().ok())?;
    if let Some(p) = it.next() {
        p.parse::<u64>().ok()?;
    }
    if it.next().is_some() {
        return None;
    }
    Some((major, minor))
}

/// Checks `schemaVersion` against the supported range of minors for major 1.
pub(crate) fn check_schema(
    m: &Map<String, Value>,
    max_minor: u64,
) -> Result<(u64, u64), ManifestError> {
    let err = |msg: String| ManifestError {
        code: DeploymentStatusCode::InvalidSchemaVersion,
        path: "schemaVersion".into(),
        message: msg,
    };
    let s = match m.get("schemaVersion") {
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(err(format!(
                "expected a string, found {}",
                type_name(other)
            )));
        }
        None => return Err(err("is required".into())),
    };
    match parse_version(s) {
        Some((1, minor)) if minor <= max_minor => Ok((1, minor)),
        Some(_) => Err(err(format!(
            "{s:?} is not supported; use 1.0 to 1.{max_minor}"
        ))),
        None => Err(err(format!("{s:?} is not a version"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const EXAMPLE: &str = include_str!("../../tests/manifests/example.json");

    #[test]
    fn parses_the_reference_example() {
        let d = Deployment::parse(EXAMPLE).unwrap();
        assert_eq!(d.agent.modules.len(), 2);
        let reader = &d.agent.modules["pump-reader"];
        assert_eq!(reader.startup_order, 1);
        assert_eq!(reader.env.get("POLL_MS").map(String::as_str), Some("500"));
        assert_eq!(reader.restart_policy, RestartPolicy::Always);
        assert_eq!(
            reader.create_options,
            Some(serde_json::json!({"HostConfig": {"Binds": ["/srv/pump:/data"]}}))
        );
        assert_eq!(d.agent.modules["alarm-filter"].create_options, None);
        assert_eq!(d.agent.modules["alarm-filter"].startup_order, u32::MAX);
        assert_eq!(
            d.agent.system_modules.edge_hub.restart_policy,
            RestartPolicy::Always
        );
        assert_eq!(
            d.agent.runtime.registry_credentials["plantacr"].address,
            "plantacr.azurecr.io"
        );
        assert_eq!(d.hub.routes.len(), 3);
        assert_eq!(d.hub.store_and_forward.time_to_live_secs, Some(7200));
        assert_eq!(
            d.module_twins["alarm-filter"],
            serde_json::json!({"threshold": 80})
        );
    }

    #[test]
    fn envelope_errors_name_the_field() {
        let e = Deployment::parse("{}").unwrap_err();
        assert_eq!(e.code, DeploymentStatusCode::ConfigFormatError);
        assert_eq!(e.path, "modulesContent");
        let e =
            Deployment::parse(r#"{"modulesContent": {"$edgeAgent": {"properties.desired": {}}}}"#)
                .unwrap_err();
        assert_eq!(e.code, DeploymentStatusCode::ConfigEmpty);
        let e = Deployment::parse("not json").unwrap_err();
        assert_eq!(e.code.as_u16(), 400);
        assert!(e.to_string().starts_with("400: : not valid JSON"));
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("1.1"), Some((1, 1)));
        assert_eq!(parse_version("1.0.3"), Some((1, 0)));
        assert_eq!(parse_version("1"), Some((1, 0)));
        assert_eq!(parse_version("1.x"), None);
        assert_eq!(parse_version("1.0.0.0"), None);
        assert_eq!(parse_version(""), None);
    }
}
