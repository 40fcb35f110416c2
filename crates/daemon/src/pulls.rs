//! `GET /images/pulls` (Verge extension): which modules asked verged to
//! pull which image (`POST /modules`, `PUT /modules/{name}`,
//! `prepareupdate`), with the runtime's progress for each. The agent reports
//! such a module as `downloading`; `verge list` shows it before its
//! container exists.

use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use verge_runtime::PullStatus;
use verge_workload::api::{ImagePull, ImagePulls};

use crate::http::{ApiError, json_response};
use crate::mgmt::MgmtState;

/// The pull requests in flight: `(module, image)`, one entry per request.
#[derive(Debug, Clone, Default)]
pub struct PullRequests {
    inner: Arc<Mutex<Vec<(String, String)>>>,
}

impl PullRequests {
    /// Records that `module` waits for `image`, until the guard drops.
    pub fn begin(&self, module: &str, image: &str) -> PullRequest {
        let entry = (module.to_owned(), image.to_owned());
        self.lock().push(entry.clone());
        PullRequest {
            requests: self.clone(),
            entry,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(String, String)>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every image requested, with the modules that asked for it and the
    /// runtime's progress (zeros until the engine reports any).
    pub fn joined(&self, progress: &[PullStatus]) -> ImagePulls {
        let mut pulls: Vec<ImagePull> = Vec::new();
        for (module, image) in self.lock().iter() {
            match pulls.iter_mut().find(|p| &p.progress.image == image) {
                Some(p) => {
                    if !p.modules.contains(module) {
                        p.modules.push(module.clone());
                    }
                }
                None => pulls.push(ImagePull {
                    progress: progress
                        .iter()
                        .find(|s| &s.image == image)
                        .cloned()
                        .unwrap_or_else(|| PullStatus {
                            image: image.clone(),
                            ..PullStatus::default()
                        }),
                    modules: vec![module.clone()],
                }),
            }
        }
        pulls.sort_by(|a, b| a.progress.image.cmp(&b.progress.image));
        ImagePulls { pulls }
    }
}

/// One module's request; removed from [`PullRequests`] when dropped.
#[derive(Debug)]
pub struct PullRequest {
    requests: PullRequests,
    entry: (String, String),
}

impl Drop for PullRequest {
    fn drop(&mut self) {
        let mut v = self.requests.lock();
        if let Some(i) = v.iter().position(|e| *e == self.entry) {
            v.swap_remove(i);
        }
    }
}

/// `GET /images/pulls`.
pub(crate) async fn image_pulls(State(state): State<MgmtState>) -> Result<Response, ApiError> {
    let progress = state
        .runtime
        .pulls()
        .await
        .map_err(crate::mgmt::runtime_err)?;
    Ok(json_response(
        StatusCode::OK,
        &state.pulls.joined(&progress),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_join_the_runtimes_progress_and_go_when_done() {
        let r = PullRequests::default();
        let a = r.begin("sensor", "verge/big:1");
        let b = r.begin("filter", "verge/big:1");
        let c = r.begin("other", "verge/small:1");
        let progress = [PullStatus {
            image: "verge/big:1".into(),
            layers: 3,
            layers_done: 1,
            downloaded_bytes: 10,
            total_bytes: 40,
        }];
        let j = r.joined(&progress);
        assert_eq!(j.pulls.len(), 2);
        assert_eq!(j.pulls[0].progress, progress[0]);
        assert_eq!(j.pulls[0].modules, ["sensor", "filter"]);
        assert_eq!(j.pulls[1].progress.image, "verge/small:1");
        assert_eq!(
            j.pulls[1].progress.downloaded_bytes, 0,
            "no progress known yet"
        );
        drop((a, c));
        let j = r.joined(&progress);
        assert_eq!(j.pulls.len(), 1);
        assert_eq!(j.pulls[0].modules, ["filter"]);
        drop(b);
        assert!(r.joined(&progress).pulls.is_empty());
    }
}
