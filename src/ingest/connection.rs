//! One accepted connection's life: served by hyper, bounded by the header and idle
//! timeouts, refused at accept past the shard's connection cap, and closed so that the
//! client reads the last answer instead of a reset. The policy for each case, with the
//! reasons and RFC 9112 references, is docs/connections.md.

use std::convert::Infallible;
use std::future::poll_fn;
use std::net::Shutdown;
use std::pin::{pin, Pin};
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_lite::future::{self, Future};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use tracing::debug;

use super::connection_io::{canned_answer, ConnWatch, Phase, WatchedStream};
use super::error::IngestError;
use super::handler::{handle, HttpResponse};
use super::http_io::HyperStream;
use super::request_body::RequestBody;
use super::state::{Listener, ShardContext};
use crate::metrics::shard::ConnectionStats;

/// How long a connection that has sent nothing yet may take, once the shard stops, to
/// send its request. Far above a round trip, so a request already on its way is served;
/// short enough that a client that connected and went quiet does not hold the shutdown.
/// (Go's `http.Server.Shutdown` gives new connections 5 s for the same reason.)
const FIRST_REQUEST_WAIT: Duration = Duration::from_secs(1);

/// Largest request head (request line plus headers); a bigger one gets 431. Browsers
/// and mobile HTTP stacks stay far below 16 KiB; hyper's own default (about 400 KiB)
/// would let each slow connection pin that much memory. Set as hyper's read buffer cap
/// too, which alone is soft (checked between reads, so one read can carry a head past
/// it); `max_header_size` is checked on the parsed head, so the limit is exact.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Most header lines in a request; more gets 431. hyper's default, stated here so the
/// documented limit cannot drift with a hyper upgrade.
const MAX_HEADERS: usize = 100;

/// After the server decided to close (a refusal, a timeout, a parse error), how long it
/// keeps reading and discarding what the client still sends. Closing a socket with
/// unread input makes the kernel send a reset, which can destroy the answer before the
/// client reads it (the "lingering close" of RFC 9112, section 9.6).
const LINGER: Duration = Duration::from_millis(500);

/// Most bytes discarded while lingering.
const LINGER_BYTES: usize = 256 * 1024;

/// How long writing a refusal may take before the connection is simply closed: the
/// answer is a few hundred bytes, which fit in any socket buffer.
const REFUSAL_WRITE: Duration = Duration::from_secs(1);

/// Why the active loop ended.
enum Ended {
    /// hyper is idle between requests: the connection parks.
    Idle,
    /// hyper finished: the client closed, or a `Connection: close` answer was sent.
    Hyper(hyper::Result<()>),
    /// The phase's deadline passed: header or idle timeout.
    TimedOut(Phase),
}

/// Serves one connection until it closes, alternating between two states:
///
/// - **Parked**, between requests: the task holds the socket and a few counters, and
///   waits for the first byte of the next request with a one-byte read (which, on
///   glommio, asks io_uring for readiness without lending it a buffer).
/// - **Active**, from that byte until hyper has written the answer and is waiting for
///   more: a hyper connection serves the request(s), and is then taken apart again.
///
/// Why: a hyper connection costs about 16 KiB of buffers (8 KiB read, 8 KiB for
/// answer heads) plus its state, whether or not a request is in progress. Measured
/// with 10,000 held connections (docs/connections.md), a connection kept in hyper
/// between requests cost 24-30 KB of RSS; parked, a few KB. 50,000 keep-alive
/// connections, most of them idle at any instant, are the goal-spike case. The price is
/// one hyper connection built per burst of requests (a few allocations).
///
/// When the shard stops, an active connection finishes its current request and closes
/// (hyper's graceful shutdown); a parked one that has served a request closes at once; a
/// connection that has sent nothing yet (typically one just accepted, or drained from
/// the accept queue) gets up to [`FIRST_REQUEST_WAIT`] for its first bytes and is then
/// served its one request like any other.
///
/// `listener` is set on every request, so the handler knows which endpoints it may
/// serve (see `http.admin_listen`).
///
/// A request head must arrive within `http.header_read_timeout_ms` (408, then close); a
/// keep-alive connection idle for `http.idle_timeout_ms` is closed without an answer.
///
/// # Limitations
/// - A keep-alive connection idle between requests at the stop is closed at once: a
///   request the client sends at that very moment meets a closed connection, the race
///   every HTTP/1.1 keep-alive client must already handle (RFC 9112, section 9.3.1).
/// - The header and idle timers stop while the handler has the request: its body is
///   bounded by the handler's own `http.body_read_timeout_ms` (`body.rs`), and the wait
///   for Kafka by `http.ack_timeout_ms`.
pub(super) async fn serve_connection(ctx: Rc<ShardContext>, stream: TcpStream, listener: Listener) {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(shard = ctx.shard, error = %err, "cannot set TCP_NODELAY");
    }
    let watch = ConnWatch::new(Instant::now());
    let mut stream = stream;
    let mut prefix = Bytes::new();
    loop {
        if prefix.is_empty() {
            match park(&ctx, &mut stream, &watch).await {
                Wake::Byte(byte) => prefix = with_what_is_there(&mut stream, byte).await,
                Wake::Closed => return,
                Wake::TimedOut(phase) => return timed_out(&ctx, stream, &watch, phase).await,
            }
        }
        // Boxed, so a parked connection's task does not keep room for hyper's state.
        let active = Box::pin(serve_active(&ctx, stream, prefix, &watch, listener));
        match active.await {
            Some((parked, rest)) => (stream, prefix) = (parked, rest),
            None => return,
        }
    }
}

/// Most bytes taken off the socket with the byte that woke a parked connection: a
/// typical request (head and body) in one read, so hyper parses it without asking the
/// socket again.
const WAKE_READ_BYTES: usize = 4 * 1024;

/// `first` and whatever the socket holds right now, without waiting for more. Saves a
/// read syscall per request, and hyper growing its buffer from one byte.
async fn with_what_is_there(stream: &mut TcpStream, first: u8) -> Bytes {
    // On the heap: an array here would sit in every parked connection's task.
    let mut buf = vec![0u8; WAKE_READ_BYTES];
    buf[0] = first;
    // One poll: ready data or nothing (an error shows again on hyper's own read).
    let more = match future::poll_once(stream.read(&mut buf[1..])).await {
        Some(Ok(n)) => n,
        _ => 0,
    };
    Bytes::copy_from_slice(&buf[..1 + more])
}

/// What ended a parked connection's wait.
enum Wake {
    /// The first byte of the next request.
    Byte(u8),
    /// The client closed (or the socket failed), or the shard stopped.
    Closed,
    /// The phase's deadline passed: header timeout for a new connection, idle timeout
    /// for a keep-alive one.
    TimedOut(Phase),
}

/// Waits, without hyper, for the next request's first byte (see [`serve_connection`]).
async fn park(ctx: &ShardContext, stream: &mut TcpStream, watch: &ConnWatch) -> Wake {
    let http = &ctx.shared.config.http;
    let phase = watch.phase();
    let due = match phase {
        Phase::Head { since } => since + Duration::from_millis(http.header_read_timeout_ms),
        Phase::Idle { since } => since + Duration::from_millis(http.idle_timeout_ms),
        // Not parked while serving; counted from now if it ever happens.
        Phase::Serving => Instant::now() + Duration::from_millis(http.idle_timeout_ms),
    };
    let read = async {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte).await {
            Ok(1) => Wake::Byte(byte[0]),
            Ok(_) => Wake::Closed,
            Err(err) => {
                debug!(shard = ctx.shard, error = %err, "parked connection failed");
                Wake::Closed
            }
        }
    };
    let stop = async {
        ctx.stop.wait().await;
        if !watch.heard() {
            glommio::timer::sleep(FIRST_REQUEST_WAIT).await;
        }
        Wake::Closed
    };
    let deadline = async {
        glommio::timer::sleep(due.saturating_duration_since(Instant::now())).await;
        Wake::TimedOut(phase)
    };
    // The read first: a byte that is already there wins over a stop or a deadline.
    future::or(read, future::or(stop, deadline)).await
}

/// Closes a connection whose header or idle deadline passed while it was parked.
async fn timed_out(ctx: &ShardContext, stream: TcpStream, watch: &ConnWatch, phase: Phase) {
    let http = &ctx.shared.config.http;
    let stats = &ctx.metrics.connections;
    if let Phase::Head { .. } = phase {
        ConnectionStats::bump(&stats.header_timeouts);
        debug!(
            shard = ctx.shard,
            timeout_ms = http.header_read_timeout_ms,
            "request head not received in time, answering 408"
        );
        // Parked only once hyper wrote everything, so nothing is half-written here.
        debug_assert!(!watch.write_blocked());
        let err = IngestError::HeaderTimeout {
            timeout_ms: http.header_read_timeout_ms,
        };
        answer_and_close(stream, &canned_answer(&err, http.retry_after_secs)).await;
    } else {
        ConnectionStats::bump(&stats.idle_timeouts);
        debug!(
            shard = ctx.shard,
            timeout_ms = http.idle_timeout_ms,
            "keep-alive connection idle too long, closing"
        );
    }
}

/// Whether `headers` carry `token` in `Connection`.
fn connection_has(headers: &http::HeaderMap, token: &str) -> bool {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether a request lets the connection stay open after its answer: HTTP/1.1 without
/// `Connection: close`, or HTTP/1.0 with `Connection: keep-alive` (RFC 9112, 9.3).
fn request_keeps_alive(version: http::Version, headers: &http::HeaderMap) -> bool {
    match version {
        http::Version::HTTP_11 => !connection_has(headers, "close"),
        http::Version::HTTP_10 => connection_has(headers, "keep-alive"),
        _ => false,
    }
}

/// Serves requests with hyper from the byte(s) in `prefix` on, until hyper is idle
/// again (returns the socket and any bytes it read past the last request, to park) or
/// the connection ends (returns `None`).
async fn serve_active(
    ctx: &Rc<ShardContext>,
    stream: TcpStream,
    prefix: Bytes,
    watch: &Rc<ConnWatch>,
    listener: Listener,
) -> Option<(TcpStream, Bytes)> {
    let http = &ctx.shared.config.http;
    let header_timeout = Duration::from_millis(http.header_read_timeout_ms);
    let idle_timeout = Duration::from_millis(http.idle_timeout_ms);

    let service_ctx = Rc::clone(ctx);
    let service_watch = Rc::clone(watch);
    // The rate limits count clients by address (see `rate_limit.rs`).
    let peer = stream.peer_addr().ok().map(super::rate_limit::PeerAddr);
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        if let Some(peer) = peer {
            req.extensions_mut().insert(peer);
        }
        req.extensions_mut().insert(listener);
        let ctx = Rc::clone(&service_ctx);
        let watch = Rc::clone(&service_watch);
        let conflicting_length = watch.request_started();
        // Boxed: hyper keeps room for one service future per connection, and the
        // handler's is large; this way it is only allocated while a request runs.
        let req = req.map(|body| RequestBody::new(body, Rc::clone(&watch)));
        Box::pin(async move {
            let keep_alive = request_keeps_alive(req.version(), req.headers());
            let answer = if conflicting_length {
                refuse_conflicting_length(&ctx)
            } else {
                handle(&ctx, req).await
            };
            if !keep_alive || connection_has(answer.headers(), "close") {
                watch.set_closing();
            }
            watch.request_finished();
            Ok::<_, Infallible>(answer)
        })
    });
    let io = WatchedStream::new(HyperStream(stream), Rc::clone(watch), prefix);
    let mut conn = Box::new(
        http1::Builder::new()
            .keep_alive(true)
            .max_buf_size(MAX_HEAD_BYTES)
            .max_header_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS)
            // A client may shut its sending side once its request is out and still
            // wait for the answer (RFC 9112 section 9.6 allows it).
            .half_close(true)
            .serve_connection(io, service),
    );
    let mut stop = pin!(ctx.stop.wait());
    let mut silence: Option<Pin<Box<glommio::timer::Timer>>> = None;
    let mut shutting = false;
    let mut deadline: Option<(Instant, Pin<Box<glommio::timer::Timer>>)> = None;

    let ended = poll_fn(|cx| loop {
        if !shutting && silence.is_none() && stop.as_mut().poll(cx).is_ready() {
            silence = Some(Box::pin(glommio::timer::Timer::new(FIRST_REQUEST_WAIT)));
        }
        if let (false, Some(timer)) = (shutting, silence.as_mut()) {
            if watch.heard() || timer.as_mut().poll(cx).is_ready() {
                shutting = true;
                Pin::new(&mut *conn).graceful_shutdown();
            }
        }
        let heard_before = watch.heard();
        match Pin::new(&mut *conn).poll(cx) {
            Poll::Ready(result) => return Poll::Ready(Ended::Hyper(result)),
            // The first bytes came in during this poll, after the stop: shut down now.
            Poll::Pending if silence.is_some() && !shutting && watch.heard() && !heard_before => {
                continue
            }
            Poll::Pending => {}
        }

        let phase = watch.phase();
        // hyper answered, wrote all of it and waits for the next request: park. Not
        // while the request's body is partly unread: hyper drains it or closes, and a
        // new hyper would read the rest as a request.
        let idle = matches!(phase, Phase::Idle { .. });
        let settled = !watch.closing() && !watch.write_blocked() && !watch.body_unread();
        if idle && !shutting && settled {
            return Poll::Ready(Ended::Idle);
        }
        let due = match phase {
            Phase::Head { since } => since + header_timeout,
            Phase::Idle { since } => since + idle_timeout,
            Phase::Serving => {
                deadline = None;
                return Poll::Pending;
            }
        };
        if deadline.as_ref().is_none_or(|(at, _)| *at != due) {
            let wait = due.saturating_duration_since(Instant::now());
            deadline = Some((due, Box::pin(glommio::timer::Timer::new(wait))));
        }
        if let Some((_, timer)) = deadline.as_mut() {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ended::TimedOut(phase));
            }
        }
        return Poll::Pending;
    })
    .await;

    let stats = &ctx.metrics.connections;
    match ended {
        Ended::Idle => {
            let parts = conn.into_parts();
            let (io, unread) = parts.io.into_parts();
            // What hyper read and did not parse comes before what it never took (it
            // yields after 16 pipelined requests with more buffered). Copied out: the
            // buffer hyper hands back keeps its whole 8 KiB allocation alive, even when
            // empty (it almost always is).
            let rest = if unread.is_empty() {
                Bytes::copy_from_slice(&parts.read_buf)
            } else {
                Bytes::from([&parts.read_buf[..], &unread[..]].concat())
            };
            return Some((io.0, rest));
        }
        Ended::Hyper(Ok(())) if watch.refused_framing() => {
            // The client may still be sending the body and whatever it smuggled behind.
            close_gently(conn.into_parts().io.into_inner().0).await;
        }
        Ended::Hyper(Ok(())) => {}
        Ended::Hyper(Err(err)) => {
            if let Some(status) = watch.replaced() {
                ConnectionStats::bump(&stats.malformed);
                debug!(shard = ctx.shard, status = status.as_u16(), error = %err,
                    "request head refused by the parser, answered with JSON");
            } else {
                debug!(shard = ctx.shard, error = %err, "connection ended with an error");
            }
            let stream = conn.into_parts().io.into_inner().0;
            close_gently(stream).await;
        }
        Ended::TimedOut(Phase::Head { .. }) => {
            ConnectionStats::bump(&stats.header_timeouts);
            debug!(
                shard = ctx.shard,
                timeout_ms = http.header_read_timeout_ms,
                "request head not received in time, answering 408"
            );
            // A client that does not read may still hold part of an earlier answer in
            // hyper's buffer: writing the 408 then would corrupt that answer.
            let blocked = watch.write_blocked();
            let stream = conn.into_parts().io.into_inner().0;
            if blocked {
                drop(stream);
            } else {
                let err = IngestError::HeaderTimeout {
                    timeout_ms: http.header_read_timeout_ms,
                };
                answer_and_close(stream, &canned_answer(&err, http.retry_after_secs)).await;
            }
        }
        Ended::TimedOut(_) => {
            ConnectionStats::bump(&stats.idle_timeouts);
            debug!(
                shard = ctx.shard,
                timeout_ms = http.idle_timeout_ms,
                "keep-alive connection idle too long, closing"
            );
        }
    }
    None
}

/// The answer to a request with both Content-Length and Transfer-Encoding: 400
/// `conflicting_length` with `Connection: close`, so hyper closes after it and whatever
/// follows on the connection is never read as a request (RFC 9112, section 6.3).
fn refuse_conflicting_length(ctx: &ShardContext) -> HttpResponse {
    ConnectionStats::bump(&ctx.metrics.connections.malformed);
    debug!(
        shard = ctx.shard,
        "content-length with transfer-encoding, answering 400"
    );
    let err = IngestError::ConflictingLength;
    let mut response =
        http::Response::new(http_body_util::Full::new(bytes::Bytes::from(err.body())));
    *response.status_mut() = err.status_and_code().0;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    response
}

/// Answers a connection over the shard's cap with 503 `too_many_connections` and closes
/// it, without reading its request.
///
/// # Limitations
/// Refused connections are not counted against the cap while they are written to and
/// lingered on (at most [`REFUSAL_WRITE`] plus [`LINGER`]; a client that reads its answer
/// and closes ends it at once). A flood of new connections therefore still costs a file
/// descriptor each for up to 1.5 s; the open-file limit (`app/limits.rs`) is the bound.
pub(super) async fn refuse_connection(ctx: Rc<ShardContext>, stream: TcpStream) {
    let http = &ctx.shared.config.http;
    let err = IngestError::TooManyConnections {
        shard: ctx.shard,
        limit: http.max_connections_per_shard,
    };
    answer_and_close(stream, &canned_answer(&err, http.retry_after_secs)).await;
}

/// Writes a whole canned answer (bounded by [`REFUSAL_WRITE`]), then closes gently.
async fn answer_and_close(mut stream: TcpStream, answer: &[u8]) {
    let written = glommio::timer::timeout(REFUSAL_WRITE, async {
        stream.write_all(answer).await.map_err(Into::into)
    })
    .await;
    if let Err(err) = written {
        debug!(error = %err, "could not write a refusal; closing");
        return;
    }
    close_gently(stream).await;
}

/// Half-closes the connection, then reads and discards what the client still sends for
/// up to [`LINGER`] (or [`LINGER_BYTES`]), so our last answer is not destroyed by a
/// reset (see [`LINGER`]).
async fn close_gently(mut stream: TcpStream) {
    // hyper may have half-closed it already; a second shutdown changes nothing.
    let _ = stream.shutdown(Shutdown::Write).await;
    // On the heap: this future sits inside every connection's task, lingering or not.
    let mut sink = vec![0u8; 4096];
    let _ = glommio::timer::timeout(LINGER, async {
        let mut discarded = 0;
        while discarded < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => discarded += n,
            }
        }
        Ok(())
    })
    .await;
}
