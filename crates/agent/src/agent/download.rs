//! Pulls with progress: while a module's image downloads, the module is
//! reported as `runtimeStatus: "downloading"` with how far the pull has got
//! (`"downloading image …: 2 of 5 layers, 12.3 of 48.0 MB"`), so a pull of
//! several minutes on a slow link shows as progress rather than as a
//! module that never appears.

use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use verge_runtime::{PullStatus, RuntimeError};

use super::Agent;
use crate::plan::DesiredModule;

/// How often a running pull's progress is looked at; what is reported
/// still waits for the reporter's interval.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// The reported spelling of a module that is being downloaded.
pub const DOWNLOADING: &str = "downloading";

impl Agent {
    /// Pulls `module`'s image through the runtime, reporting progress until
    /// the pull ends.
    pub(super) async fn pull_reporting(
        &mut self,
        module: &DesiredModule,
    ) -> Result<(), RuntimeError> {
        let rt = self.runtime.clone();
        let (name, image) = (&module.name, &module.spec.image);
        let pull = rt.pull_for(name, image, module.auth.as_ref());
        tokio::pin!(pull);
        let mut look = tokio::time::interval(LOOK_EVERY);
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; skipping it keeps quick pulls silent.
        look.tick().await;
        loop {
            tokio::select! {
                r = &mut pull => return r,
                _ = look.tick() => {
                    let progress = rt.pull_status(name, image).await.ok().flatten();
                    self.report_downloading(name, image, progress.as_ref()).await;
                }
            }
        }
    }

    /// Marks `name` as downloading in the reported properties and sends
    /// them when the reporter allows.
    async fn report_downloading(&mut self, name: &str, image: &str, progress: Option<&PullStatus>) {
        let text = match progress {
            Some(p) => format!("downloading image {image}: {}", p.describe()),
            None => format!("downloading image {image}"),
        };
        tracing::debug!(module = %name, "{text}");
        if !self.reported.is_object() {
            self.reported = json!({});
        }
        let section = if name == "edgeHub" {
            "systemModules"
        } else {
            "modules"
        };
        if let Some(entry) = self
            .reported
            .as_object_mut()
            .map(|o| o.entry(section).or_insert_with(|| json!({})))
            .and_then(Value::as_object_mut)
            .map(|s| s.entry(name).or_insert_with(|| Value::Object(Map::new())))
            .and_then(Value::as_object_mut)
        {
            entry.insert("runtimeStatus".into(), json!(DOWNLOADING));
            entry.insert("statusDescription".into(), json!(text));
        }
        if self
            .reporter
            .offer(self.reported.clone(), Instant::now())
            .is_some()
        {
            self.write_reported().await;
        }
    }
}
