//! `verge check`'s upstream checks: the IoT hub (or a nested edge's
//! parent) dialed as the hub dials it, and the clock against the hub's.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use verge_daemon::config::Config;

use super::{Builder, CONNECT, Outcome, fmt_time};

/// The MQTT/TLS port of IoT Hub (and of a parent edge hub).
const UPSTREAM_PORT: u16 = 8883;
/// How long each step of the upstream probe (TCP connect, TLS, HTTPS) may take.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// Where the edge device's upstream traffic goes and how it is trusted,
/// from the config (and `[agent.env]`, where the deployment's
/// `UpstreamProtocol`, `https_proxy` and the agent's upstream settings live).
#[derive(Debug, Clone)]
pub(super) struct Upstream {
    /// The IoT hub's host name (`[provisioning]`).
    pub hub: String,
    /// The port the hub dials for messages: `VERGE_AGENT_UPSTREAM_PORT`,
    /// else by the protocol (5671 AMQP, 8883 MQTT, 443 over WebSocket).
    pub port: u16,
    /// The protocol asked for (edgeHub's default `Amqp` when unset) and the
    /// proxy (WebSocket only), as the hub works them out.
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
        let requested =
            verge_dial::UpstreamProtocol::resolve(Some(verge_dial::protocol::EDGE_DEFAULT), env)
                .map_err(|e| format!("[agent.env] UpstreamProtocol: {e}"))?;
        let route = verge_dial::Route::native(requested, &hub, env)
            .map_err(|e| format!("[agent.env] https_proxy: {e}"))?;
        let port = env("VERGE_AGENT_UPSTREAM_PORT")
            .and_then(|p| p.trim().parse::<u16>().ok())
            .unwrap_or_else(|| match route.protocol {
                verge_dial::UpstreamProtocol::Amqp => verge_dial::protocol::AMQP_PORT,
                _ => route.port(UPSTREAM_PORT, verge_dial::protocol::WS_PORT),
            });
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

    /// The protocol for messages, e.g. `Amqp` or `MqttWs`.
    pub fn protocol(&self) -> String {
        self.route.protocol.to_string()
    }

    /// The dialer the hub would use to reach `host`.
    fn dialer(&self, host: &str, tls: rustls::ClientConfig) -> Result<verge_dial::Dialer, String> {
        use verge_dial::protocol::{AMQP_SUBPROTOCOL, MQTT_SUBPROTOCOL, WS_PATH};
        let d = verge_dial::Dialer::new(host, self.port, std::sync::Arc::new(tls))
            .map_err(|e| e.to_string())?
            .with_step_timeout(UPSTREAM_TIMEOUT);
        let subprotocol = if self.route.protocol.amqp() {
            AMQP_SUBPROTOCOL
        } else {
            MQTT_SUBPROTOCOL
        };
        Ok(if self.route.protocol.websocket() {
            d.with_websocket(WS_PATH, subprotocol, 1 << 20)
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

pub(super) async fn upstream_check(
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
pub(super) async fn clock_skew_check(b: &mut Builder, up: &Upstream) {
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

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::UNIX_EPOCH;

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
        // edgeHub's default, AMQP on 5671: what the hub dials.
        let u = up("");
        assert_eq!(
            (u.hub.as_str(), u.port, u.https_port, u.protocol().as_str()),
            ("hub.example.net", 5671, 8443, "Amqp")
        );
        assert_eq!(u.trust, vec![PathBuf::from("/tb.pem")]);
        assert_eq!(up("UpstreamProtocol = \"MqttWs\"").port, 443);
        assert_eq!(up("UpstreamProtocol = \"Mqtt\"").port, 8883);
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
}
