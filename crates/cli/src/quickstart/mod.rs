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
//! 2. registers an edge device in it (with `--dps`: enrolls it in the
//!    cloud's Device Provisioning Service instead),
//! 3. writes verged's config (manual provisioning with that device's
//!    connection string, or with `--dps` DPS provisioning with the
//!    enrollment's key, so verged registers when it starts; process module
//!    runtime, auto-generated edge CA, the
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

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use tokio::process::Child;

use crate::cloud::CloudClient;
use crate::images;

mod build;
mod deploy;
mod follow;
mod measure;
mod procs;

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
/// What the deployment names for edgeHub, as Azure's manifests do.
const MICROSOFT_HUB_IMAGE: &str = "mcr.microsoft.com/azureiotedge-hub:1.5";
const SENSOR_IMAGE: &str = "verge-quickstart/simulated-temperature-sensor";
const FILTER_IMAGE: &str = "verge-quickstart/filter";
/// The hub's MQTT port: modules dial 8883 on the gateway host, as the Azure
/// SDKs do (they cannot dial another port).
const HUB_MQTT_PORT: u16 = 8883;
/// The hub's AMQPS port (as IoT Edge's), on loopback.
const HUB_AMQP_PORT: u16 = 5671;
/// Prometheus metrics on loopback: the hub's on 9600 (as edgeHub's), the
/// agent's beside it (both run on this host, not in their own containers).
const HUB_METRICS_PORT: u16 = 9600;
const AGENT_METRICS_PORT: u16 = 9601;
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
    /// Provision the edge device through verge-cloud's Device Provisioning
    /// Service (an individual enrollment with a symmetric key; verged
    /// registers when it starts), as a fleet would, instead of registering
    /// it in the cloud directly.
    #[arg(long)]
    dps: bool,
    /// Remove what `--docker` leaves for the next run (the module images
    /// built here and the Docker network `azure-iot-edge` verged made), then
    /// exit.
    #[arg(long, conflicts_with_all = ["docker", "measure", "until_messages", "dps"])]
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
    amqp_port: u16,
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

/// `p` against the current directory, unless it is absolute.
fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_path_buf());
    }
    Ok(std::env::current_dir()
        .context("cannot read the current directory")?
        .join(p))
}

impl Quickstart {
    fn new(args: QuickstartArgs, stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<Self> {
        // Absolute: the daemons' links in the working directory point here,
        // and a relative target would resolve against the links' directory.
        let bin = match &args.bin_dir {
            Some(b) => absolute(b)?,
            None => std::env::current_exe()
                .context("cannot find this executable's path")?
                .parent()
                .map(Path::to_path_buf)
                .ok_or_else(|| anyhow!("this executable has no parent directory"))?,
        };
        let dir = absolute(&args.dir)?;
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
        // …and 5671 (AMQPS; AMQP modules dial it), the metrics ports too.
        for (port, what) in [
            (HUB_AMQP_PORT, "AMQP modules dial port 5671"),
            (HUB_METRICS_PORT, "its Prometheus metrics are served there"),
            (
                AGENT_METRICS_PORT,
                "the agent's Prometheus metrics are served there",
            ),
        ] {
            if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                bail!(
                    "127.0.0.1:{port} is not free ({e}): the quickstart needs it ({what}). \
                     Find who holds it with: ss -ltnp 'sport = :{port}'"
                );
            }
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

        let identity = if self.args.dps {
            self.progress
                .step("enrolling the edge device in verge-cloud's DPS");
            self.enroll_device(&cloud.client).await?
        } else {
            self.progress.step("registering the edge device");
            deploy::Identity::Registered(self.register_device(&cloud.client).await?)
        };

        self.progress.step(if self.args.dps {
            "writing verged's config and starting verged (it registers through DPS)"
        } else {
            "writing verged's config and starting verged"
        });
        self.write_verged_config(&identity, &cloud)?;
        self.start_verged().await?;

        self.progress
            .step("deploying edgeHub, the sensor and the filter");
        let manifest = self.manifest(&cloud);
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
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn relative_paths_become_absolute() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            absolute(Path::new("target/debug")).unwrap(),
            cwd.join("target/debug")
        );
        assert_eq!(absolute(Path::new("/opt/v")).unwrap(), Path::new("/opt/v"));
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
}
