//! The durable device-to-cloud log: every ingested message gets the next
//! offset, and `ingest` returns only after the message is on disk
//! (`append_submit` queues it in call order; its receipt waits for the disk).
//!
//! One writer thread owns appends. It takes whatever callers have queued (up
//! to [`MAX_GROUP`]), writes them as one fjall batch, syncs once
//! (`fdatasync`) and then answers every caller: concurrent producers share a
//! sync (group commit). Readers see only offsets below the durable tail,
//! published through a `watch` channel that followers wait on.

use std::sync::Mutex;
use std::thread::JoinHandle;

use bytes::Bytes;
use fjall::Keyspace;
use tokio::sync::mpsc::{Receiver, Sender, channel};
use tokio::sync::{oneshot, watch};
use verge_core::Message;

use crate::db::Db;
use crate::error::{CloudError, Result};

/// Most appends in one batch (one sync).
pub const MAX_GROUP: usize = 512;
/// Appends queued for the writer; a submission beyond this waits for room
/// (back-pressure on the device's connection, which stops being read).
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

/// A queued D2C append ([`D2cLog::append_submit`]); wait on it for its
/// offset once it is durable.
#[derive(Debug)]
pub struct D2cReceipt {
    rx: oneshot::Receiver<Result<u64>>,
    /// The writer's answer, kept so that waiting again after completion
    /// repeats it rather than polling a spent channel.
    outcome: Option<Result<u64>>,
}

impl D2cReceipt {
    /// The entry's offset once it is on disk; an error if the write failed
    /// or the log closed first. Cancel-safe: may be called again (also after
    /// it completed, repeating the answer).
    pub async fn wait(&mut self) -> Result<u64> {
        if self.outcome.is_none() {
            let r = (&mut self.rx).await.unwrap_or(Err(CloudError::Closed));
            self.outcome = Some(r);
        }
        match &self.outcome {
            Some(Ok(off)) => Ok(*off),
            // The writer answers only `Storage` errors; anything else is a closed log.
            Some(Err(CloudError::Storage(e))) => Err(CloudError::Storage(e.clone())),
            Some(Err(_)) => Err(CloudError::Closed),
            None => Err(CloudError::Closed),
        }
    }
}

pub(crate) struct D2cLog {
    ks: Keyspace,
    tx: Mutex<Option<Sender<Append>>>,
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
        let (tx, rx) = channel(QUEUE_CAPACITY);
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

    /// Queues one encoded message for the writer, waiting while the queue
    /// is full: the writer takes appends in submission order, so messages
    /// submitted one after another by a caller get increasing offsets. The
    /// receipt's [`D2cReceipt::wait`] resolves once the entry is durable.
    pub async fn append_submit(&self, encoded: Bytes) -> Result<D2cReceipt> {
        let (reply, rx) = oneshot::channel();
        let tx = self
            .tx
            .lock()
            .map_err(|_| CloudError::Closed)?
            .as_ref()
            .cloned()
            .ok_or(CloudError::Closed)?;
        tx.send(Append { encoded, reply })
            .await
            .map_err(|_| CloudError::Closed)?;
        Ok(D2cReceipt { rx, outcome: None })
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

fn writer_loop(db: Db, mut rx: Receiver<Append>, tail: watch::Sender<u64>, mut next: u64) {
    let mut since_rotate = 0u64;
    while let Some(first) = rx.blocking_recv() {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn encoded(i: u32) -> Bytes {
        verge_core::message::encode(&Message::new(format!("m{i}").into_bytes()))
    }

    #[tokio::test]
    async fn submissions_keep_their_order_and_wait_for_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let log = D2cLog::open(&db).unwrap();
        // Many in flight before any wait, as one connection's window.
        let mut receipts: Vec<D2cReceipt> = Vec::new();
        for i in 0..300 {
            receipts.push(log.append_submit(encoded(i)).await.unwrap());
        }
        // Waited on out of order: each still gets its submission's offset.
        for (i, r) in receipts.iter_mut().enumerate().rev() {
            let off = r.wait().await.unwrap();
            assert_eq!(off, i as u64);
            assert!(log.tail() > off, "acknowledged before it is durable");
            // Waiting again repeats the answer.
            assert_eq!(r.wait().await.unwrap(), off);
        }
        let read = log.read(0, 1000).unwrap();
        assert_eq!(read.len(), 300);
        for (i, e) in read.iter().enumerate() {
            assert_eq!(e.offset, i as u64);
            assert_eq!(e.message.body, Bytes::from(format!("m{i}")));
        }
        // Later submissions follow on.
        let mut next = log.append_submit(encoded(300)).await.unwrap();
        assert_eq!(next.wait().await.unwrap(), 300);

        log.close();
        assert!(matches!(
            log.append_submit(encoded(301)).await,
            Err(CloudError::Closed)
        ));
    }

    /// More submissions than the queue holds, none waited for: the later
    /// ones wait for room instead of being refused, and all keep their order.
    #[tokio::test]
    async fn a_full_queue_makes_submissions_wait_not_fail() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        let log = D2cLog::open(&db).unwrap();
        let n = 3 * QUEUE_CAPACITY as u32;
        let mut receipts = Vec::new();
        for i in 0..n {
            receipts.push(log.append_submit(encoded(i)).await.unwrap());
        }
        for (i, r) in receipts.iter_mut().enumerate() {
            assert_eq!(r.wait().await.unwrap(), i as u64);
        }
        assert_eq!(log.tail(), u64::from(n));
    }

    #[tokio::test]
    async fn a_writer_that_goes_away_fails_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path()).unwrap();
        // A log whose writer never answers and then dies: its queue is
        // dropped with the submissions still in it.
        let (tx, rx) = channel(QUEUE_CAPACITY);
        let (_tail_tx, tail) = watch::channel(0);
        let log = D2cLog {
            ks: db.d2c.clone(),
            tx: Mutex::new(Some(tx)),
            tail,
            writer: Mutex::new(None),
        };
        let mut a = log.append_submit(encoded(0)).await.unwrap();
        let mut b = log.append_submit(encoded(1)).await.unwrap();
        drop(rx);
        assert!(matches!(a.wait().await, Err(CloudError::Closed)));
        assert!(matches!(b.wait().await, Err(CloudError::Closed)));
        assert!(matches!(a.wait().await, Err(CloudError::Closed)));
        // New submissions are refused outright.
        assert!(matches!(
            log.append_submit(encoded(2)).await,
            Err(CloudError::Closed)
        ));
    }

    #[tokio::test]
    async fn a_failed_write_is_repeated_on_every_wait() {
        let (reply, rx) = oneshot::channel();
        let mut r = D2cReceipt { rx, outcome: None };
        reply
            .send(Err(CloudError::Storage("disk full".into())))
            .unwrap();
        for _ in 0..2 {
            match r.wait().await {
                Err(CloudError::Storage(m)) => assert_eq!(m, "disk full"),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}
