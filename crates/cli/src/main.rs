//! `verge`: the command line of a Verge device, shaped like `iotedge`.
//!
//! Today it manages the configuration (`config mp`, `config apply`) and
//! prints its version; the operational commands (`list`, `logs`, `restart`,
//! `check`, …) come with the [Quickstart] issue.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use verge_core::ConnectionString;

/// Where verged reads its configuration by default.
const DEFAULT_CONFIG: &str = "/etc/verge/config.toml";

#[derive(Parser)]
#[command(name = "verge", version, about = "Manage a Verge edge device")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, check and install verged's configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Print the version.
    Version,
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
        /// The agent verged starts (executable and arguments; run as a process).
        #[arg(long, default_value = "/usr/local/bin/verge-agent")]
        agent: String,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Version => {
            println!("verge {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Config(ConfigCommand::Mp {
            connection_string,
            out,
            force,
            agent,
        }) => config_mp(&connection_string, &out, force, &agent),
        Command::Config(ConfigCommand::Apply {
            config_file,
            target,
        }) => config_apply(&config_file, &target),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The smallest configuration verged accepts for manual provisioning.
fn mp_template(cs: &ConnectionString, agent: &str) -> String {
    let hostname = cs
        .gateway_host_name
        .clone()
        .unwrap_or_else(|| "localhost".to_owned());
    // A connection string holds no quotes or backslashes (ids and base64 keys
    // cannot), so it is written as a TOML basic string as is; the agent path is
    // a TOML literal string, so backslashes in it need no escaping.
    format!(
        "# Written by `verge config mp`. Apply with `verge config apply`.\n\
         hostname = \"{hostname}\"\n\n\
         [provisioning]\n\
         source = \"manual\"\n\
         connection_string = \"{cs}\"\n\n\
         [agent]\n\
         name = \"edgeAgent\"\n\
         type = \"process\"\n\n\
         [agent.config]\n\
         image = '{agent}'\n"
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
    let text = mp_template(&cs, agent);
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

fn config_apply(config_file: &Path, target: &Path) -> anyhow::Result<()> {
    let config =
        verge_daemon::config::Config::load(config_file).map_err(|e| anyhow::anyhow!("{e}"))?;
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
    println!(
        "Configuration for device {} on {} is valid and installed at {}.",
        config.provisioning.device_id,
        config.provisioning.iothub_hostname,
        target.display()
    );
    println!(
        "Restart verged to use it (verged --config {}).",
        target.display()
    );
    Ok(())
}

/// Writes via a temporary file and rename, so a reader never sees half a config.
/// The file holds the device key: mode 0600.
fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("config")
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("installing {}", path.display()))?;
    Ok(())
}
