//! The `verge-hub` binary.
//!
//! [`main`] is the whole program; the `verge-hub` executable and the
//! multi-call `verge-edge` (which shares one copy of the code among
//! verged, the agent and the hub) both call it.
use std::path::PathBuf;

use clap::Parser;

/// verge-hub: the edge hub (local IoT Hub proxy).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Path of the TOML configuration file. Run by verged (the module
    /// environment set), it may be left out: the manifest's edgeHub
    /// environment configures the hub, as Azure's edgeHub (`azure_env`).
    #[arg(long, env = "VERGE_HUB_CONFIG")]
    config: Option<PathBuf>,
    /// If the message store cannot be opened, move it aside
    /// (`<dir>.damaged-<time>`, nothing deleted) and start with an empty one.
    /// A store found damaged is moved aside without it.
    #[arg(long, env = "VERGE_HUB_SALVAGE")]
    salvage: bool,
}

/// Runs verge-hub with command-line `args` (the first is the program
/// name); errors are printed and give a failure exit code.
pub fn main<I, T>(args: I) -> std::process::ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = Args::parse_from(args);
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The error chain on one line, never a backtrace (`{:?}` of an
        // anyhow error prints one under RUST_BACKTRACE=1): a bad config is
        // the operator's to fix, not a crash.
        Err(Failure::Config(e)) => {
            eprintln!("verge-hub: invalid configuration: {e:#}");
            std::process::ExitCode::from(CONFIG_ERROR_EXIT)
        }
        Err(Failure::Run(e)) => {
            eprintln!("verge-hub: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Exit code for an invalid configuration (as verged's).
pub const CONFIG_ERROR_EXIT: u8 = 2;

enum Failure {
    Config(anyhow::Error),
    Run(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Run(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Run(e.into())
    }
}

#[tokio::main]
async fn run(args: Args) -> Result<(), Failure> {
    verge_log::init(verge_log::Stream::Stdout);
    // Messages, twins and sessions are the clients' data: whatever the hub
    // (or its store) creates is the owner's only.
    verge_files::restrict_umask();
    // Run by verged as its edgeHub module: identities and certificate from
    // verged for whatever the file leaves out.
    let edge = crate::identity::EdgeEnv::from_env()
        .map_err(|e| Failure::Config(anyhow::anyhow!("the module environment: {e}")))?;
    let azure = crate::azure_env::AzureEnv::from_env();
    let from_file = args.config.is_some();
    let cfg = match (&args.config, edge) {
        (Some(path), edge) => crate::config::Config::load(path)
            .map_err(|e| Failure::Config(anyhow::Error::new(e)))?
            .with_edge_env(edge)
            .map_err(|e| Failure::Config(anyhow::anyhow!("{}: {e}", path.display())))?,
        (None, Some(edge)) => crate::azure_env::config_without_file(edge, &azure)
            .map_err(|e| Failure::Config(anyhow::anyhow!("{e}")))?,
        (None, None) => {
            return Err(Failure::Config(anyhow::anyhow!(
                "--config is required when the hub is not run by verged \
                 (IOTEDGE_WORKLOADURI is not set)"
            )));
        }
    };
    if cfg.edge.is_some() {
        azure.log_report(args.config.as_deref());
    }
    if !from_file {
        crate::azure_env::write_upstream_ca(&cfg)
            .await
            .map_err(Failure::Run)?;
    }
    let cfg = crate::config::Config {
        salvage_store: args.salvage,
        ..cfg
    };
    // `MetricsEnabled`/`Metrics__Listener__*` that do not parse are configuration errors too.
    crate::metrics::settings(&cfg).map_err(|e| Failure::Config(anyhow::anyhow!(e)))?;
    // SIGTERM (docker stop, verged stopping the module; as PID 1 in a
    // container there is no default action) and SIGINT alike run the
    // shutdown. Installed before the start so an early signal is not lost.
    let mut signals = verge_shutdown::Signals::install()?;
    let hub = crate::Hub::start(cfg).await?;
    tokio::select! {
        name = hub.wait() => {
            hub.shutdown().await;
            return Err(anyhow::anyhow!("the hub task {name:?} stopped unexpectedly").into());
        }
        signal = signals.recv() => {
            let signal = signal?;
            tracing::info!(%signal, "shutting down");
            hub.shutdown().await;
        }
    }
    Ok(())
}
