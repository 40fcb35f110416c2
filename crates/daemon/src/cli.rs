//! `verged --config <file>`: Verge's security daemon.
//!
//! [`main`] is the whole program; the `verged` executable and the
//! multi-call `verge-edge` (which shares one copy of the code among
//! verged, the agent and the hub) both call it.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use crate::config::{Config, MobyRuntimeConfig};
use clap::Parser;
use verge_runtime::ModuleRuntime;
use verge_runtime::docker::{DockerConfig, DockerRuntime};
use verge_runtime::process::{ProcessConfig, ProcessRuntime};

/// Verge security daemon.
#[derive(Debug, Parser)]
#[command(
    name = "verged",
    version,
    about = "Verge security daemon: keys, identities, edge CA, workload and management APIs"
)]
struct Args {
    /// Config file.
    #[arg(
        short,
        long,
        env = "VERGED_CONFIG",
        default_value = "/etc/verge/config.toml"
    )]
    config: PathBuf,
    /// Only check the config and exit.
    #[arg(long)]
    check: bool,
}

fn docker_socket_exists(m: &MobyRuntimeConfig) -> bool {
    m.uri
        .strip_prefix("unix://")
        .is_some_and(|p| std::path::Path::new(p).exists())
}

async fn runtime_for(config: &Config) -> anyhow::Result<Arc<dyn ModuleRuntime>> {
    if let Some(m) = &config.moby_runtime {
        if docker_socket_exists(m) || !m.uri.starts_with("unix://") {
            tracing::info!(uri = %m.uri, "using the docker runtime");
            return Ok(Arc::new(DockerRuntime::new(DockerConfig {
                uri: m.uri.clone(),
                network: m.network.clone(),
                ..DockerConfig::default()
            })));
        }
        tracing::warn!(uri = %m.uri, "docker socket not found; using the process runtime");
    }
    let rt = ProcessRuntime::open(ProcessConfig::new(config.homedir.join("modules"))).await?;
    Ok(Arc::new(rt))
}

/// SIGTERM or SIGINT, the shared way (logged); with no handlers, never.
async fn shutdown_signal(signals: Option<&mut verge_shutdown::Signals>) {
    match signals {
        Some(s) => match s.recv().await {
            Ok(signal) => tracing::info!(%signal, "stop requested"),
            Err(e) => tracing::error!(error = %e, "signal handlers failed; stopping"),
        },
        None => std::future::pending().await,
    }
}

/// Whether stderr is connected to the systemd journal: `JOURNAL_STREAM`
/// names its device and inode (systemd.exec(5)), and they must be stderr's
/// own (a child of a journald service inherits the variable, not the stream).
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // `st_dev`/`st_ino` are u64 here but narrower on some targets.
    #[allow(clippy::unnecessary_cast)]
    match nix::sys::stat::fstat(std::io::stderr()) {
        Ok(st) => st.st_dev as u64 == dev && st.st_ino as u64 == ino,
        Err(_) => false,
    }
}

/// Runs verged with command-line `args` (the first is the program name).
pub fn main<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = Args::parse_from(args);
    let boot = match Config::dps_boot(&args.config) {
        Ok(b) => b,
        Err(e) => {
            verge_log::init(verge_log::Stream::Stderr);
            eprintln!("verged: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("verged: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A DPS device registers before its identity (and so the rest of the
    // configuration) can be resolved; later starts use the cached assignment.
    let mut early_log = None;
    if let Some(b) = &boot
        && !args.check
        && !matches!(crate::dps::read_cache(&b.homedir, &b.settings), Ok(Some(_)))
    {
        let log = init_log(&b.homedir);
        let provisioned = rt.block_on(async {
            let mut signals = verge_shutdown::Signals::install().ok();
            crate::dps::ensure(b, false, shutdown_signal(signals.as_mut())).await
        });
        match provisioned {
            Ok(true) => {}
            Ok(false) => return ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("verged: DPS provisioning: {e:#}");
                return ExitCode::FAILURE;
            }
        }
        early_log = Some(log);
    }
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            verge_log::init(verge_log::Stream::Stderr);
            eprintln!("verged: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    let registered_now = early_log.is_some();
    let log = early_log.unwrap_or_else(|| init_log(&config.homedir));
    if config.dps.is_some() && !registered_now {
        // No network needed: an offline start works.
        tracing::info!(
            hub = %config.provisioning.iothub_hostname,
            device = %config.provisioning.device_id,
            "DPS assignment from the cache"
        );
    }
    apply_config_log_level(&config, log.as_ref());
    let control = crate::mgmt::DaemonControl::new(args.config.clone(), log);
    let result: anyhow::Result<()> = rt.block_on(async {
        // Installed first, so a stop request during start-up is not lost.
        let mut signals = match verge_shutdown::Signals::install() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers; stop with SIGKILL");
                None
            }
        };
        // One runtime for every run: its modules keep running while verged
        // reprovisions (a new process runtime would kill them as orphans).
        let runtime = runtime_for(&config).await?;
        let mut config = config;
        loop {
            let c = control.clone();
            let sig = signals.as_mut();
            let shutdown = async move {
                tokio::select! {
                    () = shutdown_signal(sig) => {}
                    () = c.wait() => {}
                }
            };
            crate::daemon::run_with(config, runtime.clone(), shutdown, Some(control.clone()))
                .await?;
            if !control.take_reprovision() {
                return Ok(());
            }
            // `verge system reprovision`: the identity from the file as it is
            // now; a DPS device registers again.
            if let Some(b) = Config::dps_boot(&args.config)
                .map_err(|e| anyhow::anyhow!("reprovisioning: {e}"))?
                && !crate::dps::ensure(&b, true, shutdown_signal(signals.as_mut())).await?
            {
                return Ok(());
            }
            config =
                Config::load(&args.config).map_err(|e| anyhow::anyhow!("reprovisioning: {e}"))?;
            tracing::info!(
                device = %config.provisioning.device_id,
                hub = %config.provisioning.iothub_hostname,
                "reprovisioned from the config file; starting again"
            );
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verged: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// verged's log: stderr, and a copy under `homedir` unless stderr is the
/// journal.
fn init_log(homedir: &std::path::Path) -> Option<verge_log::Handle> {
    // Without a journal behind stderr, verged's log would be wherever its
    // stderr went: keep a copy where `verge system logs` and the support
    // bundle find it.
    let tee = if stderr_is_journal() {
        None
    } else {
        let path = crate::daemon::verged_log_path(homedir);
        match verge_log::LogFile::open(path.clone(), 4 * 1024 * 1024, 3) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("verged: cannot write its log to {}: {e}", path.display());
                None
            }
        }
    };
    verge_log::init_with(verge_log::Stream::Stderr, tee)
}

/// The config's `log_level` (`verge system set-log-level` keeps it there),
/// unless the environment sets one (`RUST_LOG`, `RuntimeLogLevel`).
fn apply_config_log_level(config: &Config, log: Option<&verge_log::Handle>) {
    let from_env = ["RUST_LOG", "RuntimeLogLevel"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()));
    if let (Some(level), Some(h), false) = (&config.log_level, log, from_env)
        && let Err(e) = h.set_runtime_log_level(level)
    {
        tracing::warn!("log_level: {e}");
    }
}
