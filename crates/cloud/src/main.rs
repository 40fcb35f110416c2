//! `verge-cloud`: the self-hosted IoT Hub peer's server.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use verge_cloud::api::{ApiState, ServiceAuth};
use verge_cloud::config::{Config, Overrides};
use verge_cloud::device::{self, CloudBackend};
use verge_cloud::{CloudOptions, CloudState, tls};
use verge_core::SharedAccessKey;

/// Exit code for configuration errors (distinct from runtime failures).
const EXIT_CONFIG: u8 = 78;

#[derive(Parser, Debug)]
#[command(name = "verge-cloud", version, about = "Self-hosted IoT Hub peer")]
struct Args {
    /// TOML configuration file.
    #[arg(long, env = "VERGE_CLOUD_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (overrides `data_dir`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Listen address IP:PORT (overrides `listen`; port 0 picks one).
    #[arg(long)]
    listen: Option<String>,
    /// Device endpoint (MQTT/TLS) address IP:PORT (overrides `mqtt_listen`;
    /// port 0 picks one).
    #[arg(long)]
    mqtt_listen: Option<String>,
    /// Device endpoint over AMQPS, IP:PORT (overrides `amqps_listen`; IoT
    /// Hub's port is 5671; port 0 picks one). AMQP over WebSocket is served
    /// on the HTTPS listener either way.
    #[arg(long)]
    amqps_listen: Option<String>,
    /// Hub host name used as SAS audience (overrides `hostname`).
    #[arg(long)]
    hostname: Option<String>,
}

fn main() -> ExitCode {
    verge_log::init(verge_log::Stream::Stderr);
    let args = Args::parse();
    let cfg = match Config::load(
        args.config.as_deref(),
        Overrides {
            data_dir: args.data_dir,
            listen: args.listen,
            mqtt_listen: args.mqtt_listen,
            amqps_listen: args.amqps_listen,
            hostname: args.hostname,
        },
    ) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("verge-cloud: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("verge-cloud: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verge-cloud: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The policy key: configured, or generated once and kept in the data dir
/// (mode 0600). Returns whether it was just generated.
fn policy_key(cfg: &Config) -> anyhow::Result<(SharedAccessKey, bool)> {
    if let Some(k) = &cfg.policy_key {
        return Ok((k.clone(), false));
    }
    let path = cfg.data_dir.join("service-policy.key");
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let key = SharedAccessKey::from_base64(text.trim())
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        return Ok((key, false));
    }
    let mut raw = Vec::with_capacity(32);
    raw.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    raw.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    let key = SharedAccessKey::from_bytes(raw);
    write_secret(&path, key.to_base64().as_bytes())?;
    Ok((key, true))
}

fn write_secret(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        verge_files::create_private_dir(dir)?;
    }
    verge_files::write_atomic(path, data)?;
    Ok(())
}

/// The provisioning service, unless `[dps] enabled = false`. Prints its ID
/// scope (scripts and tests read it).
async fn start_dps(
    cfg: &Config,
    hostname: &str,
    cloud: &CloudState,
) -> anyhow::Result<Option<Arc<verge_cloud::dps::Dps>>> {
    if cfg.dps.enabled == Some(false) {
        return Ok(None);
    }
    let dir = cfg.data_dir.join("dps");
    let id_scope = match &cfg.dps.id_scope {
        Some(s) => s.clone(),
        None => {
            let d = dir.clone();
            tokio::task::spawn_blocking(move || verge_cloud::dps::load_or_create_id_scope(&d))
                .await
                .context("reading the DPS ID scope")?
                .context("dps id_scope")?
        }
    };
    let iothub_hostname = cfg.dps.iothub_hostname.clone().unwrap_or_else(|| {
        // The assigned hub is what devices dial (on 8883), so no port.
        hostname
            .rsplit_once(':')
            .filter(|(h, p)| !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(hostname, |(h, _)| h)
            .to_owned()
    });
    let opts = verge_cloud::dps::DpsOptions {
        dir,
        id_scope: id_scope.clone(),
        iothub_hostname,
    };
    let dps = verge_cloud::dps::Dps::open(opts, cloud.clone())
        .await
        .context("opening the DPS state")?;
    println!("dps id scope: {id_scope}");
    Ok(Some(dps))
}

/// How long the shutdown waits for the listeners and the sessions' persister.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

async fn run(cfg: Config) -> anyhow::Result<()> {
    // SIGTERM and SIGINT alike; installed first so an early one is not lost.
    let mut signals = verge_shutdown::Signals::install().context("installing signal handlers")?;
    // The journal holds device keys in clear: the data directory and every
    // file the database creates in it are the owner's only.
    verge_files::restrict_umask();
    verge_files::create_private_dir(&cfg.data_dir)
        .with_context(|| format!("data_dir {}", cfg.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listen {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let mqtt_listener = tokio::net::TcpListener::bind(cfg.mqtt_listen)
        .await
        .with_context(|| format!("mqtt_listen {}", cfg.mqtt_listen))?;
    let mqtt_addr = mqtt_listener.local_addr()?;
    let amqps_listener = match cfg.amqps_listen {
        Some(a) => Some(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("amqps_listen {a}"))?,
        ),
        None => None,
    };
    let hostname = cfg.hostname.clone().unwrap_or_else(|| addr.to_string());
    let (key, generated) = policy_key(&cfg)?;
    let auth = ServiceAuth::new(hostname.clone(), cfg.policy_name.clone(), key);
    if generated {
        // Printed once, on first start; afterwards it is in the key file.
        println!("service connection string: {}", auth.connection_string());
    }
    let files = tls::ensure_files(
        &cfg.data_dir,
        &hostname,
        cfg.tls_cert.as_deref(),
        cfg.tls_key.as_deref(),
    )?;
    let tls_cfg = tls::server_config(&files)?;
    let opts = CloudOptions {
        data_dir: cfg.data_dir.clone(),
        hostname: hostname.clone(),
    };
    let cloud = tokio::task::spawn_blocking(move || CloudState::open(opts))
        .await
        .context("opening the state")??;
    let shutdown = verge_shutdown::Shutdown::new();
    {
        let cloud = cloud.clone();
        shutdown.spawn_until_cancelled("C2D sweeper", async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                if let Err(e) = cloud.sweep().await {
                    tracing::warn!(error = %e, "C2D sweep failed");
                }
            }
        });
    }
    let backend =
        CloudBackend::open_with(cloud.clone(), cfg.data_dir.join("mqtt-sessions"), &shutdown)
            .await
            .context("opening the MQTT sessions")?;
    let mqtt_tls = device::mqtt_tls(&tls_cfg);
    let dps = start_dps(&cfg, &hostname, &cloud).await?;
    if let Some(dps) = &dps {
        backend.set_dps(dps.clone());
    }
    tracing::info!(%addr, %mqtt_addr, %hostname, ca = ?files.ca, "verge-cloud serving");
    // The test harness and scripts read these lines for the bound ports.
    println!("listening on mqtts://{mqtt_addr}");
    if let Some(l) = amqps_listener {
        println!("listening on amqps://{}", l.local_addr()?);
        shutdown.spawn(
            "device endpoint (AMQPS)",
            device::serve_amqps(
                l,
                mqtt_tls.clone(),
                backend.clone(),
                shutdown.token().cancelled_owned(),
            ),
        );
    }
    println!("listening on https://{addr}");
    let state = ApiState {
        cloud: cloud.clone(),
        auth: Arc::new(auth),
    };
    // One token stops both listeners.
    // The service API and MQTT over WebSocket share the HTTPS port, as on IoT Hub's 443.
    let mut app = verge_cloud::api::router(state.clone())
        .merge(verge_cloud::ws::router(backend.clone(), shutdown.token()));
    shutdown.spawn(
        "device endpoint",
        device::serve(
            mqtt_listener,
            mqtt_tls,
            backend,
            shutdown.token().cancelled_owned(),
        ),
    );
    // DPS over HTTPS on the same port (as aziot dials it).
    if let Some(dps) = dps {
        app = app.merge(verge_cloud::dps::http::router(
            verge_cloud::dps::http::DpsApi {
                dps,
                auth: state.auth.clone(),
            },
        ));
    }
    shutdown.spawn(
        "service API",
        verge_cloud::api::serve_app(
            listener,
            tls_cfg,
            app,
            shutdown.token().cancelled_owned(),
            verge_cloud::api::listen_limits(),
            verge_listen::http::Timeouts::default(),
        ),
    );
    tokio::select! {
        name = shutdown.task_ended_early() => {
            tracing::error!(task = %name, "a task stopped unexpectedly; shutting down");
        }
        signal = signals.recv() => {
            let signal = signal?;
            tracing::info!(%signal, "shutting down");
        }
    }
    shutdown.finish(SHUTDOWN_GRACE).await;
    tokio::task::spawn_blocking(move || cloud.close())
        .await
        .context("closing the state")?;
    tracing::info!("verge-cloud stopped");
    Ok(())
}
