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

use futures_lite::future::Future;
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use tracing::debug;

use super::connection_io::{canned_answer, ConnWatch, Phase, WatchedStream};
use super::error::IngestError;
use super::handler::{handle, HttpResponse};
use super::http_io::HyperStream;
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

/// Why the serving loop ended.
enum Ended {
    /// hyper finished: the client closed, or a `Connection: close` answer was sent.
    Hyper(hyper::Result<()>),
    /// The phase's deadline passed: header or idle timeout.
    TimedOut(Phase),
}

/// Serves one connection with hyper until it closes.
///
/// When the shard stops, the connection finishes its current request and closes (hyper's
/// graceful shutdown) instead of waiting for the client to go away. Hyper closes a
/// connection at once if it has not read a byte yet, even when the client's request is
/// already in the socket; so a connection still silent at the stop (typically one just
/// accepted, or drained from the accept queue) gets up to [`FIRST_REQUEST_WAIT`] for its
/// first bytes and is then served its one request like any other.
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
    let http = &ctx.shared.config.http;
    let header_timeout = Duration::from_millis(http.header_read_timeout_ms);
    let idle_timeout = Duration::from_millis(http.idle_timeout_ms);
    let watch = ConnWatch::new(Instant::now());

    let service_ctx = Rc::clone(&ctx);
    let service_watch = Rc::clone(&watch);
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
        async move {
            let answer = if conflicting_length {
                refuse_conflicting_length(&ctx)
            } else {
                handle(&ctx, req).await
            };
            watch.request_finished();
            Ok::<_, Infallible>(answer)
        }
    });
    let io = WatchedStream::new(HyperStream(stream), Rc::clone(&watch));
    let mut conn = http1::Builder::new()
        .keep_alive(true)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_header_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .serve_connection(io, service);

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
                Pin::new(&mut conn).graceful_shutdown();
            }
        }
        let heard_before = watch.heard();
        match Pin::new(&mut conn).poll(cx) {
            Poll::Ready(result) => return Poll::Ready(Ended::Hyper(result)),
            // The first bytes came in during this poll, after the stop: shut down now.
            Poll::Pending if silence.is_some() && !shutting && watch.heard() && !heard_before => {
                continue
            }
            Poll::Pending => {}
        }

        let phase = watch.phase();
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
    let mut sink = [0u8; 4096];
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
