//! The hub's Prometheus metrics, named, typed and labelled as edgeHub's
//! (reference §9), plus Verge's own under `verge_`; served by
//! `verge-metrics` on `:9600/metrics`.
//!
//! Cost on the data path: a routed or delivered message increments one
//! atomic counter found through a per-thread cache (no lock, no allocation
//! once warm; see `LocalCounters`). Everything the hub already counts
//! (store bytes, refused, dead-lettered, upstream senders, queue depths) is
//! read only when scraped.
//!
//! Label values: `id`, `from` and `to` are client ids (`device/module`, or
//! `device`); `to` is `upstream` for messages sent to the cloud (their
//! `to_route_input` is empty). `edgehub_gettwin_total` counts twin reads
//! from the hub's clients with `source="edge_hub"`, and
//! `edgehub_reported_properties_total` their reported patches with
//! `target="edge_hub"` (the hub answers both from its own twin store).
//! `edgehub_messages_dropped_total{reason="ttl_expiry"}` counts the store's
//! TTL drops and the upstream drain's (messages expired while held back),
//! which do not record the sender: its `from`/`from_route_output` are empty.
//! `edgehub_messages_unack_total{reason="storage_failure"}` counts messages
//! the store refused at submission (full, over its size limit).
//!
//! Not exposed: edgeHub's summaries (`…_duration_seconds`,
//! `edgehub_message_size_bytes`: prometheus-client has no summary type),
//! `edgehub_offline_count_total`/`…_offline_duration_seconds` and
//! `edgehub_operation_retry_total` (the link does not count them yet), and
//! the `ms_telemetry` label (Verge sends no runtime quality telemetry).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use verge_core::ClientId;

use crate::HubState;
use crate::config::Config;

/// `edgehub_messages_received_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Received {
    /// The output the module sent on (empty for a device).
    pub route_output: String,
    /// The sender.
    pub id: String,
}

/// `edgehub_messages_sent_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Sent {
    /// The original sender.
    pub from: String,
    /// The receiving module, or `upstream`.
    pub to: String,
    /// The output the sender used.
    pub from_route_output: String,
    /// The receiving module's input (empty upstream).
    pub to_route_input: String,
    /// The route's priority.
    pub priority: String,
}

/// `edgehub_messages_dropped_total` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Dropped {
    /// `no_route` or `ttl_expiry`.
    pub reason: String,
    /// The sender (empty when unknown).
    pub from: String,
    /// Its output.
    pub from_route_output: String,
}

/// `edgehub_queue_length` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Queue {
    /// The endpoint id (`$upstream`, `modules/{m}/inputs/{i}`).
    pub endpoint: String,
    /// The queue's priority.
    pub priority: String,
}

/// Labels `source, id` (`edgehub_gettwin_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceId {
    /// Who answered.
    pub source: String,
    /// The client.
    pub id: String,
}

/// Labels `target, id` (`edgehub_reported_properties_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetId {
    /// Who took the patch.
    pub target: String,
    /// The client.
    pub id: String,
}

/// Labels `from, to` (`edgehub_direct_methods_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FromTo {
    /// The caller (`upstream` for the cloud).
    pub from: String,
    /// The callee.
    pub to: String,
}

/// Label `id`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Id {
    /// The client.
    pub id: String,
}

/// Labels `id, reason` (`edgehub_client_connect_failed_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdReason {
    /// The client id it claimed.
    pub id: String,
    /// Why it was refused.
    pub reason: String,
}

/// Client ids a refused connection may add as labels before the rest are
/// counted as `id="other"`: refused ids are chosen by whoever connects, and
/// each would otherwise stay in memory as a series.
const MAX_FAILED_IDS: usize = 1024;

/// Label `sender` (Verge's per-identity upstream series).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Sender {
    /// The identity the messages go to the cloud as.
    pub sender: String,
}

/// Label `reason` (Verge's upstream drops).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    /// Why.
    pub reason: String,
}

/// Every series the hub exposes; cheap handles (each is an `Arc` inside).
pub struct HubMetrics {
    received: Family<Received, Counter>,
    sent: Family<Sent, Counter>,
    dropped: Family<Dropped, Counter>,
    queue_length: Family<Queue, Gauge>,
    gettwin: Family<SourceId, Counter>,
    reported: Family<TargetId, Counter>,
    methods: Family<FromTo, Counter>,
    connect_success: Family<Id, Counter>,
    connect_failed: Family<IdReason, Counter>,
    /// Label sets `connect_failed` has made (see [`MAX_FAILED_IDS`]).
    failed_ids: std::sync::atomic::AtomicUsize,
    disconnect: Family<Id, Counter>,
    unack: Family<Dropped, Counter>,
    connected_clients: Gauge,
    // Verge's own, mirrored from the hub's and the store's atomics.
    store_bytes: Gauge,
    store_max_bytes: Gauge,
    stored: Counter,
    refused: Counter,
    dead_lettered: Counter,
    damaged: Counter,
    upstream_backlog: Family<Sender, Gauge>,
    upstream_connected: Family<Sender, Gauge>,
    upstream_dropped: Family<Reason, Counter>,
    /// The registry; the lock also serializes scrapes (each refreshes the
    /// scrape-time series before encoding).
    registry: tokio::sync::Mutex<Registry>,
    /// Tells the per-thread caches which hub their handles belong to.
    instance: u64,
    /// Whether the per-message series (received, sent, dropped without a
    /// route) are counted: not when nothing can read them (metrics
    /// disabled, or their port taken), so a hub without metrics pays
    /// nothing per message.
    per_message: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for HubMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HubMetrics")
    }
}

impl HubMetrics {
    /// The hub's series, labelled with `iothub` and `edge_device` (and a
    /// new `instance_number`).
    pub fn new(iothub: &str, edge_device: &str) -> Self {
        let mut r = verge_metrics::registry(&verge_metrics::CommonLabels::new(iothub, edge_device));
        let mut m = Self {
            received: Family::default(),
            sent: Family::default(),
            dropped: Family::default(),
            queue_length: Family::default(),
            gettwin: Family::default(),
            reported: Family::default(),
            methods: Family::default(),
            connect_success: Family::default(),
            connect_failed: Family::default(),
            failed_ids: std::sync::atomic::AtomicUsize::new(0),
            disconnect: Family::default(),
            unack: Family::default(),
            connected_clients: Gauge::default(),
            store_bytes: Gauge::default(),
            store_max_bytes: Gauge::default(),
            stored: Counter::default(),
            refused: Counter::default(),
            dead_lettered: Counter::default(),
            damaged: Counter::default(),
            upstream_backlog: Family::default(),
            upstream_connected: Family::default(),
            upstream_dropped: Family::default(),
            registry: tokio::sync::Mutex::new(Registry::default()),
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            per_message: std::sync::atomic::AtomicBool::new(true),
        };
        // `_total` is added to counters by the encoder.
        r.register(
            "edgehub_messages_received",
            "Total number of messages received from clients",
            m.received.clone(),
        );
        r.register(
            "edgehub_messages_sent",
            "Total number of messages sent to clients or upstream",
            m.sent.clone(),
        );
        r.register(
            "edgehub_messages_dropped",
            "Messages dropped (no_route: no route matched; ttl_expiry: time-to-live ran out)",
            m.dropped.clone(),
        );
        r.register(
            "edgehub_queue_length",
            "Messages waiting in an endpoint's queue",
            m.queue_length.clone(),
        );
        r.register(
            "edgehub_gettwin",
            "Total number of GetTwin calls",
            m.gettwin.clone(),
        );
        r.register(
            "edgehub_reported_properties",
            "Total reported property updates calls",
            m.reported.clone(),
        );
        r.register(
            "edgehub_direct_methods",
            "Total direct method calls relayed",
            m.methods.clone(),
        );
        r.register(
            "edgehub_client_connect_success",
            "Successful client connections",
            m.connect_success.clone(),
        );
        r.register(
            "edgehub_client_connect_failed",
            "Client connections refused",
            m.connect_failed.clone(),
        );
        r.register(
            "edgehub_messages_unack",
            "Messages not acknowledged (storage_failure: the store refused them)",
            m.unack.clone(),
        );
        r.register(
            "edgehub_client_disconnect",
            "Client disconnections",
            m.disconnect.clone(),
        );
        r.register(
            "edgehub_connected_clients",
            "Clients connected now",
            m.connected_clients.clone(),
        );
        r.register(
            "verge_store_bytes",
            "Bytes held by the message store",
            m.store_bytes.clone(),
        );
        r.register(
            "verge_store_max_bytes",
            "The store's byte limit (storeLimits.maxSizeBytes; -1 when none)",
            m.store_max_bytes.clone(),
        );
        r.register(
            "verge_messages_stored",
            "Messages durably stored",
            m.stored.clone(),
        );
        r.register(
            "verge_messages_refused",
            "Messages refused at ingest (not acknowledged)",
            m.refused.clone(),
        );
        r.register(
            "verge_messages_dead_lettered",
            "Stored deliveries dropped because they can never be sent",
            m.dead_lettered.clone(),
        );
        r.register(
            "verge_store_damaged_records",
            "Damaged store records skipped by reads",
            m.damaged.clone(),
        );
        r.register(
            "verge_upstream_backlog",
            "Messages read ahead and waiting in memory for the sender's link",
            m.upstream_backlog.clone(),
        );
        r.register(
            "verge_upstream_connected",
            "1 when the sender's link to the cloud is up",
            m.upstream_connected.clone(),
        );
        r.register(
            "verge_upstream_dropped",
            "Upstream messages dropped (no_identity, unsendable)",
            m.upstream_dropped.clone(),
        );
        m.registry = tokio::sync::Mutex::new(r);
        m
    }

    /// Stops counting the per-message series (nothing serves them).
    pub fn stop_per_message(&self) {
        self.per_message.store(false, Ordering::Relaxed);
    }

    fn per_message(&self) -> bool {
        self.per_message.load(Ordering::Relaxed)
    }

    /// Counts a message received from `client` on `output`.
    pub fn received(&self, client: &ClientId, output: Option<&str>) {
        if !self.per_message() {
            return;
        }
        RECEIVED.with_borrow_mut(|c| {
            c.get(
                self.instance,
                &self.received,
                |k| {
                    let _ = write!(k, "{client}\u{0}{}", output.unwrap_or(""));
                },
                || Received {
                    route_output: output.unwrap_or("").to_owned(),
                    id: client.to_string(),
                },
            )
            .inc();
        });
    }

    /// Counts a message from `client` on `output` that matched no route.
    pub fn dropped_no_route(&self, client: &ClientId, output: Option<&str>) {
        if !self.per_message() {
            return;
        }
        DROPPED.with_borrow_mut(|c| {
            c.get(
                self.instance,
                &self.dropped,
                |k| {
                    let _ = write!(k, "{client}\u{0}{}", output.unwrap_or(""));
                },
                || Dropped {
                    reason: "no_route".to_owned(),
                    from: client.to_string(),
                    from_route_output: output.unwrap_or("").to_owned(),
                },
            )
            .inc();
        });
    }

    /// Counts a message sent (acknowledged by its receiver) from `from`
    /// (`device` and optional `module`) on `output` to `to`'s `input`.
    pub fn sent(
        &self,
        from: (Option<&str>, Option<&str>),
        output: Option<&str>,
        to: &str,
        input: &str,
        priority: u32,
    ) {
        if !self.per_message() {
            return;
        }
        let (d, m) = (from.0.unwrap_or(""), from.1);
        SENT.with_borrow_mut(|c| {
            c.get(
                self.instance,
                &self.sent,
                |k| {
                    let _ = write!(
                        k,
                        "{d}/{}\u{0}{}\u{0}{to}\u{0}{input}\u{0}{priority}",
                        m.unwrap_or(""),
                        output.unwrap_or("")
                    );
                },
                || Sent {
                    from: match m {
                        Some(m) => format!("{d}/{m}"),
                        None => d.to_owned(),
                    },
                    to: to.to_owned(),
                    from_route_output: output.unwrap_or("").to_owned(),
                    to_route_input: input.to_owned(),
                    priority: priority.to_string(),
                },
            )
            .inc();
        });
    }

    /// Counts a twin read by `id`.
    pub fn gettwin(&self, id: &str) {
        self.gettwin
            .get_or_create(&SourceId {
                source: "edge_hub".to_owned(),
                id: id.to_owned(),
            })
            .inc();
    }

    /// Counts a reported-properties patch from `id`.
    pub fn reported_properties(&self, id: &str) {
        self.reported
            .get_or_create(&TargetId {
                target: "edge_hub".to_owned(),
                id: id.to_owned(),
            })
            .inc();
    }

    /// Counts a direct method relayed from `from` to `to`.
    pub fn direct_method(&self, from: &str, to: &str) {
        self.methods
            .get_or_create(&FromTo {
                from: from.to_owned(),
                to: to.to_owned(),
            })
            .inc();
    }

    /// Counts a client connection accepted (CONNACK 0).
    pub fn client_connected(&self, id: &str) {
        self.connect_success
            .get_or_create(&Id { id: id.to_owned() })
            .inc();
    }

    /// Counts a refused connection of (claimed) client `id`.
    pub fn client_connect_failed(&self, id: &str, reason: &str) {
        let mut l = IdReason {
            id: id.to_owned(),
            reason: reason.to_owned(),
        };
        if self.connect_failed.get(&l).is_none() {
            // A new label set (a race may let a few more in: a bound, not a count).
            if self.failed_ids.fetch_add(1, Ordering::Relaxed) >= MAX_FAILED_IDS {
                "other".clone_into(&mut l.id);
            }
        }
        self.connect_failed.get_or_create(&l).inc();
    }

    /// Counts a message from `client` on `output` the store refused (not
    /// acknowledged: the client sends it again).
    pub fn unack_storage_failure(&self, client: &ClientId, output: Option<&str>) {
        self.unack
            .get_or_create(&Dropped {
                reason: "storage_failure".to_owned(),
                from: client.to_string(),
                from_route_output: output.unwrap_or("").to_owned(),
            })
            .inc();
    }

    /// Counts a client disconnection.
    pub fn client_disconnected(&self, id: &str) {
        self.disconnect
            .get_or_create(&Id { id: id.to_owned() })
            .inc();
    }

    /// Brings the scrape-time series up to date and encodes everything.
    pub async fn render(&self, state: &HubState) -> String {
        let registry = self.registry.lock().await;
        let s = &state.stats;
        match state.store.queues().await {
            Ok(queues) => {
                // TTL drops: the store's (every queue) plus those of
                // `$upstream` messages expired while held in memory, which
                // the upstream count has on top of its queue's.
                let upstream_in_store: u64 = queues
                    .iter()
                    .filter(|q| q.endpoint == crate::upstream::ENDPOINT)
                    .map(|q| q.expired)
                    .sum();
                let held = s
                    .upstream
                    .expired
                    .load(Ordering::Relaxed)
                    .saturating_sub(upstream_in_store);
                // The two are read at different moments: never let the
                // counter go back (Prometheus would take it for a restart).
                self.dropped
                    .get_or_create(&Dropped {
                        reason: "ttl_expiry".to_owned(),
                        from: String::new(),
                        from_route_output: String::new(),
                    })
                    .inner()
                    .fetch_max(state.store.expired_count() + held, Ordering::Relaxed);
                // Queues that went away disappear from the exposition.
                self.queue_length.clear();
                for q in queues {
                    self.queue_length
                        .get_or_create(&Queue {
                            endpoint: q.endpoint,
                            priority: q.priority.to_string(),
                        })
                        .set(i64::try_from(q.depth).unwrap_or(i64::MAX));
                }
            }
            Err(e) => tracing::warn!(error = %e, "metrics: cannot list the store's queues"),
        }
        self.connected_clients
            .set(i64::try_from(state.clients.connected_count()).unwrap_or(i64::MAX));
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.store_bytes.set(gauge(state.store.stored_bytes()));
        match state.store.max_bytes() {
            Some(max) => self.store_max_bytes.set(gauge(max)),
            None => self.store_max_bytes.set(-1),
        };
        let mirror = |c: &Counter, v: &std::sync::atomic::AtomicU64| {
            c.inner()
                .store(v.load(Ordering::Relaxed), Ordering::Relaxed);
        };
        mirror(&self.stored, &s.stored);
        mirror(&self.refused, &s.refused);
        mirror(&self.dead_lettered, &s.dead_lettered);
        self.damaged
            .inner()
            .store(state.store.damaged_count(), Ordering::Relaxed);
        for (reason, v) in [
            ("no_identity", &s.upstream.dropped_no_identity),
            ("unsendable", &s.upstream.dropped_unsendable),
        ] {
            mirror(
                &self.upstream_dropped.get_or_create(&Reason {
                    reason: reason.to_owned(),
                }),
                v,
            );
        }
        let senders = s.upstream.senders();
        self.upstream_backlog.clear();
        self.upstream_connected.clear();
        for (id, st) in senders {
            let label = Sender { sender: id };
            self.upstream_backlog
                .get_or_create(&label)
                .set(gauge(st.waiting));
            self.upstream_connected
                .get_or_create(&label)
                .set(i64::from(st.status == "connected"));
        }
        verge_metrics::encode(&registry)
    }
}

/// Entries a per-thread cache holds before it starts over.
const CACHE_MAX: usize = 4096;

/// Numbers the [`HubMetrics`] of this process (0 = none: an empty cache).
static NEXT_INSTANCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

thread_local! {
    static RECEIVED: RefCell<LocalCounters> = RefCell::new(LocalCounters::default());
    static DROPPED: RefCell<LocalCounters> = RefCell::new(LocalCounters::default());
    static SENT: RefCell<LocalCounters> = RefCell::new(LocalCounters::default());
}

/// A worker thread's map from a label key (written into a reused buffer:
/// no allocation once warm) to the counter of a [`Family`]; the family's
/// lock is taken only the first time a thread meets a label set. A counter
/// handle shares its value with the family, so the cache can be dropped
/// any time (it is, past [`CACHE_MAX`] entries: label sets come and go with
/// clients).
#[derive(Default)]
struct LocalCounters {
    map: HashMap<String, Counter>,
    key: String,
    /// The [`HubMetrics`] the entries belong to (a second hub in the
    /// process, as in tests, resets the cache).
    owner: u64,
}

impl LocalCounters {
    fn get<L>(
        &mut self,
        owner: u64,
        family: &Family<L, Counter>,
        write_key: impl FnOnce(&mut String),
        labels: impl FnOnce() -> L,
    ) -> &Counter
    where
        L: Clone + std::hash::Hash + Eq + EncodeLabelSet + Send + Sync + std::fmt::Debug + 'static,
    {
        if self.owner != owner || self.map.len() >= CACHE_MAX {
            self.map.clear();
            self.owner = owner;
        }
        self.key.clear();
        write_key(&mut self.key);
        if !self.map.contains_key(self.key.as_str()) {
            let c = family.get_or_create_owned(&labels());
            self.map.insert(self.key.clone(), c);
        }
        // Present: inserted just above if it was not.
        self.map
            .get(self.key.as_str())
            .unwrap_or_else(|| unreachable!("inserted above"))
    }
}

/// The listener settings: `[metrics]` of the config file (its address
/// defaults to the MQTT listener's, port 9600: a hub kept on loopback keeps
/// its metrics there too), overridden by the environment (`MetricsEnabled`,
/// `Metrics__Listener__*`), as a manifest's `env` sets them.
pub fn settings(cfg: &Config) -> Result<verge_metrics::Settings, String> {
    let m = &cfg.metrics;
    let base = verge_metrics::Settings {
        enabled: m.enabled,
        addr: m.listen.unwrap_or_else(|| {
            std::net::SocketAddr::new(cfg.listen.mqtt.ip(), verge_metrics::DEFAULT_PORT)
        }),
        suffix: m.suffix.trim_matches('/').to_owned(),
    };
    base.with_env().map_err(|e| format!("metrics: {e}"))
}

/// The hub as a metrics source.
pub struct Source(pub Arc<HubState>);

impl verge_metrics::Source for Source {
    async fn render(&self) -> String {
        self.0.metrics.render(&self.0).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn count(m: &HubMetrics, id: &str, out: &str) -> u64 {
        m.received
            .get(&Received {
                route_output: out.to_owned(),
                id: id.to_owned(),
            })
            .map_or(0, |c| c.get())
    }

    #[test]
    fn per_thread_cache_counts_into_its_own_hub() {
        let a = HubMetrics::new("h", "d");
        let b = HubMetrics::new("h", "d");
        let m1: ClientId = "d/m1".parse().unwrap();
        let m2: ClientId = "d/m2".parse().unwrap();
        for _ in 0..3 {
            a.received(&m1, Some("o"));
        }
        // Same thread, same labels, another hub: its own counter.
        b.received(&m1, Some("o"));
        a.received(&m1, Some("o"));
        a.received(&m2, None);
        assert_eq!(count(&a, "d/m1", "o"), 4);
        assert_eq!(count(&b, "d/m1", "o"), 1);
        assert_eq!(count(&a, "d/m2", ""), 1);
        // Another thread shares the family.
        std::thread::scope(|s| {
            s.spawn(|| a.received(&m1, Some("o")));
        });
        assert_eq!(count(&a, "d/m1", "o"), 5);
    }

    #[test]
    fn nothing_is_counted_per_message_once_stopped() {
        let m = HubMetrics::new("h", "d");
        let c: ClientId = "d/m1".parse().unwrap();
        m.received(&c, Some("o"));
        m.stop_per_message();
        m.received(&c, Some("o"));
        m.dropped_no_route(&c, Some("o"));
        m.sent((Some("d"), Some("m1")), Some("o"), "d/m2", "in", 0);
        assert_eq!(count(&m, "d/m1", "o"), 1);
        assert_eq!(
            m.dropped
                .get(&Dropped {
                    reason: "no_route".into(),
                    from: "d/m1".into(),
                    from_route_output: "o".into(),
                })
                .map_or(0, |c| c.get()),
            0
        );
    }

    #[test]
    fn refused_ids_are_bounded() {
        let m = HubMetrics::new("h", "d");
        for i in 0..MAX_FAILED_IDS + 50 {
            m.client_connect_failed(&format!("x{i}"), "bad_token");
        }
        let other = m
            .connect_failed
            .get(&IdReason {
                id: "other".to_owned(),
                reason: "bad_token".to_owned(),
            })
            .map(|c| c.get());
        assert_eq!(other, Some(50));
    }
}
