//! The on-disk state: one fjall database in `{data_dir}/db`.
//!
//! fjall is already the store engine of the edge hub (see `verge-store`), so the
//! cloud adds no new engine to the tree. One database gives atomic multi-key
//! batches — a device, its modules and their twins change together — and a
//! shared journal whose `fdatasync` makes a batch durable before the caller is
//! answered. Registry and twins are small and read-mostly, so they are loaded
//! into memory at start and every change is written through; the D2C log and
//! C2D queues are read from disk by offset.
//!
//! | keyspace | key | value |
//! |---|---|---|
//! | `devices` | device id | [`crate::registry::DeviceRecord`] (JSON) |
//! | `modules` | device id `/` module id | [`crate::registry::ModuleRecord`] (JSON) |
//! | `twins` | device id, or device id `/` module id | [`crate::twins::StoredTwin`] (JSON) |
//! | `d2c` | offset (u64 BE) | the message in `verge_core::message::encode` form |
//! | `c2d` | device id `/` sequence (u64 BE) | delivery count (u32 BE) · encoded message |
//! | `feedback` | sequence (u64 BE) | C2D feedback record (JSON) |

use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch, PersistMode};

use crate::error::Result;

/// The database and its keyspaces.
#[derive(Clone)]
pub(crate) struct Db {
    pub db: Database,
    pub devices: Keyspace,
    pub modules: Keyspace,
    pub twins: Keyspace,
    pub d2c: Keyspace,
    pub c2d: Keyspace,
    pub feedback: Keyspace,
}

impl Db {
    /// Opens or creates the database under `dir`. Blocking.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .map_err(|e| crate::CloudError::Storage(format!("{}: {e}", dir.display())))?;
        let db = Database::builder(dir).open()?;
        let opts = KeyspaceCreateOptions::default;
        Ok(Self {
            devices: db.keyspace("devices", opts)?,
            modules: db.keyspace("modules", opts)?,
            twins: db.keyspace("twins", opts)?,
            d2c: db.keyspace("d2c", opts)?,
            c2d: db.keyspace("c2d", opts)?,
            feedback: db.keyspace("feedback", opts)?,
            db,
        })
    }

    /// A batch that is fsynced (`fdatasync`) when committed.
    pub fn durable_batch(&self) -> OwnedWriteBatch {
        self.db.batch().durability(Some(PersistMode::SyncData))
    }
}

/// Key of a module (or module twin): `device/module`. Ids cannot hold `/`.
pub(crate) fn module_key(device: &str, module: &str) -> Vec<u8> {
    format!("{device}/{module}").into_bytes()
}

/// Key of a C2D message: `device/` followed by the sequence, big-endian, so a
/// prefix scan returns a device's queue in order.
pub(crate) fn c2d_key(device: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + 9);
    k.extend_from_slice(device.as_bytes());
    k.push(b'/');
    k.extend_from_slice(&seq.to_be_bytes());
    k
}
