//! `verge config import`: an Azure IoT Edge configuration as Verge's
//! `config.toml`.
//!
//! Reads IoT Edge 1.1's `/etc/iotedge/config.yaml` or aziot's (1.2+)
//! `/etc/aziot/config.toml` and carries over what Verge has an equivalent
//! for: manual provisioning (a connection string, or hub + device id + a
//! symmetric key or an X.509 certificate file), DPS with a symmetric key or
//! an X.509 certificate file (aziot), `hostname`, `parent_hostname`, the edge CA and trust bundle,
//! the agent and the Moby runtime. Settings Verge has no use for (socket
//! activation URIs, IoT Edge's homedir, retry knobs) are left out with a
//! note. Anything else, and anything Verge cannot do yet (TPM, key URIs,
//! EST), refuses the whole import with the list, so
//! nothing is silently lost.

use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

/// The converted configuration and what was left out on purpose.
#[derive(Debug)]
pub struct Imported {
    /// Verge's `config.toml`.
    pub text: String,
    /// Settings left out, each with why.
    pub notes: Vec<String>,
}

/// Which file format `path` holds: YAML (IoT Edge 1.1) or TOML (aziot).
fn is_yaml(path: &Path, text: &str) -> bool {
    match path.extension().and_then(|e| e.to_str()) {
        Some("yaml" | "yml") => true,
        Some("toml") => false,
        _ => text.parse::<toml::Table>().is_err(),
    }
}

fn yaml_to_json(y: &yaml_rust2::Yaml) -> Value {
    use yaml_rust2::Yaml;
    match y {
        Yaml::Real(s) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(|| Value::String(s.clone()), Value::Number),
        Yaml::Integer(i) => Value::from(*i),
        Yaml::String(s) => Value::String(s.clone()),
        Yaml::Boolean(b) => Value::Bool(*b),
        Yaml::Array(a) => Value::Array(a.iter().map(yaml_to_json).collect()),
        Yaml::Hash(h) => Value::Object(
            h.iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        Yaml::Integer(i) => i.to_string(),
                        Yaml::Boolean(b) => b.to_string(),
                        _ => format!("{k:?}"),
                    };
                    (key, yaml_to_json(v))
                })
                .collect(),
        ),
        Yaml::Alias(_) | Yaml::Null | Yaml::BadValue => Value::Null,
    }
}

/// The settings both formats map onto.
#[derive(Default)]
struct Out {
    doc: toml::Table,
    notes: Vec<String>,
    refused: Vec<String>,
}

impl Out {
    fn set(&mut self, path: &[&str], v: toml::Value) {
        let mut t = &mut self.doc;
        for k in &path[..path.len() - 1] {
            let entry = t
                .entry((*k).to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            let toml::Value::Table(inner) = entry else {
                return;
            };
            t = inner;
        }
        if let Some(last) = path.last() {
            t.insert((*last).to_owned(), v);
        }
    }

    fn refuse(&mut self, key: &str, why: &str) {
        self.refused.push(format!("{key}: {why}"));
    }

    fn note(&mut self, key: &str, why: &str) {
        self.notes.push(format!("{key}: {why}"));
    }
}

/// A string value, `None` for null, empty and IoT Edge's `<ADD … HERE>` placeholders.
fn string(v: &Value) -> Option<String> {
    let s = match v {
        Value::String(s) => s.trim().to_owned(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    (!s.is_empty() && !s.starts_with("<ADD")).then_some(s)
}

/// A file path from a path or a `file://` URI.
fn file_path(v: &Value) -> Option<String> {
    string(v).map(|s| s.strip_prefix("file://").map_or(s.clone(), str::to_owned))
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(m) => m.values().all(is_empty),
        Value::Array(a) => a.is_empty(),
        Value::String(s) => s.trim().is_empty() || s.starts_with("<ADD"),
        _ => false,
    }
}

fn json_to_toml(v: &Value) -> Option<toml::Value> {
    toml::Value::try_from(v).ok()
}

fn agent(out: &mut Out, a: &Value) {
    let Some(map) = a.as_object() else {
        return;
    };
    for (k, v) in map {
        match k.as_str() {
            "name" => {
                if let Some(s) = string(v) {
                    out.set(&["agent", "name"], s.into());
                }
            }
            "type" => match string(v).as_deref() {
                Some("docker") => out.set(&["agent", "type"], "docker".into()),
                other => out.refuse(
                    "agent.type",
                    &format!("{other:?} is not a type Verge knows (docker, or process)"),
                ),
            },
            "env" => {
                for (ek, ev) in v.as_object().into_iter().flatten() {
                    match string(ev) {
                        Some(s) => out.set(&["agent", "env", ek], s.into()),
                        None if ev.is_boolean() => {
                            out.set(&["agent", "env", ek], ev.to_string().into());
                        }
                        None => {}
                    }
                }
            }
            "config" => {
                for (ck, cv) in v.as_object().into_iter().flatten() {
                    match ck.as_str() {
                        "image" => {
                            if let Some(s) = string(cv) {
                                out.set(&["agent", "config", "image"], s.into());
                            }
                        }
                        "createOptions" | "create_options" if !is_empty(cv) => {
                            match json_to_toml(cv) {
                                Some(t) => out.set(&["agent", "config", "createOptions"], t),
                                None => out.refuse(
                                    "agent.config.createOptions",
                                    "cannot be written as TOML",
                                ),
                            }
                        }
                        "auth" if !is_empty(cv) => out.refuse(
                            "agent.config.auth",
                            "registry credentials for the agent's image are not supported yet \
                             (pull the image beforehand)",
                        ),
                        "createOptions" | "create_options" | "auth" => {}
                        other => out.refuse(&format!("agent.config.{other}"), "unknown setting"),
                    }
                }
            }
            other => out.refuse(&format!("agent.{other}"), "unknown setting"),
        }
    }
}

fn moby(out: &mut Out, m: &Value) {
    for (k, v) in m.as_object().into_iter().flatten() {
        match k.as_str() {
            "uri" | "network" => {
                if let Some(s) = string(v) {
                    out.set(&["moby_runtime", k], s.into());
                }
            }
            "content_trust" if is_empty(v) => {}
            other => out.refuse(&format!("moby_runtime.{other}"), "not supported"),
        }
    }
    if !out.doc.contains_key("moby_runtime") {
        out.set(
            &["moby_runtime", "uri"],
            "unix:///var/run/docker.sock".into(),
        );
    }
}

fn ca_days(out: &mut Out, key: &str, v: &Value) {
    match v.as_i64() {
        Some(d) => out.set(
            &["edge_ca", "auto_generated_edge_ca_expiry_days"],
            toml::Value::Integer(d),
        ),
        None if v.is_null() => {}
        None => out.refuse(key, "must be a number of days"),
    }
}

/// IoT Edge 1.1's `config.yaml`.
fn from_yaml(out: &mut Out, y: &Value) {
    for (k, v) in y.as_object().into_iter().flatten() {
        match k.as_str() {
            "hostname" | "parent_hostname" => {
                if let Some(s) = string(v) {
                    out.set(&[k], s.into());
                }
            }
            "provisioning" => {
                match v.get("source").and_then(string).as_deref() {
                    Some("manual") => {}
                    other => {
                        out.refuse(
                            "provisioning.source",
                            &format!("{other:?} is not supported yet (only manual provisioning)"),
                        );
                        continue;
                    }
                }
                for (pk, pv) in v.as_object().into_iter().flatten() {
                    match pk.as_str() {
                        "source" => {}
                        "device_connection_string" => match string(pv) {
                            Some(cs) => {
                                out.set(&["provisioning", "source"], "manual".into());
                                out.set(&["provisioning", "connection_string"], cs.into());
                            }
                            None => out.refuse(
                                "provisioning.device_connection_string",
                                "empty: give the device's connection string",
                            ),
                        },
                        // 1.1's manual X.509: hub, device and files in one mapping.
                        "authentication"
                            if pv.get("method").and_then(string).as_deref() == Some("x509") =>
                        {
                            out.set(&["provisioning", "source"], "manual".into());
                            for id in ["iothub_hostname", "device_id"] {
                                match pv.get(id).and_then(string) {
                                    Some(s) => out.set(&["provisioning", id], s.into()),
                                    None => out.refuse(
                                        &format!("provisioning.authentication.{id}"),
                                        "missing",
                                    ),
                                }
                            }
                            x509_files(out, pv, &["provisioning", "authentication"]);
                        }
                        "authentication" => out.refuse(
                            "provisioning.authentication.method",
                            "only x509 (or a device_connection_string) is supported",
                        ),
                        "dynamic_reprovisioning" if pv.as_bool() != Some(true) => {}
                        "dynamic_reprovisioning" => out.note(
                            "provisioning.dynamic_reprovisioning",
                            "not carried over (verge system reprovision re-reads the identity)",
                        ),
                        other => {
                            out.refuse(&format!("provisioning.{other}"), "unknown setting");
                        }
                    }
                }
            }
            "agent" => agent(out, v),
            "moby_runtime" => moby(out, v),
            "certificates" => {
                for (ck, cv) in v.as_object().into_iter().flatten() {
                    match ck.as_str() {
                        "device_ca_cert" => {
                            if let Some(p) = file_path(cv) {
                                out.set(&["edge_ca", "cert"], p.into());
                            }
                        }
                        "device_ca_pk" => {
                            if let Some(p) = file_path(cv) {
                                out.set(&["edge_ca", "pk"], p.into());
                            }
                        }
                        "trusted_ca_certs" => {
                            if let Some(p) = file_path(cv) {
                                out.set(&["trust_bundle_cert"], p.into());
                            }
                        }
                        "auto_generated_ca_lifetime_days" => {
                            ca_days(out, "certificates.auto_generated_ca_lifetime_days", cv);
                        }
                        other => out.refuse(&format!("certificates.{other}"), "unknown setting"),
                    }
                }
            }
            "connect" | "listen" | "homedir" | "watchdog" => out.note(
                k,
                "not carried over: Verge uses its own sockets and state directory (its defaults)",
            ),
            other => out.refuse(other, "unknown setting"),
        }
    }
}

/// aziot's (IoT Edge 1.2+) `config.toml`.
fn from_aziot(out: &mut Out, t: &Value) {
    for (k, v) in t.as_object().into_iter().flatten() {
        match k.as_str() {
            "hostname" | "parent_hostname" => {
                if let Some(s) = string(v) {
                    out.set(&[k], s.into());
                }
            }
            "trust_bundle_cert" => {
                if let Some(p) = file_path(v) {
                    out.set(&["trust_bundle_cert"], p.into());
                }
            }
            "provisioning" => aziot_provisioning(out, v),
            "agent" => agent(out, v),
            "moby_runtime" => moby(out, v),
            "edge_ca" => {
                for (ck, cv) in v.as_object().into_iter().flatten() {
                    match ck.as_str() {
                        "cert" | "pk" => {
                            if let Some(p) = file_path(cv) {
                                out.set(&["edge_ca", ck], p.into());
                            }
                        }
                        "auto_generated_edge_ca_expiry_days" => {
                            ca_days(out, "edge_ca.auto_generated_edge_ca_expiry_days", cv);
                        }
                        "auto_renew" => out.note(
                            "edge_ca.auto_renew",
                            "not carried over (verged renews what it issues by itself)",
                        ),
                        other => out.refuse(
                            &format!("edge_ca.{other}"),
                            "not supported yet (give cert and pk files, or none for a \
                             test CA)",
                        ),
                    }
                }
            }
            "connect"
            | "listen"
            | "homedir"
            | "watchdog"
            | "allow_elevated_docker_permissions"
            | "auto_reprovisioning_mode"
            | "prefer_module_identity_cache"
            | "cloud_timeout_sec"
            | "cloud_retries"
            | "image_garbage_collection" => out.note(
                k,
                "not carried over: Verge has no such setting (its default applies)",
            ),
            other => out.refuse(other, "not supported by Verge"),
        }
    }
}

fn aziot_provisioning(out: &mut Out, p: &Value) {
    match p.get("source").and_then(string).as_deref() {
        Some("manual") => aziot_manual(out, p),
        Some("dps") => aziot_dps(out, p),
        other => out.refuse(
            "provisioning.source",
            &format!("{other:?} is not supported (manual or dps)"),
        ),
    }
}

/// aziot's manual provisioning: a connection string, or hub + device id with
/// a symmetric key or an X.509 certificate.
fn aziot_manual(out: &mut Out, p: &Value) {
    out.set(&["provisioning", "source"], "manual".into());
    for (k, v) in p.as_object().into_iter().flatten() {
        match k.as_str() {
            "source" => {}
            "connection_string" | "iothub_hostname" | "device_id" => {
                if let Some(s) = string(v) {
                    out.set(&["provisioning", k], s.into());
                }
            }
            "authentication" => match v.get("method").and_then(string).as_deref() {
                Some("sas") => {
                    out.set(&["provisioning", "authentication", "method"], "sas".into());
                    if let Some(key) = inline_key(
                        out,
                        v.get("device_id_pk"),
                        "provisioning.authentication.device_id_pk",
                    ) {
                        out.set(
                            &["provisioning", "authentication", "device_id_pk", "value"],
                            key.into(),
                        );
                    }
                }
                Some("x509") => x509_files(out, v, &["provisioning", "authentication"]),
                other => out.refuse(
                    "provisioning.authentication.method",
                    &format!("{other:?} is not supported (sas or x509)"),
                ),
            },
            other => out.refuse(&format!("provisioning.{other}"), "unknown setting"),
        }
    }
}

/// aziot's DPS provisioning with a symmetric key or an X.509 certificate
/// (verged registers at its first start and caches the assignment).
fn aziot_dps(out: &mut Out, p: &Value) {
    out.set(&["provisioning", "source"], "dps".into());
    for (k, v) in p.as_object().into_iter().flatten() {
        match k.as_str() {
            "source" => {}
            "global_endpoint" | "id_scope" => {
                if let Some(s) = string(v) {
                    out.set(&["provisioning", k], s.into());
                }
            }
            "attestation" => match v.get("method").and_then(string).as_deref() {
                Some("symmetric_key") => {
                    let key = "provisioning.attestation";
                    out.set(
                        &["provisioning", "attestation", "method"],
                        "symmetric_key".into(),
                    );
                    match v.get("registration_id").and_then(string) {
                        Some(id) => out.set(
                            &["provisioning", "attestation", "registration_id"],
                            id.into(),
                        ),
                        None => out.refuse(&format!("{key}.registration_id"), "missing"),
                    }
                    if let Some(sk) =
                        inline_key(out, v.get("symmetric_key"), &format!("{key}.symmetric_key"))
                    {
                        out.set(
                            &["provisioning", "attestation", "symmetric_key", "value"],
                            sk.into(),
                        );
                    }
                }
                Some("x509") => {
                    // The registration id defaults to the certificate's CN.
                    if let Some(id) = v.get("registration_id").and_then(string) {
                        out.set(
                            &["provisioning", "attestation", "registration_id"],
                            id.into(),
                        );
                    }
                    x509_files(out, v, &["provisioning", "attestation"]);
                }
                other => out.refuse(
                    "provisioning.attestation.method",
                    &format!("{other:?} is not supported (symmetric_key or x509)"),
                ),
            },
            other => out.refuse(&format!("provisioning.{other}"), "not supported by Verge"),
        }
    }
}

/// A key given inline (`{ value = "<base64>" }`); key URIs are refused.
fn inline_key(out: &mut Out, v: Option<&Value>, key: &str) -> Option<String> {
    let v = v.unwrap_or(&Value::Null);
    match (
        v.get("value").and_then(string),
        v.get("uri").and_then(string),
    ) {
        (Some(k), None) => Some(k),
        (None, Some(uri)) => {
            out.refuse(
                &format!("{key}.uri"),
                &format!("key URIs ({uri}) are not supported yet: give the key as value"),
            );
            None
        }
        _ => {
            out.refuse(key, "give the key as value = \"<base64>\"");
            None
        }
    }
}

/// `method = "x509"` with `identity_cert` and `identity_pk` files (URIs
/// carried over as they are; verged reads `file://` URIs and paths), set
/// under `at`.
fn x509_files(out: &mut Out, v: &Value, at: &[&str]) {
    let mut path = at.to_vec();
    path.push("method");
    out.set(&path, "x509".into());
    for file in ["identity_cert", "identity_pk"] {
        let key = format!("{}.{file}", at.join("."));
        match v.get(file) {
            Some(Value::String(s)) if s.starts_with("file://") || s.starts_with('/') => {
                let mut path = at.to_vec();
                path.push(file);
                out.set(&path, s.clone().into());
            }
            Some(Value::String(s)) => out.refuse(
                &key,
                &format!("{s:?}: only files are supported (file:///… or a path)"),
            ),
            Some(_) => out.refuse(
                &key,
                "certificate issuance (EST, local CA) is not supported: give a file",
            ),
            None => out.refuse(&key, "missing"),
        }
    }
}

/// Converts `text` (read from `source`) into Verge's configuration.
/// `hostname` fills in a missing or placeholder `hostname`.
pub fn convert(text: &str, source: &Path, hostname: &str) -> anyhow::Result<Imported> {
    let mut out = Out::default();
    if is_yaml(source, text) {
        let docs = yaml_rust2::YamlLoader::load_from_str(text)
            .map_err(|e| anyhow!("{} is not valid YAML: {e}", source.display()))?;
        let doc = docs.first().map(yaml_to_json).unwrap_or(Value::Null);
        if !doc.is_object() {
            bail!("{} holds no YAML mapping", source.display());
        }
        from_yaml(&mut out, &doc);
    } else {
        let t: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            anyhow!("{} is not valid TOML: {}", source.display(), e.message())
        })?;
        let doc = serde_json::to_value(&t).context("reading the TOML")?;
        from_aziot(&mut out, &doc);
    }
    if !out.doc.contains_key("provisioning")
        && !out.refused.iter().any(|r| r.starts_with("provisioning"))
    {
        out.refuse("provisioning", "missing: no provisioning to carry over");
    }
    if !out.refused.is_empty() {
        bail!(
            "{} has settings Verge cannot take over; nothing was written:\n  {}",
            source.display(),
            out.refused.join("\n  ")
        );
    }
    if !out.doc.contains_key("hostname") {
        out.set(&["hostname"], hostname.into());
        out.note(
            "hostname",
            &format!("not set; this machine's ({hostname}) is used"),
        );
    }
    let agent = out
        .doc
        .get("agent")
        .and_then(toml::Value::as_table)
        .cloned()
        .unwrap_or_default();
    for (key, default) in [("name", "edgeAgent"), ("type", "docker")] {
        if !agent.contains_key(key) {
            out.set(&["agent", key], default.into());
        }
    }
    let has_image = agent.get("config").and_then(|c| c.get("image")).is_some();
    if !has_image {
        out.set(
            &["agent", "config", "image"],
            "mcr.microsoft.com/azureiotedge-agent:1.5".into(),
        );
        out.note(
            "agent.config.image",
            "not set; Azure's edgeAgent 1.5 image is used",
        );
    }
    let body = toml::to_string_pretty(&out.doc).context("writing the TOML")?;
    let text = format!(
        "# Written by `verge config import` from {}.\n# Apply with `verge config apply`.\n{body}",
        source.display()
    );
    Ok(Imported {
        text,
        notes: out.notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_daemon::config::{AgentKind, Config, EdgeCaConfig};

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODw==";

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("/etc/verge/config.toml")).unwrap()
    }

    #[test]
    fn iot_edge_1_1_yaml() {
        let yaml = format!(
            r#"# IoT Edge 1.1
provisioning:
  source: "manual"
  device_connection_string: "HostName=hub.azure-devices.net;DeviceId=edge1;SharedAccessKey={KEY}"
  dynamic_reprovisioning: false
certificates:
  device_ca_cert: "/certs/ca.pem"
  device_ca_pk: "/certs/ca.key.pem"
  trusted_ca_certs: "/certs/root.pem"
agent:
  name: "edgeAgent"
  type: "docker"
  env:
    UpstreamProtocol: "MqttWs"
  config:
    image: "mcr.microsoft.com/azureiotedge-agent:1.1"
    auth: {{}}
hostname: "edge1.local"
connect:
  management_uri: "unix:///var/run/iotedge/mgmt.sock"
  workload_uri: "unix:///var/run/iotedge/workload.sock"
listen:
  management_uri: "fd://iotedge.mgmt.socket"
  workload_uri: "fd://iotedge.socket"
homedir: "/var/lib/iotedge"
moby_runtime:
  uri: "unix:///var/run/docker.sock"
  network: "azure-iot-edge"
"#
        );
        let got = convert(&yaml, Path::new("/etc/iotedge/config.yaml"), "m").unwrap();
        let c = parse(&got.text);
        assert_eq!(c.hostname, "edge1.local");
        assert_eq!(c.provisioning.device_id.as_str(), "edge1");
        assert_eq!(
            c.provisioning.iothub_hostname.as_str(),
            "hub.azure-devices.net"
        );
        assert_eq!(c.agent.kind, AgentKind::Docker);
        assert_eq!(c.agent.image, "mcr.microsoft.com/azureiotedge-agent:1.1");
        assert_eq!(c.agent.env["UpstreamProtocol"], "MqttWs");
        assert_eq!(
            c.edge_ca,
            EdgeCaConfig::Files {
                cert: "/certs/ca.pem".into(),
                pk: "/certs/ca.key.pem".into()
            }
        );
        assert_eq!(c.trust_bundle_cert, Some("/certs/root.pem".into()));
        assert_eq!(c.moby_runtime.unwrap().network, "azure-iot-edge");
        assert!(
            got.notes.iter().any(|n| n.starts_with("listen:")),
            "{:?}",
            got.notes
        );
    }

    #[test]
    fn aziot_toml() {
        let toml = format!(
            r#"hostname = "edge2"
trust_bundle_cert = "file:///etc/aziot/trust.pem"
allow_elevated_docker_permissions = true

[provisioning]
source = "manual"
iothub_hostname = "hub.azure-devices.net"
device_id = "edge2"

[provisioning.authentication]
method = "sas"
device_id_pk = {{ value = "{KEY}" }}

[edge_ca]
auto_generated_edge_ca_expiry_days = 30

[agent]
name = "edgeAgent"
type = "docker"
[agent.config]
image = "mcr.microsoft.com/azureiotedge-agent:1.5"
[agent.env]
RuntimeLogLevel = "debug"

[connect]
workload_uri = "unix:///var/run/iotedge/workload.sock"
management_uri = "unix:///var/run/iotedge/mgmt.sock"

[listen]
workload_uri = "fd://aziot-edged.workload.socket"
management_uri = "fd://aziot-edged.mgmt.socket"

[moby_runtime]
uri = "unix:///var/run/docker.sock"
network = "azure-iot-edge"
"#
        );
        let got = convert(&toml, Path::new("/etc/aziot/config.toml"), "m").unwrap();
        let c = parse(&got.text);
        assert_eq!(c.provisioning.device_id.as_str(), "edge2");
        assert_eq!(c.provisioning.device_key().unwrap().to_base64(), KEY);
        assert_eq!(c.trust_bundle_cert, Some("/etc/aziot/trust.pem".into()));
        assert_eq!(c.edge_ca, EdgeCaConfig::AutoGenerated { expiry_days: 30 });
        assert_eq!(c.agent.env["RuntimeLogLevel"], "debug");
        assert!(
            got.notes
                .iter()
                .any(|n| n.starts_with("allow_elevated_docker_permissions")),
            "{:?}",
            got.notes
        );
    }

    #[test]
    fn refuses_what_it_cannot_take_with_the_whole_list() {
        let toml = r#"hostname = "e"
[provisioning]
source = "dps"
global_endpoint = "https://global.azure-devices-provisioning.net"
id_scope = "0ab"
[provisioning.attestation]
method = "tpm"
[tpm]
tcti = "device"
[agent]
name = "edgeAgent"
type = "docker"
[agent.config]
image = "x"
[agent.config.auth]
serveraddress = "r.io"
username = "u"
password = "p"
"#;
        let e = convert(toml, Path::new("/etc/aziot/config.toml"), "m")
            .unwrap_err()
            .to_string();
        for want in [
            "provisioning.attestation.method",
            "tpm",
            "agent.config.auth",
            "nothing was written",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
        let e = convert("hostname: x\nbogus: 1\n", Path::new("c.yaml"), "m")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus: unknown setting"), "{e}");
        assert!(e.contains("provisioning"), "{e}");
    }

    /// Manual X.509 (aziot and IoT Edge 1.1) and DPS with a symmetric key
    /// carry over; what verged cannot read is refused by name.
    #[test]
    fn x509_and_dps_provisioning() {
        let aziot = r#"hostname = "e"
[provisioning]
source = "manual"
iothub_hostname = "hub.example.net"
device_id = "edge1"
[provisioning.authentication]
method = "x509"
identity_cert = "file:///var/secrets/edge1.pem"
identity_pk = "file:///var/secrets/edge1.key.pem"
"#;
        let got = convert(aziot, Path::new("/etc/aziot/config.toml"), "m").unwrap();
        let c = parse(&got.text);
        assert!(c.provisioning.device_key().is_none());
        let verge_daemon::config::DeviceCredential::X509 { cert, key } = &c.provisioning.credential
        else {
            panic!("{:?}", c.provisioning.credential);
        };
        assert_eq!(cert, Path::new("/var/secrets/edge1.pem"));
        assert_eq!(key, Path::new("/var/secrets/edge1.key.pem"));

        let yaml = "provisioning:\n  source: manual\n  authentication:\n    method: x509\n    \
                    iothub_hostname: hub.example.net\n    device_id: edge1\n    \
                    identity_cert: file:///c.pem\n    identity_pk: file:///k.pem\n";
        let c = parse(&convert(yaml, Path::new("config.yaml"), "m").unwrap().text);
        assert_eq!(c.provisioning.device_id.as_str(), "edge1");
        assert!(c.provisioning.device_key().is_none());

        let dps = format!(
            r#"hostname = "e"
[provisioning]
source = "dps"
global_endpoint = "https://global.azure-devices-provisioning.net/"
id_scope = "0ne00AB"
[provisioning.attestation]
method = "symmetric_key"
registration_id = "edge1"
symmetric_key = {{ value = "{KEY}" }}
"#
        );
        let got = convert(&dps, Path::new("/etc/aziot/config.toml"), "m").unwrap();
        let t: toml::Table = got.text.parse().unwrap();
        let p = &t["provisioning"];
        assert_eq!(p["source"].as_str(), Some("dps"));
        assert_eq!(p["id_scope"].as_str(), Some("0ne00AB"));
        assert_eq!(p["attestation"]["registration_id"].as_str(), Some("edge1"));
        assert_eq!(
            p["attestation"]["symmetric_key"]["value"].as_str(),
            Some(KEY)
        );
        // verged reads it: not provisioned yet is the only complaint.
        let e = Config::parse(&got.text, Path::new("/etc/verge/config.toml")).unwrap_err();
        assert!(
            e.message.contains(verge_daemon::config::NOT_PROVISIONED),
            "{e}"
        );

        for (bad, says) in [
            (
                aziot.replace("file:///var/secrets/edge1.key.pem", "pkcs11:object=k"),
                "identity_pk",
            ),
            (
                aziot.replace("identity_cert = \"file:///var/secrets/edge1.pem\"\n", ""),
                "identity_cert: missing",
            ),
            (
                dps.replace("symmetric_key\"\n", "tpm\"\n"),
                "provisioning.attestation.method",
            ),
            (
                dps.replace("symmetric_key\"\n", "x509\"\n"),
                "provisioning.attestation.identity_cert: missing",
            ),
            (
                dps.replace(
                    &format!("{{ value = \"{KEY}\" }}"),
                    "{ uri = \"file:///k\" }",
                ),
                "symmetric_key.uri",
            ),
        ] {
            let e = convert(&bad, Path::new("/etc/aziot/config.toml"), "m")
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{says}: {e}");
        }
    }
}
