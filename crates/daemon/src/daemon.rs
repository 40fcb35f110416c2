//! Putting it together: keys, identities, CA, sockets, and the agent watchdog.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use verge_runtime::process::OutputLog;
use verge_runtime::{ModuleRuntime, ModuleSpec, ModuleStatus};
use verge_shutdown::CancellationToken;

use crate::ca::EdgeCa;
use crate::cloud_identities::{CloudIdentities, CloudTarget};
use crate::config::{AgentKind, Config};
use crate::env::{EnvContext, WorkloadUriStyle, agent_env};
use crate::http::{ServedSocket, bind_unix};
use crate::keys::{
    IdentityStore, canonical_module_id, load_or_create_device_key, store_device_key,
};
use crate::mgmt::{DaemonControl, MgmtExtras, MgmtState, router_with as mgmt_router_with};
use crate::supervision::AgentMonitor;
use crate::workload::{CallerCheck, DaemonState, WorkloadSockets};

/// First restart delay of the agent.
pub const BACKOFF_START: Duration = Duration::from_secs(1);
/// Longest restart delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A run this long resets the back-off.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

/// Next back-off delay: doubles up to [`BACKOFF_MAX`]; resets after a long run.
pub fn next_backoff(current: Duration, ran_for: Duration) -> Duration {
    if ran_for >= BACKOFF_RESET_AFTER {
        BACKOFF_START
    } else {
        (current * 2).min(BACKOFF_MAX)
    }
}

/// Runs verged until `shutdown` completes.
pub async fn run(
    config: Config,
    runtime: Arc<dyn ModuleRuntime>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with(config, runtime, shutdown, None).await
}

/// [`run`], controllable through the management API (`/system/*`): the
/// caller also ends the run when `control` asks (see [`DaemonControl`]).
pub async fn run_with(
    config: Config,
    runtime: Arc<dyn ModuleRuntime>,
    shutdown: impl Future<Output = ()>,
    control: Option<Arc<DaemonControl>>,
) -> anyhow::Result<()> {
    // Startup file I/O, off the async workers.
    let cfg = config.clone();
    let (identities, ca) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        std::fs::create_dir_all(&cfg.homedir)
            .with_context(|| format!("creating homedir {}", cfg.homedir.display()))?;
        let device_key = match cfg.provisioning.device_key() {
            Some(k) => {
                store_device_key(&cfg.homedir, k)?;
                k.clone()
            }
            None => load_or_create_device_key(&cfg.homedir)?,
        };
        let identities = IdentityStore::open(&cfg.homedir, device_key)?;
        let ca = EdgeCa::load_or_create(
            &cfg.edge_ca,
            &cfg.homedir,
            cfg.trust_bundle_cert.as_deref(),
            cfg.provisioning.device_id.as_str(),
        )?;
        Ok((identities, ca))
    })
    .await??;
    if let Some(secs) = config.server_cert_lifetime_secs {
        tracing::warn!(
            secs,
            "server_cert_lifetime_secs is set: server certificates are short-lived (testing only)"
        );
        ca.set_server_cert_lifetime(secs);
    }

    let state = Arc::new(DaemonState {
        device_id: config.provisioning.device_id.clone(),
        hub: config.provisioning.iothub_hostname.clone(),
        hostname: config.hostname.clone(),
        identities: identities.clone(),
        ca: ca.clone(),
    });
    let is_docker = runtime
        .info()
        .await
        .map(|i| i.kind == "docker")
        .unwrap_or(false);
    // aziot's config names Microsoft's agent image: Verge's agent runs.
    let agent_image = match config
        .system_images
        .resolve(&config.agent.image, config.agent.kind == AgentKind::Docker)
    {
        Ok(None) => config.agent.image.clone(),
        Ok(Some(verge)) => {
            tracing::info!(image = %config.agent.image, runs = %verge,
                "Microsoft's agent image: Verge's agent runs in its place");
            verge
        }
        Err(e) => anyhow::bail!("agent.config.image: {e}"),
    };
    let monitor = AgentMonitor::new(
        &config.agent.name,
        match config.agent.kind {
            AgentKind::Process => "process",
            AgentKind::Docker => "docker",
        },
        &config.agent.image,
    );
    let mut sockets = WorkloadSockets::new(state.clone(), config.listen.workload_dir.clone());
    if !is_docker {
        // Process backend: the modules share a uid, so the caller's process
        // decides (see `workload`'s docs); Docker mounts each socket into
        // its own container only.
        let mut check = CallerCheck::new(runtime.clone());
        if config.agent.kind == AgentKind::Process {
            check = check.with_agent(&config.agent.name, monitor.clone());
        }
        sockets = sockets.with_caller_check(check);
    }
    let sockets = Arc::new(sockets);
    let agent_identity = identities
        .get_or_create(&config.agent.name, "iotedge")
        .await?;
    for identity in identities.list().await {
        sockets
            .ensure(&identity.module_id)
            .await
            .with_context(|| format!("workload socket of {}", identity.module_id))?;
    }

    let env_ctx = EnvContext {
        iothub_hostname: config.provisioning.iothub_hostname.to_string(),
        device_id: config.provisioning.device_id.to_string(),
        hostname: config.hostname.clone(),
        parent_hostname: config.parent_hostname.clone(),
        workload_uri: if is_docker {
            WorkloadUriStyle::Fixed(config.connect.workload_uri.clone())
        } else {
            WorkloadUriStyle::HostSocket
        },
    };

    // A process agent's output, kept as a process module's is, so
    // `verge logs edgeAgent` and the support bundle read it.
    let agent_log = Arc::new(OutputLog::new(
        agent_log_dir(&config.homedir),
        AGENT_LOG_MAX_BYTES,
        AGENT_LOG_MAX_FILES,
    ));
    let mgmt_path = config.listen.management_socket.clone();
    let listener = bind_unix(&mgmt_path, 0o660)
        .with_context(|| format!("binding the management socket {}", mgmt_path.display()))?;
    let mgmt = ServedSocket::serve(
        mgmt_path.clone(),
        listener,
        mgmt_router_with(
            MgmtState {
                daemon: state.clone(),
                runtime: runtime.clone(),
                sockets: sockets.clone(),
                env: env_ctx.clone(),
                allowed_uid: nix::unistd::getuid().as_raw(),
                system_images: config.system_images.clone(),
                pulls: Default::default(),
            },
            MgmtExtras {
                agent: Some(monitor.clone()),
                agent_log: (config.agent.kind == AgentKind::Process).then(|| agent_log.clone()),
                homedir: Some(config.homedir.clone()),
                control: control.clone(),
            },
        ),
    );
    tracing::info!(socket = %mgmt_path.display(), "management API up");

    let renewal = ca.spawn_renewal(Duration::from_secs(3600));

    // Module identities in the cloud, in the background: never in the way
    // of module start-up or the management API (see `cloud_identities`).
    // One shutdown for verged's own tasks: the token stops them, the
    // tracker waits for them (bounded), stragglers are logged by name.
    let tasks = verge_shutdown::Shutdown::new();
    match CloudIdentities::new(
        CloudTarget {
            hub: config.provisioning.iothub_hostname.clone(),
            https_port: config.provisioning.https_port,
            device_id: config.provisioning.device_id.clone(),
            trust_pem: ca.trust_bundle(),
            credential: config.provisioning.credential.clone(),
        },
        identities.clone(),
    ) {
        Ok(c) => {
            tasks.spawn("cloud identity registration", c.run(tasks.token()));
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"),
                "cannot set up the HTTPS client; module identities are not registered in the cloud");
        }
    }

    // The agent.
    let agent_socket = sockets.socket_path(&agent_identity.module_id);
    let agent_workload_env = match config.agent.kind {
        AgentKind::Process => EnvContext {
            workload_uri: WorkloadUriStyle::HostSocket,
            ..env_ctx.clone()
        },
        AgentKind::Docker => EnvContext {
            workload_uri: WorkloadUriStyle::Fixed(config.connect.workload_uri.clone()),
            ..env_ctx.clone()
        },
    };
    let mgmt_uri = match config.agent.kind {
        AgentKind::Process => format!("unix://{}", mgmt_path.display()),
        AgentKind::Docker => config.connect.management_uri.clone(),
    };
    let mut env = agent_env(
        &agent_workload_env,
        &agent_identity,
        &agent_socket,
        &config.agent.env,
        &mgmt_uri,
        &config.listen.workload_dir,
        config.moby_runtime.as_ref().map(|m| m.network.as_str()),
    );
    if config.agent.kind == AgentKind::Process {
        crate::env::process_agent_metrics(&mut env);
    }
    match config.agent.kind {
        AgentKind::Process => tasks.spawn(
            "agent watchdog",
            process_watchdog(
                config.agent.name.clone(),
                agent_image,
                env,
                monitor.clone(),
                agent_log.clone(),
                control.clone(),
                tasks.token(),
            ),
        ),
        AgentKind::Docker => {
            let spec = ModuleSpec {
                name: config.agent.name.clone(),
                image: agent_image,
                create_options: config.agent.create_options.clone(),
                env,
                labels: BTreeMap::new(),
                workload_socket: Some(agent_socket.clone()),
                management_socket: Some(mgmt_path.clone()),
            };
            tasks.spawn(
                "agent watchdog",
                runtime_watchdog(runtime.clone(), spec, monitor.clone(), tasks.token()),
            )
        }
    };

    shutdown.await;
    tracing::info!("shutting down");
    renewal.abort();
    // The agent gets SIGTERM and 10 s before SIGKILL; the agent's own
    // modules are stopped by the agent.
    tasks.finish(SHUTDOWN_GRACE).await;
    mgmt.shutdown().await;
    sockets.shutdown_all().await;
    tracing::info!("stopped");
    Ok(())
}

fn split_command(image: &str) -> Option<(String, Vec<String>)> {
    let mut parts = image.split_whitespace().map(str::to_owned);
    let program = parts.next()?;
    Some((program, parts.collect()))
}

/// How long verged waits for its tasks at shutdown: the agent watchdog
/// gives the agent 10 s between SIGTERM and SIGKILL, plus room.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

async fn sleep_or_stop(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        () = stop.cancelled() => true,
    }
}

/// Where verged keeps its own log when no journal keeps its stderr
/// (`verged.log`, `verged.log.1` …).
pub fn verged_log_path(homedir: &std::path::Path) -> PathBuf {
    homedir.join("logs").join("verged.log")
}

/// Where a process agent's output is kept (`output.log`, `output.log.1` …).
pub fn agent_log_dir(homedir: &std::path::Path) -> PathBuf {
    homedir.join("agent").join("logs")
}

/// Size at which the agent's log is rotated.
const AGENT_LOG_MAX_BYTES: u64 = 1024 * 1024;
/// Agent log files kept, the current one included.
const AGENT_LOG_MAX_FILES: usize = 3;

/// How the agent's run ended.
enum RunEnd {
    Exited(std::io::Result<std::process::ExitStatus>),
    Stop,
    Restart,
}

/// Runs the agent as a child process and restarts it with exponential
/// back-off when it exits, or at once when asked to (management API); on
/// stop, SIGTERM then SIGKILL after 10 s. Its stdout and stderr go to `log`.
async fn process_watchdog(
    name: String,
    image: String,
    env: BTreeMap<String, String>,
    monitor: AgentMonitor,
    log: Arc<OutputLog>,
    control: Option<Arc<DaemonControl>>,
    stop: CancellationToken,
) {
    let Some((program, args)) = split_command(&image) else {
        tracing::error!("agent image is empty");
        monitor.start_failed();
        return;
    };
    let mut delay = BACKOFF_START;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let started = Instant::now();
        let mut cmd = tokio::process::Command::new(&program);
        cmd.args(&args).envs(&env);
        // `verge system set-log-level` at run time: it wins over the config
        // and over a RUST_LOG inherited from verged.
        if let Some(level) = control.as_ref().and_then(|c| c.agent_log_level()) {
            cmd.env("RuntimeLogLevel", level).env_remove("RUST_LOG");
        }
        let mut child = match cmd
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(agent = %name, program = %program, error = %e, "cannot start the agent");
                monitor.start_failed();
                if sleep_or_stop(delay, &stop).await {
                    monitor.stopped();
                    return;
                }
                delay = next_backoff(delay, Duration::ZERO);
                continue;
            }
        };
        let output = log.capture(child.stdout.take(), child.stderr.take()).await;
        tracing::info!(agent = %name, pid = ?child.id(), "agent started");
        monitor.started(child.id());
        let end = tokio::select! {
            status = child.wait() => RunEnd::Exited(status),
            () = stop.cancelled() => RunEnd::Stop,
            () = monitor.restart_requested() => RunEnd::Restart,
        };
        let status = match end {
            RunEnd::Exited(status) => {
                output.finish().await;
                status
            }
            RunEnd::Stop => {
                terminate(&mut child, Duration::from_secs(10)).await;
                output.finish().await;
                monitor.stopped();
                tracing::info!(agent = %name, "agent stopped");
                return;
            }
            RunEnd::Restart => {
                tracing::info!(agent = %name, "restarting the agent (requested)");
                terminate(&mut child, Duration::from_secs(10)).await;
                output.finish().await;
                delay = BACKOFF_START;
                continue;
            }
        };
        {
            use std::os::unix::process::ExitStatusExt as _;
            let (code, signal) = match &status {
                Ok(s) => (s.code().map(i64::from), s.signal()),
                // Waiting failed: the exit is real but its code unknown.
                Err(_) => (None, None),
            };
            monitor.exited(code, signal, verge_core::time::Timestamp::now());
        }
        let ran = started.elapsed();
        if ran >= BACKOFF_RESET_AFTER {
            delay = BACKOFF_START;
        }
        tracing::warn!(agent = %name, ?status, ?ran, "agent exited; restarting in {delay:?}");
        if sleep_or_stop(delay, &stop).await {
            monitor.stopped();
            return;
        }
        delay = next_backoff(delay, ran);
    }
}

async fn terminate(child: &mut tokio::process::Child, grace: Duration) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

/// Runs the agent through the module runtime (docker) and restarts it with
/// back-off when it is not running.
async fn runtime_watchdog(
    runtime: Arc<dyn ModuleRuntime>,
    spec: ModuleSpec,
    monitor: AgentMonitor,
    stop: CancellationToken,
) {
    let name = spec.name.clone();
    let _ = runtime.remove(&name).await;
    if let Err(e) = runtime.pull(&spec.image, None).await {
        tracing::warn!(agent = %name, error = %e, "pulling the agent image failed");
    }
    let mut delay = BACKOFF_START;
    let mut created = false;
    let mut ever_started = false;
    let mut last_start = Instant::now();
    loop {
        if !created {
            match runtime.create(&spec).await {
                Ok(()) => created = true,
                Err(e) => tracing::error!(agent = %name, error = %e, "cannot create the agent"),
            }
        }
        if created {
            let state = runtime.get(&name).await;
            let running = matches!(&state, Ok(s) if s.status == ModuleStatus::Running);
            if !running {
                // The container's own record of its exit, when it has one.
                if let Ok(s) = &state
                    && let Some(at) = s.exited_at
                    && ever_started
                {
                    monitor.exited(s.exit_code, None, at);
                }
                let ran = last_start.elapsed();
                delay = next_backoff(delay, ran);
                match runtime.start(&name).await {
                    Ok(()) => {
                        last_start = Instant::now();
                        ever_started = true;
                        monitor.started(None);
                        tracing::info!(agent = %name, "agent started");
                    }
                    Err(e) => {
                        monitor.start_failed();
                        tracing::error!(agent = %name, error = %e, "cannot start the agent");
                    }
                }
            }
        } else {
            monitor.start_failed();
        }
        if sleep_or_stop(delay.max(Duration::from_secs(2)), &stop).await {
            let _ = runtime.stop(&name, Duration::from_secs(10)).await;
            monitor.stopped();
            return;
        }
    }
}

/// The canonical identity id of the agent named in the config.
pub fn agent_module_id(config: &Config) -> String {
    canonical_module_id(&config.agent.name)
}

/// Where the management socket is.
pub fn management_socket(config: &Config) -> PathBuf {
    config.listen.management_socket.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut d = BACKOFF_START;
        let seq: Vec<u64> = (0..8)
            .map(|_| {
                d = next_backoff(d, Duration::from_secs(1));
                d.as_secs()
            })
            .collect();
        assert_eq!(seq, vec![2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(next_backoff(d, Duration::from_secs(61)), BACKOFF_START);
    }

    #[test]
    fn splits_commands() {
        assert_eq!(
            split_command(" /bin/agent  --a b "),
            Some((
                "/bin/agent".to_owned(),
                vec!["--a".to_owned(), "b".to_owned()]
            ))
        );
        assert_eq!(split_command("  "), None);
    }
}
