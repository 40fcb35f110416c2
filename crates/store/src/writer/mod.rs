//! The single writer thread: drains the command channel, writes one atomic
//! batch per group, syncs it once (`fdatasync`), then answers every caller.
//!
//! Split by feature, each file adding an `impl Writer` block, so a change to
//! one concern reads one file: `group` (the loop and group commit), `append`,
//! `checkpoint` (acks and TTL cleanup), `batch` (one group's writes),
//! `commit` (making a group durable: sync log, laps, engine), `space` (the
//! free-space guard) and `recover` (after a failed group). This file holds
//! what they share: the command, the group, the writer's state, spawning.

mod append;
mod batch;
mod checkpoint;
mod commit;
mod group;
mod recover;
mod space;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use fjall::OwnedWriteBatch;
use tokio::sync::{mpsc, oneshot};
use verge_core::time::Timestamp;

use crate::synclog::SyncLog;
use crate::{MessageId, QueueState, Result, Shared, Target};

use batch::Batch;
use space::Gauge;

/// A request to the writer.
pub(crate) enum Cmd {
    Append {
        body: Bytes,
        exp: Option<Timestamp>,
        targets: Vec<Target>,
        reply: oneshot::Sender<Result<MessageId>>,
    },
    Ack {
        qid: u32,
        up_to: u64,
        /// `false`: a checkpoint that may wait for a later group's sync.
        sync: bool,
        reply: oneshot::Sender<Result<()>>,
    },
    Cleanup {
        reply: oneshot::Sender<Result<u64>>,
    },
    /// Wakes the writer to retry deferred checkpoints or a reopen.
    Tick,
}

/// Everything one group changes, applied to the shared state after the sync.
struct Group {
    batch: Batch,
    /// Refcount and accounted body size of every body touched.
    /// (count, size, has an `r` record) per body.
    refs: HashMap<u64, (u32, u32, bool)>,
    /// New durable tails.
    tails: Vec<(u32, u64)>,
    /// New heads (also consulted by later commands of the same group).
    heads: HashMap<u32, u64>,
    /// References deleted in this group (so a later command skips them).
    deleted: HashSet<(u32, u64)>,
    /// Expired references deleted in this group.
    expired: Vec<(u32, u64)>,
    stored: u64,
    next_id: u64,
    new_queues: Vec<(u32, QueueState)>,
    dirty: bool,
    /// Approximate memtable bytes written per keyspace (msgs, queues, meta).
    mem: [u64; 3],
    /// Bodies appended in this group: (id, body, single reference).
    appended: Vec<(u64, Bytes, bool)>,
}

struct Writer {
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Cmd>,
    /// `None`: every group is synced in the engine itself.
    log: Option<SyncLog>,
    next_id: u64,
    /// Approximate bytes in each keyspace's active memtable.
    mem: [u64; 3],
    /// Deletes of keys the engine may hold, from groups logged but not yet
    /// synced (lazy checkpoints), with their approximate memtable bytes.
    /// They reach the engine only after a sync covers their record, so a
    /// power cut cannot leave the engine with a group's deletes and without
    /// the rest of that group.
    deletes: Option<(OwnedWriteBatch, [u64; 3])>,
    /// A record was logged without a sync since the last sync.
    unsynced: bool,
    gauge: Gauge,
    /// Checkpoints (queue → first offset not acknowledged) whose group
    /// failed (disk full, engine reopening): applied in memory (reads and
    /// rewinds skip them) and written again with a later group.
    deferred: HashMap<u32, u64>,
    /// When a reopen of the poisoned engine was last tried.
    last_reopen: Option<std::time::Instant>,
    /// The last group failed for lack of disk space (logged once).
    full: bool,
}

/// Approximate memtable cost of one write besides key and value.
const OP: u64 = 48;

pub(crate) fn spawn(
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Cmd>,
    log: Option<SyncLog>,
    next_id: u64,
) -> std::io::Result<JoinHandle<()>> {
    let w = Writer {
        shared,
        rx,
        log,
        next_id,
        mem: [0; 3],
        deletes: None,
        unsynced: false,
        gauge: Gauge::new(),
        deferred: HashMap::new(),
        last_reopen: None,
        full: false,
    };
    std::thread::Builder::new()
        .name("verge-store-writer".into())
        .spawn(move || w.run())
}
