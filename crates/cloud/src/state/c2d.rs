//! Cloud-to-device messages: per-device queues (`crate::c2d`) with delivery
//! locks, settlement, feedback records, and the sweep that expires messages
//! and frees stale locks.

use serde_json::{Value, json};
use verge_core::{ClientId, DeviceId, Message};

use super::{CloudState, Inner, lock, not_found_device, now, to_json_bytes};
use crate::c2d::{
    C2dDelivery, DEFAULT_TTL_SECS, Feedback, LOCK_TIMEOUT_MS, MAX_DELIVERY_COUNT, MAX_QUEUE_DEPTH,
    MAX_TTL_SECS, Queued, Settlement,
};
use crate::conn::ConnectionEvent;
use crate::db::c2d_key;
use crate::error::{CloudError, Result};

impl CloudState {
    /// Queues a C2D message for a device (`ttl_secs`: 0 = the default of one
    /// hour; at most 48 h). Sets message id, `to`, expiry and enqueued time.
    /// 403-style refusal (429 here) when the device already has 50 queued.
    pub async fn c2d_send(&self, device: &str, message: Message, ttl_secs: u64) -> Result<String> {
        let d = device.to_owned();
        let id = self
            .blocking(move |i| i.c2d_send(&d, message, ttl_secs))
            .await?;
        self.inner.notify(
            &ClientId::device(
                DeviceId::new(device).map_err(|e| CloudError::BadRequest(e.to_string()))?,
            ),
            ConnectionEvent::C2dAvailable,
        );
        Ok(id)
    }

    /// The oldest deliverable C2D message of a device, locked for delivery;
    /// `None` when nothing is waiting. Expired messages are dropped (with
    /// feedback) first.
    pub async fn c2d_next(&self, device: &str) -> Result<Option<C2dDelivery>> {
        let d = device.to_owned();
        self.blocking(move |i| i.c2d_next(&d)).await
    }

    /// Settles a delivered message by its lock token.
    pub async fn c2d_settle(&self, device: &str, lock_token: &str, how: Settlement) -> Result<()> {
        let (d, t) = (device.to_owned(), lock_token.to_owned());
        self.blocking(move |i| i.c2d_settle(&d, &t, how)).await
    }

    /// Feedback records from sequence `from`, at most `max`.
    pub fn c2d_feedback(&self, from: u64, max: usize) -> Result<Vec<Feedback>> {
        let mut out = Vec::new();
        for kv in self.inner.db.feedback.range(from.to_be_bytes()..) {
            let (k, v) = kv.into_inner()?;
            let seq = <[u8; 8]>::try_from(k.as_ref())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            let mut f: Feedback = feedback_from_json(&v)
                .ok_or_else(|| CloudError::Storage(format!("feedback record {seq}")))?;
            f.seq = seq;
            out.push(f);
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Housekeeping, run periodically: expires C2D messages (with feedback)
    /// and releases locks held longer than a minute.
    pub async fn sweep(&self) -> Result<()> {
        self.blocking(|i| i.c2d_sweep(None)).await
    }
}

fn feedback_from_json(v: &[u8]) -> Option<Feedback> {
    let j: Value = serde_json::from_slice(v).ok()?;
    let s = |k: &str| j.get(k).and_then(Value::as_str).map(str::to_owned);
    let status_code = match s("statusCode")?.as_str() {
        "Success" => "Success",
        "Rejected" => "Rejected",
        "Expired" => "Expired",
        "DeliveryCountExceeded" => "DeliveryCountExceeded",
        _ => return None,
    };
    Some(Feedback {
        seq: 0,
        original_message_id: s("originalMessageId")?,
        status_code,
        description: feedback_description(status_code),
        device_id: s("deviceId")?,
        device_generation_id: s("deviceGenerationId").unwrap_or_default(),
        enqueued_time_utc: s("enqueuedTimeUtc").unwrap_or_default(),
    })
}

fn feedback_description(code: &str) -> &'static str {
    match code {
        "Success" => "Success",
        "Rejected" => "Message rejected",
        "Expired" => "Message expired",
        _ => "Message delivery count exceeded",
    }
}

impl Inner {
    /// The generation id of a registered device (for C2D feedback).
    fn generation_of(&self, device: &str) -> Result<String> {
        lock(&self.reg)
            .devices
            .get(device)
            .map(|d| d.rec.generation_id.clone())
            .ok_or_else(|| not_found_device(device))
    }

    /// Records a device's C2D queue depth in its connection state.
    fn set_c2d_count(&self, device: &str, depth: usize) {
        if let Some(d) = lock(&self.reg).devices.get_mut(device) {
            d.conn.c2d_count = depth;
        }
    }

    fn c2d_send(&self, device: &str, mut message: Message, ttl_secs: u64) -> Result<String> {
        let ttl = if ttl_secs == 0 {
            DEFAULT_TTL_SECS
        } else {
            ttl_secs
        };
        if ttl > MAX_TTL_SECS {
            return Err(CloudError::BadRequest(format!(
                "C2D time to live {ttl} s exceeds the maximum of {MAX_TTL_SECS} s"
            )));
        }
        message
            .check_size()
            .map_err(|e| CloudError::BadRequest(e.to_string()))?;
        let _writer = lock(&self.writer);
        let generation = self.generation_of(device)?;
        self.c2d_sweep_device(device, &generation)?;
        let t = now();
        let id = message
            .system
            .message_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        message.system.message_id = Some(id.clone());
        message.system.to = Some(format!("/devices/{device}/messages/devicebound"));
        message.system.enqueued_time = Some(t);
        message.system.absolute_expiry = Some(t.plus_secs(ttl));
        let q = {
            let c2d = lock(&self.c2d);
            if c2d.depth(device) >= MAX_QUEUE_DEPTH {
                return Err(CloudError::Throttled(format!(
                    "device {device:?} already has {MAX_QUEUE_DEPTH} C2D messages queued"
                )));
            }
            Queued {
                seq: c2d.next_seq,
                delivery_count: 0,
                message,
                lock: None,
            }
        };
        self.db
            .c2d
            .insert(c2d_key(device, q.seq), q.encode().as_ref())?;
        self.before_commit();
        self.db.db.persist(fjall::PersistMode::SyncData)?;
        let depth = {
            let mut c2d = lock(&self.c2d);
            c2d.next_seq = c2d.next_seq.max(q.seq + 1);
            c2d.queues
                .entry(device.to_owned())
                .or_default()
                .push_back(q);
            c2d.depth(device)
        };
        self.set_c2d_count(device, depth);
        Ok(id)
    }

    fn c2d_next(&self, device: &str) -> Result<Option<C2dDelivery>> {
        // Held throughout: a message being settled or expired (its commit
        // under way) is not handed out again meanwhile.
        let _writer = lock(&self.writer);
        let generation = self.generation_of(device)?;
        self.c2d_sweep_device(device, &generation)?;
        let t = now().as_millis();
        let mut c2d = lock(&self.c2d);
        let Some(q) = c2d
            .queues
            .get_mut(device)
            .and_then(|q| q.iter_mut().find(|m| m.lock.is_none()))
        else {
            return Ok(None);
        };
        let token = uuid::Uuid::new_v4().to_string();
        q.lock = Some((token.clone(), t));
        q.delivery_count += 1;
        Ok(Some(C2dDelivery {
            lock_token: token,
            delivery_count: q.delivery_count,
            message: q.message.clone(),
        }))
    }

    fn c2d_settle(&self, device: &str, token: &str, how: Settlement) -> Result<()> {
        let _writer = lock(&self.writer);
        let generation = self.generation_of(device)?;
        let mut c2d = lock(&self.c2d);
        let Some(m) = c2d.queues.get_mut(device).and_then(|q| {
            q.iter_mut()
                .find(|m| m.lock.as_ref().is_some_and(|(t, _)| t == token))
        }) else {
            return Err(CloudError::PreconditionFailed(format!(
                "lock token {token:?} of device {device:?} is unknown or expired"
            )));
        };
        let code = match how {
            Settlement::Complete => "Success",
            Settlement::Reject => "Rejected",
            Settlement::Abandon if m.delivery_count >= MAX_DELIVERY_COUNT => {
                "DeliveryCountExceeded"
            }
            Settlement::Abandon => {
                m.lock = None;
                // The delivery count survives restarts; no sync needed for it.
                self.db
                    .c2d
                    .insert(c2d_key(device, m.seq), m.encode().as_ref())?;
                return Ok(());
            }
        };
        let m = m.clone();
        let seq = c2d.next_feedback;
        drop(c2d);
        let mut batch = self.db.durable_batch();
        batch.remove(&self.db.c2d, c2d_key(device, m.seq));
        batch.insert(
            &self.db.feedback,
            seq.to_be_bytes(),
            feedback_json(&m, code, device, &generation)?,
        );
        self.commit(batch)?;
        let depth = {
            let mut c2d = lock(&self.c2d);
            c2d.next_feedback = c2d.next_feedback.max(seq + 1);
            if let Some(q) = c2d.queues.get_mut(device) {
                q.retain(|x| x.seq != m.seq);
            }
            c2d.depth(device)
        };
        self.set_c2d_count(device, depth);
        Ok(())
    }

    fn c2d_sweep(&self, only: Option<&str>) -> Result<()> {
        let _writer = lock(&self.writer);
        let devices: Vec<String> = match only {
            Some(d) => vec![d.to_owned()],
            None => lock(&self.c2d).queues.keys().cloned().collect(),
        };
        for dev in devices {
            // A queue without a device (deleted meanwhile) still expires.
            let generation = self.generation_of(&dev).unwrap_or_default();
            self.c2d_sweep_device(&dev, &generation)?;
        }
        Ok(())
    }

    /// Drops expired messages of one device (recording feedback) and frees
    /// stale locks. Callers hold the writer lock, and neither `reg` nor
    /// `c2d`: the feedback commit runs without them.
    fn c2d_sweep_device(&self, device: &str, generation: &str) -> Result<()> {
        let t = now();
        let (expired, first) = {
            let mut c2d = lock(&self.c2d);
            let first = c2d.next_feedback;
            let Some(q) = c2d.queues.get_mut(device) else {
                return Ok(());
            };
            for m in q.iter_mut() {
                if m.lock
                    .as_ref()
                    .is_some_and(|(_, at)| t.as_millis() - at > LOCK_TIMEOUT_MS)
                {
                    m.lock = None;
                }
            }
            let expired: Vec<Queued> = q.iter().filter(|m| m.expired(t)).cloned().collect();
            (expired, first)
        };
        if expired.is_empty() {
            return Ok(());
        }
        let mut batch = self.db.durable_batch();
        let mut seq = first;
        for m in &expired {
            batch.remove(&self.db.c2d, c2d_key(device, m.seq));
            batch.insert(
                &self.db.feedback,
                seq.to_be_bytes(),
                feedback_json(m, "Expired", device, generation)?,
            );
            seq += 1;
        }
        self.commit(batch)?;
        let depth = {
            let mut c2d = lock(&self.c2d);
            c2d.next_feedback = c2d.next_feedback.max(seq);
            if let Some(q) = c2d.queues.get_mut(device) {
                q.retain(|m| !expired.iter().any(|e| e.seq == m.seq));
            }
            c2d.depth(device)
        };
        self.set_c2d_count(device, depth);
        Ok(())
    }
}

fn feedback_json(m: &Queued, code: &str, device: &str, generation: &str) -> Result<Vec<u8>> {
    to_json_bytes(&json!({
        "originalMessageId": m.message_id(),
        "statusCode": code,
        "description": feedback_description(code),
        "deviceId": device,
        "deviceGenerationId": generation,
        "enqueuedTimeUtc": now().to_iso8601(),
    }))
}
