//! `verge system status|logs|restart`: verged itself.
//!
//! verged runs as the systemd unit `verged`; its logs go to the journal, and
//! so does the output of a process agent (it inherits verged's stdio).
//! verged's management API reports the host (`/systeminfo`), the modules,
//! and the agent it supervises (`/systeminfo/agent`: a process agent is
//! verged's own child, outside the module runtime, so only verged knows it).

use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, anyhow};
use verge_daemon::api::AgentInfo;
use verge_daemon::config::{AgentKind, Config};

use crate::list;
use crate::mgmt::Mgmt;
use crate::ui::{self, Colour};

const UNIT: &str = "verged";

/// `systemctl is-active verged`, or why it cannot be known.
fn unit_state() -> String {
    match Command::new("systemctl").args(["is-active", UNIT]).output() {
        Ok(out) => {
            let s = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            if s.is_empty() {
                format!("unknown ({})", String::from_utf8_lossy(&out.stderr).trim())
            } else {
                s
            }
        }
        Err(e) => format!("unknown (systemctl: {e})"),
    }
}

/// `verge system status`.
pub async fn status(
    host: Option<&str>,
    explicit_config: Option<&Path>,
    config_path: &Path,
) -> anyhow::Result<ExitCode> {
    let colour = ui::colour_enabled();
    let config = Config::load(config_path);
    let mgmt = Mgmt::resolve(host, explicit_config)?;
    let mut rows: Vec<Vec<String>> = Vec::new();
    rows.push(vec![
        "systemd unit".into(),
        format!("{UNIT}: {}", unit_state()),
    ]);
    let info = mgmt.system_info().await;
    let reachable = info.is_ok();
    match &info {
        Ok(i) => {
            rows.push(vec![
                "verged".into(),
                ui::paint(colour, Colour::Green, "running"),
            ]);
            rows.push(vec!["management socket".into(), mgmt.uri()]);
            rows.push(vec!["verged version".into(), i.version.clone()]);
            rows.push(vec!["module runtime".into(), i.server_version.clone()]);
            rows.push(vec![
                "host".into(),
                format!(
                    "{} ({}, kernel {}, {} CPUs, {} MiB)",
                    i.operating_system,
                    i.architecture,
                    i.kernel_version,
                    i.cpus,
                    i.total_memory >> 20
                ),
            ]);
            rows.push(vec!["provisioning".into(), i.provisioning.kind.clone()]);
        }
        Err(e) => {
            rows.push(vec![
                "verged".into(),
                ui::paint(colour, Colour::Red, "not reachable"),
            ]);
            rows.push(vec![String::new(), format!("{e:#}").replace('\n', " ")]);
        }
    }
    match &config {
        Ok(c) => {
            rows.push(vec![
                "device".into(),
                format!(
                    "{} on {}",
                    c.provisioning.device_id, c.provisioning.iothub_hostname
                ),
            ]);
            let supervised = if reachable {
                mgmt.agent().await
            } else {
                Ok(None)
            };
            let agent = match c.agent.kind {
                AgentKind::Process if reachable => match &supervised {
                    Ok(Some(a)) => describe_agent(a, std::time::SystemTime::now()),
                    Ok(None) => format!(
                        "{} (process, supervised by verged): this verged does not report its \
                         state; see `verge system logs`",
                        c.agent.name
                    ),
                    Err(e) => format!("{}: unknown ({e})", c.agent.name),
                },
                AgentKind::Docker if reachable => match mgmt.modules().await {
                    Ok(mods) => match mods.iter().find(|m| m.name == c.agent.name) {
                        Some(m) => format!(
                            "{} (container): {}",
                            c.agent.name,
                            list::describe(m, std::time::SystemTime::now())
                        ),
                        None => format!("{} (container): not created", c.agent.name),
                    },
                    Err(e) => format!("{}: unknown ({e})", c.agent.name),
                },
                AgentKind::Docker => format!("{} (container): unknown", c.agent.name),
                AgentKind::Process => format!(
                    "{} (process, supervised by verged): unknown while verged is not reachable",
                    c.agent.name
                ),
            };
            rows.push(vec!["agent".into(), agent]);
            if let Ok(Some(a)) = &supervised {
                rows.push(vec!["agent restarts".into(), restarts(a)]);
            }
        }
        Err(e) => rows.push(vec![
            "agent".into(),
            format!("unknown: {e} (run with sudo, or pass --config)"),
        ]),
    }
    let header = ["", ""];
    let table = ui::table(&header, &rows);
    // Skip the empty header line.
    for line in table.lines().skip(1) {
        println!("{line}");
    }
    Ok(if reachable {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// "edgeAgent (process, pid 42): Up 5 minutes", from verged's record.
pub fn describe_agent(a: &AgentInfo, now: std::time::SystemTime) -> String {
    let how = match a.pid {
        Some(pid) => format!("{}, pid {pid}", a.kind),
        None => a.kind.clone(),
    };
    let state = match a.status.as_str() {
        "backoff" => format!(
            "{}; restart pending",
            list::describe(&list::agent_row(a), now)
        ),
        "failed" => "cannot be started; verged retries (see `verge system logs`)".to_owned(),
        "starting" => "starting".to_owned(),
        _ => list::describe(&list::agent_row(a), now),
    };
    format!("{} ({how}): {state}", a.name)
}

/// "2 (last exit: code 7, 3 minutes ago)".
fn restarts(a: &AgentInfo) -> String {
    let mut s = a.restart_count.to_string();
    if let Some(e) = &a.last_exit {
        let how = match (e.code, e.signal) {
            (Some(c), _) => format!("code {c}"),
            (None, Some(sig)) => format!("signal {sig}"),
            (None, None) => "unknown".to_owned(),
        };
        s.push_str(&format!(" (last exit: {how} at {})", e.time));
    }
    s
}

/// `verge system logs [-f] [-- journalctl args]`.
pub fn logs(follow: bool, extra: &[String]) -> anyhow::Result<ExitCode> {
    let mut cmd = Command::new("journalctl");
    cmd.args(["-u", UNIT, "--no-pager"]);
    if follow {
        cmd.arg("--follow");
    }
    cmd.args(extra);
    let status = cmd.status().map_err(|e| {
        anyhow!(
            "cannot run journalctl ({e}). verged logs to stderr: without systemd, its logs \
             (and the process agent's) are wherever its stderr was sent"
        )
    })?;
    Ok(exit_code(status))
}

/// `verge system restart`.
pub fn restart() -> anyhow::Result<ExitCode> {
    let status = Command::new("systemctl")
        .args(["restart", UNIT])
        .status()
        .map_err(|e| {
            anyhow!(
                "cannot run systemctl ({e}). Restart verged the way it was started: it stops \
                 cleanly (with its agent) on SIGTERM"
            )
        })?;
    if !status.success() {
        return Err(anyhow!(
            "systemctl restart {UNIT} failed ({status}); try with sudo, and see `verge system logs`"
        ))
        .context("restarting verged");
    }
    Ok(ExitCode::SUCCESS)
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match status.code().and_then(|c| u8::try_from(c).ok()) {
        Some(c) => ExitCode::from(c),
        None => ExitCode::from(1),
    }
}
