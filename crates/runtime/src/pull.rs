//! Image pulls in progress, as the agent reports them (`runtimeStatus:
//! "downloading"`) and `verge list` shows them: Docker's per-layer progress
//! stream summed up into one [`PullStatus`] per image, kept in [`Pulls`]
//! while the pull runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

pub use verge_core::pull::PullStatus;

/// One layer's last known state.
#[derive(Debug, Clone, Copy, Default)]
struct Layer {
    current: u64,
    total: u64,
    done: bool,
}

/// Sums Docker's pull stream (`{"id": layer, "status": …, "progressDetail":
/// {"current", "total"}}`) into a [`PullStatus`].
#[derive(Debug, Default)]
pub struct LayerProgress {
    layers: BTreeMap<String, Layer>,
}

impl LayerProgress {
    /// Takes one item of the stream.
    pub fn update(&mut self, id: &str, status: &str, current: Option<i64>, total: Option<i64>) {
        // Lines without a layer id ("Digest: …", "Status: …") and the line
        // naming the tag being pulled ("Pulling from …") are not layers.
        if id.is_empty() || status.starts_with("Pulling from") {
            return;
        }
        let layer = self.layers.entry(id.to_owned()).or_default();
        let bytes = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
        match status {
            "Downloading" => {
                if let Some(t) = bytes(total).filter(|&t| t > 0) {
                    layer.total = t;
                }
                if let Some(c) = bytes(current) {
                    layer.current = c;
                }
            }
            // The download is over: every byte of it arrived.
            "Verifying Checksum" | "Download complete" | "Extracting" => {
                layer.current = layer.total;
            }
            "Pull complete" | "Already exists" => {
                layer.current = layer.total;
                layer.done = true;
            }
            // "Pulling fs layer", "Waiting", "Retrying in …": known, nothing yet.
            _ => {}
        }
    }

    /// The sum so far, for `image`.
    pub fn status(&self, image: &str) -> PullStatus {
        let count = |f: fn(&Layer) -> bool| {
            u32::try_from(self.layers.values().filter(|l| f(l)).count()).unwrap_or(u32::MAX)
        };
        PullStatus {
            image: image.to_owned(),
            layers: count(|_| true),
            layers_done: count(|l| l.done),
            downloaded_bytes: self.layers.values().map(|l| l.current).sum(),
            total_bytes: self.layers.values().map(|l| l.total).sum(),
        }
    }
}

/// The pulls a runtime has in flight, by image as the caller named it.
#[derive(Debug, Clone, Default)]
pub struct Pulls {
    inner: Arc<Mutex<HashMap<String, PullStatus>>>,
}

impl Pulls {
    /// Registers a pull of `image`; it is listed until the guard drops
    /// (the pull ended, failed, timed out or was cancelled).
    pub fn begin(&self, image: &str) -> PullGuard {
        self.set(PullStatus {
            image: image.to_owned(),
            ..PullStatus::default()
        });
        PullGuard {
            pulls: self.clone(),
            image: image.to_owned(),
        }
    }

    fn set(&self, status: PullStatus) {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(status.image.clone(), status);
    }

    /// Every pull in flight, by image.
    pub fn list(&self) -> Vec<PullStatus> {
        let mut v: Vec<PullStatus> = self
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.image.cmp(&b.image));
        v
    }
}

/// A pull listed in [`Pulls`]; removes it when dropped.
#[derive(Debug)]
pub struct PullGuard {
    pulls: Pulls,
    image: String,
}

impl PullGuard {
    /// Publishes the latest sum.
    pub fn update(&self, progress: &LayerProgress) {
        self.pulls.set(progress.status(&self.image));
    }
}

impl Drop for PullGuard {
    fn drop(&mut self) {
        self.pulls
            .inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.image);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_stream_sums_into_layers_and_bytes() {
        let mut p = LayerProgress::default();
        let steps: &[(&str, &str, Option<i64>, Option<i64>)] = &[
            ("1.0", "Pulling from verge/big", None, None),
            ("a", "Pulling fs layer", None, None),
            ("b", "Pulling fs layer", None, None),
            ("c", "Already exists", None, None),
            ("a", "Downloading", Some(1_000_000), Some(4_000_000)),
            ("b", "Waiting", None, None),
        ];
        for (id, st, c, t) in steps {
            p.update(id, st, *c, *t);
        }
        let s = p.status("verge/big:1.0");
        assert_eq!(
            (s.layers, s.layers_done, s.downloaded_bytes, s.total_bytes),
            (3, 1, 1_000_000, 4_000_000)
        );
        assert_eq!(s.describe(), "1 of 3 layers, 1.0 of 4.0 MB");
        p.update("a", "Download complete", None, None);
        p.update("b", "Downloading", Some(500_000), Some(2_000_000));
        let s = p.status("verge/big:1.0");
        assert_eq!((s.downloaded_bytes, s.total_bytes), (4_500_000, 6_000_000));
        for id in ["a", "b"] {
            p.update(id, "Extracting", Some(10), Some(20));
            p.update(id, "Pull complete", None, None);
        }
        p.update("", "Digest: sha256:00", None, None);
        p.update("", "Status: Downloaded newer image", None, None);
        let s = p.status("verge/big:1.0");
        assert_eq!(
            (s.layers, s.layers_done, s.downloaded_bytes, s.total_bytes),
            (3, 3, 6_000_000, 6_000_000)
        );
    }

    #[test]
    fn no_sizes_yet_describes_layers_only() {
        let mut p = LayerProgress::default();
        p.update("a", "Pulling fs layer", None, None);
        assert_eq!(p.status("x").describe(), "0 of 1 layers");
    }

    #[test]
    fn a_pull_is_listed_until_its_guard_drops() {
        let pulls = Pulls::default();
        let g = pulls.begin("verge/big:1.0");
        let mut p = LayerProgress::default();
        p.update("a", "Downloading", Some(5), Some(10));
        g.update(&p);
        assert_eq!(pulls.list()[0].downloaded_bytes, 5);
        drop(g);
        assert!(pulls.list().is_empty());
    }
}
