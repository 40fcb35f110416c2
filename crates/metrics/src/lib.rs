//! verge-metrics: what the hub and the agent share to expose Prometheus
//! metrics the way Azure IoT Edge's edgeHub and edgeAgent do.
//!
//! * [`Settings`]: `MetricsEnabled` and the listener (`Metrics__Listener__Host`,
//!   `…Port`, `…Suffix`; defaults `*`, 9600, `metrics`), from a daemon's
//!   config file and then its environment (the manifest's `env`, which is
//!   where an Azure deployment sets them, wins);
//! * [`CommonLabels`] / [`registry`]: a [`Registry`] whose every series
//!   carries `iothub`, `edge_device` and `instance_number` (a fresh GUID per
//!   process start, as in IoT Edge, so a restart is visible as a new series);
//! * [`encode`]: the Prometheus text format 0.0.4 (what edgeHub serves and
//!   the metrics-collector parses), not OpenMetrics;
//! * [`serve`]: plain HTTP `GET /{suffix}` through `verge-listen` (connection
//!   caps, header/write deadlines), stopped by the daemon's `verge-shutdown`.
//!
//! The daemons keep their counters in atomics on the hot path; the text is
//! rendered only when scraped ([`Source::render`]).

use std::borrow::Cow;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
pub use prometheus_client;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Azure's default port for both edgeHub and edgeAgent.
pub const DEFAULT_PORT: u16 = 9600;
/// Azure's default path.
pub const DEFAULT_SUFFIX: &str = "metrics";
/// The `Content-Type` of the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Scrapers served at once: Prometheus, the metrics-collector, an operator's
/// `curl`; more only queue in the kernel's backlog.
const MAX_CONNECTIONS: usize = 16;
/// Deadline of a scrape request's head and of an idle keep-alive connection.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A metrics setting that does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SettingsError {
    /// `MetricsEnabled` is not a boolean.
    #[error("{key}: {value:?} is not true or false")]
    Bool {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// The port is not a number in 0..=65535.
    #[error("{key}: {value:?} is not a port number")]
    Port {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// The host is neither `*`, `+`, `localhost` nor an IP address.
    #[error("{key}: {value:?} is not `*`, `localhost` or an IP address")]
    Host {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
}

/// Where and whether a daemon serves its metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `MetricsEnabled` (default true, as since IoT Edge 1.0.10).
    pub enabled: bool,
    /// The listener's address (`*` = every IPv4 address, as .NET's `http://*:9600`).
    pub addr: SocketAddr,
    /// The path, without slashes (`metrics`).
    pub suffix: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            enabled: true,
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_PORT),
            suffix: DEFAULT_SUFFIX.to_owned(),
        }
    }
}

/// The environment keys read, in the order applied (a later one wins).
/// `MetricsEnabled` at the root is what `doc/BuiltInMetrics.md` documents
/// (edgeAgent reads it); edgeHub binds the section `metrics:listener`, so
/// `Metrics__Listener__MetricsEnabled` is honoured too. The agent's
/// unprefixed `host`/`port`/`suffix` are left out: `port` alone in a
/// module's environment is too likely to mean something else.
const ENABLED_KEYS: [&str; 2] = ["MetricsEnabled", "Metrics__Listener__MetricsEnabled"];
const HOST_KEY: &str = "Metrics__Listener__Host";
const PORT_KEY: &str = "Metrics__Listener__Port";
const SUFFIX_KEY: &str = "Metrics__Listener__Suffix";

impl Settings {
    /// These settings overridden by the process environment (keys matched
    /// case-insensitively, as .NET configuration does).
    pub fn with_env(self) -> Result<Self, SettingsError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        self.with_lookup(|key| {
            vars.iter()
                .rev()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.clone())
        })
    }

    /// These settings overridden by whatever `lookup` finds for the keys.
    pub fn with_lookup(
        mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SettingsError> {
        for key in ENABLED_KEYS {
            if let Some(v) = lookup(key) {
                self.enabled = parse_bool(key, &v)?;
            }
        }
        if let Some(v) = lookup(HOST_KEY) {
            self.addr.set_ip(parse_host(HOST_KEY, &v)?);
        }
        if let Some(v) = lookup(PORT_KEY) {
            let port = v.trim().parse::<u16>().map_err(|_| SettingsError::Port {
                key: PORT_KEY.to_owned(),
                value: v.clone(),
            })?;
            self.addr.set_port(port);
        }
        if let Some(v) = lookup(SUFFIX_KEY) {
            self.suffix = v.trim().trim_matches('/').to_owned();
        }
        Ok(self)
    }

    /// Whether `path` (a request's) is the metrics path: `/{suffix}` or
    /// `/{suffix}/` (.NET's listener serves the latter).
    pub fn matches_path(&self, path: &str) -> bool {
        path_matches(&self.suffix, path)
    }
}

fn path_matches(suffix: &str, path: &str) -> bool {
    let p = path.trim_start_matches('/');
    let p = p.strip_suffix('/').unwrap_or(p);
    p == suffix
}

fn parse_bool(key: &str, v: &str) -> Result<bool, SettingsError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(SettingsError::Bool {
            key: key.to_owned(),
            value: v.to_owned(),
        }),
    }
}

/// Parses a listener host: `*`/`+`/empty (every address), `localhost`, or an IP.
pub fn parse_host(key: &str, v: &str) -> Result<IpAddr, SettingsError> {
    let t = v.trim().trim_start_matches('[').trim_end_matches(']');
    match t {
        "" | "*" | "+" => Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        "localhost" => Ok(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        "::" => Ok(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        _ => t.parse().map_err(|_| SettingsError::Host {
            key: key.to_owned(),
            value: v.to_owned(),
        }),
    }
}

/// The labels IoT Edge puts on every series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommonLabels {
    /// The IoT hub's hostname.
    pub iothub: String,
    /// The edge device's id.
    pub edge_device: String,
    /// A GUID drawn at process start.
    pub instance_number: String,
}

impl CommonLabels {
    /// Labels for this process (a new `instance_number`).
    pub fn new(iothub: impl Into<String>, edge_device: impl Into<String>) -> Self {
        Self {
            iothub: iothub.into(),
            edge_device: edge_device.into(),
            instance_number: uuid::Uuid::new_v4().to_string(),
        }
    }
}

/// An empty registry whose every series will carry `labels`.
pub fn registry(labels: &CommonLabels) -> Registry {
    let pairs: [(Cow<'static, str>, Cow<'static, str>); 3] = [
        ("iothub".into(), labels.iothub.clone().into()),
        ("edge_device".into(), labels.edge_device.clone().into()),
        (
            "instance_number".into(),
            labels.instance_number.clone().into(),
        ),
    ];
    Registry::with_labels(pairs.into_iter())
}

/// `registry` in the Prometheus text format 0.0.4.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::with_capacity(4096);
    // Writing to a String cannot fail; an encoder error (a label that does
    // not encode) would leave a partial exposition, which is still text.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding the metrics failed");
    }
    out
}

/// What a metrics endpoint serves: the whole exposition, rendered per scrape.
pub trait Source: Send + Sync + 'static {
    /// The metrics as Prometheus text (refreshing scrape-time gauges first).
    fn render(&self) -> impl Future<Output = String> + Send;
}

/// A bound metrics listener.
#[derive(Debug)]
pub struct Bound {
    listener: TcpListener,
    suffix: String,
}

impl Bound {
    /// The bound address (port 0 resolved).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Binds the listener of `settings` (`None` when metrics are disabled).
pub async fn bind(settings: &Settings) -> std::io::Result<Option<Bound>> {
    if !settings.enabled {
        return Ok(None);
    }
    let listener = TcpListener::bind(settings.addr).await?;
    Ok(Some(Bound {
        listener,
        suffix: settings.suffix.clone(),
    }))
}

/// Serves `source` on `bound` until `shutdown` fires (run it as one of the
/// daemon's shutdown tasks). Connection caps and deadlines are verge-listen's.
pub async fn serve<S: Source>(bound: Bound, source: Arc<S>, shutdown: verge_shutdown::Shutdown) {
    let Bound { listener, suffix } = bound;
    let suffix: Arc<str> = suffix.into();
    let limits = verge_listen::Limits::new(MAX_CONNECTIONS, HEADER_TIMEOUT);
    let timeouts = verge_listen::http::Timeouts {
        header: HEADER_TIMEOUT,
        body: HEADER_TIMEOUT,
        write: Duration::from_secs(30),
        grace: Duration::from_secs(1),
    };
    let l = verge_listen::Listener::new("metrics", listener, limits, shutdown.token())
        .with_tracker(shutdown.tracker());
    l.run(
        move |tcp: tokio::net::TcpStream, conn: verge_listen::Conn| {
            let (source, suffix) = (source.clone(), suffix.clone());
            async move {
                let svc = hyper::service::service_fn(
                    move |req: Request<verge_listen::http::TimedBody>| {
                        let (source, suffix) = (source.clone(), suffix.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(
                                respond(&*source, &suffix, &req).await,
                            )
                        }
                    },
                );
                verge_listen::http::serve(tcp, svc, (), timeouts, &conn).await;
            }
        },
    )
    .await;
}

async fn respond<S: Source, B>(
    source: &S,
    suffix: &str,
    req: &Request<B>,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: Bytes| {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = status;
        if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
            r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
        }
        r
    };
    if !path_matches(suffix, req.uri().path()) {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"GET only\n"),
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    let text = source.render().await;
    reply(StatusCode::OK, CONTENT_TYPE, Bytes::from(text))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn defaults_are_azures() {
        let s = Settings::default().with_lookup(lookup(&[])).unwrap();
        assert!(s.enabled);
        assert_eq!(s.addr, "0.0.0.0:9600".parse().unwrap());
        assert_eq!(s.suffix, "metrics");
    }

    #[test]
    fn env_keys_override() {
        let s = Settings::default()
            .with_lookup(lookup(&[
                ("Metrics__Listener__Host", "127.0.0.1"),
                ("Metrics__Listener__Port", "9700"),
                ("Metrics__Listener__Suffix", "/m/"),
            ]))
            .unwrap();
        assert_eq!(s.addr, "127.0.0.1:9700".parse().unwrap());
        assert_eq!(s.suffix, "m");
        assert!(s.matches_path("/m") && s.matches_path("/m/") && !s.matches_path("/metrics"));
        let off = Settings::default()
            .with_lookup(lookup(&[("MetricsEnabled", "False")]))
            .unwrap();
        assert!(!off.enabled);
        // edgeHub's section key wins over the root key (applied later).
        let on = Settings::default()
            .with_lookup(lookup(&[
                ("MetricsEnabled", "false"),
                ("Metrics__Listener__MetricsEnabled", "true"),
            ]))
            .unwrap();
        assert!(on.enabled);
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(matches!(
            Settings::default().with_lookup(lookup(&[("MetricsEnabled", "maybe")])),
            Err(SettingsError::Bool { .. })
        ));
        assert!(matches!(
            Settings::default().with_lookup(lookup(&[("Metrics__Listener__Port", "70000")])),
            Err(SettingsError::Port { .. })
        ));
        assert!(matches!(
            Settings::default().with_lookup(lookup(&[("Metrics__Listener__Host", "some.host")])),
            Err(SettingsError::Host { .. })
        ));
    }

    #[test]
    fn common_labels_on_every_series_in_prometheus_text() {
        let labels = CommonLabels::new("hub.example", "edge1");
        let mut reg = registry(&labels);
        let c: Counter = Counter::default();
        reg.register("edgehub_gettwin", "GetTwin calls", c.clone());
        c.inc_by(3);
        let text = encode(&reg);
        assert!(
            text.contains("# TYPE edgehub_gettwin_total counter\n"),
            "{text}"
        );
        let want = format!(
            "edgehub_gettwin_total{{iothub=\"hub.example\",edge_device=\"edge1\",instance_number=\"{}\"}} 3\n",
            labels.instance_number
        );
        assert!(text.contains(&want), "{text}");
        // Prometheus 0.0.4 text, not OpenMetrics.
        assert!(!text.contains("# EOF"));
        assert_ne!(
            CommonLabels::new("h", "d").instance_number,
            labels.instance_number
        );
    }

    struct Fixed;
    impl Source for Fixed {
        async fn render(&self) -> String {
            "x_total 1\n".to_owned()
        }
    }

    #[tokio::test]
    async fn serves_the_suffix_only_and_stops_on_shutdown() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let settings = Settings {
            addr: "127.0.0.1:0".parse().unwrap(),
            ..Settings::default()
        };
        let bound = bind(&settings).await.unwrap().unwrap();
        let addr = bound.local_addr().unwrap();
        let sd = verge_shutdown::Shutdown::new();
        let task = tokio::spawn(serve(bound, Arc::new(Fixed), sd.clone()));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
                .await
                .unwrap()
                .unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(ok.ends_with("x_total 1\n"), "{ok}");
        assert!(get("/metrics/").await.starts_with("HTTP/1.1 200"));
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        sd.trigger();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn disabled_binds_nothing() {
        let s = Settings {
            enabled: false,
            ..Settings::default()
        };
        assert!(bind(&s).await.unwrap().is_none());
    }
}
