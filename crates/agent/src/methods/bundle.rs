//! The support bundle `UploadSupportBundle` uploads, collected through the
//! module runtime the agent uses (verged's management API under verged):
//! the runtime's facts, every module's state (secret-looking environment
//! values redacted) and each module's logs in the time window. Redaction
//! and the archive are `verge support-bundle`'s own ([`verge_diag::bundle`]).
//!
//! What `verge support-bundle` adds on the device itself (verged's config
//! file and log, `verge check`) needs the host, not the agent; the bundle
//! says so in `notes.txt`.

use serde_json::{Value, json};
use verge_core::time::Timestamp;
use verge_diag::bundle::{REDACTED, is_secret_name, safe_name, scrub, write_tar_gz};
use verge_runtime::ModuleRuntime;

use super::logs::{self, ContentType, Filter, Origin, ReadError};

/// Most log bytes per module in a bundle (the newest are dropped beyond it;
/// a bundle must fit in memory and in one blob upload).
const MAX_MODULE_LOG: usize = 16 << 20;

/// Names edgeAgent counts as the runtime (`edgeRuntimeOnly`).
const RUNTIME_MODULES: [&str; 2] = ["edgeAgent", "edgeHub"];

/// What to collect.
#[derive(Debug, Clone)]
pub struct Request {
    /// Logs from.
    pub since: Timestamp,
    /// Logs until.
    pub until: Option<Timestamp>,
    /// Only the runtime's own modules' logs.
    pub edge_runtime_only: bool,
}

/// The bundle as a `.tar.gz`.
pub async fn collect(
    runtime: &dyn ModuleRuntime,
    origin: &Origin<'_>,
    req: &Request,
) -> Result<Vec<u8>, String> {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut notes = vec![
        "Collected by verge-agent (UploadSupportBundle) through its module runtime.".to_owned(),
        "verged's config and log and `verge check` are not included: run `verge support-bundle` on the device for those.".to_owned(),
    ];
    files.push((
        "version.txt".into(),
        format!(
            "verge-agent {}\ncollected {}\niothub {}\ndevice {}\n",
            env!("CARGO_PKG_VERSION"),
            Timestamp::now().to_iso8601(),
            origin.iothub,
            origin.device
        )
        .into_bytes(),
    ));
    match runtime.info().await {
        Ok(i) => files.push((
            "runtime.json".into(),
            serde_json::to_vec_pretty(&i).unwrap_or_default(),
        )),
        Err(e) => notes.push(format!("runtime info: {e}")),
    }
    let modules = match runtime.list().await {
        Ok(m) => m,
        Err(e) => {
            notes.push(format!("module list: {e}"));
            Vec::new()
        }
    };
    let states: Vec<Value> = modules
        .iter()
        .map(|m| {
            let mut v = serde_json::to_value(m).unwrap_or(Value::Null);
            redact_env(&mut v);
            v
        })
        .collect();
    files.push((
        "modules.json".into(),
        serde_json::to_vec_pretty(&json!({ "modules": states })).unwrap_or_default(),
    ));
    let filter = Filter {
        since: Some(req.since),
        until: req.until,
        ..Filter::default()
    };
    for m in &modules {
        let name = &m.spec.name;
        if req.edge_runtime_only && !RUNTIME_MODULES.contains(&name.as_str()) {
            continue;
        }
        let text = match logs::read(
            runtime,
            name,
            &filter,
            ContentType::Text,
            origin,
            MAX_MODULE_LOG,
        )
        .await
        {
            Ok(t) => t,
            Err(ReadError::TooLarge) => {
                notes.push(format!(
                    "logs of {name}: more than {MAX_MODULE_LOG} bytes; narrow since/until"
                ));
                continue;
            }
            Err(ReadError::Runtime(e)) => {
                notes.push(format!("logs of {name}: {e}"));
                continue;
            }
        };
        files.push((format!("logs/{}_log.txt", safe_name(name)), text));
    }
    files.push(("notes.txt".into(), (notes.join("\n") + "\n").into_bytes()));
    // Last line of defence, as in `verge support-bundle`: whatever a module printed.
    for (_, data) in &mut files {
        if let Ok(text) = std::str::from_utf8(data) {
            let clean = scrub(text);
            if clean != *text {
                *data = clean.into_bytes();
            }
        }
    }
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        write_tar_gz(&files, &mut out)
            .map(|()| out)
            .map_err(|e| format!("{e:#}"))
    })
    .await
    .map_err(|e| format!("archiving: {e}"))?
}

/// Secret-looking values of a serialized module state's `spec.env` replaced.
fn redact_env(v: &mut Value) {
    if let Some(env) = v.pointer_mut("/spec/env").and_then(Value::as_object_mut) {
        for (k, val) in env.iter_mut() {
            if is_secret_name(k) {
                *val = Value::String(REDACTED.to_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_env_secrets_are_redacted() {
        let mut v = json!({"spec": {"env": {"DB_PASSWORD": "x", "IOTEDGE_MODULEID": "m"}}});
        redact_env(&mut v);
        assert_eq!(v["spec"]["env"]["DB_PASSWORD"], REDACTED);
        assert_eq!(v["spec"]["env"]["IOTEDGE_MODULEID"], "m");
    }
}
