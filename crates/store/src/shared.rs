//! The state the writer, the readers and the handles share: queues with
//! their offsets ([`State`]), recently appended bodies ([`Hot`]), the open
//! engine and the staged lap ([`Shared`]).

use super::*;

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
    pub(crate) map: HashMap<u64, (Bytes, bool)>,
    /// Insertion order; may hold ids already removed (skipped on eviction).
    pub(crate) order: VecDeque<u64>,
    pub(crate) bytes: usize,
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

    pub(crate) fn get(&self, id: u64) -> Option<Bytes> {
        self.map.get(&id).map(|(b, _)| b.clone())
    }

    /// `Some(true)` when the body is known to have had a single reference.
    pub(crate) fn single(&self, id: u64) -> Option<bool> {
        self.map.get(&id).map(|&(_, single)| single)
    }
}

pub(crate) struct Shared {
    /// `None` while the writer reopens a poisoned engine.
    pub(crate) engine: std::sync::RwLock<Option<Arc<Engine>>>,
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
        Ok(Merged::new(staged, engine.keyspace(ks).range(lo..hi), stop))
    }

    pub(crate) fn load_body(&self, id: u64) -> Result<Option<Message>> {
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
    pub(crate) fn damaged(&self, what: &str, qid: u32, offset: u64, e: &StoreError) {
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
