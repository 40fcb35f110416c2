//! A byte stream with the protocol header we already read put back in
//! front, so the AMQP library sees the connection from its first byte, and
//! a kill switch: once tripped, reads and writes fail, so the library's
//! connection engine (its own task) lets go of the socket even when the
//! client never answers our CLOSE. Frames are checked on the way in
//! ([`FrameScan`]): the library's frame decoder assumes every frame holds at
//! least its 8-byte header and panics on a shorter one, and it allocates
//! whatever size a value inside declares (`encoding.rs`), so such a frame
//! ends the connection here, as an error, before the library sees it.

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
    scan: FrameScan,
}

/// Where the inbound byte stream is: inside a protocol header or a frame
/// header (collecting its 8 bytes), or inside a frame's body (collecting it
/// for the encoding check).
#[derive(Debug)]
pub(crate) struct FrameScan {
    header: [u8; 8],
    have: usize,
    /// Body bytes of the current frame still to come.
    need: usize,
    body: Vec<u8>,
    /// Largest frame accepted (what OPEN offers).
    max_frame: u32,
    transfers: crate::encoding::Transfers,
}

impl Default for FrameScan {
    fn default() -> Self {
        Self::new(crate::Config::default().max_frame_size)
    }
}

fn malformed(size: u32, doff: Option<u32>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed AMQP frame header: size {size}, data offset {doff:?}"),
    )
}

impl FrameScan {
    /// A scanner refusing frames over `max_frame` bytes.
    pub(crate) fn new(max_frame: u32) -> Self {
        Self {
            header: [0; 8],
            have: 0,
            need: 0,
            body: Vec::new(),
            max_frame,
            transfers: crate::encoding::Transfers::default(),
        }
    }

    /// Checks the next bytes of the stream: every frame's size covers its
    /// 8-byte header and its data offset (`doff`, in 4-byte words, at least
    /// 2) lies inside it, no frame is over the size limit, and every frame's
    /// body is well-formed AMQP encoding (`encoding.rs`). Protocol headers
    /// (`AMQP…`, before SASL and before AMQP) pass as they are.
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.need > 0 {
                let n = data.len().min(self.need);
                self.body.extend_from_slice(&data[..n]);
                self.need -= n;
                data = &data[n..];
                if self.need == 0 {
                    self.body_done()?;
                }
                continue;
            }
            let n = (8 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            // The library frames by the size field alone (it decodes a frame
            // once its size's worth of bytes is in), so the size is judged as
            // soon as its 4 bytes are, and the data offset with its byte.
            let protocol = &self.header[..4] == b"AMQP";
            let size = u32::from_be_bytes([
                self.header[0],
                self.header[1],
                self.header[2],
                self.header[3],
            ]);
            if self.have >= 4 && !protocol && (size < 8 || size > self.max_frame.max(512)) {
                return Err(malformed(size, None));
            }
            if self.have >= 5 && !protocol {
                let doff = u32::from(self.header[4]);
                if doff < 2 || doff * 4 > size {
                    return Err(malformed(size, Some(doff)));
                }
            }
            if self.have < 8 {
                break;
            }
            self.have = 0;
            if !protocol {
                self.need = (size - 8) as usize;
                self.body.clear();
                if self.need == 0 {
                    self.body_done()?;
                }
            }
        }
        Ok(())
    }

    /// The current frame's body is in: checks its encoding.
    fn body_done(&mut self) -> io::Result<()> {
        let ext = usize::from(self.header[4]) * 4 - 8;
        let sasl = self.header[5] == 1;
        let channel = u16::from_be_bytes([self.header[6], self.header[7]]);
        let body = self.body.get(ext..).unwrap_or_default();
        let checked = self.transfers.check(channel, body, sasl);
        self.body.clear();
        checked.map_err(|why| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed AMQP frame: {why}"),
            )
        })
    }
}

impl<S> Rewind<S> {
    pub(crate) fn new(prefix: [u8; 8], inner: S, kill: CancellationToken, max_frame: u32) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
            killed: Box::pin(kill.cancelled_owned()),
            scan: FrameScan::new(max_frame),
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

/// A client's connection with the endpoint's inbound frame check
/// ([`FrameScan`]): what a peer we dial sends gets the same check as what a
/// client sends us (the library would allocate any size a value declares).
pub struct Checked<S>(Rewind<S>);

impl<S> Checked<S> {
    /// `inner` as dialed; frames over `max_frame` bytes are refused.
    pub fn new(inner: S, max_frame: u32) -> Self {
        let mut r = Rewind::new([0; 8], inner, CancellationToken::new(), max_frame);
        // No header of the peer's was read ahead: nothing to put back.
        r.pos = r.prefix.len();
        Checked(r)
    }
}

impl<S> std::fmt::Debug for Checked<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Checked")
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Checked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Checked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
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
        let before = buf.filled().len();
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
        } else {
            let this = &mut *self;
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {}
                other => return other,
            }
        }
        let this = &mut *self;
        if let Err(e) = this.scan.feed(&buf.filled()[before..]) {
            // An error hands the reader nothing (as `AsyncRead` expects).
            buf.set_filled(before);
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(()))
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

    #[test]
    fn frames_shorter_than_their_header_are_refused() {
        // A bare AMQP header, then a frame whose size (5) cannot hold its own
        // header: the input the fuzzer found panicking the frame decoder.
        let mut scan = FrameScan::default();
        assert!(scan.feed(b"AMQP\x00\x01\x00\x00").is_ok());
        assert!(scan.feed(&[0, 0, 0]).is_ok(), "size not complete yet");
        assert!(scan.feed(&[5, 10, 46]).is_err());
        // A valid empty frame (8 bytes, doff 2) split anywhere, then a data
        // offset past the frame.
        let mut scan = FrameScan::default();
        assert!(scan.feed(b"AMQP\x03\x01\x00\x00\x00\x00").is_ok());
        assert!(scan.feed(&[0, 8, 2, 0, 0, 0]).is_ok());
        // A frame holding CLOSE (described list0), then one whose body is
        // not AMQP encoding.
        assert!(
            scan.feed(&[0, 0, 0, 12, 2, 0, 0, 0, 0x00, 0x53, 0x18, 0x45])
                .is_ok()
        );
        assert!(scan.feed(&[0, 0, 0, 12, 2, 0, 0, 0, 1, 2, 3, 4]).is_err());
        let mut scan = FrameScan::default();
        assert!(scan.feed(b"AMQP\x00\x01\x00\x00").is_ok());
        assert!(scan.feed(&[0, 0, 0, 12, 4, 0, 0, 0]).is_err());
    }
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_peer_we_dial_gets_the_same_check() {
        // A server's SASL header, then a frame declaring a 4 GB symbol.
        let inner: &[u8] = &[
            b'A', b'M', b'Q', b'P', 3, 1, 0, 0, 0, 0, 0, 16, 2, 1, 0, 0, 0xb3, 0xff, 0xff, 0xff,
            0xff, 0x41, 0x41, 0x41,
        ];
        let mut s = Checked::new(tokio::io::join(inner, tokio::io::sink()), 65536);
        let mut out = Vec::new();
        let e = s.read_to_end(&mut out).await.expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // A well-formed header and heartbeat pass unchanged.
        let ok: &[u8] = &[b'A', b'M', b'Q', b'P', 0, 1, 0, 0, 0, 0, 0, 8, 2, 0, 0, 0];
        let mut s = Checked::new(tokio::io::join(ok, tokio::io::sink()), 65536);
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        assert_eq!(out, ok);
    }

    #[tokio::test]
    async fn prefix_then_inner_until_killed() {
        // An empty (heartbeat) frame after the header.
        let inner: &[u8] = &[0, 0, 0, 8, 2, 0, 0, 0];
        let kill = CancellationToken::new();
        let mut s = Rewind::new(
            *b"AMQP\x03\x01\x00\x00",
            tokio::io::join(inner, tokio::io::sink()),
            kill.clone(),
            65536,
        );
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        assert_eq!(out, b"AMQP\x03\x01\x00\x00\x00\x00\x00\x08\x02\x00\x00\x00");
        kill.cancel();
        let mut one = [0u8; 1];
        assert!(s.read(&mut one).await.is_err(), "reads fail once killed");
    }
}
