//! The single writer thread: drains the command channel, writes one atomic
//! batch per group, syncs it once (`fdatasync`), then answers every caller.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use bytes::Bytes;
use fjall::{OwnedWriteBatch, PersistMode};
use tokio::sync::{mpsc, oneshot};
use verge_core::time::Timestamp;

use crate::keys::{self, Entry};
use crate::staged::{self, Key};
use crate::synclog::{self, Ks, SyncLog};
use crate::{
    BODY_OVERHEAD, ENTRY_OVERHEAD, Engine, FullReason, MessageId, QueueState, Result, Shared,
    StoreError, Target,
};

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

enum Done {
    Append(oneshot::Sender<Result<MessageId>>, Result<MessageId>),
    Ack(oneshot::Sender<Result<()>>, Result<()>),
    Cleanup(oneshot::Sender<Result<u64>>, Result<u64>),
}

impl Done {
    fn fail(self, err: impl Fn() -> StoreError) {
        // A caller that went away does not care about the answer.
        match self {
            Done::Append(r, Ok(_)) => drop(r.send(Err(err()))),
            Done::Ack(r, Ok(())) => drop(r.send(Err(err()))),
            Done::Cleanup(r, Ok(_)) => drop(r.send(Err(err()))),
            other => other.send(),
        }
    }

    fn send(self) {
        match self {
            Done::Append(r, v) => drop(r.send(v)),
            Done::Ack(r, v) => drop(r.send(v)),
            Done::Cleanup(r, v) => drop(r.send(v)),
        }
    }
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

/// One group's writes. With the sync log on: the log record's payload and
/// the same writes for the staging area (`staged`); without it: an engine
/// batch synced on commit.
enum Batch {
    Logged { log: Vec<u8>, ops: Vec<staged::Op> },
    Engine(OwnedWriteBatch, Arc<Engine>),
}

impl Batch {
    fn new(sh: &Shared, logged: bool) -> Result<Batch> {
        Ok(if logged {
            Batch::Logged {
                log: Vec::with_capacity(4096),
                ops: Vec::new(),
            }
        } else {
            let e = sh.engine()?;
            Batch::Engine(e.db.batch().durability(Some(PersistMode::SyncData)), e)
        })
    }

    /// `fresh`: `key` is new (a new id or offset), not in the engine.
    fn insert_bytes(&mut self, ks: Ks, key: &[u8], value: Bytes, fresh: bool) {
        match self {
            Batch::Logged { log, ops } => {
                synclog::put_insert(log, ks, key, &value);
                ops.push(staged::Op {
                    ks,
                    key: Key::new(key),
                    value: Some(value),
                    fresh,
                });
            }
            Batch::Engine(b, e) => b.insert(e.keyspace(ks), key, value.as_ref()),
        }
    }

    fn insert(&mut self, ks: Ks, key: &[u8], value: &[u8]) {
        match self {
            Batch::Logged { .. } => {
                self.insert_bytes(ks, key, Bytes::copy_from_slice(value), false);
            }
            Batch::Engine(b, e) => b.insert(e.keyspace(ks), key, value),
        }
    }

    fn remove(&mut self, ks: Ks, key: &[u8]) {
        match self {
            Batch::Logged { log, ops } => {
                synclog::put_remove(log, ks, key);
                ops.push(staged::Op {
                    ks,
                    key: Key::new(key),
                    value: None,
                    fresh: false,
                });
            }
            Batch::Engine(b, e) => b.remove(e.keyspace(ks), key),
        }
    }
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

/// Why a group could not be made durable.
#[derive(Debug, Clone)]
enum CommitError {
    /// The engine would not have had room: nothing was written to it, the
    /// store stays usable.
    Full(FullReason),
    /// A write failed; the engine is poisoned until reopened.
    Io(String),
}

impl From<fjall::Error> for CommitError {
    fn from(e: fjall::Error) -> Self {
        CommitError::Io(e.to_string())
    }
}

impl From<StoreError> for CommitError {
    fn from(e: StoreError) -> Self {
        CommitError::Io(e.to_string())
    }
}

impl CommitError {
    fn to_store_error(&self) -> StoreError {
        match self {
            CommitError::Full(r) => StoreError::Full(*r),
            CommitError::Io(e) => StoreError::Io(std::io::Error::other(e.clone())),
        }
    }
}

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

/// Free space on the store's volume, read with `statvfs` at most every
/// [`GAUGE_MS`] or [`GAUGE_BYTES`] appended — not once per append — and
/// fresh before every engine write.
struct Gauge {
    /// (available, floor) at the last reading; `None` = unknown.
    last: Option<(u64, u64)>,
    at: std::time::Instant,
    appended: u64,
}

/// Longest a free-space reading is trusted for appends.
const GAUGE_MS: u64 = 100;
/// Most bytes appended on one free-space reading.
const GAUGE_BYTES: u64 = 1024 * 1024;

impl Gauge {
    fn new() -> Gauge {
        Gauge {
            last: None,
            at: std::time::Instant::now(),
            appended: 0,
        }
    }

    /// Reads the volume now.
    fn refresh(&mut self, sh: &Shared) -> Option<(u64, u64)> {
        self.at = std::time::Instant::now();
        self.appended = 0;
        self.last = match crate::Volume::read(&sh.dir, &sh.config) {
            Some(v) => Some((v.available, v.floor)),
            None => {
                tracing::warn!(dir = %sh.dir.display(), "statvfs failed; disk floor not checked");
                None
            }
        };
        self.last
    }

    /// (available, floor), from a reading at most [`GAUGE_MS`] old.
    fn get(&mut self, sh: &Shared) -> Option<(u64, u64)> {
        if self.at.elapsed() >= std::time::Duration::from_millis(GAUGE_MS)
            || self.appended >= GAUGE_BYTES
            || self.last.is_none()
        {
            return self.refresh(sh);
        }
        // Appended since the reading: assume it all took disk space.
        self.last.map(|(a, f)| (a.saturating_sub(self.appended), f))
    }
}

impl Writer {
    fn run(mut self) {
        let max = self.shared.config.max_group.max(1);
        // Reused: a group is drained from it, keeping its capacity.
        let mut cmds = Vec::new();
        while let Some(first) = self.rx.blocking_recv() {
            cmds.push(first);
            while cmds.len() < max {
                match self.rx.try_recv() {
                    Ok(c) => cmds.push(c),
                    Err(_) => break,
                }
            }
            self.group(&mut cmds);
            self.shared.retry.store(
                !self.deferred.is_empty() || self.shared.poisoned.load(Ordering::Relaxed),
                Ordering::Relaxed,
            );
        }
        // Not needed for safety (opening replays the log), but ending the lap
        // leaves nothing to replay after a clean shutdown.
        if self.log.is_some()
            && !self.shared.poisoned.load(Ordering::Relaxed)
            && let Err(e) = self.end_lap()
        {
            tracing::warn!(error = ?e, "store: final sync failed; the next open replays the sync log");
        }
    }

    /// Whether the engine may take about `bytes` more: with the disk floor
    /// on, half of the floor must stay free after them (the other half is
    /// the engine's own headroom for flushes and compactions). Read fresh:
    /// this runs once per lap, not per append.
    fn engine_room(&mut self, bytes: u64) -> std::result::Result<(), CommitError> {
        if self.shared.config.min_free_bytes == 0 {
            return Ok(());
        }
        let sh = self.shared.clone();
        match self.gauge.refresh(&sh) {
            Some((available, floor)) if available < bytes.saturating_add(floor / 2) => {
                Err(CommitError::Full(FullReason::DiskFloor {
                    available,
                    floor,
                }))
            }
            _ => Ok(()),
        }
    }

    /// Makes one group durable (with `sync`; see [`Cmd::Ack`]). With the
    /// sync log: the record is written and synced, then its writes are
    /// staged for the engine. A record that does not fit in the rest of the
    /// lap ends the lap first — before this group touches anything, so that
    /// if the engine cannot take the lap (disk full) the group fails whole.
    fn commit(&mut self, batch: Batch, sync: bool) -> std::result::Result<(), CommitError> {
        match batch {
            Batch::Engine(b, _) => {
                self.engine_room(b.len() as u64 * OP)?;
                let b = if sync { b } else { b.durability(None) };
                Ok(b.commit()?)
            }
            Batch::Logged { log, ops } => {
                let Some(slog) = self.log.as_ref() else {
                    return Err(CommitError::Io("sync log missing".into()));
                };
                if !slog.fits(log.len()) {
                    self.end_lap()?;
                }
                let fits = match self.log.as_mut() {
                    Some(slog) if slog.fits(log.len()) => {
                        slog.write(&log, sync)
                            .map_err(|e| CommitError::Io(format!("sync log: {e}")))?;
                        self.unsynced = !sync;
                        true
                    }
                    // Larger than the whole log: it goes to the engine
                    // directly, with the lap's end below.
                    Some(_) => {
                        self.engine_room(log.len() as u64)?;
                        false
                    }
                    None => return Err(CommitError::Io("sync log missing".into())),
                };
                let engine = self.shared.engine()?;
                // Readers may see these writes from now on; they only look at
                // offsets below the durable tails, raised after this returns.
                let sh = self.shared.clone();
                let mut st = sh.staged();
                for op in ops {
                    if let Some(del) = st.apply(op) {
                        let (b, written) = self
                            .deletes
                            .get_or_insert_with(|| (engine.db.batch().durability(None), [0; 3]));
                        written[del.ks as usize] += OP + del.key.as_slice().len() as u64;
                        b.remove(engine.keyspace(del.ks), del.key.as_slice());
                    }
                }
                drop(st);
                if !fits {
                    self.end_lap()
                } else if sync {
                    self.commit_deletes()
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Hands the pending deletes to the engine, unsynced: the log holds them
    /// (synced) until the lap ends. With the disk (nearly) full they wait
    /// for the lap's end instead.
    fn commit_deletes(&mut self) -> std::result::Result<(), CommitError> {
        let Some((_, written)) = &self.deletes else {
            return Ok(());
        };
        if self.engine_room(written.iter().sum()).is_err() {
            return Ok(());
        }
        if let Some((b, written)) = self.deletes.take() {
            b.commit()?;
            self.rotate_memtables(written);
        }
        Ok(())
    }

    /// Commits the staged writes to the engine — in batches of about one
    /// memtable each, so a large lap does not land in one oversized memtable —
    /// the last one synced, which makes every earlier engine write durable
    /// too, together with the next lap's start; then starts that lap at the
    /// log's offset 0. Refused, with nothing written, when the disk is
    /// (nearly) full.
    fn end_lap(&mut self) -> std::result::Result<(), CommitError> {
        let sh = self.shared.clone();
        let Some(next) = self.log.as_ref().map(SyncLog::next_seq) else {
            return Ok(());
        };
        let pending = self
            .deletes
            .as_ref()
            .map_or(0, |(_, w)| w.iter().sum::<u64>());
        self.engine_room((sh.staged().bytes() as u64).saturating_add(pending))?;
        let e = sh.engine()?;
        // Lazy records first: once they are durable, anything of theirs the
        // engine holds after a power cut below is replayed whole on open.
        if self.unsynced
            && let Some(slog) = self.log.as_mut()
        {
            slog.sync()
                .map_err(|e| CommitError::Io(format!("sync log: {e}")))?;
            self.unsynced = false;
        }
        // Before the lap's synced batch, which makes them durable with it.
        if let Some((b, written)) = self.deletes.take() {
            b.commit()?;
            self.rotate_memtables(written);
        }
        let limit = sh.config.memtable_bytes.max(1024 * 1024);
        let mut engine = e.db.batch().durability(None);
        let mut written = [0u64; 3];
        // A copy (cheap: keys are inline, values shared), so readers are not
        // held up while the engine takes it; only this thread changes it.
        let snapshot: Vec<(Ks, Key, staged::Slot)> = sh
            .staged()
            .all()
            .map(|(ks, k, s)| (ks, k.clone(), s.clone()))
            .collect();
        for (ks, key, slot) in &snapshot {
            let (ks, i) = (*ks, *ks as usize);
            written[i] += OP + (key.as_slice().len() + slot.value.len()) as u64;
            engine.insert(e.keyspace(ks), key.as_slice(), slot.value.as_ref());
            if written.iter().any(|&w| w >= limit) {
                // Unsynced is enough: the log covers it until the last batch
                // below is synced.
                std::mem::replace(&mut engine, e.db.batch().durability(None)).commit()?;
                self.rotate_memtables(std::mem::take(&mut written));
            }
        }
        let mut engine = engine.durability(Some(PersistMode::SyncData));
        engine.insert(&e.meta, keys::SYNC_LAP, next.to_be_bytes());
        engine.commit()?;
        // Only now: readers look here before the engine (see `staged`).
        sh.staged().clear();
        if let Some(slog) = self.log.as_mut() {
            slog.new_lap(next);
        }
        self.rotate_memtables(written);
        Ok(())
    }

    /// Reopens a poisoned engine in place (at most every
    /// [`crate::RETRY_INTERVAL`]): the old database is closed, the new one
    /// recovers its journal and replays the sync log's lap — every group
    /// ever acknowledged — and the queues are rebuilt from it, keeping the
    /// readers' cursors. Fails (to be tried again) while the disk is still
    /// full.
    fn reopen(&mut self) -> Result<()> {
        if self
            .last_reopen
            .is_some_and(|t| t.elapsed() < crate::RETRY_INTERVAL)
        {
            return Err(StoreError::Poisoned);
        }
        self.last_reopen = Some(std::time::Instant::now());
        let sh = self.shared.clone();
        if sh.config.min_free_bytes > 0 {
            // Reopening writes (journal recovery, the lap's replay): not
            // before the disk has room again. Until then the old engine
            // still serves reads.
            if let Some((available, floor)) = self.gauge.refresh(&sh)
                && available < floor / 2
            {
                return Err(StoreError::Full(FullReason::DiskFloor { available, floor }));
            }
        }
        // Everything that holds the old database goes first: fjall locks its
        // directory until the last handle is dropped.
        self.deletes = None;
        if let Some(old) = sh.swap_engine(None) {
            // Readers hold it for the length of one read at most.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while Arc::strong_count(&old) > 1 && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            drop(old);
        }
        let engine = crate::Engine::open(&sh.dir, &sh.config)?;
        let log = crate::open_sync_log(&engine, &sh.dir, &sh.config)?;
        let (fresh, stored, next_id) = engine.load()?;
        {
            let mut st = sh.lock();
            let old = std::mem::take(&mut *st);
            *st = fresh;
            st.next_qid = st.next_qid.max(old.next_qid);
            for (qid, o) in old.queues {
                if let Some(q) = st.queues.get_mut(&qid) {
                    q.acked = o.acked.clamp(q.head, q.durable);
                    q.cursor = o.cursor.clamp(q.acked, q.durable);
                    q.counted = o.counted.clamp(q.head, q.durable);
                    q.expired = o.expired;
                }
            }
        }
        // The engine holds the lap now. Hot bodies are durable ones, but
        // start clean rather than trust memory kept across a failure.
        sh.staged().clear();
        *sh.hot() = crate::Hot::default();
        sh.stored_bytes.store(stored, Ordering::Relaxed);
        self.next_id = next_id;
        self.log = log;
        self.mem = [0; 3];
        self.unsynced = false;
        sh.swap_engine(Some(Arc::new(engine)));
        sh.poisoned.store(false, Ordering::Relaxed);
        tracing::info!(dir = %sh.dir.display(), "store: engine reopened after a write failure; intake resumes");
        Ok(())
    }

    /// Records that queue `qid` is acknowledged below `end` although its
    /// checkpoint could not be written: reads and rewinds skip those
    /// offsets from now on, and the checkpoint goes out with a later group.
    fn defer(&mut self, qid: u32, end: u64) {
        let e = self.deferred.entry(qid).or_insert(end);
        *e = (*e).max(end);
        if let Some(q) = self.shared.lock().queues.get_mut(&qid) {
            q.acked = q.acked.max(end);
        }
    }

    fn group(&mut self, cmds: &mut Vec<Cmd>) {
        let sh = self.shared.clone();
        if sh.poisoned.load(Ordering::Relaxed)
            && let Err(e) = self.reopen()
        {
            if !matches!(e, StoreError::Poisoned) {
                tracing::warn!(error = %e, "store: cannot reopen the engine yet; retrying");
            }
            for c in cmds.drain(..) {
                match c {
                    Cmd::Append { reply, .. } => drop(reply.send(Err(StoreError::Poisoned))),
                    Cmd::Ack {
                        qid, up_to, reply, ..
                    } => {
                        let durable = sh.lock().queues.get(&qid).map_or(0, |q| q.durable);
                        self.defer(qid, up_to.saturating_add(1).min(durable));
                        drop(reply.send(Err(StoreError::Poisoned)));
                    }
                    Cmd::Cleanup { reply } => drop(reply.send(Err(StoreError::Poisoned))),
                    Cmd::Tick => {}
                }
            }
            return;
        }
        // Checkpoints that failed before go first (nobody waits for them).
        if !self.deferred.is_empty() {
            let mut again: Vec<Cmd> = self
                .deferred
                .drain()
                .map(|(qid, end)| Cmd::Ack {
                    qid,
                    up_to: end.saturating_sub(1),
                    sync: true,
                    reply: oneshot::channel().0,
                })
                .collect();
            again.append(cmds);
            *cmds = again;
        }
        let now = Timestamp::now();
        let disk_full = if sh.config.min_free_bytes > 0
            && cmds.iter().any(|c| matches!(c, Cmd::Append { .. }))
        {
            match self.gauge.get(&sh) {
                Some((available, floor)) if available < floor => {
                    Some(FullReason::DiskFloor { available, floor })
                }
                _ => None,
            }
        } else {
            None
        };
        let batch = match Batch::new(&sh, self.log.is_some()) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "store: no engine");
                for c in cmds.drain(..) {
                    match c {
                        Cmd::Append { reply, .. } => drop(reply.send(Err(StoreError::Poisoned))),
                        Cmd::Ack { reply, .. } => drop(reply.send(Err(StoreError::Poisoned))),
                        Cmd::Cleanup { reply } => drop(reply.send(Err(StoreError::Poisoned))),
                        Cmd::Tick => {}
                    }
                }
                return;
            }
        };
        let mut g = Group {
            batch,
            refs: HashMap::new(),
            tails: Vec::new(),
            heads: HashMap::new(),
            deleted: HashSet::new(),
            expired: Vec::new(),
            stored: sh.stored_bytes.load(Ordering::Relaxed),
            next_id: self.next_id,
            new_queues: Vec::new(),
            dirty: false,
            mem: [0; 3],
            appended: Vec::new(),
        };
        // A group of lazy checkpoints only is logged without a sync: the next
        // synced record (or the lap's end) makes it durable along with it.
        let sync = cmds
            .iter()
            .any(|c| !matches!(c, Cmd::Ack { sync: false, .. }));
        let mut done = Vec::with_capacity(cmds.len());
        for c in cmds.drain(..) {
            match c {
                Cmd::Append {
                    body,
                    exp,
                    targets,
                    reply,
                } => {
                    let r = match disk_full {
                        Some(reason) => Err(StoreError::Full(reason)),
                        None => self.append(&mut g, now, body, exp, &targets),
                    };
                    done.push(Done::Append(reply, r));
                }
                Cmd::Ack {
                    qid, up_to, reply, ..
                } => {
                    let r = self.ack(&mut g, qid, up_to);
                    done.push(Done::Ack(reply, r));
                }
                Cmd::Cleanup { reply } => {
                    let r = self.cleanup(&mut g, now);
                    done.push(Done::Cleanup(reply, r));
                }
                Cmd::Tick => {}
            }
        }
        if !g.dirty {
            done.into_iter().for_each(Done::send);
            return;
        }
        // Bodies nobody references any more go in the same batch.
        let mut refs: Vec<_> = g.refs.iter().map(|(&id, &v)| (id, v)).collect();
        refs.sort_unstable_by_key(|&(id, _)| id);
        for (id, (count, size, explicit)) in refs {
            g.mem[0] += if count == 0 { 2 * OP } else { OP };
            if count == 0 {
                if explicit {
                    g.batch.remove(Ks::Msgs, &keys::msg_key(keys::REF, id));
                }
                g.batch.remove(Ks::Msgs, &keys::msg_key(keys::BODY, id));
                g.stored = g.stored.saturating_sub(u64::from(size));
            } else {
                g.batch.insert(
                    Ks::Msgs,
                    &keys::msg_key(keys::REF, id),
                    &keys::ref_value(count, size),
                );
            }
        }
        g.batch
            .insert(Ks::Meta, keys::STORED_BYTES, &g.stored.to_be_bytes());
        g.batch
            .insert(Ks::Meta, keys::NEXT_ID, &g.next_id.to_be_bytes());
        g.mem[2] += 2 * OP;

        let Group {
            batch,
            refs,
            tails,
            heads,
            expired,
            stored,
            next_id,
            new_queues,
            mem,
            appended,
            ..
        } = g;
        if let Err(e) = self.commit(batch, sync) {
            match &e {
                CommitError::Full(reason) => {
                    if !self.full {
                        tracing::warn!(%reason, "store: the disk is full; appends are refused and checkpoints wait until space returns");
                    }
                    self.full = true;
                }
                CommitError::Io(e) => {
                    tracing::error!(error = %e, "store write failed; reopening the engine");
                    sh.poisoned.store(true, Ordering::Relaxed);
                }
            }
            // Delivered is delivered: the checkpoints are kept in memory and
            // written again, so a drain does not send them once more.
            for (qid, end) in heads {
                self.defer(qid, end);
            }
            for d in done {
                d.fail(|| e.to_store_error());
            }
            return;
        }
        if std::mem::take(&mut self.full) {
            tracing::info!("store: writes succeed again");
        }
        self.next_id = next_id;
        // Durable now: readers may take these bodies from memory.
        let cap = sh.config.hot_bytes;
        if cap > 0 {
            let mut hot = sh.hot();
            for (id, body, single) in appended {
                hot.insert(id, body, single, cap);
            }
            for (id, (count, _, _)) in refs {
                if count == 0 {
                    hot.remove(id);
                }
            }
        }
        {
            let mut st = sh.lock();
            for (qid, q) in new_queues {
                st.add_queue(qid, q);
            }
            for (qid, tail) in tails {
                if let Some(q) = st.queues.get_mut(&qid) {
                    q.durable = q.durable.max(tail);
                }
            }
            let mut n_expired = 0;
            for (qid, off) in expired {
                if let Some(q) = st.queues.get_mut(&qid)
                    && off >= q.counted
                {
                    q.expired += 1;
                    n_expired += 1;
                }
            }
            for (qid, head) in heads {
                if let Some(q) = st.queues.get_mut(&qid) {
                    q.head = q.head.max(head);
                    q.counted = q.counted.max(head);
                }
            }
            sh.expired_total.fetch_add(n_expired, Ordering::Relaxed);
        }
        sh.stored_bytes.store(stored, Ordering::Relaxed);
        done.into_iter().for_each(Done::send);
        // With the sync log the engine is written once per lap (`end_lap`).
        if self.log.is_none() {
            self.rotate_memtables(mem);
        }
    }

    /// fjall asks its (possibly busy) worker to rotate a full memtable with a
    /// `try_send` that can be dropped, letting memtables grow far past their
    /// limit under sustained load. Rotate them here instead: this enqueues the
    /// flush, and fjall stalls writers while 4+ sealed memtables wait, so
    /// memory stays bounded by the configured memtable size.
    fn rotate_memtables(&mut self, written: [u64; 3]) {
        let sh = self.shared.clone();
        let Ok(e) = sh.engine() else { return };
        let limit = sh.config.memtable_bytes.max(1024 * 1024);
        for (i, ks) in [&e.msgs, &e.queues, &e.meta].into_iter().enumerate() {
            self.mem[i] += written[i];
            if self.mem[i] >= limit {
                self.mem[i] = 0;
                if let Err(e) = ks.rotate_memtable() {
                    tracing::warn!(error = %e, "memtable rotation failed");
                }
            }
        }
    }

    /// Queue id for (endpoint, priority), creating the queue if needed.
    fn queue(&self, g: &mut Group, endpoint: &str, priority: u32) -> u32 {
        let sh = &self.shared;
        let mut st = sh.lock();
        if let Some(&(_, qid)) = st
            .endpoints
            .get(endpoint)
            .and_then(|v| v.iter().find(|(p, _)| *p == priority))
        {
            return qid;
        }
        if let Some((qid, _)) = g
            .new_queues
            .iter()
            .find(|(_, q)| q.endpoint == endpoint && q.priority == priority)
        {
            return *qid;
        }
        let qid = st.next_qid;
        st.next_qid = st.next_qid.saturating_add(1);
        drop(st);
        let mut rec = priority.to_be_bytes().to_vec();
        rec.extend_from_slice(endpoint.as_bytes());
        g.mem[2] += OP + rec.len() as u64;
        g.batch
            .insert(Ks::Meta, &keys::meta_queue_key(keys::QUEUE, qid), &rec);
        g.new_queues.push((
            qid,
            QueueState {
                endpoint: endpoint.to_owned(),
                priority,
                head: 0,
                next: 0,
                durable: 0,
                cursor: 0,
                acked: 0,
                counted: 0,
                expired: 0,
            },
        ));
        qid
    }

    fn append(
        &mut self,
        g: &mut Group,
        now: Timestamp,
        body: Bytes,
        exp: Option<Timestamp>,
        targets: &[Target],
    ) -> Result<MessageId> {
        let sh = self.shared.clone();
        let n = u32::try_from(targets.len()).map_err(|_| StoreError::TooLarge)?;
        let body_size =
            u32::try_from(body.len() as u64 + BODY_OVERHEAD).map_err(|_| StoreError::TooLarge)?;
        let size = u64::from(body_size) + ENTRY_OVERHEAD * u64::from(n);
        if let Some(limit) = sh.max_bytes()
            && g.stored.saturating_add(size) > limit
        {
            return Err(StoreError::Full(FullReason::ByteLimit {
                stored: g.stored,
                limit,
            }));
        }
        let id = g.next_id;
        g.next_id += 1;
        g.mem[0] += OP + body.len() as u64;
        g.batch
            .insert_bytes(Ks::Msgs, &keys::msg_key(keys::BODY, id), body.clone(), true);
        if sh.config.hot_bytes > 0 {
            g.appended.push((id, body, n == 1));
        }
        // Single-target bodies (the common case) need no refcount record.
        if n > 1 {
            g.refs.insert(id, (n, body_size, true));
        }
        for t in targets {
            let qid = self.queue(g, &t.endpoint, t.priority);
            let offset = {
                let mut st = sh.lock();
                if let Some(q) = st.queues.get_mut(&qid) {
                    let o = q.next;
                    q.next += 1;
                    o
                } else if let Some((_, q)) = g.new_queues.iter_mut().find(|(id, _)| *id == qid) {
                    let o = q.next;
                    q.next += 1;
                    o
                } else {
                    return Err(StoreError::Corrupt("queue vanished".into()));
                }
            };
            let mut expiry = match t.ttl_secs.or(sh.config.default_ttl_secs) {
                Some(ttl) => now.plus_secs(ttl).as_millis(),
                None => i64::MAX,
            };
            if let Some(e) = exp {
                expiry = expiry.min(e.as_millis());
            }
            let entry = Entry {
                id,
                enqueued: now,
                expiry,
                size: body_size,
            };
            g.batch.insert_bytes(
                Ks::Queues,
                &keys::entry_key(qid, offset),
                // Shared from the start: a reader's clone of it is then a
                // refcount, not a copy into a new allocation.
                Bytes::from_owner(entry.encode()),
                true,
            );
            g.tails.push((qid, offset + 1));
            g.mem[1] += OP + 40;
        }
        g.stored = g.stored.saturating_add(size);
        g.dirty = true;
        self.gauge.appended = self.gauge.appended.saturating_add(size);
        Ok(MessageId(id))
    }

    /// (head, durable tail, counted) of a queue as this group sees it.
    fn bounds(&self, g: &Group, qid: u32) -> Option<(u64, u64)> {
        let st = self.shared.lock();
        let q = st.queues.get(&qid)?;
        let head = g.heads.get(&qid).copied().unwrap_or(q.head).max(q.head);
        Some((head, q.durable))
    }

    fn drop_ref(&self, g: &mut Group, qid: u32, key: &[u8], e: &Entry) -> Result<()> {
        let sh = &self.shared;
        g.batch.remove(Ks::Queues, key);
        g.mem[1] += OP;
        g.stored = g.stored.saturating_sub(ENTRY_OVERHEAD);
        g.dirty = true;
        if let Some((_, off)) = keys::parse_entry_key(key) {
            g.deleted.insert((qid, off));
        }
        let known_single = sh.hot().single(e.id) == Some(true);
        let (count, size, explicit) = match g.refs.get(&e.id) {
            Some(&v) => v,
            // Appended with one reference: it never had an `r` record.
            None if known_single => (1, e.size, false),
            None => match sh.get(Ks::Msgs, &keys::msg_key(keys::REF, e.id)) {
                Ok(Some(v)) => match keys::u32_at(&v, 0).zip(keys::u32_at(&v, 4)) {
                    Some((c, s)) => (c, s, true),
                    // Damaged: drop the body with this reference (other
                    // references then find it missing and are skipped)
                    // rather than refusing every ack of the queue.
                    None => {
                        tracing::error!(
                            id = e.id,
                            "store: damaged refcount record; dropping its body"
                        );
                        (1, e.size, true)
                    }
                },
                // No record: this was the body's only reference.
                Ok(None) => (1, e.size, false),
                Err(err) if crate::is_damage(&err) => {
                    tracing::error!(id = e.id, error = %err, "store: damaged refcount record; dropping its body");
                    (1, e.size, true)
                }
                Err(err) => return Err(err),
            },
        };
        g.refs
            .insert(e.id, (count.saturating_sub(1), size, explicit));
        Ok(())
    }

    fn ack(&mut self, g: &mut Group, qid: u32, up_to: u64) -> Result<()> {
        let sh = self.shared.clone();
        let Some((head, durable)) = self.bounds(g, qid) else {
            return Err(StoreError::Corrupt("unknown queue id".into()));
        };
        let end = up_to.saturating_add(1).min(durable);
        if end <= head {
            return Ok(());
        }
        // At most `end - head` keys in range: the staged writes are never cut.
        let limit = usize::try_from(end - head).unwrap_or(usize::MAX);
        for kv in sh.range(
            Ks::Queues,
            &keys::entry_key(qid, head),
            &keys::entry_key(qid, end),
            limit,
        )? {
            let (k, v) = match kv {
                Ok(kv) => kv,
                // Unreadable references: the checkpoint still moves past
                // them (what they pointed to is not reclaimed), or the
                // queue would be stuck redelivering.
                Err(e) if crate::is_damage(&e) => {
                    tracing::error!(queue = qid, error = %e, "store: damaged references acknowledged without reclaiming them");
                    break;
                }
                Err(e) => return Err(e),
            };
            let k = k.as_slice();
            let Some((_, off)) = keys::parse_entry_key(k) else {
                continue;
            };
            if g.deleted.contains(&(qid, off)) {
                continue;
            }
            match Entry::decode(&v) {
                Some(e) => self.drop_ref(g, qid, k, &e)?,
                None => {
                    g.batch.remove(Ks::Queues, k);
                    g.dirty = true;
                }
            }
        }
        g.heads.insert(qid, end);
        g.mem[2] += OP;
        g.batch.insert(
            Ks::Meta,
            &keys::meta_queue_key(keys::CHECKPOINT, qid),
            &end.to_be_bytes(),
        );
        g.dirty = true;
        Ok(())
    }

    fn cleanup(&mut self, g: &mut Group, now: Timestamp) -> Result<u64> {
        let sh = self.shared.clone();
        let entire = sh.config.check_entire_queue_on_cleanup;
        let qids: Vec<u32> = sh.lock().queues.keys().copied().collect();
        let mut deleted = 0u64;
        for qid in qids {
            let Some((head, durable)) = self.bounds(g, qid) else {
                continue;
            };
            if head >= durable {
                continue;
            }
            let mut new_head = head;
            let mut contiguous = true;
            for kv in sh.range(
                Ks::Queues,
                &keys::entry_key(qid, head),
                &keys::entry_key(qid, durable),
                usize::MAX,
            )? {
                let (k, v) = match kv {
                    Ok(kv) => kv,
                    // Damaged: left for reads to skip; other queues go on.
                    Err(e) if crate::is_damage(&e) => break,
                    Err(e) => return Err(e),
                };
                let k = k.as_slice();
                let Some((_, off)) = keys::parse_entry_key(k) else {
                    continue;
                };
                if g.deleted.contains(&(qid, off)) {
                    if contiguous {
                        new_head = off + 1;
                    }
                    continue;
                }
                let Some(e) = Entry::decode(&v) else {
                    continue;
                };
                if e.is_expired(now) {
                    self.drop_ref(g, qid, k, &e)?;
                    g.expired.push((qid, off));
                    deleted += 1;
                    if contiguous {
                        new_head = off + 1;
                    }
                } else {
                    contiguous = false;
                    if !entire {
                        break;
                    }
                }
            }
            if new_head > head {
                g.heads.insert(qid, new_head);
                g.mem[2] += OP;
                g.batch.insert(
                    Ks::Meta,
                    &keys::meta_queue_key(keys::CHECKPOINT, qid),
                    &new_head.to_be_bytes(),
                );
                g.dirty = true;
            }
        }
        Ok(deleted)
    }
}
