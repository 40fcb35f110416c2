//! The load itself: publishers keeping a window of QoS 1 PUBLISHes, one
//! subscriber timing every delivery, the run's result.

use super::*;

#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) acked: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) publishers_done: AtomicU64,
    pub(crate) failed: AtomicBool,
}

#[derive(Debug, Clone)]
pub(crate) struct RunResult {
    pub(crate) sent: u64,
    pub(crate) acked: u64,
    pub(crate) received: u64,
    pub(crate) duplicates: u64,
    /// First publish → last arrival.
    pub(crate) elapsed: Duration,
    /// First publish → last PUBACK.
    pub(crate) ack_elapsed: Duration,
    pub(crate) lat_us: Vec<u32>,
    pub(crate) complete: bool,
    /// CPU time (user + system) the broker process used during the run.
    pub(crate) broker_cpu: Duration,
}

impl RunResult {
    pub(crate) fn rate(&self) -> f64 {
        self.received as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub(crate) fn ack_rate(&self) -> f64 {
        self.acked as f64 / self.ack_elapsed.as_secs_f64().max(1e-9)
    }
    /// Broker CPU per routed message, microseconds.
    pub(crate) fn cpu_us_per_msg(&self) -> f64 {
        self.broker_cpu.as_secs_f64() * 1e6 / (self.received.max(1) as f64)
    }
    pub(crate) fn pct(&self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.lat_us.len() - 1) as f64 * p).round() as usize;
        f64::from(self.lat_us[i]) / 1000.0
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn publisher(
    target: Target,
    idx: usize,
    n: u64,
    payload_len: usize,
    window: usize,
    stop_at: Instant,
    shared: Arc<Shared>,
    last_ack: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let (io, mut buf) = target.connect(&format!("pub{idx}")).await?;
    let (mut rd, mut wr) = tokio::io::split(io);
    let sem = Arc::new(Semaphore::new(window));
    let reader = {
        let sem = sem.clone();
        let shared = shared.clone();
        let last_ack = last_ack.clone();
        tokio::spawn(async move {
            loop {
                match read_packet(&mut rd, &mut buf).await {
                    Ok(Packet::PubAck(_)) => {
                        shared.acked.fetch_add(1, Ordering::Relaxed);
                        last_ack.fetch_max(now_ns(), Ordering::Relaxed);
                        sem.add_permits(1);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        })
    };
    let topic = target.pub_topic(idx).into_bytes();
    let mut payload = vec![b'x'; payload_len.max(16)];
    payload[8..12].copy_from_slice(&(idx as u32).to_le_bytes());
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut seq: u64 = 0;
    let mut pkid: u16 = 0;
    while seq < n && Instant::now() < stop_at {
        sem.acquire().await?.forget();
        let mut k = 1;
        while k < 64 && seq + k < n {
            match sem.try_acquire() {
                Ok(p) => {
                    p.forget();
                    k += 1;
                }
                Err(_) => break,
            }
        }
        out.clear();
        for _ in 0..k {
            pkid = pkid.wrapping_add(1).max(1);
            payload[0..8].copy_from_slice(&now_ns().to_le_bytes());
            payload[12..16].copy_from_slice(&(seq as u32).to_le_bytes());
            put_publish(&mut out, &topic, pkid, &payload);
            seq += 1;
        }
        wr.write_all(&out).await?;
        wr.flush().await?;
        shared.sent.fetch_add(k, Ordering::Relaxed);
    }
    // Wait for every outstanding PUBACK.
    let all = u32::try_from(window).unwrap_or(u32::MAX);
    let drained = tokio::time::timeout(Duration::from_secs(60), sem.acquire_many(all)).await;
    reader.abort();
    let _ = wr.write_all(&[0xe0, 0x00]).await; // DISCONNECT
    let _ = wr.flush().await;
    if !matches!(drained, Ok(Ok(_))) {
        bail!("pub{idx}: PUBACKs missing after 60 s");
    }
    Ok(())
}

/// One measurement: `pubs` publishers → one subscriber on `target`.
pub(crate) async fn run_load(
    target: &Target,
    pubs: usize,
    window: usize,
    args: &Args,
) -> anyhow::Result<RunResult> {
    let per_pub = (args.max_messages / pubs as u64).max(1);
    let total_cap = per_pub * pubs as u64;
    let (sub_io, mut sub_buf) = target.connect(SINK).await.context("subscriber connect")?;
    let (mut srd, mut swr) = tokio::io::split(sub_io);
    let mut s = Subscribe::new(target.sub_filter(), QoS::AtLeastOnce);
    s.pkid = 1;
    let mut out = BytesMut::new();
    Packet::Subscribe(s).write(&mut out, MAX_PACKET)?;
    swr.write_all(&out).await?;
    swr.flush().await?;
    match read_packet(&mut srd, &mut sub_buf).await? {
        Packet::SubAck(_) => {}
        other => bail!("expected SUBACK, got {other:?}"),
    }

    let shared = Arc::new(Shared::default());
    let last_ack = Arc::new(AtomicU64::new(0));
    let start_ns = now_ns();
    let stop_at = Instant::now() + Duration::from_secs_f64(args.secs);
    let mut handles = Vec::new();
    for i in 0..pubs {
        let (t, sh, la) = (target.clone(), shared.clone(), last_ack.clone());
        let payload = args.payload;
        handles.push(tokio::spawn(async move {
            let r = match t.amqp {
                Some(a) => {
                    amqp::publisher(t, a, i, per_pub, payload, window, stop_at, sh.clone(), la)
                        .await
                }
                None => publisher(t, i, per_pub, payload, window, stop_at, sh.clone(), la).await,
            };
            if let Err(e) = &r {
                eprintln!("  publisher {i}: {e:#}");
                sh.failed.store(true, Ordering::Relaxed);
            }
            sh.publishers_done.fetch_add(1, Ordering::Relaxed);
        }));
    }

    // Subscriber: count, dedupe, time; PUBACK every delivery.
    let mut seen = vec![false; usize::try_from(total_cap).unwrap_or(usize::MAX)];
    let mut lat_us: Vec<u32> = Vec::with_capacity(seen.len().min(4_000_000));
    let (mut received, mut duplicates, mut last_rx) = (0u64, 0u64, start_ns);
    let mut acks = BytesMut::with_capacity(4096);
    let mut drain_deadline: Option<Instant> = None;
    let hard_deadline = stop_at + Duration::from_secs_f64(args.drain_secs + 60.0);
    let complete = loop {
        let done = shared.publishers_done.load(Ordering::Relaxed) == pubs as u64;
        if done {
            if received >= shared.acked.load(Ordering::Relaxed) {
                break !shared.failed.load(Ordering::Relaxed);
            }
            let d = *drain_deadline
                .get_or_insert_with(|| Instant::now() + Duration::from_secs_f64(args.drain_secs));
            if Instant::now() > d {
                break false;
            }
        }
        if Instant::now() > hard_deadline {
            break false;
        }
        // Parse whatever is buffered, then read more (bounded wait).
        loop {
            if sub_buf.is_empty() {
                break;
            }
            match Packet::read(&mut sub_buf, MAX_PACKET) {
                Ok(Packet::Publish(p)) => {
                    let t = now_ns();
                    if p.qos == QoS::AtLeastOnce {
                        acks.extend_from_slice(&[0x40, 0x02]);
                        acks.extend_from_slice(&p.pkid.to_be_bytes());
                    }
                    let b = &p.payload;
                    if b.len() < 16 {
                        continue;
                    }
                    let mut w = [0u8; 8];
                    w.copy_from_slice(&b[0..8]);
                    let sent = u64::from_le_bytes(w);
                    let mut w4 = [0u8; 4];
                    w4.copy_from_slice(&b[8..12]);
                    let who = u64::from(u32::from_le_bytes(w4));
                    w4.copy_from_slice(&b[12..16]);
                    let seq = u64::from(u32::from_le_bytes(w4));
                    let slot = usize::try_from(who * per_pub + seq).unwrap_or(usize::MAX);
                    match seen.get_mut(slot) {
                        Some(s) if !*s => {
                            *s = true;
                            received += 1;
                            last_rx = t;
                            let us = t.saturating_sub(sent) / 1000;
                            lat_us.push(u32::try_from(us).unwrap_or(u32::MAX));
                        }
                        _ => duplicates += 1,
                    }
                }
                Ok(_) => {}
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => bail!("subscriber: bad packet: {e}"),
            }
        }
        if !acks.is_empty() {
            swr.write_all(&acks).await?;
            swr.flush().await?;
            acks.clear();
        }
        match tokio::time::timeout(Duration::from_millis(50), srd.read_buf(&mut sub_buf)).await {
            Ok(Ok(0)) => bail!("subscriber: broker closed the connection"),
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => bail!("subscriber: {e}"),
        }
    };
    for h in handles {
        let _ = h.await;
    }
    let _ = swr.write_all(&[0xe0, 0x00]).await;
    let _ = swr.flush().await;
    lat_us.sort_unstable();
    Ok(RunResult {
        sent: shared.sent.load(Ordering::Relaxed),
        acked: shared.acked.load(Ordering::Relaxed),
        received,
        duplicates,
        elapsed: Duration::from_nanos(last_rx.saturating_sub(start_ns)),
        ack_elapsed: Duration::from_nanos(
            last_ack.load(Ordering::Relaxed).saturating_sub(start_ns),
        ),
        lat_us,
        complete,
        broker_cpu: Duration::ZERO,
    })
}
