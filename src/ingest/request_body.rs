//! The request body as the handler sees it: hyper's `Incoming`, which also tells the
//! connection when it has been read to its end.
//!
//! Why: between requests a connection is taken out of hyper (`connection.rs`). That is
//! only safe once the last request's body is off the socket; a handler that answers
//! without reading it (404, 405, 415, a 503 before the body) leaves bytes that hyper
//! would drain or refuse by closing, but that a new hyper connection would read as the
//! next request (request smuggling, RFC 9112 section 9.3). The connection parks only
//! when this body says it reached its end.

use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::connection_io::ConnWatch;

/// A request's body, reporting its end to the connection it came on.
pub struct RequestBody {
    inner: Incoming,
    watch: Rc<ConnWatch>,
}

impl RequestBody {
    /// Wraps `inner`; a body with nothing in it (a GET, `Content-Length: 0`) is read
    /// to its end already.
    pub(super) fn new(inner: Incoming, watch: Rc<ConnWatch>) -> Self {
        watch.set_body_unread(!inner.is_end_stream());
        Self { inner, watch }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.watch.set_body_unread(false);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
