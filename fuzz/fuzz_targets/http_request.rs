//! Arbitrary bytes as everything a client sends on one HTTP/1.1 connection, served by
//! hyper's server connection configured as `src/ingest/connection.rs` configures it.
//!
//! The stream is in memory: it hands the input to hyper in uneven pieces, sometimes
//! answering "not yet" first, so the parser sees heads and chunk sizes split at many
//! places; then it reports end of file. Writes are kept for one check. The service is a
//! stand-in for the real handler (which needs Kafka): a `POST` has its body read, capped
//! like `http.max_body_bytes`, and gets 202; anything else is answered without reading
//! its body, which leaves hyper to skip or refuse it.
//!
//! Asserts, beyond "no panic": the connection future finishes within a number of polls
//! bounded by the input length (no hang once the client has sent everything); whatever
//! hyper wrote starts with an HTTP/1.x status line; and no request reaching the service
//! is framed ambiguously (see `check_framing`).

#![no_main]

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use hyper::body::{Body, Incoming};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Version};
use libfuzzer_sys::fuzz_target;

/// `MAX_HEAD_BYTES` in `src/ingest/connection.rs` (private there).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// `MAX_HEADERS` in `src/ingest/connection.rs` (private there).
const MAX_HEADERS: usize = 100;

/// `http.max_body_bytes`'s default.
const MAX_BODY_BYTES: usize = 1024 * 1024;

/// How many reads find nothing yet, after the input is all read and before end of file.
/// A client waits for its answers before closing; hyper (without `half_close`, as the
/// server runs it) drops a request still in progress when it reads end of file, so an
/// immediate EOF would leave the last request's answer unwritten and untested.
const WAITS_BEFORE_EOF: usize = 16;

/// Sizes of successive reads, in a cycle; a short read is as legal as a full one.
const READ_SIZES: [usize; 7] = [1, 3, 64, 7, 1500, 4096, 13];

fuzz_target!(|data: &[u8]| {
    let service =
        service_fn(|req: Request<Incoming>| async move { Ok::<_, Infallible>(answer(req).await) });
    let written_head = RefCell::new(Vec::new());
    let stream = MemoryStream {
        input: data,
        read_from: 0,
        reads: 0,
        waits_before_eof: WAITS_BEFORE_EOF,
        writes: 0,
        written_head: &written_head,
    };
    let mut conn = pin!(http1::Builder::new()
        .keep_alive(true)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .serve_connection(stream, service));

    // Every poll reads at least one byte, uses up one wait before end of file, or
    // finishes: the stream stalls at most every fourth read and every fifth write, and
    // the service waits only on the body, which the same poll feeds. Hyper also yields
    // on its own every few loop turns.
    let max_polls = 1_000 + WAITS_BEFORE_EOF + 4 * data.len();
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..max_polls {
        if conn.as_mut().poll(&mut cx).is_ready() {
            let head = written_head.borrow();
            assert!(
                head.is_empty() || head.starts_with(b"HTTP/1."),
                "hyper wrote something other than a response: {:?}",
                String::from_utf8_lossy(&head)
            );
            return;
        }
    }
    panic!("connection still open after {max_polls} polls");
});

/// The stand-in handler: read a `POST` body (bounded), answer everything else at once.
async fn answer(req: Request<Incoming>) -> Response<String> {
    check_framing(&req);
    if req.method() != Method::POST {
        return respond(StatusCode::NOT_FOUND, false);
    }
    let mut body = req.into_body();
    let mut total = 0usize;
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        match frame {
            Ok(frame) => {
                total += frame.data_ref().map_or(0, |data| data.len());
                if total > MAX_BODY_BYTES {
                    return respond(StatusCode::PAYLOAD_TOO_LARGE, true);
                }
            }
            Err(_) => return respond(StatusCode::BAD_REQUEST, true),
        }
    }
    respond(StatusCode::ACCEPTED, false)
}

/// What request smuggling needs, a request framed two ways, never reaches the service:
/// hyper refuses `Transfer-Encoding` unless it ends in `chunked` and on HTTP/1.0, and
/// drops `Content-Length` when both are sent (and closes after answering).
fn check_framing(req: &Request<Incoming>) {
    let headers = req.headers();
    let encodings: Vec<_> = headers.get_all(TRANSFER_ENCODING).iter().collect();
    if encodings.is_empty() {
        return;
    }
    assert!(
        !headers.contains_key(CONTENT_LENGTH),
        "request framed by both Transfer-Encoding and Content-Length: {headers:?}"
    );
    assert_eq!(
        req.version(),
        Version::HTTP_11,
        "Transfer-Encoding on {:?}",
        req.version()
    );
    let last = encodings.last().map(|v| v.as_bytes()).unwrap_or_default();
    let last = last.rsplit(|b| *b == b',').next().unwrap_or_default();
    assert!(
        last.trim_ascii().eq_ignore_ascii_case(b"chunked"),
        "Transfer-Encoding not ending in chunked: {encodings:?}"
    );
}

fn respond(status: StatusCode, close: bool) -> Response<String> {
    let mut response = Response::new(r#"{"accepted":0,"event_ids":[]}"#.to_string());
    *response.status_mut() = status;
    if close {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// A client connection in memory: the fuzz input to read, then end of file.
struct MemoryStream<'a> {
    input: &'a [u8],
    read_from: usize,
    reads: usize,
    /// "Not yet" answers left before end of file, once the input is all read.
    waits_before_eof: usize,
    writes: usize,
    /// The first bytes hyper wrote.
    written_head: &'a RefCell<Vec<u8>>,
}

impl hyper::rt::Read for MemoryStream<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        self.reads += 1;
        if self.reads.is_multiple_of(4) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let left = &self.input[self.read_from..];
        if left.is_empty() && self.waits_before_eof > 0 {
            self.waits_before_eof -= 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let n = left
            .len()
            .min(buf.remaining())
            .min(READ_SIZES[self.reads % READ_SIZES.len()]);
        buf.put_slice(&left[..n]);
        self.read_from += n;
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Write for MemoryStream<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writes += 1;
        if self.writes.is_multiple_of(5) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let mut head = self.written_head.borrow_mut();
        let keep = buf.len().min(16 - head.len().min(16));
        head.extend_from_slice(&buf[..keep]);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
