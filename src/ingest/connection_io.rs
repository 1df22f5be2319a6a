//! A connection's bytes as hyper sees them, watched for what hyper does not report: where
//! the connection is in its request cycle (for the header and idle timeouts), whether a
//! write is stuck on a client that does not read, whether a request head carries both
//! Content-Length and Transfer-Encoding, and hyper's own parse-error answers, which are
//! replaced by fanfinity's JSON ones.
//!
//! It owns no policy: `connection.rs` decides what to do with what it sees, and
//! docs/connections.md says why.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::StatusCode;

use super::error::IngestError;
use super::http_io::HyperStream;

/// Where a connection is in its request cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Waiting for a request head, since the accept or since its first byte arrived.
    Head { since: Instant },
    /// A request is with the handler (its body included).
    Serving,
    /// Between requests on a keep-alive connection, since the last answer was ready.
    Idle { since: Instant },
}

/// What the connection layer learns from the I/O, shared with the serving task.
#[derive(Debug)]
pub(super) struct ConnWatch {
    phase: Cell<Phase>,
    /// Whether any read completed (bytes or EOF), which hyper does not tell.
    heard: Cell<bool>,
    /// The last write attempt could not go out: the client is not reading.
    write_blocked: Cell<bool>,
    /// Status of a hyper parse-error answer replaced by a JSON one.
    replaced: Cell<Option<StatusCode>>,
    /// The framing headers of the request head being read (see [`HeadScan`]).
    scan: Cell<HeadScan>,
    /// The last head read in full had both Content-Length and Transfer-Encoding; taken
    /// by the next request the handler gets.
    conflicting_length: Cell<Option<bool>>,
    /// A request on this connection was refused for its framing: close it gently.
    refused_framing: Cell<bool>,
    /// The last exchange ends the connection (the client asked for `Connection: close`
    /// or HTTP/1.0, or the answer says `Connection: close`), so hyper must be left to
    /// close it rather than the connection parked (`connection.rs`).
    closing: Cell<bool>,
    /// The current request's body has bytes the handler did not read (yet); see
    /// `request_body.rs`.
    body_unread: Cell<bool>,
}

/// Which framing headers a request head carries, read as its bytes arrive: hyper drops
/// `Content-Length` when `Transfer-Encoding` is present, so the handler cannot see both.
/// A line-start matcher with a few bytes of state and no copy of the head.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct HeadScan {
    /// Off once the head's blank line was seen, until the next head starts.
    active: bool,
    /// Lines completed in this head (leading blank lines not counted, RFC 9112 §2.2).
    lines: usize,
    /// Position in the current line (capped), 0 at a line start.
    column: usize,
    /// The current line has held nothing but `\r` so far.
    blank: bool,
    /// Still matching `content-length:` / `transfer-encoding:` from the line start.
    maybe_cl: bool,
    maybe_te: bool,
    saw_cl: bool,
    saw_te: bool,
}

const CONTENT_LENGTH: &[u8] = b"content-length:";
const TRANSFER_ENCODING: &[u8] = b"transfer-encoding:";

impl HeadScan {
    fn start() -> Self {
        Self {
            active: true,
            ..Self::default()
        }
        .new_line()
    }

    fn new_line(self) -> Self {
        Self {
            column: 0,
            blank: true,
            maybe_cl: true,
            maybe_te: true,
            ..self
        }
    }

    /// Feeds bytes; `Some(conflict)` when the head's blank line is among them.
    fn feed(&mut self, bytes: &[u8]) -> Option<bool> {
        for &byte in bytes {
            if !self.active {
                return None;
            }
            if byte == b'\n' {
                if self.blank && self.lines > 0 {
                    self.active = false;
                    return Some(self.saw_cl && self.saw_te);
                }
                if !self.blank {
                    self.lines += 1;
                }
                *self = self.new_line();
                continue;
            }
            let lower = byte.to_ascii_lowercase();
            self.blank &= byte == b'\r';
            self.maybe_cl &= CONTENT_LENGTH.get(self.column) == Some(&lower);
            self.maybe_te &= TRANSFER_ENCODING.get(self.column) == Some(&lower);
            self.column = (self.column + 1).min(TRANSFER_ENCODING.len() + 1);
            self.saw_cl |= self.maybe_cl && self.column == CONTENT_LENGTH.len();
            self.saw_te |= self.maybe_te && self.column == TRANSFER_ENCODING.len();
        }
        None
    }
}

impl ConnWatch {
    /// A freshly accepted connection, which owes its first request head.
    pub(super) fn new(accepted: Instant) -> Rc<Self> {
        Rc::new(Self {
            phase: Cell::new(Phase::Head { since: accepted }),
            heard: Cell::new(false),
            write_blocked: Cell::new(false),
            replaced: Cell::new(None),
            scan: Cell::new(HeadScan::start()),
            conflicting_length: Cell::new(None),
            refused_framing: Cell::new(false),
            closing: Cell::new(false),
            body_unread: Cell::new(false),
        })
    }

    pub(super) fn phase(&self) -> Phase {
        self.phase.get()
    }

    pub(super) fn heard(&self) -> bool {
        self.heard.get()
    }

    pub(super) fn write_blocked(&self) -> bool {
        self.write_blocked.get()
    }

    pub(super) fn replaced(&self) -> Option<StatusCode> {
        self.replaced.get()
    }

    /// hyper parsed a request head and called the handler. Returns whether that head had
    /// both Content-Length and Transfer-Encoding (false when its start was not seen: a
    /// head pipelined behind another is not scanned, and hyper still closes after it).
    pub(super) fn request_started(&self) -> bool {
        self.phase.set(Phase::Serving);
        self.scan.set(HeadScan::default());
        let conflict = self.conflicting_length.take().unwrap_or(false);
        self.refused_framing
            .set(self.refused_framing.get() || conflict);
        conflict
    }

    /// Whether a request was refused for its framing (the answer closes the connection).
    pub(super) fn refused_framing(&self) -> bool {
        self.refused_framing.get()
    }

    /// Whether the current request's body still has bytes nobody read.
    pub(super) fn body_unread(&self) -> bool {
        self.body_unread.get()
    }

    pub(super) fn set_body_unread(&self, unread: bool) {
        self.body_unread.set(unread);
    }

    /// The exchange in progress ends the connection.
    pub(super) fn set_closing(&self) {
        self.closing.set(true);
    }

    /// Whether hyper will close the connection after the current exchange.
    pub(super) fn closing(&self) -> bool {
        self.closing.get()
    }

    /// The handler's answer is ready; the connection idles until the next request.
    pub(super) fn request_finished(&self) {
        self.phase.set(Phase::Idle {
            since: Instant::now(),
        });
    }

    fn bytes_arrived(&self, bytes: &[u8]) {
        if let Phase::Idle { .. } = self.phase.get() {
            self.phase.set(Phase::Head {
                since: Instant::now(),
            });
            self.scan.set(HeadScan::start());
        }
        let mut scan = self.scan.get();
        if let Some(conflict) = scan.feed(bytes) {
            self.conflicting_length.set(Some(conflict));
        }
        self.scan.set(scan);
    }
}

/// The JSON answer a connection-level refusal gets, as raw HTTP/1.1 bytes ending in
/// `Connection: close`: written where no handler runs (hyper's parse errors, timeouts,
/// the connection cap).
pub(super) fn canned_answer(err: &IngestError, retry_after_secs: u32) -> Vec<u8> {
    let (status, _) = err.status_and_code();
    let body = err.body();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    if err.is_retryable() {
        head.push_str(&format!("retry-after: {retry_after_secs}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// Recognises the answer hyper writes by itself when it cannot parse a request head
/// (`on_parse_error` in hyper's `proto/h1/conn.rs`): a 400, 414 or 431 head with
/// `content-length: 0` at the start of a write. The handler never answers those statuses
/// without a JSON body, and a body never starts with `HTTP/1.`, so nothing else matches.
fn hyper_parse_error_answer(buf: &[u8]) -> Option<IngestError> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = &buf[..head_end + 2];
    let rest = head
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| head.strip_prefix(b"HTTP/1.0 "))?;
    let bodiless = head
        .windows(b"\r\ncontent-length: 0\r\n".len())
        .any(|w| w.eq_ignore_ascii_case(b"\r\ncontent-length: 0\r\n"));
    if !bodiless {
        return None;
    }
    match rest.get(..4)? {
        b"400 " => Some(IngestError::MalformedRequest),
        b"414 " => Some(IngestError::UriTooLong),
        b"431 " => Some(IngestError::HeadersTooLarge),
        _ => None,
    }
}

/// A shard's connection as hyper reads and writes it, reporting to a [`ConnWatch`].
pub(super) struct WatchedStream {
    inner: HyperStream,
    watch: Rc<ConnWatch>,
    /// The JSON answer standing in for hyper's bare one, and how much of it went out.
    replacement: Option<(Vec<u8>, usize)>,
    /// Bytes read from the socket before this hyper connection existed (the byte that
    /// woke a parked connection, or what an earlier one left unparsed), served first.
    prefix: Bytes,
}

impl WatchedStream {
    /// Wraps a socket whose next bytes are `prefix`, then what the socket holds.
    pub(super) fn new(inner: HyperStream, watch: Rc<ConnWatch>, prefix: Bytes) -> Self {
        Self {
            inner,
            watch,
            replacement: None,
            prefix,
        }
    }

    /// Gives the socket back (after hyper let go of it).
    pub(super) fn into_inner(self) -> HyperStream {
        self.inner
    }

    /// Gives the socket back with the bytes of the prefix hyper has not taken yet.
    pub(super) fn into_parts(self) -> (HyperStream, Bytes) {
        (self.inner, self.prefix)
    }

    /// Writes what is left of the replacement answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        use hyper::rt::Write;
        while let Some((bytes, sent)) = self.replacement.as_mut() {
            if *sent >= bytes.len() {
                return Poll::Ready(Ok(()));
            }
            let pending = &bytes[*sent..];
            match Pin::new(&mut self.inner).poll_write(cx, pending) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *sent += n,
                Poll::Ready(Err(err)) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl hyper::rt::Read for WatchedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let watch = &this.watch;
        if !this.prefix.is_empty() {
            let taken = this.prefix.split_to(this.prefix.len().min(buf.remaining()));
            buf.put_slice(&taken);
            watch.heard.set(true);
            watch.bytes_arrived(&taken);
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_read_seen(cx, buf, |bytes| {
            watch.heard.set(true);
            if !bytes.is_empty() {
                watch.bytes_arrived(bytes);
            }
        })
    }
}

impl hyper::rt::Write for WatchedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.replacement.is_some() {
            // hyper closes after its parse-error answer; anything more is swallowed too.
            return Poll::Ready(Ok(buf.len()));
        }
        if let Some(err) = hyper_parse_error_answer(buf) {
            self.watch.replaced.set(Some(err.status_and_code().0));
            // No Retry-After: none of these answers is retryable.
            self.replacement = Some((canned_answer(&err, 0), 0));
            return match self.poll_replacement(cx) {
                Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
                _ => Poll::Ready(Ok(buf.len())),
            };
        }
        let written = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch.write_blocked.set(written.is_pending());
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_replacement(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_only_hyper_bodiless_parse_error_answers() {
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\n\
            content-length: 0\r\ndate: Fri, 04 Dec 2026 19:00:00 GMT\r\n\r\n";
        assert!(matches!(
            hyper_parse_error_answer(hyper_431),
            Some(IngestError::HeadersTooLarge)
        ));
        let ours = canned_answer(&IngestError::MalformedRequest, 1);
        assert!(hyper_parse_error_answer(&ours).is_none());
        let json_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 20\r\n\r\n";
        assert!(hyper_parse_error_answer(json_400).is_none());
    }

    fn scan(chunks: &[&[u8]]) -> Option<bool> {
        let mut scan = HeadScan::start();
        chunks.iter().find_map(|chunk| scan.feed(chunk))
    }

    #[test]
    fn head_scan_finds_both_framings_at_line_starts_only() {
        let both = b"POST / HTTP/1.1\r\ncontent-length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0";
        assert_eq!(scan(&[both]), Some(true));
        let trickled: Vec<&[u8]> = both.chunks(1).collect();
        assert_eq!(scan(&trickled), Some(true));
        let te_only = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\
            X-Note: content-length: 3\r\nContent-Lengthy: 3\r\n\r\n";
        assert_eq!(scan(&[te_only]), Some(false));
        let leading_blank = b"\r\nGET / HTTP/1.1\r\nContent-Length: 0\r\n";
        assert_eq!(
            scan(&[leading_blank]),
            None,
            "not ended by the leading blank line"
        );
    }

    #[test]
    fn canned_answer_is_json_and_closes() {
        let err = IngestError::TooManyConnections { shard: 0, limit: 1 };
        let text = String::from_utf8(canned_answer(&err, 2)).expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(text.contains("connection: close\r\n"));
        assert!(text.contains("retry-after: 2\r\n"));
        assert!(text.ends_with(
            r#""error":"too_many_connections","message":"shard 0 already serves 1 connections"}"#
        ));
    }
}
