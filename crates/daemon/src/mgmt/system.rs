//! The management API's read-outs and controls of verged itself:
//! `/systeminfo` (aziot's), and the Verge extensions `/systeminfo/agent`,
//! `/systeminfo/resources`, `/certificates` and `/system/*` (see the
//! parent module's documentation).

use super::*;

async fn read_trimmed(path: &str) -> Option<String> {
    tokio::fs::read_to_string(path)
        .await
        .ok()
        .map(|s| s.trim().to_owned())
}

pub(super) async fn system_info(State(state): State<MgmtState>) -> Result<Response, ApiError> {
    let info = state.runtime.info().await.map_err(runtime_err)?;
    let kernel_version = read_trimmed("/proc/sys/kernel/osrelease")
        .await
        .unwrap_or_default();
    let operating_system = match tokio::fs::read_to_string("/etc/os-release").await {
        Ok(text) => text
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_else(|| "linux".to_owned()),
        Err(_) => "linux".to_owned(),
    };
    let total_memory = match tokio::fs::read_to_string("/proc/meminfo").await {
        Ok(text) => text
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024),
        Err(_) => 0,
    };
    let cpus = std::thread::available_parallelism()
        .map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX));
    Ok(json_response(
        StatusCode::OK,
        &SystemInfo {
            os_type: info.os_type,
            architecture: info.architecture,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            provisioning: ProvisioningInfo {
                kind: "manual".to_owned(),
                dynamic_reprovisioning: false,
                always_reprovision_on_startup: false,
            },
            server_version: format!("{} {}", info.kind, info.version),
            kernel_version,
            operating_system,
            cpus,
            total_memory,
            virtualized: "unknown".to_owned(),
        },
    ))
}

pub(super) async fn agent_info(State(full): State<Full>) -> Result<Response, ApiError> {
    let agent = full
        .extras
        .agent
        .as_ref()
        .ok_or_else(|| ApiError::not_found("this verged does not supervise an agent"))?;
    Ok(json_response(StatusCode::OK, &agent.snapshot()))
}

pub(super) async fn certificates(State(state): State<MgmtState>) -> Result<Response, ApiError> {
    let ca = state.daemon.ca.clone();
    let list = tokio::task::spawn_blocking(move || CertificateList {
        edge_ca: ca.info(),
        issued: ca.issued(),
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(json_response(StatusCode::OK, &list))
}

/// Host CPU counters and every process, read together (blocking).
fn reading() -> (Option<(u64, u64)>, HashMap<u32, resources::ProcStat>) {
    let cpu = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| resources::parse_cpu_line(&t));
    (cpu, resources::read_processes())
}

pub(super) async fn system_resources(State(full): State<Full>) -> Result<Response, ApiError> {
    let state = &full.base;
    let mut notes = Vec::new();
    let mut roots: Vec<(String, u32)> = Vec::new();
    let kind = runtime_kind(state).await;
    if kind == "process" {
        match state.runtime.list().await {
            Ok(mods) => roots.extend(mods.into_iter().filter_map(|m| {
                let pid = m.runtime_id.as_deref()?.parse::<u32>().ok()?;
                (m.status == ModuleStatus::Running).then_some((m.spec.name, pid))
            })),
            Err(e) => notes.push(format!("cannot list the modules: {e}")),
        }
    } else {
        notes.push(format!(
            "per-module use is not measured for the {kind} runtime: only verge-runtime talks \
             to Docker and it has no stats call yet (docker_stats is null); use `docker stats`"
        ));
    }
    if let Some(agent) = &full.extras.agent {
        let a = agent.snapshot();
        if let Some(pid) = a.pid
            && !roots.iter().any(|(n, _)| *n == a.name)
        {
            roots.push((a.name, pid));
        }
    }
    let join = |e: tokio::task::JoinError| ApiError::internal(e.to_string());
    let started = std::time::Instant::now();
    let (cpu0, procs0) = tokio::task::spawn_blocking(reading).await.map_err(join)?;
    tokio::time::sleep(resources::SAMPLE).await;
    let homedir = full.extras.homedir.clone();
    let out = tokio::task::spawn_blocking(move || {
        let (cpu1, procs1) = reading();
        let elapsed = started.elapsed();
        let used_cpu = match (cpu0, cpu1) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                #[allow(clippy::cast_precision_loss)]
                let pct = b1.saturating_sub(b0) as f64 * 100.0 / (t1 - t0) as f64;
                (pct * 10.0).round() / 10.0
            }
            _ => 0.0,
        };
        let (total_ram, available) = std::fs::read_to_string("/proc/meminfo")
            .map(|t| resources::parse_meminfo(&t))
            .unwrap_or((0, 0));
        let host_uptime = resources::host_uptime();
        let process_uptime = procs1
            .get(&std::process::id())
            .map_or(0, |me| host_uptime.saturating_sub(me.start_ticks / 100));
        SystemResources {
            host_uptime,
            process_uptime,
            used_cpu,
            used_ram: total_ram.saturating_sub(available),
            total_ram,
            disks: resources::disks(homedir.as_deref()),
            docker_stats: None,
            modules: resources::module_usage(
                &procs0,
                &procs1,
                &roots,
                elapsed,
                resources::rss_bytes,
            ),
            notes,
        }
    })
    .await
    .map_err(join)?;
    Ok(json_response(StatusCode::OK, &out))
}

fn control(full: &Full) -> Result<&Arc<DaemonControl>, ApiError> {
    full.extras
        .control
        .as_ref()
        .ok_or_else(|| ApiError::not_found("this verged cannot be controlled through its API"))
}

#[derive(serde::Serialize)]
struct MessageJson {
    message: String,
}

pub(super) async fn system_stop(State(full): State<Full>) -> Result<Response, ApiError> {
    let c = control(&full)?;
    tracing::info!("stop requested through the management API");
    c.end();
    Ok(json_response(
        StatusCode::ACCEPTED,
        &MessageJson {
            message: "verged is stopping (with its agent; modules keep running)".to_owned(),
        },
    ))
}

pub(super) async fn system_reprovision(State(full): State<Full>) -> Result<Response, ApiError> {
    let c = control(&full)?.clone();
    let path = c.config_path.clone();
    // Provisioning is re-run from the config file as it is now: refuse
    // before stopping anything if verged could not start with it.
    let config = tokio::task::spawn_blocking(move || crate::config::Config::load(&path))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::bad_request(format!("cannot reprovision: {e}")))?;
    tracing::info!(
        device = %config.provisioning.device_id,
        hub = %config.provisioning.iothub_hostname,
        "reprovisioning requested: restarting with the identity from the config file"
    );
    c.reprovision
        .store(true, std::sync::atomic::Ordering::SeqCst);
    c.end();
    Ok(json_response(
        StatusCode::ACCEPTED,
        &MessageJson {
            message: match &config.dps {
                Some(d) => format!(
                    "reprovisioning: verged registers again with DPS {} (scope {}, registration {}) and restarts with its assignment",
                    d.global_endpoint, d.id_scope, d.registration_id
                ),
                None => format!(
                    "reprovisioning: verged restarts as device {} on {} (manual provisioning, from {})",
                    config.provisioning.device_id,
                    config.provisioning.iothub_hostname,
                    c.config_path.display()
                ),
            },
        },
    ))
}

#[derive(serde::Deserialize)]
struct LogLevelRequest {
    level: String,
}

pub(super) async fn system_log_level(
    State(full): State<Full>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let c = control(&full)?;
    let req: LogLevelRequest = parse_body(&body)?;
    verge_log::runtime_log_level(&req.level).map_err(ApiError::bad_request)?;
    let level = req.level.trim().to_ascii_lowercase();
    match &c.log {
        Some(h) => h
            .set_runtime_log_level(&level)
            .map_err(ApiError::internal)?,
        None => {
            return Err(ApiError::internal(
                "verged's log filter cannot be changed (no handle)",
            ));
        }
    }
    *c.agent_log_level
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(level.clone());
    // The agent reads RuntimeLogLevel at start: a process agent is
    // restarted with it now.
    let agent = match (&full.extras.agent, &full.extras.agent_log) {
        (Some(a), Some(_)) => {
            a.request_restart();
            format!(
                "{} restarts with RuntimeLogLevel={level}",
                a.snapshot().name
            )
        }
        (Some(a), None) => format!(
            "{} (a container) gets RuntimeLogLevel={level} when verged next starts it",
            a.snapshot().name
        ),
        (None, _) => "no agent".to_owned(),
    };
    tracing::warn!(level = %level, "log level changed through the management API");
    Ok(json_response(
        StatusCode::OK,
        &MessageJson {
            message: format!("verged logs at {level}; {agent}"),
        },
    ))
}
