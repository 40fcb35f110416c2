//! `verge support-bundle`: everything needed to diagnose a device, in one
//! `.tar.gz`, without its secrets (no device key, connection-string key,
//! SAS signature or registry password).

use std::path::Path;
use std::time::Duration;

use verge_core::time::Timestamp;
pub use verge_diag::bundle::write_tar_gz;
use verge_diag::bundle::{REDACTED, is_secret_name, redact_modules, safe_name, scrub};

use crate::check::{self, Inputs};
use crate::mgmt::{Mgmt, enc};

/// What goes in the bundle.
pub struct Options<'a> {
    /// Config file (redacted into the bundle).
    pub config_path: &'a Path,
    /// `-H`, when given.
    pub host: Option<&'a str>,
    /// The management API.
    pub mgmt: Mgmt,
    /// Logs since (module logs and verged's journal).
    pub since: Timestamp,
    /// Logs until (`None`: up to now).
    pub until: Option<Timestamp>,
}

fn redact_toml(v: &mut toml::Value) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                if let ("connection_string", toml::Value::String(s)) = (k.as_str(), &mut *v) {
                    // The device's IoT Hub connection string: hub and device
                    // names help support; the key goes.
                    *s = scrub(s);
                } else if is_secret_name(k) {
                    *v = toml::Value::String(REDACTED.to_owned());
                } else {
                    redact_toml(v);
                }
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(redact_toml),
        toml::Value::String(s) => *s = scrub(s),
        _ => {}
    }
}

/// The config file with every secret replaced by `<redacted>`. The file is
/// re-written from its parsed form (comments are lost) so nothing the
/// redaction did not understand slips through; a file that is not TOML is
/// left out.
pub fn redact_config(text: &str) -> String {
    match text.parse::<toml::Table>() {
        Ok(t) => {
            let mut v = toml::Value::Table(t);
            redact_toml(&mut v);
            let body =
                toml::to_string_pretty(&v).unwrap_or_else(|e| format!("# cannot print: {e}\n"));
            format!(
                "# Redacted by `verge support-bundle`: secrets are replaced by {REDACTED}.\n{body}"
            )
        }
        Err(e) => format!(
            "# The config file is not valid TOML ({}); it is left out so no secret leaks.\n",
            e.message()
        ),
    }
}

async fn journal(unit: &str, since: Timestamp, until: Option<Timestamp>) -> String {
    let since_arg = format!("@{}", since.as_millis() / 1000);
    let mut args = vec![
        "-u".to_owned(),
        unit.to_owned(),
        "--no-pager".to_owned(),
        "--since".to_owned(),
        since_arg,
    ];
    if let Some(u) = until {
        args.push("--until".to_owned());
        args.push(format!("@{}", u.as_millis() / 1000));
    }
    let cmd = tokio::process::Command::new("journalctl")
        .args(&args)
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(Duration::from_secs(30), cmd).await {
        Ok(Ok(out)) => {
            let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
            if !out.status.success() || s.trim().is_empty() {
                s.push_str(&format!(
                    "\n# journalctl -u {unit} ({}): {}\n# verged logs to stderr; if it does not run \
                     under systemd, its logs are wherever its stderr goes.\n",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            s
        }
        Ok(Err(e)) => format!(
            "# journalctl is not available ({e}).\n# verged logs to stderr; without systemd its \
             logs are wherever its stderr goes.\n"
        ),
        Err(_) => "# journalctl did not finish within 30 s.\n".to_owned(),
    }
}

/// verged's own log file (rotated files oldest first), the lines from
/// `since` on; `None` when there is none (verged runs under the journal).
/// Lines start with their time; a line that does not (a continuation)
/// goes with the one before.
fn read_log_file(path: &Path, since: Timestamp, until: Option<Timestamp>) -> Option<Vec<u8>> {
    let mut found = false;
    let mut out = Vec::new();
    // Lines without a leading time (JSON lines) are all kept.
    let mut keep = true;
    for i in (0..10).rev() {
        let Ok(data) = std::fs::read(verge_log::LogFile::rotated_path(path, i)) else {
            continue;
        };
        found = true;
        for line in data.split_inclusive(|b| *b == b'\n') {
            let head = line.split(|b| *b == b' ').next().unwrap_or_default();
            if let Some(t) = std::str::from_utf8(head)
                .ok()
                .and_then(|h| Timestamp::parse(h).ok())
            {
                keep = t >= since && until.is_none_or(|u| t < u);
            }
            if keep {
                out.extend_from_slice(line);
            }
        }
    }
    found.then_some(out)
}

/// Collects the bundle's files: (path in the archive, contents).
pub async fn collect(o: &Options<'_>) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut notes = Vec::new();
    files.push((
        "version.txt".to_owned(),
        format!(
            "verge {}\ncollected {}\nmanagement socket {} ({})\n",
            env!("CARGO_PKG_VERSION"),
            Timestamp::now().to_iso8601(),
            o.mgmt.uri(),
            o.mgmt.origin
        )
        .into_bytes(),
    ));

    match o.mgmt.call("GET", "/systeminfo").await {
        Ok(b) => files.push(("systeminfo.json".to_owned(), b.to_vec())),
        Err(e) => notes.push(format!("systeminfo: {e:#}")),
    }
    // Verge extensions; an older verged answers 404, noted in errors.txt.
    for (path, file) in [
        ("/systeminfo/resources", "resources.json"),
        ("/systeminfo/agent", "agent.json"),
        ("/certificates", "certificates.json"),
    ] {
        match o.mgmt.get_json::<serde_json::Value>(path).await {
            Ok(v) => files.push((
                file.to_owned(),
                serde_json::to_vec_pretty(&v).unwrap_or_default(),
            )),
            Err(e) => notes.push(format!("{path}: {e:#}")),
        }
    }

    // A process agent is verged's child, not a module: its log is read by
    // its name all the same.
    let agent = o.mgmt.agent().await.ok().flatten().map(|a| a.name);
    match o.mgmt.get_json::<serde_json::Value>("/modules").await {
        Ok(v) => {
            let mut names: Vec<String> = v["modules"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|m| m["name"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(a) = agent
                && !names.contains(&a)
            {
                names.push(a);
            }
            let v = redact_modules(v);
            files.push((
                "modules.json".to_owned(),
                serde_json::to_vec_pretty(&v).unwrap_or_default(),
            ));
            for name in names {
                let mut path = format!(
                    "/modules/{}/logs?timestamps=true&since={}",
                    enc(&name),
                    o.since.to_iso8601()
                );
                if let Some(u) = o.until {
                    path.push_str(&format!("&until={}", u.to_iso8601()));
                }
                let mut buf = Vec::new();
                if let Err(e) = o.mgmt.stream(&path, &mut buf).await {
                    buf.extend_from_slice(format!("\n# cannot read the logs: {e:#}\n").as_bytes());
                }
                files.push((format!("logs/{}_log.txt", safe_name(&name)), buf));
            }
        }
        Err(e) => notes.push(format!("modules: {e:#}")),
    }

    let verged_log = match verge_daemon::config::Config::load(o.config_path) {
        Ok(c) => {
            let path = verge_daemon::daemon::verged_log_path(&c.homedir);
            match read_log_file(&path, o.since, o.until) {
                Some(text) => text,
                None => journal("verged", o.since, o.until).await.into_bytes(),
            }
        }
        Err(_) => journal("verged", o.since, o.until).await.into_bytes(),
    };
    files.push(("logs/verged.txt".to_owned(), verged_log));

    let report = check::run_checks(&Inputs {
        config_path: o.config_path,
        host: o.host,
    })
    .await;
    files.push((
        "check.json".to_owned(),
        serde_json::to_vec_pretty(&report).unwrap_or_default(),
    ));

    match std::fs::read_to_string(o.config_path) {
        Ok(text) => files.push(("config.toml".to_owned(), redact_config(&text).into_bytes())),
        Err(e) => notes.push(format!("config {}: {e}", o.config_path.display())),
    }

    if !notes.is_empty() {
        files.push((
            "errors.txt".to_owned(),
            (notes.join("\n") + "\n").into_bytes(),
        ));
    }
    // Last line of defence: whatever a module or verged printed.
    for (_, data) in &mut files {
        if let Ok(text) = std::str::from_utf8(data) {
            let clean = scrub(text);
            if clean != *text {
                *data = clean.into_bytes();
            }
        }
    }
    files
}

/// Default file name: `support_bundle_<UTC timestamp>.tar.gz`.
pub fn default_name() -> String {
    let ts = Timestamp::now().to_iso8601();
    let compact: String = ts
        .chars()
        .take(19)
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .collect();
    format!("support_bundle_{compact}Z.tar.gz")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

    #[test]
    fn verged_log_file_by_time_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("verged.log");
        std::fs::write(
            verge_log::LogFile::rotated_path(&path, 1),
            "2026-01-01T00:00:00.000001Z  INFO old\n",
        )
        .unwrap();
        std::fs::write(
            &path,
            "2026-01-02T00:00:00.000001Z  INFO in window\n  continued\n\
             2026-01-03T00:00:00.000001Z  INFO too late\n",
        )
        .unwrap();
        let t = |s: &str| Timestamp::parse(s).unwrap();
        let got = read_log_file(
            &path,
            t("2026-01-01T12:00:00Z"),
            Some(t("2026-01-02T12:00:00Z")),
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "2026-01-02T00:00:00.000001Z  INFO in window\n  continued\n"
        );
        let all = read_log_file(&path, t("2025-01-01T00:00:00Z"), None).unwrap();
        assert!(
            String::from_utf8(all)
                .unwrap()
                .starts_with("2026-01-01T00:00:00.000001Z  INFO old\n")
        );
        assert!(
            read_log_file(
                &dir.path().join("none.log"),
                t("2025-01-01T00:00:00Z"),
                None
            )
            .is_none()
        );
    }

    #[test]
    fn redacts_the_config() {
        let text = format!(
            r#"hostname = "edge"
[provisioning]
source = "manual"
connection_string = "HostName=hub.example.net;DeviceId=dev1;SharedAccessKey={KEY}"
[provisioning.authentication]
method = "sas"
device_id_pk = {{ value = "{KEY}" }}
[agent]
name = "edgeAgent"
type = "docker"
[agent.config]
image = "a"
[agent.config.auth]
serveraddress = "r"
username = "u"
password = "p4ss"
[agent.env]
RuntimeLogLevel = "debug"
MY_API_TOKEN = "t0k"
"#
        );
        let out = redact_config(&text);
        assert!(!out.contains(KEY), "{out}");
        assert!(!out.contains("SharedAccessKey"), "{out}");
        assert!(!out.contains("p4ss") && !out.contains("t0k"), "{out}");
        assert!(out.contains("hostname = \"edge\""), "{out}");
        assert!(out.contains("debug"), "{out}");
        assert!(out.contains("username = \"u\""), "{out}");
        assert!(redact_config("not = toml = x").contains("left out"));
    }

    #[test]
    fn default_names() {
        assert!(default_name().starts_with("support_bundle_2"));
        assert!(default_name().ends_with("Z.tar.gz"));
    }
}
