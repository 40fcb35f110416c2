//! Making a group durable: its record written to the sync log (and synced),
//! its writes staged for the engine, the lap handed to the engine when the
//! log is full, and full memtables rotated. Without the sync log, the
//! group's engine batch synced on commit.

use fjall::PersistMode;

use super::batch::Batch;
use super::{OP, Writer};
use crate::keys;
use crate::staged::{self, Key};
use crate::synclog::{Ks, SyncLog};
use crate::{FullReason, StoreError};

/// Why a group could not be made durable.
#[derive(Debug, Clone)]
pub(super) enum CommitError {
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
    pub(super) fn to_store_error(&self) -> StoreError {
        match self {
            CommitError::Full(r) => StoreError::Full(*r),
            CommitError::Io(e) => StoreError::Io(std::io::Error::other(e.clone())),
        }
    }
}

impl Writer {
    /// Makes one group durable (with `sync`; see [`Cmd::Ack`](super::Cmd::Ack)). With the
    /// sync log: the record is written and synced, then its writes are
    /// staged for the engine. A record that does not fit in the rest of the
    /// lap ends the lap first — before this group touches anything, so that
    /// if the engine cannot take the lap (disk full) the group fails whole.
    pub(super) fn commit(
        &mut self,
        batch: Batch,
        sync: bool,
    ) -> std::result::Result<(), CommitError> {
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
    pub(super) fn end_lap(&mut self) -> std::result::Result<(), CommitError> {
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

    /// fjall asks its (possibly busy) worker to rotate a full memtable with a
    /// `try_send` that can be dropped, letting memtables grow far past their
    /// limit under sustained load. Rotate them here instead: this enqueues the
    /// flush, and fjall stalls writers while 4+ sealed memtables wait, so
    /// memory stays bounded by the configured memtable size.
    pub(super) fn rotate_memtables(&mut self, written: [u64; 3]) {
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
}
