//! `verge`: the command line of a Verge device, shaped like `iotedge`.
//!
//! `list`, `logs`, `restart`, `check`, `support-bundle` and `system` talk to
//! verged's management API over its Unix socket (from the config file, or
//! `-H unix:///path`); `config mp` / `config import` / `config apply` write
//! and install the configuration; `cloud …` drives a verge-cloud over its service API;
//! `quickstart` runs a whole deployment on this machine.

mod bundle;
mod check;
mod cloud;
mod dps;
mod images;
mod import;
mod list;
mod mgmt;
mod quickstart;
mod system;
mod ui;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use verge_core::ConnectionString;

use crate::mgmt::{Mgmt, enc};

/// Where verged reads its configuration by default.
pub const DEFAULT_CONFIG: &str = "/etc/verge/config.toml";

#[derive(Parser)]
#[command(name = "verge", version, about = "Manage a Verge edge device")]
struct Cli {
    /// verged's management socket (unix:///path); default: from the config file.
    #[arg(short = 'H', long, global = true, env = "VERGE_HOST")]
    host: Option<String>,
    /// verged's config file [default: /etc/verge/config.toml].
    #[arg(long, global = true, env = "VERGE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// `--output`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// For people.
    Text,
    /// For programs.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// List the modules.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Show a module's logs.
    Logs {
        /// The module.
        module: String,
        /// Keep streaming new lines.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines, or "all".
        #[arg(long, default_value = "all")]
        tail: String,
        /// Only lines since: RFC 3339, unix seconds, or a duration before now (10m, 1h, 2d).
        #[arg(long)]
        since: Option<String>,
        /// Only lines before: same forms as --since.
        #[arg(long)]
        until: Option<String>,
        /// Prefix each line with its time.
        #[arg(short, long)]
        timestamps: bool,
    },
    /// Restart a module.
    Restart {
        /// The module.
        module: String,
    },
    /// Check the configuration, certificates and connectivity.
    Check {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// List the checks `verge check` runs, with their ids and descriptions.
    CheckList,
    /// Collect logs, module list, checks and the redacted config into a .tar.gz.
    SupportBundle {
        /// The archive ("-" for stdout) [default: support_bundle_<UTC time>.tar.gz].
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Logs since: RFC 3339, unix seconds, or a duration before now.
        #[arg(long, default_value = "1d")]
        since: String,
        /// Logs until: same forms as --since [default: now].
        #[arg(long)]
        until: Option<String>,
    },
    /// verged itself: status, logs, restart, stop, reprovision, set-log-level.
    #[command(subcommand)]
    System(SystemCommand),
    /// Create, check and install verged's configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The cloud peer (verge-cloud): devices, modules, twins, deployments,
    /// messages, methods, C2D.
    Cloud(cloud::CloudArgs),
    /// Run a whole Verge deployment on this machine: a local verge-cloud,
    /// verged, the agent, the hub and two example modules; shows the telemetry.
    Quickstart(quickstart::QuickstartArgs),
    /// Print the version.
    Version,
}

#[derive(Subcommand)]
enum SystemCommand {
    /// Whether verged and the agent run, and what verged reports about the host.
    Status,
    /// verged's logs (the systemd journal; without systemd, the file verged keeps in its homedir).
    Logs {
        /// Keep streaming new lines.
        #[arg(short, long)]
        follow: bool,
        /// More journalctl arguments (after --).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Restart verged (systemctl restart verged).
    Restart,
    /// Stop verged and its agent (systemctl stop verged, or through verged's
    /// management API when it does not run under systemd). Modules keep running.
    Stop,
    /// Re-run provisioning: verged reloads the device identity from its
    /// config file and starts again (manual provisioning; DPS is not supported yet).
    Reprovision,
    /// Change verged's and the agent's log level now, and keep it in the config.
    SetLogLevel {
        /// fatal, error, warning, info, debug or verbose.
        level: String,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Write a configuration for manual provisioning with a connection string.
    Mp {
        /// The device connection string (HostName=…;DeviceId=…;SharedAccessKey=…).
        #[arg(short = 'c', long)]
        connection_string: String,
        /// Where to write the configuration.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
        /// The agent verged starts (executable and arguments; run as a
        /// process). Microsoft's image name, the default, runs Verge's agent
        /// beside verged.
        #[arg(long, default_value = "mcr.microsoft.com/azureiotedge-agent:1.5")]
        agent: String,
    },
    /// Convert an Azure IoT Edge configuration (1.1's /etc/iotedge/config.yaml
    /// or aziot's /etc/aziot/config.toml) into Verge's.
    Import {
        /// The file to convert [default: /etc/aziot/config.toml, else /etc/iotedge/config.yaml].
        #[arg(short, long)]
        input: Option<PathBuf>,
        /// Where to write Verge's configuration.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        out: PathBuf,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Validate a configuration file and install it where verged reads it.
    Apply {
        /// The configuration to apply.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config_file: PathBuf,
        /// Where verged reads its configuration.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        target: PathBuf,
    },
}

/// `verge logs … | head`: a reader that closes the pipe early is the
/// reader's choice, not a crash. Rust ignores SIGPIPE, so `println!` panics
/// on the closed pipe; end quietly instead, with the status a shell shows
/// for a tool stopped by SIGPIPE (128 + 13).
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    let config_path = cli
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let result = match cli.command {
        Command::Version => {
            println!("verge {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Mp {
            connection_string,
            out,
            force,
            agent,
        }) => config_mp(&connection_string, &out, force, &agent).map(|()| ExitCode::SUCCESS),
        Command::Config(ConfigCommand::Import { input, out, force }) => {
            config_import(input.as_deref(), &out, force).map(|()| ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Apply {
            config_file,
            target,
        }) => config_apply(&config_file, &target).map(|()| ExitCode::SUCCESS),
        Command::System(SystemCommand::Logs { follow, args }) => {
            system::logs(follow, &args, &config_path)
        }
        Command::Quickstart(args) => quickstart::run(args),
        Command::CheckList => {
            print!("{}", check::render_list(ui::colour_enabled()));
            Ok(ExitCode::SUCCESS)
        }
        Command::System(SystemCommand::Restart) => system::restart(),
        command => block_on(async {
            let host = cli.host.as_deref();
            let mgmt = || Mgmt::resolve(host, cli.config.as_deref());
            match command {
                Command::List { output } => {
                    list::run(&mgmt()?, output == Output::Json).await?;
                    Ok(ExitCode::SUCCESS)
                }
                Command::Logs {
                    module,
                    follow,
                    tail,
                    since,
                    until,
                    timestamps,
                } => {
                    let q = logs_query(
                        follow,
                        &tail,
                        since.as_deref(),
                        until.as_deref(),
                        timestamps,
                    )?;
                    let mut out = std::io::stdout().lock();
                    mgmt()?
                        .stream(&format!("/modules/{}/logs?{q}", enc(&module)), &mut out)
                        .await?;
                    Ok(ExitCode::SUCCESS)
                }
                Command::Restart { module } => {
                    mgmt()?
                        .call("POST", &format!("/modules/{}/restart", enc(&module)))
                        .await?;
                    println!("{module}");
                    Ok(ExitCode::SUCCESS)
                }
                Command::Check { output } => {
                    let report = check::run_checks(&check::Inputs {
                        config_path: &config_path,
                        host,
                    })
                    .await;
                    if output == Output::Json {
                        println!("{}", serde_json::to_string_pretty(&report)?);
                    } else {
                        print!("{}", check::render(&report, ui::colour_enabled()));
                    }
                    Ok(if report.summary.errors > 0 {
                        ExitCode::from(1)
                    } else {
                        ExitCode::SUCCESS
                    })
                }
                Command::SupportBundle {
                    output,
                    since,
                    until,
                } => {
                    support_bundle(
                        mgmt()?,
                        &config_path,
                        host,
                        output,
                        &since,
                        until.as_deref(),
                    )
                    .await?;
                    Ok(ExitCode::SUCCESS)
                }
                Command::System(SystemCommand::Status) => {
                    system::status(host, cli.config.as_deref(), &config_path).await
                }
                Command::System(SystemCommand::Stop) => {
                    system::stop(host, cli.config.as_deref()).await
                }
                Command::System(SystemCommand::Reprovision) => {
                    system::reprovision(host, cli.config.as_deref(), &config_path).await
                }
                Command::System(SystemCommand::SetLogLevel { level }) => {
                    system::set_log_level(&level, host, cli.config.as_deref(), &config_path).await
                }
                Command::Cloud(args) => {
                    cloud::run(args).await?;
                    Ok(ExitCode::SUCCESS)
                }
                // Handled above, without a runtime.
                Command::Version
                | Command::CheckList
                | Command::Quickstart(_)
                | Command::Config(_)
                | Command::System(SystemCommand::Logs { .. } | SystemCommand::Restart) => {
                    Ok(ExitCode::SUCCESS)
                }
            }
        }),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn block_on(f: impl Future<Output = anyhow::Result<ExitCode>>) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f)
}

/// The management API's logs query from the command's options.
fn logs_query(
    follow: bool,
    tail: &str,
    since: Option<&str>,
    until: Option<&str>,
    timestamps: bool,
) -> anyhow::Result<String> {
    let tail = tail.trim();
    if tail != "all" && tail.parse::<usize>().is_err() {
        bail!("--tail {tail:?}: give a number of lines or \"all\"");
    }
    let now = SystemTime::now();
    let mut q = format!("follow={follow}&tail={tail}&timestamps={timestamps}");
    if let Some(s) = since {
        let t = verge_diag::times::parse_point(s, now).context("--since")?;
        q.push_str(&format!("&since={}", t.to_iso8601()));
    }
    if let Some(u) = until {
        let t = verge_diag::times::parse_point(u, now).context("--until")?;
        q.push_str(&format!("&until={}", t.to_iso8601()));
    }
    Ok(q)
}

async fn support_bundle(
    mgmt: Mgmt,
    config_path: &Path,
    host: Option<&str>,
    output: Option<PathBuf>,
    since: &str,
    until: Option<&str>,
) -> anyhow::Result<()> {
    let now = SystemTime::now();
    let since = verge_diag::times::parse_point(since, now).context("--since")?;
    let until = until
        .map(|u| verge_diag::times::parse_point(u, now).context("--until"))
        .transpose()?;
    if let Some(u) = until
        && u <= since
    {
        bail!("--until must be after --since");
    }
    let files = bundle::collect(&bundle::Options {
        config_path,
        host,
        mgmt,
        since,
        until,
    })
    .await;
    let path = output.unwrap_or_else(|| PathBuf::from(bundle::default_name()));
    if path == Path::new("-") {
        bundle::write_tar_gz(&files, std::io::stdout().lock())?;
        return Ok(());
    }
    // Logs and device details are for support staff only: mode 0600.
    let file = {
        use std::os::unix::fs::OpenOptionsExt as _;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?
    };
    bundle::write_tar_gz(&files, std::io::BufWriter::new(file))
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "Created support bundle {} ({} files).",
        path.display(),
        files.len()
    );
    Ok(())
}

/// This machine's hostname (as `iotedge config mp` writes it): what
/// modules and leaf devices dial, and the edge hub certificate's name.
fn machine_hostname() -> anyhow::Result<String> {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    };
    read("/proc/sys/kernel/hostname")
        .or_else(|| read("/etc/hostname"))
        .filter(|h| {
            h.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "cannot read this machine's hostname (/proc/sys/kernel/hostname); \
                 set `hostname` in the written config yourself"
            )
        })
}

/// The smallest configuration verged accepts for manual provisioning.
fn mp_template(cs: &ConnectionString, agent: &str, hostname: &str) -> String {
    // A connection string's GatewayHostName is the gateway this device
    // connects through: a nested edge's parent.
    let parent = match &cs.gateway_host_name {
        Some(g) => format!("parent_hostname = \"{g}\"\n"),
        None => String::new(),
    };
    // A connection string holds no quotes or backslashes (ids and base64 keys
    // cannot), so it is written as a TOML basic string as is; the agent path is
    // a TOML literal string, so backslashes in it need no escaping.
    format!(
        "# Written by `verge config mp`. Apply with `verge config apply`.\n\
         hostname = \"{hostname}\"\n{parent}\n\
         [provisioning]\n\
         source = \"manual\"\n\
         connection_string = \"{cs}\"\n\n\
         [agent]\n\
         name = \"edgeAgent\"\n\
         type = \"process\"\n\n\
         [agent.config]\n\
         image = '{agent}'\n\n\
         [agent.env]\n\
         # The agent keeps its state in {{storageFolder}}/edgeAgent.\n\
         storageFolder = \"/var/lib/verge\"\n"
    )
}

fn config_mp(connection_string: &str, out: &Path, force: bool, agent: &str) -> anyhow::Result<()> {
    let cs = ConnectionString::parse(connection_string.trim())
        .context("the connection string is not valid")?;
    if cs.module_id.is_some() {
        bail!("that is a module connection string; use the edge device's connection string");
    }
    if cs.shared_access_key.is_none() {
        bail!(
            "the connection string has no SharedAccessKey; X.509 provisioning is not supported yet"
        );
    }
    if out.exists() && !force {
        bail!("{} exists; pass --force to replace it", out.display());
    }
    if agent.contains('\'') || agent.contains('\n') {
        bail!("the agent path must not contain quotes or newlines");
    }
    let text = mp_template(&cs, agent, &machine_hostname()?);
    // Never write a file verged would refuse.
    verge_daemon::config::Config::parse(&text, out).map_err(|e| anyhow::anyhow!("{e}"))?;
    write_atomically(out, &text)?;
    println!(
        "Wrote {}. Apply it with: verge config apply -c {}",
        out.display(),
        out.display()
    );
    Ok(())
}

fn config_import(input: Option<&Path>, out: &Path, force: bool) -> anyhow::Result<()> {
    let input = match input {
        Some(p) => p.to_path_buf(),
        None => ["/etc/aziot/config.toml", "/etc/iotedge/config.yaml"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "neither /etc/aziot/config.toml nor /etc/iotedge/config.yaml exists; \
                     name the file with --input"
                )
            })?,
    };
    if out.exists() && !force {
        bail!("{} exists; pass --force to replace it", out.display());
    }
    let text =
        std::fs::read_to_string(&input).with_context(|| format!("reading {}", input.display()))?;
    let hostname = machine_hostname().unwrap_or_else(|_| "localhost".to_owned());
    let imported = import::convert(&text, &input, &hostname)?;
    // Never write a file verged would refuse.
    checked(verge_daemon::config::Config::parse(&imported.text, out))
        .map_err(|e| anyhow::anyhow!("the converted configuration is not valid: {e}"))?;
    write_atomically(out, &imported.text)?;
    for n in &imported.notes {
        eprintln!("note: {n}");
    }
    println!(
        "Wrote {} from {}. Check it, then apply it with: verge config apply -c {}",
        out.display(),
        input.display(),
        out.display()
    );
    Ok(())
}

/// A configuration as verged takes it: one provisioned through DPS that has
/// not registered yet is valid (`None`: verged registers at its start).
fn checked(
    r: Result<verge_daemon::config::Config, verge_daemon::config::ConfigError>,
) -> anyhow::Result<Option<verge_daemon::config::Config>> {
    match r {
        Ok(c) => Ok(Some(c)),
        Err(e) if e.message == verge_daemon::config::NOT_PROVISIONED => Ok(None),
        Err(e) => Err(anyhow::anyhow!("{e}")),
    }
}

fn config_apply(config_file: &Path, target: &Path) -> anyhow::Result<()> {
    let config = checked(verge_daemon::config::Config::load(config_file))?;
    let same = match (
        std::fs::canonicalize(config_file),
        std::fs::canonicalize(target),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same {
        let text = std::fs::read_to_string(config_file)
            .with_context(|| format!("reading {}", config_file.display()))?;
        write_atomically(target, &text)?;
    }
    match config {
        Some(c) => println!(
            "Configuration for device {} on {} is valid and installed at {}.",
            c.provisioning.device_id,
            c.provisioning.iothub_hostname,
            target.display()
        ),
        None => println!(
            "Configuration is valid and installed at {}; the device registers through DPS when verged starts.",
            target.display()
        ),
    }
    // Installed from the package: verged is a systemd service.
    if Path::new("/lib/systemd/system/verged.service").exists()
        && target == Path::new(DEFAULT_CONFIG)
    {
        println!("Restart verged to use it: sudo systemctl restart verged");
    } else {
        println!(
            "Restart verged to use it (verged --config {}).",
            target.display()
        );
    }
    Ok(())
}

/// Writes via a temporary file, fsync and rename, so a reader never sees half
/// a config. The file holds the device key: mode 0600.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    verge_files::write_atomic(path, text.as_bytes())
        .with_context(|| format!("installing {}", path.display()))?;
    Ok(())
}
