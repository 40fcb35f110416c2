//! How far an image pull has got: what verged's `GET /images/pulls`
//! answers, the agent reports as `downloading` and `verge list` shows.

use serde::{Deserialize, Serialize};

/// How far one image pull has got.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PullStatus {
    /// The reference being pulled, as the caller gave it.
    pub image: String,
    /// Layers the engine announced so far.
    pub layers: u32,
    /// Layers pulled and extracted, or already present.
    pub layers_done: u32,
    /// Bytes downloaded, over the layers whose size is known.
    pub downloaded_bytes: u64,
    /// Sizes of the layers that started downloading (a layer's size is
    /// known only then, so this grows during the pull).
    pub total_bytes: u64,
}

impl PullStatus {
    /// `"2 of 5 layers, 12.3 of 48.0 MB"` (just the layers while no size is known).
    pub fn describe(&self) -> String {
        let layers = format!("{} of {} layers", self.layers_done, self.layers);
        if self.total_bytes == 0 {
            return layers;
        }
        let mb = |b: u64| b as f64 / 1_000_000.0;
        format!(
            "{layers}, {:.1} of {:.1} MB",
            mb(self.downloaded_bytes),
            mb(self.total_bytes)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_layers_and_megabytes() {
        let mut p = PullStatus {
            image: "x".into(),
            layers: 3,
            layers_done: 1,
            ..PullStatus::default()
        };
        assert_eq!(p.describe(), "1 of 3 layers");
        p.downloaded_bytes = 1_260_000;
        p.total_bytes = 48_000_000;
        assert_eq!(p.describe(), "1 of 3 layers, 1.3 of 48.0 MB");
    }
}
