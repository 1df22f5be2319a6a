//! A shard's listening socket, and how it stops without resetting connections the
//! kernel already accepted on its behalf (see [`ShardListener`]).

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures_lite::future::{self, Future};
use glommio::net::{TcpListener, TcpStream};
use tracing::warn;

/// A shard's listening socket: glommio's listener, which accepts, and a second handle on
/// the same socket for what glommio does not expose (a socket filter, `shutdown`).
///
/// # Why stopping takes three steps
/// Closing a listening socket resets every connection in its accept queue. The kernel
/// completed those handshakes and the clients may already have sent their requests, so
/// they would get a reset instead of an answer. At stop the shard therefore:
/// 1. attaches [`DROP_NEW_CONNECTIONS`], a classic BPF filter dropping pure SYNs, so no
///    new connection starts. A new client's SYN goes unanswered; it retransmits after
///    about a second and then gets ECONNREFUSED (or another process's answer), never a
///    reset after connecting. Handshakes already half done still complete, because their
///    final ACK passes the filter, and land in the queue.
/// 2. accepts until the queue has stayed empty for [`HANDSHAKE_SETTLE`], serving each
///    connection like any other: it sees the stop, so it gets one answer (202, or 503
///    `shutting_down` for a request that had not started) and is closed.
/// 3. shuts the socket down for reading. On a listening socket that stops it listening:
///    it leaves the SO_REUSEPORT group (later SYNs get ECONNREFUSED at once) and the
///    accept still waiting in io_uring ends with EINVAL. Only then is the socket closed.
///
/// Verified on Linux 6.18 with 5 clients that connected and sent a request into a
/// listener nobody accepted from: a close resets all 5; with the filter attached a new
/// client's connect stays unanswered, draining answers all 5, and after the close the
/// new client gets ECONNREFUSED (IPv4 and IPv6 alike). The test at the end of this file
/// (`server.rs`) keeps the drain honest, and shows the outstanding io_uring accept ending at step 3. A drop-everything filter also
/// drops the final ACK of handshakes in progress (tested with `TCP_DEFER_ACCEPT`, which
/// holds them half done): those clients believe they are connected and are reset later,
/// which is why the filter drops SYNs only. With it, the same 5 half-open clients were
/// accepted and answered.
///
/// The outstanding accept is never dropped while it may hold a connection (see
/// [`Acceptor`]), and the socket's own queue is never reset with connections in it,
/// except as the limitations below say.
///
/// # Limitations
/// - A client whose final handshake ACK reaches the socket after its queue has already
///   stayed empty for [`HANDSHAKE_SETTLE`] (a round trip longer than 100 ms, or a
///   SYN-ACK lost and sent again after a second) is reset by step 3. Clients behind a
///   load balancer that stops routing on `/readyz` 503 do not meet this.
/// - If the filter cannot be attached, step 2 is skipped and the queue is reset as a plain
///   close would (logged at warn).
pub(super) struct ShardListener {
    pub(super) listener: TcpListener,
    /// The same socket (a `dup` of its descriptor). Dropping only one of the two handles
    /// does not close the socket; [`ShardListener::shut`] stops it listening explicitly.
    control: socket2::Socket,
}

/// How long the accept queue must stay empty, once SYNs are dropped, before the listener
/// is shut: a round trip for handshakes that were half done when the filter went on.
/// Loopback and LAN round trips are well under a millisecond; the wait adds 100 ms to
/// every shutdown (the shards stop in parallel).
pub(super) const HANDSHAKE_SETTLE: Duration = Duration::from_millis(100);

/// How long the outstanding accept may take to end after the socket was shut. It ends at
/// once (EINVAL); the bound only keeps a kernel that behaves otherwise from holding the
/// shutdown.
const ACCEPT_WIND_DOWN: Duration = Duration::from_secs(1);

/// First pause after a failed accept; doubled up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Classic BPF socket filter, run on every segment for the listening socket with the TCP
/// header at offset 0: a segment with SYN set and ACK clear (a new connection) is dropped
/// (return 0 bytes), anything else is kept whole. Children accepted later inherit it,
/// which is harmless: an established connection never needs a bare SYN.
const DROP_NEW_CONNECTIONS: [socket2::SockFilter; 5] = {
    use socket2::SockFilter;
    const LOAD_BYTE: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
    const AND: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
    const JUMP_IF_EQUAL: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RETURN: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const TCP_FLAGS_OFFSET: u32 = 13;
    const SYN: u32 = 0x02;
    const ACK: u32 = 0x10;
    [
        SockFilter::new(LOAD_BYTE, 0, 0, TCP_FLAGS_OFFSET),
        SockFilter::new(AND, 0, 0, SYN | ACK),
        // Only SYN: fall through to "drop"; otherwise skip it.
        SockFilter::new(JUMP_IF_EQUAL, 0, 1, SYN),
        SockFilter::new(RETURN, 0, 0, 0),
        SockFilter::new(RETURN, 0, 0, u32::MAX),
    ]
};

impl ShardListener {
    /// Binds one shard's listener: SO_REUSEPORT so every shard binds the same address and
    /// the kernel spreads connections, SO_REUSEADDR so a restart does not wait for the old
    /// process's TIME_WAIT connections to expire. Must run on the shard's executor.
    pub(super) fn bind(addr: std::net::SocketAddr, backlog: i32) -> std::io::Result<Self> {
        use std::os::fd::{FromRawFd, IntoRawFd};

        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(backlog)?;
        let control = socket.try_clone()?;
        let fd = socket.into_raw_fd();
        // SAFETY: `fd` is a bound, listening TCP socket that nothing else owns (`control`
        // is a separate descriptor); glommio takes ownership of it here, exactly once.
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        Ok(Self { listener, control })
    }

    /// Stops the listener in the three steps above, once its accept loop has ended;
    /// `serve` takes every connection accepted on the way. Returns how many it took.
    /// Accepting goes on until the queue has stayed empty for [`HANDSHAKE_SETTLE`] or
    /// `deadline` passed. The socket is closed when `self` is dropped.
    pub(super) async fn stop(
        &self,
        mut acceptor: Acceptor<'_>,
        deadline: Instant,
        serve: &mut dyn FnMut(TcpStream),
    ) -> usize {
        let shard = acceptor.shard;
        let drained = match self.control.attach_filter(&DROP_NEW_CONNECTIONS) {
            Ok(()) => drain_accept_queue(&mut acceptor, deadline, serve).await,
            Err(err) => {
                warn!(shard, error = %err,
                    "cannot filter new connections; connections queued now will be reset");
                0
            }
        };
        drained + self.shut(acceptor, serve).await
    }

    /// Step 3: stops the socket listening and lets the outstanding accept end by itself
    /// (EINVAL), serving a connection it took just before. Returns how many it took.
    async fn shut(&self, mut acceptor: Acceptor<'_>, serve: &mut dyn FnMut(TcpStream)) -> usize {
        let shard = acceptor.shard;
        if let Err(err) = self.control.shutdown(std::net::Shutdown::Read) {
            warn!(shard, error = %err,
                "cannot shut the listener; closing it, which resets what it still queues");
            return 0;
        }
        let mut late = 0;
        loop {
            let next = future::or(async { Some(acceptor.next().await) }, async {
                glommio::timer::sleep(ACCEPT_WIND_DOWN).await;
                None
            })
            .await;
            match next {
                Some(Ok(stream)) => {
                    late += 1;
                    serve(stream);
                }
                // The expected end: the socket no longer listens.
                Some(Err(_)) => return late,
                None => {
                    warn!(
                        shard,
                        waited_ms = ACCEPT_WIND_DOWN.as_millis() as u64,
                        "accept still pending on a shut listener; cancelling it"
                    );
                    return late;
                }
            }
        }
    }
}

/// Step 2: accepts what the kernel queued until the queue has stayed empty for
/// [`HANDSHAKE_SETTLE`] or `deadline` passed. Returns how many connections it took.
async fn drain_accept_queue(
    acceptor: &mut Acceptor<'_>,
    deadline: Instant,
    serve: &mut dyn FnMut(TcpStream),
) -> usize {
    let mut drained = 0;
    loop {
        let quiet = HANDSHAKE_SETTLE.min(deadline.saturating_duration_since(Instant::now()));
        if quiet.is_zero() {
            return drained;
        }
        let next = future::or(async { Some(acceptor.next_connection().await) }, async {
            glommio::timer::sleep(quiet).await;
            None
        })
        .await;
        match next {
            None => return drained,
            Some(Some(stream)) => {
                drained += 1;
                serve(stream);
            }
            Some(None) => {}
        }
    }
}

/// The one accept in progress on a listener, kept across `select`s.
///
/// glommio cancels a dropped accept, but if the kernel already accepted a connection for
/// it, the descriptor is lost with the cancelled operation: that client would wait for an
/// answer that never comes. So the accept lives here, and [`Acceptor::next`] can be
/// abandoned (when the stop wins a race) without dropping it.
pub(super) struct Acceptor<'a> {
    shard: usize,
    listener: &'a TcpListener,
    pending: Pin<Box<dyn Future<Output = glommio::Result<TcpStream, ()>> + 'a>>,
    /// Pause after the next failed accept.
    backoff: Duration,
}

impl<'a> Acceptor<'a> {
    pub(super) fn new(shard: usize, listener: &'a TcpListener) -> Self {
        Self {
            shard,
            listener,
            pending: Box::pin(listener.accept()),
            backoff: ACCEPT_BACKOFF_MIN,
        }
    }

    /// The next accept's result. Dropping this future keeps the accept in progress for
    /// the next call.
    async fn next(&mut self) -> glommio::Result<TcpStream, ()> {
        let result = self.pending.as_mut().await;
        self.pending = Box::pin(self.listener.accept());
        result
    }

    /// The next connection, or `None` after a failed accept (typically EMFILE), logged
    /// and followed by a pause that doubles up to [`ACCEPT_BACKOFF_MAX`] instead of
    /// spinning.
    pub(super) async fn next_connection(&mut self) -> Option<TcpStream> {
        match self.next().await {
            Ok(stream) => {
                self.backoff = ACCEPT_BACKOFF_MIN;
                Some(stream)
            }
            Err(err) => {
                warn!(shard = self.shard, error = %err,
                    retry_in_ms = self.backoff.as_millis() as u64, "accept failed");
                glommio::timer::sleep(self.backoff).await;
                self.backoff = (self.backoff * 2).min(ACCEPT_BACKOFF_MAX);
                None
            }
        }
    }
}
