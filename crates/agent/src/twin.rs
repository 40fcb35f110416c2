//! The agent's own module twin (`{device}/$edgeAgent`) in the cloud: the
//! deployment comes in as its desired properties, the status goes out as its
//! reported properties.
//!
//! As Azure's edgeAgent does, the agent talks to IoT Hub (or verge-cloud)
//! directly, not through the edge hub: the hub may not run yet, and it is the
//! agent that starts it. [`TwinLink::spawn`] starts one task that owns the
//! connection ([`verge_sdk::ModuleClient`]: reconnects, renews tokens through
//! the workload API) and talks to the reconcile loop through two `watch`
//! channels, so both directions keep only the latest document (bounded, and
//! a stale deployment or status is worth nothing once a newer one exists):
//!
//! * **desired**: at every (re)connection and after every desired-property
//!   patch the task GETs the whole twin and publishes its `desired` part. Re-
//!   reading the whole twin instead of merging patches is simpler and cannot
//!   drift from the cloud's copy (a missed or reordered patch heals itself).
//! * **reported**: the reconcile loop hands over the reported document it
//!   writes to `reported.json`; the task sends the difference from what the
//!   cloud holds as a JSON merge patch (removed keys become `null`, so a
//!   removed module disappears from the twin), at most once per `min_gap`.
//!   While offline nothing is sent; on reconnection the twin is read again and
//!   the difference from the cloud's reported properties goes out, so the last
//!   state always arrives and intermediate ones are coalesced.
//! * **direct methods** to `$edgeAgent` are answered on the same link by
//!   [`crate::methods::Methods`] (edgeAgent's built-in methods).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use verge_sdk::{ClientOptions, EdgeEnvironment, Incoming, MethodRequest, ModuleClient};

use crate::methods::Methods;

/// Default minimum interval between two reported patches.
pub const DEFAULT_MIN_GAP: Duration = Duration::from_secs(2);

/// What the twin task needs from a connection; [`ModuleClient`] in the agent,
/// a fake in tests.
#[async_trait]
pub trait TwinTransport: Send + 'static {
    /// Waits until connected; `false` when the connection is gone for good.
    async fn wait_connected(&mut self) -> bool;
    /// Whether the connection is up now.
    fn is_connected(&self) -> bool;
    /// Makes sure desired patches are delivered (before the twin is read, so
    /// none is missed in between).
    async fn subscribe(&mut self) -> Result<(), String>;
    /// `{"desired": {…}, "reported": {…}}`.
    async fn get_twin(&mut self) -> Result<Value, String>;
    /// Sends a reported-properties merge patch.
    async fn patch_reported(&mut self, patch: &Value) -> Result<(), String>;
    /// The next desired patch arrived (its content is not needed: the twin is
    /// read again). `None` when the connection is gone for good. Must be
    /// cancel-safe.
    async fn desired_patch(&mut self) -> Option<()>;
}

/// The SDK module client as a [`TwinTransport`].
struct SdkTransport {
    client: ModuleClient,
    patches: Option<Incoming<Value>>,
    /// Whether the direct-method handler is installed.
    methods: bool,
    /// The direct-method handler.
    handler: Methods,
}

#[async_trait]
impl TwinTransport for SdkTransport {
    async fn wait_connected(&mut self) -> bool {
        loop {
            match self.client.wait_connected(Duration::from_secs(3600)).await {
                Ok(()) => return true,
                Err(verge_sdk::Error::Timeout(_)) => {}
                Err(_) => return false,
            }
        }
    }

    fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    async fn subscribe(&mut self) -> Result<(), String> {
        if !self.methods {
            // The SDK keeps the subscription across reconnections.
            let handler = self.handler.clone();
            self.client
                .on_method(move |req: MethodRequest| {
                    let handler = handler.clone();
                    async move { handler.handle(&req.name, &req.payload).await }
                })
                .await
                .map_err(|e| e.to_string())?;
            self.methods = true;
        }
        if self.patches.is_none() {
            self.patches = Some(
                self.client
                    .desired_patches()
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        Ok(())
    }

    async fn get_twin(&mut self) -> Result<Value, String> {
        self.client.get_twin().await.map_err(|e| e.to_string())
    }

    async fn patch_reported(&mut self, patch: &Value) -> Result<(), String> {
        self.client
            .patch_reported(patch)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn desired_patch(&mut self) -> Option<()> {
        match &mut self.patches {
            Some(p) => p.recv().await.map(|_| ()),
            None => std::future::pending().await,
        }
    }
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct TwinOptions {
    /// The agent's edge environment ([`EdgeEnvironment::from_env_upstream`]).
    pub env: EdgeEnvironment,
    /// Port of the hub (8883 MQTT/TLS, 443 WebSocket; tests move it).
    pub port: u16,
    /// MQTT over WebSocket (`UpstreamProtocol` MqttWs) instead of MQTT/TLS.
    pub websocket: bool,
    /// The HTTP proxy the WebSocket tunnels through (`https_proxy`).
    pub proxy: Option<verge_dial::Proxy>,
    /// A CA to trust besides the workload API's trust bundle and the system roots.
    pub extra_ca_pem: Option<String>,
    /// Minimum interval between two reported patches.
    pub min_gap: Duration,
    /// Answers the direct methods invoked on `$edgeAgent`.
    pub methods: Methods,
}

/// Counters, for logs and tests.
#[derive(Debug, Default)]
pub struct TwinStats {
    /// Twins read.
    pub twin_reads: AtomicU64,
    /// Reported patches the cloud accepted.
    pub patches_sent: AtomicU64,
}

/// The running twin task and its two channels.
#[derive(Debug)]
pub struct TwinLink {
    desired: watch::Receiver<Option<Value>>,
    reported: watch::Sender<Option<Value>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    stats: Arc<TwinStats>,
}

impl TwinLink {
    /// Starts the task: builds the module client (retrying while the workload
    /// API is not reachable) and keeps the twin in sync until [`Self::close`].
    pub fn spawn(opts: TwinOptions) -> Self {
        let gap = opts.min_gap;
        Self::spawn_with(gap, move |stop| connect(opts, stop))
    }

    /// Starts the task over a transport made by `connect` (`None`: stopped
    /// before it was made).
    pub fn spawn_with<T, F, Fut>(min_gap: Duration, connect: F) -> Self
    where
        T: TwinTransport,
        F: FnOnce(watch::Receiver<bool>) -> Fut + Send + 'static,
        Fut: Future<Output = Option<T>> + Send + 'static,
    {
        let (desired_tx, desired) = watch::channel(None);
        let (reported, reported_rx) = watch::channel(None);
        let (stop, stop_rx) = watch::channel(false);
        let stats = Arc::new(TwinStats::default());
        let st = stats.clone();
        let task = tokio::spawn(async move {
            if let Some(t) = connect(stop_rx.clone()).await {
                run(t, desired_tx, reported_rx, stop_rx, min_gap, st).await;
            }
        });
        Self {
            desired,
            reported,
            stop,
            task,
            stats,
        }
    }

    /// Waits until the cloud's desired properties change (cancel-safe).
    /// Never returns once the task has ended.
    pub async fn changed(&mut self) {
        if self.desired.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The latest desired properties from the cloud, if any was read.
    pub fn desired(&mut self) -> Option<Value> {
        self.desired.borrow_and_update().clone()
    }

    /// A sender for the reported document (give it to
    /// [`crate::Agent::report_to`]).
    pub fn reporter(&self) -> watch::Sender<Option<Value>> {
        self.reported.clone()
    }

    /// Counters.
    pub fn stats(&self) -> &TwinStats {
        &self.stats
    }

    /// Stops the task, giving it up to `flush` to send the last reported
    /// document (the agent's "not running" status) if it is connected.
    pub async fn close(self, flush: Duration) {
        let _ = self.stop.send(true);
        let mut task = self.task;
        if tokio::time::timeout(flush, &mut task).await.is_err() {
            tracing::info!("the last reported properties could not be sent in time");
            task.abort();
        }
    }
}

async fn connect(opts: TwinOptions, mut stop: watch::Receiver<bool>) -> Option<SdkTransport> {
    let copts = ClientOptions {
        port: opts.port,
        // One link per device: retrying sooner than the SDK's 30 s default
        // brings a deployment made during an outage in sooner.
        reconnect_max: Duration::from_secs(10),
        operation_timeout: Duration::from_secs(20),
        product_info: "verge-agent".into(),
        websocket: opts.websocket,
        proxy: opts.proxy.clone(),
        ..ClientOptions::default()
    };
    let mut delay = Duration::from_secs(1);
    loop {
        match ModuleClient::from_edge_upstream(
            &opts.env,
            copts.clone(),
            opts.extra_ca_pem.as_deref(),
        )
        .await
        {
            Ok(client) => {
                tracing::info!(
                    client = %client.client_id(),
                    host = %opts.env.gateway_hostname,
                    port = opts.port,
                    "twin link to the cloud started"
                );
                return Some(SdkTransport {
                    client,
                    patches: None,
                    methods: false,
                    handler: opts.methods.clone(),
                });
            }
            Err(e) => tracing::warn!(error = %e, retry_in = ?delay, "cannot set up the twin link"),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stopped(&mut stop) => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Resolves once stop is requested (or the requester is gone); holds no
/// borrow of the channel, so a `select!` over it stays `Send`.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The reported properties in a twin read, without the `$version`/`$metadata` keys.
fn cloud_reported(twin: &Value) -> Value {
    let mut m = twin
        .get("reported")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    m.retain(|k, _| !k.starts_with('$'));
    Value::Object(m)
}

/// Drops `null` members recursively: in a twin, `null` means "absent".
pub fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, strip_nulls(v)))
                .collect(),
        ),
        other => other,
    }
}

/// The JSON merge patch (RFC 7386) turning `old` into `new`, or `None` when
/// they are equal. Both are objects without `null` members.
pub fn merge_diff(old: &Value, new: &Value) -> Option<Value> {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            let d = verge_core::twin::merge_diff(o, n);
            (!d.is_empty()).then_some(Value::Object(d))
        }
        _ => (old != new).then(|| new.clone()),
    }
}

/// Sends what differs between `cloud` and the latest reported document;
/// updates `cloud` on success.
async fn push<T: TwinTransport>(
    t: &mut T,
    cloud: &mut Value,
    latest: Option<Value>,
    stats: &TwinStats,
) -> Result<bool, String> {
    let Some(current) = latest.map(strip_nulls) else {
        return Ok(false);
    };
    let Some(patch) = merge_diff(cloud, &current) else {
        return Ok(false);
    };
    t.patch_reported(&patch).await?;
    stats.patches_sent.fetch_add(1, Ordering::Relaxed);
    *cloud = current;
    Ok(true)
}

async fn run<T: TwinTransport>(
    mut t: T,
    desired_tx: watch::Sender<Option<Value>>,
    mut reported_rx: watch::Receiver<Option<Value>>,
    mut stop: watch::Receiver<bool>,
    min_gap: Duration,
    stats: Arc<TwinStats>,
) {
    let mut last_sent: Option<Instant> = None;
    let pause = Duration::from_secs(1);
    // Wait before the next session; doubles while sessions keep failing (a
    // hub refusing our patches must not be hammered), reset once the cloud
    // holds our reported properties.
    let mut retry = Duration::ZERO;
    'session: loop {
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = stopped(&mut stop) => return,
        }
        retry = (retry * 2).clamp(pause, Duration::from_secs(30));
        tokio::select! {
            up = t.wait_connected() => if !up {
                tracing::warn!("twin link closed");
                return;
            },
            () = stopped(&mut stop) => return,
        }
        if let Err(e) = t.subscribe().await {
            tracing::warn!(error = %e, "cannot subscribe to desired-property patches");
            continue 'session;
        }
        let mut cloud = match read_twin(&mut t, &desired_tx, &stats).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the agent's twin");
                continue 'session;
            }
        };
        let mut dirty = true;
        loop {
            let stopping = *stop.borrow();
            if dirty && stopping {
                // Stopping: send the last document now, without the rate limit.
                let latest = reported_rx.borrow_and_update().clone();
                if let Err(e) = push(&mut t, &mut cloud, latest, &stats).await {
                    tracing::warn!(error = %e, "cannot send the last reported properties");
                }
                return;
            }
            if dirty {
                if let Some(due) = last_sent.map(|t0| t0 + min_gap)
                    && Instant::now() < due
                {
                    // Rate limit: later changes coalesce into this one send.
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => {}
                        () = stopped(&mut stop) => continue,
                    }
                }
                let latest = reported_rx.borrow_and_update().clone();
                match push(&mut t, &mut cloud, latest, &stats).await {
                    Ok(sent) => {
                        if sent {
                            last_sent = Some(Instant::now());
                        }
                        retry = Duration::ZERO;
                    }
                    Err(e) => {
                        // Sent again from a fresh read of the twin once connected.
                        tracing::warn!(error = %e, "reported properties not sent; will retry");
                        continue 'session;
                    }
                }
                dirty = false;
            }
            tokio::select! {
                r = reported_rx.changed() => {
                    if r.is_err() {
                        return;
                    }
                    dirty = true;
                }
                p = t.desired_patch() => {
                    if p.is_none() {
                        tracing::warn!("twin link closed");
                        return;
                    }
                    match read_twin(&mut t, &desired_tx, &stats).await {
                        Ok(c) => {
                            cloud = c;
                            dirty = true;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the agent's twin after a desired patch");
                            continue 'session;
                        }
                    }
                }
                () = tokio::time::sleep(pause) => {
                    if !t.is_connected() {
                        tracing::info!("twin link down; reported properties wait for the reconnection");
                        continue 'session;
                    }
                }
                () = stopped(&mut stop) => dirty = true,
            }
        }
    }
}

/// Reads the twin, publishes its desired part, returns its reported part.
async fn read_twin<T: TwinTransport>(
    t: &mut T,
    desired_tx: &watch::Sender<Option<Value>>,
    stats: &TwinStats,
) -> Result<Value, String> {
    let twin = t.get_twin().await?;
    stats.twin_reads.fetch_add(1, Ordering::Relaxed);
    let desired = twin.get("desired").cloned().unwrap_or(Value::Null);
    desired_tx.send_if_modified(|cur| {
        if cur.as_ref() == Some(&desired) {
            false
        } else {
            *cur = Some(desired);
            true
        }
    });
    Ok(cloud_reported(&twin))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Mutex;
    use tokio::sync::mpsc;

    /// The cloud side of a fake twin: what it holds and what it received.
    #[derive(Default)]
    struct Cloud {
        desired: Value,
        reported: Value,
        patches: Vec<(Instant, Value)>,
        refuse_patches: bool,
        reads: usize,
    }

    struct Fake {
        cloud: Arc<Mutex<Cloud>>,
        up: watch::Receiver<bool>,
        patch_rx: mpsc::Receiver<()>,
    }

    fn apply(target: &mut Value, patch: &Value) {
        match (target.as_object_mut(), patch.as_object()) {
            (Some(t), Some(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else if v.is_object() && t.get(k).is_some_and(Value::is_object) {
                        if let Some(tv) = t.get_mut(k) {
                            apply(tv, v);
                        }
                    } else {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
            _ => *target = patch.clone(),
        }
    }

    #[async_trait]
    impl TwinTransport for Fake {
        async fn wait_connected(&mut self) -> bool {
            self.up.wait_for(|u| *u).await.is_ok()
        }
        fn is_connected(&self) -> bool {
            *self.up.borrow()
        }
        async fn subscribe(&mut self) -> Result<(), String> {
            Ok(())
        }
        async fn get_twin(&mut self) -> Result<Value, String> {
            if !self.is_connected() {
                return Err("offline".into());
            }
            let mut c = self.cloud.lock().unwrap();
            c.reads += 1;
            Ok(json!({"desired": c.desired, "reported": c.reported}))
        }
        async fn patch_reported(&mut self, patch: &Value) -> Result<(), String> {
            if !self.is_connected() {
                return Err("offline".into());
            }
            let mut c = self.cloud.lock().unwrap();
            if c.refuse_patches {
                return Err("400 refused".into());
            }
            apply(&mut c.reported, patch);
            c.patches.push((Instant::now(), patch.clone()));
            Ok(())
        }
        async fn desired_patch(&mut self) -> Option<()> {
            self.patch_rx.recv().await
        }
    }

    async fn patches_reach(cloud: &Mutex<Cloud>, n: usize) -> Vec<(Instant, Value)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let p = cloud.lock().unwrap().patches.clone();
            if p.len() >= n {
                return p;
            }
            assert!(Instant::now() < deadline, "only {} patches: {p:?}", p.len());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn twin_task_follows_desired_and_reports_on_change_rate_limited_and_after_outages() {
        let cloud = Arc::new(Mutex::new(Cloud {
            desired: json!({"$version": 1, "schemaVersion": "1.1"}),
            reported: json!({"$version": 7, "stale": "from an earlier run"}),
            ..Cloud::default()
        }));
        let (up_tx, up) = watch::channel(true);
        let (patch_tx, patch_rx) = mpsc::channel(4);
        let fake = Fake {
            cloud: cloud.clone(),
            up,
            patch_rx,
        };
        let gap = Duration::from_millis(300);
        let mut link = TwinLink::spawn_with(gap, move |_| async move { Some(fake) });
        let report = link.reporter();

        // the desired properties of the first read
        tokio::time::timeout(Duration::from_secs(5), link.changed())
            .await
            .unwrap();
        assert_eq!(link.desired().unwrap()["$version"], 1);

        // first report: everything, and what the cloud had but we do not is removed
        let doc = |x: i64, b: bool| {
            let mut m = json!({"a": {"runtimeStatus": "running"}});
            if b {
                m["b"] = json!({"runtimeStatus": "running"});
            }
            json!({"x": x, "gone": null, "modules": m})
        };
        report.send_replace(Some(doc(1, true)));
        let p = patches_reach(&cloud, 1).await;
        assert_eq!(
            p[0].1,
            json!({"x": 1, "modules": {"a": {"runtimeStatus": "running"}, "b": {"runtimeStatus": "running"}}, "stale": null})
        );
        // quick changes coalesce into one send, no sooner than the gap
        report.send_replace(Some(doc(2, true)));
        report.send_replace(Some(doc(3, true)));
        let p = patches_reach(&cloud, 2).await;
        assert_eq!(p[1].1, json!({"x": 3}));
        assert!(p[1].0 - p[0].0 >= gap, "{:?}", p[1].0 - p[0].0);
        // an unchanged document sends nothing; a removed module becomes null
        report.send_replace(Some(doc(3, true)));
        report.send_replace(Some(doc(3, false)));
        let p = patches_reach(&cloud, 3).await;
        assert_eq!(p[2].1, json!({"modules": {"b": null}}));

        // offline: nothing is sent; after the reconnection the latest goes out
        up_tx.send_replace(false);
        tokio::time::sleep(Duration::from_millis(1200)).await;
        report.send_replace(Some(doc(4, false)));
        report.send_replace(Some(doc(5, false)));
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(cloud.lock().unwrap().patches.len(), 3);
        up_tx.send_replace(true);
        let p = patches_reach(&cloud, 4).await;
        assert_eq!(p[3].1, json!({"x": 5}));
        assert_eq!(
            cloud.lock().unwrap().reported,
            json!({"$version": 7, "x": 5, "modules": {"a": {"runtimeStatus": "running"}}})
        );

        // a desired patch: the whole twin is read again
        let reads = link.stats().twin_reads.load(Ordering::Relaxed);
        cloud.lock().unwrap().desired = json!({"$version": 2, "schemaVersion": "1.1", "n": 1});
        patch_tx.send(()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), link.changed())
            .await
            .unwrap();
        assert_eq!(link.desired().unwrap()["n"], 1);
        assert!(link.stats().twin_reads.load(Ordering::Relaxed) > reads);

        // closing sends the last document at once (no rate limit)
        report.send_replace(Some(doc(6, false)));
        link.close(Duration::from_secs(5)).await;
        let c = cloud.lock().unwrap();
        assert_eq!(c.reported["x"], 6, "{:?}", c.patches);
    }

    #[test]
    fn merge_diff_sets_changes_and_nulls_removals() {
        let old = json!({"a": 1, "m": {"x": {"s": "running"}, "y": {"s": "running"}}, "k": [1]});
        let new = json!({"a": 1, "m": {"x": {"s": "backoff"}}, "k": [1, 2], "n": true});
        assert_eq!(
            merge_diff(&old, &new),
            Some(json!({"m": {"x": {"s": "backoff"}, "y": null}, "k": [1, 2], "n": true}))
        );
        assert_eq!(merge_diff(&new, &new), None);
        assert_eq!(
            merge_diff(&json!({}), &json!({"a": {"b": 1}})),
            Some(json!({"a": {"b": 1}}))
        );
        assert_eq!(
            merge_diff(&json!({"a": 5}), &json!({"a": {"b": 1}})),
            Some(json!({"a": {"b": 1}}))
        );
    }

    #[test]
    fn nulls_are_absent() {
        assert_eq!(
            strip_nulls(json!({"a": null, "b": {"c": null, "d": 1}})),
            json!({"b": {"d": 1}})
        );
        let twin = json!({"reported": {"$version": 3, "$metadata": {}, "x": 1}});
        assert_eq!(cloud_reported(&twin), json!({"x": 1}));
    }

    #[tokio::test]
    async fn a_hub_refusing_reported_patches_is_retried_with_back_off() {
        let cloud = Arc::new(Mutex::new(Cloud {
            desired: json!({"$version": 1}),
            reported: json!({}),
            refuse_patches: true,
            ..Cloud::default()
        }));
        let (_up_tx, up) = watch::channel(true);
        let (_patch_tx, patch_rx) = mpsc::channel(1);
        let fake = Fake {
            cloud: cloud.clone(),
            up,
            patch_rx,
        };
        let link = TwinLink::spawn_with(
            Duration::from_millis(10),
            move |_| async move { Some(fake) },
        );
        link.reporter().send_replace(Some(json!({"x": 1})));
        tokio::time::sleep(Duration::from_millis(3500)).await;
        // sessions at about 0, 1 and 3 s; without the back-off, hundreds
        let reads = cloud.lock().unwrap().reads;
        assert!((2..=4).contains(&reads), "{reads} twin reads");
        // once the hub accepts, the document arrives
        cloud.lock().unwrap().refuse_patches = false;
        let p = patches_reach(&cloud, 1).await;
        assert_eq!(p[0].1, json!({"x": 1}));
        link.close(Duration::from_secs(1)).await;
    }
}
