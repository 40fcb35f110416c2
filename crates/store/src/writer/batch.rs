//! One group's writes, in the sync log's record or in an engine batch: the
//! callers build a group the same way whichever way it is made durable.

use std::sync::Arc;

use bytes::Bytes;
use fjall::{OwnedWriteBatch, PersistMode};

use crate::staged::{self, Key};
use crate::synclog::{self, Ks};
use crate::{Engine, Result, Shared};

/// One group's writes. With the sync log on: the log record's payload and
/// the same writes for the staging area (`staged`); without it: an engine
/// batch synced on commit.
pub(super) enum Batch {
    Logged { log: Vec<u8>, ops: Vec<staged::Op> },
    Engine(OwnedWriteBatch, Arc<Engine>),
}

impl Batch {
    pub(super) fn new(sh: &Shared, logged: bool) -> Result<Batch> {
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
    pub(super) fn insert_bytes(&mut self, ks: Ks, key: &[u8], value: Bytes, fresh: bool) {
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

    pub(super) fn insert(&mut self, ks: Ks, key: &[u8], value: &[u8]) {
        match self {
            Batch::Logged { .. } => {
                self.insert_bytes(ks, key, Bytes::copy_from_slice(value), false);
            }
            Batch::Engine(b, e) => b.insert(e.keyspace(ks), key, value),
        }
    }

    pub(super) fn remove(&mut self, ks: Ks, key: &[u8]) {
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
