//! The durable device-to-cloud log: every ingested message gets the next
//! offset, and `ingest` returns only after the message is on disk.
//!
//! One writer thread owns appends. It takes whatever callers have queued (up
//! to [`MAX_GROUP`]), writes them as one fjall batch, syncs once
//! (`fdatasync`) and then answers every caller: concurrent producers share a
//! sync (group commit). Readers see only offsets below the durable tail,
//! published through a `watch` channel that followers wait on.

use std::sync::Mutex;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use bytes::Bytes;
use fjall::Keyspace;
use tokio::sync::{oneshot, watch};
use verge_core::Message;

use crate::db::Db;
use crate::error::{CloudError, Result};

/// Most appends in one batch (one sync).
pub const MAX_GROUP: usize = 512;
/// Appends that may wait for the writer; beyond this `ingest` answers 429.
pub const QUEUE_CAPACITY: usize = 4096;
/// Rotate the memtable after this many bytes written: fjall's own rotation
/// request can be dropped when its worker is busy (measured in verge-store).
const ROTATE_BYTES: u64 = 16 * 1024 * 1024;

/// One logged message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct D2cEntry {
    /// Its position in the log.
    pub offset: u64,
    /// The message, with `connectionDeviceId`/`connectionModuleId` and `enqueuedTime` stamped.
    pub message: Message,
}

struct Append {
    encoded: Bytes,
    reply: oneshot::Sender<Result<u64>>,
}

pub(crate) struct D2cLog {
    ks: Keyspace,
    tx: Mutex<Option<SyncSender<Append>>>,
    tail: watch::Receiver<u64>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl D2cLog {
    /// Opens the log: the next offset is one past the last stored key.
    pub fn open(db: &Db) -> Result<Self> {
        let next = match db.d2c.last_key_value() {
            Some(kv) => {
                let k = kv.key()?;
                let raw: [u8; 8] = k
                    .as_ref()
                    .try_into()
                    .map_err(|_| CloudError::Storage("d2c key is not 8 bytes".into()))?;
                u64::from_be_bytes(raw) + 1
            }
            None => 0,
        };
        let (tail_tx, tail) = watch::channel(next);
        let (tx, rx) = sync_channel(QUEUE_CAPACITY);
        let wdb = db.clone();
        let writer = std::thread::Builder::new()
            .name("d2c-writer".into())
            .spawn(move || writer_loop(wdb, rx, tail_tx, next))
            .map_err(|e| CloudError::Storage(format!("cannot start the d2c writer: {e}")))?;
        Ok(Self {
            ks: db.d2c.clone(),
            tx: Mutex::new(Some(tx)),
            tail,
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Appends one encoded message; resolves after it is durable.
    pub async fn append(&self, encoded: Bytes) -> Result<u64> {
        let (reply, rx) = oneshot::channel();
        {
            let tx = self.tx.lock().map_err(|_| CloudError::Closed)?;
            let tx = tx.as_ref().ok_or(CloudError::Closed)?;
            match tx.try_send(Append { encoded, reply }) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    return Err(CloudError::Throttled(
                        "the D2C log writer is saturated".into(),
                    ));
                }
                Err(TrySendError::Disconnected(_)) => return Err(CloudError::Closed),
            }
        }
        rx.await.map_err(|_| CloudError::Closed)?
    }

    /// The first offset not yet written (everything below it is durable).
    pub fn tail(&self) -> u64 {
        *self.tail.borrow()
    }

    /// Up to `max` entries from `from`, only durable ones.
    pub fn read(&self, from: u64, max: usize) -> Result<Vec<D2cEntry>> {
        let tail = self.tail();
        let mut out = Vec::new();
        if from >= tail || max == 0 {
            return Ok(out);
        }
        for kv in self.ks.range(from.to_be_bytes()..tail.to_be_bytes()) {
            let (k, v) = kv.into_inner()?;
            let raw: [u8; 8] = k
                .as_ref()
                .try_into()
                .map_err(|_| CloudError::Storage("d2c key is not 8 bytes".into()))?;
            let message = verge_core::message::decode(Bytes::copy_from_slice(&v))
                .map_err(|e| CloudError::Storage(format!("d2c entry: {e}")))?;
            out.push(D2cEntry {
                offset: u64::from_be_bytes(raw),
                message,
            });
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// Waits until the durable tail passes `offset` (an entry at `offset` exists).
    pub async fn wait_past(&self, offset: u64) -> Result<()> {
        let mut rx = self.tail.clone();
        rx.wait_for(|t| *t > offset)
            .await
            .map(|_| ())
            .map_err(|_| CloudError::Closed)
    }

    /// Stops the writer after it has answered everything queued.
    pub fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(h) = handle
            && h.join().is_err()
        {
            tracing::error!("the d2c writer panicked");
        }
    }
}

impl Drop for D2cLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn writer_loop(db: Db, rx: Receiver<Append>, tail: watch::Sender<u64>, mut next: u64) {
    let mut since_rotate = 0u64;
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(a) => group.push(a),
                Err(_) => break,
            }
        }
        let mut batch = db.durable_batch();
        let mut bytes = 0u64;
        for (i, a) in group.iter().enumerate() {
            let off = next + i as u64;
            bytes += a.encoded.len() as u64 + 8;
            batch.insert(&db.d2c, off.to_be_bytes(), a.encoded.as_ref());
        }
        match batch.commit() {
            Ok(()) => {
                let first_off = next;
                next += group.len() as u64;
                tail.send_replace(next);
                for (i, a) in group.into_iter().enumerate() {
                    let _ = a.reply.send(Ok(first_off + i as u64));
                }
                since_rotate += bytes;
                if since_rotate >= ROTATE_BYTES {
                    since_rotate = 0;
                    if let Err(e) = db.d2c.rotate_memtable() {
                        tracing::warn!(error = %e, "d2c memtable rotation failed");
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "d2c append failed");
                for a in group {
                    let _ = a.reply.send(Err(CloudError::Storage(e.to_string())));
                }
            }
        }
    }
}
