//! The free-space guard: appends are refused while the volume is below the
//! disk floor, and the engine is written only with room to spare, so a full
//! disk refuses work instead of poisoning the engine (ENOSPC).

use super::Writer;
use super::commit::CommitError;
use crate::{FullReason, Shared};

/// Free space on the store's volume, read with `statvfs` at most every
/// [`GAUGE_MS`] or [`GAUGE_BYTES`] appended — not once per append — and
/// fresh before every engine write.
pub(super) struct Gauge {
    /// (available, floor) at the last reading; `None` = unknown.
    last: Option<(u64, u64)>,
    at: std::time::Instant,
    pub(super) appended: u64,
}

/// Longest a free-space reading is trusted for appends.
const GAUGE_MS: u64 = 100;
/// Most bytes appended on one free-space reading.
const GAUGE_BYTES: u64 = 1024 * 1024;

impl Gauge {
    pub(super) fn new() -> Gauge {
        Gauge {
            last: None,
            at: std::time::Instant::now(),
            appended: 0,
        }
    }

    /// Reads the volume now.
    pub(super) fn refresh(&mut self, sh: &Shared) -> Option<(u64, u64)> {
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
    pub(super) fn get(&mut self, sh: &Shared) -> Option<(u64, u64)> {
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
    /// Whether the engine may take about `bytes` more: with the disk floor
    /// on, half of the floor must stay free after them (the other half is
    /// the engine's own headroom for flushes and compactions). Read fresh:
    /// this runs once per lap, not per append.
    pub(super) fn engine_room(&mut self, bytes: u64) -> std::result::Result<(), CommitError> {
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
}
