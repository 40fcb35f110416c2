//! `verge check`: configuration and connectivity checks, each ✓ / ‼ / ×
//! with details, and a summary. Any × makes the exit code non-zero.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use time::OffsetDateTime;
use verge_daemon::config::{Config, EdgeCaConfig};

use crate::mgmt::{self, Mgmt};

mod certs;
mod network;
mod upstream;
use crate::ui::{self, Colour};
use certs::{cert_check, issued_check};
use upstream::{Upstream, clock_skew_check, upstream_check};

/// Warn when less than this share of the storage disk is free.
const DISK_WARN_PERCENT: f64 = 10.0;
/// How long the Docker ping may take.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(3);

/// A check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// ✓
    Ok,
    /// ‼
    Warning,
    /// ×
    Error,
    /// Not applicable, or depends on a check that failed.
    Skipped,
}

/// One check.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Stable id.
    pub id: &'static str,
    /// Section ("Configuration checks" / "Connectivity checks").
    pub section: &'static str,
    /// What is checked.
    pub description: &'static str,
    /// The result.
    pub result: Outcome,
    /// What was found, and what to do about it.
    pub details: Vec<String>,
}

/// All checks and the counts.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// In the order run.
    pub checks: Vec<Check>,
    /// Counts per outcome.
    pub summary: Summary,
}

/// Counts per outcome.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    /// ✓
    pub ok: usize,
    /// ‼
    pub warnings: usize,
    /// ×
    pub errors: usize,
    /// Not run.
    pub skipped: usize,
}

const CONFIG: &str = "Configuration checks";
const CONNECT: &str = "Connectivity checks";

struct Builder {
    checks: Vec<Check>,
}

/// Two connectivity checks that need the upstream settings: id, description.
const CLOCK_SKEW: (&str, &str) = ("clock-skew", "system clock agrees with the IoT hub's");
const PARENT_CONNECTIVITY: (&str, &str) = (
    "parent-connectivity",
    "parent edge device reachable, its TLS certificate verified",
);

impl Builder {
    /// Connectivity checks that cannot run, with why.
    fn skip(&mut self, checks: &[(&'static str, &'static str)], why: &str) {
        for (id, description) in checks {
            self.add(
                id,
                CONNECT,
                description,
                Outcome::Skipped,
                vec![why.to_owned()],
            );
        }
    }

    fn add(
        &mut self,
        id: &'static str,
        section: &'static str,
        description: &'static str,
        result: Outcome,
        details: Vec<String>,
    ) {
        self.checks.push(Check {
            id,
            section,
            description,
            result,
            details,
        });
    }
}

/// Every check `verge check` runs: id, section, description
/// (`verge check-list`). A test keeps it in step with [`run_checks`].
pub const CATALOGUE: &[(&str, &str, &str)] = &[
    ("config-well-formed", CONFIG, "config file is valid"),
    ("clock-sanity", CONFIG, "system clock is plausible"),
    ("edge-ca-cert-expiry", CONFIG, "edge CA certificate"),
    (
        "trust-bundle-cert-expiry",
        CONFIG,
        "trust bundle certificate",
    ),
    (
        "storage-disk-space",
        CONFIG,
        "free disk space of the storage directory",
    ),
    (
        "connect-management-uri",
        CONNECT,
        "verged's management socket answers",
    ),
    ("verged-version", CONNECT, "verged and verge versions match"),
    (
        "issued-certs-expiry",
        CONNECT,
        "certificates issued by the edge CA",
    ),
    ("container-engine", CONNECT, "container engine answers"),
    (
        "modules-reach-edgehub",
        CONNECT,
        "container modules can reach edgeHub",
    ),
    (
        "upstream-connectivity",
        CONNECT,
        "IoT hub reachable, its TLS certificate verified",
    ),
    (
        "clock-skew",
        CONNECT,
        "system clock agrees with the IoT hub's",
    ),
    (
        "parent-connectivity",
        CONNECT,
        "parent edge device reachable, its TLS certificate verified",
    ),
];

/// `verge check-list`: the checks, by section.
pub fn render_list(colour: bool) -> String {
    let mut out = String::new();
    let mut section = "";
    for (id, sec, description) in CATALOGUE {
        if *sec != section {
            if !section.is_empty() {
                out.push('\n');
            }
            section = sec;
            out.push_str(&ui::paint(colour, Colour::Bold, sec));
            out.push('\n');
            out.push_str(&"-".repeat(sec.chars().count()));
            out.push('\n');
        }
        out.push_str(&format!("{id:<26} {description}\n"));
    }
    out
}

/// What the checks need to know.
pub struct Inputs<'a> {
    /// The config file.
    pub config_path: &'a Path,
    /// `-H`, when given.
    pub host: Option<&'a str>,
}

/// Runs every check.
pub async fn run_checks(inputs: &Inputs<'_>) -> Report {
    let mut b = Builder { checks: Vec::new() };
    let now = SystemTime::now();

    // Configuration.
    let config = match Config::load(inputs.config_path) {
        Ok(c) => {
            b.add(
                "config-well-formed",
                CONFIG,
                "config file is valid",
                Outcome::Ok,
                vec![format!("{}", inputs.config_path.display())],
            );
            Some(c)
        }
        Err(e) => {
            let mut details = vec![e.to_string()];
            if e.message.contains("Permission denied") {
                details.push(
                    "the config file holds the device key (mode 0600): run `sudo verge check`"
                        .to_owned(),
                );
            } else {
                details.push(format!(
                    "fix the file, or create one with `verge config mp`; verify with `verged --config {} --check`",
                    inputs.config_path.display()
                ));
            }
            b.add(
                "config-well-formed",
                CONFIG,
                "config file is valid",
                Outcome::Error,
                details,
            );
            None
        }
    };

    clock_check(&mut b, now);

    match &config {
        Some(c) => {
            let (path, auto) = match &c.edge_ca {
                EdgeCaConfig::Files { cert, .. } => (cert.clone(), false),
                EdgeCaConfig::AutoGenerated { .. } => (c.homedir.join("certs/edge-ca.pem"), true),
            };
            cert_check(
                &mut b,
                "edge-ca-cert-expiry",
                "edge CA certificate",
                &path,
                auto,
                now,
            );
            if let Some(tb) = &c.trust_bundle_cert {
                cert_check(
                    &mut b,
                    "trust-bundle-cert-expiry",
                    "trust bundle certificate",
                    tb,
                    false,
                    now,
                );
            }
            disk_check(&mut b, &c.homedir);
        }
        None => {
            for (id, d) in [
                ("edge-ca-cert-expiry", "edge CA certificate"),
                (
                    "storage-disk-space",
                    "free disk space of the storage directory",
                ),
            ] {
                b.add(
                    id,
                    CONFIG,
                    d,
                    Outcome::Skipped,
                    vec!["needs a valid config file".to_owned()],
                );
            }
        }
    }

    // Connectivity.
    let target = match (inputs.host, &config) {
        (Some(h), _) => Mgmt::resolve(Some(h), None).ok(),
        (None, Some(c)) => Some(Mgmt {
            socket: c.listen.management_socket.clone(),
            origin: format!("from {}", inputs.config_path.display()),
        }),
        (None, None) => Some(Mgmt {
            socket: mgmt::default_socket(),
            origin: "the default".to_owned(),
        }),
    };
    let info = match &target {
        Some(m) => match m.system_info().await {
            Ok(info) => {
                b.add(
                    "connect-management-uri",
                    CONNECT,
                    "verged's management socket answers",
                    Outcome::Ok,
                    vec![format!("{} ({})", m.uri(), info.server_version)],
                );
                Some(info)
            }
            Err(e) => {
                b.add(
                    "connect-management-uri",
                    CONNECT,
                    "verged's management socket answers",
                    Outcome::Error,
                    format!("{e:#}").lines().map(str::to_owned).collect(),
                );
                None
            }
        },
        None => {
            b.add(
                "connect-management-uri",
                CONNECT,
                "verged's management socket answers",
                Outcome::Error,
                vec!["-H must be unix:///absolute/path".to_owned()],
            );
            None
        }
    };
    match &info {
        Some(i) if i.version == env!("CARGO_PKG_VERSION") => b.add(
            "verged-version",
            CONNECT,
            "verged and verge versions match",
            Outcome::Ok,
            vec![format!("{}", i.version)],
        ),
        Some(i) => b.add(
            "verged-version",
            CONNECT,
            "verged and verge versions match",
            Outcome::Warning,
            vec![format!(
                "verged is {}, this verge is {}: install matching versions",
                i.version,
                env!("CARGO_PKG_VERSION")
            )],
        ),
        None => b.add(
            "verged-version",
            CONNECT,
            "verged and verge versions match",
            Outcome::Skipped,
            vec!["verged is not reachable".to_owned()],
        ),
    }

    match &target {
        Some(m) if info.is_some() => issued_check(&mut b, m, OffsetDateTime::from(now)).await,
        _ => b.add(
            "issued-certs-expiry",
            CONNECT,
            "certificates issued by the edge CA",
            Outcome::Skipped,
            vec!["verged is not reachable".to_owned()],
        ),
    }

    if let Some(c) = &config {
        match &c.moby_runtime {
            Some(moby) => {
                docker_check(
                    &mut b,
                    &moby.uri,
                    info.as_ref().map(|i| i.server_version.as_str()),
                )
                .await
            }
            None => b.add(
                "container-engine",
                CONNECT,
                "container engine answers",
                Outcome::Skipped,
                vec!["no [moby_runtime] in the config: modules run as processes".to_owned()],
            ),
        }
        let (result, details) = match (&c.moby_runtime, &target) {
            (None, _) => (
                Outcome::Skipped,
                vec!["modules run as processes: they reach edgeHub on this machine".to_owned()],
            ),
            (Some(moby), Some(m)) if info.is_some() => match m.modules().await {
                Ok(list) => network::verdict(&list, &moby.network, &c.hostname),
                Err(e) => (Outcome::Error, vec![format!("listing the modules: {e:#}")]),
            },
            (Some(_), _) => (Outcome::Skipped, vec!["verged is not reachable".to_owned()]),
        };
        b.add(
            "modules-reach-edgehub",
            CONNECT,
            "container modules can reach edgeHub",
            result,
            details,
        );
        match Upstream::from_config(c) {
            Err(e) => {
                b.add(
                    "upstream-connectivity",
                    CONNECT,
                    "IoT hub reachable, its TLS certificate verified",
                    Outcome::Error,
                    vec![e],
                );
                b.skip(
                    &[CLOCK_SKEW, PARENT_CONNECTIVITY],
                    "the upstream settings are invalid",
                );
            }
            Ok(up) => {
                upstream_check(
                    &mut b,
                    "upstream-connectivity",
                    "IoT hub reachable, its TLS certificate verified",
                    &up.hub,
                    &up,
                    &format!("IoT hub ({})", up.protocol()),
                )
                .await;
                clock_skew_check(&mut b, &up).await;
                match &c.parent_hostname {
                    // A nested edge talks to its parent's edge hub, whose edge CA
                    // the trust bundle holds.
                    Some(parent) => {
                        upstream_check(
                            &mut b,
                            "parent-connectivity",
                            "parent edge device reachable, its TLS certificate verified",
                            parent,
                            &up,
                            &format!("parent edge device ({})", up.protocol()),
                        )
                        .await
                    }
                    None => b.add(
                        "parent-connectivity",
                        CONNECT,
                        "parent edge device reachable, its TLS certificate verified",
                        Outcome::Skipped,
                        vec!["not a nested edge (no parent_hostname)".to_owned()],
                    ),
                }
            }
        }
    } else {
        b.skip(
            &[
                ("container-engine", "container engine answers"),
                (
                    "modules-reach-edgehub",
                    "container modules can reach edgeHub",
                ),
                (
                    "upstream-connectivity",
                    "IoT hub reachable, its TLS certificate verified",
                ),
                CLOCK_SKEW,
                PARENT_CONNECTIVITY,
            ],
            "needs a valid config file",
        );
    }

    let mut summary = Summary::default();
    for c in &b.checks {
        match c.result {
            Outcome::Ok => summary.ok += 1,
            Outcome::Warning => summary.warnings += 1,
            Outcome::Error => summary.errors += 1,
            Outcome::Skipped => summary.skipped += 1,
        }
    }
    Report {
        checks: b.checks,
        summary,
    }
}

fn build_time() -> SystemTime {
    let secs = env!("VERGE_BUILD_EPOCH").parse::<u64>().unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn fmt_time(t: SystemTime) -> String {
    verge_core::time::Timestamp::from(t).to_iso8601()
}

fn fmt_odt(t: OffsetDateTime) -> String {
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    i64::try_from(ms).map_or_else(
        |_| t.to_string(),
        |ms| verge_core::time::Timestamp::from_millis(ms).to_iso8601(),
    )
}

fn clock_check(b: &mut Builder, now: SystemTime) {
    let built = build_time();
    let (result, detail) = if now < built {
        (
            Outcome::Error,
            format!(
                "the system clock says {}, before this verge was built ({}): set the time \
                 (timedatectl set-ntp true); certificates and SAS tokens fail with a wrong clock",
                fmt_time(now),
                fmt_time(built)
            ),
        )
    } else {
        (
            Outcome::Ok,
            format!(
                "{} (after the build date {})",
                fmt_time(now),
                fmt_time(built)
            ),
        )
    };
    b.add(
        "clock-sanity",
        CONFIG,
        "system clock is plausible",
        result,
        vec![detail],
    );
}

/// The nearest existing directory at or above `p` (the homedir may not exist yet).
fn existing_ancestor(p: &Path) -> PathBuf {
    p.ancestors()
        .find(|a| a.exists())
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
}

fn disk_check(b: &mut Builder, dir: &Path) {
    let at = existing_ancestor(dir);
    let id = "storage-disk-space";
    let description = "free disk space of the storage directory";
    match nix::sys::statvfs::statvfs(&at) {
        Ok(s) => {
            let frag = s.fragment_size();
            let total = u128::from(s.blocks()) * u128::from(frag);
            let free = u128::from(s.blocks_available()) * u128::from(frag);
            #[allow(clippy::cast_precision_loss)]
            let pct = if total == 0 {
                100.0
            } else {
                free as f64 * 100.0 / total as f64
            };
            let detail = format!(
                "{}: {} MiB of {} MiB free ({pct:.1} %)",
                at.display(),
                free / (1 << 20),
                total / (1 << 20)
            );
            if pct < DISK_WARN_PERCENT {
                b.add(
                    id,
                    CONFIG,
                    description,
                    Outcome::Warning,
                    vec![
                        detail,
                        "below 10 %: the message store stops accepting messages when the disk is full"
                            .to_owned(),
                    ],
                );
            } else {
                b.add(id, CONFIG, description, Outcome::Ok, vec![detail]);
            }
        }
        Err(e) => b.add(
            id,
            CONFIG,
            description,
            Outcome::Warning,
            vec![format!("cannot stat {}: {e}", at.display())],
        ),
    }
}

async fn docker_check(b: &mut Builder, uri: &str, server_version: Option<&str>) {
    let id = "container-engine";
    let description = "container engine answers";
    let Some(sock) = verge_daemon::client::socket_path_from_uri(uri) else {
        b.add(
            id,
            CONNECT,
            description,
            Outcome::Warning,
            vec![format!("{uri}: only unix:// Docker URIs can be checked")],
        );
        return;
    };
    match verge_daemon::client::request(&sock, "GET", "/_ping", None, DOCKER_TIMEOUT).await {
        Ok(r) if r.status == 200 => {
            let mut details = vec![format!("{uri}: ping OK")];
            let mut result = Outcome::Ok;
            if let Some(v) = server_version
                && !v.starts_with("docker")
            {
                details.push(format!(
                    "but verged uses the {v} runtime: the Docker socket was missing when it \
                     started; restart verged"
                ));
                result = Outcome::Warning;
            }
            b.add(id, CONNECT, description, result, details);
        }
        Ok(r) => b.add(
            id,
            CONNECT,
            description,
            Outcome::Error,
            vec![format!("{uri}: ping answered HTTP {}", r.status)],
        ),
        Err(e) => b.add(
            id,
            CONNECT,
            description,
            Outcome::Error,
            vec![
                format!("cannot reach Docker at {uri}: {e}"),
                "is Docker running? (systemctl status docker)".to_owned(),
            ],
        ),
    }
}

/// The text form: sections, one line per check with indented details, summary.
pub fn render(report: &Report, colour: bool) -> String {
    let mut out = String::new();
    let mut section = "";
    for c in &report.checks {
        if c.section != section {
            if !section.is_empty() {
                out.push('\n');
            }
            section = c.section;
            out.push_str(&ui::paint(colour, Colour::Bold, section));
            out.push('\n');
            out.push_str(&"-".repeat(section.chars().count()));
            out.push('\n');
        }
        let (mark, word, col) = match c.result {
            Outcome::Ok => ("\u{2713}", "OK", Colour::Green),
            Outcome::Warning => ("\u{203c}", "Warning", Colour::Yellow),
            Outcome::Error => ("\u{d7}", "Error", Colour::Red),
            Outcome::Skipped => ("-", "Skipped", Colour::Bold),
        };
        let line = format!("{mark} {} - {word}", c.description);
        out.push_str(&if c.result == Outcome::Skipped {
            line
        } else {
            ui::paint(colour, col, &line)
        });
        out.push('\n');
        for d in &c.details {
            out.push_str("    ");
            out.push_str(d);
            out.push('\n');
        }
    }
    let s = report.summary;
    out.push_str(&format!(
        "\n{} check(s) succeeded, {} raised warnings, {} raised errors, {} skipped.\n",
        s.ok, s.warnings, s.errors, s.skipped
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_catalogue_lists_every_check_run() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("bundle.pem"), "").unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "hostname = \"edge1\"\nhomedir = \"{home}\"\ntrust_bundle_cert = \"bundle.pem\"\n\
                 [provisioning]\nsource = \"manual\"\nconnection_string = \"HostName=hub.invalid;\
                 DeviceId=d;SharedAccessKey=AAECAwQFBgcICQoLDA0ODw==\"\n\
                 [agent]\nname = \"edgeAgent\"\ntype = \"process\"\n[agent.config]\nimage = \"/bin/true\"\n",
                home = dir.path().join("home").display()
            ),
        )
        .unwrap();
        let sock = format!("unix://{}", dir.path().join("none.sock").display());
        let report = run_checks(&Inputs {
            config_path: &cfg,
            host: Some(&sock),
        })
        .await;
        assert!(report.checks.len() >= 13, "{report:?}");
        for c in &report.checks {
            assert!(
                CATALOGUE
                    .iter()
                    .any(|(id, sec, d)| *id == c.id && *sec == c.section && *d == c.description),
                "{} ({}) is missing from the catalogue",
                c.id,
                c.description
            );
        }
        let list = render_list(false);
        for (id, _, d) in CATALOGUE {
            assert!(list.contains(&format!("{id:<26} {d}")), "{list}");
        }
    }
}
