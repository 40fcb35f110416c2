//! Verge's store-and-forward message store: durable, crash-safe, with one
//! ordered queue per (endpoint, priority), per-target TTL and disk limits.
//!
//! The edge hub appends every accepted message together with the endpoints it
//! was routed to ([`Store::append`]), acknowledges the sender only after the
//! append returned `Ok`, and runs one pump per endpoint that takes batches
//! ([`Store::read`]) and checkpoints them after delivery ([`Store::ack`]).
//!
//! # Engine
//!
//! [fjall] 3 (an LSM tree with a shared write-ahead journal). Measured on this
//! project's target disk it gives the fastest durable commits of the embedded
//! engines (on a par with a raw `fdatasync`ed file), builds in seconds, and
//! survived kill -9 rounds. Its weakness — reads that start at a queue's
//! beginning walk every tombstone left by acks — is avoided by construction:
//! every read seeks to a key built from the queue's cursor (`range(cursor..)`),
//! so reading the head after a million acks costs the same as after none.
//! redb (B-tree, no tombstones) was the runner-up at ~0.65× the commit rate;
//! RocksDB was rejected for its 10-minute C++ build.
//!
//! # On-disk layout
//!
//! One fjall database in the store directory with three keyspaces:
//!
//! | keyspace | key | value |
//! |---|---|---|
//! | `msgs` | `b` · id (u64 BE) | the message in [`verge_core::message::encode`] form |
//! | `msgs` | `r` · id | refcount (u32 BE) · accounted size (u32 BE); only for bodies with 2+ references |
//! | `queues` | queue id (u32 BE) · offset (u64 BE) | message id · enqueue time (ms) · expiry (ms, `i64::MAX` = never) · accounted body size (u32) |
//! | `meta` | `q` · queue id | priority (u32 BE) · endpoint id (UTF-8) |
//! | `meta` | `c` · queue id | head offset (u64 BE): first offset not yet acknowledged |
//! | `meta` | `n` | next message id |
//! | `meta` | `s` | accounted stored bytes (for the byte limit) |
//! | `meta` | `w` | sequence number of the sync log's current lap |
//!
//! Next to it, `sync.log` ([`StoreConfig::sync_log_bytes`], default 2 MiB).
//!
//! Nothing else is kept in memory but one small record per queue (offsets,
//! cursor, counters) and the current lap's writes not yet handed to the
//! engine (bounded by the sync log's size, below): no index of messages, so
//! memory does not grow with the backlog. Engine caches are bounded by
//! [`StoreConfig`]: block cache, a memtable size per keyspace (the writer
//! rotates full memtables itself, because fjall's own rotation request can be
//! dropped when its worker is busy, which let memtables grow to hundreds of
//! MB under sustained load),
//! journal size and one background worker. Measured: 1,000,000 stored
//! 256-byte messages with a peak RSS under 50 MiB (see `BENCHMARKS.md`).
//!
//! # Invariants
//!
//! * **One writer.** Every mutation (append, ack, TTL cleanup) goes through a
//!   single writer thread fed by a bounded channel. It drains whatever is
//!   queued (up to [`StoreConfig::max_group`] commands), writes it as **one
//!   atomic record** (below), makes that durable, and only then completes
//!   each caller's oneshot: **an `Ok` from `append` or `ack` means the data
//!   is on disk** ([`Store::checkpoint`], an ack for delivery pumps, is the
//!   one exception: it rides on the next synced group). Concurrent producers
//!   share one sync (group commit), so throughput scales with the number of
//!   producers.
//! * **Sync log.** "Durable" means: the group's record is `fdatasync`ed in
//!   `sync.log`, a preallocated, zero-filled circular file (overwriting
//!   allocated blocks syncs in about half the time of the engine's growing
//!   journal; +12 % routed hub throughput with one publisher). The engine
//!   does not get the batch yet: its writes are *staged* in memory
//!   (`staged.rs`) for the rest of the lap, where a reference or body
//!   deleted before the lap ends cancels out with its insert and never
//!   reaches the engine (most messages are delivered within milliseconds, so
//!   the engine's memtable inserts, tombstones, flushes and compactions for
//!   them are skipped: in the hub benchmark with one publisher, hub CPU per
//!   message went from 26–28 to 19–20 µs and the routed rate up 38–46 %).
//!   Deletes of keys the engine may hold go to it with their group. When a
//!   record does not fit in the rest of the file, the lap ends: what is
//!   still staged is committed to the engine, the last batch with
//!   `SyncData`, which makes every earlier engine write durable, together
//!   with the sequence number the next lap starts at (`meta` key `w`); then
//!   the staged writes are dropped and the log starts again at offset 0.
//!   Readers look at the staged writes first and at the engine second, so a
//!   lap moving over is never missed. Opening replays the current lap —
//!   records from offset 0 numbered on from `w`, each with a valid checksum —
//!   into
//!   the engine before anything else; replaying a batch the engine already
//!   has changes nothing. See `synclog.rs`. With
//!   [`StoreConfig::sync_log_bytes`] = 0 every group is synced in the engine.
//! * **Atomic groups.** A body, its refcount and all its queue references land
//!   in the same sync-log record as the `n`/`s` counters, and the engine gets
//!   none of a group's writes before that record is synced (a lazy
//!   checkpoint's deletes wait for the next sync), so after a crash the store
//!   is a prefix of the committed groups and always self-consistent; opening
//!   needs no repair step (fjall replays its journal, then the store its sync
//!   log).
//! * **Visibility.** Readers only see offsets below a queue's *durable tail*,
//!   advanced after the sync, so nothing is delivered before it is durable.
//! * **Checkpoint semantics.** `ack(endpoint, priority, n)` means "every offset
//!   ≤ n of that queue is done": the references are deleted, the head offset
//!   becomes n + 1 and is persisted in the same durable batch. Reads after a
//!   restart resume at the head. Acks are durable when `ack` returns;
//!   [`Store::checkpoint`] is the same without a sync of its own (a group of
//!   checkpoints only is logged unsynced and becomes durable with the next
//!   synced record, which `fdatasync` covers too). If the process dies
//!   before either is durable, the messages are simply delivered again
//!   (at-least-once, never loss).
//! * **Refcount.** A body's refcount is the number of queue references to it;
//!   each deleted reference (ack or TTL) decrements it and the body is deleted
//!   in the same batch when it reaches zero. Being part of the atomic batches,
//!   it survives restarts exactly. A body with a single reference (the common
//!   case) has no `r` record: its absence means "one", which saves a write
//!   per message.
//! * **Read cursor.** Besides the durable head, each queue has an in-memory
//!   read cursor so a pump can read the next batch before the previous one is
//!   acknowledged. [`Store::rewind`] moves it back to the head (after a failed
//!   delivery); a restart does the same. One pump per endpoint is assumed.
//!
//! # TTL
//!
//! A reference expires at `enqueue time + ttl` (the target's TTL, else
//! [`StoreConfig::default_ttl_secs`]), or at the message's own `$.exp` if that
//! is earlier. Expired references are skipped by [`Store::read`] and deleted
//! by a cleanup pass (every [`StoreConfig::cleanup_interval`], or on demand via
//! [`Store::cleanup`]) that trims expired heads of queues — or whole queues when
//! [`StoreConfig::check_entire_queue_on_cleanup`] is set — and by acks passing
//! over them. Each expired reference is counted once per process lifetime
//! ([`Store::expired_count`], [`QueueInfo::expired`]); the counters are not
//! persisted and a reference skipped but not yet deleted before a restart may
//! be counted again after it.
//!
//! # Failure behaviour
//!
//! * **Back-pressure.** The command channel is bounded
//!   ([`StoreConfig::channel_capacity`]); `append` waits for room, so a slow
//!   disk slows producers instead of growing memory.
//! * **Full.** If accepting an append would take the accounted size over
//!   the byte limit ([`StoreConfig::max_bytes`], [`Store::set_max_bytes`]),
//!   or the file system's available space is below the floor
//!   ([`StoreConfig::min_free_bytes`], capped at
//!   [`StoreConfig::min_free_percent`] of the volume; read with `statvfs` at
//!   most every 100 ms or 1 MiB appended, never per append), that append
//!   fails with [`StoreError::Full`] ("storage full") and nothing is
//!   written. Stored data is untouched; acks and TTL cleanup keep working
//!   and intake resumes by itself once the condition clears. Opening warns
//!   when the volume has no room above the floor.
//! * **The engine never meets a full disk** while the floor is on: before
//!   each engine write (a lap's end, pending deletes) the space is read
//!   again, and half the floor must stay free after it (the rest is the
//!   engine's headroom for flushes and compactions). If it would not, the
//!   engine is not written: deletes wait for the lap's end, and a group
//!   that needs the lap to end fails with [`StoreError::Full`], whole.
//!   Checkpoints in such a group (and any group that failed) are kept in
//!   memory — reads and [`Store::rewind`] skip what they acknowledged, so
//!   a drain does not resend it — and written with a later group once
//!   space returns (until then a restart redelivers them: at least once).
//! * **I/O errors.** If a write or sync fails (another process filled the
//!   disk past the floor, a failing disk), every caller of that group gets
//!   [`StoreError::Io`] and fjall marks the database poisoned. The writer
//!   reopens it in place, without a restart: at the next command or every
//!   500 ms, once the disk has room again, the old database is closed, the
//!   new one recovers its journal, the sync log's lap is replayed into it
//!   and the queues are rebuilt (readers keep their cursors). Until then
//!   mutations get [`StoreError::Poisoned`]; reads keep working. Callers
//!   saw no `Ok` for the failed group, so no acknowledged message is lost.
//! * **Damaged records.** A reference or body that fails its checksum or does
//!   not decode — or a block of the engine's tables that cannot be read — is
//!   logged, counted ([`Store::damaged_count`]) and skipped by `read`; the
//!   rest of the queue flows, and acks over it still move the checkpoint
//!   (what a damaged reference pointed to is not reclaimed). A damaged
//!   record in the middle of the sync log's lap is skipped if intact records
//!   of the lap follow it (their groups are replayed, the lost ones counted
//!   and logged at open); a damaged last record is a torn write and ends the
//!   lap, as before. Damaged engine files that keep it from opening (a
//!   deleted table, a corrupt manifest) make [`Store::open`] fail:
//!   [`move_aside`] puts the directory aside so an empty store can start.
//! * **Power loss** is covered as far as `fdatasync` and the disk's write
//!   cache honour it; the tests kill the process (SIGKILL), not the machine.
//!
//! # Async use
//!
//! [`Store::open`] blocks (it replays the journal): call it before starting
//! the pumps or inside `spawn_blocking`. Every other method is `async` and
//! either hands work to the writer thread or runs reads in
//! `tokio::task::spawn_blocking` — except a read with at most 128 references
//! unread, which is what a pump right behind the writer sees: those are
//! staged and their bodies in the hot cache, so it runs in place
//! (memory only) and saves two thread hand-offs (8 × 32 hub benchmark: +20 %
//! routed, p50 from hundreds of ms to 11–24 ms). Dropping the last
//! [`Store`] handle stops the writer after it has finished queued work and
//! joins it (a short block of the dropping thread).
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> verge_store::Result<()> {
//! use verge_core::message::Message;
//! use verge_store::{Store, StoreConfig, Target};
//!
//! let store = Store::open("/var/lib/verge/store", StoreConfig::default())?;
//! let targets = [Target::new("$upstream"), Target::new("modules/filter/inputs/in1").priority(0)];
//! store.append(&Message::new("21.5"), &targets).await?; // durable: PUBACK now
//! let batch = store.read("$upstream", 10).await?;
//! // ... deliver ...
//! if let Some(last) = batch.last() {
//!     store.ack("$upstream", last.priority, last.offset).await?;
//! }
//! # Ok(())
//! # }
//! ```

mod keys;
mod open;
mod read;
mod shared;
mod staged;
mod synclog;
mod writer;

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use fjall::config::PinningPolicy;
use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use tokio::sync::{mpsc, oneshot};
use verge_core::message::{Message, decode, encode};
use verge_core::time::Timestamp;

use keys::Entry;
pub(crate) use open::{Engine, Threads, open_sync_log};
use read::{Merged, read_blocking};
pub(crate) use shared::{Hot, QueueState, Shared, State, is_damage};
use writer::Cmd;

/// The priority of routes that do not set one (IoT Edge's default).
pub const DEFAULT_PRIORITY: u32 = 2_000_000_000;

/// Bytes accounted per stored body on top of its encoded length.
pub const BODY_OVERHEAD: u64 = 64;
/// Bytes accounted per queue reference.
pub const ENTRY_OVERHEAD: u64 = 48;

/// How often the writer retries deferred checkpoints and reopening a
/// poisoned engine.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// Unread references up to which [`Store::read`] reads in place.
const INLINE_READ_MAX: u64 = 128;

/// Store settings. [`StoreConfig::default`] suits an edge device.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// TTL of targets that do not set one, in seconds; `None` = never expire.
    /// Default 7200 s.
    pub default_ttl_secs: Option<u64>,
    /// Limit on the accounted store size (encoded bodies + [`BODY_OVERHEAD`]
    /// per body + [`ENTRY_OVERHEAD`] per reference); `None` = no limit.
    /// This is a logical size; the files on disk differ by the journal
    /// (up to [`StoreConfig::journal_bytes`]) and LSM space amplification
    /// (tombstones and old tables until compaction), so keep
    /// [`StoreConfig::min_free_bytes`] as the physical guard.
    pub max_bytes: Option<u64>,
    /// Appends fail with [`StoreError::Full`] while the file system holding
    /// the store has less than the *floor* available: this many bytes, or
    /// [`StoreConfig::min_free_percent`] of the volume's size if that is
    /// less (a small volume still takes messages). 0 turns every free-space
    /// check off. Default 64 MiB. Below half the floor the engine is not
    /// written either (see "Failure behaviour").
    pub min_free_bytes: u64,
    /// Caps the floor at this percentage of the volume's size (100 = no
    /// cap). Default 10.
    pub min_free_percent: u8,
    /// How often expired references are cleaned up. Default 60 s.
    pub cleanup_interval: Duration,
    /// Scan whole queues for expired references on cleanup, not only their
    /// heads. Default false.
    pub check_entire_queue_on_cleanup: bool,
    /// Capacity of the writer's command channel (back-pressure bound).
    /// Default 4096.
    pub channel_capacity: usize,
    /// Most commands written in one group commit. Default 2048.
    pub max_group: usize,
    /// Engine block cache, bytes. Default 4 MiB.
    pub cache_bytes: u64,
    /// Engine memtable size per keyspace, bytes (at least 1 MiB). Default 2 MiB.
    pub memtable_bytes: u64,
    /// Engine journal size limit, bytes (at least 64 MiB). Default 64 MiB.
    pub journal_bytes: u64,
    /// Engine background threads (flush, compaction). Default 1.
    pub worker_threads: usize,
    /// Bytes of recently appended bodies kept in memory, so that a pump
    /// reading right behind the writer (the common case) and the acks that
    /// follow skip the engine lookups. 0 disables it. Default 2 MiB.
    pub hot_bytes: usize,
    /// Size of the sync log (`sync.log`, preallocated), bytes; 0 = sync every
    /// group in the engine's own journal instead. Each group is synced by
    /// overwriting this file, which costs about half of syncing the growing
    /// journal; once per lap the engine is synced (≈ 1 ms per MiB written
    /// since the last one). It also bounds the writes held in memory until
    /// the lap ends: at most what one lap logs, plus a map entry (about 64
    /// bytes) per write. Default 2 MiB.
    pub sync_log_bytes: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            default_ttl_secs: Some(7200),
            max_bytes: None,
            min_free_bytes: 64 * 1024 * 1024,
            min_free_percent: 10,
            cleanup_interval: Duration::from_secs(60),
            check_entire_queue_on_cleanup: false,
            channel_capacity: 4096,
            max_group: 2048,
            cache_bytes: 4 * 1024 * 1024,
            memtable_bytes: 2 * 1024 * 1024,
            journal_bytes: 64 * 1024 * 1024,
            worker_threads: 1,
            hot_bytes: 2 * 1024 * 1024,
            sync_log_bytes: 2 * 1024 * 1024,
        }
    }
}

/// Where an append sends a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Endpoint id, e.g. `$upstream` or `modules/filter/inputs/in1`.
    pub endpoint: String,
    /// Route priority, 0 highest ([`DEFAULT_PRIORITY`] when unset).
    pub priority: u32,
    /// Time to live from enqueue time, seconds; `None` = the store default.
    pub ttl_secs: Option<u64>,
}

impl Target {
    /// A target with the default priority and TTL.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            priority: DEFAULT_PRIORITY,
            ttl_secs: None,
        }
    }

    /// Sets the priority.
    pub fn priority(mut self, priority: u32) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the TTL in seconds.
    pub fn ttl_secs(mut self, ttl: u64) -> Self {
        self.ttl_secs = Some(ttl);
        self
    }
}

/// Store-wide id of a stored message body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub u64);

/// A message as read back from one queue.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// Its body's id.
    pub id: MessageId,
    /// The queue's priority.
    pub priority: u32,
    /// Its offset in the queue; pass it to [`Store::ack`].
    pub offset: u64,
    /// When it was appended.
    pub enqueued: Timestamp,
    /// When this reference expires, if ever.
    pub expiry: Option<Timestamp>,
    /// The message.
    pub message: Message,
}

/// The state of one queue, for metrics and dashboards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// Endpoint id.
    pub endpoint: String,
    /// Priority.
    pub priority: u32,
    /// First offset not acknowledged.
    pub head: u64,
    /// One past the last durable offset.
    pub tail: u64,
    /// References not acknowledged (`tail - head`, including expired ones
    /// not yet cleaned up).
    pub depth: u64,
    /// References not yet handed out by [`Store::read`].
    pub unread: u64,
    /// Enqueue time of the reference at the head, if any.
    pub oldest_enqueued: Option<Timestamp>,
    /// References of this queue dropped for TTL since the store was opened.
    pub expired: u64,
}

/// Why an append was refused for lack of space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullReason {
    /// [`StoreConfig::max_bytes`] (or the limit set by
    /// [`Store::set_max_bytes`]) would be exceeded.
    ByteLimit {
        /// Accounted bytes stored now.
        stored: u64,
        /// The limit.
        limit: u64,
    },
    /// The file system is below [`StoreConfig::min_free_bytes`].
    DiskFloor {
        /// Bytes available.
        available: u64,
        /// The floor.
        floor: u64,
    },
}

impl std::fmt::Display for FullReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FullReason::ByteLimit { stored, limit } => write!(
                f,
                "{stored} bytes stored, the limit (storeLimits.maxSizeBytes) is {limit}"
            ),
            FullReason::DiskFloor { available, floor } => write!(
                f,
                "{available} bytes free on the store's volume, {floor} must stay free"
            ),
        }
    }
}

/// The file system holding the store, as [`Store::volume`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Volume {
    /// Size of the file system, bytes.
    pub total: u64,
    /// Bytes available to the store's process.
    pub available: u64,
    /// Bytes that must stay free: appends are refused below it.
    pub floor: u64,
}

impl Volume {
    #[allow(clippy::useless_conversion)]
    pub(crate) fn read(dir: &Path, config: &StoreConfig) -> Option<Volume> {
        let s = nix::sys::statvfs::statvfs(dir).ok()?;
        let frag = u64::from(s.fragment_size());
        let total = u64::from(s.blocks()).saturating_mul(frag);
        let available = u64::from(s.blocks_available()).saturating_mul(frag);
        Some(Volume {
            total,
            available,
            floor: floor_for(config, total),
        })
    }
}

/// [`StoreConfig::min_free_bytes`], capped at
/// [`StoreConfig::min_free_percent`] of a volume of `total` bytes.
pub(crate) fn floor_for(config: &StoreConfig, total: u64) -> u64 {
    let pct = u64::from(config.min_free_percent.min(100));
    config
        .min_free_bytes
        .min(u64::try_from(u128::from(total) * u128::from(pct) / 100).unwrap_or(u64::MAX))
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No room: the append was refused and nothing was written. Retry after
    /// acks or TTL cleanup free space.
    #[error("storage full: {0}")]
    Full(FullReason),
    /// The storage engine failed (I/O error, poisoned database, corrupt files).
    #[error("storage engine: {0}")]
    Engine(#[from] fjall::Error),
    /// An I/O error outside the engine.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Stored data that cannot be read back.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// An append with no targets.
    #[error("append without targets")]
    NoTargets,
    /// A message larger than the store can account for (over 4 GiB).
    #[error("message too large to store")]
    TooLarge,
    /// An ack for a queue that does not exist.
    #[error("no queue {endpoint:?} priority {priority}")]
    UnknownQueue {
        /// Endpoint id.
        endpoint: String,
        /// Priority.
        priority: u32,
    },
    /// An earlier write failed; reopen the store.
    #[error("store is poisoned by an earlier write failure; reopen it")]
    Poisoned,
    /// The writer thread has stopped.
    #[error("store is closed")]
    Closed,
}

impl StoreError {
    /// Whether this says the store's files are damaged (checksums, decoding,
    /// files the engine lists but cannot find) rather than that the disk or
    /// the system failed to answer. [`Store::open`] failing this way will not
    /// heal by retrying: see [`move_aside`].
    pub fn is_damage(&self) -> bool {
        match self {
            StoreError::Engine(fjall::Error::Io(e)) | StoreError::Io(e) => {
                e.kind() == std::io::ErrorKind::NotFound
                    || e.kind() == std::io::ErrorKind::InvalidData
            }
            StoreError::Engine(fjall::Error::Storage(fjall::LsmError::Io(e))) => {
                e.kind() == std::io::ErrorKind::NotFound
                    || e.kind() == std::io::ErrorKind::InvalidData
            }
            e => is_damage(e),
        }
    }
}

/// Moves the store directory `dir` aside, to `<dir>.damaged-<unix
/// seconds>`, so that an empty store can be created in its place (for a
/// store that [`Store::open`] refuses as damaged). Nothing is deleted: the
/// moved copy keeps every file. Returns where it went.
pub fn move_aside(dir: &Path) -> std::io::Result<PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut name = dir.as_os_str().to_owned();
    name.push(format!(".damaged-{secs}"));
    let to = PathBuf::from(name);
    std::fs::rename(dir, &to)?;
    Ok(to)
}

/// Result alias.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A submitted append ([`Store::append_submit`]): a future that completes
/// once the append is durable (or refused). Cancel-safe and `Unpin`, so it
/// can be polled by reference from a `select!` loop. Dropping it does not
/// undo the append.
#[derive(Debug)]
pub struct AppendReceipt(oneshot::Receiver<Result<MessageId>>);

impl std::future::Future for AppendReceipt {
    type Output = Result<MessageId>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(StoreError::Closed)))
    }
}

/// A handle on an open store; cheap to clone. The store closes when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Store {
    // Field order matters: `tx` must drop before `threads` joins the writer.
    tx: mpsc::Sender<Cmd>,
    shared: Arc<Shared>,
    _threads: Arc<Threads>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

impl Store {
    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Cmd) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores `msg` once and references it from the queue of every target.
    /// Returns after the write is fsync'd (shared with concurrent appends).
    /// Waits while the writer's channel is full (back-pressure). Fails with
    /// [`StoreError::Full`] when over the byte limit or disk floor.
    /// Duplicate (endpoint, priority) targets are merged (the first wins).
    pub async fn append(&self, msg: &Message, targets: &[Target]) -> Result<MessageId> {
        self.append_submit(msg, targets.to_vec()).await?.await
    }

    /// [`Store::append`] in two steps: returns once the append is queued to
    /// the writer — appends submitted one after another are written in that
    /// order, in the same or later group commits — with an [`AppendReceipt`]
    /// that completes (with [`Store::append`]'s result) when it is durable.
    /// Lets one producer keep several appends in flight, sharing group
    /// commits, without losing their order. Validation errors
    /// ([`StoreError::NoTargets`], [`StoreError::TooLarge`]) come from this
    /// call; [`StoreError::Full`] comes from the receipt.
    pub async fn append_submit(
        &self,
        msg: &Message,
        mut targets: Vec<Target>,
    ) -> Result<AppendReceipt> {
        if targets.is_empty() {
            return Err(StoreError::NoTargets);
        }
        // One reference per (endpoint, priority): the first one named wins.
        let mut i = 1;
        while i < targets.len() {
            let t = &targets[i];
            if targets[..i]
                .iter()
                .any(|m| m.endpoint == t.endpoint && m.priority == t.priority)
            {
                targets.remove(i);
            } else {
                i += 1;
            }
        }
        let body = encode(msg);
        if u32::try_from(body.len()).is_err() {
            return Err(StoreError::TooLarge);
        }
        let exp = msg.system.absolute_expiry;
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Append {
                body,
                exp,
                targets,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(AppendReceipt(rx))
    }

    /// The next unread, unexpired messages of `endpoint`, at most `max`, all
    /// from one queue: the highest-priority (lowest number) queue that has
    /// any, in FIFO order. Advances the in-memory read cursor; pass the
    /// offsets to [`Store::ack`] once delivered, or call [`Store::rewind`] to
    /// read them again. Returns an empty vector when nothing is pending.
    pub async fn read(&self, endpoint: &str, max: usize) -> Result<Vec<StoredMessage>> {
        // A reader right behind the writer (the usual case: a few groups
        // unread) finds the references staged and the bodies
        // in the hot cache: memory only, so read in place and skip the two
        // thread hand-offs of `spawn_blocking`.
        if self.unread(endpoint) <= INLINE_READ_MAX.min(max as u64) {
            return read_blocking(&self.shared, endpoint, max);
        }
        let shared = self.shared.clone();
        let endpoint = endpoint.to_owned();
        tokio::task::spawn_blocking(move || read_blocking(&shared, &endpoint, max))
            .await
            .map_err(|_| StoreError::Closed)?
    }

    /// Checkpoints queue (`endpoint`, `priority`): every offset ≤ `up_to` is
    /// done. Deletes those references (and bodies nobody else references);
    /// durable when it returns. Offsets beyond the durable tail are clamped;
    /// offsets below the head are a no-op.
    pub async fn ack(&self, endpoint: &str, priority: u32, up_to: u64) -> Result<()> {
        self.ack_with(endpoint, priority, up_to, true).await
    }

    /// [`Store::ack`] without a sync of its own: it returns once the writer
    /// has applied and logged it, and it becomes durable with the next group
    /// that is synced (any append) or the end of the lap. For delivery
    /// checkpoints, where a crash in between only means those messages are
    /// read again (at least once): a checkpoint alone no longer costs an
    /// fsync that the next appends would wait behind.
    pub async fn checkpoint(&self, endpoint: &str, priority: u32, up_to: u64) -> Result<()> {
        self.ack_with(endpoint, priority, up_to, false).await
    }

    async fn ack_with(&self, endpoint: &str, priority: u32, up_to: u64, sync: bool) -> Result<()> {
        let qid = self.queue_id(endpoint, priority)?;
        self.call(|reply| Cmd::Ack {
            qid,
            up_to,
            sync,
            reply,
        })
        .await
    }

    /// Moves the read cursors of `endpoint` back to their checkpoints, so the
    /// unacknowledged messages are read again.
    pub fn rewind(&self, endpoint: &str) {
        let mut st = self.shared.lock();
        let ids: Vec<u32> = st
            .endpoints
            .get(endpoint)
            .map(|v| v.iter().map(|&(_, q)| q).collect())
            .unwrap_or_default();
        for qid in ids {
            if let Some(q) = st.queues.get_mut(&qid) {
                q.cursor = q.head.max(q.acked);
            }
        }
    }

    /// Every queue, sorted by endpoint then priority.
    pub async fn queues(&self) -> Result<Vec<QueueInfo>> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let snapshot: Vec<(u32, QueueInfo)> = {
                let st = shared.lock();
                st.queues
                    .iter()
                    .map(|(&qid, q)| {
                        (
                            qid,
                            QueueInfo {
                                endpoint: q.endpoint.clone(),
                                priority: q.priority,
                                head: q.head,
                                tail: q.durable,
                                depth: q.durable.saturating_sub(q.head),
                                unread: q.durable.saturating_sub(q.cursor.max(q.head)),
                                oldest_enqueued: None,
                                expired: q.expired,
                            },
                        )
                    })
                    .collect()
            };
            let mut out = Vec::with_capacity(snapshot.len());
            for (qid, mut info) in snapshot {
                if info.depth > 0 {
                    // Only the first key in range is wanted, and staged
                    // writes are all live (deletes are never staged), so
                    // one staged write is enough: the engine's keys are
                    // merged up to it.
                    let first = shared
                        .range(
                            synclog::Ks::Queues,
                            &keys::entry_key(qid, info.head),
                            &keys::entry_key(qid, info.tail),
                            1,
                        )?
                        .next();
                    match first {
                        Some(Ok((_, v))) => {
                            info.oldest_enqueued = Entry::decode(&v).map(|e| e.enqueued);
                        }
                        // Damaged: no age to show (reads skip it).
                        Some(Err(e)) if is_damage(&e) => {}
                        Some(Err(e)) => return Err(e),
                        None => {}
                    }
                }
                out.push(info);
            }
            out.sort_by(|a, b| (&a.endpoint, a.priority).cmp(&(&b.endpoint, b.priority)));
            Ok(out)
        })
        .await
        .map_err(|_| StoreError::Closed)?
    }

    /// References dropped for TTL since the store was opened, all queues.
    pub fn expired_count(&self) -> u64 {
        self.shared.expired_total.load(Ordering::Relaxed)
    }

    /// Damaged records (references or bodies that fail their checksum or
    /// do not decode) that reads skipped since the store was opened; each is
    /// logged. The messages they held are lost; the rest of their queue
    /// flows.
    pub fn damaged_count(&self) -> u64 {
        self.shared.damaged_total.load(Ordering::Relaxed)
    }

    /// Accounted bytes currently stored (see [`StoreConfig::max_bytes`]).
    pub fn stored_bytes(&self) -> u64 {
        self.shared.stored_bytes.load(Ordering::Relaxed)
    }

    /// Replaces the byte limit ([`StoreConfig::max_bytes`]) while running —
    /// the `$edgeHub` twin's `storeLimits.maxSizeBytes`. A limit below what
    /// is stored refuses appends until acks and TTL bring it under; nothing
    /// stored is dropped.
    pub fn set_max_bytes(&self, limit: Option<u64>) {
        self.shared
            .max_bytes
            .store(limit.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The byte limit in force.
    pub fn max_bytes(&self) -> Option<u64> {
        self.shared.max_bytes()
    }

    /// The store volume's size, available bytes and the floor in force
    /// ([`StoreConfig::min_free_bytes`]), read now; `None` if the file
    /// system cannot tell.
    pub fn volume(&self) -> Option<Volume> {
        Volume::read(&self.shared.dir, &self.shared.config)
    }

    /// Bytes the engine occupies on disk (journal and tables).
    pub fn disk_bytes(&self) -> Result<u64> {
        Ok(self.shared.engine()?.db.disk_space()?)
    }

    /// Engine internals, for diagnostics: write buffer bytes, journal count,
    /// and per keyspace (sealed memtables, tables).
    pub fn engine_stats(&self) -> String {
        let sh = &self.shared;
        let Ok(e) = sh.engine() else {
            return "engine reopening".into();
        };
        let ks = |k: &Keyspace| {
            format!(
                "{}:{}/{}",
                k.name(),
                k.sealed_memtable_count(),
                k.table_count()
            )
        };
        format!(
            "staged={} write_buffer={} journals={} {} {} {}",
            sh.staged().bytes(),
            e.db.write_buffer_size(),
            e.db.journal_count(),
            ks(&e.msgs),
            ks(&e.queues),
            ks(&e.meta)
        )
    }

    /// Runs a TTL cleanup pass now; returns how many references it deleted.
    pub async fn cleanup(&self) -> Result<u64> {
        self.call(|reply| Cmd::Cleanup { reply }).await
    }

    /// The store's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// References of `endpoint` durable and not yet read.
    fn unread(&self, endpoint: &str) -> u64 {
        let st = self.shared.lock();
        st.endpoints.get(endpoint).map_or(0, |list| {
            list.iter()
                .filter_map(|(_, qid)| st.queues.get(qid))
                .map(|q| q.durable.saturating_sub(q.cursor.max(q.head).max(q.acked)))
                .sum()
        })
    }

    fn queue_id(&self, endpoint: &str, priority: u32) -> Result<u32> {
        let st = self.shared.lock();
        st.ids
            .get(&(endpoint.to_owned(), priority))
            .copied()
            .ok_or_else(|| StoreError::UnknownQueue {
                endpoint: endpoint.to_owned(),
                priority,
            })
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("bad {what}"))
}

#[cfg(test)]
mod tests;
