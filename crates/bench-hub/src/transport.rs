//! The load generator's MQTT transport: TLS or plain TCP to a broker, packet
//! framing, the hub's SAS credentials, PUBLISH encoding.

use super::*;

pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One broker endpoint as the load generator sees it.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) addr: SocketAddr,
    pub(crate) tls: Option<tokio_rustls::TlsConnector>,
    /// verge-hub (identities, SAS, routed topics) or a plain broker.
    pub(crate) hub: bool,
    /// verge-hub's AMQPS listener: publishers send over AMQP instead.
    pub(crate) amqp: Option<SocketAddr>,
}

impl Target {
    pub(crate) fn pub_topic(&self, i: usize) -> String {
        format!("devices/{DEVICE}/modules/pub{i}/messages/events/%24.on=out1")
    }
    pub(crate) fn sub_filter(&self) -> String {
        if self.hub {
            format!("devices/{DEVICE}/modules/{SINK}/inputs/#")
        } else {
            format!("devices/{DEVICE}/modules/+/messages/events/#")
        }
    }

    pub(crate) async fn connect(&self, module: &str) -> anyhow::Result<(Box<dyn Io>, BytesMut)> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let mut io: Box<dyn Io> = match &self.tls {
            Some(c) => {
                let name = rustls_pki_types::ServerName::try_from("localhost")?;
                Box::new(c.connect(name, tcp).await?)
            }
            None => Box::new(tcp),
        };
        let client_id = format!("{DEVICE}/{module}");
        let mut c = Connect::new(client_id.clone());
        c.clean_session = true;
        c.keep_alive = 120;
        if self.hub {
            c.set_credentials(username(&client_id), module_token(module));
        }
        let mut out = BytesMut::new();
        Packet::Connect(c).write(&mut out, MAX_PACKET)?;
        io.write_all(&out).await?;
        io.flush().await?;
        let mut buf = BytesMut::with_capacity(64 * 1024);
        match read_packet(&mut io, &mut buf).await? {
            Packet::ConnAck(a) if a.code == ConnectReturnCode::Success => Ok((io, buf)),
            other => bail!("{client_id}: CONNECT refused: {other:?}"),
        }
    }
}

pub(crate) async fn read_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
) -> anyhow::Result<Packet> {
    loop {
        if !buf.is_empty() {
            match Packet::read(buf, MAX_PACKET) {
                Ok(p) => return Ok(p),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => bail!("bad packet from broker: {e}"),
            }
        }
        if r.read_buf(buf).await? == 0 {
            bail!("broker closed the connection");
        }
    }
}

pub(crate) fn username(client_id: &str) -> String {
    format!("{IOTHUB}/{client_id}/?api-version=2021-04-12&DeviceClientType=verge-hub-bench")
}

pub(crate) fn generation(module: &str) -> String {
    format!("gen-{module}")
}

pub(crate) fn module_token(module: &str) -> String {
    let key = SharedAccessKey::from_base64(DEVICE_KEY)
        .ok()
        .zip(ModuleId::new(module).ok())
        .map(|(k, m)| k.derive_module_key(&m, &generation(module)));
    let Some(key) = key else {
        return String::new();
    };
    let expiry = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + 3600;
    SasToken::sign(
        &format!("{IOTHUB}/devices/{DEVICE}/modules/{module}"),
        &key,
        expiry,
        None,
    )
    .to_string()
}

/// Appends a QoS 1 PUBLISH (hand-encoded: no allocation per message).
pub(crate) fn put_publish(out: &mut BytesMut, topic: &[u8], pkid: u16, payload: &[u8]) {
    let remaining = 2 + topic.len() + 2 + payload.len();
    out.extend_from_slice(&[0x32]);
    let mut x = remaining;
    loop {
        let mut b = (x % 128) as u8;
        x /= 128;
        if x > 0 {
            b |= 0x80;
        }
        out.extend_from_slice(&[b]);
        if x == 0 {
            break;
        }
    }
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic);
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend_from_slice(payload);
}
