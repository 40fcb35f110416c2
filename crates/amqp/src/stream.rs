//! A byte stream with the protocol header we already read put back in
//! front, so the AMQP library sees the connection from its first byte, and
//! a kill switch: once tripped, reads and writes fail, so the library's
//! connection engine (its own task) lets go of the socket even when the
//! client never answers our CLOSE.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::future::Future;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// `inner`, after `prefix` has been read again, until `kill` is cancelled.
pub(crate) struct Rewind<S> {
    prefix: [u8; 8],
    pos: usize,
    inner: S,
    killed: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<S> Rewind<S> {
    pub(crate) fn new(prefix: [u8; 8], inner: S, kill: CancellationToken) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
            killed: Box::pin(kill.cancelled_owned()),
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.killed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed by the endpoint",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl<S> std::fmt::Debug for Rewind<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewind").field("pos", &self.pos).finish()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn prefix_then_inner_until_killed() {
        let inner: &[u8] = b"rest";
        let kill = CancellationToken::new();
        let mut s = Rewind::new(
            *b"AMQP\x03\x01\x00\x00",
            tokio::io::join(inner, tokio::io::sink()),
            kill.clone(),
        );
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        assert_eq!(out, b"AMQP\x03\x01\x00\x00rest");
        kill.cancel();
        let mut one = [0u8; 1];
        assert!(s.read(&mut one).await.is_err(), "reads fail once killed");
    }
}
