//! Device-to-cloud messages: telemetry stamped and appended to the durable
//! D2C log (`crate::d2c`), and reads of that log.

use verge_core::{ClientId, Message};

use super::{CloudState, entry_mut, lock, now};
use crate::d2c::{D2cEntry, D2cReceipt};
use crate::error::{CloudError, Result};

impl CloudState {
    /// Appends a message from `from` to the D2C log, stamping
    /// `connectionDeviceId`/`connectionModuleId`, `enqueuedTime` and a
    /// message id when absent. Returns the offset once it is on disk.
    pub async fn ingest(&self, from: &ClientId, message: Message) -> Result<u64> {
        self.ingest_submit(from, message).await?.wait().await
    }

    /// [`CloudState::ingest`] without the wait for the disk: stamps the
    /// message and queues it for the D2C log's writer (waiting only while
    /// the writer's queue is full). Submissions
    /// take offsets in call order; the receipt's [`D2cReceipt::wait`]
    /// resolves once the message is on disk (only then may it be
    /// acknowledged).
    pub async fn ingest_submit(&self, from: &ClientId, mut message: Message) -> Result<D2cReceipt> {
        message
            .check_size()
            .map_err(|e| CloudError::BadRequest(e.to_string()))?;
        let t = now();
        message.system.connection_device_id = Some(from.device.to_string());
        message.system.connection_module_id = from.module.as_ref().map(ToString::to_string);
        message.system.enqueued_time = Some(t);
        if message.system.message_id.is_none() {
            message.system.message_id = Some(uuid::Uuid::new_v4().to_string());
        }
        {
            let mut reg = lock(&self.inner.reg);
            if let Ok(c) = entry_mut(&mut reg, from).map(|e| e.conn) {
                c.activity_ms = t.as_millis();
            }
        }
        self.inner
            .d2c
            .append_submit(verge_core::message::encode(&message))
            .await
    }

    /// Up to `max` durable D2C entries starting at offset `from`.
    pub fn read_d2c(&self, from: u64, max: usize) -> Result<Vec<D2cEntry>> {
        self.inner.d2c.read(from, max)
    }

    /// The next offset to be written.
    pub fn d2c_tail(&self) -> u64 {
        self.inner.d2c.tail()
    }

    /// Waits until an entry at `offset` exists.
    pub async fn wait_d2c(&self, offset: u64) -> Result<()> {
        self.inner.d2c.wait_past(offset).await
    }
}
