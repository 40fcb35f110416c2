//! `verge list`: the modules verged runs, as `iotedge list` shows them.

use std::time::{Duration, SystemTime};

use verge_core::time::Timestamp;
use verge_daemon::api::{AgentInfo, ExitStatus, ImagePulls, ModuleDetails};

use crate::mgmt::Mgmt;
use crate::ui;

/// How long ago `iso` was (`None` when absent or unparsable).
fn ago(iso: Option<&str>, now: SystemTime) -> Option<Duration> {
    let ts = Timestamp::parse(iso?).ok()?;
    let now_ms = Timestamp::from(now).as_millis();
    // A time slightly in the future (clock skew) reads as "just now".
    let ms = now_ms.saturating_sub(ts.as_millis()).max(0);
    Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

/// "Up 5 minutes", "Stopped 2 hours ago", "Failed (exit 1) 3 seconds ago", …
pub fn describe(m: &ModuleDetails, now: SystemTime) -> String {
    let st = &m.status;
    let exit = st.exit_status.as_ref();
    let exited_ago = ago(exit.map(|e| e.exit_time.as_str()), now);
    match st.runtime_status.status.as_str() {
        "running" => match ago(st.start_time.as_deref(), now) {
            Some(d) => format!("Up {}", ui::humanise(d)),
            None => "Up".to_owned(),
        },
        "stopped" => match exited_ago {
            Some(d) => format!("Stopped {} ago", ui::humanise(d)),
            None => "Stopped".to_owned(),
        },
        "failed" | "dead" => {
            let word = if st.runtime_status.status == "failed" {
                "Failed"
            } else {
                "Dead"
            };
            let code = exit
                .map(|e| format!(" (exit {})", e.status_code))
                .unwrap_or_default();
            match exited_ago {
                Some(d) => format!("{word}{code} {} ago", ui::humanise(d)),
                None => format!("{word}{code}"),
            }
        }
        DOWNLOADING => match st.runtime_status.description.as_deref() {
            Some(d) => format!("Downloading image ({d})"),
            None => "Downloading image".to_owned(),
        },
        _ => "Unknown".to_owned(),
    }
}

/// The status of a module whose image verged is still pulling (the
/// agent reports the same word).
const DOWNLOADING: &str = "downloading";

/// A row for each module whose image is being pulled and that has no
/// container yet; a hint for each that has one (an update, whose old
/// container runs until the new image is there).
pub fn with_pulls(modules: &mut Vec<ModuleDetails>, pulls: &ImagePulls) -> Vec<String> {
    let mut hints = Vec::new();
    for p in &pulls.pulls {
        for name in &p.modules {
            if modules.iter().any(|m| &m.name == name) {
                hints.push(format!(
                    "hint: {name}: downloading image {} ({})",
                    p.progress.image,
                    p.progress.describe()
                ));
                continue;
            }
            let mut row = ModuleDetails::bare(name, "", &p.progress.image, DOWNLOADING);
            row.status.runtime_status.description = Some(p.progress.describe());
            modules.push(row);
        }
    }
    modules.sort_by(|a, b| a.name.cmp(&b.name));
    hints
}

/// The JSON form of one row (`--output json`).
pub fn json_row(m: &ModuleDetails, now: SystemTime) -> serde_json::Value {
    serde_json::json!({
        "name": m.name,
        "status": m.status.runtime_status.status,
        "description": describe(m, now),
        "config": m.config.settings.image,
        "runtimeId": m.id,
        "startTime": m.status.start_time,
        "exitTime": m.status.exit_status.as_ref().map(|e| &e.exit_time),
        "exitCode": m.status.exit_status.as_ref().map(|e| &e.status_code),
        "hint": m.status.runtime_status.description,
    })
}

/// The table (`NAME STATUS DESCRIPTION CONFIG`).
pub fn render(modules: &[ModuleDetails], now: SystemTime, colour: bool) -> String {
    let rows: Vec<Vec<String>> = modules
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.status.runtime_status.status.clone(),
                describe(m, now),
                m.config.settings.image.clone(),
            ]
        })
        .collect();
    let style = |r: usize, c: usize, cell: &str| -> String {
        if !colour {
            return cell.to_owned();
        }
        match (r, c) {
            (0, _) => ui::paint(true, ui::Colour::Bold, cell),
            (_, 1) => {
                let c = match cell {
                    "running" => ui::Colour::Green,
                    "failed" | "dead" => ui::Colour::Red,
                    _ => ui::Colour::Yellow,
                };
                ui::paint(true, c, cell)
            }
            _ => cell.to_owned(),
        }
    };
    ui::table_styled(&["NAME", "STATUS", "DESCRIPTION", "CONFIG"], &rows, &style)
}

/// The agent verged supervises as a list row, the way `iotedge list` shows
/// edgeAgent: "backoff" (exited, restart pending) and "failed" (could not
/// start) both read as failed, with the last exit.
pub fn agent_row(a: &AgentInfo) -> ModuleDetails {
    let status = match a.status.as_str() {
        "running" => "running",
        "backoff" | "failed" => "failed",
        "stopped" => "stopped",
        _ => "unknown",
    };
    let mut row = ModuleDetails::bare(&a.name, &a.kind, &a.image, status);
    row.id = a.pid.map(|p| p.to_string()).unwrap_or_default();
    row.status.start_time = a.start_time.clone();
    row.status.exit_status = a.last_exit.as_ref().map(|e| ExitStatus {
        exit_time: e.time.clone(),
        status_code: match (e.code, e.signal) {
            (Some(c), _) => c.to_string(),
            (None, Some(s)) => format!("signal {s}"),
            (None, None) => "unknown".to_owned(),
        },
    });
    row
}

/// The modules plus the agent verged supervises, when the runtime does not
/// list it already (a process agent is verged's child, not a module).
pub async fn modules_and_agent(mgmt: &Mgmt) -> anyhow::Result<Vec<ModuleDetails>> {
    let mut modules = mgmt.modules().await?;
    // Best effort: an older verged has no agent endpoint; the modules still list.
    if let Ok(Some(agent)) = mgmt.agent().await
        && !modules.iter().any(|m| m.name == agent.name)
    {
        modules.push(agent_row(&agent));
        modules.sort_by(|a, b| a.name.cmp(&b.name));
    }
    Ok(modules)
}

/// `verge list [--output json]`.
pub async fn run(mgmt: &Mgmt, json: bool) -> anyhow::Result<()> {
    let mut modules = modules_and_agent(mgmt).await?;
    // Best effort, as for the agent: an older verged lists no pulls.
    let pull_hints = match mgmt.pulls().await {
        Ok(Some(pulls)) => with_pulls(&mut modules, &pulls),
        _ => Vec::new(),
    };
    let now = SystemTime::now();
    if json {
        let rows: Vec<_> = modules.iter().map(|m| json_row(m, now)).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", render(&modules, now, ui::colour_enabled()));
        for line in hints(&modules).into_iter().chain(pull_hints) {
            println!("{line}");
        }
    }
    Ok(())
}

/// One line per module whose status carries a hint from verged (createOptions
/// the process backend does not apply).
fn hints(modules: &[ModuleDetails]) -> Vec<String> {
    modules
        .iter()
        .filter(|m| m.status.runtime_status.status != DOWNLOADING)
        .filter_map(|m| {
            let d = m.status.runtime_status.description.as_deref()?;
            Some(format!("hint: {}: {d}", m.name))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use verge_daemon::api::AgentExit;

    #[test]
    fn agent_rows() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_714_564_800);
        let mut a = AgentInfo {
            name: "edgeAgent".into(),
            kind: "process".into(),
            image: "/usr/bin/verge-agent".into(),
            pid: Some(42),
            start_time: Some("2024-05-01T11:58:00Z".into()),
            restart_count: 2,
            last_exit: Some(AgentExit {
                time: "2024-05-01T11:57:58Z".into(),
                code: Some(7),
                signal: None,
            }),
            status: "running".into(),
        };
        let r = agent_row(&a);
        assert_eq!((r.name.as_str(), r.id.as_str()), ("edgeAgent", "42"));
        assert_eq!(describe(&r, now), "Up 2 minutes");
        assert_eq!(r.config.settings.image, "/usr/bin/verge-agent");
        a.status = "backoff".into();
        a.pid = None;
        assert_eq!(
            describe(&agent_row(&a), now),
            "Failed (exit 7) 2 minutes ago"
        );
        a.last_exit = Some(AgentExit {
            time: "2024-05-01T11:59:00Z".into(),
            code: None,
            signal: Some(9),
        });
        assert_eq!(
            describe(&agent_row(&a), now),
            "Failed (exit signal 9) 1 minute ago"
        );
        a.status = "starting".into();
        assert_eq!(describe(&agent_row(&a), now), "Unknown");
    }

    fn module(status: &str, start: Option<&str>, exit: Option<(&str, &str)>) -> ModuleDetails {
        let mut m = ModuleDetails::bare("m", "process", "/bin/true", status);
        m.id = "1".into();
        m.status.start_time = start.map(str::to_owned);
        m.status.exit_status = exit.map(|(t, c)| ExitStatus {
            exit_time: t.into(),
            status_code: c.into(),
        });
        m
    }

    #[test]
    fn pulls_show_as_rows_or_hints() {
        use verge_core::pull::PullStatus;
        use verge_daemon::api::ImagePull;
        let mut modules = vec![module("running", None, None)];
        let pulls = ImagePulls {
            pulls: vec![ImagePull {
                progress: PullStatus {
                    image: "reg:5000/big:2".into(),
                    layers: 4,
                    layers_done: 1,
                    downloaded_bytes: 3_000_000,
                    total_bytes: 12_000_000,
                },
                modules: vec!["m".into(), "new".into()],
            }],
        };
        let lines = with_pulls(&mut modules, &pulls);
        assert_eq!(
            lines,
            ["hint: m: downloading image reg:5000/big:2 (1 of 4 layers, 3.0 of 12.0 MB)"]
        );
        assert_eq!(modules.len(), 2);
        let row = &modules[1];
        assert_eq!(
            (row.name.as_str(), row.status.runtime_status.status.as_str()),
            ("new", "downloading")
        );
        assert_eq!(row.config.settings.image, "reg:5000/big:2");
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_714_564_800);
        assert_eq!(
            describe(row, now),
            "Downloading image (1 of 4 layers, 3.0 of 12.0 MB)"
        );
        assert!(hints(&modules).is_empty(), "no second line for the row");
    }

    #[test]
    fn descriptions() {
        // 2024-05-01T12:00:00Z
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_714_564_800);
        let d = |m| describe(&m, now);
        assert_eq!(
            d(module("running", Some("2024-05-01T11:55:00Z"), None)),
            "Up 5 minutes"
        );
        assert_eq!(d(module("running", None, None)), "Up");
        assert_eq!(
            d(module(
                "stopped",
                None,
                Some(("2024-05-01T10:00:00.000Z", "0"))
            )),
            "Stopped 2 hours ago"
        );
        assert_eq!(
            d(module("failed", None, Some(("2024-05-01T11:59:57Z", "1")))),
            "Failed (exit 1) 3 seconds ago"
        );
        assert_eq!(d(module("unknown", None, None)), "Unknown");
        // Clock skew: a start in the future is "just now", not a panic.
        assert_eq!(
            d(module("running", Some("2024-05-01T12:00:09Z"), None)),
            "Up less than a second"
        );
    }
}
