//! The quickstart's processes: starting verge-cloud and verged, and
//! stopping everything in order (verged and the agent, the modules it
//! leaves, verge-cloud), reaping what this subreaper adopted.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncBufReadExt as _;
use tokio::process::{Child, Command};

use super::{
    CONTAINERS, CloudInfo, FILTER_IMAGE, HUB_IMAGE, Quickstart, SENSOR_IMAGE, VERGE_CLOUD, VERGED,
    log_file, write_file,
};
use crate::cloud::CloudClient;
use crate::images;
use crate::mgmt::Mgmt;

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

impl Quickstart {
    pub(super) async fn start_cloud(&mut self) -> anyhow::Result<CloudInfo> {
        let log = log_file(&self.lay.logs.join("verge-cloud.log"))?;
        let mut child = Command::new(self.exe(VERGE_CLOUD))
            .arg("--data-dir")
            .arg(&self.lay.cloud_data)
            .args(["--listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0"])
            // The edge hub's upstream (AMQP, as edgeHub's default).
            .args(["--amqps-listen", "127.0.0.1:0"])
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
        let (mut https, mut mqtt, mut amqps) = (None, None, None);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while https.is_none() || mqtt.is_none() || amqps.is_none() {
            let line = tokio::time::timeout_at(deadline, rx.recv()).await;
            match line {
                Ok(Some(l)) => {
                    if let Some(a) = l.strip_prefix("listening on https://") {
                        https = Some(a.trim().to_owned());
                    } else if let Some(a) = l.strip_prefix("listening on mqtts://") {
                        mqtt = Some(a.trim().to_owned());
                    } else if let Some(a) = l.strip_prefix("listening on amqps://") {
                        amqps = Some(a.trim().to_owned());
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
        let (https_port, mqtt_port, amqp_port) = (port(https)?, port(mqtt)?, port(amqps)?);
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
            amqp_port,
            https_port,
            ca,
        })
    }

    pub(super) async fn start_verged(&mut self) -> anyhow::Result<()> {
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

    pub(super) fn mgmt(&self) -> Mgmt {
        Mgmt {
            socket: self.lay.mgmt_socket(),
            origin: "the quickstart's verged".to_owned(),
        }
    }

    /// Stops verged (and with it the agent), then the modules it left
    /// running, then verge-cloud; checks nothing is left.
    pub(super) async fn shutdown(&mut self) -> anyhow::Result<()> {
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
    pub(super) async fn stop_edge(&mut self) {
        self.stop_verged().await;
        stop_orphans(self.cloud.as_ref().and_then(pid_of)).await;
    }

    /// Stops verged, which stops the agent (so nothing restarts a module).
    pub(super) async fn stop_verged(&mut self) {
        if let Some(mut v) = self.verged.take() {
            eprintln!("Stopping verged and the agent …");
            stop_child(&mut v, "verged", Signal::SIGTERM, Duration::from_secs(45)).await;
        }
    }

    /// Kills and reaps anything else adopted meanwhile (a module's own
    /// children); fails if something survives.
    pub(super) async fn stop_stragglers(&mut self) -> anyhow::Result<()> {
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
