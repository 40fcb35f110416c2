//! `verge check`: configuration and connectivity checks, each ✓ / ‼ / ×
//! with details, and a summary. Any × makes the exit code non-zero.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use time::OffsetDateTime;
use verge_daemon::config::{Config, EdgeCaConfig};

use crate::mgmt::{self, Mgmt};

mod network;
use crate::ui::{self, Colour};

/// Warn when a certificate has fewer days than this left.
const CERT_WARN_DAYS: i64 = 30;
/// Warn when an issued certificate has used this share of its lifetime.
/// They are short-lived by design (30 days; ca.rs) and their holders fetch
/// new ones as they near expiry, so days left would always warn; past 80 %
/// (where verged itself renews) the holder has missed its renewal.
const ISSUED_WARN_FRACTION: f64 = verge_daemon::ca::RENEW_AT_FRACTION;
/// Warn when less than this share of the storage disk is free.
const DISK_WARN_PERCENT: f64 = 10.0;
/// The MQTT/TLS port of IoT Hub (and of a parent edge hub).
const UPSTREAM_PORT: u16 = 8883;
/// How long each step of the upstream probe (TCP connect, TLS, HTTPS) may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
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

fn cert_check(
    b: &mut Builder,
    id: &'static str,
    description: &'static str,
    path: &Path,
    auto: bool,
    now: SystemTime,
) {
    let mut add = |result, details| b.add(id, CONFIG, description, result, details);
    let pem = match std::fs::read_to_string(path) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && auto => {
            add(
                Outcome::Warning,
                vec![format!(
                    "{} does not exist yet: verged generates it when it starts",
                    path.display()
                )],
            );
            return;
        }
        Err(e) => {
            add(
                Outcome::Error,
                vec![format!("cannot read {}: {e}", path.display())],
            );
            return;
        }
    };
    let (not_before, not_after) = match verge_daemon::ca::pem_validity(&pem) {
        Ok(v) => v,
        Err(e) => {
            add(Outcome::Error, vec![format!("{}: {e}", path.display())]);
            return;
        }
    };
    let now = OffsetDateTime::from(now);
    let left = not_after - now;
    let mut details = vec![format!(
        "{} valid until {}",
        path.display(),
        fmt_odt(not_after)
    )];
    let result = if not_after <= now {
        details.push(if auto {
            "expired: restart verged to generate a new one".to_owned()
        } else {
            "expired: install a new certificate and restart verged".to_owned()
        });
        Outcome::Error
    } else if not_before > now {
        details.push(format!(
            "not valid before {}: the system clock is probably wrong",
            fmt_odt(not_before)
        ));
        Outcome::Error
    } else if left.whole_days() < CERT_WARN_DAYS {
        details.push(if auto {
            format!(
                "expires in {} days; verged renews its auto-generated CA by itself",
                left.whole_days()
            )
        } else {
            format!("expires in {} days: renew it soon", left.whole_days())
        });
        Outcome::Warning
    } else {
        details.push(format!("{} days left", left.whole_days()));
        Outcome::Ok
    };
    if auto {
        details.push(
            "auto-generated CA: for testing only; configure [edge_ca] cert and pk for production"
                .to_owned(),
        );
    }
    add(result, details);
}

/// The verdict on one issued certificate: × when expired (or not yet
/// valid), ‼ past [`ISSUED_WARN_FRACTION`] of its lifetime, else ✓.
pub fn issued_outcome(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> Outcome {
    if not_after <= now || not_before > now {
        Outcome::Error
    } else if verge_daemon::ca::renewal_due(not_before, not_after, now, ISSUED_WARN_FRACTION) {
        Outcome::Warning
    } else {
        Outcome::Ok
    }
}

fn parse_odt(iso: &str) -> Option<OffsetDateTime> {
    let t = verge_core::time::Timestamp::parse(iso).ok()?;
    Some(OffsetDateTime::from(SystemTime::from(t)))
}

/// Days, or hours when under two days (issued certificates live for 30 days).
fn fmt_left(d: time::Duration) -> String {
    if d.whole_days() >= 2 {
        format!("{} days", d.whole_days())
    } else {
        format!("{} hours", d.whole_hours())
    }
}

/// One check over every certificate verged recorded issuing, with a line
/// each; the worst verdict is the check's. It asks verged, so it sits with
/// the connectivity checks.
async fn issued_check(b: &mut Builder, m: &Mgmt, now: OffsetDateTime) {
    let id = "issued-certs-expiry";
    let description = "certificates issued by the edge CA";
    let list = match m.certificates().await {
        Ok(Some(l)) => l,
        Ok(None) => {
            b.add(
                id,
                CONNECT,
                description,
                Outcome::Skipped,
                vec!["this verged does not list issued certificates: update it".to_owned()],
            );
            return;
        }
        Err(e) => {
            b.add(
                id,
                CONNECT,
                description,
                Outcome::Warning,
                vec![format!("cannot list them: {e:#}")],
            );
            return;
        }
    };
    let mut worst = Outcome::Ok;
    let mut details = vec![format!(
        "issued by {} (valid until {})",
        list.edge_ca.common_name, list.edge_ca.not_after
    )];
    if list.issued.is_empty() {
        details.push("none issued yet".to_owned());
    }
    for c in &list.issued {
        let what = format!("{} {} certificate (CN {})", c.module, c.kind, c.common_name);
        let (Some(nb), Some(na)) = (parse_odt(&c.not_before), parse_odt(&c.not_after)) else {
            worst = worst.max(Outcome::Warning);
            details.push(format!(
                "{what}: unreadable validity {} – {}",
                c.not_before, c.not_after
            ));
            continue;
        };
        let outcome = issued_outcome(nb, na, now);
        worst = worst.max(outcome);
        let life = (na - nb).as_seconds_f64().max(1.0);
        let used = ((now - nb).as_seconds_f64() / life * 100.0).clamp(0.0, 100.0);
        details.push(match outcome {
            Outcome::Error if na <= now => format!(
                "\u{d7} {what}: expired at {}; restart {} so it asks verged for a new one",
                fmt_odt(na),
                c.module
            ),
            Outcome::Error => format!(
                "\u{d7} {what}: not valid before {}: the system clock is probably wrong",
                fmt_odt(nb)
            ),
            Outcome::Warning => format!(
                "\u{203c} {what}: expires {} ({} left, {used:.0} % of its lifetime used); \
                 {} should have renewed it by now — restart it if it does not",
                fmt_odt(na),
                fmt_left(na - now),
                c.module
            ),
            _ => format!(
                "\u{2713} {what}: valid until {} ({} left)",
                fmt_odt(na),
                fmt_left(na - now)
            ),
        });
    }
    b.add(id, CONNECT, description, worst, details);
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

/// Where the edge device's upstream traffic goes and how it is trusted,
/// from the config (and `[agent.env]`, where the deployment's
/// `UpstreamProtocol`, `https_proxy` and the agent's upstream settings live).
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The IoT hub's host name (`[provisioning]`).
    pub hub: String,
    /// The port the hub and the agent dial: `VERGE_AGENT_UPSTREAM_PORT`, else
    /// by the protocol that runs (8883 MQTT, 443 over WebSocket; AMQP runs
    /// as MQTT over the same carrier until the AMQP upstream exists).
    pub port: u16,
    /// The protocol asked for and run, and the proxy (WebSocket only), as
    /// the hub and the agent work them out.
    pub route: verge_dial::Route,
    /// The hub's HTTPS port (`[provisioning] https_port`).
    pub https_port: u16,
    /// PEM files trusted besides the system roots: `trust_bundle_cert` and
    /// `VERGE_AGENT_UPSTREAM_CA`. Never the edge CA: a local edge hub
    /// must not pass for the cloud.
    pub trust: Vec<PathBuf>,
}

impl Upstream {
    /// From a validated config; an unknown `UpstreamProtocol` or a bad
    /// `https_proxy` is the error the hub would stop with.
    pub fn from_config(c: &Config) -> Result<Self, String> {
        let env = |k: &str| c.agent.env.get(k).cloned();
        let hub = c.provisioning.iothub_hostname.to_string();
        let requested = verge_dial::UpstreamProtocol::resolve(None, env)
            .map_err(|e| format!("[agent.env] UpstreamProtocol: {e}"))?;
        let route = verge_dial::Route::new(requested, &hub, env)
            .map_err(|e| format!("[agent.env] https_proxy: {e}"))?;
        let port = env("VERGE_AGENT_UPSTREAM_PORT")
            .and_then(|p| p.trim().parse::<u16>().ok())
            .unwrap_or_else(|| route.port(UPSTREAM_PORT, verge_dial::protocol::WS_PORT));
        let mut trust: Vec<PathBuf> = c.trust_bundle_cert.iter().cloned().collect();
        if let Some(ca) = c.agent.env.get("VERGE_AGENT_UPSTREAM_CA") {
            trust.push(PathBuf::from(ca));
        }
        Ok(Upstream {
            hub,
            port,
            route,
            https_port: c.provisioning.https_port,
            trust,
        })
    }

    /// The protocol for messages: `MqttWs`, or `Mqtt (asked: Amqp)`.
    pub fn protocol(&self) -> String {
        if self.route.falls_back() {
            format!("{} (asked: {})", self.route.protocol, self.route.requested)
        } else {
            self.route.protocol.to_string()
        }
    }

    /// The dialer the hub would use to reach `host`.
    fn dialer(&self, host: &str, tls: rustls::ClientConfig) -> Result<verge_dial::Dialer, String> {
        use verge_dial::protocol::{MQTT_SUBPROTOCOL, WS_PATH};
        let d = verge_dial::Dialer::new(host, self.port, std::sync::Arc::new(tls))
            .map_err(|e| e.to_string())?
            .with_step_timeout(UPSTREAM_TIMEOUT);
        Ok(if self.route.protocol.websocket() {
            d.with_websocket(WS_PATH, MQTT_SUBPROTOCOL, 1 << 20)
                .with_proxy(self.route.proxy.clone())
        } else {
            d
        })
    }
}

/// rustls settings trusting the system roots and the PEM files.
fn tls_config(trust: &[PathBuf]) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for path in trust {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
            let _ = roots.add(cert);
        }
    }
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}

/// Why a probe failed: the server could not be reached (the device works
/// offline meanwhile), or what answered is not the server (TLS).
enum ProbeError {
    Unreachable(String),
    Tls(String),
}

async fn upstream_check(
    b: &mut Builder,
    id: &'static str,
    description: &'static str,
    host: &str,
    up: &Upstream,
    what: &str,
) {
    let trust = &up.trust;
    let port = up.port;
    // What the hub dials (a proxy and WebSocket included), up to the
    // WebSocket upgrade: TLS is verified as the hub verifies it.
    let (addr, result) = match tls_config(trust).and_then(|tls| up.dialer(host, tls)) {
        Err(e) => (format!("{host}:{port}"), Err(ProbeError::Tls(e))),
        Ok(dialer) => {
            let r = match tokio::time::timeout(UPSTREAM_TIMEOUT * 3, dialer.dial()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(
                    e @ (verge_dial::DialError::Tls { .. }
                    | verge_dial::DialError::WebSocket { .. }),
                )) => Err(ProbeError::Tls(e.to_string())),
                Ok(Err(e)) => Err(ProbeError::Unreachable(e.to_string())),
                Err(_) => Err(ProbeError::Unreachable("timed out".to_owned())),
            };
            (dialer.describe(), r)
        }
    };
    let trusted = if trust.is_empty() {
        "the system roots".to_owned()
    } else {
        format!(
            "the system roots and {}",
            trust
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    match result {
        Ok(()) => b.add(
            id,
            CONNECT,
            description,
            Outcome::Ok,
            vec![format!(
                "{what} {addr}: its certificate is valid for {host} and trusted ({trusted})"
            )],
        ),
        Err(ProbeError::Unreachable(e)) => b.add(
            id,
            CONNECT,
            description,
            Outcome::Warning,
            vec![
                format!("cannot connect to the {what} at {addr}: {e}"),
                format!(
                    "the device keeps working offline, but nothing reaches the cloud until this \
                     connects: check DNS, the firewall (outbound TCP {port}) and any proxy"
                ),
            ],
        ),
        Err(ProbeError::Tls(e)) => b.add(
            id,
            CONNECT,
            description,
            Outcome::Error,
            vec![
                format!("{addr} answers, but not as the {what} {host}: {e}"),
                format!(
                    "the certificate must be valid for {host} and chain to {trusted}. Is \
                     something else listening there (a local edge hub on this machine)? \
                     Otherwise give the {what}'s CA as trust_bundle_cert"
                ),
            ],
        ),
    }
}

/// Allowed difference between this clock and the hub's before a warning
/// (SAS tokens and certificates tolerate little more).
const SKEW_WARN: Duration = Duration::from_secs(60);
/// Difference that breaks authentication.
const SKEW_ERROR: Duration = Duration::from_secs(300);

/// This clock against the `Date` of the hub's HTTPS answer.
async fn clock_skew_check(b: &mut Builder, up: &Upstream) {
    let id = "clock-skew";
    let description = "system clock agrees with the IoT hub's";
    let base = format!("https://{}:{}/", up.hub, up.https_port);
    let probe = async {
        let tls = tls_config(&up.trust)?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(UPSTREAM_TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        let sent = SystemTime::now();
        let resp = client.get(&base).send().await.map_err(|e| format!("{e}"))?;
        let received = SystemTime::now();
        let date = resp
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .ok_or("the answer has no Date header")?
            .to_owned();
        let server = parse_http_date(&date).ok_or(format!("cannot read its Date {date:?}"))?;
        // The midpoint of the request is our best guess of when it was stamped.
        let local = sent + received.duration_since(sent).unwrap_or_default() / 2;
        Ok::<_, String>((server, local))
    };
    match probe.await {
        Ok((server, local)) => {
            let (skew, ahead) = match local.duration_since(server) {
                Ok(d) => (d, true),
                Err(e) => (e.duration(), false),
            };
            // The Date header has whole seconds.
            let skew = skew.saturating_sub(Duration::from_secs(1));
            let detail = format!(
                "this clock is {}s {} the IoT hub's ({base}: {})",
                skew.as_secs(),
                if ahead { "ahead of" } else { "behind" },
                fmt_time(server)
            );
            let result = if skew >= SKEW_ERROR {
                Outcome::Error
            } else if skew >= SKEW_WARN {
                Outcome::Warning
            } else {
                Outcome::Ok
            };
            let mut details = vec![detail];
            if result != Outcome::Ok {
                details.push(
                    "SAS tokens and certificates fail with a wrong clock: sync it \
                     (timedatectl set-ntp true)"
                        .to_owned(),
                );
            }
            b.add(id, CONNECT, description, result, details);
        }
        Err(e) => b.add(
            id,
            CONNECT,
            description,
            Outcome::Skipped,
            vec![format!("cannot ask {base} for its time: {e}")],
        ),
    }
}

/// An HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`, RFC 9110 IMF-fixdate).
fn parse_http_date(v: &str) -> Option<SystemTime> {
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let t = time::PrimitiveDateTime::parse(v.trim(), &fmt).ok()?;
    Some(t.assume_utc().into())
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

    #[test]
    fn http_dates_and_upstream_ports() {
        let t = parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().as_secs(), 784_111_777);
        assert!(parse_http_date("yesterday").is_none());
        let text = |env: &str| {
            format!(
                "hostname = \"e\"\ntrust_bundle_cert = \"/tb.pem\"\n[provisioning]\nsource = \"manual\"\n\
                 connection_string = \"HostName=hub.example.net;DeviceId=d;SharedAccessKey=AAECAwQFBgcICQoLDA0ODw==\"\n\
                 https_port = 8443\n[agent]\nname = \"edgeAgent\"\ntype = \"process\"\n[agent.config]\n\
                 image = \"/bin/true\"\n[agent.env]\n{env}\n"
            )
        };
        let up = |env: &str| {
            Upstream::from_config(
                &Config::parse(&text(env), Path::new("/etc/verge/c.toml")).unwrap(),
            )
            .unwrap()
        };
        let u = up("");
        assert_eq!(
            (u.hub.as_str(), u.port, u.https_port),
            ("hub.example.net", 8883, 8443)
        );
        assert_eq!(u.trust, vec![PathBuf::from("/tb.pem")]);
        assert_eq!(up("UpstreamProtocol = \"MqttWs\"").port, 443);
        // AMQP runs as MQTT over the same carrier: what the hub dials.
        let u = up("UpstreamProtocol = \"Amqp\"");
        assert_eq!(
            (u.port, u.protocol().as_str()),
            (8883, "Mqtt (asked: Amqp)")
        );
        assert_eq!(up("UpstreamProtocol = \"AmqpWs\"").port, 443);
        // The proxy goes with the WebSocket transports only, as in the hub.
        let u = up("UpstreamProtocol = \"MqttWs\"\nhttps_proxy = \"http://proxy:3128\"");
        assert!(u.route.proxy.is_some());
        assert!(
            up("https_proxy = \"http://proxy:3128\"")
                .route
                .proxy
                .is_none()
        );
        let u = up("VERGE_AGENT_UPSTREAM_PORT = \"18883\"\nVERGE_AGENT_UPSTREAM_CA = \"/ca.pem\"");
        assert_eq!(u.port, 18883);
        assert_eq!(u.trust.len(), 2);
    }

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

    #[test]
    fn issued_certs_warn_by_share_of_lifetime() {
        let nb = OffsetDateTime::UNIX_EPOCH;
        let na = nb + time::Duration::days(30);
        let at = |days: f64| nb + time::Duration::seconds_f64(days * 86_400.0);
        // 29 days left of 30 is fine; fewer than 30 days left is not, by itself, a warning.
        assert_eq!(issued_outcome(nb, na, at(1.0)), Outcome::Ok);
        assert_eq!(issued_outcome(nb, na, at(23.9)), Outcome::Ok);
        assert_eq!(issued_outcome(nb, na, at(24.1)), Outcome::Warning);
        assert_eq!(issued_outcome(nb, na, at(29.99)), Outcome::Warning);
        assert_eq!(issued_outcome(nb, na, at(30.0)), Outcome::Error);
        assert_eq!(issued_outcome(nb, na, at(-1.0)), Outcome::Error);
        // Worst wins when folding with max (Skipped is never folded in).
        assert_eq!(Outcome::Ok.max(Outcome::Warning), Outcome::Warning);
        assert_eq!(Outcome::Error.max(Outcome::Warning), Outcome::Error);
        assert_eq!(fmt_left(time::Duration::hours(30)), "30 hours");
        assert_eq!(fmt_left(time::Duration::days(5)), "5 days");
    }
}
