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

#[derive(Debug)]
pub(crate) struct QueueState {
    pub endpoint: String,
    pub priority: u32,
    /// First offset not acknowledged (persisted).
    pub head: u64,
    /// Next offset to assign (writer only).
    pub next: u64,
    /// One past the last durable offset: readers stay below it.
    pub durable: u64,
    /// Next offset `read` hands out (in memory).
    pub cursor: u64,
    /// Offsets below this were acknowledged, even if the checkpoint is not
    /// stored yet (deferred while the disk is full): a rewind goes back to
    /// here, not to `head`, so delivered messages are not sent again.
    pub acked: u64,
    /// Offsets below this were already counted as delivered or expired.
    pub counted: u64,
    /// Expired references dropped since open.
    pub expired: u64,
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub ids: HashMap<(String, u32), u32>,
    pub queues: HashMap<u32, QueueState>,
    /// Per endpoint: (priority, queue id), sorted by priority.
    pub endpoints: HashMap<String, Vec<(u32, u32)>>,
    pub next_qid: u32,
}

impl State {
    pub(crate) fn add_queue(&mut self, qid: u32, q: QueueState) {
        self.ids.insert((q.endpoint.clone(), q.priority), qid);
        let list = self.endpoints.entry(q.endpoint.clone()).or_default();
        list.push((q.priority, qid));
        list.sort_unstable();
        self.next_qid = self.next_qid.max(qid.saturating_add(1));
        self.queues.insert(qid, q);
    }
}

/// Recently appended bodies (encoded), oldest evicted first once over
/// [`StoreConfig::hot_bytes`]; entries leave when their body is deleted.
/// Only durable bodies enter it, so a hit returns what the engine would.
#[derive(Debug, Default)]
pub(crate) struct Hot {
    /// id → (encoded body, has a single reference and so no `r` record).
    map: HashMap<u64, (Bytes, bool)>,
    /// Insertion order; may hold ids already removed (skipped on eviction).
    order: VecDeque<u64>,
    bytes: usize,
}

impl Hot {
    pub(crate) fn insert(&mut self, id: u64, body: Bytes, single: bool, cap: usize) {
        // A body over a quarter of the budget would evict too much for one hit.
        if body.len() > cap / 4 {
            return;
        }
        self.bytes += body.len();
        if let Some((old, _)) = self.map.insert(id, (body, single)) {
            self.bytes -= old.len();
        }
        self.order.push_back(id);
        while self.bytes > cap {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.remove(old);
        }
        // Removed ids linger in `order`; compact it so it stays bounded.
        if self.order.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.order.retain(|id| map.contains_key(id));
        }
    }

    pub(crate) fn remove(&mut self, id: u64) {
        if let Some((b, _)) = self.map.remove(&id) {
            self.bytes -= b.len();
        }
    }

    fn get(&self, id: u64) -> Option<Bytes> {
        self.map.get(&id).map(|(b, _)| b.clone())
    }

    /// `Some(true)` when the body is known to have had a single reference.
    pub(crate) fn single(&self, id: u64) -> Option<bool> {
        self.map.get(&id).map(|&(_, single)| single)
    }
}

/// The open engine: the database and its three keyspaces.
pub(crate) struct Engine {
    pub db: Database,
    pub msgs: Keyspace,
    pub queues: Keyspace,
    pub meta: Keyspace,
}

impl Engine {
    /// Opens (or creates) the database in `dir`. Blocking (fjall replays its
    /// journal).
    fn open(dir: &Path, config: &StoreConfig) -> Result<Engine> {
        let db = Database::builder(dir)
            .cache_size(config.cache_bytes)
            .max_journaling_size(config.journal_bytes.max(64 * 1024 * 1024))
            .worker_threads(config.worker_threads.max(1))
            .manual_journal_persist(true)
            .open()?;
        let mem = config.memtable_bytes.max(1024 * 1024);
        // Filter and index blocks of every level stay in memory (about 0.5 %
        // of the data held): the pumps look bodies up by key all the time,
        // and with the small block cache the deeper levels' blocks were
        // evicted and re-read (and checksummed) on nearly every lookup — a
        // 1 M-message backlog drained at a third of the rate.
        let opts = move || {
            KeyspaceCreateOptions::default()
                .max_memtable_size(mem)
                .filter_block_pinning_policy(PinningPolicy::all(true))
                .index_block_pinning_policy(PinningPolicy::all(true))
        };
        let msgs = db.keyspace("msgs", opts)?;
        let queues = db.keyspace("queues", opts)?;
        let meta = db.keyspace("meta", opts)?;
        Ok(Engine {
            db,
            msgs,
            queues,
            meta,
        })
    }

    pub(crate) fn keyspace(&self, ks: synclog::Ks) -> &Keyspace {
        ks.pick([&self.msgs, &self.queues, &self.meta])
    }

    /// Every queue with its checkpoint and tail, the accounted bytes and the
    /// next message id, as the engine holds them (after the sync log's
    /// replay).
    fn load(&self) -> Result<(State, u64, u64)> {
        let (meta, queues) = (&self.meta, &self.queues);
        let mut state = State::default();
        for kv in meta.prefix([keys::QUEUE]) {
            let (k, v) = kv.into_inner()?;
            let qid = keys::u32_at(&k, 1).ok_or_else(|| corrupt("queue key"))?;
            let priority = keys::u32_at(&v, 0).ok_or_else(|| corrupt("queue record"))?;
            let endpoint = std::str::from_utf8(v.get(4..).unwrap_or_default())
                .map_err(|_| corrupt("queue endpoint"))?
                .to_owned();
            let head = match meta.get(keys::meta_queue_key(keys::CHECKPOINT, qid))? {
                Some(v) => keys::u64_at(&v, 0).ok_or_else(|| corrupt("checkpoint"))?,
                None => 0,
            };
            // The tail: seek from the head, never walk acked tombstones.
            let last = queues
                .range(keys::entry_key(qid, head)..=keys::entry_key(qid, u64::MAX))
                .next_back();
            let next = match last {
                Some(g) => {
                    let k = g.key()?;
                    keys::parse_entry_key(&k)
                        .ok_or_else(|| corrupt("entry key"))?
                        .1
                        + 1
                }
                None => head,
            };
            state.add_queue(
                qid,
                QueueState {
                    endpoint,
                    priority,
                    head,
                    next,
                    durable: next,
                    cursor: head,
                    acked: head,
                    counted: head,
                    expired: 0,
                },
            );
        }
        let stored = match meta.get(keys::STORED_BYTES)? {
            Some(v) => keys::u64_at(&v, 0).ok_or_else(|| corrupt("stored bytes"))?,
            None => 0,
        };
        let next_id = match meta.get(keys::NEXT_ID)? {
            Some(v) => keys::u64_at(&v, 0).ok_or_else(|| corrupt("next id"))?,
            None => 0,
        };
        Ok((state, stored, next_id))
    }
}

pub(crate) struct Shared {
    /// `None` while the writer reopens a poisoned engine.
    engine: std::sync::RwLock<Option<Arc<Engine>>>,
    pub dir: PathBuf,
    pub config: StoreConfig,
    pub state: Mutex<State>,
    pub stored_bytes: AtomicU64,
    /// The byte limit in force ([`Store::set_max_bytes`]); `u64::MAX` = none.
    pub max_bytes: AtomicU64,
    pub expired_total: AtomicU64,
    /// Damaged records skipped by reads since open.
    pub damaged_total: AtomicU64,
    pub poisoned: AtomicBool,
    /// The writer has work to retry (deferred checkpoints, a reopen): the
    /// cleaner thread wakes it every [`RETRY_INTERVAL`].
    pub retry: AtomicBool,
    pub hot: Mutex<Hot>,
    /// The current lap's writes not yet in the engine (`staged`).
    pub staged: Mutex<staged::Staged>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave offsets half-updated in
        // a way that matters more than losing the store; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The byte limit in force, if any.
    pub(crate) fn max_bytes(&self) -> Option<u64> {
        Some(self.max_bytes.load(Ordering::Relaxed)).filter(|&m| m != u64::MAX)
    }

    /// The open engine, or [`StoreError::Poisoned`] while it is reopened.
    pub(crate) fn engine(&self) -> Result<Arc<Engine>> {
        self.engine
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(StoreError::Poisoned)
    }

    /// Puts `engine` in place (or takes it out, with `None`), returning the
    /// one that was there.
    pub(crate) fn swap_engine(&self, engine: Option<Arc<Engine>>) -> Option<Arc<Engine>> {
        std::mem::replace(
            &mut *self.engine.write().unwrap_or_else(|e| e.into_inner()),
            engine,
        )
    }

    pub(crate) fn hot(&self) -> MutexGuard<'_, Hot> {
        self.hot.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn staged(&self) -> MutexGuard<'_, staged::Staged> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The value of `key`: its staged write if any, else the engine's.
    pub(crate) fn get(&self, ks: synclog::Ks, key: &[u8]) -> Result<Option<Bytes>> {
        if let Some(v) = self.staged().get(ks, key) {
            return Ok(Some(v));
        }
        Ok(self
            .engine()?
            .keyspace(ks)
            .get(key)?
            .map(|v| Bytes::copy_from_slice(&v)))
    }

    /// Live pairs of `ks` with keys in `[lo, hi)`, in key order: staged
    /// writes over the engine's. At most `limit` staged writes are taken; if
    /// there were more, the iteration ends at the last one taken
    /// ([`Merged::truncated_at`]).
    pub(crate) fn range(
        &self,
        ks: synclog::Ks,
        lo: &[u8],
        hi: &[u8],
        limit: usize,
    ) -> Result<Merged> {
        let engine = self.engine()?;
        // Staged first, the engine second: a lap moves from here to the
        // engine before it is cleared here, so nothing falls between.
        let staged = self.staged().range(ks, lo, hi, limit.max(1));
        let stop = (staged.len() >= limit.max(1))
            .then(|| staged.last().map(|(k, _)| k.clone()))
            .flatten();
        Ok(Merged {
            staged: staged.into_iter().peekable(),
            engine: engine.keyspace(ks).range(lo..hi),
            engine_next: None,
            engine_done: false,
            stop,
        })
    }

    fn load_body(&self, id: u64) -> Result<Option<Message>> {
        let hot = self.hot().get(id);
        let raw = match hot {
            Some(b) => b,
            None => match self.get(synclog::Ks::Msgs, &keys::msg_key(keys::BODY, id))? {
                Some(raw) => raw,
                None => return Ok(None),
            },
        };
        decode(raw)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("message body {id}: {e}")))
    }

    /// Counts and logs a damaged record that a read skips.
    fn damaged(&self, what: &str, qid: u32, offset: u64, e: &StoreError) {
        self.damaged_total.fetch_add(1, Ordering::Relaxed);
        tracing::error!(queue = qid, offset, error = %e, "store: damaged {what}; skipping it");
    }
}

/// Whether `e` says stored data is damaged (checksum, decoding), as opposed
/// to the disk failing to answer: a damaged record is skipped and counted,
/// an I/O error is returned (and the read tried again later).
pub(crate) fn is_damage(e: &StoreError) -> bool {
    use fjall::{Error as F, LsmError as L};
    match e {
        StoreError::Corrupt(_) => true,
        StoreError::Engine(F::Storage(l)) => !matches!(l, L::Io(_)),
        StoreError::Engine(
            F::Decompress(_) | F::InvalidTrailer | F::InvalidTag(_) | F::Unrecoverable,
        ) => true,
        _ => false,
    }
}

/// See [`Shared::range`].
pub(crate) struct Merged {
    staged: std::iter::Peekable<std::vec::IntoIter<(staged::Key, staged::Slot)>>,
    engine: fjall::Iter,
    engine_next: Option<(staged::Key, Bytes)>,
    engine_done: bool,
    stop: Option<staged::Key>,
}

impl Merged {
    /// The last key covered when the staged writes were cut at the limit.
    pub(crate) fn truncated_at(&self) -> Option<&[u8]> {
        self.stop.as_ref().map(staged::Key::as_slice)
    }

    fn fill_engine(&mut self) -> Result<()> {
        if self.engine_next.is_some() || self.engine_done {
            return Ok(());
        }
        match self.engine.next() {
            Some(g) => {
                let (k, v) = g.into_inner()?;
                let k = staged::Key::new(&k);
                if self.stop.as_ref().is_some_and(|s| k > *s) {
                    self.engine_done = true;
                } else {
                    self.engine_next = Some((k, Bytes::copy_from_slice(&v)));
                }
            }
            None => self.engine_done = true,
        }
        Ok(())
    }
}

impl Iterator for Merged {
    type Item = Result<(staged::Key, Bytes)>;

    fn next(&mut self) -> Option<Self::Item> {
        use std::cmp::Ordering::{Equal, Greater, Less};
        if let Err(e) = self.fill_engine() {
            self.engine_done = true;
            return Some(Err(e));
        }
        let order = match (self.staged.peek(), &self.engine_next) {
            (None, None) => return None,
            (Some(_), None) => Less,
            (None, Some(_)) => Greater,
            (Some((sk, _)), Some((ek, _))) => sk.cmp(ek),
        };
        if order == Equal {
            // The staged value is newer than the engine's.
            self.engine_next = None;
        }
        if order == Greater {
            return self.engine_next.take().map(Ok);
        }
        self.staged.next().map(|(k, slot)| Ok((k, slot.value)))
    }
}

struct Threads {
    stop: Option<std::sync::mpsc::Sender<()>>,
    writer: Option<JoinHandle<()>>,
    cleaner: Option<JoinHandle<()>>,
}

impl Drop for Threads {
    fn drop(&mut self) {
        // By now every strong sender is gone (Store's field order drops `tx`
        // first), so the writer finishes queued work and exits.
        self.stop.take();
        for h in [self.writer.take(), self.cleaner.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.join();
        }
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
    /// Opens (or creates) the store in `dir` and restores every queue,
    /// checkpoint and refcount. Blocking.
    pub fn open(dir: impl AsRef<Path>, config: StoreConfig) -> Result<Store> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let engine = Engine::open(&dir, &config)?;
        let log = open_sync_log(&engine, &dir, &config)?;
        warn_if_volume_small(&dir, &config);
        let (state, stored, next_id) = engine.load()?;

        let shared = Arc::new(Shared {
            engine: std::sync::RwLock::new(Some(Arc::new(engine))),
            dir,
            config: config.clone(),
            state: Mutex::new(state),
            stored_bytes: AtomicU64::new(stored),
            max_bytes: AtomicU64::new(config.max_bytes.unwrap_or(u64::MAX)),
            expired_total: AtomicU64::new(0),
            damaged_total: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            retry: AtomicBool::new(false),
            hot: Mutex::new(Hot::default()),
            staged: Mutex::new(staged::Staged::default()),
        });
        let (tx, rx) = mpsc::channel(config.channel_capacity.max(1));
        let writer = writer::spawn(shared.clone(), rx, log, next_id)?;
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let weak = tx.downgrade();
        let interval = config.cleanup_interval;
        let tick_shared = shared.clone();
        let cleaner = std::thread::Builder::new()
            .name("verge-store-ttl".into())
            .spawn(move || {
                let mut last_cleanup = std::time::Instant::now();
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stop_rx.recv_timeout(interval.min(RETRY_INTERVAL))
                {
                    let Some(tx) = weak.upgrade() else { break };
                    let cmd = if last_cleanup.elapsed() >= interval {
                        last_cleanup = std::time::Instant::now();
                        let (reply, _rx) = oneshot::channel();
                        Cmd::Cleanup { reply }
                    } else if tick_shared.retry.load(Ordering::Relaxed) {
                        Cmd::Tick
                    } else {
                        continue;
                    };
                    if tx.blocking_send(cmd).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Store {
            tx,
            shared,
            _threads: Arc::new(Threads {
                stop: Some(stop_tx),
                writer: Some(writer),
                cleaner: Some(cleaner),
            }),
        })
    }

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

    /// Up to `n` unacknowledged messages of one queue from `from_offset`
    /// (or its head, if later), expired ones included, without moving any
    /// cursor.
    pub async fn peek(
        &self,
        endpoint: &str,
        priority: u32,
        from_offset: u64,
        n: usize,
    ) -> Result<Vec<StoredMessage>> {
        let qid = self.queue_id(endpoint, priority)?;
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let (from, to) = {
                let st = shared.lock();
                let q = st.queues.get(&qid).ok_or(StoreError::Closed)?;
                (from_offset.max(q.head), q.durable)
            };
            let mut out = Vec::new();
            if from >= to {
                return Ok(out);
            }
            for kv in shared.range(
                synclog::Ks::Queues,
                &keys::entry_key(qid, from),
                &keys::entry_key(qid, to),
                usize::MAX,
            )? {
                if out.len() >= n {
                    break;
                }
                let (k, v) = match kv {
                    Err(e) if is_damage(&e) => break,
                    kv => kv?,
                };
                let Some((_, offset)) = keys::parse_entry_key(k.as_slice()) else {
                    break;
                };
                // Damaged ones are skipped (and counted by `read`).
                let Some(e) = Entry::decode(&v) else { continue };
                match shared.load_body(e.id) {
                    Ok(Some(message)) => out.push(stored(priority, offset, e, message)),
                    Ok(None) => {}
                    Err(err) if is_damage(&err) => {}
                    Err(err) => return Err(err),
                }
            }
            Ok(out)
        })
        .await
        .map_err(|_| StoreError::Closed)?
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

/// Replays the sync log's current lap into the engine (groups that were
/// durable only there), syncs the engine, and starts a new lap — or, with the
/// log turned off, removes it.
pub(crate) fn open_sync_log(
    engine: &Engine,
    dir: &Path,
    config: &StoreConfig,
) -> Result<Option<synclog::SyncLog>> {
    use fjall::PersistMode;
    let (db, meta) = (&engine.db, &engine.meta);
    let ks = [&engine.msgs, &engine.queues, &engine.meta];
    let path = dir.join("sync.log");
    let lap = match meta.get(keys::SYNC_LAP)? {
        Some(v) => Some(keys::u64_at(&v, 0).ok_or_else(|| corrupt("sync lap"))?),
        None => None,
    };
    let mut next = 1;
    if let Some(first) = lap {
        let synclog::Lap {
            records,
            next: after,
            lost,
        } = synclog::read_lap(&path, first)?;
        if lost > 0 {
            tracing::error!(
                path = %path.display(),
                lost_groups = lost,
                replayed_groups = records.len(),
                "store: damaged records in the sync log were skipped; the messages and \
                 checkpoints they held are lost (checkpoints lost mean redelivery)"
            );
        }
        if !records.is_empty() {
            tracing::info!(records = records.len(), "store: replaying the sync log");
            let mut b = db.batch();
            for op in records.into_iter().flatten() {
                match op {
                    synclog::Op::Insert(k, key, value) => b.insert(k.pick(ks), key, value),
                    synclog::Op::Remove(k, key) => b.remove(k.pick(ks), key),
                }
            }
            b.durability(Some(PersistMode::SyncData)).commit()?;
        }
        next = after.max(1);
        if lost > 0 || after > first {
            // Records of this lap may be left behind damage that reading
            // did not look past: number the next lap past any record the
            // file can hold, so none of them can pass for one of its own.
            let len = std::fs::metadata(&path).map_or(0, |m| m.len());
            next = next.saturating_add(synclog::max_records(len));
        }
    }
    let mut b = db.batch().durability(Some(PersistMode::SyncData));
    if config.sync_log_bytes == 0 {
        if lap.is_some() {
            b.remove(meta, keys::SYNC_LAP);
            b.commit()?;
        }
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
            _ => {}
        }
        return Ok(None);
    }
    // Without a lap on record the file's records (if any) belong to no
    // engine state: clear them so they cannot pass for the new lap's.
    let mut log = synclog::SyncLog::open(&path, config.sync_log_bytes, lap.is_none())?;
    b.insert(meta, keys::SYNC_LAP, next.to_be_bytes());
    b.commit()?;
    log.new_lap(next);
    Ok(Some(log))
}

/// Says so at start when the volume cannot take messages: a volume smaller
/// than the floor, or one already filled to it, refuses every append.
fn warn_if_volume_small(dir: &Path, config: &StoreConfig) {
    if config.min_free_bytes == 0 {
        return;
    }
    let Some(v) = Volume::read(dir, config) else {
        return;
    };
    // Less than a megabyte above the floor holds nothing worth the name.
    if v.available < v.floor.saturating_add(1024 * 1024) {
        tracing::warn!(
            dir = %dir.display(),
            volume_bytes = v.total,
            available_bytes = v.available,
            floor_bytes = v.floor,
            "store: the volume has (almost) no space above the free-space floor; \
             messages will be refused until space is freed (see min_free_bytes / min_free_percent)"
        );
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("bad {what}"))
}

fn stored(priority: u32, offset: u64, e: Entry, message: Message) -> StoredMessage {
    StoredMessage {
        id: MessageId(e.id),
        priority,
        offset,
        enqueued: e.enqueued,
        expiry: (e.expiry != i64::MAX).then_some(Timestamp::from_millis(e.expiry)),
        message,
    }
}

fn read_blocking(shared: &Shared, endpoint: &str, max: usize) -> Result<Vec<StoredMessage>> {
    let mut out = Vec::with_capacity(max.min(256));
    if max == 0 {
        return Ok(out);
    }
    let list: Vec<(u32, u32)> = shared
        .lock()
        .endpoints
        .get(endpoint)
        .cloned()
        .unwrap_or_default();
    for (priority, qid) in list {
        loop {
            let (from, to) = {
                let st = shared.lock();
                let Some(q) = st.queues.get(&qid) else { break };
                (q.cursor.max(q.head).max(q.acked), q.durable)
            };
            if from >= to {
                break;
            }
            let now = Timestamp::now();
            let mut scanned_to = from;
            let mut expired = Vec::new();
            // Bound the work per pass so a long expired run cannot pin a
            // blocking thread: at most max + 1024 references.
            let budget = max.saturating_add(1024);
            let mut seen = 0usize;
            let mut entries = shared.range(
                synclog::Ks::Queues,
                &keys::entry_key(qid, from),
                &keys::entry_key(qid, to),
                max,
            )?;
            // A damaged stretch the engine cannot iterate past: skip one
            // offset per pass (each pass makes progress; the rest flows).
            let mut unreadable = false;
            for kv in entries.by_ref() {
                if out.len() >= max || seen >= budget {
                    break;
                }
                seen += 1;
                let (k, v) = match kv {
                    Ok(kv) => kv,
                    Err(e) if is_damage(&e) => {
                        shared.damaged("queue block", qid, scanned_to, &e);
                        unreadable = true;
                        break;
                    }
                    Err(e) => return Err(e),
                };
                let Some((_, offset)) = keys::parse_entry_key(k.as_slice()) else {
                    shared.damaged("queue key", qid, scanned_to, &corrupt("entry key"));
                    unreadable = true;
                    break;
                };
                scanned_to = offset + 1;
                let Some(e) = Entry::decode(&v) else {
                    shared.damaged("queue reference", qid, offset, &corrupt("entry"));
                    continue;
                };
                if e.is_expired(now) {
                    expired.push(offset);
                    continue;
                }
                match shared.load_body(e.id) {
                    Ok(Some(message)) => out.push(stored(priority, offset, e, message)),
                    // Deleted under us by a cleanup racing this read:
                    // nothing to deliver.
                    Ok(None) => expired.push(offset),
                    Err(err) if is_damage(&err) => {
                        shared.damaged("message body", qid, offset, &err);
                    }
                    Err(err) => return Err(err),
                }
            }
            if unreadable {
                scanned_to += 1;
            } else if seen == 0 {
                // Everything in range was deleted by a concurrent cleanup
                // (up to where the staged writes were cut, if they were).
                scanned_to = match entries.truncated_at() {
                    Some(k) => keys::parse_entry_key(k).map_or(to, |(_, o)| o + 1),
                    None => to,
                };
            }
            {
                let mut st = shared.lock();
                if let Some(q) = st.queues.get_mut(&qid) {
                    let mut n = 0;
                    for &off in &expired {
                        if off >= q.counted {
                            n += 1;
                        }
                    }
                    q.expired += n;
                    q.counted = q.counted.max(scanned_to);
                    q.cursor = q.cursor.max(scanned_to);
                    shared.expired_total.fetch_add(n, Ordering::Relaxed);
                }
            }
            if !out.is_empty() {
                return Ok(out);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cfg(hot_bytes: usize) -> StoreConfig {
        StoreConfig {
            default_ttl_secs: None,
            min_free_bytes: 0,
            hot_bytes,
            ..StoreConfig::default()
        }
    }

    /// `store.read` as (offset, body text) pairs.
    async fn read_bodies(store: &Store, ep: &str, max: usize) -> Vec<(u64, String)> {
        store
            .read(ep, max)
            .await
            .unwrap()
            .into_iter()
            .map(|m| {
                (
                    m.offset,
                    String::from_utf8(m.message.body.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    /// Staged writes read over the engine's: a random mix of appends (to one
    /// or two endpoints), reads, acks, lazy checkpoints and rewinds gives
    /// what a plain model gives — with the sync log off, with laps so short
    /// that they end every few groups (so reads and acks straddle staged and
    /// engine keys), and with the default — and again after reopening.
    #[tokio::test]
    async fn staged_reads_match_a_model() {
        use std::collections::BTreeMap;
        for (log, hot) in [
            (0u64, 0usize),
            (4096, 0),
            (4096, 1 << 20),
            (2 << 20, 1 << 20),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let config = StoreConfig {
                sync_log_bytes: log,
                ..cfg(hot)
            };
            let store = Store::open(dir.path(), config.clone()).unwrap();
            /// Per endpoint: unacknowledged (offset, body), next offset, cursor.
            type Queue = (Vec<(u64, String)>, u64, u64);
            let mut model: BTreeMap<&str, Queue> = BTreeMap::new();
            let mut seed = 0x2545_f491_4f6c_dd1d_u64 ^ log;
            let mut rnd = move |n: u64| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % n
            };
            let eps = ["a", "b"];
            for step in 0..1500u64 {
                let ep = eps[rnd(2) as usize];
                match rnd(10) {
                    0..=3 => {
                        let body = format!("s{step}-{}", "x".repeat(rnd(200) as usize));
                        let targets: Vec<&str> = match rnd(3) {
                            0 => vec!["a"],
                            1 => vec!["b"],
                            _ => vec!["a", "b"],
                        };
                        let t: Vec<Target> = targets.iter().map(|e| Target::new(*e)).collect();
                        store.append(&Message::new(body.clone()), &t).await.unwrap();
                        for e in targets {
                            let q = model.entry(e).or_default();
                            q.0.push((q.1, body.clone()));
                            q.1 += 1;
                        }
                    }
                    4..=6 => {
                        let max = 1 + rnd(40) as usize;
                        let got = read_bodies(&store, ep, max).await;
                        let q = model.entry(ep).or_default();
                        let want: Vec<(u64, String)> =
                            q.0.iter()
                                .filter(|(o, _)| *o >= q.2)
                                .take(max)
                                .cloned()
                                .collect();
                        assert_eq!(got, want, "log {log} hot {hot} step {step} {ep}");
                        if let Some((o, _)) = want.last() {
                            q.2 = o + 1;
                        }
                    }
                    7 | 8 => {
                        let q = model.entry(ep).or_default();
                        // Up to somewhere in what has been read.
                        let read: Vec<u64> =
                            q.0.iter().map(|(o, _)| *o).filter(|o| *o < q.2).collect();
                        if read.is_empty() {
                            continue;
                        }
                        let up_to = read[rnd(read.len() as u64) as usize];
                        if rnd(2) == 0 {
                            store.ack(ep, DEFAULT_PRIORITY, up_to).await.unwrap();
                        } else {
                            store.checkpoint(ep, DEFAULT_PRIORITY, up_to).await.unwrap();
                        }
                        q.0.retain(|(o, _)| *o > up_to);
                    }
                    _ => {
                        store.rewind(ep);
                        let q = model.entry(ep).or_default();
                        q.2 = 0;
                    }
                }
            }
            drop(store);
            let store = Store::open(dir.path(), config).unwrap();
            for (ep, (items, _, _)) in &model {
                let got = read_bodies(&store, ep, 100_000).await;
                assert_eq!(&got, items, "log {log} hot {hot} after reopen, {ep}");
                if let Some(m) = store.read(ep, 1).await.unwrap().first() {
                    panic!("log {log} hot {hot}: {ep} read past its end: {m:?}");
                }
                if let Some((last, _)) = items.last() {
                    store.ack(ep, DEFAULT_PRIORITY, *last).await.unwrap();
                }
            }
            // Everything acknowledged: nothing may be left in the engine
            // (a delete lost between staging and engine would leak).
            drop(store);
            let db = Database::builder(dir.path()).open().unwrap();
            for name in ["msgs", "queues"] {
                let ks = db.keyspace(name, KeyspaceCreateOptions::default).unwrap();
                let left = ks.iter().count();
                assert_eq!(left, 0, "log {log} hot {hot}: {left} keys left in {name}");
            }
        }
    }

    /// A clean shutdown ends the sync log's lap: the engine holds
    /// everything, so the next open has nothing to replay.
    #[tokio::test]
    async fn clean_shutdown_leaves_nothing_to_replay() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), cfg(0)).unwrap();
        for i in 0..20 {
            let m = Message::new(format!("m{i}"));
            store.append(&m, &[Target::new("a")]).await.unwrap();
        }
        drop(store);
        let db = Database::builder(dir.path()).open().unwrap();
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default).unwrap();
        let lap = keys::u64_at(&meta.get(keys::SYNC_LAP).unwrap().unwrap(), 0).unwrap();
        let records = synclog::read_lap(&dir.path().join("sync.log"), lap)
            .unwrap()
            .records;
        assert!(
            records.is_empty(),
            "{} records left to replay",
            records.len()
        );
    }

    /// Submitted appends land in submission order and the receipts complete
    /// in that order, whatever order they are awaited in.
    #[tokio::test]
    async fn submit_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), cfg(1 << 20)).unwrap();
        let t = [Target::new("ep")];
        let mut receipts = Vec::new();
        for i in 0..200 {
            receipts.push(
                store
                    .append_submit(&Message::new(format!("m{i}")), t.to_vec())
                    .await
                    .unwrap(),
            );
        }
        let mut ids = Vec::new();
        for r in receipts.into_iter().rev() {
            ids.push(r.await.unwrap().0);
        }
        ids.reverse();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
        let got = store.read("ep", 500).await.unwrap();
        let bodies: Vec<String> = got
            .iter()
            .map(|m| String::from_utf8(m.message.body.to_vec()).unwrap())
            .collect();
        let want: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
        assert_eq!(bodies, want);
    }

    /// A target named twice (same endpoint and priority) gets one reference.
    #[tokio::test]
    async fn repeated_targets_get_one_reference() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), cfg(1 << 20)).unwrap();
        let t = vec![
            Target::new("a"),
            Target::new("b"),
            Target::new("a"),
            Target::new("a").priority(1),
        ];
        store
            .append_submit(&Message::new("x"), t)
            .await
            .unwrap()
            .await
            .unwrap();
        let queues = store.queues().await.unwrap();
        let depth = |ep: &str| -> u64 {
            queues
                .iter()
                .filter(|q| q.endpoint == ep)
                .map(|q| q.depth)
                .sum()
        };
        assert_eq!(depth("a"), 2, "one per priority");
        assert_eq!(depth("b"), 1);
        assert_eq!(read_bodies(&store, "a", 10).await, vec![(0, "x".into())]);
        assert_eq!(read_bodies(&store, "a", 10).await, vec![(0, "x".into())]);
        assert!(read_bodies(&store, "a", 10).await.is_empty());
    }

    /// Full comes back through the receipt and nothing is written.
    #[tokio::test]
    async fn submit_full_through_receipt() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            max_bytes: Some(10),
            ..cfg(1 << 20)
        };
        let store = Store::open(dir.path(), config).unwrap();
        let r = store
            .append_submit(&Message::new("x"), vec![Target::new("ep")])
            .await
            .unwrap();
        assert!(matches!(r.await, Err(StoreError::Full(_))));
        assert!(store.read("ep", 10).await.unwrap().is_empty());
        assert!(matches!(
            store.append_submit(&Message::new("x"), Vec::new()).await,
            Err(StoreError::NoTargets)
        ));
    }

    /// Reads and acks give the same results with and without the hot-body
    /// cache, including shared bodies (refcounts) and evicted bodies; bodies
    /// are reclaimed when their last reference goes.
    #[tokio::test]
    async fn hot_cache_is_transparent() {
        for hot in [0usize, 600, 1 << 20] {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), cfg(hot)).unwrap();
            let both = [Target::new("a"), Target::new("b")];
            for i in 0..50 {
                let body = format!("{i:0>100}");
                if i % 2 == 0 {
                    store.append(&Message::new(body), &both).await.unwrap();
                } else {
                    store.append(&Message::new(body), &both[..1]).await.unwrap();
                }
            }
            let a = store.read("a", 100).await.unwrap();
            assert_eq!(a.len(), 50, "hot {hot}");
            for (i, m) in a.iter().enumerate() {
                assert_eq!(
                    m.message.body,
                    format!("{i:0>100}").into_bytes(),
                    "hot {hot}"
                );
            }
            store
                .ack("a", DEFAULT_PRIORITY, a[49].offset)
                .await
                .unwrap();
            // The shared bodies are still there for "b".
            let b = store.read("b", 100).await.unwrap();
            assert_eq!(b.len(), 25, "hot {hot}");
            assert!(store.stored_bytes() > 0);
            store
                .ack("b", DEFAULT_PRIORITY, b[24].offset)
                .await
                .unwrap();
            assert_eq!(store.stored_bytes(), 0, "hot {hot}");
            assert!(store.shared.hot().map.is_empty(), "hot {hot}");
            drop(store);
            // Reopened (cold cache): nothing left.
            let store = Store::open(dir.path(), cfg(hot)).unwrap();
            assert!(store.read("a", 10).await.unwrap().is_empty());
            assert!(store.read("b", 10).await.unwrap().is_empty());
        }
    }

    /// A reference and a body that do not decode are skipped and counted;
    /// the rest of the queue is delivered and acknowledged.
    #[tokio::test]
    async fn undecodable_records_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), cfg(0)).unwrap();
        let mut ids = Vec::new();
        for i in 0..10 {
            let m = Message::new(format!("m{i}"));
            ids.push(store.append(&m, &[Target::new("a")]).await.unwrap().0);
        }
        let qid = store.queue_id("a", DEFAULT_PRIORITY).unwrap();
        drop(store);
        {
            let db = Database::builder(dir.path()).open().unwrap();
            let msgs = db.keyspace("msgs", KeyspaceCreateOptions::default).unwrap();
            let queues = db
                .keyspace("queues", KeyspaceCreateOptions::default)
                .unwrap();
            msgs.insert(keys::msg_key(keys::BODY, ids[3]), b"\xff\xff\xff")
                .unwrap();
            queues.insert(keys::entry_key(qid, 6), b"bad").unwrap();
            db.persist(fjall::PersistMode::SyncAll).unwrap();
        }
        let store = Store::open(dir.path(), cfg(0)).unwrap();
        let got = read_bodies(&store, "a", 100).await;
        let texts: Vec<&str> = got.iter().map(|(_, b)| b.as_str()).collect();
        assert_eq!(texts, ["m0", "m1", "m2", "m4", "m5", "m7", "m8", "m9"]);
        assert_eq!(store.damaged_count(), 2);
        store.ack("a", DEFAULT_PRIORITY, 9).await.unwrap();
        store
            .append(&Message::new("after"), &[Target::new("a")])
            .await
            .unwrap();
        let got = read_bodies(&store, "a", 100).await;
        assert_eq!(got, vec![(10, "after".to_owned())]);
    }

    /// The floor is min_free_bytes, capped at a share of small volumes.
    #[test]
    fn floor_scales_with_small_volumes() {
        const MIB: u64 = 1024 * 1024;
        let c = StoreConfig::default();
        assert_eq!(floor_for(&c, 64 * MIB), 64 * MIB / 10);
        assert_eq!(floor_for(&c, 16 * 1024 * MIB), 64 * MIB);
        let c = StoreConfig {
            min_free_percent: 100,
            ..c
        };
        assert_eq!(floor_for(&c, 64 * MIB), 64 * MIB);
        let c = StoreConfig {
            min_free_bytes: 0,
            ..c
        };
        assert_eq!(floor_for(&c, 64 * MIB), 0);
        let c = StoreConfig {
            min_free_bytes: u64::MAX,
            min_free_percent: 200,
            ..c
        };
        assert_eq!(floor_for(&c, u64::MAX), u64::MAX);
    }

    #[test]
    fn hot_stays_bounded() {
        let mut hot = Hot::default();
        for id in 0..10_000u64 {
            hot.insert(id, Bytes::from(vec![0u8; 100]), true, 10_000);
            if id % 3 == 0 {
                hot.remove(id);
            }
        }
        assert!(hot.bytes <= 10_000);
        assert!(hot.map.len() <= 100);
        assert!(hot.order.len() <= 2 * hot.map.len() + 1026);
        assert_eq!(hot.single(9_998), Some(true));
        assert_eq!(hot.single(0), None);
    }
}
