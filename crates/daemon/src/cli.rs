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
async fn shutdown_signal(mut signals: Option<verge_shutdown::Signals>) {
    match &mut signals {
        Some(s) => match s.recv().await {
            Ok(signal) => tracing::info!(%signal, "stop requested"),
            Err(e) => tracing::error!(error = %e, "signal handlers failed; stopping"),
        },
        None => std::future::pending().await,
    }
}

/// Runs verged with command-line `args` (the first is the program name).
pub fn main<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = Args::parse_from(args);
    verge_log::init(verge_log::Stream::Stderr);
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("verged: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("configuration OK");
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("verged: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        // Installed first, so a stop request during start-up is not lost.
        let signals = match verge_shutdown::Signals::install() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot install signal handlers; stop with SIGKILL");
                None
            }
        };
        let runtime = runtime_for(&config).await?;
        crate::daemon::run(config, runtime, shutdown_signal(signals)).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("verged: {e:#}");
            ExitCode::FAILURE
        }
    }
}
