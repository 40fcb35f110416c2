//! Pulls in the background, with progress. A module's image is pulled by a
//! task of its own, so a pull of several minutes on a slow link holds back
//! only that module: the reconcile loop keeps restarting crashed modules and
//! starting the others meanwhile (edgeAgent pulls inline and stalls them:
//! iotedge #7259). While the pull runs the module is reported as
//! `runtimeStatus: "downloading"` with how far it has got
//! (`"downloading image …: 2 of 5 layers, 12.3 of 48.0 MB"`); the loop is
//! woken when a pull ends, so the module is created at once.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use verge_runtime::{ModuleRuntime, RuntimeError};

use crate::plan::DesiredModule;

/// How long a newly started pull is waited for inline: a pull of an image
/// that is already local (or a process backend's) ends well within it, so
/// the module is created in the same pass, as before pulls moved aside.
const PATIENCE: Duration = Duration::from_secs(1);

/// Where a module's pull stands, as one reconcile pass sees it.
#[derive(Debug)]
pub(super) enum PullState {
    /// The image is here: create the module.
    Pulled,
    /// Still downloading: try again on a later pass.
    Downloading,
    /// The pull failed.
    Failed(RuntimeError),
}

/// One pull in flight.
#[derive(Debug)]
struct Download {
    image: String,
    task: JoinHandle<Result<(), RuntimeError>>,
}

/// The agent's pulls in flight, one per module at most.
#[derive(Debug, Default)]
pub(super) struct Downloads {
    running: BTreeMap<String, Download>,
    /// Signalled when a pull ends (a stored permit if no one waits yet).
    ended: Arc<Notify>,
}

impl Drop for Downloads {
    fn drop(&mut self) {
        for d in self.running.values() {
            d.task.abort();
        }
    }
}

impl Downloads {
    /// Where `module`'s pull stands, starting it if none runs for its image
    /// (a pull of another image for the same module is abandoned).
    pub(super) async fn poll(
        &mut self,
        rt: &Arc<dyn ModuleRuntime>,
        module: &DesiredModule,
    ) -> PullState {
        let (name, image) = (&module.name, &module.spec.image);
        let fresh = match self.running.get(name) {
            Some(d) if d.image == *image => false,
            Some(_) => {
                self.abandon(name);
                true
            }
            None => true,
        };
        if fresh {
            let (rt, ended) = (rt.clone(), self.ended.clone());
            let (n, i, auth) = (name.clone(), image.clone(), module.auth.clone());
            let task = tokio::spawn(async move {
                let r = rt.pull_for(&n, &i, auth.as_ref()).await;
                ended.notify_one();
                r
            });
            tracing::info!(module = %name, image = %image, "pulling");
            self.running.insert(
                name.clone(),
                Download {
                    image: image.clone(),
                    task,
                },
            );
        }
        let Some(d) = self.running.get_mut(name) else {
            return PullState::Downloading;
        };
        let ended = if fresh {
            tokio::time::timeout(PATIENCE, &mut d.task).await.ok()
        } else {
            (&mut d.task).now_or_never()
        };
        let Some(joined) = ended else {
            return PullState::Downloading;
        };
        self.running.remove(name);
        match joined {
            Ok(Ok(())) => PullState::Pulled,
            Ok(Err(e)) => PullState::Failed(e),
            Err(e) => PullState::Failed(RuntimeError::PullFailed {
                image: image.clone(),
                reason: format!("the pull task ended: {e}"),
            }),
        }
    }

    /// Stops pulls for modules not in `wanted` (or wanted with another image).
    pub(super) fn retain(&mut self, wanted: &[DesiredModule]) {
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(name, d)| {
                !wanted
                    .iter()
                    .any(|m| m.name == **name && m.spec.image == d.image && m.pull)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            self.abandon(&name);
        }
    }

    fn abandon(&mut self, name: &str) {
        if let Some(d) = self.running.remove(name) {
            tracing::info!(module = %name, image = %d.image, "pull abandoned: the deployment changed");
            d.task.abort();
        }
    }

    /// The status description of each module whose pull runs, with how far
    /// the runtime says it has got.
    pub(super) async fn describe(&self, rt: &dyn ModuleRuntime) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (name, d) in &self.running {
            let text = match rt.pull_status(name, &d.image).await.ok().flatten() {
                Some(p) => format!("downloading image {}: {}", d.image, p.describe()),
                None => format!("downloading image {}", d.image),
            };
            out.insert(name.clone(), text);
        }
        out
    }

    /// Resolves when a pull has ended since the last time it resolved.
    pub(super) fn ended(&self) -> impl Future<Output = ()> + Send + 'static {
        let ended = self.ended.clone();
        async move { ended.notified().await }
    }
}
