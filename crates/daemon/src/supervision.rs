//! What verged knows about the agent it supervises, for
//! `GET /systeminfo/agent`. The watchdogs in [`crate::daemon`] report every
//! start and exit here; the management API reads snapshots and asks for
//! restarts (`verge restart edgeAgent`).

use std::sync::{Arc, Mutex, PoisonError};

use verge_core::time::Timestamp;

use crate::api::{AgentExit, AgentInfo};

#[derive(Debug)]
struct Inner {
    info: AgentInfo,
    /// Whether it ever started: later starts are restarts.
    started_once: bool,
}

/// The agent's state, shared by its watchdog and the management API
/// (cheap to clone).
#[derive(Debug, Clone)]
pub struct AgentMonitor {
    inner: Arc<Mutex<Inner>>,
    /// Restart requests from the management API, for the watchdog.
    restart: Arc<tokio::sync::Notify>,
}

impl AgentMonitor {
    /// An agent not started yet. `kind` is `process` or `docker`.
    pub fn new(name: &str, kind: &str, image: &str) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                info: AgentInfo {
                    name: name.to_owned(),
                    kind: kind.to_owned(),
                    image: image.to_owned(),
                    pid: None,
                    start_time: None,
                    restart_count: 0,
                    last_exit: None,
                    status: "starting".to_owned(),
                },
                started_once: false,
            })),
            restart: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Asks the watchdog to stop the agent and start it again now.
    pub fn request_restart(&self) {
        // `notify_one` keeps the request if the watchdog is not waiting yet.
        self.restart.notify_one();
    }

    /// Completes when a restart was requested.
    pub async fn restart_requested(&self) {
        self.restart.notified().await;
    }

    fn update(&self, f: impl FnOnce(&mut Inner)) {
        // A panic elsewhere while holding the lock leaves plain data behind: keep using it.
        let mut g = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut g);
    }

    /// The current state.
    pub fn snapshot(&self) -> AgentInfo {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .info
            .clone()
    }

    /// The agent (re)started now.
    pub fn started(&self, pid: Option<u32>) {
        self.update(|i| {
            if i.started_once {
                i.info.restart_count += 1;
            }
            i.started_once = true;
            i.info.pid = pid;
            i.info.start_time = Some(Timestamp::now().to_iso8601());
            i.info.status = "running".to_owned();
        });
    }

    /// The agent exited by itself; a restart is pending.
    pub fn exited(&self, code: Option<i64>, signal: Option<i32>, at: Timestamp) {
        self.update(|i| {
            i.info.pid = None;
            i.info.last_exit = Some(AgentExit {
                time: at.to_iso8601(),
                code,
                signal,
            });
            i.info.status = "backoff".to_owned();
        });
    }

    /// Starting it failed; a retry is pending.
    pub fn start_failed(&self) {
        self.update(|i| {
            i.info.pid = None;
            i.info.status = "failed".to_owned();
        });
    }

    /// verged stopped it (shutdown).
    pub fn stopped(&self) {
        self.update(|i| {
            i.info.pid = None;
            i.info.status = "stopped".to_owned();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_restarts_not_the_first_start() {
        let m = AgentMonitor::new("edgeAgent", "process", "/bin/agent");
        assert_eq!(m.snapshot().status, "starting");
        m.started(Some(10));
        assert_eq!(m.snapshot().restart_count, 0);
        assert_eq!(m.snapshot().pid, Some(10));
        m.exited(Some(3), None, Timestamp::from_millis(0));
        let s = m.snapshot();
        assert_eq!((s.status.as_str(), s.pid), ("backoff", None));
        assert_eq!(s.last_exit.as_ref().and_then(|e| e.code), Some(3));
        m.start_failed();
        assert_eq!(m.snapshot().status, "failed");
        m.started(Some(11));
        let s = m.snapshot();
        assert_eq!((s.status.as_str(), s.restart_count), ("running", 1));
        // The last exit stays visible while it runs again.
        assert_eq!(s.last_exit.and_then(|e| e.code), Some(3));
        m.stopped();
        assert_eq!(m.snapshot().status, "stopped");
    }
}
