//! Cloud-to-device queues: per device, FIFO, at most [`MAX_QUEUE_DEPTH`]
//! messages (IoT Hub's limit), each with an expiry. The endpoint pulls a
//! message (which locks it), delivers it, and settles it: complete, reject or
//! abandon. Completion, rejection, expiry and too many deliveries are recorded
//! as feedback, readable by the service.

use std::collections::{BTreeMap, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use verge_core::Message;
use verge_core::time::Timestamp;

/// IoT Hub's per-device queue limit.
pub const MAX_QUEUE_DEPTH: usize = 50;
/// Deliveries (abandons) after which a message is dead-lettered.
pub const MAX_DELIVERY_COUNT: u32 = 10;
/// A lock not settled within this time is released (the client vanished).
pub const LOCK_TIMEOUT_MS: i64 = 60_000;
/// Default and largest time to live.
pub const DEFAULT_TTL_SECS: u64 = 3600;
/// IoT Hub's maximum C2D TTL: 48 hours.
pub const MAX_TTL_SECS: u64 = 48 * 3600;

/// How the device settled a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Processed (MQTT PUBACK).
    Complete,
    /// Refused for good.
    Reject,
    /// Give it back for another delivery.
    Abandon,
}

/// A message handed to the endpoint for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct C2dDelivery {
    /// Pass back to [`crate::CloudState::c2d_settle`].
    pub lock_token: String,
    /// How many times it was handed out, this one included.
    pub delivery_count: u32,
    /// The message (message id, expiry, `to`, properties set).
    pub message: Message,
}

/// One feedback record, in IoT Hub's feedback-message shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Feedback {
    /// Position in the feedback log.
    #[serde(skip)]
    pub seq: u64,
    /// The C2D message's id.
    pub original_message_id: String,
    /// `Success`, `Rejected`, `Expired` or `DeliveryCountExceeded`.
    pub status_code: &'static str,
    /// Human-readable outcome.
    pub description: &'static str,
    /// The target device.
    pub device_id: String,
    /// Its generation id at the time.
    pub device_generation_id: String,
    /// When the outcome was recorded.
    pub enqueued_time_utc: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Queued {
    pub seq: u64,
    pub delivery_count: u32,
    pub message: Message,
    /// Lock token and when it was taken.
    pub lock: Option<(String, i64)>,
}

impl Queued {
    pub fn encode(&self) -> Bytes {
        let enc = verge_core::message::encode(&self.message);
        let mut b = BytesMut::with_capacity(enc.len() + 4);
        b.put_u32(self.delivery_count);
        b.put_slice(&enc);
        b.freeze()
    }

    pub fn decode(seq: u64, raw: &[u8]) -> Option<Self> {
        let (count, rest) = raw.split_first_chunk::<4>()?;
        let message = verge_core::message::decode(Bytes::copy_from_slice(rest)).ok()?;
        Some(Self {
            seq,
            delivery_count: u32::from_be_bytes(*count),
            message,
            lock: None,
        })
    }

    pub fn expired(&self, now: Timestamp) -> bool {
        self.message.is_expired(now)
    }

    pub fn message_id(&self) -> String {
        self.message.system.message_id.clone().unwrap_or_default()
    }
}

/// All queues, in memory (bounded by [`MAX_QUEUE_DEPTH`] per device) and
/// written through to the `c2d` keyspace.
#[derive(Debug, Default)]
pub(crate) struct C2dQueues {
    pub queues: BTreeMap<String, VecDeque<Queued>>,
    pub next_seq: u64,
    pub next_feedback: u64,
}

impl C2dQueues {
    pub fn depth(&self, device: &str) -> usize {
        self.queues.get(device).map_or(0, VecDeque::len)
    }
}
