//! Starts the shards: one pinned glommio executor per shard, each binding the same
//! address with SO_REUSEPORT, accepting connections and serving them with hyper.
//!
//! Shutdown, per shard: the accept loop sees the process-wide `stopping` flag, stops
//! accepting, asks every connection to finish its current request and close
//! (hyper's graceful shutdown), then waits for the connections up to a grace period.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::poll_fn;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_lite::future::{self, Future};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use tracing::{debug, info, warn};

use super::handler::handle;
use super::http_io::HyperStream;
use super::inflight::InFlight;
use super::state::{IngestShared, LocalStop, ShardContext};
use crate::metrics::shard::ShardMetrics;

/// How often an idle shard checks the process-wide stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

/// Why the shards could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot start executor for shard {shard}: {detail}")]
    Executor { shard: usize, detail: String },
    #[error("shard {shard} cannot bind {addr}")]
    Bind {
        shard: usize,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("shard {shard} stopped before reporting its listener")]
    Vanished { shard: usize },
}

/// Running shards.
pub struct Shards {
    handles: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl Shards {
    /// Waits for every shard to finish its shutdown.
    pub fn join(self) {
        for (shard, handle) in self.handles.into_iter().enumerate() {
            if let Err(err) = handle.join() {
                warn!(shard, error = %err, "shard ended with an error");
            }
        }
    }
}

/// Metrics slots for `count` shards, created before the shards so every shard can render
/// all of them.
pub fn shard_metrics(count: usize) -> Vec<Arc<ShardMetrics>> {
    (0..count).map(|i| Arc::new(ShardMetrics::new(i))).collect()
}

/// Starts one executor per entry of `shared.shard_metrics` and returns once every shard
/// is listening.
///
/// # Errors
/// An executor that cannot start (CPU missing, io_uring refused, memlock too low) or a
/// listener that cannot bind.
pub fn start_shards(shared: Arc<IngestShared>) -> Result<Shards, ServerError> {
    let http = shared.config.http.clone();
    refuse_taken_address(http.listen)?;
    let cpus = core_affinity::get_core_ids().map_or(1, |c| c.len()).max(1);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<usize, ServerError>>();
    let mut handles = Vec::new();

    for shard in 0..shared.shard_metrics.len() {
        let cpu = (http.first_core + shard) % cpus;
        let shared = Arc::clone(&shared);
        let ready = ready_tx.clone();
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{shard}"))
            .io_memory(http.io_memory_bytes)
            .spawn(move || async move { run_shard(shard, cpu, shared, ready).await })
            .map_err(|err| ServerError::Executor {
                shard,
                detail: err.to_string(),
            })?;
        handles.push(handle);
    }
    drop(ready_tx);

    for _ in 0..handles.len() {
        match ready_rx.recv() {
            Ok(Ok(shard)) => debug!(shard, "shard listening"),
            Ok(Err(err)) => return Err(err),
            Err(_) => {
                return Err(ServerError::Vanished {
                    shard: handles.len(),
                })
            }
        }
    }
    info!(shards = handles.len(), listen = %http.listen, "ingest listening");
    Ok(Shards { handles })
}

/// Fails if another process already listens on `addr`. The shards bind with
/// SO_REUSEPORT, which would otherwise let a second fanfinity (or a stale one) silently
/// share the port and take part of the traffic. A bind without SO_REUSEPORT is refused
/// by the kernel whenever a socket listens on the address (std's SO_REUSEADDR only lets
/// it past TIME_WAIT leftovers).
fn refuse_taken_address(addr: std::net::SocketAddr) -> Result<(), ServerError> {
    std::net::TcpListener::bind(addr)
        .map(drop)
        .map_err(|source| ServerError::Bind {
            shard: 0,
            addr: addr.to_string(),
            source,
        })
}

/// Binds one shard's listener: SO_REUSEPORT so every shard binds the same address and
/// the kernel spreads connections, SO_REUSEADDR so a restart does not wait for the old
/// process's TIME_WAIT connections to expire. Must run on the shard's executor.
fn bind_shard_listener(addr: std::net::SocketAddr, backlog: i32) -> std::io::Result<TcpListener> {
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
    let fd = socket.into_raw_fd();
    // SAFETY: `fd` is a bound, listening TCP socket that nothing else owns; glommio takes
    // ownership of it here, exactly once.
    Ok(unsafe { TcpListener::from_raw_fd(fd) })
}

async fn run_shard(
    shard: usize,
    cpu: usize,
    shared: Arc<IngestShared>,
    ready: mpsc::Sender<Result<usize, ServerError>>,
) {
    let addr = shared.config.http.listen;
    let listener = match bind_shard_listener(addr, shared.config.http.listen_backlog) {
        Ok(listener) => listener,
        Err(source) => {
            let _ = ready.send(Err(ServerError::Bind {
                shard,
                addr: addr.to_string(),
                source,
            }));
            return;
        }
    };
    let _ = ready.send(Ok(shard));
    info!(shard, cpu, listen = %addr, "shard started");

    let inflight = InFlight::new(
        shared.config.http.max_inflight_requests,
        shared.config.http.max_inflight_bytes,
    );
    let ctx = Rc::new(ShardContext {
        shard,
        metrics: Arc::clone(&shared.shard_metrics[shard]),
        shared,
        stop: Rc::new(LocalStop::default()),
        inflight,
    });
    let connections = Rc::new(Cell::new(0usize));

    accept_loop(&ctx, &listener, &connections).await;

    ctx.stop.fire();
    drop(listener);
    let grace = Duration::from_millis(ctx.shared.config.http.shutdown_grace_ms);
    let deadline = Instant::now() + grace;
    while connections.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    if connections.get() > 0 {
        warn!(
            shard,
            open = connections.get(),
            grace_ms = grace.as_millis() as u64,
            "closing connections that did not finish in time"
        );
    } else {
        info!(shard, "shard drained");
    }
}

async fn accept_loop(
    ctx: &Rc<ShardContext>,
    listener: &TcpListener,
    connections: &Rc<Cell<usize>>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            while !ctx.shared.stopping.load(Ordering::Relaxed) {
                glommio::timer::sleep(STOP_POLL).await;
            }
            None
        })
        .await;
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                backoff = Duration::from_millis(5);
                let ctx = Rc::clone(ctx);
                let guard = ConnectionGuard::new(connections);
                glommio::spawn_local(async move {
                    serve_connection(ctx, stream).await;
                    drop(guard);
                })
                .detach();
            }
            Some(Err(err)) => {
                // Typically EMFILE: back off instead of spinning, doubling up to 1 s.
                warn!(shard = ctx.shard, error = %err, retry_in_ms = backoff.as_millis() as u64,
                    "accept failed");
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Counts a live connection for the shutdown drain.
struct ConnectionGuard {
    count: Rc<Cell<usize>>,
}

impl ConnectionGuard {
    fn new(count: &Rc<Cell<usize>>) -> Self {
        count.set(count.get() + 1);
        Self {
            count: Rc::clone(count),
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.count.set(self.count.get().saturating_sub(1));
    }
}

async fn serve_connection(ctx: Rc<ShardContext>, stream: TcpStream) {
    if let Err(err) = stream.set_nodelay(true) {
        debug!(shard = ctx.shard, error = %err, "cannot set TCP_NODELAY");
    }
    let service_ctx = Rc::clone(&ctx);
    let service = service_fn(move |req| {
        let ctx = Rc::clone(&service_ctx);
        async move { Ok::<_, Infallible>(handle(&ctx, req).await) }
    });
    let conn = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(HyperStream(stream), service);
    let mut conn = pin!(conn);
    let mut stop = pin!(ctx.stop.wait());
    let mut stopping = false;

    // Drive the connection; when the shard stops, let the current request finish and
    // close instead of waiting for the client to go away.
    let result = poll_fn(|cx| {
        if !stopping && stop.as_mut().poll(cx).is_ready() {
            stopping = true;
            conn.as_mut().graceful_shutdown();
        }
        match conn.as_mut().poll(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    if let Err(err) = result {
        debug!(shard = ctx.shard, error = %err, "connection ended with an error");
    }
}
