//! `verge quickstart`: a whole Verge deployment on this machine, no cloud
//! account needed.
//!
//! It expects the other binaries next to its own executable (`--bin-dir`
//! points elsewhere); run through `cargo run` it builds them there first
//! (`cargo run --profile quickstart -p verge-cli -- quickstart` is the whole
//! quickstart). Then, in a fresh working directory (`--dir`, default
//! `./verge-quickstart`):
//!
//! 1. starts a local `verge-cloud` on loopback ports (its generated CA),
//! 2. registers an edge device in it,
//! 3. writes verged's config (manual provisioning with that device's
//!    connection string, process module runtime, auto-generated edge CA, the
//!    `verge-agent` binary as agent) and starts `verged`; verged, the agent
//!    and the hub all run from the multi-call `verge-edge` executable,
//!    through links named after them in `<dir>/bin`,
//! 4. deploys edgeHub (`verge-hub` as a process module), the simulated
//!    temperature sensor and the filter module with the routes
//!    sensor → filter → `$upstream`,
//! 5. follows the cloud's D2C log and prints each message as it arrives.
//!
//! Ctrl-C (SIGINT) or SIGTERM stops everything: verged (which stops the
//! agent), then the modules, then verge-cloud. The quickstart makes itself a
//! child subreaper, so modules that outlive verged (the process backend keeps
//! them running, as IoT Edge does across daemon restarts) become its children
//! and are stopped and reaped too; nothing is left running.
//!
//! `--docker` runs edgeHub, the sensor and the filter as Docker containers:
//! the quickstart builds their images from the same binaries (module
//! `images`: nothing is pulled), configures verged's `[moby_runtime]` (the
//! agent stays a process) and deploys them with `imagePullPolicy: never`,
//! host networking (the hub keeps 127.0.0.1:8883 and reaches verge-cloud on
//! loopback, exactly as in process mode), this user's uid/gid, and the
//! working directory mounted at its own path for the hub's config and store.
//! On exit it removes the containers it created (and, at start, ones a
//! killed earlier run in the same directory left).
//!
//! `--until-messages N --timeout 120s` is the bounded mode for CI: exit 0 once
//! N messages from the filter (or the sensor) reached the cloud, 1 with a
//! diagnosis otherwise. `--measure` reports the runtime's cold start and
//! idle memory (see BENCHMARKS.md, "Runtime footprint").
//!
//! # What the quickstart does that the runtime does not (yet)
//!
//! * **Module identities in the cloud** are registered by verged itself
//!   (`[provisioning] https_port` and the cloud's CA as `trust_bundle_cert`).
//! * **The hub** is run by verged as edgeHub: its server certificate and
//!   module identities come from verged's workload API, its routes from its
//!   `$edgeHub` twin in the cloud; its config only names its listeners and
//!   the cloud.
//!
//! The agent takes its deployment from its `$edgeAgent` twin in the cloud
//! (`VERGE_AGENT_UPSTREAM_PORT`/`_CA` in verged's `[agent.env]`) and reports
//! there, so `verge cloud deployment status` shows it.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};
use verge_core::SharedAccessKey;

use crate::cloud::{CloudClient, format_message, stream_lines};
use crate::images;
use crate::mgmt::Mgmt;

/// The binaries the quickstart runs, by file name.
const VERGE_CLOUD: &str = "verge-cloud";
const SENSOR: &str = "verge-simulated-temperature-sensor";
const FILTER: &str = "verge-filter-module";
/// The multi-call executable of the runtime's daemons, run through links
/// named after them (`<dir>/bin/verged`, …), so the three processes share
/// one copy of the code in memory.
const EDGE: &str = "verge-edge";
const VERGED: &str = "verged";
const AGENT: &str = "verge-agent";
const HUB: &str = "verge-hub";
/// Packages that build them (for the error message).
const PACKAGES: &str = "-p verge-cloud -p verge-edge \
                        -p verge-simulated-temperature-sensor -p verge-filter-module";

/// Module names in the deployment.
const SENSOR_MODULE: &str = "SimulatedTemperatureSensor";
const FILTER_MODULE: &str = "filter";
/// With `--docker`, the containers of the deployment (named after the modules).
const CONTAINERS: [&str; 3] = ["edgeHub", SENSOR_MODULE, FILTER_MODULE];
/// With `--docker`, the images built from the binaries here.
const HUB_IMAGE: &str = "verge-quickstart/edgehub";
const SENSOR_IMAGE: &str = "verge-quickstart/simulated-temperature-sensor";
const FILTER_IMAGE: &str = "verge-quickstart/filter";
/// The hub's MQTT port: modules dial 8883 on the gateway host, as the Azure
/// SDKs do (they cannot dial another port).
const HUB_MQTT_PORT: u16 = 8883;
/// Written into the working directory: only a directory holding it is
/// ever wiped by a later run.
const MARKER: &str = ".verge-quickstart";

/// `verge quickstart`.
#[derive(Args)]
pub struct QuickstartArgs {
    /// Working directory (wiped and recreated if a previous quickstart made it).
    #[arg(long, default_value = "verge-quickstart")]
    dir: PathBuf,
    /// Directory of verge-cloud, verged, verge-agent, verge-hub and the example
    /// modules [default: the directory of this `verge` executable].
    #[arg(long, env = "VERGE_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// The edge device's id in the local cloud.
    #[arg(long, default_value = "quickstart-edge")]
    device_id: String,
    /// Bounded mode: exit 0 once this many messages from the filter (or the
    /// sensor) reached the cloud; exit 1 with a diagnosis at --timeout.
    #[arg(long)]
    until_messages: Option<u64>,
    /// With --until-messages or --measure: how long to wait (e.g. 120s, 3m).
    #[arg(long, default_value = "120s")]
    timeout: String,
    /// Run the modules as Docker containers (needs a reachable Docker engine).
    #[arg(long)]
    docker: bool,
    /// Measure the runtime's cold start (verged start → first message in the
    /// cloud) and idle memory (verged + agent + hub), print them and exit.
    #[arg(long)]
    measure: bool,
    /// Remove what `--docker` leaves for the next run (the module images
    /// built here and the Docker network `azure-iot-edge` verged made), then
    /// exit.
    #[arg(long, conflicts_with_all = ["docker", "measure", "until_messages"])]
    clean: bool,
}

/// Parses `120s`, `3m`, `500ms` or a number of seconds.
fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow!("{s:?}: give a duration like 120s, 3m or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => bail!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)"),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| anyhow!("{s:?}: {e}"))
}

/// Progress lines on stderr (the telemetry goes to stdout).
struct Progress {
    step: usize,
    total: usize,
    started: Instant,
}

impl Progress {
    fn step(&mut self, what: &str) {
        self.step += 1;
        eprintln!(
            "[{}/{}] {what} ({:.1} s)",
            self.step,
            self.total,
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// Runs the quickstart; returns the process exit code.
pub fn run(args: QuickstartArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        if args.clean {
            return clean().await;
        }
        // From the start: the children get process groups of their own (so
        // the terminal's Ctrl-C reaches only this process), and without a
        // handler an early Ctrl-C would end this process and leave them.
        let stop = stop_requests()?;
        let mut qs = Quickstart::new(args, stop)?;
        let result = qs.run().await;
        let stopped = qs.shutdown().await;
        match (result, stopped) {
            (Ok(code), Ok(())) => Ok(code),
            (Err(e), Ok(())) => Err(e),
            (Ok(_), Err(e)) => Err(e.context("stopping the quickstart")),
            (Err(e), Err(e2)) => Err(e.context(format!("also, stopping failed: {e2:#}"))),
        }
    })
}

/// `--clean`.
async fn clean() -> anyhow::Result<ExitCode> {
    let c = images::clean(&[HUB_IMAGE, SENSOR_IMAGE, FILTER_IMAGE]).await?;
    if c.images.is_empty() {
        eprintln!("No quickstart images to remove.");
    } else {
        eprintln!(
            "Removed {} ({:.0} MB).",
            c.images.join(", "),
            c.bytes as f64 / 1e6
        );
    }
    if c.network {
        eprintln!("Removed the Docker network azure-iot-edge.");
    }
    Ok(ExitCode::SUCCESS)
}

/// A receiver that turns `true` on the first SIGINT or SIGTERM.
fn stop_requests() -> anyhow::Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing a SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing a SIGINT handler")?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = tx.send(true);
    });
    Ok(rx)
}

/// Resolves once a stop was requested (never if the sender is gone first).
async fn stop_requested(stop: &mut tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Paths of the working directory.
struct Layout {
    dir: PathBuf,
    /// Links to `verge-edge` named after the daemons.
    bin: PathBuf,
    logs: PathBuf,
    cloud_data: PathBuf,
    edge: PathBuf,
    homedir: PathBuf,
    config: PathBuf,
    agent_storage: PathBuf,
    manifest: PathBuf,
    hub_dir: PathBuf,
}

impl Layout {
    fn new(dir: PathBuf) -> Self {
        let edge = dir.join("edge");
        Self {
            logs: dir.join("logs"),
            bin: dir.join("bin"),
            cloud_data: dir.join("cloud"),
            homedir: edge.join("home"),
            config: edge.join("config.toml"),
            agent_storage: edge.join("agent"),
            manifest: edge.join("deployment.json"),
            hub_dir: edge.join("hub"),
            edge,
            dir,
        }
    }

    fn mgmt_socket(&self) -> PathBuf {
        self.homedir.join("mgmt.sock")
    }

    fn workload_dir(&self) -> PathBuf {
        self.homedir.join("mnt")
    }
}

/// What the cloud start gave us.
struct CloudInfo {
    client: CloudClient,
    mqtt_port: u16,
    https_port: u16,
    ca: PathBuf,
}

struct Quickstart {
    args: QuickstartArgs,
    bin: PathBuf,
    lay: Layout,
    progress: Progress,
    cloud: Option<Child>,
    verged: Option<Child>,
    verged_started: Option<Instant>,
    /// The engine, with `--docker`.
    docker: Option<verge_runtime::DockerRuntime>,
    /// Turns `true` on SIGINT or SIGTERM.
    stop: tokio::sync::watch::Receiver<bool>,
    /// Whether this run made the working directory (and so started or
    /// may have started something): before that, there is nothing to stop
    /// and the directory is not this run's.
    started: bool,
}

fn check_no_whitespace(p: &Path, what: &str) -> anyhow::Result<()> {
    if p.to_string_lossy().chars().any(char::is_whitespace) || p.to_string_lossy().contains('\'') {
        bail!(
            "{what} {} contains blanks or quotes; the process runtime splits command lines at \
             blanks. Use a path without them (--dir / --bin-dir).",
            p.display()
        );
    }
    Ok(())
}

fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Children of this process (pid, command name), from /proc.
fn my_children() -> Vec<(i32, String)> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Field 2 (comm) may hold blanks and parentheses: split after the last ')'.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = stat
            .get(stat.find('(').map_or(0, |i| i + 1)..close)
            .unwrap_or_default()
            .to_owned();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // fields[0] = state, fields[1] = ppid.
        if fields.get(1) == Some(&me.as_str()) && fields.first() != Some(&"Z") {
            out.push((pid, comm));
        }
    }
    out
}

/// Reaps exited children that are not tokio's (orphans adopted as subreaper).
fn reap(pids: &[i32]) {
    use nix::sys::wait::{WaitPidFlag, waitpid};
    for p in pids {
        let _ = waitpid(Pid::from_raw(*p), Some(WaitPidFlag::WNOHANG));
    }
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next().map(|st| st != "Z"))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

fn pid_of(child: &Child) -> Option<i32> {
    child.id().and_then(|p| i32::try_from(p).ok())
}

/// Stops the modules verged left running, now this subreaper's children
/// (all but `cloud`): SIGTERM to each one's process group, SIGKILL after 10 s.
async fn stop_orphans(cloud: Option<i32>) {
    let orphans: Vec<i32> = my_children()
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| Some(*p) != cloud)
        .collect();
    if orphans.is_empty() {
        return;
    }
    eprintln!("Stopping {} module processes …", orphans.len());
    for p in &orphans {
        // Each module leads its own process group.
        if killpg(Pid::from_raw(*p), Signal::SIGTERM).is_err() {
            let _ = kill(Pid::from_raw(*p), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        reap(&orphans);
        let left: Vec<i32> = orphans.iter().copied().filter(|p| alive(*p)).collect();
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            for p in &left {
                let _ = killpg(Pid::from_raw(*p), Signal::SIGKILL);
                let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stop_child(child: &mut Child, name: &str, signal: Signal, grace: Duration) {
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    let _ = kill(Pid::from_raw(pid), signal);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        eprintln!("{name} did not stop within {grace:?}; killing it");
        let _ = child.kill().await;
    }
}

/// The `cargo build` of the quickstart's binaries, run from under `cargo run`.
struct InnerBuild<'a> {
    cargo: PathBuf,
    /// Where cargo runs (the workspace of the `verge` being run).
    workspace: PathBuf,
    target_dir: PathBuf,
    /// `debug`, `release` or a custom profile's name.
    profile: String,
    packages: Vec<&'a str>,
}

impl InnerBuild<'_> {
    /// The command, with the environment `env` (this process's) less what
    /// `cargo run` set for `verge` itself (see [`cargo_run_var`]).
    fn command(
        &self,
        env: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    ) -> std::process::Command {
        let mut cmd = std::process::Command::new(&self.cargo);
        cmd.env_clear()
            .envs(env.into_iter().filter(|(k, _)| !cargo_run_var(k)));
        cmd.arg("build");
        for p in &self.packages {
            cmd.args(["-p", p]);
        }
        cmd.arg("--target-dir")
            .arg(&self.target_dir)
            .current_dir(&self.workspace);
        match self.profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        cmd
    }
}

/// Whether `name` is a variable `cargo run` (or `cargo test`) sets for the
/// crate it runs. They must not reach the inner `cargo build`: build scripts
/// declare `rerun-if-env-changed` on some of them (ring does, on
/// `CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, `OUT_DIR`, …), and cargo compares them
/// with its own environment, so a build with them differs from the user's
/// `cargo run` without them, and each run rebuilt ring and all that depends
/// on it twice. `CARGO` (which cargo), `CARGO_HOME`, `CARGO_TARGET_DIR`,
/// `CARGO_BUILD_*`, `CARGO_PROFILE_*`, `RUSTUP_*` and the rest are the
/// user's settings and stay.
fn cargo_run_var(name: &std::ffi::OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    const EXACT: [&str; 9] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    const PREFIXES: [&str; 3] = ["CARGO_PKG_", "CARGO_BIN_EXE_", "CARGO_CFG_"];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

impl Quickstart {
    fn new(args: QuickstartArgs, stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<Self> {
        let bin = match &args.bin_dir {
            Some(b) => b.clone(),
            None => std::env::current_exe()
                .context("cannot find this executable's path")?
                .parent()
                .map(Path::to_path_buf)
                .ok_or_else(|| anyhow!("this executable has no parent directory"))?,
        };
        let dir = if args.dir.is_absolute() {
            args.dir.clone()
        } else {
            std::env::current_dir()
                .context("cannot read the current directory")?
                .join(&args.dir)
        };
        Ok(Self {
            lay: Layout::new(dir),
            bin,
            progress: Progress {
                step: 0,
                total: if args.docker { 7 } else { 6 },
                started: Instant::now(),
            },
            cloud: None,
            verged: None,
            verged_started: None,
            docker: None,
            stop,
            started: false,
            args,
        })
    }

    fn exe(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// A daemon's executable: its link to `verge-edge`.
    fn daemon(&self, name: &str) -> PathBuf {
        self.lay.bin.join(name)
    }

    /// Under `cargo run` (cargo sets `CARGO` and `CARGO_MANIFEST_DIR`) and
    /// without `--bin-dir`: builds the sibling binaries with the same
    /// profile first, so `cargo run --profile quickstart -p verge-cli --
    /// quickstart` is the whole quickstart and never runs stale binaries.
    fn build_siblings(&self) -> anyhow::Result<()> {
        let (Some(cargo), Some(manifest_dir)) = (
            std::env::var_os("CARGO"),
            std::env::var_os("CARGO_MANIFEST_DIR"),
        ) else {
            return Ok(());
        };
        if self.args.bin_dir.is_some() {
            return Ok(());
        }
        let profile = self
            .bin
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("debug")
            .to_owned();
        let target_dir = self
            .bin
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent", self.bin.display()))?;
        eprintln!("Building the runtime's binaries ({profile}) …");
        let build = InnerBuild {
            cargo: cargo.into(),
            workspace: manifest_dir.into(),
            target_dir: target_dir.to_path_buf(),
            profile,
            packages: PACKAGES.split_whitespace().filter(|p| *p != "-p").collect(),
        };
        let status = build
            .command(std::env::vars_os())
            .status()
            .context("running cargo build")?;
        if !status.success() {
            bail!("cargo build of the runtime's binaries failed ({status})");
        }
        Ok(())
    }

    fn preflight(&self) -> anyhow::Result<()> {
        let missing: Vec<&str> = [VERGE_CLOUD, EDGE, SENSOR, FILTER]
            .into_iter()
            .filter(|b| !self.exe(b).is_file())
            .collect();
        if !missing.is_empty() {
            bail!(
                "{} not found in {}.\nFrom the repository root, run the quickstart with \
                 `cargo run --profile quickstart -p verge-cli -- quickstart` (it builds them), or \
                 build them with `cargo build --release {PACKAGES}`, or pass --bin-dir.",
                missing.join(", "),
                self.bin.display()
            );
        }
        check_no_whitespace(&self.bin, "the binary directory")?;
        check_no_whitespace(&self.lay.dir, "the working directory")?;
        // Unix socket paths are limited to 107 bytes.
        let longest = self
            .lay
            .workload_dir()
            .join("SimulatedTemperatureSensor.sock");
        if longest.as_os_str().len() > 100 {
            bail!(
                "the working directory {} is too deep for Unix socket paths ({} > 100 bytes); \
                 pass a shorter --dir",
                self.lay.dir.display(),
                longest.as_os_str().len()
            );
        }
        if self.args.docker && self.args.measure {
            bail!(
                "--measure measures the runtime with process modules (the processes under \
                 verged); run it without --docker"
            );
        }
        // The hub must get 8883 on loopback.
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", HUB_MQTT_PORT)) {
            bail!(
                "127.0.0.1:{HUB_MQTT_PORT} is not free ({e}): the edge hub listens there because \
                 modules dial port 8883. Is another quickstart, verge-hub, verge-cloud or MQTT \
                 broker running? Find it with: ss -ltnp 'sport = :{HUB_MQTT_PORT}'"
            );
        }
        Ok(())
    }

    fn fresh_dir(&self) -> anyhow::Result<()> {
        let d = &self.lay.dir;
        if d.exists() {
            let empty = std::fs::read_dir(d)
                .with_context(|| format!("reading {}", d.display()))?
                .next()
                .is_none();
            if d.join(MARKER).exists() {
                std::fs::remove_dir_all(d)
                    .with_context(|| format!("removing the previous run's {}", d.display()))?;
            } else if !empty {
                bail!(
                    "{} exists and was not made by `verge quickstart`; pass another --dir",
                    d.display()
                );
            }
        }
        for p in [
            &self.lay.dir,
            &self.lay.logs,
            &self.lay.bin,
            &self.lay.cloud_data,
            &self.lay.edge,
            &self.lay.hub_dir,
        ] {
            std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
        }
        std::fs::write(
            d.join(MARKER),
            "made by verge quickstart; removed by its next run\n",
        )
        .with_context(|| format!("writing in {}", d.display()))?;
        for name in [VERGED, AGENT, HUB] {
            let link = self.daemon(name);
            std::os::unix::fs::symlink(self.exe(EDGE), &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
        Ok(())
    }

    /// The steps, until the end or a stop request (which is not an error:
    /// Ctrl-C is how an interactive quickstart ends).
    async fn run(&mut self) -> anyhow::Result<ExitCode> {
        let mut stop = self.stop.clone();
        tokio::select! {
            r = self.steps() => r,
            () = stop_requested(&mut stop) => {
                eprintln!("Stopping …");
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    async fn steps(&mut self) -> anyhow::Result<ExitCode> {
        self.build_siblings()?;
        self.preflight()?;
        // Modules outlive verged (the process backend leaves them running):
        // as subreaper, this process adopts them and can stop them.
        nix::sys::prctl::set_child_subreaper(true)
            .map_err(|e| anyhow!("cannot become a child subreaper: {e}"))?;
        let timeout = parse_duration(&self.args.timeout).context("--timeout")?;
        if self.args.docker {
            let docker = images::connect().await?;
            // Containers a killed quickstart in this directory left behind.
            images::remove_ours(&docker, &CONTAINERS, &self.lay.dir).await?;
            self.docker = Some(docker);
        }
        self.started = true;
        self.fresh_dir()?;
        eprintln!(
            "Verge quickstart in {} (logs in {}). Ctrl-C stops everything.",
            self.lay.dir.display(),
            self.lay.logs.display()
        );

        if let Some(docker) = &self.docker {
            self.progress
                .step("building the module images from this build's binaries (Docker)");
            let hub = self.exe(EDGE);
            let sensor = self.exe(SENSOR);
            let filter = self.exe(FILTER);
            images::build(
                docker,
                &[
                    images::ImageSpec {
                        repository: HUB_IMAGE,
                        binary: &hub,
                        entry_args: &["hub"],
                    },
                    images::ImageSpec {
                        repository: SENSOR_IMAGE,
                        binary: &sensor,
                        entry_args: &[],
                    },
                    images::ImageSpec {
                        repository: FILTER_IMAGE,
                        binary: &filter,
                        entry_args: &[],
                    },
                ],
                &self.lay.dir.join("images"),
            )
            .await
            .context("building the module images")?;
        }
        self.progress
            .step("starting verge-cloud, the local cloud peer");
        let cloud = self.start_cloud().await?;

        self.progress.step("registering the edge device");
        let device_key = self.register_device(&cloud.client).await?;

        self.progress
            .step("writing verged's config and starting verged");
        self.write_verged_config(&device_key, &cloud)?;
        self.start_verged().await?;

        self.progress.step("writing the hub's config");
        self.write_hub_config(&cloud)?;

        self.progress
            .step("deploying edgeHub, the sensor and the filter");
        let manifest = self.manifest();
        // The cloud keeps the deployment in the device's $edgeAgent twin.
        cloud
            .client
            .call(
                reqwest::Method::POST,
                &format!(
                    "/devices/{}/applyConfigurationContent",
                    verge_core::sas::url_encode(&self.args.device_id)
                ),
                Some(&manifest),
            )
            .await
            .context("applying the deployment to the cloud")?;
        // For reference: what was deployed.
        write_file(
            &self.lay.manifest,
            &serde_json::to_vec_pretty(&manifest)?,
            0o644,
        )?;

        self.progress
            .step("waiting for telemetry to reach the cloud");
        let me = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("verge"));
        eprintln!(
            "In another shell:  . {}/cloud.env && {} cloud deployment status --device {}",
            self.lay.dir.display(),
            me.display(),
            self.args.device_id
        );
        self.follow(&cloud, timeout).await
    }

    async fn start_cloud(&mut self) -> anyhow::Result<CloudInfo> {
        let log = log_file(&self.lay.logs.join("verge-cloud.log"))?;
        let mut child = Command::new(self.exe(VERGE_CLOUD))
            .arg("--data-dir")
            .arg(&self.lay.cloud_data)
            .args(["--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"])
            .args(["--hostname", "localhost"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            // Out of the terminal's foreground group: Ctrl-C is for the
            // quickstart, which stops the cloud last.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.exe(VERGE_CLOUD).display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("verge-cloud's stdout is not piped"))?;
        self.cloud = Some(child);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(16);
        // Reads the bound addresses, then keeps draining stdout so the cloud
        // never writes into a closed pipe.
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = tx.send(l).await;
            }
        });
        let (mut https, mut mqtt) = (None, None);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while https.is_none() || mqtt.is_none() {
            let line = tokio::time::timeout_at(deadline, rx.recv()).await;
            match line {
                Ok(Some(l)) => {
                    if let Some(a) = l.strip_prefix("listening on https://") {
                        https = Some(a.trim().to_owned());
                    } else if let Some(a) = l.strip_prefix("listening on mqtts://") {
                        mqtt = Some(a.trim().to_owned());
                    }
                }
                Ok(None) => bail!(
                    "verge-cloud exited while starting; see {}",
                    self.lay.logs.join("verge-cloud.log").display()
                ),
                Err(_) => bail!(
                    "verge-cloud did not start within 20 s; see {}",
                    self.lay.logs.join("verge-cloud.log").display()
                ),
            }
        }
        let port = |a: Option<String>| -> anyhow::Result<u16> {
            let a = a.unwrap_or_default();
            a.rsplit_once(':')
                .and_then(|(_, p)| p.parse().ok())
                .ok_or_else(|| anyhow!("verge-cloud printed an address without a port: {a:?}"))
        };
        let (https_port, mqtt_port) = (port(https)?, port(mqtt)?);
        let key_path = self.lay.cloud_data.join("service-policy.key");
        let key = std::fs::read_to_string(&key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        let connection_string = format!(
            "HostName=localhost:{https_port};SharedAccessKeyName=iothubowner;SharedAccessKey={}",
            key.trim()
        );
        let ca = self.lay.cloud_data.join("tls").join("ca.pem");
        let client = CloudClient::new(&connection_string, Some(&ca))?;
        let env = format!(
            "# Source this file to use `verge cloud …` against the quickstart's cloud.\n\
             export VERGE_CLOUD_CONNECTION_STRING='{connection_string}'\n\
             export VERGE_CLOUD_CA='{}'\n",
            ca.display()
        );
        write_file(&self.lay.dir.join("cloud.env"), env.as_bytes(), 0o600)?;
        Ok(CloudInfo {
            client,
            mqtt_port,
            https_port,
            ca,
        })
    }

    async fn register_device(&self, client: &CloudClient) -> anyhow::Result<SharedAccessKey> {
        let id = &self.args.device_id;
        let body = json!({
            "deviceId": id,
            "status": "enabled",
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": null, "secondaryKey": null}},
            "capabilities": {"iotEdge": true},
        });
        let d = client
            .call(
                reqwest::Method::PUT,
                &format!("/devices/{}", verge_core::sas::url_encode(id)),
                Some(&body),
            )
            .await
            .context("registering the edge device")?;
        let key = d
            .pointer("/authentication/symmetricKey/primaryKey")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("the cloud gave the device no key"))?;
        SharedAccessKey::from_base64(key).map_err(|e| anyhow!("the device key: {}", e.reason))
    }

    fn write_verged_config(
        &self,
        device_key: &SharedAccessKey,
        cloud: &CloudInfo,
    ) -> anyhow::Result<()> {
        let l = &self.lay;
        // The agent follows its $edgeAgent twin in the cloud (on the cloud's
        // MQTT port, trusting its CA) and reports the deployment's status there.
        let agent_env = format!(
            "VERGE_AGENT_UPSTREAM_PORT = \"{}\"\nVERGE_AGENT_UPSTREAM_CA = '{}'\n\
             VERGE_AGENT_REPORT_INTERVAL_MS = \"1000\"\n",
            cloud.mqtt_port,
            cloud.ca.display()
        );
        let cs = format!(
            "HostName=localhost;DeviceId={};SharedAccessKey={}",
            self.args.device_id,
            device_key.to_base64()
        );
        let agent = format!(
            "{} --storage {} --interval-ms 1000",
            self.daemon(AGENT).display(),
            l.agent_storage.display()
        );
        // Paths are checked free of quotes, so TOML literal strings hold them as is.
        let text = format!(
            "# Written by `verge quickstart`.\n\
             hostname = \"localhost\"\n\
             homedir = '{home}'\n\n\
             # verged registers its module identities in the cloud over HTTPS:\n\
             # the cloud's CA joins the trust bundle.\n\
             trust_bundle_cert = '{cloud_ca}'\n\n\
             [provisioning]\n\
             source = \"manual\"\n\
             connection_string = \"{cs}\"\n\
             https_port = {https_port}\n\n\
             [agent]\n\
             name = \"edgeAgent\"\n\
             type = \"process\"\n\n\
             [agent.config]\n\
             image = '{agent}'\n\n\
             [agent.env]\n\
             RuntimeLogLevel = \"info\"\n\
             {agent_env}\n\
             [listen]\n\
             workload_uri = \"unix://{workload}\"\n\
             management_uri = \"unix://{mgmt}\"\n\
             {moby}",
            moby = if self.args.docker {
                "\n# Modules are containers; the agent stays a process.\n\
                 [moby_runtime]\n\
                 uri = \"unix:///var/run/docker.sock\"\n\
                 network = \"azure-iot-edge\"\n"
            } else {
                ""
            },
            home = l.homedir.display(),
            cloud_ca = cloud.ca.display(),
            https_port = cloud.https_port,
            agent_env = agent_env,
            workload = l.workload_dir().display(),
            mgmt = l.mgmt_socket().display(),
        );
        verge_daemon::config::Config::parse(&text, &l.config)
            .map_err(|e| anyhow!("the generated verged config is invalid: {e}"))?;
        write_file(&l.config, text.as_bytes(), 0o600)
    }

    async fn start_verged(&mut self) -> anyhow::Result<()> {
        let log = log_file(&self.lay.logs.join("verged.log"))?;
        let err = log.try_clone().context("duplicating the log file")?;
        let child = Command::new(self.daemon(VERGED))
            .arg("--config")
            .arg(&self.lay.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            // As the cloud: only the quickstart gets the terminal's Ctrl-C.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.daemon(VERGED).display()))?;
        self.verged = Some(child);
        self.verged_started = Some(Instant::now());
        let mgmt = self.mgmt();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if mgmt.system_info().await.is_ok() {
                return Ok(());
            }
            if let Some(c) = self.verged.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!(
                    "verged exited ({status}) while starting; see {}",
                    self.lay.logs.join("verged.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "verged's management API did not come up within 20 s; see {}",
                    self.lay.logs.join("verged.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn mgmt(&self) -> Mgmt {
        Mgmt {
            socket: self.lay.mgmt_socket(),
            origin: "the quickstart's verged".to_owned(),
        }
    }

    /// Creates the module identities in verged up front (the agent's module
    /// creation then reuses them), so their generation ids, and with them
    /// the module keys verged derives, are known now (verged registers them
    /// in the cloud); writes the hub's config file.
    /// Writes the hub's config: listeners and the upstream only. verged runs
    /// the hub as edgeHub, so its server certificate and module identities
    /// come from verged's workload API, its leaf devices from the cloud's
    /// device scope, and its routes from its `$edgeHub` twin in the cloud
    /// (set by the deployment) — nothing else is written here.
    fn write_hub_config(&self, cloud: &CloudInfo) -> anyhow::Result<()> {
        let h = &self.lay.hub_dir;
        let text = format!(
            "# Written by `verge quickstart`.\n\
             storage_dir = '{storage}'\n\n\
             [listen]\n\
             mqtt = \"127.0.0.1:{HUB_MQTT_PORT}\"\n\
             https = \"127.0.0.1:0\"\n\n\
             [upstream]\n\
             hostname = \"localhost\"\n\
             port = {mqtt_port}\n\
             https_port = {https_port}\n\
             ca_file = '{ca}'\n\
             reconnect_ms = 1000\n",
            storage = h.join("storage").display(),
            mqtt_port = cloud.mqtt_port,
            https_port = cloud.https_port,
            ca = cloud.ca.display(),
        );
        write_file(&h.join("hub.toml"), text.as_bytes(), 0o600)
    }

    /// The `$edgeHub` desired properties: sensor → filter → $upstream (and,
    /// with `--measure`, the sensor's readings upstream as well, so the first
    /// message is not held back by the filter's threshold).
    fn routes(&self) -> Value {
        let mut routes = serde_json::Map::new();
        routes.insert(
            "sensorToFilter".into(),
            json!(format!(
                "FROM /messages/modules/{SENSOR_MODULE}/outputs/temperatureOutput \
                 INTO BrokeredEndpoint(\"/modules/{FILTER_MODULE}/inputs/input1\")"
            )),
        );
        routes.insert(
            "filterToCloud".into(),
            json!(format!(
                "FROM /messages/modules/{FILTER_MODULE}/outputs/* INTO $upstream"
            )),
        );
        if self.args.measure {
            routes.insert(
                "sensorToCloud".into(),
                json!(format!(
                    "FROM /messages/modules/{SENSOR_MODULE}/outputs/* INTO $upstream"
                )),
            );
        }
        json!({
            "schemaVersion": "1.1",
            "routes": routes,
            "storeAndForwardConfiguration": {"timeToLiveSecs": 7200},
        })
    }

    /// The deployment manifest, from `examples/quickstart.deployment.json`
    /// with this machine's binary paths.
    fn manifest(&self) -> Value {
        let module = |image: String, create_options: Value, order: u32, env: Value| {
            let mut m = json!({
                "version": "1.0",
                "type": "docker",
                "status": "running",
                "restartPolicy": "always",
                "startupOrder": order,
                "settings": {"image": image, "createOptions": create_options.to_string()},
                "env": env,
            });
            if self.args.docker {
                // Built here, in no registry.
                m["imagePullPolicy"] = json!("never");
            }
            m
        };
        let hub_config = self.lay.hub_dir.join("hub.toml");
        let (hub_image, hub_options, sensor_image, filter_image, module_options) =
            if self.args.docker {
                // Host networking: the hub listens on 127.0.0.1:8883 and reaches
                // verge-cloud on loopback, as in process mode (the modules dial
                // `localhost`). Containers run as this user, so what the hub
                // writes under the working directory (mounted at the same
                // path) stays removable.
                let user = format!(
                    "{}:{}",
                    nix::unistd::getuid().as_raw(),
                    nix::unistd::getgid().as_raw()
                );
                let dir = self.lay.dir.display().to_string();
                let modules = json!({"User": user, "HostConfig": {"NetworkMode": "host"}});
                let hub = json!({
                    "User": user,
                    "Cmd": ["--config", hub_config.display().to_string()],
                    "HostConfig": {"NetworkMode": "host", "Binds": [format!("{dir}:{dir}")]},
                });
                (
                    images::reference(HUB_IMAGE),
                    hub,
                    images::reference(SENSOR_IMAGE),
                    images::reference(FILTER_IMAGE),
                    modules,
                )
            } else {
                (
                    format!(
                        "{} --config {}",
                        self.daemon(HUB).display(),
                        hub_config.display()
                    ),
                    json!({}),
                    self.exe(SENSOR).display().to_string(),
                    self.exe(FILTER).display().to_string(),
                    json!({}),
                )
            };
        json!({"modulesContent": {
            "$edgeAgent": {"properties.desired": {
                "schemaVersion": "1.1",
                "runtime": {"type": "docker", "settings": {"minDockerVersion": "v1.25"}},
                "systemModules": {
                    "edgeAgent": {"type": "docker", "settings": {"image": self.daemon(AGENT).display().to_string(), "createOptions": "{}"}},
                    "edgeHub": module(hub_image, hub_options, 0, json!({})),
                },
                "modules": {
                    SENSOR_MODULE: module(sensor_image, module_options.clone(), 1,
                        json!({"SendInterval": {"value": "1"}})),
                    FILTER_MODULE: module(filter_image, module_options, 1, json!({})),
                },
            }},
            "$edgeHub": {"properties.desired": self.routes()},
            FILTER_MODULE: {"properties.desired": {"TemperatureThreshold": 25}},
        }})
    }

    /// Follows the D2C log until Ctrl-C, or (bounded) until enough messages
    /// arrived or the timeout.
    async fn follow(&mut self, cloud: &CloudInfo, timeout: Duration) -> anyhow::Result<ExitCode> {
        let mut stop = self.stop.clone();
        let bounded = self.args.until_messages.is_some() || self.args.measure;
        let want = if self.args.measure {
            1
        } else {
            self.args.until_messages.unwrap_or(u64::MAX)
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Value>(256);
        let client = cloud.client.clone();
        // Reconnects if the stream breaks (it should not on loopback). A
        // full channel holds the stream back (nothing is dropped).
        let tail = tokio::spawn(async move {
            let mut next = 0u64;
            loop {
                if let Ok(mut r) = client.messages(next, true).await {
                    let mut buf: Vec<u8> = Vec::new();
                    while let Ok(Some(chunk)) = r.chunk().await {
                        buf.extend_from_slice(&chunk);
                        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buf.drain(..=nl).collect();
                            let Ok(v) = serde_json::from_slice::<Value>(&line) else {
                                continue;
                            };
                            if let Some(o) = v.get("offset").and_then(Value::as_u64) {
                                next = o + 1;
                            }
                            if tx.send(v).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                if tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        let deadline = tokio::time::Instant::now() + timeout;
        let mut counted = 0u64;
        let mut per_sender: BTreeMap<String, u64> = BTreeMap::new();
        let mut first_at: Option<Duration> = None;
        let mut next_offset = 0u64;
        let mut progress_tick = tokio::time::interval(Duration::from_secs(5));
        progress_tick.tick().await;
        let outcome = loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(v) = msg else { break Outcome::StreamEnded };
                    if let Some(o) = v.get("offset").and_then(Value::as_u64) {
                        next_offset = next_offset.max(o + 1);
                    }
                    let module = v.get("moduleId").and_then(Value::as_str).unwrap_or("");
                    *per_sender.entry(if module.is_empty() { "(device)".into() } else { module.to_owned() }).or_default() += 1;
                    if module == FILTER_MODULE || module == SENSOR_MODULE {
                        counted += 1;
                        if first_at.is_none() {
                            first_at = self.verged_started.map(|t| t.elapsed());
                        }
                    }
                    let mut out = std::io::stdout().lock();
                    // A closed stdout (`| head`) is not a reason to stop.
                    let _ = writeln!(out, "{}", format_message(&v)).and_then(|()| out.flush());
                    if counted >= want {
                        break Outcome::Enough;
                    }
                }
                _ = progress_tick.tick(), if counted == 0 => {
                    eprintln!("… still waiting for the first message ({})", self.status_line().await);
                }
                () = tokio::time::sleep_until(deadline), if bounded => break Outcome::Timeout,
                () = stop_requested(&mut stop) => break Outcome::Signal,
            }
        };
        tail.abort();
        match outcome {
            Outcome::Enough if self.args.measure => {
                let first = first_at.unwrap_or_default();
                self.measure(cloud, first, next_offset, timeout).await?;
                Ok(ExitCode::SUCCESS)
            }
            Outcome::Enough => {
                eprintln!(
                    "{counted} messages from the pipeline reached the cloud ({}).",
                    summary(&per_sender)
                );
                Ok(ExitCode::SUCCESS)
            }
            Outcome::Signal => {
                eprintln!("Stopping ({counted} messages from the pipeline reached the cloud).");
                Ok(ExitCode::SUCCESS)
            }
            Outcome::Timeout | Outcome::StreamEnded => {
                let why = if matches!(outcome, Outcome::Timeout) {
                    format!(
                        "only {counted} of {want} messages from {FILTER_MODULE}/{SENSOR_MODULE} reached the cloud within {timeout:?}"
                    )
                } else {
                    "the cloud's message stream ended".to_owned()
                };
                eprintln!("error: {why}.\n{}", self.diagnose(&per_sender).await);
                Ok(ExitCode::from(1))
            }
        }
    }

    /// One line: which modules run (from verged).
    async fn status_line(&self) -> String {
        match self.mgmt().modules().await {
            Ok(ms) if ms.is_empty() => "no modules yet".to_owned(),
            Ok(ms) => ms
                .iter()
                .map(|m| format!("{} {}", m.name, m.status.runtime_status.status))
                .collect::<Vec<_>>()
                .join(", "),
            Err(_) => "verged not answering".to_owned(),
        }
    }

    /// What went wrong, as far as the quickstart can tell.
    async fn diagnose(&mut self, per_sender: &BTreeMap<String, u64>) -> String {
        let mut out = String::from("Diagnosis:\n");
        let l = &self.lay;
        if let Some(c) = self.cloud.as_mut()
            && let Ok(Some(s)) = c.try_wait()
        {
            out.push_str(&format!(
                "  × verge-cloud exited ({s}); see {}\n",
                l.logs.join("verge-cloud.log").display()
            ));
        }
        if let Some(c) = self.verged.as_mut()
            && let Ok(Some(s)) = c.try_wait()
        {
            out.push_str(&format!(
                "  × verged exited ({s}); see {}\n",
                l.logs.join("verged.log").display()
            ));
        }
        match self.mgmt().modules().await {
            Ok(ms) => {
                for want in ["edgeAgent", "edgeHub", SENSOR_MODULE, FILTER_MODULE] {
                    let found = ms.iter().find(|m| m.name == want);
                    match found {
                        Some(m) => {
                            let st = &m.status.runtime_status.status;
                            let mark = if st == "running" { "✓" } else { "×" };
                            out.push_str(&format!("  {mark} {want}: {st}\n"));
                        }
                        None if want == "edgeAgent" => {}
                        None => out.push_str(&format!(
                            "  × {want}: not created (the agent's log is in {}; its reported state in {})\n",
                            l.logs.join("verged.log").display(),
                            l.agent_storage.join("reported.json").display()
                        )),
                    }
                }
            }
            Err(e) => out.push_str(&format!("  × verged's management API: {e:#}\n")),
        }
        if per_sender.is_empty() {
            out.push_str(
                "  × the cloud received no message at all: is the hub's upstream link up? \
                 (look for `upstream` in the hub's log)\n",
            );
        } else {
            out.push_str(&format!(
                "  · the cloud received: {}\n",
                summary(per_sender)
            ));
        }
        if self.docker.is_some() {
            out.push_str(&format!(
                "  the modules' logs: verge --config {} logs <module>\n",
                l.config.display()
            ));
        }
        for m in ["edgeHub", SENSOR_MODULE, FILTER_MODULE] {
            let log = module_log(&l.homedir, m);
            let tail = last_lines(&log, 3);
            if !tail.is_empty() {
                out.push_str(&format!("  {m}'s log ({}) ends:\n", log.display()));
                for line in tail {
                    out.push_str(&format!("      {line}\n"));
                }
            }
        }
        out.push_str(&format!(
            "  verged and the agent: {}; the cloud: {}",
            l.logs.join("verged.log").display(),
            l.logs.join("verge-cloud.log").display()
        ));
        out
    }

    /// `--measure`. The first start above provisioned everything (device,
    /// identities, certificates, the deployment in the cloud). Then, three
    /// times: stop verged and the modules, forget the modules' runtime state,
    /// the agent's storage and the hub's store (identities, keys and the edge
    /// CA stay), start verged and time it until the first message from the
    /// sensor reaches the cloud — a provisioned device booting with nothing
    /// running: verged, agent, deployment from the twin, hub, sensor, route,
    /// upstream. After the last, 10 s idle, then the RSS of verged, the agent
    /// and the hub.
    async fn measure(
        &mut self,
        cloud: &CloudInfo,
        first: Duration,
        mut next_offset: u64,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        eprintln!(
            "first start (provisioning included): {} ms; now timing restarts …",
            first.as_millis()
        );
        let mut colds = Vec::new();
        for run in 1..=3 {
            self.stop_edge().await;
            for d in [
                self.lay.homedir.join("modules"),
                self.lay.agent_storage.clone(),
                self.lay.hub_dir.join("storage"),
            ] {
                match std::fs::remove_dir_all(&d) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(anyhow!("removing {}: {e}", d.display())),
                }
            }
            // Let the machine settle (page cache, sockets in TIME_WAIT).
            tokio::time::sleep(Duration::from_secs(2)).await;
            self.start_verged().await?;
            let started = self
                .verged_started
                .ok_or_else(|| anyhow!("verged has no start time"))?;
            let (cold, next) = first_message(&cloud.client, next_offset, started, timeout)
                .await
                .with_context(|| format!("restart {run}: no message within {timeout:?}"))?;
            next_offset = next;
            eprintln!("restart {run}: first message after {} ms", cold.as_millis());
            colds.push(cold);
        }
        colds.sort();
        let median = colds[colds.len() / 2];
        eprintln!("letting the runtime idle for 10 s …");
        tokio::time::sleep(Duration::from_secs(10)).await;
        let verged_pid = self
            .verged
            .as_ref()
            .and_then(Child::id)
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| anyhow!("verged is not running"))?;
        let procs = descendants(verged_pid);
        // comm is the executable's name cut to 15 bytes.
        let mut anon = anon_pss_kib(verged_pid);
        let mut runtime_pids = vec![verged_pid];
        let mut rss = |names: &[&str]| -> (u64, usize) {
            let mut total = 0;
            let mut n = 0;
            for (pid, comm) in &procs {
                if names.iter().any(|x| comm.as_str() == &x[..x.len().min(15)]) {
                    total += rss_kib(*pid);
                    if names.contains(&AGENT) || names.contains(&HUB) {
                        let (a, p) = anon_pss_kib(*pid);
                        anon = (anon.0 + a, anon.1 + p);
                        runtime_pids.push(*pid);
                    }
                    n += 1;
                }
            }
            (total, n)
        };
        let verged = rss_kib(verged_pid);
        let (agent, na) = rss(&[AGENT]);
        let (hub, nh) = rss(&[HUB]);
        let (modules, nm) = rss(&[SENSOR, FILTER]);
        if na != 1 || nh != 1 {
            bail!("expected one agent and one hub under verged, found {na} and {nh}");
        }
        let runtime = verged + agent + hub;
        let resident = resident_set_kib(&runtime_pids);
        let mb = |kib: u64| kib as f64 / 1024.0;
        let ms: Vec<String> = colds.iter().map(|d| d.as_millis().to_string()).collect();
        println!(
            "cold start (verged start → first message in the cloud): median {} ms (runs: {} ms; \
             first start with provisioning: {} ms)",
            median.as_millis(),
            ms.join(", "),
            first.as_millis()
        );
        println!(
            "idle RSS after 10 s: verged {:.1} MB + verge-agent {:.1} MB + verge-hub {:.1} MB \
             = {:.1} MB (example modules, {nm} processes: {:.1} MB more)",
            mb(verged),
            mb(agent),
            mb(hub),
            mb(runtime),
            mb(modules)
        );
        println!(
            "  of the runtime's RSS: {:.1} MB anonymous (heap, stacks), PSS {:.1} MB",
            mb(anon.0),
            mb(anon.1)
        );
        println!(
            "  the runtime's resident set, each page counted once (code shared by the \
             three processes too): {:.1} MB",
            mb(resident)
        );
        let json = json!({
            "cold_start_ms": {"median": median.as_millis() as u64, "runs": colds.iter().map(|d| d.as_millis() as u64).collect::<Vec<_>>(), "first_start_with_provisioning": first.as_millis() as u64},
            "rss_kib": {"verged": verged, "verge_agent": agent, "verge_hub": hub, "runtime_total": runtime, "runtime_anon": anon.0, "runtime_pss": anon.1, "runtime_resident_set": resident, "example_modules": modules},
        });
        write_file(
            &self.lay.dir.join("measure.json"),
            serde_json::to_string_pretty(&json)?.as_bytes(),
            0o644,
        )?;
        Ok(())
    }

    /// Stops verged (and with it the agent), then the modules it left
    /// running, then verge-cloud; checks nothing is left.
    async fn shutdown(&mut self) -> anyhow::Result<()> {
        if !self.started {
            // Refused before it began (a check failed, or another
            // quickstart runs): nothing ran, and the directory is not ours.
            return Ok(());
        }
        self.stop_verged().await;
        // Then all at once (nothing restarts them now): the modules verged
        // leaves running (as IoT Edge does across daemon restarts), as
        // processes or containers, and verge-cloud.
        let cloud = self.cloud.take();
        let modules = stop_orphans(cloud.as_ref().and_then(pid_of));
        let containers = async {
            match &self.docker {
                Some(docker) => {
                    eprintln!("Removing the module containers …");
                    images::remove_ours(docker, &CONTAINERS, &self.lay.dir).await
                }
                None => Ok(0),
            }
        };
        let cloud = async move {
            if let Some(mut c) = cloud {
                eprintln!("Stopping verge-cloud …");
                stop_child(
                    &mut c,
                    "verge-cloud",
                    Signal::SIGTERM,
                    Duration::from_secs(20),
                )
                .await;
            }
        };
        let ((), containers, ()) = tokio::join!(modules, containers, cloud);
        containers.context("removing the module containers")?;
        self.stop_stragglers().await?;
        if let Some(docker) = &self.docker
            && let Some(bytes) =
                images::images_size(docker, &[HUB_IMAGE, SENSOR_IMAGE, FILTER_IMAGE]).await
        {
            eprintln!(
                "The module images (verge-quickstart/*, {:.0} MB) and the Docker network \
                 azure-iot-edge stay for the next run; `verge quickstart --clean` removes them.",
                bytes as f64 / 1e6
            );
        }
        Ok(())
    }

    /// Stops verged (and with it the agent), then the modules it left running.
    async fn stop_edge(&mut self) {
        self.stop_verged().await;
        stop_orphans(self.cloud.as_ref().and_then(pid_of)).await;
    }

    /// Stops verged, which stops the agent (so nothing restarts a module).
    async fn stop_verged(&mut self) {
        if let Some(mut v) = self.verged.take() {
            eprintln!("Stopping verged and the agent …");
            stop_child(&mut v, "verged", Signal::SIGTERM, Duration::from_secs(45)).await;
        }
    }

    /// Kills and reaps anything else adopted meanwhile (a module's own
    /// children); fails if something survives.
    async fn stop_stragglers(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = my_children();
            if left.is_empty() {
                break;
            }
            let pids: Vec<i32> = left.iter().map(|(p, _)| *p).collect();
            for p in &pids {
                let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
            }
            reap(&pids);
            if Instant::now() > deadline {
                bail!(
                    "processes still running after the shutdown: {}",
                    left.iter()
                        .map(|(p, c)| format!("{c} ({p})"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "Stopped; nothing is left running. Files are in {}.",
            self.lay.dir.display()
        );
        Ok(())
    }
}

/// Waits for the first message from the sensor or the filter at or after
/// D2C offset `from`; returns the time since `started` and the next offset.
async fn first_message(
    client: &CloudClient,
    from: u64,
    started: Instant,
    timeout: Duration,
) -> anyhow::Result<(Duration, u64)> {
    let wait = async {
        let r = client.messages(from, true).await?;
        let mut found = None;
        stream_lines(r, |line| {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                return true;
            };
            let module = v.get("moduleId").and_then(Value::as_str).unwrap_or("");
            if module == SENSOR_MODULE || module == FILTER_MODULE {
                let next = v.get("offset").and_then(Value::as_u64).unwrap_or(from) + 1;
                found = Some((started.elapsed(), next));
                return false;
            }
            true
        })
        .await?;
        found.ok_or_else(|| anyhow!("the cloud's message stream ended"))
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| anyhow!("timed out"))?
}

enum Outcome {
    Enough,
    Timeout,
    Signal,
    StreamEnded,
}

fn summary(per_sender: &BTreeMap<String, u64>) -> String {
    per_sender
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A module's output under verged's process runtime (state dir `<homedir>/modules`).
fn module_log(homedir: &Path, module: &str) -> PathBuf {
    homedir
        .join("modules/modules")
        .join(module)
        .join("logs/output.log")
}

/// The last `n` lines of a file, without ANSI colour codes (empty if unreadable).
fn last_lines(path: &Path, n: usize) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| strip_ansi(l))
        .collect()
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // Skip to the end of the CSI sequence (a letter).
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Descendants of `root` (pid, comm), from /proc.
fn descendants(root: i32) -> Vec<(i32, String)> {
    let mut parent: Vec<(i32, i32, String)> = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                continue;
            };
            let comm = stat[open + 1..close].to_owned();
            let ppid = stat[close + 1..]
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            parent.push((pid, ppid, comm));
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, ppid, comm) in &parent {
            if *ppid == p {
                out.push((*pid, comm.clone()));
                frontier.push(*pid);
            }
        }
    }
    out
}

/// A `Key:   123 kB` field of a /proc file, in KiB (0 if absent).
fn proc_kib(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// VmRSS of a process in KiB (0 if gone).
fn rss_kib(pid: i32) -> u64 {
    proc_kib(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// (anonymous RSS, PSS) of a process in KiB: the memory it alone costs,
/// and its RSS with shared pages split among their users.
fn anon_pss_kib(pid: i32) -> (u64, u64) {
    (
        proc_kib(&format!("/proc/{pid}/status"), "RssAnon:"),
        proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:"),
    )
}

/// The resident set of the processes `pids` taken together, in KiB: every
/// page resident in any of them, counted once. Summing VmRSS counts a code
/// page that three processes map three times; this is what the kernel
/// actually holds for them. A file page is identified by (device, inode,
/// page of the file), from `/proc/<pid>/maps` and the file-page bit of
/// `/proc/<pid>/pagemap`; an anonymous page (heap, stack, a written copy of
/// a file page) belongs to one process. No privilege needed: page frame
/// numbers are not read.
fn resident_set_kib(pids: &[i32]) -> u64 {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let page_kib = proc_kib("/proc/self/smaps", "KernelPageSize:").max(4);
    let page = page_kib * 1024;
    let mut file_pages: std::collections::HashSet<(String, u64, u64)> = Default::default();
    let mut anon_pages = 0u64;
    for pid in pids {
        let (Ok(maps), Ok(mut pagemap)) = (
            std::fs::read_to_string(format!("/proc/{pid}/maps")),
            std::fs::File::open(format!("/proc/{pid}/pagemap")),
        ) else {
            continue;
        };
        for line in maps.lines() {
            // start-end perms offset dev inode [path]
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(range), Some(offset), Some(dev), Some(inode)) =
                (f.first(), f.get(2), f.get(3), f.get(4))
            else {
                continue;
            };
            let Some((start, end)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end), Ok(offset), Ok(inode)) = (
                u64::from_str_radix(start, 16),
                u64::from_str_radix(end, 16),
                u64::from_str_radix(offset, 16),
                inode.parse::<u64>(),
            ) else {
                continue;
            };
            if f.get(5) == Some(&"[vsyscall]") {
                continue;
            }
            let pages = (end - start) / page;
            let mut buf = vec![0u8; pages as usize * 8];
            if pagemap.seek(SeekFrom::Start(start / page * 8)).is_err()
                || pagemap.read_exact(&mut buf).is_err()
            {
                continue;
            }
            for (i, e) in buf.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
                if e >> 63 == 0 {
                    continue; // not present
                }
                if (e >> 61) & 1 == 1 && inode != 0 {
                    file_pages.insert((dev.to_string(), inode, offset / page + i as u64));
                } else {
                    anon_pages += 1;
                }
            }
        }
    }
    (file_pages.len() as u64 + anon_pages) * page_kib
}

/// Writes via a temporary file and rename, with `mode`.
fn write_file(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn strips_colours() {
        assert_eq!(
            strip_ansi("\x1b[2mtime\x1b[0m \x1b[32m INFO\x1b[0m x"),
            "time  INFO x"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("120s").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3m").unwrap(), Duration::from_secs(180));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
    }
    /// What `cargo run -p <package>` adds to the environment of what it runs.
    fn as_run_by(package: &str) -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
        let mut env: Vec<_> = std::env::vars_os().collect();
        for (k, v) in [
            ("CARGO_PKG_NAME", package.to_owned()),
            ("CARGO_PKG_VERSION", "9.9.9".to_owned()),
            ("CARGO_MANIFEST_DIR", format!("/src/{package}")),
            ("CARGO_MANIFEST_PATH", format!("/src/{package}/Cargo.toml")),
            ("CARGO_CRATE_NAME", package.replace('-', "_")),
            ("CARGO_BIN_NAME", package.to_owned()),
            ("CARGO_PRIMARY_PACKAGE", "1".to_owned()),
            ("OUT_DIR", format!("/target/{package}/out")),
        ] {
            env.retain(|(n, _)| n != k);
            env.push((k.into(), v.into()));
        }
        env
    }

    #[test]
    fn inner_build_env_drops_what_cargo_run_set() {
        let build = InnerBuild {
            cargo: "/usr/bin/cargo".into(),
            workspace: "/src".into(),
            target_dir: "/src/target".into(),
            profile: "quickstart".into(),
            packages: vec!["verge-cloud", "verge-edge"],
        };
        let mut env = as_run_by("verge-cli");
        for (k, v) in [
            ("CARGO", "/usr/bin/cargo"),
            ("CARGO_HOME", "/home/u/.cargo"),
            ("CARGO_TARGET_DIR", "/t"),
            ("CARGO_PROFILE_RELEASE_LTO", "thin"),
            ("RUSTUP_TOOLCHAIN", "stable"),
            ("PATH", "/usr/bin"),
            ("CARGO_BIN_EXE_verge", "/t/verge"),
        ] {
            env.push((k.into(), v.into()));
        }
        let cmd = build.command(env);
        let set: BTreeMap<String, Option<String>> = cmd
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        for gone in [
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION",
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "OUT_DIR",
            "CARGO_BIN_EXE_verge",
        ] {
            assert!(!set.contains_key(gone), "{gone} reaches the inner build");
        }
        for (kept, v) in [
            ("CARGO", "/usr/bin/cargo"),
            ("CARGO_HOME", "/home/u/.cargo"),
            ("CARGO_TARGET_DIR", "/t"),
            ("CARGO_PROFILE_RELEASE_LTO", "thin"),
            ("RUSTUP_TOOLCHAIN", "stable"),
            ("PATH", "/usr/bin"),
        ] {
            assert_eq!(set.get(kept), Some(&Some(v.to_owned())), "{kept}");
        }
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            args,
            [
                "build",
                "-p",
                "verge-cloud",
                "-p",
                "verge-edge",
                "--target-dir",
                "/src/target",
                "--profile",
                "quickstart"
            ]
        );
        assert_eq!(cmd.get_current_dir(), Some(Path::new("/src")));
    }

    /// The bug this guards against: a build script with
    /// `rerun-if-env-changed` on a variable `cargo run` sets (ring has them)
    /// ran again on every inner build, and all that depends on it was
    /// compiled again. A tiny package with such a build script, built as
    /// one `cargo run` would build it and then as another: the second build
    /// compiles nothing.
    #[test]
    fn second_inner_build_compiles_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = tmp.path().join("probe");
        std::fs::create_dir_all(ws.join("src")).unwrap();
        std::fs::write(
            ws.join("Cargo.toml"),
            "[package]\nname = \"probe\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[workspace]\n",
        )
        .unwrap();
        let mut script = String::from("fn main() {\n");
        for v in [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "OUT_DIR",
        ] {
            script.push_str(&format!(
                "    println!(\"cargo:rerun-if-env-changed={v}\");\n"
            ));
        }
        script.push_str("}\n");
        std::fs::write(ws.join("build.rs"), script).unwrap();
        std::fs::write(ws.join("src/lib.rs"), "//! probe\npub fn f() {}\n").unwrap();
        let build = InnerBuild {
            cargo: env!("CARGO").into(),
            workspace: ws,
            target_dir: tmp.path().join("target"),
            profile: "debug".into(),
            packages: vec!["probe"],
        };
        // `fresh` of each artifact cargo reports.
        let fresh = |env: Vec<(std::ffi::OsString, std::ffi::OsString)>| -> Vec<bool> {
            let out = build
                .command(env)
                .args(["--offline", "--message-format=json"])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|v| v["reason"] == "compiler-artifact")
                .map(|v| v["fresh"].as_bool().unwrap())
                .collect()
        };
        let first = fresh(as_run_by("verge-cli"));
        assert!(!first.is_empty() && first.iter().all(|f| !f), "{first:?}");
        let second = fresh(as_run_by("verge-cloud"));
        assert!(
            !second.is_empty() && second.iter().all(|f| *f),
            "the second build compiled again: {second:?}"
        );
    }
}
