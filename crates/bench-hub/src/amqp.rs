//! AMQP publishers for the `hub-amqp` measurement: the same load as the MQTT
//! publishers (payload stamped with send time, publisher and sequence; a
//! window of unsettled messages), sent over AMQPS with SASL PLAIN as a
//! module's output. The subscriber stays MQTT, so the row differs from
//! `hub` by the publishers' protocol only.

use std::collections::VecDeque;

use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::messaging::{ApplicationProperties, Message, Outcome};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue};
use fe2o3_amqp::{Connection, Sender, Session};

use super::*;

/// One AMQP publisher: `n` messages or until `stop_at`, at most `window`
/// unsettled; each counts as acknowledged when the hub accepts it (after
/// the store's fsync, as a PUBACK).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn publisher(
    target: Target,
    amqps: SocketAddr,
    idx: usize,
    n: u64,
    payload_len: usize,
    window: usize,
    stop_at: Instant,
    shared: Arc<Shared>,
    last_ack: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let module = format!("pub{idx}");
    let tcp = TcpStream::connect(amqps).await?;
    tcp.set_nodelay(true)?;
    let tls = target.tls.as_ref().context("AMQP publishers need TLS")?;
    let name = rustls_pki_types::ServerName::try_from("localhost")?;
    let stream = tls.connect(name, tcp).await?;
    let hub_name = IOTHUB.split('.').next().unwrap_or(IOTHUB);
    let mut conn = Connection::builder()
        .container_id(format!("hub-bench-{module}"))
        .hostname("localhost")
        .sasl_profile(SaslProfile::Plain {
            username: format!("{DEVICE}/modules/{module}@sas.{hub_name}"),
            password: module_token(&module),
        })
        .open_with_stream(stream)
        .await
        .with_context(|| format!("{module}: AMQP open"))?;
    let mut session = Session::begin(&mut conn).await?;
    let address = format!("/devices/{DEVICE}/modules/{module}/messages/events");
    let mut sender = Sender::attach(&mut session, format!("{module}-out1"), address).await?;

    let settled = |outcome: Outcome| -> anyhow::Result<()> {
        match outcome {
            Outcome::Accepted(_) => {
                shared.acked.fetch_add(1, Ordering::Relaxed);
                last_ack.fetch_max(now_ns(), Ordering::Relaxed);
                Ok(())
            }
            other => bail!("{module}: message not accepted: {other:?}"),
        }
    };
    let mut payload = vec![b'x'; payload_len.max(16)];
    payload[8..12].copy_from_slice(&(idx as u32).to_le_bytes());
    let mut unsettled = VecDeque::with_capacity(window);
    let mut seq: u64 = 0;
    while seq < n && Instant::now() < stop_at {
        if unsettled.len() >= window
            && let Some(oldest) = unsettled.pop_front()
        {
            settled(oldest.await?)?;
        }
        payload[0..8].copy_from_slice(&now_ns().to_le_bytes());
        payload[12..16].copy_from_slice(&(seq as u32).to_le_bytes());
        let message = Message::builder()
            .application_properties(
                ApplicationProperties::builder()
                    .insert(
                        "iothub-outputname".to_owned(),
                        SimpleValue::String("out1".into()),
                    )
                    .build(),
            )
            .data(Binary::from(payload.clone()))
            .build();
        unsettled.push_back(sender.send_batchable(message).await?);
        shared.sent.fetch_add(1, Ordering::Relaxed);
        seq += 1;
    }
    let drain = async {
        while let Some(next) = unsettled.pop_front() {
            settled(next.await?)?;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(60), drain)
        .await
        .map_err(|_| anyhow::anyhow!("{module}: dispositions missing after 60 s"))??;
    let _ = sender.close().await;
    let _ = session.end().await;
    let _ = conn.close().await;
    Ok(())
}
