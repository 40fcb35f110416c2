//! Opening the store: the engine and its keyspaces, the sync log's replay,
//! every queue's checkpoint and tail restored, the writer and the cleaner
//! started.

use super::*;

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
    pub(crate) fn open(dir: &Path, config: &StoreConfig) -> Result<Engine> {
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
    pub(crate) fn load(&self) -> Result<(State, u64, u64)> {
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
pub(crate) fn warn_if_volume_small(dir: &Path, config: &StoreConfig) {
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

/// The writer and cleaner threads, joined when the last handle drops.
pub(crate) struct Threads {
    pub(crate) stop: Option<std::sync::mpsc::Sender<()>>,
    pub(crate) writer: Option<JoinHandle<()>>,
    pub(crate) cleaner: Option<JoinHandle<()>>,
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
