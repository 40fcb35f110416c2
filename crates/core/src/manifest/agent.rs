//! `$edgeAgent` desired properties: runtime settings, system modules, modules.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::{
    DeploymentStatusCode, ManifestError, check_schema, join, obj, opt_str, req, req_str, type_name,
};
use crate::id::ModuleId;

/// When the agent restarts a module that stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RestartPolicy {
    /// Never.
    Never,
    /// After a non-zero exit.
    OnFailure,
    /// After a failure or when its healthcheck reports unhealthy.
    OnUnhealthy,
    /// Whenever it is not running.
    Always,
}

impl RestartPolicy {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Never => "never",
            Self::OnFailure => "on-failure",
            Self::OnUnhealthy => "on-unhealthy",
            Self::Always => "always",
        }
    }
}

/// Whether the module should run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DesiredStatus {
    /// Running.
    Running,
    /// Stopped.
    Stopped,
}

impl DesiredStatus {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
        }
    }
}

/// When the image is pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImagePullPolicy {
    /// Pull when the module is created or updated.
    OnCreate,
    /// Never pull; the image must be present.
    Never,
}

impl ImagePullPolicy {
    /// The manifest spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OnCreate => "on-create",
            Self::Never => "never",
        }
    }
}

/// Credentials for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryCredential {
    /// Registry host (`myacr.azurecr.io`), or `$upstream:<port>` for a parent edge.
    pub address: String,
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
}

/// `runtime.settings`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RuntimeSettings {
    /// `runtime.type` (`docker`).
    pub runtime_type: String,
    /// `minDockerVersion`: echoed, not enforced (as in Azure).
    pub min_docker_version: Option<String>,
    /// `loggingOptions`: echoed, not enforced.
    pub logging_options: Option<String>,
    /// `registryCredentials` by name.
    pub registry_credentials: BTreeMap<String, RegistryCredential>,
}

/// One module as the manifest describes it (user or system module).
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSpec {
    /// The module's name (the key under `modules`, or `edgeAgent`/`edgeHub`).
    pub name: String,
    /// `version`: free-form; any change is an update.
    pub version: String,
    /// `type`: always `docker` in Azure's schema.
    pub module_type: String,
    /// `status`; `edgeAgent` has none and is always running.
    pub status: DesiredStatus,
    /// `restartPolicy`.
    pub restart_policy: RestartPolicy,
    /// `imagePullPolicy`.
    pub image_pull_policy: ImagePullPolicy,
    /// `startupOrder`: lower first; default `u32::MAX`.
    pub startup_order: u32,
    /// `env`: name → value.
    pub env: BTreeMap<String, String>,
    /// `settings.image` as written.
    pub image: String,
    /// `settings.createOptions` (chunks joined) parsed; `None` for `""`/`"null"`/absent.
    pub create_options: Option<Value>,
    /// `settings.digest`.
    pub digest: Option<String>,
}

impl ModuleSpec {
    /// The image to pull/run: `:latest` appended when the reference has no tag or digest.
    pub fn image_reference(&self) -> String {
        let last = self.image.rsplit('/').next().unwrap_or(&self.image);
        if last.contains(':') || last.contains('@') {
            self.image.clone()
        } else {
            format!("{}:latest", self.image)
        }
    }

    /// The digest pinned in the image reference (`name@sha256:…`), if any.
    pub fn pinned_digest(&self) -> Option<&str> {
        self.image.split_once('@').map(|(_, d)| d)
    }
}

/// `systemModules`.
#[derive(Debug, Clone, PartialEq)]
pub struct SystemModules {
    /// `edgeAgent`.
    pub edge_agent: ModuleSpec,
    /// `edgeHub`.
    pub edge_hub: ModuleSpec,
}

/// `$edgeAgent` desired properties.
#[derive(Debug, Clone, PartialEq)]
pub struct EdgeAgentDesired {
    /// `schemaVersion` (major, minor): 1.0 or 1.1.
    pub schema_version: (u64, u64),
    /// `runtime`.
    pub runtime: RuntimeSettings,
    /// `systemModules`.
    pub system_modules: SystemModules,
    /// `modules` by name.
    pub modules: BTreeMap<String, ModuleSpec>,
}

impl EdgeAgentDesired {
    /// Parses and validates `$edgeAgent` desired properties (twin metadata
    /// keys such as `$version` are ignored).
    pub fn from_value(v: &Value) -> Result<Self, ManifestError> {
        let m = obj(v, "")?;
        if m.keys().all(|k| k.starts_with('$')) {
            return Err(ManifestError {
                code: DeploymentStatusCode::ConfigEmpty,
                path: String::new(),
                message: "no deployment: the desired properties are empty".into(),
            });
        }
        let schema_version = check_schema(m, 1)?;
        let runtime = parse_runtime(req(m, "", "runtime")?)?;
        let sys = obj(req(m, "", "systemModules")?, "systemModules")?;
        let edge_agent = parse_module(
            "edgeAgent",
            req(sys, "systemModules", "edgeAgent")?,
            "systemModules.edgeAgent",
            Kind::Agent,
        )?;
        let edge_hub = parse_module(
            "edgeHub",
            req(sys, "systemModules", "edgeHub")?,
            "systemModules.edgeHub",
            Kind::Hub,
        )?;
        let mut modules = BTreeMap::new();
        match m.get("modules") {
            None | Some(Value::Null) => {}
            Some(v) => {
                for (name, spec) in obj(v, "modules")? {
                    let path = join("modules", name);
                    ModuleId::new(name.as_str())
                        .map_err(|e| ManifestError::bad(&path, e.to_string()))?;
                    if name == "edgeAgent" || name == "edgeHub" {
                        return Err(ManifestError::bad(
                            path,
                            "is a system module name; declare it under systemModules",
                        ));
                    }
                    modules.insert(name.clone(), parse_module(name, spec, &path, Kind::User)?);
                }
            }
        }
        Ok(Self {
            schema_version,
            runtime,
            system_modules: SystemModules {
                edge_agent,
                edge_hub,
            },
            modules,
        })
    }
}

fn parse_runtime(v: &Value) -> Result<RuntimeSettings, ManifestError> {
    let m = obj(v, "runtime")?;
    let runtime_type = req_str(m, "runtime", "type")?;
    if runtime_type != "docker" {
        return Err(ManifestError::bad(
            "runtime.type",
            format!("unknown runtime type {runtime_type:?}; expected \"docker\""),
        ));
    }
    let mut out = RuntimeSettings {
        runtime_type: runtime_type.to_owned(),
        ..RuntimeSettings::default()
    };
    let Some(settings) = m.get("settings").filter(|s| !s.is_null()) else {
        return Ok(out);
    };
    let s = obj(settings, "runtime.settings")?;
    out.min_docker_version = opt_str(s, "runtime.settings", "minDockerVersion")?.map(str::to_owned);
    out.logging_options = opt_str(s, "runtime.settings", "loggingOptions")?.map(str::to_owned);
    if let Some(creds) = s.get("registryCredentials").filter(|c| !c.is_null()) {
        for (name, c) in obj(creds, "runtime.settings.registryCredentials")? {
            let path = join("runtime.settings.registryCredentials", name);
            let c = obj(c, &path)?;
            out.registry_credentials.insert(
                name.clone(),
                RegistryCredential {
                    address: req_str(c, &path, "address")?.to_owned(),
                    username: req_str(c, &path, "username")?.to_owned(),
                    password: req_str(c, &path, "password")?.to_owned(),
                },
            );
        }
    }
    Ok(out)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Agent,
    Hub,
    User,
}

fn parse_module(
    name: &str,
    v: &Value,
    path: &str,
    kind: Kind,
) -> Result<ModuleSpec, ManifestError> {
    let m = obj(v, path)?;
    let module_type = req_str(m, path, "type")?;
    if module_type != "docker" {
        return Err(ManifestError::bad(
            join(path, "type"),
            format!("unknown module type {module_type:?}; expected \"docker\""),
        ));
    }
    let version = opt_str(m, path, "version")?.unwrap_or("").to_owned();
    let status = match kind {
        Kind::Agent => DesiredStatus::Running,
        _ => match req_str(m, path, "status")? {
            "running" => DesiredStatus::Running,
            "stopped" => DesiredStatus::Stopped,
            other => {
                return Err(ManifestError::bad(
                    join(path, "status"),
                    format!("{other:?} is not a status; expected \"running\" or \"stopped\""),
                ));
            }
        },
    };
    let restart_policy = match opt_str(m, path, "restartPolicy")? {
        None if kind == Kind::User => RestartPolicy::OnUnhealthy,
        None => RestartPolicy::Always,
        Some("never") => RestartPolicy::Never,
        Some("on-failure") => RestartPolicy::OnFailure,
        Some("on-unhealthy") => RestartPolicy::OnUnhealthy,
        Some("always") => RestartPolicy::Always,
        Some(other) => {
            return Err(ManifestError::bad(
                join(path, "restartPolicy"),
                format!(
                    "{other:?} is not a restart policy; expected never, on-failure, on-unhealthy or always"
                ),
            ));
        }
    };
    let image_pull_policy = match opt_str(m, path, "imagePullPolicy")? {
        None | Some("on-create") => ImagePullPolicy::OnCreate,
        Some("never") => ImagePullPolicy::Never,
        Some(other) => {
            return Err(ManifestError::bad(
                join(path, "imagePullPolicy"),
                format!("{other:?} is not a pull policy; expected on-create or never"),
            ));
        }
    };
    let startup_order = match m.get("startupOrder") {
        None | Some(Value::Null) => u32::MAX,
        Some(v) => {
            if kind == Kind::Agent {
                return Err(ManifestError::bad(
                    join(path, "startupOrder"),
                    "edgeAgent always starts first and takes no startupOrder",
                ));
            }
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    ManifestError::bad(
                        join(path, "startupOrder"),
                        format!("expected an integer 0..4294967295, found {v}"),
                    )
                })?
        }
    };
    let env = parse_env(m, path)?;
    let settings_path = join(path, "settings");
    let settings = obj(req(m, path, "settings")?, &settings_path)?;
    let image = req_str(settings, &settings_path, "image")?;
    if image.trim().is_empty() {
        return Err(ManifestError::bad(
            join(&settings_path, "image"),
            "must not be empty",
        ));
    }
    if image.starts_with('$') && !image.starts_with("$upstream:") {
        return Err(ManifestError::bad(
            join(&settings_path, "image"),
            "an image starting with '$' must be $upstream:<port>/<name>",
        ));
    }
    let create_options = parse_create_options(settings, &settings_path)?;
    let digest = opt_str(settings, &settings_path, "digest")?.map(str::to_owned);
    Ok(ModuleSpec {
        name: name.to_owned(),
        version,
        module_type: module_type.to_owned(),
        status,
        restart_policy,
        image_pull_policy,
        startup_order,
        env,
        image: image.to_owned(),
        create_options,
        digest,
    })
}

fn parse_env(
    m: &Map<String, Value>,
    path: &str,
) -> Result<BTreeMap<String, String>, ManifestError> {
    let mut env = BTreeMap::new();
    let Some(v) = m.get("env").filter(|v| !v.is_null()) else {
        return Ok(env);
    };
    let env_path = join(path, "env");
    for (k, entry) in obj(v, &env_path)? {
        let entry_path = join(&env_path, k);
        let e = entry.as_object().ok_or_else(|| {
            ManifestError::bad(
                &entry_path,
                format!(
                    "expected an object {{\"value\": …}}, found {}",
                    type_name(entry)
                ),
            )
        })?;
        let value = match req(e, &entry_path, "value")? {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                return Err(ManifestError::bad(
                    join(&entry_path, "value"),
                    format!("expected a string, found {}", type_name(other)),
                ));
            }
        };
        env.insert(k.clone(), value);
    }
    Ok(env)
}

/// Joins `createOptions`, `createOptions01` … `createOptions99` (contiguous,
/// case-insensitive) and parses the JSON they spell.
fn parse_create_options(
    s: &Map<String, Value>,
    path: &str,
) -> Result<Option<Value>, ManifestError> {
    const BASE: &str = "createoptions";
    let mut chunks: Vec<(u32, &str, &str)> = Vec::new();
    for (k, v) in s {
        let lower = k.to_ascii_lowercase();
        let Some(suffix) = lower.strip_prefix(BASE) else {
            continue;
        };
        let key_path = join(path, k);
        let n = if suffix.is_empty() {
            0
        } else if suffix.len() == 2 && suffix.bytes().all(|b| b.is_ascii_digit()) {
            suffix
                .parse::<u32>()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| ManifestError::bad(&key_path, "chunk numbers run from 01 to 99"))?
        } else {
            return Err(ManifestError::bad(
                &key_path,
                "createOptions chunks are named createOptions01 … createOptions99",
            ));
        };
        let text = match v {
            Value::String(t) => t.as_str(),
            other => {
                return Err(ManifestError::bad(
                    &key_path,
                    format!("expected a string holding JSON, found {}", type_name(other)),
                ));
            }
        };
        chunks.push((n, k.as_str(), text));
    }
    if chunks.is_empty() {
        return Ok(None);
    }
    chunks.sort_by_key(|c| c.0);
    for (i, (n, k, _)) in chunks.iter().enumerate() {
        if *n as usize != i {
            let expected = if i == 0 {
                "createOptions".to_owned()
            } else {
                format!("createOptions{i:02}")
            };
            return Err(ManifestError::bad(
                join(path, k),
                format!("createOptions chunks must be contiguous: expected {expected} before it"),
            ));
        }
    }
    let joined: String = chunks.iter().map(|c| c.2).collect();
    let trimmed = joined.trim();
    if trimmed.is_empty() || trimmed == "null" {
        return Ok(None);
    }
    let value: Value = serde_json::from_str(trimmed).map_err(|e| {
        ManifestError::bad(
            join(path, "createOptions"),
            format!("is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ManifestError::bad(
            join(path, "createOptions"),
            format!("must hold a JSON object, found {}", type_name(&value)),
        ));
    }
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "schemaVersion": "1.1",
            "runtime": {"type": "docker", "settings": {"minDockerVersion": "v1.25"}},
            "systemModules": {
                "edgeAgent": {"type": "docker", "settings": {"image": "verge/agent", "createOptions": "{}"}},
                "edgeHub": {"type": "docker", "status": "running", "settings": {"image": "verge/hub"}}
            },
            "modules": {
                "sensor": {
                    "type": "docker", "status": "running", "restartPolicy": "always", "version": "1.0",
                    "settings": {"image": "verge/sensor:1.0", "createOptions": "{\"Env\":[\"A=1\"]}"}
                }
            },
            "$version": 4
        })
    }

    fn with(path: &[&str], value: Value) -> Value {
        let mut v = base();
        let mut cur = &mut v;
        for p in &path[..path.len() - 1] {
            cur = &mut cur[*p];
        }
        let last = path[path.len() - 1];
        if value.is_null() {
            cur.as_object_mut().unwrap().remove(last);
        } else {
            cur[last] = value;
        }
        v
    }

    fn err(v: Value) -> ManifestError {
        EdgeAgentDesired::from_value(&v).unwrap_err()
    }

    #[test]
    fn defaults() {
        let d = EdgeAgentDesired::from_value(&base()).unwrap();
        assert_eq!(d.schema_version, (1, 1));
        let s = &d.modules["sensor"];
        assert_eq!(s.image_pull_policy, ImagePullPolicy::OnCreate);
        assert_eq!(s.startup_order, u32::MAX);
        assert_eq!(s.create_options, Some(json!({"Env": ["A=1"]})));
        assert_eq!(d.system_modules.edge_agent.status, DesiredStatus::Running);
        assert_eq!(
            d.system_modules.edge_hub.restart_policy,
            RestartPolicy::Always
        );
        assert_eq!(
            d.system_modules.edge_agent.image_reference(),
            "verge/agent:latest"
        );
        assert_eq!(s.image_reference(), "verge/sensor:1.0");
        let unset = EdgeAgentDesired::from_value(&with(
            &["modules", "sensor", "restartPolicy"],
            Value::Null,
        ))
        .unwrap();
        assert_eq!(
            unset.modules["sensor"].restart_policy,
            RestartPolicy::OnUnhealthy
        );
    }

    #[test]
    fn image_references() {
        let mut s = EdgeAgentDesired::from_value(&base()).unwrap().modules["sensor"].clone();
        s.image = "localhost:5000/sensor".into();
        assert_eq!(s.image_reference(), "localhost:5000/sensor:latest");
        s.image = "reg/sensor@sha256:abc".into();
        assert_eq!(s.image_reference(), "reg/sensor@sha256:abc");
        assert_eq!(s.pinned_digest(), Some("sha256:abc"));
    }

    #[test]
    fn schema_versions_give_412() {
        for bad in [
            json!("2.0"),
            json!("1.2"),
            json!("one"),
            json!(1.1),
            Value::Null,
        ] {
            let e = err(with(&["schemaVersion"], bad.clone()));
            assert_eq!(e.code, DeploymentStatusCode::InvalidSchemaVersion, "{bad}");
            assert_eq!(e.path, "schemaVersion");
        }
        assert!(EdgeAgentDesired::from_value(&with(&["schemaVersion"], json!("1.0"))).is_ok());
    }

    #[test]
    fn empty_gives_417() {
        assert_eq!(
            err(json!({"$version": 1})).code,
            DeploymentStatusCode::ConfigEmpty
        );
        assert_eq!(err(json!({})).code.as_u16(), 417);
    }

    #[test]
    fn bad_fields_give_400_naming_module_and_field() {
        let cases: Vec<(Value, &str, &str)> = vec![
            (
                with(&["modules", "sensor", "type"], json!("rkt")),
                "modules.sensor.type",
                "unknown module type",
            ),
            (
                with(&["modules", "sensor", "settings", "image"], Value::Null),
                "modules.sensor.settings.image",
                "is required",
            ),
            (
                with(&["modules", "sensor", "settings", "image"], json!(" ")),
                "modules.sensor.settings.image",
                "must not be empty",
            ),
            (
                with(&["modules", "sensor", "restartPolicy"], json!("sometimes")),
                "modules.sensor.restartPolicy",
                "not a restart policy",
            ),
            (
                with(&["modules", "sensor", "status"], json!("paused")),
                "modules.sensor.status",
                "not a status",
            ),
            (
                with(&["modules", "sensor", "status"], Value::Null),
                "modules.sensor.status",
                "is required",
            ),
            (
                with(&["modules", "sensor", "imagePullPolicy"], json!("always")),
                "modules.sensor.imagePullPolicy",
                "not a pull policy",
            ),
            (
                with(&["modules", "sensor", "startupOrder"], json!(-1)),
                "modules.sensor.startupOrder",
                "expected an integer",
            ),
            (
                with(&["modules", "sensor", "env"], json!({"A": "1"})),
                "modules.sensor.env.A",
                "expected an object",
            ),
            (
                with(&["modules", "sensor", "env"], json!({"A": {"value": [1]}})),
                "modules.sensor.env.A.value",
                "expected a string",
            ),
            (
                with(
                    &["modules", "sensor", "settings", "createOptions"],
                    json!("{not json"),
                ),
                "modules.sensor.settings.createOptions",
                "not valid JSON",
            ),
            (
                with(
                    &["modules", "sensor", "settings", "createOptions"],
                    json!("[1]"),
                ),
                "modules.sensor.settings.createOptions",
                "JSON object",
            ),
            (
                with(&["modules", "bad/name"], json!({})),
                "modules.bad/name",
                "contains '/'",
            ),
            (
                with(&["runtime", "type"], json!("k8s")),
                "runtime.type",
                "unknown runtime type",
            ),
            (
                with(&["systemModules", "edgeHub"], Value::Null),
                "systemModules.edgeHub",
                "is required",
            ),
            (
                with(&["systemModules", "edgeAgent", "startupOrder"], json!(0)),
                "systemModules.edgeAgent.startupOrder",
                "starts first",
            ),
            (
                with(
                    &["runtime", "settings", "registryCredentials"],
                    json!({"acr": {"username": "u", "password": "p"}}),
                ),
                "runtime.settings.registryCredentials.acr.address",
                "is required",
            ),
        ];
        for (v, path, msg) in cases {
            let e = err(v);
            assert_eq!(e.code, DeploymentStatusCode::ConfigFormatError, "{path}");
            assert_eq!(e.path, path);
            assert!(e.message.contains(msg), "{path}: {}", e.message);
        }
    }

    #[test]
    fn create_options_chunks() {
        let mut v = base();
        let s = &mut v["modules"]["sensor"]["settings"];
        s["createOptions"] = json!("{\"HostConfig\":");
        s["createOptions01"] = json!("{\"Privileged\":");
        s["CREATEOPTIONS02"] = json!("true}}");
        let d = EdgeAgentDesired::from_value(&v).unwrap();
        assert_eq!(
            d.modules["sensor"].create_options,
            Some(json!({"HostConfig": {"Privileged": true}}))
        );

        let mut gap = base();
        gap["modules"]["sensor"]["settings"]["createOptions02"] = json!("x");
        let e = err(gap);
        assert_eq!(e.path, "modules.sensor.settings.createOptions02");
        assert!(
            e.message.contains("expected createOptions01"),
            "{}",
            e.message
        );

        let mut no_first = base();
        let s = no_first["modules"]["sensor"]["settings"]
            .as_object_mut()
            .unwrap();
        s.remove("createOptions");
        s.insert("createOptions01".into(), json!("{}"));
        assert!(
            err(no_first)
                .message
                .contains("expected createOptions before")
        );

        let mut bad_num = base();
        bad_num["modules"]["sensor"]["settings"]["createOptions1"] = json!("x");
        assert_eq!(err(bad_num).path, "modules.sensor.settings.createOptions1");

        for empty in ["", "null", "  "] {
            let v = with(
                &["modules", "sensor", "settings", "createOptions"],
                json!(empty),
            );
            assert_eq!(
                EdgeAgentDesired::from_value(&v).unwrap().modules["sensor"].create_options,
                None
            );
        }
    }
}
