//! One shutdown mechanism for every Verge daemon (verged, verge-agent,
//! verge-hub, verge-cloud).
//!
//! A [`Shutdown`] holds a [`CancellationToken`] that every long-running loop
//! selects on, and a [`TaskTracker`] of the tasks the daemon spawned, each
//! with a name. [`Shutdown::finish`] cancels the token and waits for the
//! tracked tasks for a bounded grace period; whatever is still running then
//! is logged by name (and left to the runtime's drop). [`signal`] waits for
//! SIGTERM or SIGINT alike: a container runtime and systemd send SIGTERM, a
//! terminal sends SIGINT, and as PID 1 in a container a process gets no
//! default SIGTERM action, so the handler must be installed explicitly.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
pub use tokio_util::sync::CancellationToken;
pub use tokio_util::task::TaskTracker;

/// Which signal asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM (docker stop, systemd, verged stopping its modules).
    Term,
    /// SIGINT (Ctrl-C).
    Int,
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signal::Term => "SIGTERM",
            Signal::Int => "SIGINT",
        })
    }
}

/// Completes when the process gets SIGTERM or SIGINT. The handlers are
/// installed when this is first polled; call it before the daemon's slow
/// start-up work (or use [`Signals::install`]) so an early signal is not lost.
pub async fn signal() -> std::io::Result<Signal> {
    Signals::install()?.recv().await
}

/// SIGTERM and SIGINT handlers, installed at once.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs both handlers (must run inside a tokio runtime).
    pub fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT.
    pub async fn recv(&mut self) -> std::io::Result<Signal> {
        let got = tokio::select! {
            s = self.term.recv() => s.map(|()| Signal::Term),
            s = self.int.recv() => s.map(|()| Signal::Int),
        };
        got.ok_or_else(|| std::io::Error::other("the signal handlers are gone"))
    }
}

#[derive(Default)]
struct Registry {
    running: Mutex<BTreeMap<u64, String>>,
    next: AtomicU64,
    /// Name of the first task that ended before the shutdown began.
    ended_early: Mutex<Option<String>>,
    ended_early_notify: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Removes a task's name when the task finishes or is dropped (aborted).
struct NameGuard {
    registry: Arc<Registry>,
    id: u64,
    token: CancellationToken,
}

impl Drop for NameGuard {
    fn drop(&mut self) {
        let name = lock(&self.registry.running).remove(&self.id);
        if !self.token.is_cancelled()
            && let Some(name) = name
        {
            let mut early = lock(&self.registry.ended_early);
            if early.is_none() {
                *early = Some(name);
            }
            drop(early);
            self.registry.ended_early_notify.notify_waiters();
            self.registry.ended_early_notify.notify_one();
        }
    }
}

/// The shutdown of one daemon: cheap to clone, every clone is the same.
#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("cancelled", &self.token.is_cancelled())
            .field("tasks", &self.tracker.len())
            .finish()
    }
}

impl Shutdown {
    /// A new shutdown, not triggered, with no tasks.
    pub fn new() -> Self {
        Self::default()
    }

    /// The token every loop selects on (`token.cancelled()`).
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// The tracker the daemon's tasks are spawned on.
    pub fn tracker(&self) -> TaskTracker {
        self.tracker.clone()
    }

    /// Completes once the shutdown has begun.
    pub async fn cancelled(&self) {
        self.token.cancelled().await;
    }

    /// True once the shutdown has begun.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Begins the shutdown (idempotent).
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Spawns `fut` as a tracked task called `name`. The task is expected to
    /// watch [`Shutdown::token`] itself and end soon after it is cancelled
    /// (to flush or say goodbye first).
    pub fn spawn<F>(&self, name: impl Into<String>, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let id = self.registry.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.registry.running).insert(id, name.into());
        let guard = NameGuard {
            registry: self.registry.clone(),
            id,
            token: self.token.clone(),
        };
        self.tracker.spawn(async move {
            let out = fut.await;
            drop(guard);
            out
        })
    }

    /// Spawns `fut` as a tracked task called `name` that is dropped (at its
    /// next await point) when the shutdown begins: for loops that hold
    /// nothing to flush.
    pub fn spawn_until_cancelled<F>(&self, name: impl Into<String>, fut: F) -> JoinHandle<()>
    where
        F: Future + Send + 'static,
    {
        let token = self.token.clone();
        self.spawn(name, async move {
            tokio::select! {
                () = token.cancelled() => {}
                _ = fut => {}
            }
        })
    }

    /// Completes when a task spawned here ends before the shutdown began
    /// (for a daemon whose tasks all run forever, a fatal error); yields its
    /// name.
    pub async fn task_ended_early(&self) -> String {
        loop {
            let notified = self.registry.ended_early_notify.notified();
            if let Some(name) = lock(&self.registry.ended_early).clone() {
                return name;
            }
            notified.await;
        }
    }

    /// The names of the tasks still running.
    pub fn running(&self) -> Vec<String> {
        lock(&self.registry.running).values().cloned().collect()
    }

    /// Begins the shutdown and waits up to `grace` for every tracked task.
    /// Returns the names of those still running when the grace period ended
    /// (also logged); empty when all ended in time.
    pub async fn finish(&self, grace: Duration) -> Vec<String> {
        self.token.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
        {
            return Vec::new();
        }
        let left = self.running();
        tracing::warn!(
            grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            still_running = %left.join(", "),
            "grace period over; abandoning the tasks still running"
        );
        left
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn finish_waits_for_tasks_that_watch_the_token() {
        let s = Shutdown::new();
        let flushed = Arc::new(AtomicU64::new(0));
        let (t, f) = (s.token(), flushed.clone());
        s.spawn("flusher", async move {
            t.cancelled().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            f.store(1, Ordering::SeqCst);
        });
        s.spawn_until_cancelled("loop", std::future::pending::<()>());
        assert_eq!(s.running().len(), 2);
        assert!(s.finish(Duration::from_secs(5)).await.is_empty());
        assert_eq!(flushed.load(Ordering::SeqCst), 1);
        assert!(s.running().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn finish_names_what_outlived_the_grace_period() {
        let s = Shutdown::new();
        s.spawn("stubborn", std::future::pending::<()>());
        s.spawn_until_cancelled("polite", std::future::pending::<()>());
        let start = tokio::time::Instant::now();
        let left = s.finish(Duration::from_secs(3)).await;
        assert_eq!(left, vec!["stubborn".to_owned()]);
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_ending_before_the_shutdown_is_reported_by_name() {
        let s = Shutdown::new();
        s.spawn("forever", std::future::pending::<()>());
        s.spawn("short", async {});
        let name = tokio::time::timeout(Duration::from_secs(1), s.task_ended_early())
            .await
            .unwrap();
        assert_eq!(name, "short");
        // Tasks ending because of the shutdown are not "early".
        let s = Shutdown::new();
        s.spawn_until_cancelled("a", std::future::pending::<()>());
        s.finish(Duration::from_secs(1)).await;
        assert!(
            tokio::time::timeout(Duration::from_secs(1), s.task_ended_early())
                .await
                .is_err()
        );
    }
}
