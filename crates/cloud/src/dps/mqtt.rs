//! DPS over MQTT, as `ProvisioningDeviceClient` of the Azure IoT device SDKs
//! speaks it: CONNECT with username
//! `{idScope}/registrations/{registrationId}/api-version=…` and a SAS
//! password (or, for X.509 attestation, no password and the device's
//! certificate in the TLS handshake), subscribe `$dps/registrations/res/#`, publish
//! `$dps/registrations/PUT/iotdps-register/?$rid={rid}` and
//! `$dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={op}`;
//! answers arrive on `$dps/registrations/res/{status}/?$rid={rid}[&retry-after={s}]`.
//!
//! Why on the device endpoint's port rather than a listener of its own: in
//! Azure DPS is its own host, but the device SDKs only dial port 8883, so a
//! verge-cloud on one address could not serve both on separate listeners.
//! The device endpoint reads the CONNECT first ([`is_dps_username`]) and
//! hands DPS connections here; a DPS username cannot be an IoT Hub one
//! (`{hub}/{device}/?api-version=…` has `?` where DPS has `registrations/`).
//! Wrong key or unknown registration → CONNACK 5 (MQTT has no room for
//! 401/404; HTTPS gives those).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectAuth, ConnectReturnCode, Packet, PubAck, Publish, SubAck,
    SubscribeReasonCode,
};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{Answer, Dps, RETRY_AFTER_SECS};
use crate::CloudError;
use verge_x509::CertificateDer;

/// Largest packet a DPS client may send (register bodies are small).
pub const MAX_PACKET: usize = 64 * 1024;
/// Longest a write to the client may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests one connection may make; a device needs a register and a few polls.
const MAX_REQUESTS: usize = 256;

const REGISTER: &str = "$dps/registrations/PUT/iotdps-register/?";
const POLL: &str = "$dps/registrations/GET/iotdps-get-operationstatus/?";
const RESPONSES: &str = "$dps/registrations/res/#";

/// The scope and registration id of a DPS username, or `None` when the
/// username is not DPS-shaped.
pub fn is_dps_username(username: &str) -> Option<(&str, &str)> {
    let mut parts = username.splitn(4, '/');
    let scope = parts.next()?;
    if parts.next()? != "registrations" {
        return None;
    }
    let rid = parts.next()?;
    let rest = parts.next()?;
    (rest.starts_with("api-version=") && !scope.is_empty() && !rid.is_empty())
        .then_some((scope, rid))
}

/// Why a connection ends.
#[derive(Debug, thiserror::Error)]
enum Close {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("end of stream")]
    Eof,
    #[error("write timed out")]
    WriteTimeout,
    #[error("keep-alive expired")]
    Idle,
}

struct Conn<S> {
    stream: S,
    buf: BytesMut,
    out: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn read(&mut self) -> Result<Packet, Close> {
        loop {
            if !self.buf.is_empty() {
                match Packet::read(&mut self.buf, MAX_PACKET) {
                    Ok(p) => return Ok(p),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => return Err(Close::Protocol(format!("malformed packet: {e}"))),
                }
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(Close::Eof);
            }
        }
    }

    async fn send(&mut self, p: Packet) -> Result<(), Close> {
        self.out.clear();
        p.write(&mut self.out, MAX_PACKET)
            .map_err(|e| Close::Protocol(format!("cannot encode: {e}")))?;
        let write = async {
            self.stream.write_all(&self.out).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(WRITE_TIMEOUT, write).await {
            Ok(r) => r.map_err(Close::Io),
            Err(_) => Err(Close::WriteTimeout),
        }
    }
}

/// How a DPS client proved who it is, checked again at every request (the
/// enrollment may have changed since CONNECT).
enum Proof {
    /// A SAS token (symmetric-key attestation).
    Token(String),
    /// The client certificate chain of its TLS connection (X.509).
    Chain(Vec<CertificateDer<'static>>),
}

impl Proof {
    fn check(&self, dps: &Dps, rid: &str) -> Result<super::Match, CloudError> {
        match self {
            Self::Token(t) => dps.authenticate(rid, t),
            Self::Chain(c) => dps.authenticate_cert(rid, c),
        }
    }
}

/// Serves one DPS client whose CONNECT (`connect`) was already read from
/// `stream`; `buf` holds any bytes read after it; `certs` is the client
/// certificate chain of its TLS connection, if it sent one.
pub async fn serve<S>(
    dps: Arc<Dps>,
    stream: S,
    buf: BytesMut,
    connect: Connect,
    peer: String,
    certs: Vec<CertificateDer<'static>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut conn = Conn {
        stream,
        buf,
        out: BytesMut::with_capacity(1024),
    };
    let (rid, proof) = match authenticate(&dps, &connect, certs) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(%peer, client = %connect.client_id, reason = %e, "DPS CONNECT refused");
            let _ = conn
                .send(Packet::ConnAck(ConnAck::new(
                    ConnectReturnCode::NotAuthorized,
                    false,
                )))
                .await;
            let _ = tokio::time::timeout(WRITE_TIMEOUT, conn.stream.shutdown()).await;
            return;
        }
    };
    // DPS treats every session as clean.
    if conn
        .send(Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::Success,
            false,
        )))
        .await
        .is_err()
    {
        return;
    }
    tracing::debug!(%peer, registration = %rid, "DPS client connected");
    // MQTT's rule: 1.5 × keep-alive without a packet ends the connection;
    // keep-alive 0 still gets a bound (DPS is a short exchange).
    let idle = match connect.keep_alive {
        0 => Duration::from_secs(300),
        k => Duration::from_millis(u64::from(k) * 1500),
    };
    let mut requests = 0usize;
    let end = loop {
        let packet = match tokio::time::timeout(idle, conn.read()).await {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => break e,
            Err(_) => break Close::Idle,
        };
        let step = match packet {
            Packet::Subscribe(s) => {
                let codes = s
                    .filters
                    .iter()
                    .map(|f| {
                        if f.path == RESPONSES {
                            SubscribeReasonCode::Success(if f.qos == QoS::AtMostOnce {
                                QoS::AtMostOnce
                            } else {
                                QoS::AtLeastOnce
                            })
                        } else {
                            SubscribeReasonCode::Failure
                        }
                    })
                    .collect();
                conn.send(Packet::SubAck(SubAck::new(s.pkid, codes))).await
            }
            Packet::Publish(p) => {
                requests += 1;
                if requests > MAX_REQUESTS {
                    break Close::Protocol(format!("more than {MAX_REQUESTS} requests"));
                }
                on_publish(&dps, &mut conn, &rid, &proof, p).await
            }
            Packet::PingReq => conn.send(Packet::PingResp).await,
            Packet::PubAck(_) => Ok(()),
            Packet::Disconnect => break Close::Eof,
            other => Err(Close::Protocol(format!(
                "unexpected {:?}",
                other.packet_type()
            ))),
        };
        if let Err(e) = step {
            break e;
        }
    };
    match end {
        Close::Eof => tracing::debug!(%peer, registration = %rid, "DPS client left"),
        e => tracing::info!(%peer, registration = %rid, reason = %e, "DPS connection closed"),
    }
    let _ = tokio::time::timeout(WRITE_TIMEOUT, conn.stream.shutdown()).await;
}

/// The registration id and what it authenticated with: a SAS token as
/// password, or (no password) its client certificate.
fn authenticate(
    dps: &Dps,
    connect: &Connect,
    certs: Vec<CertificateDer<'static>>,
) -> Result<(String, Proof), CloudError> {
    let (username, password) = match &connect.auth {
        ConnectAuth::UsernamePassword { username, password } if !password.is_empty() => {
            (username, Some(password))
        }
        ConnectAuth::UsernamePassword { username, .. } | ConnectAuth::Username { username } => {
            (username, None)
        }
        ConnectAuth::None => {
            return Err(CloudError::Unauthorized(
                "a DPS username is required".into(),
            ));
        }
    };
    let (scope, rid) = is_dps_username(username)
        .ok_or_else(|| CloudError::Unauthorized(format!("{username:?} is not a DPS username")))?;
    if scope != dps.id_scope() {
        return Err(CloudError::NotFound(format!("no ID scope {scope:?}")));
    }
    if rid != connect.client_id {
        return Err(CloudError::Unauthorized(format!(
            "client id {:?} is not the registration id {rid:?}",
            connect.client_id
        )));
    }
    let proof = match password {
        Some(p) => Proof::Token(
            std::str::from_utf8(p)
                .map_err(|_| CloudError::Unauthorized("password is not UTF-8".into()))?
                .to_owned(),
        ),
        None if certs.is_empty() => {
            return Err(CloudError::Unauthorized(
                "neither a SAS token password nor a client certificate".into(),
            ));
        }
        None => Proof::Chain(certs),
    };
    proof.check(dps, rid)?;
    Ok((rid.to_owned(), proof))
}

/// `key=value` pairs after the `?` of a request topic.
fn topic_params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

async fn on_publish<S: AsyncRead + AsyncWrite + Unpin>(
    dps: &Dps,
    conn: &mut Conn<S>,
    rid: &str,
    proof: &Proof,
    p: Publish,
) -> Result<(), Close> {
    if p.qos == QoS::AtLeastOnce {
        conn.send(Packet::PubAck(PubAck::new(p.pkid))).await?;
    }
    let topic = std::str::from_utf8(&p.topic)
        .map_err(|_| Close::Protocol("topic is not UTF-8".into()))?
        .to_owned();
    let (query, register) = if let Some(q) = topic.strip_prefix(REGISTER) {
        (q, true)
    } else if let Some(q) = topic.strip_prefix(POLL) {
        (q, false)
    } else {
        return Err(Close::Protocol(format!("publish to {topic:?}")));
    };
    let params = topic_params(query);
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    // The SDK splits answers on `$`: a request id holding one could not be
    // echoed back readable; refuse it like one missing.
    let Some(req) = get("$rid").filter(|r| !r.is_empty() && !r.contains(['$', '&', '/'])) else {
        return Err(Close::Protocol(format!("no usable $rid in {topic:?}")));
    };
    let req = req.to_owned();
    let answer = if register {
        match serde_json::from_slice::<Value>(&p.payload) {
            // Re-checked per request: the enrollment may have changed since CONNECT.
            Ok(body) => match proof.check(dps, rid) {
                Ok(m) => dps.register(rid, m, &body).await,
                Err(e) => Answer::error(&e),
            },
            Err(e) => Answer::error(&CloudError::BadRequest(format!(
                "the body is not JSON: {e}"
            ))),
        }
    } else {
        match get("operationId") {
            Some(op) => dps.poll(rid, op),
            None => Answer::error(&CloudError::BadRequest("operationId is required".into())),
        }
    };
    let mut topic = format!("$dps/registrations/res/{}/?$rid={req}", answer.status);
    if answer.status == 202 {
        topic.push_str(&format!("&retry-after={RETRY_AFTER_SECS}"));
    }
    let body = serde_json::to_vec(&answer.body).unwrap_or_default();
    conn.send(Packet::Publish(Publish::new(topic, QoS::AtMostOnce, body)))
        .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rumqttc::mqttbytes::v4::Subscribe;
    use serde_json::json;
    use tokio::io::DuplexStream;
    use verge_core::{SasToken, SharedAccessKey};

    const SCOPE: &str = "0neUNIT";
    const KEY: &str = "AAECAwQFBgcICQoLDA0ODw==";

    async fn dps(dir: &std::path::Path) -> Arc<Dps> {
        let cloud = crate::CloudState::open(crate::CloudOptions {
            data_dir: dir.join("db"),
            hostname: "hub.local".into(),
        })
        .unwrap();
        let opts = super::super::DpsOptions {
            dir: dir.join("dps"),
            id_scope: SCOPE.into(),
            iothub_hostname: "hub.local".into(),
        };
        let dps = Dps::open(opts, cloud).await.unwrap();
        dps.put_enrollment(
            false,
            "dev-1",
            &json!({"attestation": {"type": "symmetricKey",
                "symmetricKey": {"primaryKey": KEY, "secondaryKey": KEY}}}),
            None,
        )
        .await
        .unwrap();
        dps
    }

    fn connect(rid: &str, key: &str) -> Packet {
        let sr = format!("{SCOPE}/registrations/{rid}");
        let token = SasToken::sign(
            &sr,
            &SharedAccessKey::from_base64(key).unwrap(),
            4_000_000_000,
            None,
        );
        let mut c = Connect::new(rid);
        c.auth = ConnectAuth::UsernamePassword {
            username: format!("{SCOPE}/registrations/{rid}/api-version=2019-03-31&ClientVersion=x"),
            password: token.to_string().into_bytes().into(),
        };
        Packet::Connect(c)
    }

    /// Runs `serve` on one end of a pipe; returns the other, CONNECT sent.
    async fn start(dps: Arc<Dps>, first: Packet) -> Conn<DuplexStream> {
        let (client, server) = tokio::io::duplex(1 << 16);
        let Packet::Connect(c) = first else {
            unreachable!()
        };
        tokio::spawn(serve(
            dps,
            server,
            BytesMut::new(),
            c,
            "test".into(),
            Vec::new(),
        ));
        Conn {
            stream: client,
            buf: BytesMut::new(),
            out: BytesMut::new(),
        }
    }

    async fn answer(conn: &mut Conn<DuplexStream>) -> (String, Value) {
        loop {
            let p = tokio::time::timeout(Duration::from_secs(10), conn.read())
                .await
                .unwrap()
                .unwrap();
            if let Packet::Publish(p) = p {
                let topic = String::from_utf8(p.topic.to_vec()).unwrap();
                return (topic, serde_json::from_slice(&p.payload).unwrap());
            }
        }
    }

    #[tokio::test]
    async fn register_poll_and_refusals_over_mqtt() {
        let dir = tempfile::tempdir().unwrap();
        let dps = dps(dir.path()).await;

        // Wrong key, unknown registration: CONNACK 5.
        for (rid, key) in [("dev-1", "AAAAAAAAAAAAAAAAAAAAAA=="), ("nobody", KEY)] {
            let mut c = start(dps.clone(), connect(rid, key)).await;
            match c.read().await.unwrap() {
                Packet::ConnAck(a) => assert_eq!(a.code, ConnectReturnCode::NotAuthorized),
                other => panic!("{other:?}"),
            }
        }

        let mut c = start(dps.clone(), connect("dev-1", KEY)).await;
        assert!(
            matches!(c.read().await.unwrap(), Packet::ConnAck(a) if a.code == ConnectReturnCode::Success)
        );
        let mut sub = Subscribe::new(RESPONSES, QoS::AtLeastOnce);
        sub.pkid = 1;
        c.send(Packet::Subscribe(sub)).await.unwrap();
        assert!(matches!(c.read().await.unwrap(), Packet::SubAck(_)));
        // Malformed body: 400, and the connection stays usable.
        c.send(Packet::Publish(Publish::new(
            format!("{REGISTER}$rid=1"),
            QoS::AtMostOnce,
            "{nope",
        )))
        .await
        .unwrap();
        let (topic, body) = answer(&mut c).await;
        assert_eq!(topic, "$dps/registrations/res/400/?$rid=1");
        assert!(body["errorCode"].as_u64().is_some(), "{body}");
        // Register: 202 assigning with retry-after, then the poll says assigned.
        let reg = json!({"registrationId": "dev-1", "payload": null}).to_string();
        let mut p = Publish::new(format!("{REGISTER}$rid=2"), QoS::AtLeastOnce, reg);
        p.pkid = 7;
        c.send(Packet::Publish(p)).await.unwrap();
        let (topic, body) = answer(&mut c).await;
        assert_eq!(
            topic,
            format!("$dps/registrations/res/202/?$rid=2&retry-after={RETRY_AFTER_SECS}")
        );
        assert_eq!(body["status"], "assigning", "{body}");
        let op = body["operationId"].as_str().unwrap().to_owned();
        c.send(Packet::Publish(Publish::new(
            format!("{POLL}$rid=3&operationId={op}"),
            QoS::AtMostOnce,
            " ",
        )))
        .await
        .unwrap();
        let (topic, body) = answer(&mut c).await;
        assert_eq!(topic, "$dps/registrations/res/200/?$rid=3");
        assert_eq!(body["status"], "assigned", "{body}");
        assert_eq!(
            body["registrationState"]["assignedHub"], "hub.local",
            "{body}"
        );
        assert_eq!(body["registrationState"]["deviceId"], "dev-1", "{body}");
        // An unknown operation: 404.
        c.send(Packet::Publish(Publish::new(
            format!("{POLL}$rid=4&operationId=5.x"),
            QoS::AtMostOnce,
            " ",
        )))
        .await
        .unwrap();
        assert_eq!(answer(&mut c).await.0, "$dps/registrations/res/404/?$rid=4");
        // A publish outside DPS's topics closes the connection.
        c.send(Packet::Publish(Publish::new(
            "devices/dev-1/messages/events/",
            QoS::AtMostOnce,
            "x",
        )))
        .await
        .unwrap();
        assert!(matches!(c.read().await, Err(Close::Eof | Close::Io(_))));
    }

    #[test]
    fn dps_usernames_are_told_apart_from_hub_ones() {
        assert_eq!(
            is_dps_username(
                "0ne00000001/registrations/dev1/api-version=2019-03-31&ClientVersion=x"
            ),
            Some(("0ne00000001", "dev1"))
        );
        assert_eq!(
            is_dps_username("hub.example.net/dev1/?api-version=2021-04-12"),
            None
        );
        assert_eq!(is_dps_username("hub/registrations/?api-version=1"), None);
        assert_eq!(is_dps_username("hub/registrations"), None);
        assert_eq!(is_dps_username(""), None);
    }
}
