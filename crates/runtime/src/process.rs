//! The process backend: modules are plain child processes of verged.
//!
//! For devices without a container engine. A module's `image` is an executable
//! path followed by whitespace-separated arguments; the createOptions `Cmd`
//! array is appended as further arguments and `WorkingDir` becomes the working
//! directory. Everything else in createOptions is ignored, with a warning
//! ([`ignored_create_options`]; verged's management API shows them in the
//! module's status description, and `verge list` prints them). An image that
//! looks like a container image fails its pull with a hint.
//!
//! # Environment
//!
//! The child gets exactly [`ModuleSpec::env`] (the daemon's own environment is
//! not inherited), plus a default `PATH` when the spec does not set one. When
//! [`ModuleSpec::workload_socket`] (or `management_socket`) is set and the
//! `IOTEDGE_WORKLOADURI` (`IOTEDGE_MANAGEMENTURI`) variable names a different
//! `unix://` path, that path is made a symlink to the socket at start time. The
//! simplest set-up is for the daemon to put the socket's own path in the URI.
//!
//! # State
//!
//! Everything lives under the state directory:
//!
//! ```text
//! <state_dir>/modules/<name>/spec.json      the ModuleSpec
//! <state_dir>/modules/<name>/state.json     status, exit code, times, pid
//! <state_dir>/modules/<name>/logs/output.log[.1, .2 …]
//! ```
//!
//! so [`ModuleRuntime::list`] and [`ModuleRuntime::get`] survive a daemon
//! restart. Each child runs in its own process group. A module that was still
//! running when the previous daemon died cannot be re-adopted (its output pipes
//! died with the daemon and it can no longer be reaped or watched), so
//! [`ProcessRuntime::open`] kills what is left of its process group (after
//! checking the pid still belongs to it, by its start time) and reports the
//! module as [`ModuleStatus::Failed`] with no exit code; the agent's restart
//! policy then starts it again.
//!
//! # Exit status
//!
//! Exit code 0 maps to [`ModuleStatus::Stopped`], anything else to
//! [`ModuleStatus::Failed`]. A child killed by a signal gets exit code
//! `128 + signal` (as Docker reports it) and is `Failed` — also after
//! [`ModuleRuntime::stop`], unless the module handles SIGTERM and exits 0.
//! When the main process exits, whatever is left in its process group is
//! killed with SIGKILL, as a container's processes die with its init.
//!
//! # Logs
//!
//! stdout and stderr are read line by line (lines longer than 16 KiB are
//! split) and appended, with a millisecond UTC timestamp, to size-rotated files
//! (default 1 MiB × 3 files).

use std::collections::HashMap;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::{broadcast, watch};
use verge_core::time::Timestamp;

mod output;

use output::{LogSink, pump};
pub use output::{OutputLog, OutputRun};

use crate::{
    LogOptions, LogStream, ModuleRuntime, ModuleSpec, ModuleState, ModuleStatus, RegistryAuth,
    RuntimeError, RuntimeInfo,
};

/// `PATH` given to children whose spec does not set one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Longest log line kept in one piece; longer output is split.
const MAX_LINE: usize = 16 * 1024;

/// How long to wait for a SIGKILLed process to be reaped before giving up.
const KILL_GRACE: Duration = Duration::from_secs(10);

/// How long log readers may keep draining pipes after the main process died.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Settings of a [`ProcessRuntime`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    /// Where specs, state and logs are kept.
    pub state_dir: PathBuf,
    /// Size at which a log file is rotated.
    pub log_max_bytes: u64,
    /// Log files kept per module, the current one included (at least 1).
    pub log_max_files: usize,
    /// Stop timeout used by `restart` and `remove`, which take none.
    pub stop_timeout: Duration,
}

impl ProcessConfig {
    /// Defaults: 1 MiB × 3 log files, 10 s stop timeout.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            log_max_bytes: 1024 * 1024,
            log_max_files: 3,
            stop_timeout: Duration::from_secs(10),
        }
    }
}

/// Runs modules as child processes. See the [module docs](self).
#[derive(Clone)]
pub struct ProcessRuntime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ProcessRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessRuntime")
            .field("state_dir", &self.inner.config.state_dir)
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: ProcessConfig,
    modules: Mutex<HashMap<String, Arc<Module>>>,
}

/// What is persisted in `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunRecord {
    status: ModuleStatus,
    exit_code: Option<i64>,
    started_at: Option<Timestamp>,
    exited_at: Option<Timestamp>,
    /// Pid of the last run (also its process group id).
    pid: Option<u32>,
    /// Start time of that pid (field 22 of `/proc/<pid>/stat`), to tell it
    /// from a recycled pid after a daemon restart.
    proc_start: Option<u64>,
}

impl RunRecord {
    fn created() -> Self {
        Self {
            status: ModuleStatus::Stopped,
            exit_code: None,
            started_at: None,
            exited_at: None,
            pid: None,
            proc_start: None,
        }
    }
}

#[derive(Clone)]
struct RunHandle {
    pgid: i32,
    exited: watch::Receiver<bool>,
}

struct Module {
    spec: ModuleSpec,
    dir: PathBuf,
    /// Serialises start/stop/remove of this module.
    op: tokio::sync::Mutex<()>,
    record: Mutex<RunRecord>,
    /// Serialises writes of `state.json`.
    persist_lock: tokio::sync::Mutex<()>,
    run: Mutex<Option<RunHandle>>,
    log: Arc<LogSink>,
    next_run: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn other(context: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Other(format!("{context}: {e}"))
}

fn invalid(module: &str, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::InvalidSpec {
        module: module.to_owned(),
        reason: reason.into(),
    }
}

/// Module names become directory names.
fn validate_name(name: &str) -> Result<(), RuntimeError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && !name.contains(['/', '\0', '\\']);
    if ok {
        Ok(())
    } else {
        Err(invalid(
            name,
            "module name is not usable as a directory name",
        ))
    }
}

/// The command line a spec runs: program and arguments.
#[derive(Debug)]
struct CommandLine {
    program: String,
    args: Vec<String>,
    working_dir: Option<String>,
}

/// The createOptions the process backend applies; see [`ignored_create_options`].
pub const APPLIED_CREATE_OPTIONS: [&str; 2] = ["Cmd", "WorkingDir"];

/// The createOptions a process module does not get (everything but
/// [`APPLIED_CREATE_OPTIONS`]; `HostConfig` by its keys, as
/// `HostConfig.PortBindings`), sorted: for warnings and `verge list`.
pub fn ignored_create_options(create_options: &serde_json::Value) -> Vec<String> {
    let Some(map) = create_options.as_object() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (k, v) in map {
        if APPLIED_CREATE_OPTIONS.contains(&k.as_str()) || v.is_null() {
            continue;
        }
        match v.as_object() {
            Some(inner) if k == "HostConfig" => out.extend(
                inner
                    .iter()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(ik, _)| format!("{k}.{ik}")),
            ),
            _ => out.push(k.clone()),
        }
    }
    out.sort();
    out
}

/// Whether a module's image names a container image rather than an
/// executable (`mcr.microsoft.com/azureiotedge-agent:1.5`, `nginx:1.27`):
/// not a path, but with a registry or repository path, tag or digest.
pub fn looks_like_container_image(program: &str) -> bool {
    !program.starts_with('/')
        && !program.starts_with('.')
        && (program.contains('/') || program.contains(':') || program.contains('@'))
}

fn container_image_hint(program: &str) -> String {
    format!(
        "the process backend runs executables; `{program}` looks like a container image: \
         give the module's image as the path of an executable (with its arguments), or \
         configure [moby_runtime] in verged's config to run containers"
    )
}

fn command_line(spec: &ModuleSpec) -> Result<CommandLine, RuntimeError> {
    let mut words = spec.image.split_whitespace().map(str::to_owned);
    let program = words
        .next()
        .ok_or_else(|| invalid(&spec.name, "image (executable path) is empty"))?;
    let mut args: Vec<String> = words.collect();
    let mut working_dir = None;
    match &spec.create_options {
        serde_json::Value::Null => {}
        serde_json::Value::Object(map) => {
            match map.get("Cmd") {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::Array(items)) => {
                    for item in items {
                        let s = item.as_str().ok_or_else(|| {
                            invalid(&spec.name, "Cmd must be an array of strings")
                        })?;
                        args.push(s.to_owned());
                    }
                }
                Some(serde_json::Value::String(s)) => {
                    args.extend(s.split_whitespace().map(str::to_owned));
                }
                Some(_) => return Err(invalid(&spec.name, "Cmd must be an array of strings")),
            }
            match map.get("WorkingDir") {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::String(s)) if s.is_empty() => {}
                Some(serde_json::Value::String(s)) => working_dir = Some(s.clone()),
                Some(_) => return Err(invalid(&spec.name, "WorkingDir must be a string")),
            }
        }
        _ => return Err(invalid(&spec.name, "createOptions must be a JSON object")),
    }
    Ok(CommandLine {
        program,
        args,
        working_dir,
    })
}

/// Finds an executable: a path as given, or a bare name on the daemon's `PATH`.
async fn resolve_executable(program: &str) -> Option<PathBuf> {
    async fn is_exec(p: &Path) -> bool {
        match tokio::fs::metadata(p).await {
            Ok(m) => m.is_file() && m.permissions().mode() & 0o111 != 0,
            Err(_) => false,
        }
    }
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_exec(&p).await.then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    for dir in std::env::split_paths(&path) {
        let p = dir.join(program);
        if is_exec(&p).await {
            return Some(p);
        }
    }
    None
}

/// Writes a state file atomically and durably (0600).
async fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<(), RuntimeError> {
    let data = serde_json::to_vec_pretty(value).map_err(|e| other("serialising state", e))?;
    verge_files::write_atomic_async(path.to_owned(), data)
        .await
        .map_err(|e| other("writing state", e))
}

/// `(pgrp, starttime)` of a live, non-zombie process, from `/proc/<pid>/stat`.
async fn proc_stat(pid: u32) -> Option<(i64, u64)> {
    let text = tokio::fs::read_to_string(format!("/proc/{pid}/stat"))
        .await
        .ok()?;
    // The command name (field 2) may contain spaces and parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): index = field number - 3.
    let state = *fields.first()?;
    if state == "Z" || state == "X" {
        return None;
    }
    let pgrp = fields.get(5 - 3)?.parse().ok()?;
    let start = fields.get(22 - 3)?.parse().ok()?;
    Some((pgrp, start))
}

fn to_pid(pid: u32) -> Option<Pid> {
    i32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .map(Pid::from_raw)
}

/// Sends a signal to a process group; a group that is gone is not an error.
fn signal_group(pgid: i32, signal: Signal) {
    if pgid <= 1 {
        return;
    }
    if let Err(e) = killpg(Pid::from_raw(pgid), signal)
        && e != nix::errno::Errno::ESRCH
    {
        tracing::warn!(pgid, ?signal, error = %e, "signalling process group failed");
    }
}

fn exit_code_of(status: std::process::ExitStatus) -> i64 {
    match (status.code(), status.signal()) {
        (Some(code), _) => i64::from(code),
        (None, Some(sig)) => 128 + i64::from(sig),
        (None, None) => -1,
    }
}

/// Waits until the run's `exited` flag is set, or the timeout passes.
async fn wait_exited(rx: &mut watch::Receiver<bool>, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, rx.wait_for(|done| *done))
        .await
        .map(|r| r.is_ok())
        .unwrap_or(false)
}

/// Makes the socket path the module sees (from its URI variable) lead to the
/// host socket, with a symlink when the two differ.
async fn link_socket(
    spec: &ModuleSpec,
    socket: Option<&PathBuf>,
    var: &str,
) -> Result<(), RuntimeError> {
    let Some(socket) = socket else { return Ok(()) };
    let Some(uri) = spec.env.get(var) else {
        return Ok(());
    };
    let Some(seen) = uri.strip_prefix("unix://") else {
        return Ok(());
    };
    let seen = PathBuf::from(seen);
    if seen == *socket || seen.as_os_str().is_empty() {
        return Ok(());
    }
    match tokio::fs::symlink_metadata(&seen).await {
        Ok(m) if m.file_type().is_symlink() => {
            if tokio::fs::read_link(&seen).await.ok().as_ref() == Some(socket) {
                return Ok(());
            }
            tokio::fs::remove_file(&seen)
                .await
                .map_err(|e| other(&format!("replacing {}", seen.display()), e))?;
        }
        Ok(_) => {
            return Err(invalid(
                &spec.name,
                format!(
                    "{var} points at {} which exists and is not the module's socket {}",
                    seen.display(),
                    socket.display()
                ),
            ));
        }
        Err(_) => {}
    }
    if let Some(parent) = seen.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| other(&format!("creating {}", parent.display()), e))?;
    }
    tokio::fs::symlink(socket, &seen)
        .await
        .map_err(|e| other(&format!("linking {}", seen.display()), e))
}

impl ProcessRuntime {
    /// Opens (creating if needed) the state directory and loads the modules
    /// recorded there. Modules left running by a previous daemon are killed and
    /// reported as failed (see the [module docs](self)).
    pub async fn open(config: ProcessConfig) -> Result<Self, RuntimeError> {
        let modules_dir = config.state_dir.join("modules");
        tokio::fs::create_dir_all(&modules_dir)
            .await
            .map_err(|e| other(&format!("creating {}", modules_dir.display()), e))?;
        let mut modules = HashMap::new();
        let mut entries = tokio::fs::read_dir(&modules_dir)
            .await
            .map_err(|e| other(&format!("reading {}", modules_dir.display()), e))?;
        while let Some(entry) = entries
            .next_entry()
            .await
            .map_err(|e| other(&format!("reading {}", modules_dir.display()), e))?
        {
            let dir = entry.path();
            match Self::load_module(&config, &dir).await {
                Ok(Some(module)) => {
                    modules.insert(module.spec.name.clone(), module);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "skipping unreadable module state");
                }
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                modules: Mutex::new(modules),
            }),
        })
    }

    async fn load_module(
        config: &ProcessConfig,
        dir: &Path,
    ) -> Result<Option<Arc<Module>>, RuntimeError> {
        let spec_path = dir.join("spec.json");
        let spec_bytes = match tokio::fs::read(&spec_path).await {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(other(&format!("reading {}", spec_path.display()), e)),
        };
        let spec: ModuleSpec = serde_json::from_slice(&spec_bytes)
            .map_err(|e| other(&format!("parsing {}", spec_path.display()), e))?;
        if dir.file_name().and_then(|n| n.to_str()) != Some(spec.name.as_str()) {
            return Err(other(
                "loading module",
                format!("{} holds module {}", dir.display(), spec.name),
            ));
        }
        let mut record = match tokio::fs::read(dir.join("state.json")).await {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                tracing::warn!(module = %spec.name, error = %e, "state.json unreadable; module reported stopped");
                RunRecord::created()
            }),
            Err(_) => RunRecord::created(),
        };
        let mut dirty = false;
        if record.status == ModuleStatus::Running {
            if let (Some(pid), Some(start)) = (record.pid, record.proc_start)
                && let Some((pgrp, now_start)) = proc_stat(pid).await
                && now_start == start
                && i64::from(pid) == pgrp
                && let Some(p) = to_pid(pid)
            {
                tracing::warn!(module = %spec.name, pid, "killing module left running by a previous daemon");
                signal_group(p.as_raw(), Signal::SIGKILL);
            }
            record.status = ModuleStatus::Failed;
            record.exit_code = None;
            record.exited_at = Some(Timestamp::now());
            dirty = true;
        }
        let module = Arc::new(Module::new(config, spec, dir.to_path_buf(), record));
        if dirty && let Err(e) = module.persist().await {
            tracing::warn!(module = %module.spec.name, error = %e, "persisting recovered state failed");
        }
        Ok(Some(module))
    }

    fn module(&self, name: &str) -> Result<Arc<Module>, RuntimeError> {
        lock(&self.inner.modules)
            .get(name)
            .cloned()
            .ok_or_else(|| RuntimeError::NotFound(name.to_owned()))
    }

    /// The configuration this runtime was opened with.
    pub fn config(&self) -> &ProcessConfig {
        &self.inner.config
    }
}

impl Module {
    fn new(config: &ProcessConfig, spec: ModuleSpec, dir: PathBuf, record: RunRecord) -> Self {
        let log = Arc::new(LogSink::new(
            dir.join("logs"),
            config.log_max_bytes,
            config.log_max_files.max(1),
        ));
        Self {
            spec,
            dir,
            op: tokio::sync::Mutex::new(()),
            record: Mutex::new(record),
            persist_lock: tokio::sync::Mutex::new(()),
            run: Mutex::new(None),
            log,
            next_run: AtomicU64::new(1),
        }
    }

    async fn persist(&self) -> Result<(), RuntimeError> {
        let _g = self.persist_lock.lock().await;
        let snapshot = lock(&self.record).clone();
        write_json_atomic(&self.dir.join("state.json"), &snapshot).await
    }

    fn state(&self) -> ModuleState {
        let r = lock(&self.record).clone();
        ModuleState {
            spec: self.spec.clone(),
            status: r.status,
            exit_code: r.exit_code,
            started_at: r.started_at,
            exited_at: r.exited_at,
            health: None,
            runtime_id: r.pid.map(|p| p.to_string()),
            image_id: None,
        }
    }

    fn current_run(&self) -> Option<RunHandle> {
        lock(&self.run)
            .as_ref()
            .filter(|r| !*r.exited.borrow())
            .cloned()
    }

    /// Starts the process unless it runs. Caller holds `op`.
    async fn start(self: &Arc<Self>) -> Result<(), RuntimeError> {
        if self.current_run().is_some() {
            return Ok(());
        }
        let cl = command_line(&self.spec)?;
        link_socket(
            &self.spec,
            self.spec.workload_socket.as_ref(),
            "IOTEDGE_WORKLOADURI",
        )
        .await?;
        link_socket(
            &self.spec,
            self.spec.management_socket.as_ref(),
            "IOTEDGE_MANAGEMENTURI",
        )
        .await?;

        let mut cmd = tokio::process::Command::new(&cl.program);
        cmd.args(&cl.args)
            .env_clear()
            .envs(&self.spec.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        if !self.spec.env.contains_key("PATH") {
            cmd.env("PATH", DEFAULT_PATH);
        }
        if let Some(wd) = &cl.working_dir {
            cmd.current_dir(wd);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| invalid(&self.spec.name, format!("cannot start {}: {e}", cl.program)))?;
        let Some(pid) = child.id() else {
            return Err(other("starting module", "child exited before it got a pid"));
        };
        let pgid = i32::try_from(pid).map_err(|e| other("starting module", e))?;
        let proc_start = proc_stat(pid).await.map(|(_, s)| s);
        let run_id = self.next_run.fetch_add(1, Ordering::Relaxed);
        let (exited_tx, exited_rx) = watch::channel(false);
        {
            let mut r = lock(&self.record);
            r.status = ModuleStatus::Running;
            r.exit_code = None;
            r.started_at = Some(Timestamp::now());
            r.exited_at = None;
            r.pid = Some(pid);
            r.proc_start = proc_start;
        }
        *lock(&self.run) = Some(RunHandle {
            pgid,
            exited: exited_rx,
        });
        self.log.begin_run(run_id).await;
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            pumps.push(tokio::spawn(pump(out, b'O', self.log.clone())));
        }
        if let Some(err) = child.stderr.take() {
            pumps.push(tokio::spawn(pump(err, b'E', self.log.clone())));
        }
        tracing::info!(module = %self.spec.name, pid, "module process started");
        let persisted = self.persist().await;

        let module = self.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            // The group dies with its leader, as a container's processes do.
            signal_group(pgid, Signal::SIGKILL);
            let code = match status {
                Ok(s) => Some(exit_code_of(s)),
                Err(e) => {
                    tracing::warn!(module = %module.spec.name, error = %e, "waiting for module process failed");
                    None
                }
            };
            {
                let mut r = lock(&module.record);
                r.status = if code == Some(0) {
                    ModuleStatus::Stopped
                } else {
                    ModuleStatus::Failed
                };
                r.exit_code = code;
                r.exited_at = Some(Timestamp::now());
            }
            tracing::info!(module = %module.spec.name, pid, exit_code = ?code, "module process exited");
            if let Err(e) = module.persist().await {
                tracing::debug!(module = %module.spec.name, error = %e, "persisting exit state failed");
            }
            let _ = exited_tx.send(true);
            for p in pumps {
                let abort = p.abort_handle();
                if tokio::time::timeout(DRAIN_GRACE, p).await.is_err() {
                    abort.abort();
                }
            }
            module.log.end_run(run_id).await;
        });
        persisted
    }

    /// Stops the process if it runs. Caller holds `op`.
    async fn stop(&self, timeout: Duration) -> Result<(), RuntimeError> {
        let Some(mut run) = self.current_run() else {
            return Ok(());
        };
        signal_group(run.pgid, Signal::SIGTERM);
        if wait_exited(&mut run.exited, timeout).await {
            return Ok(());
        }
        tracing::info!(module = %self.spec.name, pgid = run.pgid, "module ignored SIGTERM; sending SIGKILL");
        signal_group(run.pgid, Signal::SIGKILL);
        if wait_exited(&mut run.exited, KILL_GRACE).await {
            Ok(())
        } else {
            Err(other(
                "stopping module",
                format!("{} did not exit after SIGKILL", self.spec.name),
            ))
        }
    }
}

#[async_trait::async_trait]
impl ModuleRuntime for ProcessRuntime {
    async fn pull(&self, image: &str, _auth: Option<&RegistryAuth>) -> Result<(), RuntimeError> {
        let program = image
            .split_whitespace()
            .next()
            .ok_or_else(|| RuntimeError::ImageNotFound(image.to_owned()))?;
        match resolve_executable(program).await {
            Some(_) => Ok(()),
            None if looks_like_container_image(program) => Err(RuntimeError::PullFailed {
                image: image.to_owned(),
                reason: container_image_hint(program),
            }),
            None => Err(RuntimeError::ImageNotFound(program.to_owned())),
        }
    }

    async fn create(&self, spec: &ModuleSpec) -> Result<(), RuntimeError> {
        validate_name(&spec.name)?;
        command_line(spec)?;
        let ignored = ignored_create_options(&spec.create_options);
        if !ignored.is_empty() {
            tracing::warn!(
                module = %spec.name,
                ignored = %ignored.join(", "),
                "the process backend applies only Cmd and WorkingDir of createOptions; the rest is ignored"
            );
        }
        let dir = self.inner.config.state_dir.join("modules").join(&spec.name);
        let module = Arc::new(Module::new(
            &self.inner.config,
            spec.clone(),
            dir.clone(),
            RunRecord::created(),
        ));
        {
            let mut modules = lock(&self.inner.modules);
            if modules.contains_key(&spec.name) {
                return Err(RuntimeError::AlreadyExists(spec.name.clone()));
            }
            modules.insert(spec.name.clone(), module.clone());
        }
        let result = async {
            tokio::fs::create_dir_all(dir.join("logs"))
                .await
                .map_err(|e| other(&format!("creating {}", dir.display()), e))?;
            write_json_atomic(&dir.join("spec.json"), spec).await?;
            module.persist().await
        }
        .await;
        if result.is_err() {
            lock(&self.inner.modules).remove(&spec.name);
            let _ = tokio::fs::remove_dir_all(&dir).await;
        }
        result
    }

    async fn start(&self, name: &str) -> Result<(), RuntimeError> {
        let module = self.module(name)?;
        let _op = module.op.lock().await;
        module.start().await
    }

    async fn stop(&self, name: &str, timeout: Duration) -> Result<(), RuntimeError> {
        let module = self.module(name)?;
        let _op = module.op.lock().await;
        module.stop(timeout).await
    }

    async fn restart(&self, name: &str) -> Result<(), RuntimeError> {
        let module = self.module(name)?;
        let _op = module.op.lock().await;
        module.stop(self.inner.config.stop_timeout).await?;
        module.start().await
    }

    async fn remove(&self, name: &str) -> Result<(), RuntimeError> {
        let module = self.module(name)?;
        let _op = module.op.lock().await;
        module.stop(self.inner.config.stop_timeout).await?;
        {
            let mut modules = lock(&self.inner.modules);
            if modules.get(name).is_some_and(|m| Arc::ptr_eq(m, &module)) {
                modules.remove(name);
            } else {
                return Err(RuntimeError::NotFound(name.to_owned()));
            }
        }
        let _persist = module.persist_lock.lock().await;
        match tokio::fs::remove_dir_all(&module.dir).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(other(&format!("removing {}", module.dir.display()), e)),
        }
    }

    async fn get(&self, name: &str) -> Result<ModuleState, RuntimeError> {
        Ok(self.module(name)?.state())
    }

    async fn list(&self) -> Result<Vec<ModuleState>, RuntimeError> {
        let modules: Vec<Arc<Module>> = lock(&self.inner.modules).values().cloned().collect();
        let mut states: Vec<ModuleState> = modules.iter().map(|m| m.state()).collect();
        states.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(states)
    }

    async fn logs(&self, name: &str, options: &LogOptions) -> Result<LogStream, RuntimeError> {
        let module = self.module(name)?;
        module.log.stream(options).await
    }

    async fn info(&self) -> Result<RuntimeInfo, RuntimeError> {
        Ok(RuntimeInfo {
            kind: "process".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            os_type: std::env::consts::OS.to_owned(),
            architecture: std::env::consts::ARCH.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests;
