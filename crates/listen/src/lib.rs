//! verge-listen: the one accept loop every Verge listener runs (the hub's
//! MQTT and HTTPS ports, verge-cloud's service API and device port, verged's
//! Unix sockets).
//!
//! What it guarantees, whatever the protocol on top:
//! * a connection permit is taken **before** `accept`: a listener at its cap
//!   leaves new connections in the kernel's backlog instead of spending a
//!   descriptor on them, so one flooded listener cannot take the descriptors
//!   another listener needs (size the caps with [`fds`]);
//! * a per-peer-address cap (TCP): one address cannot take a whole listener;
//! * [`Conn::handshake`] bounds the TLS handshake (or any first exchange) in
//!   the connection's own task, never in the accept loop;
//! * accept errors back off (EMFILE and friends would otherwise spin);
//! * the loop stops on a [`CancellationToken`]; connection tasks run on a
//!   [`TaskTracker`] when one is given (the owner waits for them), or on the
//!   loop's own set (aborted when the loop ends);
//! * counters (accepted, refused, timed out, open) in [`Stats`].
//!
//! [`http`] serves HTTP/1.1 on a connection with header, body and write
//! deadlines.

pub mod fds;
pub mod http;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
pub use tokio_util::sync::CancellationToken;
pub use tokio_util::task::TaskTracker;

/// First pause after an accept error; doubled on each further error.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause after accept errors.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Where a connection comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAddr {
    /// A TCP peer.
    Tcp(SocketAddr),
    /// A Unix-socket peer (they have no useful address).
    Unix,
}

impl PeerAddr {
    /// The IP address the per-peer cap counts (TCP only).
    pub fn ip(&self) -> Option<IpAddr> {
        match self {
            Self::Tcp(a) => Some(a.ip()),
            Self::Unix => None,
        }
    }

    /// The socket address (TCP only).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self {
            Self::Tcp(a) => Some(*a),
            Self::Unix => None,
        }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => a.fmt(f),
            Self::Unix => f.write_str("unix"),
        }
    }
}

/// A source of connections.
pub trait Incoming: Send + Sync + 'static {
    /// The accepted stream.
    type Io: Send + 'static;
    /// Accepts one connection.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, PeerAddr)>> + Send;
}

impl Incoming for TcpListener {
    type Io = TcpStream;
    async fn accept(&self) -> io::Result<(TcpStream, PeerAddr)> {
        let (s, a) = TcpListener::accept(self).await?;
        Ok((s, PeerAddr::Tcp(a)))
    }
}

impl Incoming for UnixListener {
    type Io = UnixStream;
    async fn accept(&self) -> io::Result<(UnixStream, PeerAddr)> {
        let (s, _) = UnixListener::accept(self).await?;
        Ok((s, PeerAddr::Unix))
    }
}

/// A listener's caps and first deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once (at least 1).
    pub max_connections: usize,
    /// Connections open at once from one IP address (TCP; at least 1).
    pub max_per_peer: usize,
    /// Bound of [`Conn::handshake`] (TLS handshake, first request…).
    pub handshake_timeout: Duration,
}

impl Limits {
    /// `max_connections` with a per-peer cap of half of it (one address
    /// never takes the whole listener) and `handshake_timeout`.
    pub fn new(max_connections: usize, handshake_timeout: Duration) -> Self {
        let max_connections = max_connections.max(1);
        Self {
            max_connections,
            max_per_peer: (max_connections / 2).max(1),
            handshake_timeout,
        }
    }
}

/// A listener's counters (read them any time; they only grow, except `open`).
#[derive(Debug, Default)]
pub struct Stats {
    accepted: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
    accept_errors: AtomicU64,
    open: AtomicUsize,
}

impl Stats {
    /// Connections accepted and handed to the handler.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
    /// Connections closed at once because their peer address was at its cap.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
    /// Connections closed by a deadline (handshake, header, body, write).
    pub fn timed_out(&self) -> u64 {
        self.timed_out.load(Ordering::Relaxed)
    }
    /// Failed `accept` calls.
    pub fn accept_errors(&self) -> u64 {
        self.accept_errors.load(Ordering::Relaxed)
    }
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
    /// Counts a connection closed by a deadline found by the handler.
    pub fn count_timeout(&self) {
        self.timed_out.fetch_add(1, Ordering::Relaxed);
    }
}

/// Open connections per peer address.
#[derive(Debug, Default)]
struct PeerTable(Mutex<HashMap<IpAddr, usize>>);

impl PeerTable {
    fn try_take(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<PeerSlot> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            table: self.clone(),
            ip,
        })
    }
}

/// One connection's place in its peer's count; released on drop.
struct PeerSlot {
    table: Arc<PeerTable>,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Everything a connection holds for its lifetime; released on drop.
struct Held {
    _permit: OwnedSemaphorePermit,
    _peer: Option<PeerSlot>,
    stats: Arc<Stats>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps a connection's permits (listener and peer) taken while alive:
/// what outlives the accepted task (an upgraded WebSocket served on a task
/// of its own) holds one so the connection still counts against the caps.
#[derive(Clone)]
pub struct ConnGuard(#[allow(dead_code)] Arc<Held>);

impl fmt::Debug for ConnGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConnGuard")
    }
}

/// What a connection's handler gets besides its stream.
#[derive(Debug, Clone)]
pub struct Conn {
    guard: ConnGuard,
    peer: PeerAddr,
    listener: Arc<str>,
    stats: Arc<Stats>,
    handshake_timeout: Duration,
    cancel: CancellationToken,
}

impl Conn {
    /// The peer.
    pub fn peer(&self) -> &PeerAddr {
        &self.peer
    }

    /// The listener's name (for logs).
    pub fn listener(&self) -> &str {
        &self.listener
    }

    /// A guard keeping this connection counted (see [`ConnGuard`]).
    pub fn guard(&self) -> ConnGuard {
        self.guard.clone()
    }

    /// The listener's counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Runs `fut` (a TLS handshake, a first read) within the listener's
    /// handshake timeout; `None` (logged and counted) if it took longer.
    pub async fn handshake<T>(&self, fut: impl Future<Output = T>) -> Option<T> {
        match tokio::time::timeout(self.handshake_timeout, fut).await {
            Ok(v) => Some(v),
            Err(_) => {
                self.stats.count_timeout();
                tracing::info!(listener = %self.listener, peer = %self.peer, "handshake timed out");
                None
            }
        }
    }

    /// Resolves when the listener is told to stop.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await;
    }

    /// The listener's cancellation token.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }
}

/// An accept loop with caps, deadlines and counters (see the crate docs).
pub struct Listener<L> {
    name: Arc<str>,
    incoming: L,
    limits: Limits,
    stats: Arc<Stats>,
    cancel: CancellationToken,
    tracker: Option<TaskTracker>,
}

impl<L: Incoming> Listener<L> {
    /// A listener named `name` (in logs) that stops when `cancel` fires.
    pub fn new(
        name: impl Into<String>,
        incoming: L,
        limits: Limits,
        cancel: CancellationToken,
    ) -> Self {
        let name: String = name.into();
        Self {
            name: name.into(),
            incoming,
            limits: Limits {
                max_connections: limits.max_connections.max(1),
                max_per_peer: limits.max_per_peer.max(1),
                handshake_timeout: limits.handshake_timeout,
            },
            stats: Arc::new(Stats::default()),
            cancel,
            tracker: None,
        }
    }

    /// Spawns connection tasks on `tracker` (its owner waits for them)
    /// instead of the loop's own set.
    pub fn with_tracker(mut self, tracker: TaskTracker) -> Self {
        self.tracker = Some(tracker);
        self
    }

    /// The counters (shared with the running loop).
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// [`run`](Self::run) until `shutdown` resolves (or the token given to
    /// [`new`](Self::new) fires), then stops accepting and returns once the
    /// loop has wound down: for servers stopped by a future rather than a
    /// token of their own.
    pub async fn run_until<F, Fut>(self, handler: F, shutdown: impl Future<Output = ()>)
    where
        F: Fn(L::Io, Conn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        let run = self.run(handler);
        tokio::pin!(run);
        tokio::select! {
            () = &mut run => {}
            () = shutdown => {
                cancel.cancel();
                run.await;
            }
        }
    }

    /// Accepts until cancelled, running `handler` for each connection in its
    /// own task. Without a tracker, open connections are aborted on return.
    pub async fn run<F, Fut>(self, handler: F)
    where
        F: Fn(L::Io, Conn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Self {
            name,
            incoming,
            limits,
            stats,
            cancel,
            tracker,
        } = self;
        tracing::info!(
            listener = %name,
            max_connections = limits.max_connections,
            max_per_peer = limits.max_per_peer,
            handshake_timeout_ms = u64::try_from(limits.handshake_timeout.as_millis()).unwrap_or(u64::MAX),
            "accepting connections"
        );
        let permits = Arc::new(Semaphore::new(limits.max_connections));
        let peers = Arc::new(PeerTable::default());
        let mut own: JoinSet<()> = JoinSet::new();
        let mut backoff = BACKOFF_MIN;
        let mut saturated = false;
        loop {
            // The permit comes first: at the cap nothing is accepted.
            let permit = match permits.clone().try_acquire_owned() {
                Ok(p) => {
                    saturated = false;
                    p
                }
                Err(_) => {
                    if !saturated {
                        saturated = true;
                        tracing::warn!(listener = %name, max_connections = limits.max_connections, "at the connection cap; new connections wait");
                    }
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        p = permits.clone().acquire_owned() => match p {
                            Ok(p) => p,
                            Err(_) => break,
                        },
                        Some(_) = own.join_next(), if !own.is_empty() => continue,
                    }
                }
            };
            let (io, peer) = tokio::select! {
                () = cancel.cancelled() => break,
                r = incoming.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                        if is_per_connection(&e) {
                            tracing::debug!(listener = %name, error = %e, "accept failed");
                            continue;
                        }
                        // Out of descriptors or memory: wait for some to be freed.
                        tracing::warn!(listener = %name, error = %e, pause_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX), "accept failed; pausing");
                        tokio::select! {
                            () = cancel.cancelled() => break,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                },
                Some(_) = own.join_next(), if !own.is_empty() => continue,
            };
            backoff = BACKOFF_MIN;
            let slot = match peer.ip() {
                Some(ip) => match peers.try_take(ip, limits.max_per_peer) {
                    Some(s) => Some(s),
                    None => {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(listener = %name, %peer, max_per_peer = limits.max_per_peer, "peer address at its connection cap; closing");
                        continue;
                    }
                },
                None => None,
            };
            stats.accepted.fetch_add(1, Ordering::Relaxed);
            stats.open.fetch_add(1, Ordering::Relaxed);
            let guard = ConnGuard(Arc::new(Held {
                _permit: permit,
                _peer: slot,
                stats: stats.clone(),
            }));
            let held = guard.clone();
            let conn = Conn {
                guard,
                peer,
                listener: name.clone(),
                stats: stats.clone(),
                handshake_timeout: limits.handshake_timeout,
                cancel: cancel.clone(),
            };
            let fut = handler(io, conn);
            let task = async move {
                let _held = held;
                fut.await;
            };
            match &tracker {
                Some(t) => {
                    t.spawn(task);
                }
                None => {
                    own.spawn(task);
                }
            }
        }
        tracing::debug!(listener = %name, "stopped accepting");
        own.shutdown().await;
    }
}

/// Errors about one pending connection (retry at once), as opposed to the
/// process running out of something (back off).
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    async fn echo_listener(limits: Limits) -> (SocketAddr, Arc<Stats>, CancellationToken) {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let l = Listener::new("test", tcp, limits, cancel.clone());
        let stats = l.stats();
        tokio::spawn(l.run(|mut io: TcpStream, conn: Conn| async move {
            let mut b = [0u8; 1];
            if let Some(Ok(1)) = conn.handshake(io.read(&mut b)).await {
                let _ = io.write_all(&b).await;
                // Hold the connection until the peer closes it.
                let _ = io.read(&mut b).await;
            }
        }));
        (addr, stats, cancel)
    }

    async fn echo(addr: SocketAddr) -> Option<TcpStream> {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"x").await.ok()?;
        let mut b = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut b)).await {
            Ok(Ok(1)) => Some(s),
            _ => None,
        }
    }

    #[tokio::test]
    async fn cap_holds_new_connections_until_one_closes() {
        let (addr, stats, cancel) = echo_listener(Limits {
            max_connections: 3,
            max_per_peer: 3,
            handshake_timeout: Duration::from_secs(5),
        })
        .await;
        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(echo(addr).await.unwrap());
        }
        // The fourth waits in the backlog: not served.
        assert!(echo(addr).await.is_none());
        drop(open.pop());
        assert!(echo(addr).await.is_some());
        assert_eq!(stats.refused(), 0);
        cancel.cancel();
    }

    #[tokio::test]
    async fn per_peer_cap_refuses_at_once() {
        let (addr, stats, cancel) = echo_listener(Limits {
            max_connections: 10,
            max_per_peer: 2,
            handshake_timeout: Duration::from_secs(5),
        })
        .await;
        let _a = echo(addr).await.unwrap();
        let _b = echo(addr).await.unwrap();
        assert!(echo(addr).await.is_none());
        assert_eq!(stats.refused(), 1);
        assert_eq!(stats.accepted(), 2);
        cancel.cancel();
    }

    #[tokio::test]
    async fn silent_connection_times_out_and_frees_its_permit() {
        let (addr, stats, cancel) = echo_listener(Limits {
            max_connections: 1,
            max_per_peer: 1,
            handshake_timeout: Duration::from_millis(200),
        })
        .await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(2), silent.read(&mut b))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)));
        assert_eq!(stats.timed_out(), 1);
        assert!(echo(addr).await.is_some());
        cancel.cancel();
    }

    #[tokio::test]
    async fn cancel_stops_accepting_and_aborts_connections() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let l = Listener::new(
            "test",
            tcp,
            Limits::new(4, Duration::from_secs(5)),
            cancel.clone(),
        );
        let run = tokio::spawn(l.run(|mut io: TcpStream, _conn: Conn| async move {
            let mut b = [0u8; 1];
            let _ = io.read(&mut b).await;
        }));
        let mut c = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(2), run)
            .await
            .unwrap()
            .unwrap();
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b))
            .await
            .unwrap();
        assert!(matches!(n, Ok(0) | Err(_)));
    }

    #[tokio::test]
    async fn tracker_owns_connections_after_cancel() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let l = Listener::new(
            "test",
            tcp,
            Limits::new(4, Duration::from_secs(5)),
            cancel.clone(),
        )
        .with_tracker(tracker.clone());
        let run = tokio::spawn(l.run(|mut io: TcpStream, conn: Conn| async move {
            conn.cancelled().await;
            let _ = io.write_all(b"bye").await;
        }));
        let mut c = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        cancel.cancel();
        run.await.unwrap();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(2), tracker.wait())
            .await
            .unwrap();
        let mut b = Vec::new();
        c.read_to_end(&mut b).await.unwrap();
        assert_eq!(b, b"bye");
    }
}
