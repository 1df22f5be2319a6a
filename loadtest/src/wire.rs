//! A bare HTTP/1.1 keep-alive connection for the open-model profiles.
//!
//! Unlike `client::Connection` (hyper), an idle `WireConnection` is a socket and an
//! instant, nothing more: no task, no buffers. That is what lets one process hold 50,000
//! connections in a few tens of MiB. A request is written in one `write_all` and the
//! answer read into a buffer that lives only while the request does.
//!
//! # Limitations
//! Only answers framed by `Content-Length` are read (fanfinity, ClickHouse and the mock
//! all send it on these routes); a chunked answer, or one without a length, is an
//! `io_error` and the connection is dropped. Neither pipelining nor 1xx answers are
//! supported, and none is needed.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::client::{parse_retry_after, Answer, SendError};

/// How long a TCP connect may take; loopback connects in microseconds, so a slow one means
/// the server's accept queue is full.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest answer head read; fanfinity's are a few hundred bytes.
const MAX_HEAD_BYTES: usize = 16 << 10;

/// Largest answer body read: an ack of 1,000 ids is about 40 KiB.
const MAX_BODY_BYTES: usize = 1 << 20;

/// First read buffer; big enough for an ack of one or a few ids in one read.
const FIRST_READ_BYTES: usize = 1024;

/// Headers parsed per answer.
const MAX_HEADERS: usize = 32;

/// One open keep-alive connection.
#[derive(Debug)]
pub struct WireConnection {
    stream: TcpStream,
    /// When the last request on it ended (or when it was opened).
    pub last_used: Instant,
}

/// Sets `IP_BIND_ADDRESS_NO_PORT`, so that binding a source address leaves the port to
/// `connect`, which only needs the whole 4-tuple to be unique.
///
/// Without it, `bind(ip, 0)` must find a port no other socket on `ip` holds, TIME_WAIT
/// leftovers included: right after a run of 18,000 connections that search took 51 s
/// for the next 18,000 instead of 3.6 s.
fn defer_port_choice(socket: &TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: the fd is open for the socket's lifetime; the option value is a c_int we
    // own, passed with its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a connection to `addr`, from `source` when given (port chosen at connect).
///
/// # Errors
/// `Connect` when the socket cannot be made, bound or connected, `Timeout` after
/// `CONNECT_TIMEOUT`.
pub async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
) -> Result<WireConnection, SendError> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(SendError::Connect)?;
    if let Some(ip) = source {
        defer_port_choice(&socket).map_err(SendError::Connect)?;
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(SendError::Connect)?;
    }
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| SendError::Timeout(CONNECT_TIMEOUT))?
        .map_err(SendError::Connect)?;
    stream.set_nodelay(true).map_err(SendError::Connect)?;
    Ok(WireConnection {
        stream,
        last_used: Instant::now(),
    })
}

/// The head of a request, with `Content-Length` for `body_len` bytes.
pub fn request_head(
    method: &str,
    path: &str,
    authority: &str,
    content_type: &str,
    api_key: Option<&str>,
    body_len: usize,
) -> Vec<u8> {
    let mut head = Vec::with_capacity(160 + path.len() + authority.len());
    head.extend_from_slice(method.as_bytes());
    head.push(b' ');
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    head.extend_from_slice(authority.as_bytes());
    head.extend_from_slice(b"\r\ncontent-type: ");
    head.extend_from_slice(content_type.as_bytes());
    if let Some(key) = api_key {
        head.extend_from_slice(b"\r\nx-fanfinity-key: ");
        head.extend_from_slice(key.as_bytes());
    }
    head.extend_from_slice(b"\r\ncontent-length: ");
    head.extend_from_slice(body_len.to_string().as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    head
}

/// What the head of an answer says.
#[derive(Debug, PartialEq)]
struct AnswerHead {
    status: u16,
    head_len: usize,
    content_length: usize,
    retry_after: Option<Duration>,
    close: bool,
}

/// Parses an answer head from `buf`; `Ok(None)` while it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<AnswerHead>, SendError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let head_len = match response.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(SendError::Body(format!("bad answer head: {e}"))),
    };
    let status = response.code.unwrap_or(0);
    let mut content_length = None;
    let mut retry_after = None;
    let mut close = response.version == Some(0);
    for h in response.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("");
        if h.name.eq_ignore_ascii_case("content-length") {
            content_length = value.trim().parse::<usize>().ok();
        } else if h.name.eq_ignore_ascii_case("retry-after") {
            retry_after = parse_retry_after(value);
        } else if h.name.eq_ignore_ascii_case("connection") {
            close = value.trim().eq_ignore_ascii_case("close");
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(SendError::Body(format!(
                "transfer-encoding {value} is not supported by the open-model client"
            )));
        }
    }
    let content_length = match (content_length, status) {
        (Some(n), _) => n,
        // 204 and 304 carry no body by definition.
        (None, 204 | 304) => 0,
        (None, _) => return Err(SendError::Body("answer without content-length".into())),
    };
    if content_length > MAX_BODY_BYTES {
        return Err(SendError::Body(format!(
            "answer body of {content_length} bytes is over {MAX_BODY_BYTES}"
        )));
    }
    Ok(Some(AnswerHead {
        status,
        head_len,
        content_length,
        retry_after,
        close,
    }))
}

impl WireConnection {
    /// Writes `request` (head and body in one buffer) and reads the whole answer.
    /// Returns the answer and whether the connection may be used again.
    ///
    /// The caller bounds the time; a connection whose request failed or timed out must be
    /// dropped, since an answer may still be on its way.
    ///
    /// # Errors
    /// On I/O failure, a closed connection, or an answer this client cannot read.
    pub async fn exchange(&mut self, request: &[u8]) -> Result<(Answer, bool), SendError> {
        let io = |e: std::io::Error| SendError::Body(e.to_string());
        self.stream.write_all(request).await.map_err(io)?;

        let mut buf: Vec<u8> = Vec::with_capacity(FIRST_READ_BYTES);
        let head = loop {
            if buf.len() == buf.capacity() {
                buf.reserve(buf.capacity());
            }
            let n = self.stream.read_buf(&mut buf).await.map_err(io)?;
            if n == 0 {
                return Err(SendError::Body("connection closed before an answer".into()));
            }
            if let Some(head) = parse_head(&buf)? {
                break head;
            }
            if buf.len() > MAX_HEAD_BYTES {
                return Err(SendError::Body("answer head too large".into()));
            }
        };

        let total = head.head_len + head.content_length;
        if buf.len() < total {
            buf.reserve(total - buf.len());
            while buf.len() < total {
                let n = self.stream.read_buf(&mut buf).await.map_err(io)?;
                if n == 0 {
                    return Err(SendError::Body("connection closed inside an answer".into()));
                }
            }
        }
        // Bytes past the answer would mean a pipelining mix-up; don't reuse then.
        let reusable = !head.close && buf.len() == total;
        buf.truncate(total);
        let body = Bytes::from(buf).slice(head.head_len..);
        self.last_used = Instant::now();
        let status = hyper::StatusCode::from_u16(head.status)
            .map_err(|_| SendError::Body(format!("bad status {}", head.status)))?;
        let answer = Answer {
            status,
            retry_after: head.retry_after,
            body,
        };
        Ok((answer, reusable))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_request_head() {
        let head = request_head(
            "POST",
            "/v1/events",
            "127.0.0.1:8080",
            "application/json",
            Some("k"),
            12,
        );
        let text = String::from_utf8(head).expect("ascii");
        assert_eq!(
            text,
            "POST /v1/events HTTP/1.1\r\nhost: 127.0.0.1:8080\r\ncontent-type: application/json\r\n\
             x-fanfinity-key: k\r\ncontent-length: 12\r\n\r\n"
        );
    }

    #[test]
    fn parses_heads_with_length_retry_after_and_close() {
        let text = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 5\r\n\
                     Connection: close\r\n\r\nbusy!";
        let head = parse_head(text).expect("valid").expect("complete");
        assert_eq!(head.status, 503);
        assert_eq!(head.content_length, 5);
        assert_eq!(head.retry_after, Some(Duration::from_secs(1)));
        assert!(head.close);
        assert_eq!(&text[head.head_len..], b"busy!");

        assert!(parse_head(b"HTTP/1.1 202 Accepted\r\ncontent-len")
            .expect("valid")
            .is_none());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
    }
}
