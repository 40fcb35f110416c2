//! One identity's MQTT link to the cloud: connect (refusals told apart
//! from network failures), serve a session (telemetry requests from the
//! drain, twin GET and reported patches, keep-alive, token renewal),
//! reconnect.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeFilter,
    SubscribeReasonCode,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use verge_core::{ClientId, SasToken, SharedAccessKey};

use super::relay::{TwinReq, TwinState, on_publish, twin_get, twin_response};
use super::{
    API_VERSION, Ack, HANDSHAKE_TIMEOUT, LinkState, MAX_INBOUND_PACKET, MAX_OUTBOUND_PACKET,
    MAX_RELAYS, PIPELINE_BATCHES, REFUSED_BACKOFF_MAX, RENEW_MARGIN_SECS, Request, Sent, Shared,
    TOKEN_TTL_SECS, Upstream, WRITE_BURST_BYTES,
};
use crate::HubState;
use crate::config::UpstreamConfig;

/// How a connected session ended.
pub(super) enum End {
    /// The drain is gone (hub stopping).
    Closed,
    /// The token is about to expire: reconnect now with a fresh one.
    Renew,
    /// The link failed.
    Lost(String),
    /// The cloud refused the identity (CONNECT return code, CBS status,
    /// or an attach refused as unauthorized).
    Refused(String),
    /// The session ended for idleness (`upstream.idle_timeout_secs`): the
    /// link stays "up" and opens it again on demand.
    Idle,
}

/// Something a link's helper tasks (method and C2D relays) ask its session
/// to send.
pub(super) enum Op {
    /// A cloud method call's answer, to request `rid`.
    MethodAnswer {
        rid: String,
        status: i64,
        payload: Bytes,
    },
    /// A C2D message received in session `generation` was acknowledged by
    /// the leaf device (= complete) or not in time (= abandon, where the
    /// transport can say so). Dropped if the session has changed since:
    /// MQTT packet ids and AMQP deliveries belong to their connection.
    C2dDone {
        generation: u64,
        tag: C2dTag,
        delivered: bool,
    },
}

/// How the cloud's C2D delivery is settled, by transport.
pub(super) enum C2dTag {
    /// The PUBLISH's packet id (PUBACK = complete; MQTT cannot abandon).
    Mqtt(u16),
    /// The AMQP delivery (accepted = complete, released = abandon).
    Amqp(fe2o3_amqp::link::delivery::DeliveryInfo),
}

/// A link task's long-lived parts, kept across its sessions.
pub(super) struct LinkIo {
    pub(super) state: Arc<HubState>,
    /// The identity (`d` or `d/m`).
    pub(super) name: String,
    /// A downstream device (gets C2D).
    pub(super) leaf: bool,
    pub(super) rx: mpsc::Receiver<Request>,
    pub(super) ops_tx: mpsc::Sender<Op>,
    pub(super) ops_rx: mpsc::Receiver<Op>,
    /// Method and C2D relays in progress (aborted with the link).
    pub(super) relays: JoinSet<()>,
    /// Counts sessions, so a relay's PUBACK goes only to the connection
    /// its publish came on.
    pub(super) generation: u64,
    /// Counts lost connections (a token renewal keeps it): the drain's
    /// requests of an older epoch are not sent.
    pub(super) epoch: u64,
    /// Changes when a reported patch is queued.
    pub(super) reported: watch::Receiver<u64>,
    /// A request taken while the session was closed for idleness: the
    /// reopened session sends it first.
    pub(super) stash: Option<Request>,
    /// How long a quiet session stays open (`upstream.idle_timeout_secs`);
    /// `None`: always (`close_on_idle = false`, or the edge's own identity).
    pub(super) idle_limit: Option<Duration>,
}

/// One identity's link: connect, serve, reconnect, forever.
pub(super) async fn run_link(
    shared: Arc<Shared>,
    state: Arc<HubState>,
    id: ClientId,
    // The identity the CONNECT token is signed as: `id`, or the hub's own
    // when it carries an X.509 leaf on its behalf.
    signer: ClientId,
    key: SharedAccessKey,
    rx: mpsc::Receiver<Request>,
    link_state: watch::Sender<LinkState>,
) {
    let name = id.to_string();
    let is_edge = id.module.is_none() && id.device.as_str() == state.cfg.device_id;
    let (ops_tx, ops_rx) = mpsc::channel(MAX_RELAYS);
    let mut io = LinkIo {
        reported: state.twins.reported_watch(),
        leaf: id.module.is_none() && !is_edge,
        name: name.clone(),
        state: state.clone(),
        rx,
        ops_tx,
        ops_rx,
        relays: JoinSet::new(),
        generation: 0,
        epoch: 0,
        stash: None,
        // edgeHub's idle close; never for the edge's own identity (the
        // connectivity probe, the routes' twin).
        idle_limit: (shared.up.cfg.close_on_idle && !is_edge)
            .then(|| Duration::from_secs(shared.up.cfg.idle_timeout_secs)),
    };
    let stats = &state.stats.upstream;
    let interval = Duration::from_millis(shared.up.cfg.reconnect_ms);
    // Pause before the next attempt after a refusal: doubles up to
    // REFUSED_BACKOFF_MAX, so an identity the cloud does not know (or whose
    // key is wrong) costs it one CONNECT a minute, not one per interval.
    let mut refused_backoff = interval;
    // Last logged state, so transitions are logged once, not per attempt.
    let mut logged: Option<&'static str> = None;
    let set = |s: LinkState| {
        stats.set_link(&name, &s);
        let up = matches!(s, LinkState::Up(_));
        link_state.send_replace(s);
        if is_edge && stats.online.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!("upstream online");
            } else {
                tracing::warn!("upstream offline");
            }
        }
    };
    set(LinkState::Down("connecting".into()));
    // With AMQP, the shared connection's state: a link waiting for it
    // tries again the moment it comes up.
    let mut amqp_state = shared.amqp.as_ref().map(super::amqp::Mux::watch);
    loop {
        let started = Instant::now();
        let attempt = match &shared.amqp {
            None => {
                tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(&shared.up, &id, &signer, &key))
                    .await
                    .map(|r| r.map(Carried::Mqtt))
            }
            Some(mux) => tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                super::amqp::open(mux, &shared.up, &id, &signer, &key, is_edge),
            )
            .await
            .map(|r| r.map(Carried::Amqp)),
        };
        let end = match attempt {
            Ok(Ok(carried)) => {
                if logged != Some("up") {
                    tracing::info!(identity = %name, "upstream link connected");
                }
                logged = Some("up");
                refused_backoff = interval;
                set(LinkState::Up(io.epoch));
                shared.link_up.notify_one();
                io.generation += 1;
                match carried {
                    // A token renewal keeps the link "up": requests wait in
                    // the channel for the next session instead of failing.
                    Carried::Mqtt(stream) => session(&shared.up.cfg, stream, &mut io).await,
                    Carried::Amqp(opened) => {
                        super::amqp::session(&shared, opened, &id, &signer, &key, &mut io).await
                    }
                }
            }
            Ok(Err(ConnectError::Refused(code))) => End::Refused(code),
            Ok(Err(ConnectError::Failed(e))) => End::Lost(e),
            Err(_) => End::Lost("connection attempt timed out".into()),
        };
        let lost = matches!(end, End::Lost(_));
        let now = Instant::now();
        // At least a short pause, so a cloud that accepts and then drops us
        // at once is not hammered.
        let next = match end {
            End::Closed => return,
            End::Renew => continue,
            End::Idle => {
                tracing::debug!(identity = %name, "upstream session ended while idle; opened again on demand");
                if !wait_for_demand(&mut io, &mut amqp_state).await {
                    return;
                }
                continue;
            }
            End::Lost(why) => {
                io.epoch += 1;
                if logged != Some("down") {
                    tracing::warn!(identity = %name, reason = %why, retry_every = ?interval, "upstream link down");
                } else {
                    tracing::debug!(identity = %name, reason = %why, "upstream connection attempt failed");
                }
                logged = Some("down");
                set(LinkState::Down(why));
                (started + interval).max(now + Duration::from_millis(10))
            }
            End::Refused(code) => {
                io.epoch += 1;
                if logged != Some("refused") {
                    tracing::warn!(
                        identity = %name,
                        code = %code,
                        "upstream: the cloud refused this identity; its messages wait (others pass), retrying with back-off"
                    );
                } else {
                    tracing::debug!(identity = %name, code = %code, retry_in = ?refused_backoff, "upstream identity still refused");
                }
                logged = Some("refused");
                set(LinkState::Refused(code));
                let at = started + refused_backoff;
                refused_backoff = (refused_backoff * 2).min(REFUSED_BACKOFF_MAX).max(interval);
                at.max(now + Duration::from_millis(10))
            }
        };
        // While down, fail what the drain sends (it checks the link state
        // first, so this only catches races) instead of queueing it, and
        // drop what relays finish: the cloud's side of those is gone with
        // the connection (it redelivers C2D; a method caller times out).
        loop {
            tokio::select! {
                r = io.rx.recv() => match r {
                    Some(req) => drop(req),
                    None => return,
                },
                Some(op) = io.ops_rx.recv() => drop(op),
                Some(_) = io.relays.join_next(), if !io.relays.is_empty() => {}
                () = tokio::time::sleep_until(next) => break,
                true = super::amqp::Mux::came_up(&mut amqp_state), if lost => break,
            }
        }
    }
}

impl LinkIo {
    /// Nothing of this identity's waits on its link but what the session
    /// counts itself: no client of it connected here, no reported patch
    /// queued, no relay running, no request kept for it.
    pub(super) fn quiet(&self) -> bool {
        self.relays.is_empty()
            && self.stash.is_none()
            && !self.state.sessions.is_connected(&self.name)
            && !self.state.twins.has_pending_reported(&self.name)
    }
}

/// The next telemetry request: the one kept while the session was closed
/// for idleness, else the drain's. Cancel-safe (the kept one is taken only
/// when the future is ready at once).
pub(super) async fn next_request(
    stash: &mut Option<Request>,
    rx: &mut mpsc::Receiver<Request>,
) -> Option<Request> {
    if let Some(r) = stash.take() {
        return Some(r);
    }
    rx.recv().await
}

/// While an identity's session is closed for idleness: waits until it has
/// something to do (a telemetry request, kept in `io.stash`; a reported
/// patch; its client connecting here). False: the hub is stopping.
async fn wait_for_demand(
    io: &mut LinkIo,
    amqp_state: &mut Option<watch::Receiver<super::amqp::MuxState>>,
) -> bool {
    let mut sessions = io.state.sessions.watch();
    sessions.borrow_and_update();
    loop {
        if io.state.sessions.is_connected(&io.name) || io.state.twins.has_pending_reported(&io.name)
        {
            return true;
        }
        tokio::select! {
            r = io.rx.recv() => match r {
                Some(req) => {
                    io.stash = Some(req);
                    return true;
                }
                None => return false,
            },
            Ok(()) = io.reported.changed() => {}
            Ok(()) = sessions.changed() => {}
            // Nothing is relayed without a session; a stale one is dropped.
            Some(op) = io.ops_rx.recv() => drop(op),
            Some(_) = io.relays.join_next(), if !io.relays.is_empty() => {}
            // A new connection changes nothing here; seen, so not pending.
            true = super::amqp::Mux::came_up(amqp_state) => {}
        }
    }
}

/// What a successful connection attempt opened.
enum Carried {
    /// The identity's own MQTT connection.
    Mqtt(verge_dial::CloudStream),
    /// The identity's session on the shared AMQP connection.
    Amqp(super::amqp::Opened),
}

/// Why a connection attempt failed.
pub(super) enum ConnectError {
    /// The cloud answered CONNACK with a refusal (return code).
    Refused(String),
    /// Anything else: network, TLS, protocol, time-out.
    Failed(String),
}

/// Dials the cloud (TLS on 8883, or WebSocket on 443, maybe through a
/// proxy: [`super::transport`]) and completes CONNECT as `id`.
async fn connect(
    up: &Upstream,
    id: &ClientId,
    signer: &ClientId,
    key: &SharedAccessKey,
) -> Result<verge_dial::CloudStream, ConnectError> {
    let mut stream = up
        .transport
        .dialer
        .dial()
        .await
        .map_err(|e| ConnectError::Failed(e.to_string()))?;
    let (token, _) = sign(up, signer, key);
    let mut c = Connect::new(id.to_string());
    c.keep_alive = up.cfg.keep_alive_secs;
    // Subscriptions are made again on every connection, and in-flight
    // state lives in the store and the twins' queues: nothing to keep.
    c.clean_session = true;
    c.set_credentials(
        format!(
            "{}/{id}/?api-version={API_VERSION}&DeviceClientType={}",
            up.hub_host,
            verge_core::sas::url_encode(concat!("verge-hub/", env!("CARGO_PKG_VERSION")))
        ),
        token.to_string(),
    );
    write_packet(&mut stream, &Packet::Connect(c))
        .await
        .map_err(|e| ConnectError::Failed(format!("sending CONNECT: {e}")))?;
    let mut buf = BytesMut::with_capacity(64);
    match read_packet(&mut stream, &mut buf)
        .await
        .map_err(ConnectError::Failed)?
    {
        Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => Ok(stream),
        // The identity or its credentials: trying again at once would be
        // refused again.
        Packet::ConnAck(a)
            if matches!(
                a.code,
                ConnectReturnCode::NotAuthorized
                    | ConnectReturnCode::BadUserNamePassword
                    | ConnectReturnCode::BadClientId
            ) =>
        {
            Err(ConnectError::Refused(format!("{:?}", a.code)))
        }
        // e.g. ServiceUnavailable (throttled): like a network failure.
        Packet::ConnAck(a) => Err(ConnectError::Failed(format!(
            "CONNECT refused: {:?}",
            a.code
        ))),
        other => Err(ConnectError::Failed(format!(
            "expected CONNACK, got {:?}",
            other.packet_type()
        ))),
    }
}

/// A SAS token for `signer`'s resource ([`TOKEN_TTL_SECS`]) and its expiry.
pub(super) fn sign(up: &Upstream, signer: &ClientId, key: &SharedAccessKey) -> (SasToken, u64) {
    let expiry = crate::auth::unix_now() + TOKEN_TTL_SECS;
    let resource = format!("{}{}", up.hub_host, signer.resource());
    (SasToken::sign(&resource, key, expiry, None), expiry)
}

pub(super) async fn write_packet<W: AsyncWrite + Unpin>(
    w: &mut W,
    p: &Packet,
) -> Result<(), String> {
    let mut out = BytesMut::new();
    p.write(&mut out, MAX_OUTBOUND_PACKET)
        .map_err(|e| format!("cannot encode: {e}"))?;
    w.write_all(&out).await.map_err(|e| e.to_string())?;
    w.flush().await.map_err(|e| e.to_string())
}

/// Reads one packet. Cancel-safe: bytes read stay in `buf`.
async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> Result<Packet, String> {
    loop {
        if !buf.is_empty() {
            match Packet::read(buf, MAX_INBOUND_PACKET) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(format!("malformed packet from the cloud: {e}")),
            }
        }
        match r.read_buf(buf).await {
            Ok(0) => return Err("connection closed by the cloud".into()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// What a session must do after handling an inbound packet.
pub(super) enum Next {
    Continue,
    /// GET the full twin (desired versions were skipped).
    Resync,
}

/// Serves a connected link: subscribes (twin responses, desired patches,
/// methods, C2D for a downstream device), GETs the twin, publishes
/// telemetry requests and completes them on PUBACK, sends queued reported
/// patches one at a time, relays what the cloud sends, keeps the
/// connection alive. In-flight requests are dropped (= failed) when it ends.
async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    cfg: &UpstreamConfig,
    stream: S,
    io: &mut LinkIo,
) -> End {
    let mut busy_at = Instant::now();
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(1024);
    let mut inflight: VecDeque<(u16, Instant, Ack)> = VecDeque::new();
    let max_inflight = cfg.batch_size * PIPELINE_BATCHES;
    let ack_timeout = Duration::from_secs(cfg.ack_timeout_secs);
    // Packet id 1 is the SUBSCRIBE's; publishes use 2.. (its SUBACK is
    // back long before the ids wrap around).
    let mut next_pkid: u16 = 1;
    let mut ping = tokio::time::interval(Duration::from_secs(u64::from(cfg.keep_alive_secs) / 2));
    ping.tick().await; // the first tick is immediate
    let mut ping_outstanding = false;
    let renew_at = Instant::now() + Duration::from_secs(TOKEN_TTL_SECS - RENEW_MARGIN_SECS);

    // Clean session: subscribe afresh on every connection.
    let mut filters = vec![
        SubscribeFilter::new("$iothub/twin/res/#".into(), QoS::AtMostOnce),
        SubscribeFilter::new(
            "$iothub/twin/PATCH/properties/desired/#".into(),
            QoS::AtLeastOnce,
        ),
        SubscribeFilter::new("$iothub/methods/POST/#".into(), QoS::AtLeastOnce),
    ];
    if io.leaf {
        filters.push(SubscribeFilter::new(
            format!("devices/{}/messages/devicebound/#", io.name),
            QoS::AtLeastOnce,
        ));
    }
    let mut sub = Subscribe::new_many(filters);
    sub.pkid = 1;
    if let Err(e) = write_packet(&mut wr, &Packet::Subscribe(sub)).await {
        return End::Lost(e);
    }
    let mut twin = TwinState::new(ack_timeout);
    let mut next_rid: u64 = 0;
    let mut rid = || {
        next_rid += 1;
        format!("{next_rid:x}")
    };
    // The cloud's twin first; reported patches wait for it, so the GET's
    // answer cannot already contain a patch still in the queue.
    let r = rid();
    if let Err(e) = twin_get(&mut wr, &r).await {
        return End::Lost(e);
    }
    twin.sent(r, TwinReq::Sync);

    loop {
        // Send the next queued reported patch when nothing else of this
        // identity's twin is in flight.
        io.reported.borrow_and_update();
        if let Some(p) = twin.next_reported(io) {
            let r = rid();
            let mut pb = Publish::new(
                format!("$iothub/twin/PATCH/properties/reported/?$rid={r}"),
                QoS::AtMostOnce,
                Vec::new(),
            );
            pb.payload = serde_json::to_vec(&p.patch).unwrap_or_default().into();
            if let Err(e) = write_packet(&mut wr, &Packet::Publish(pb)).await {
                return End::Lost(e);
            }
            twin.sent(r, TwinReq::Reported(p.seq));
        }
        let twin_deadline = twin.deadline();
        let ack_deadline = inflight.front().map(|(_, at, _)| *at + ack_timeout);
        // Past the renewal time, take nothing new so the inflight window
        // empties and the link can reconnect with a fresh token.
        let renewing = Instant::now() >= renew_at;
        if !(inflight.is_empty() && twin.is_empty() && io.quiet()) {
            busy_at = Instant::now();
        }
        let close_at = io.idle_limit.map(|limit| busy_at + limit);
        tokio::select! {
            r = read_packet(&mut rd, &mut buf) => match r {
                Ok(Packet::PubAck(a)) => {
                    if let Some(pos) = inflight.iter().position(|(id, _, _)| *id == a.pkid)
                        && let Some((_, _, tx)) = inflight.remove(pos)
                    {
                        tx.send(Sent::Acked);
                    }
                }
                Ok(Packet::SubAck(a)) => {
                    if a.return_codes.contains(&SubscribeReasonCode::Failure) {
                        tracing::warn!(identity = %io.name, codes = ?a.return_codes, "the cloud refused a subscription");
                    }
                }
                Ok(Packet::Publish(p)) => {
                    let twin_res = twin_response(&p.topic);
                    if let Some((status, r)) = twin_res {
                        match twin.take(&r) {
                            Some(kind) => twin.answered(io, kind, status, &p.payload).await,
                            None => tracing::debug!(identity = %io.name, rid = %r, "twin response for no request"),
                        }
                        continue;
                    }
                    match on_publish(io, p, &mut wr).await {
                        Ok(Next::Continue) => {}
                        Ok(Next::Resync) => {
                            if !twin.syncing() {
                                let r = rid();
                                if let Err(e) = twin_get(&mut wr, &r).await {
                                    return End::Lost(e);
                                }
                                twin.sent(r, TwinReq::Sync);
                            }
                        }
                        Err(e) => return End::Lost(e),
                    }
                }
                Ok(Packet::PingResp) => ping_outstanding = false,
                Ok(Packet::Disconnect) => return End::Lost("the cloud sent DISCONNECT".into()),
                Ok(other) => {
                    tracing::debug!(packet = ?other.packet_type(), "upstream: unexpected packet ignored");
                }
                Err(e) => return End::Lost(e),
            },
            r = next_request(&mut io.stash, &mut io.rx), if inflight.len() < max_inflight && !renewing => {
                let Some(mut req) = r else { return End::Closed };
                busy_at = Instant::now();
                // Everything already waiting (up to the window) goes out in
                // one write: one TLS record and syscall per burst, not per
                // message.
                let mut out = BytesMut::new();
                loop {
                    if req.epoch != io.epoch || req.ack.is_closed() {
                        // Sent before a lost connection, or abandoned by the
                        // drain: it goes out again from the store, in order.
                        drop(req);
                    } else {
                        // A packet id not in flight (never 0 or 1).
                        loop {
                            next_pkid = next_pkid.checked_add(1).unwrap_or(2);
                            if !inflight.iter().any(|(id, _, _)| *id == next_pkid) {
                                break;
                            }
                        }
                        let mut p = Publish::from_bytes(req.topic, QoS::AtLeastOnce, req.payload);
                        p.pkid = next_pkid;
                        if let Err(e) = Packet::Publish(p).write(&mut out, MAX_OUTBOUND_PACKET) {
                            // Not sendable at all (the drain checks first, so
                            // this is a safety net): settle it, not the link.
                            tracing::warn!(identity = %io.name, error = %e, "upstream message cannot be encoded");
                            req.ack.send(Sent::Unsendable);
                        } else {
                            inflight.push_back((next_pkid, Instant::now(), req.ack));
                        }
                    }
                    if inflight.len() >= max_inflight || out.len() >= WRITE_BURST_BYTES {
                        break;
                    }
                    match io.rx.try_recv() {
                        Ok(next) => req = next,
                        Err(_) => break,
                    }
                }
                if let Err(e) = wr.write_all(&out).await {
                    return End::Lost(e.to_string());
                }
                if let Err(e) = wr.flush().await {
                    return End::Lost(e.to_string());
                }
            }
            Some(op) = io.ops_rx.recv() => {
                let packet = match op {
                    Op::MethodAnswer { rid, status, payload } => Some(Packet::Publish(Publish::from_bytes(
                        format!("$iothub/methods/res/{status}/?$rid={rid}"),
                        QoS::AtMostOnce,
                        payload,
                    ))),
                    Op::C2dDone { generation, tag: C2dTag::Mqtt(pkid), delivered: true }
                        if generation == io.generation =>
                    {
                        Some(Packet::PubAck(PubAck::new(pkid)))
                    }
                    // Not acknowledged: MQTT has no abandon; the cloud
                    // redelivers after this connection ends.
                    Op::C2dDone { .. } => None,
                };
                if let Some(packet) = packet
                    && let Err(e) = write_packet(&mut wr, &packet).await
                {
                    return End::Lost(e);
                }
            }
            Ok(()) = io.reported.changed() => {}
            () = sleep_until_opt(twin.retry_at()) => {}
            () = sleep_until_opt(twin_deadline) => twin.expire(&io.name),
            Some(_) = io.relays.join_next(), if !io.relays.is_empty() => {}
            _ = ping.tick() => {
                if ping_outstanding {
                    return End::Lost("no PINGRESP within the keep-alive".into());
                }
                if let Err(e) = write_packet(&mut wr, &Packet::PingReq).await {
                    return End::Lost(e);
                }
                ping_outstanding = true;
            }
            () = sleep_until_opt(close_at) => {
                // Checked again at the deadline (a client may have connected).
                if io.quiet() && io.rx.is_empty() {
                    let _ = write_packet(&mut wr, &Packet::Disconnect).await;
                    return End::Idle;
                }
                busy_at = Instant::now();
            }
            () = sleep_until_opt(ack_deadline) => {
                return End::Lost(format!("no PUBACK within {}s", cfg.ack_timeout_secs));
            }
            () = tokio::time::sleep_until(renew_at), if inflight.is_empty() && twin.is_empty() => {
                let _ = write_packet(&mut wr, &Packet::Disconnect).await;
                return End::Renew;
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
