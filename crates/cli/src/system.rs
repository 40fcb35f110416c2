//! `verge system status|logs|restart|stop|reprovision|set-log-level`:
//! verged itself.
//!
//! verged runs as the systemd unit `verged`; its logs go to the journal.
//! Elsewhere it also writes them to `<homedir>/logs/verged.log` (rotated),
//! which `verge system logs` reads then. A process agent's output is kept
//! by verged like a module's (`verge logs edgeAgent`).
//! verged's management API reports the host (`/systeminfo`), the modules,
//! and the agent it supervises (`/systeminfo/agent`: a process agent is
//! verged's own child, outside the module runtime, so only verged knows it).

use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitCode};

use anyhow::{Context as _, anyhow};
use std::future::Future;
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

/// `verge system logs [-f] [-- journalctl args]`: the journal when verged
/// runs as the systemd unit, else the log file verged keeps beside it.
pub fn logs(follow: bool, extra: &[String], config_path: &Path) -> anyhow::Result<ExitCode> {
    let file = Config::load(config_path)
        .ok()
        .map(|c| verge_daemon::daemon::verged_log_path(&c.homedir));
    let under_systemd = unit_state() == "active";
    if let Some(file) = file.filter(|f| !under_systemd && f.exists()) {
        if !extra.is_empty() {
            return Err(anyhow!(
                "{} are journalctl arguments, but verged does not run as the systemd unit {UNIT} \
                 here: its log is the file {}",
                extra.join(" "),
                file.display()
            ));
        }
        let mut out = std::io::stdout().lock();
        print_log_file(&file, follow, &mut out)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut cmd = Command::new("journalctl");
    cmd.args(["-u", UNIT, "--no-pager"]);
    if follow {
        cmd.arg("--follow");
    }
    cmd.args(extra);
    let status = cmd.status().map_err(|e| {
        anyhow!(
            "cannot run journalctl ({e}). Without systemd, verged keeps its log in \
             <homedir>/logs/verged.log; pass --config with verged's config file"
        )
    })?;
    Ok(exit_code(status))
}

/// Every line of a rotated log (oldest file first); with `follow`, then
/// new lines as they are written, across rotations, until interrupted.
pub fn print_log_file(path: &Path, follow: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    use std::os::unix::fs::MetadataExt as _;
    for i in (1..10).rev() {
        let p = verge_log::LogFile::rotated_path(path, i);
        if let Ok(data) = std::fs::read(&p)
            && out.write_all(&data).is_err()
        {
            return Ok(());
        }
    }
    let open = || std::fs::File::open(path).with_context(|| format!("reading {}", path.display()));
    let mut file = open()?;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        file.read_to_end(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        // A closed pipe (`verge system logs | head`) ends the command quietly.
        if out.write_all(&buf).and_then(|()| out.flush()).is_err() || !follow {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
        // Rotated away (another inode now) or truncated: start on the new file.
        let pos = file.stream_position().unwrap_or(0);
        let current = file.metadata().map(|m| m.ino()).ok();
        match std::fs::metadata(path) {
            Ok(m) if Some(m.ino()) != current || m.len() < pos => {
                // What the old file got after our last read first.
                buf.clear();
                let _ = file.read_to_end(&mut buf);
                let _ = out.write_all(&buf);
                file = open()?;
            }
            _ => {
                file.seek(SeekFrom::Start(pos))
                    .with_context(|| format!("reading {}", path.display()))?;
            }
        }
    }
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

/// How long verged may take to stop or to come back (it gives its agent 10 s).
const WAIT_FOR_VERGED: std::time::Duration = std::time::Duration::from_secs(60);

/// Polls `f` every 200 ms until it is true or [`WAIT_FOR_VERGED`] passed.
async fn wait_until<F: Future<Output = bool>>(mut f: impl FnMut() -> F) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT_FOR_VERGED;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    false
}

/// `verge system stop`: `systemctl stop verged` under systemd, else through
/// verged's management API. Modules keep running (as with iotedge).
pub async fn stop(host: Option<&str>, explicit_config: Option<&Path>) -> anyhow::Result<ExitCode> {
    if host.is_none() && unit_state() == "active" {
        let status = Command::new("systemctl")
            .args(["stop", UNIT])
            .status()
            .map_err(|e| anyhow!("cannot run systemctl ({e})"))?;
        if !status.success() {
            return Err(anyhow!(
                "systemctl stop {UNIT} failed ({status}); try with sudo"
            ));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mgmt = Mgmt::resolve(host, explicit_config)?;
    let body = mgmt
        .call_json("POST", "/system/stop", &serde_json::json!({}))
        .await
        .context("asking verged to stop")?;
    eprintln!("{}", Mgmt::message(&body));
    if !wait_until(|| async { mgmt.system_info().await.is_err() }).await {
        return Err(anyhow!(
            "verged still answers {WAIT_FOR_VERGED:?} after it was asked to stop"
        ));
    }
    println!("verged stopped.");
    Ok(ExitCode::SUCCESS)
}

/// `verge system reprovision`: verged re-runs provisioning (manual: the
/// identity from the config file as it is now) and starts again.
pub async fn reprovision(
    host: Option<&str>,
    explicit_config: Option<&Path>,
    config_path: &Path,
) -> anyhow::Result<ExitCode> {
    // Say what is wrong with the file here; verged checks it again (it may
    // read another file than this one).
    if let Err(e) = Config::load(config_path)
        && !e.message.starts_with("cannot read")
        && e.message != verge_daemon::config::NOT_PROVISIONED
    {
        return Err(anyhow!("cannot reprovision: {e}"));
    }
    let mgmt = Mgmt::resolve(host, explicit_config)?;
    let before = mgmt.agent().await.ok().flatten().and_then(|a| a.start_time);
    let body = mgmt
        .call_json("POST", "/system/reprovision", &serde_json::json!({}))
        .await
        .context("reprovisioning")?;
    println!("{}", Mgmt::message(&body));
    // Back once its agent runs again, started by the new run.
    let back = wait_until(|| async {
        matches!(mgmt.agent().await, Ok(Some(a)) if a.status == "running" && a.start_time != before)
    })
    .await;
    if !back {
        return Err(anyhow!(
            "verged did not come back within {WAIT_FOR_VERGED:?}; see `verge system logs`"
        ));
    }
    println!("verged runs again with the new identity.");
    Ok(ExitCode::SUCCESS)
}

/// `verge system set-log-level LEVEL`: verged's and the agent's level now
/// (through the management API), and in the config file for later starts
/// (`log_level` and `[agent.env] RuntimeLogLevel`).
pub async fn set_log_level(
    level: &str,
    host: Option<&str>,
    explicit_config: Option<&Path>,
    config_path: &Path,
) -> anyhow::Result<ExitCode> {
    verge_log::runtime_log_level(level).map_err(|e| anyhow!("{e}"))?;
    let level = level.trim().to_ascii_lowercase();
    let live = match Mgmt::resolve(host, explicit_config) {
        Ok(mgmt) => mgmt
            .call_json(
                "PUT",
                "/system/loglevel",
                &serde_json::json!({ "level": level }),
            )
            .await
            .map(|b| Mgmt::message(&b)),
        Err(e) => Err(e),
    };
    let persisted = persist_log_level(config_path, &level);
    match (&live, &persisted) {
        (Ok(m), _) => println!("{m}"),
        (Err(e), Ok(())) => println!(
            "verged is not reachable ({}); the level applies when it starts",
            format!("{e:#}").lines().next().unwrap_or_default()
        ),
        (Err(_), Err(_)) => {}
    }
    match persisted {
        Ok(()) => println!("Saved in {}.", config_path.display()),
        Err(e) => {
            return Err(e.context(match live {
                Ok(_) => "the level is in force until verged restarts, but saving it failed",
                Err(_) => "neither verged nor the config file could be changed",
            }));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `log_level` and `[agent.env] RuntimeLogLevel` into the config
/// file, keeping its comments and layout.
pub fn persist_log_level(config_path: &Path, level: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let updated = with_log_level(&text, level)
        .with_context(|| format!("{} is not valid TOML", config_path.display()))?;
    crate::write_atomically(config_path, &updated)
}

/// The config text with the log level set (see [`persist_log_level`]).
pub fn with_log_level(text: &str, level: &str) -> anyhow::Result<String> {
    let mut doc: toml_edit::DocumentMut = text.parse()?;
    // toml_edit writes top-level values before every table.
    doc.insert("log_level", toml_edit::value(level));
    let agent = doc
        .entry("agent")
        .or_insert_with(toml_edit::table)
        .as_table_mut()
        .ok_or_else(|| anyhow!("`agent` is not a table"))?;
    let env = agent
        .entry("env")
        .or_insert_with(toml_edit::table)
        .as_table_mut()
        .ok_or_else(|| anyhow!("`agent.env` is not a table"))?;
    env.insert("RuntimeLogLevel", toml_edit::value(level));
    Ok(doc.to_string())
}

fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match status.code().and_then(|c| u8::try_from(c).ok()) {
        Some(c) => ExitCode::from(c),
        None => ExitCode::from(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_level_goes_into_the_config_keeping_it_valid() {
        let text = "# mine\nhostname = \"edge1\"\nhomedir = \"/h\"\n\n[provisioning]\nsource = \"manual\"\n\
                    connection_string = \"HostName=h.net;DeviceId=d;SharedAccessKey=AAECAwQFBgcICQoLDA0ODw==\"\n\n\
                    [agent]\nname = \"edgeAgent\"\ntype = \"process\"\n[agent.config]\nimage = \"/bin/true\"\n";
        let out = with_log_level(text, "debug").unwrap();
        assert!(out.starts_with("# mine\n"), "{out}");
        let c = Config::parse(&out, Path::new("/etc/verge/config.toml")).unwrap();
        assert_eq!(c.log_level.as_deref(), Some("debug"));
        assert_eq!(c.agent.env["RuntimeLogLevel"], "debug");
        // Again, with both present: replaced, not duplicated.
        let again = with_log_level(&out, "warning").unwrap();
        let c = Config::parse(&again, Path::new("/etc/verge/config.toml")).unwrap();
        assert_eq!(c.log_level.as_deref(), Some("warning"));
        assert_eq!(c.agent.env["RuntimeLogLevel"], "warning");
        assert_eq!(again.matches("log_level").count(), 1, "{again}");
    }
}
