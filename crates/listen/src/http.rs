//! HTTP/1.1 on one accepted connection, with deadlines: a client must send
//! a whole request head within `header` (hyper's header-read timeout, armed
//! whenever the connection waits for a request: a silent connection, a
//! slowloris head and an idle keep-alive connection all end there), a
//! request body that makes no progress for `body` fails the request and
//! closes the connection, and a response write that makes no progress for
//! `write` (a client that does not read) closes it too. Upgrades (WebSocket)
//! keep the write deadline.

use std::error::Error as StdError;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use crate::{Conn, ConnGuard, Stats};

/// Boxed error, what axum and hyper accept from a body.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// An HTTP listener's deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A whole request head (also the longest idle keep-alive gap).
    pub header: Duration,
    /// A request body making no progress.
    pub body: Duration,
    /// A write making no progress.
    pub write: Duration,
    /// How long open requests may finish after the listener is cancelled.
    pub grace: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            header: Duration::from_secs(30),
            body: Duration::from_secs(30),
            write: Duration::from_secs(60),
            grace: Duration::from_secs(2),
        }
    }
}

/// Serves HTTP/1.1 (with upgrades) on `io` until the client leaves, a
/// deadline passes or the listener is cancelled (then open requests get
/// `timeouts.grace`). `ext` is added to every request's extensions (the
/// peer's address or credentials), and so is the connection's
/// [`ConnGuard`] (an upgrade handler keeps it while the upgraded stream lives).
pub async fn serve<IO, S, B, E>(io: IO, service: S, ext: E, timeouts: Timeouts, conn: &Conn)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<TimedBody>, Response = Response<B>> + Send + Sync + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
    E: Clone + Send + Sync + 'static,
{
    let svc = Timed {
        inner: service,
        ext,
        guard: conn.guard(),
        body: timeouts.body,
        stats: conn.stats().clone(),
    };
    let io = TokioIo::new(WriteDeadline::new(io, timeouts.write));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header);
    let http = builder.serve_connection(io, svc).with_upgrades();
    tokio::pin!(http);
    let result = tokio::select! {
        r = http.as_mut() => r,
        () = conn.cancelled() => {
            http.as_mut().graceful_shutdown();
            match tokio::time::timeout(timeouts.grace, http.as_mut()).await {
                Ok(r) => r,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        if is_deadline(&e) {
            conn.stats().count_timeout();
            tracing::debug!(listener = %conn.listener(), peer = %conn.peer(), error = %e, "HTTP connection timed out");
        } else {
            tracing::debug!(listener = %conn.listener(), peer = %conn.peer(), error = %e, "HTTP connection ended with an error");
        }
    }
}

/// Whether hyper ended the connection because of one of our deadlines.
fn is_deadline(e: &hyper::Error) -> bool {
    if e.is_timeout() {
        return true;
    }
    let mut src = e.source();
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<io::Error>()
            && io.kind() == io::ErrorKind::TimedOut
        {
            return true;
        }
        src = s.source();
    }
    false
}

/// The hyper service: adds `ext` and the body deadline to each request.
struct Timed<S, E> {
    inner: S,
    ext: E,
    guard: ConnGuard,
    body: Duration,
    stats: Arc<Stats>,
}

impl<S, E> hyper::service::Service<Request<Incoming>> for Timed<S, E>
where
    S: hyper::service::Service<Request<TimedBody>>,
    E: Clone + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let mut req = req.map(|b| TimedBody::new(b, self.body, self.stats.clone()));
        req.extensions_mut().insert(self.ext.clone());
        req.extensions_mut().insert(self.guard.clone());
        self.inner.call(req)
    }
}

/// A request body that fails when no frame arrives for its deadline.
pub struct TimedBody {
    inner: Incoming,
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    stats: Arc<Stats>,
}

impl TimedBody {
    fn new(inner: Incoming, limit: Duration, stats: Arc<Stats>) -> Self {
        Self {
            inner,
            limit,
            sleep: None,
            stats,
        }
    }
}

impl Body for TimedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                this.sleep = None;
                Poll::Ready(r.map(|r| r.map_err(Into::into)))
            }
            Poll::Pending => {
                let limit = this.limit;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                ready!(sleep.as_mut().poll(cx));
                this.sleep = None;
                this.stats.count_timeout();
                Poll::Ready(Some(Err(Box::new(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("request body stalled for {} ms", limit.as_millis()),
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A stream whose writes fail with `TimedOut` after making no progress for
/// `limit` (the peer stopped reading).
pub struct WriteDeadline<T> {
    inner: T,
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl<T> WriteDeadline<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            sleep: None,
        }
    }

    /// Passes `r` through, arming the deadline while it is pending.
    fn watch<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match r {
            Poll::Ready(r) => {
                self.sleep = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let limit = self.limit;
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                ready!(sleep.as_mut().poll(cx));
                self.sleep = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("peer not reading for {} ms", limit.as_millis()),
                )))
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, r)
    }
}
