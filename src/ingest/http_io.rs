//! Adapts glommio's `TcpStream` to hyper's I/O traits, so hyper's HTTP/1.1 state machine
//! (keep-alive, chunked bodies, `Expect: 100-continue`, pipelining) runs on a shard.
//!
//! Reads go through a per-shard buffer and `ReadBufCursor::put_slice`: one extra copy
//! per read, in exchange for no `unsafe` writes into hyper's uninitialized buffer.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;

/// Largest single read handed to hyper.
const READ_CHUNK_BYTES: usize = 16 * 1024;

thread_local! {
    /// The shard's read chunk, zeroed once: a fresh array per read cost a 16 KiB memset
    /// on every read, even one that found nothing (measured with perf: about 1 % of a
    /// shard's time at 10,000 single-event requests/s). Each shard is one thread, and a
    /// read never yields while it holds the chunk.
    static READ_CHUNK: std::cell::RefCell<Box<[u8; READ_CHUNK_BYTES]>> =
        std::cell::RefCell::new(Box::new([0u8; READ_CHUNK_BYTES]));
}

/// A shard's TCP connection as hyper sees it.
pub struct HyperStream(pub TcpStream);

impl HyperStream {
    /// Reads into hyper's buffer and shows the bytes read to `seen` (empty at EOF), which
    /// `ReadBufCursor` does not let a caller look at once it is filled.
    pub fn poll_read_seen(
        &mut self,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
        seen: impl FnOnce(&[u8]),
    ) -> Poll<io::Result<()>> {
        let want = buf.remaining().min(READ_CHUNK_BYTES);
        READ_CHUNK.with_borrow_mut(|chunk| {
            match Pin::new(&mut self.0).poll_read(cx, &mut chunk[..want]) {
                Poll::Ready(Ok(n)) => {
                    buf.put_slice(&chunk[..n]);
                    seen(&chunk[..n]);
                    Poll::Ready(Ok(()))
                }
                Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
                Poll::Pending => Poll::Pending,
            }
        })
    }
}

impl hyper::rt::Read for HyperStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.poll_read_seen(cx, buf, |_| {})
    }
}

impl hyper::rt::Write for HyperStream {
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
        Pin::new(&mut self.0).poll_close(cx)
    }
}
