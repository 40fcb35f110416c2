//! edgeAgent's built-in direct methods, invoked on `$edgeAgent` (the
//! portal's troubleshooting page, `az iot hub invoke-module-method`, the
//! service SDKs), answered with edgeAgent's status codes and JSON
//! (reference: observability-ops.md §1):
//!
//! | method | does | answer |
//! |---|---|---|
//! | `ping` | nothing | 200, no payload |
//! | `RestartModule` | restarts module `id` through the runtime | 200, no payload |
//! | `GetModuleLogs` | logs of the modules `items` select, filtered | 200 `[{"id","payloadBytes","payload"}]` |
//! | `UploadModuleLogs` | the same, uploaded to `sasUrl` in the background | 200 task status |
//! | `UploadSupportBundle` | a support bundle uploaded to `sasUrl` in the background | 200 task status |
//! | `GetTaskStatus` | the status of a background task | 200 task status |
//!
//! Names are matched case-insensitively (edgeAgent's dictionary is; its docs
//! say otherwise), and so are the payload's field names (Newtonsoft's
//! default). 400 `{"message"}` for an unknown method (naming the supported
//! ones), a missing or malformed payload and logs over the 127,000-byte
//! limit of a method response; 500 `{"message"}` for a `schemaVersion`
//! whose major is not 1 (not checked by `UploadSupportBundle`, as in
//! edgeAgent), an unknown module in `RestartModule`, and runtime failures.
//!
//! Background tasks (`UploadModuleLogs`, `UploadSupportBundle`) get a
//! `correlationId` (a v4 UUID) and a status (`NotStarted`, `Running`,
//! `Completed`, `Failed`; `Unknown` for an id never seen or forgotten). At
//! most [`MAX_RUNNING_TASKS`] run at once and [`MAX_PENDING_TASKS`] wait;
//! more are refused (500) rather than queued without bound; the last
//! [`MAX_REMEMBERED_TASKS`] statuses are kept. Each task has
//! [`TASK_TIMEOUT`] (edgeAgent's `RequestTimeoutSecs`). Blob names are
//! edgeAgent's: `{iothub}/{device}/{module}-{yyyy-MM-dd--HH-mm-ss}.{log|json}[.gz]`
//! and `{iothub}/{device}/support-bundle-{…}` — a `.tar.gz` here, as
//! `verge support-bundle` writes, where edgeAgent writes a `.zip`. Logs are
//! uploaded as one block blob per module (edgeAgent appends text to an
//! append blob in groups of lines; the blob's content ends the same).

pub mod bundle;
pub mod logs;
pub mod upload;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::sync::Semaphore;
use verge_core::time::Timestamp;
use verge_runtime::{ModuleRuntime, RuntimeError};

use logs::{ContentType, Encoding, Filter, Item, Origin, ReadError};
pub use upload::Trust;
use upload::{Blob, Uploader};

/// The methods, in the order the "not found" answer lists them.
pub const METHODS: &[&str] = &[
    "ping",
    "RestartModule",
    "GetModuleLogs",
    "UploadModuleLogs",
    "UploadSupportBundle",
    "GetTaskStatus",
];

/// Most bytes of log payload `GetModuleLogs` answers with (a direct-method
/// response is limited to 128 KB; edgeAgent keeps this margin).
pub const MAX_LOGS_PAYLOAD: usize = 127_000;

/// Background tasks running at once.
pub const MAX_RUNNING_TASKS: usize = 2;
/// Background tasks waiting to run; more are refused.
pub const MAX_PENDING_TASKS: usize = 8;
/// Task statuses remembered for `GetTaskStatus`.
pub const MAX_REMEMBERED_TASKS: usize = 256;
/// Time a background task may take.
pub const TASK_TIMEOUT: Duration = Duration::from_secs(600);

/// Most log bytes per module an upload reads (bounded memory).
const MAX_UPLOAD_LOG: usize = 32 << 20;

/// A failed method: edgeAgent's `ArgumentException` (400) or anything else (500).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MethodError {
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 500.
    #[error("{0}")]
    Internal(String),
}

impl MethodError {
    fn answer(&self) -> (i32, Value) {
        let status = match self {
            Self::BadRequest(_) => 400,
            Self::Internal(_) => 500,
        };
        (status, json!({ "message": self.to_string() }))
    }
}

/// Who this agent is, for blob names and JSON log lines.
#[derive(Debug, Clone)]
pub struct MethodsConfig {
    /// The IoT hub's host name.
    pub iothub: String,
    /// The device id.
    pub device: String,
    /// What the upload client trusts.
    pub trust: Trust,
    /// The agent's own name when the runtime serves its logs without
    /// listing it as a module (verged's process agent): logs requests can
    /// select it as edgeAgent's can.
    pub own_name: Option<String>,
}

/// A background task's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunStatus {
    NotStarted,
    Running,
    Completed,
    Failed,
    Unknown,
}

impl RunStatus {
    fn as_str(self) -> &'static str {
        match self {
            Self::NotStarted => "NotStarted",
            Self::Running => "Running",
            Self::Completed => "Completed",
            Self::Failed => "Failed",
            Self::Unknown => "Unknown",
        }
    }
}

#[derive(Debug, Default)]
struct Tasks {
    by_id: HashMap<String, (RunStatus, String)>,
    /// Insertion order, for forgetting the oldest.
    order: VecDeque<String>,
}

impl Tasks {
    fn pending(&self) -> usize {
        self.by_id
            .values()
            .filter(|(s, _)| matches!(s, RunStatus::NotStarted | RunStatus::Running))
            .count()
    }

    fn insert(&mut self, id: String) {
        while self.order.len() >= MAX_REMEMBERED_TASKS {
            // Forget the oldest finished one; running ones are bounded anyway.
            let Some(pos) = self.order.iter().position(|i| {
                self.by_id
                    .get(i)
                    .is_none_or(|(s, _)| matches!(s, RunStatus::Completed | RunStatus::Failed))
            }) else {
                break;
            };
            if let Some(old) = self.order.remove(pos) {
                self.by_id.remove(&old);
            }
        }
        self.by_id
            .insert(id.clone(), (RunStatus::NotStarted, String::new()));
        self.order.push_back(id);
    }

    fn set(&mut self, id: &str, status: RunStatus, message: String) {
        if let Some(e) = self.by_id.get_mut(id) {
            *e = (status, message);
        }
    }

    fn get(&self, id: &str) -> (RunStatus, String) {
        self.by_id
            .get(id)
            .cloned()
            .unwrap_or((RunStatus::Unknown, String::new()))
    }
}

struct Inner {
    runtime: Arc<dyn ModuleRuntime>,
    iothub: String,
    device: String,
    uploader: Uploader,
    own_name: Option<String>,
    tasks: Mutex<Tasks>,
    running: Semaphore,
}

/// The method handler; cheap to clone.
#[derive(Clone)]
pub struct Methods {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Methods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Methods")
            .field("iothub", &self.inner.iothub)
            .field("device", &self.inner.device)
            .finish_non_exhaustive()
    }
}

/// `v`'s member `name`, matched case-insensitively.
fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .filter(|v| !v.is_null())
}

fn string_field(v: &Value, name: &str) -> Result<Option<String>, MethodError> {
    match field(v, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(MethodError::BadRequest(format!(
            "{name} must be a string, not {other}"
        ))),
    }
}

fn required_string(v: &Value, name: &str) -> Result<String, MethodError> {
    string_field(v, name)?
        .ok_or_else(|| MethodError::BadRequest(format!("{name} is missing in the request payload")))
}

/// The payload as an object: `null` is edgeAgent's "not found"; a JSON
/// string holding an object is accepted too (some callers send text).
fn payload_object(payload: &Value) -> Result<Value, MethodError> {
    let v = match payload {
        // An empty body may reach us as an empty string.
        Value::Null => {
            return Err(MethodError::BadRequest("Request payload not found".into()));
        }
        Value::String(s) if s.trim().is_empty() => {
            return Err(MethodError::BadRequest("Request payload not found".into()));
        }
        Value::String(s) => serde_json::from_str(s).map_err(|e| {
            MethodError::BadRequest(format!("the request payload is not valid JSON: {e}"))
        })?,
        other => other.clone(),
    };
    if v.is_object() {
        Ok(v)
    } else {
        Err(MethodError::BadRequest(
            "the request payload must be a JSON object".into(),
        ))
    }
}

/// `schemaVersion` must be a version whose major is 1 (a different minor is
/// accepted); anything else is edgeAgent's `InvalidSchemaVersionException`,
/// a 500.
fn check_schema(v: &Value) -> Result<(), MethodError> {
    let s = string_field(v, "schemaVersion")
        .map_err(|e| MethodError::Internal(e.to_string()))?
        .ok_or_else(|| MethodError::Internal("schemaVersion is missing".into()))?;
    let mut parts = s.trim().split('.');
    let major = parts.next().and_then(|m| m.parse::<u32>().ok());
    let rest_ok = parts.all(|p| p.parse::<u32>().is_ok());
    match major {
        Some(1) if rest_ok => Ok(()),
        Some(_) if rest_ok => Err(MethodError::Internal(format!(
            "The request schema version {s} is not supported; the supported version is 1.0"
        ))),
        _ => Err(MethodError::Internal(format!(
            "Invalid schema version {s:?}"
        ))),
    }
}

/// A parsed logs request (`GetModuleLogs`, `UploadModuleLogs`).
struct LogsRequest {
    items: Vec<Item>,
    encoding: Encoding,
    content: ContentType,
}

fn parse_filter(v: Option<&Value>, now: SystemTime) -> Result<Filter, MethodError> {
    let mut f = Filter::default();
    let Some(v) = v else { return Ok(f) };
    if !v.is_object() {
        return Err(MethodError::BadRequest("filter must be an object".into()));
    }
    let bad = |what: &str, e: String| MethodError::BadRequest(format!("filter.{what}: {e}"));
    if let Some(t) = field(v, "tail") {
        let n = t
            .as_u64()
            .ok_or_else(|| bad("tail", format!("{t} is not a whole number")))?;
        f.tail = Some(usize::try_from(n).unwrap_or(usize::MAX));
    }
    if let Some(s) = field(v, "since") {
        f.since = Some(logs::time_point(s, now).map_err(|e| bad("since", e))?);
    }
    if let Some(u) = field(v, "until") {
        f.until = Some(logs::time_point(u, now).map_err(|e| bad("until", e))?);
    }
    if let Some(l) = field(v, "loglevel") {
        let n = l
            .as_u64()
            .filter(|n| *n <= 7)
            .ok_or_else(|| bad("loglevel", format!("{l} is not a syslog severity 0-7")))?;
        f.loglevel = u8::try_from(n).ok();
    }
    if let Some(r) = string_field(v, "regex")? {
        f.regex = Some(
            regex::RegexBuilder::new(&r)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| bad("regex", e.to_string()))?,
        );
    }
    Ok(f)
}

fn parse_logs_request(v: &Value) -> Result<LogsRequest, MethodError> {
    check_schema(v)?;
    let now = SystemTime::now();
    let raw_items: Vec<&Value> = match field(v, "items") {
        None => return Err(MethodError::BadRequest("items is missing".into())),
        Some(Value::Array(a)) => a.iter().collect(),
        // edgeAgent accepts a single object for a one-item list.
        Some(o @ Value::Object(_)) => vec![o],
        Some(other) => {
            return Err(MethodError::BadRequest(format!(
                "items must be a list, not {other}"
            )));
        }
    };
    let mut items = Vec::with_capacity(raw_items.len());
    for it in raw_items {
        let id = required_string(it, "id")?;
        items.push(Item::new(&id, parse_filter(field(it, "filter"), now)?)?);
    }
    let encoding = match string_field(v, "encoding")?.as_deref() {
        None => Encoding::None,
        Some(e) if e.eq_ignore_ascii_case("none") => Encoding::None,
        Some(e) if e.eq_ignore_ascii_case("gzip") => Encoding::Gzip,
        Some(e) => {
            return Err(MethodError::BadRequest(format!(
                "encoding {e:?} is not one of none, gzip"
            )));
        }
    };
    let content = match string_field(v, "contentType")?.as_deref() {
        None => ContentType::Text,
        Some(c) if c.eq_ignore_ascii_case("text") => ContentType::Text,
        Some(c) if c.eq_ignore_ascii_case("json") => ContentType::Json,
        Some(c) => {
            return Err(MethodError::BadRequest(format!(
                "contentType {c:?} is not one of text, json"
            )));
        }
    };
    Ok(LogsRequest {
        items,
        encoding,
        content,
    })
}

/// `yyyy-MM-dd--HH-mm-ss` (UTC), edgeAgent's blob-name time.
fn blob_time(t: Timestamp) -> String {
    // 2026-01-02T03:04:05.678Z
    let s = t.to_iso8601();
    match (s.get(0..10), s.get(11..19)) {
        (Some(d), Some(h)) => format!("{d}--{}", h.replace(':', "-")),
        _ => s,
    }
}

impl Methods {
    /// Methods acting on `runtime`.
    pub fn new(runtime: Arc<dyn ModuleRuntime>, cfg: MethodsConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                runtime,
                iothub: cfg.iothub,
                device: cfg.device,
                uploader: Uploader::new(cfg.trust),
                own_name: cfg.own_name,
                tasks: Mutex::new(Tasks::default()),
                running: Semaphore::new(MAX_RUNNING_TASKS),
            }),
        }
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, Tasks> {
        // Plain data: a panic while holding it leaves nothing half-written.
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn origin(&self) -> Origin<'_> {
        Origin {
            iothub: &self.inner.iothub,
            device: &self.inner.device,
        }
    }

    /// The answer (status, JSON payload; `null` for none) to method `name`.
    pub async fn handle(&self, name: &str, payload: &Value) -> (i32, Value) {
        let Some(&method) = METHODS.iter().find(|m| m.eq_ignore_ascii_case(name)) else {
            return MethodError::BadRequest(format!(
                "Command '{name}' not found. The supported commands are - {}",
                METHODS.join(", ")
            ))
            .answer();
        };
        tracing::info!(method, "direct method on $edgeAgent");
        let out = match method {
            "ping" => Ok(Value::Null),
            "RestartModule" => self.restart_module(payload).await,
            "GetModuleLogs" => self.get_module_logs(payload).await,
            "UploadModuleLogs" => self.upload_module_logs(payload),
            "UploadSupportBundle" => self.upload_support_bundle(payload),
            "GetTaskStatus" => self.task_status(payload),
            _ => Err(MethodError::Internal(format!("{method} has no handler"))),
        };
        match out {
            Ok(v) => (200, v),
            Err(e) => {
                tracing::info!(method, error = %e, "direct method refused");
                e.answer()
            }
        }
    }

    async fn restart_module(&self, payload: &Value) -> Result<Value, MethodError> {
        let v = payload_object(payload)?;
        check_schema(&v)?;
        let id = required_string(&v, "id")?;
        match self.inner.runtime.restart(&id).await {
            Ok(()) => {
                tracing::info!(module = %id, "restarted (RestartModule)");
                Ok(Value::Null)
            }
            Err(RuntimeError::NotFound(_)) => Err(MethodError::Internal(format!(
                "Module {id} not found in the current environment"
            ))),
            Err(e) => Err(MethodError::Internal(format!(
                "Error restarting module {id}: {e}"
            ))),
        }
    }

    /// The names of the modules whose logs can be read (the runtime's
    /// modules and the agent itself).
    async fn module_names(&self) -> Result<Vec<String>, MethodError> {
        let mut names: Vec<String> = self
            .inner
            .runtime
            .list()
            .await
            .map(|l| l.into_iter().map(|m| m.spec.name).collect())
            .map_err(|e| MethodError::Internal(format!("listing the modules: {e}")))?;
        names.extend(self.inner.own_name.clone());
        Ok(names)
    }

    async fn get_module_logs(&self, payload: &Value) -> Result<Value, MethodError> {
        let v = payload_object(payload)?;
        let req = parse_logs_request(&v)?;
        let selected = logs::select(self.module_names().await?, &req.items);
        let too_large = || {
            MethodError::BadRequest(format!(
                "Payload size is larger than the {MAX_LOGS_PAYLOAD} bytes a direct method \
                 response can hold; request fewer lines with filter.tail, since, until, \
                 loglevel or regex, or use UploadModuleLogs"
            ))
        };
        let mut total = 0usize;
        let mut out = Vec::with_capacity(selected.len());
        for (module, filter) in selected {
            // Uncompressed text may be larger than the cap when gzip brings
            // it under (log text compresses about tenfold); read a bounded
            // multiple of it then.
            let limit = match req.encoding {
                Encoding::None => MAX_LOGS_PAYLOAD - total,
                Encoding::Gzip => MAX_LOGS_PAYLOAD * 64,
            };
            let data = match logs::read(
                self.inner.runtime.as_ref(),
                &module,
                &filter,
                req.content,
                &self.origin(),
                limit,
            )
            .await
            {
                Ok(d) => d,
                Err(ReadError::TooLarge) => return Err(too_large()),
                Err(ReadError::Runtime(e)) => {
                    return Err(MethodError::Internal(format!("logs of {module}: {e}")));
                }
            };
            let (entry, size) = logs::response_entry(&module, data, req.encoding);
            total += size;
            if total > MAX_LOGS_PAYLOAD {
                return Err(too_large());
            }
            out.push(entry);
        }
        Ok(Value::Array(out))
    }

    fn task_answer(id: &str, status: RunStatus, message: &str) -> Value {
        json!({"status": status.as_str(), "message": message, "correlationId": id})
    }

    /// Starts `work` as a background task named `op`; answers its status.
    fn spawn_task<F>(&self, op: &'static str, work: F) -> Result<Value, MethodError>
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        let id = uuid::Uuid::new_v4().to_string();
        {
            let mut t = self.tasks();
            if t.pending() >= MAX_RUNNING_TASKS + MAX_PENDING_TASKS {
                return Err(MethodError::Internal(format!(
                    "Too many background tasks ({}) in progress; try again when one has finished",
                    t.pending()
                )));
            }
            t.insert(id.clone());
        }
        let me = self.clone();
        let tid = id.clone();
        tokio::spawn(async move {
            // The semaphore is never closed, so this only waits.
            let _permit = me.inner.running.acquire().await;
            me.tasks().set(&tid, RunStatus::Running, String::new());
            let result = match tokio::time::timeout(TASK_TIMEOUT, work).await {
                Ok(r) => r,
                Err(_) => Err(format!("timed out after {} s", TASK_TIMEOUT.as_secs())),
            };
            let (status, message) = match result {
                Ok(()) => (RunStatus::Completed, String::new()),
                Err(e) => {
                    tracing::warn!(task = %tid, op, error = %e, "background task failed");
                    (
                        RunStatus::Failed,
                        format!("Task {op} failed because of error {e}"),
                    )
                }
            };
            tracing::info!(task = %tid, op, status = status.as_str(), "background task finished");
            me.tasks().set(&tid, status, message);
        });
        let (status, message) = self.tasks().get(&id);
        Ok(Self::task_answer(&id, status, &message))
    }

    /// Uploads `data` as blob `{iothub}/{device}/{file}` (edgeAgent's layout).
    async fn upload(
        &self,
        sas_url: &str,
        file: &str,
        content_type: &str,
        content_encoding: Option<&str>,
        data: Vec<u8>,
    ) -> Result<(), String> {
        let name = format!("{}/{}/{file}", self.inner.iothub, self.inner.device);
        let size = data.len();
        self.inner
            .uploader
            .put(
                sas_url,
                Blob {
                    name: &name,
                    content_type,
                    content_encoding,
                    data,
                },
            )
            .await?;
        tracing::info!(blob = %name, size, "uploaded");
        Ok(())
    }

    fn upload_module_logs(&self, payload: &Value) -> Result<Value, MethodError> {
        let v = payload_object(payload)?;
        let req = parse_logs_request(&v)?;
        let sas_url = required_string(&v, "sasUrl")?;
        upload::blob_url(&sas_url, "x").map_err(MethodError::BadRequest)?;
        let me = self.clone();
        self.spawn_task("upload logs", async move {
            let names = me.module_names().await.map_err(|e| e.to_string())?;
            let ext = match req.content {
                ContentType::Text => "log",
                ContentType::Json => "json",
            };
            let content_type = match req.content {
                ContentType::Text => "text/plain",
                ContentType::Json => "application/json",
            };
            for (module, filter) in logs::select(names, &req.items) {
                let data = logs::read(
                    me.inner.runtime.as_ref(),
                    &module,
                    &filter,
                    req.content,
                    &me.origin(),
                    MAX_UPLOAD_LOG,
                )
                .await
                .map_err(|e| match e {
                    ReadError::TooLarge => format!(
                        "the logs of {module} are larger than {MAX_UPLOAD_LOG} bytes; narrow the request"
                    ),
                    ReadError::Runtime(e) => format!("logs of {module}: {e}"),
                })?;
                let (data, gz, encoding) = match req.encoding {
                    Encoding::None => (data, "", None),
                    Encoding::Gzip => (logs::gzip(&data), ".gz", Some("gzip")),
                };
                let file = format!("{module}-{}.{ext}{gz}", blob_time(Timestamp::now()));
                me.upload(&sas_url, &file, content_type, encoding, data)
                    .await?;
            }
            Ok(())
        })
    }

    fn upload_support_bundle(&self, payload: &Value) -> Result<Value, MethodError> {
        let v = payload_object(payload)?;
        // edgeAgent does not check schemaVersion here.
        let sas_url = required_string(&v, "sasUrl")?;
        upload::blob_url(&sas_url, "x").map_err(MethodError::BadRequest)?;
        let now = SystemTime::now();
        let point = |name: &str| -> Result<Option<Timestamp>, MethodError> {
            field(&v, name)
                .map(|t| {
                    logs::time_point(t, now)
                        .map_err(|e| MethodError::BadRequest(format!("{name}: {e}")))
                })
                .transpose()
        };
        // `iotedge support-bundle`'s default window: the last day.
        let since = point("since")?.unwrap_or_else(|| {
            Timestamp::from(now.checked_sub(Duration::from_secs(86_400)).unwrap_or(now))
        });
        let until = point("until")?;
        let edge_runtime_only = match field(&v, "edgeRuntimeOnly") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(MethodError::BadRequest(format!(
                    "edgeRuntimeOnly must be true or false, not {other}"
                )));
            }
        };
        let req = bundle::Request {
            since,
            until,
            edge_runtime_only,
        };
        let me = self.clone();
        self.spawn_task("upload support bundle", async move {
            let data = bundle::collect(me.inner.runtime.as_ref(), &me.origin(), &req).await?;
            let file = format!("support-bundle-{}.tar.gz", blob_time(Timestamp::now()));
            me.upload(&sas_url, &file, "application/gzip", None, data)
                .await?;
            Ok(())
        })
    }

    fn task_status(&self, payload: &Value) -> Result<Value, MethodError> {
        let v = payload_object(payload)?;
        check_schema(&v)?;
        let id = required_string(&v, "correlationId")?;
        let (status, message) = self.tasks().get(&id);
        Ok(Self::task_answer(&id, status, &message))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn schema_versions_with_major_1_only() {
        assert_eq!(check_schema(&json!({"schemaVersion": "1.0"})), Ok(()));
        assert_eq!(check_schema(&json!({"SCHEMAVERSION": "1.2"})), Ok(()));
        for bad in [
            json!({"schemaVersion": "2.0"}),
            json!({"schemaVersion": "x"}),
            json!({}),
        ] {
            assert!(
                matches!(check_schema(&bad), Err(MethodError::Internal(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn payloads_are_objects_and_fields_any_case() {
        assert_eq!(
            payload_object(&Value::Null).unwrap_err().answer(),
            (400, json!({"message": "Request payload not found"}))
        );
        assert_eq!(payload_object(&json!("")).unwrap_err().answer().0, 400);
        assert_eq!(payload_object(&json!([1])).unwrap_err().answer().0, 400);
        let v = payload_object(&json!("{\"Id\": \"m\"}")).unwrap();
        assert_eq!(required_string(&v, "id").unwrap(), "m");
        assert!(required_string(&json!({"id": 5}), "id").is_err());
    }

    #[test]
    fn logs_requests_parse_as_edge_agent_reads_them() {
        let r = parse_logs_request(&json!({
            "schemaVersion": "1.0",
            "items": {"id": "all", "filter": {"tail": 3, "since": "2d", "loglevel": 4, "regex": "x"}},
            "encoding": "Gzip", "contentType": "JSON"
        }))
        .unwrap();
        assert_eq!(r.items.len(), 1);
        assert_eq!(r.items[0].filter.tail, Some(3));
        assert!(r.items[0].filter.since.is_some());
        assert_eq!(r.items[0].filter.loglevel, Some(4));
        assert_eq!((r.encoding, r.content), (Encoding::Gzip, ContentType::Json));
        // defaults: no encoding, text
        let r = parse_logs_request(&json!({"schemaVersion": "1.0", "items": []})).unwrap();
        assert_eq!((r.encoding, r.content), (Encoding::None, ContentType::Text));
        for bad in [
            json!({"schemaVersion": "1.0"}),
            json!({"schemaVersion": "1.0", "items": [{"filter": {}}]}),
            json!({"schemaVersion": "1.0", "items": [{"id": "a", "filter": {"tail": -1}}]}),
            json!({"schemaVersion": "1.0", "items": [{"id": "a", "filter": {"loglevel": 9}}]}),
            json!({"schemaVersion": "1.0", "items": [{"id": "a", "filter": {"since": "soon"}}]}),
            json!({"schemaVersion": "1.0", "items": [], "contentType": "xml"}),
        ] {
            assert!(
                matches!(parse_logs_request(&bad), Err(MethodError::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn blob_times_are_edge_agents() {
        let t = Timestamp::parse("2026-01-02T03:04:05.678Z").unwrap();
        assert_eq!(blob_time(t), "2026-01-02--03-04-05");
    }

    #[test]
    fn task_statuses_are_bounded_and_keep_running_ones() {
        let mut t = Tasks::default();
        t.insert("running".into());
        t.set("running", RunStatus::Running, String::new());
        for i in 0..MAX_REMEMBERED_TASKS + 10 {
            let id = format!("t{i}");
            t.insert(id.clone());
            t.set(&id, RunStatus::Completed, String::new());
        }
        assert!(t.by_id.len() <= MAX_REMEMBERED_TASKS);
        assert_eq!(t.get("running").0, RunStatus::Running);
        assert_eq!(t.get("t0").0, RunStatus::Unknown);
        assert_eq!(t.pending(), 1);
    }
}
