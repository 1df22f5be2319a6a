//! Starts the shards: one pinned glommio executor per shard, each binding the same
//! address with SO_REUSEPORT, accepting connections and handing them to
//! `connection.rs` (or refusing them past `http.max_connections_per_shard`). Shard 0 also
//! serves the admin listener when `http.admin_listen` is set (`admin.rs`).
//!
//! Shutdown, per shard (the process-wide order is in `app/shutdown.rs`): the accept loop
//! sees the process-wide `stopping` flag and asks every connection to finish its current
//! request and close (hyper's graceful shutdown). The listener then stops taking new
//! connections without resetting the ones the kernel already queued, which are accepted
//! and answered too ([`super::listener::ShardListener`] says how and what it cannot
//! cover). Last, the shard waits for its connections up to `http.shutdown_grace_ms` and
//! logs what was still open.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::query::cache::AnswerCache;

use futures_lite::future;
use glommio::net::TcpStream;
use glommio::{LocalExecutorBuilder, Placement};
use tracing::{debug, info, warn};

use super::admin::serve_admin;
use super::balance::{self, Balancer};
use super::connection::{refuse_connection, serve_connection};
use super::cors::CorsPolicy;
use super::inflight::InFlight;
use super::listener::{Acceptor, ShardListener};
use super::rate_limit::RateLimits;
use super::state::{IngestShared, Listener, LocalStop, ShardContext};
use crate::auth::ShardKeys;
use crate::metrics::shard::{ConnectionStats, ShardMetrics};

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
    // Online CPUs, not this thread's affinity mask: see `online_cpus`.
    let cpus = crate::app::config::online_cpus();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<usize, ServerError>>();
    let mut handles = Vec::new();
    let mut links = balance::mesh(shared.shard_metrics.len()).into_iter();

    for shard in 0..shared.shard_metrics.len() {
        let cpu = (http.first_core + shard) % cpus;
        let shared = Arc::clone(&shared);
        let ready = ready_tx.clone();
        let links = links.next();
        let handle = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard-{shard}"))
            .io_memory(http.io_memory_bytes)
            .ring_depth(http.ring_depth)
            .preempt_timer(Duration::from_millis(http.preempt_timer_ms))
            .spawn(move || async move { run_shard(shard, cpu, shared, links, ready).await })
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
            Err(_) => return Err(executor_error(handles)),
        }
    }
    info!(shards = handles.len(), listen = %http.listen, "ingest listening");
    Ok(Shards { handles })
}

/// Why the shards ended before every one reported its listener: the first error glommio
/// returned from an executor thread (locked memory below its 512 KiB minimum, io_uring
/// refused, a CPU that is not online). Called once every shard has dropped its end of the
/// ready channel, so each thread has finished and the joins do not wait.
fn executor_error(handles: Vec<glommio::ExecutorJoinHandle<()>>) -> ServerError {
    let count = handles.len();
    for (shard, handle) in handles.into_iter().enumerate() {
        if let Err(err) = handle.join() {
            return ServerError::Executor {
                shard,
                detail: err.to_string(),
            };
        }
    }
    ServerError::Vanished { shard: count }
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

async fn run_shard(
    shard: usize,
    cpu: usize,
    shared: Arc<IngestShared>,
    links: Option<balance::Links>,
    ready: mpsc::Sender<Result<usize, ServerError>>,
) {
    let addr = shared.config.http.listen;
    let listener = match ShardListener::bind(addr, shared.config.http.listen_backlog) {
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
    let admin = match bind_admin(shard, &shared) {
        Ok(admin) => admin,
        Err(err) => {
            let _ = ready.send(Err(err));
            return;
        }
    };
    let _ = ready.send(Ok(shard));
    info!(shard, cpu, listen = %addr, "shard started");

    let inflight = InFlight::new(
        shared.config.http.max_inflight_requests,
        shared.config.http.max_inflight_bytes,
    );
    let shared_auth = Arc::clone(&shared.auth);
    let limits = RateLimits::new(&shared.config.limits, shard);
    let cors = CorsPolicy::from_config(&shared.config.http);
    let answers = AnswerCache::new(
        Duration::from_millis(shared.config.query.cache_ttl_ms),
        Duration::from_millis(shared.config.query.cache_max_stale_ms),
        shared.config.query.cache_entries,
        Arc::clone(&shared.answers),
    );
    let ctx = Rc::new(ShardContext {
        shard,
        metrics: Arc::clone(&shared.shard_metrics[shard]),
        shared,
        stop: Rc::new(LocalStop::default()),
        inflight,
        keys: ShardKeys::new(&shared_auth),
        limits,
        cors,
        answers,
    });
    let connections = Rc::new(Cell::new(0usize));
    let balancer = links
        .filter(|_| ctx.shared.config.http.balance_connections)
        .map(|links| {
            let metrics = ctx_metrics(&ctx);
            let (ctx, connections) = (Rc::clone(&ctx), Rc::clone(&connections));
            let serve: Rc<dyn Fn(TcpStream)> =
                Rc::new(move |stream| spawn_connection(&ctx, stream, &connections));
            Balancer::start(shard, links, metrics, serve)
        });

    if let Some(admin) = admin {
        glommio::spawn_local(serve_admin(Rc::clone(&ctx), admin)).detach();
    }
    let deadline = serve_listener(&ctx, listener, &connections, balancer.as_deref()).await;
    wait_for_connections(&ctx, &connections, balancer.as_deref(), deadline).await;
}

/// Every shard's metrics, which the balancer reads to compare open connections.
fn ctx_metrics(ctx: &ShardContext) -> Vec<Arc<ShardMetrics>> {
    ctx.shared.shard_metrics.iter().map(Arc::clone).collect()
}

/// Binds `http.admin_listen` on shard 0 (no other shard serves it); `None` elsewhere or
/// when it is not set.
fn bind_admin(shard: usize, shared: &IngestShared) -> Result<Option<ShardListener>, ServerError> {
    let Some(addr) = shared.config.http.admin_listen.filter(|_| shard == 0) else {
        return Ok(None);
    };
    let bound = refuse_taken_address(addr).and_then(|()| {
        ShardListener::bind(addr, shared.config.http.listen_backlog).map_err(|source| {
            ServerError::Bind {
                shard,
                addr: addr.to_string(),
                source,
            }
        })
    })?;
    info!(shard, admin_listen = %addr, "admin listener bound");
    Ok(Some(bound))
}

/// The listener's whole life: accept until the process stops, then stop it without
/// resetting what the kernel queued (see [`ShardListener`]). Returns the shard's shutdown
/// deadline, `http.shutdown_grace_ms` after it saw the stop.
async fn serve_listener(
    ctx: &Rc<ShardContext>,
    listener: ShardListener,
    connections: &Rc<Cell<usize>>,
    balancer: Option<&Balancer>,
) -> Instant {
    let mut acceptor = Acceptor::new(ctx.shard, &listener.listener);
    accept_until_stopped(ctx, &mut acceptor, connections, balancer).await;
    // What the queue still holds is served here: the other shards are stopping too.
    if let Some(balancer) = balancer {
        balancer.close();
    }

    let grace = Duration::from_millis(ctx.shared.config.http.shutdown_grace_ms);
    let deadline = Instant::now() + grace;
    ctx.stop.fire();
    let open = connections.get();
    let mut serve = |stream| spawn_connection(ctx, stream, connections);
    let drained = listener.stop(acceptor, deadline, &mut serve).await;
    info!(
        shard = ctx.shard,
        open_connections = open,
        drained_connections = drained,
        "shard stopped accepting"
    );
    deadline
}

/// Accepts and serves connections until the process-wide stop flag is set.
async fn accept_until_stopped(
    ctx: &Rc<ShardContext>,
    acceptor: &mut Acceptor<'_>,
    connections: &Rc<Cell<usize>>,
    balancer: Option<&Balancer>,
) {
    loop {
        // An accept ready at the same time as the stop wins: `or` polls it first.
        let next = future::or(async { Some(acceptor.next_connection().await) }, async {
            while !ctx.shared.stopping.load(Ordering::Relaxed) {
                glommio::timer::sleep(STOP_POLL).await;
            }
            None
        })
        .await;
        match next {
            None => return,
            Some(Some(stream)) => {
                // No hand-off once the process stops: the other shard may be draining.
                let stream = match balancer {
                    Some(b) if !ctx.shared.stopping.load(Ordering::Relaxed) => {
                        b.route(stream, connections.get())
                    }
                    _ => Some(stream),
                };
                if let Some(stream) = stream {
                    spawn_connection(ctx, stream, connections);
                }
            }
            Some(None) => {}
        }
    }
}

/// Serves a new connection, or refuses it (503, then close) when the shard already
/// serves `http.max_connections_per_shard`: the connections it has are not touched.
fn spawn_connection(ctx: &Rc<ShardContext>, stream: TcpStream, connections: &Rc<Cell<usize>>) {
    let ctx = Rc::clone(ctx);
    if connections.get() >= ctx.shared.config.http.max_connections_per_shard {
        ConnectionStats::bump(&ctx.metrics.connections.refused_over_limit);
        debug!(
            shard = ctx.shard,
            open_connections = connections.get(),
            "connection over the shard's cap, answering 503"
        );
        glommio::spawn_local(refuse_connection(ctx, stream)).detach();
        return;
    }
    let guard = ConnectionGuard::new(connections, &ctx.metrics);
    glommio::spawn_local(async move {
        serve_connection(ctx, stream, Listener::Public).await;
        drop(guard);
    })
    .detach();
}

/// Waits until every connection closed or the deadline passed. Whatever is still open
/// then is dropped with the shard: its client gets no answer, so the count is logged.
async fn wait_for_connections(
    ctx: &Rc<ShardContext>,
    connections: &Rc<Cell<usize>>,
    balancer: Option<&Balancer>,
    deadline: Instant,
) {
    // Connections another shard handed over just before the stop count as ours.
    let incoming = || balancer.map_or(0, |b| b.incoming_here());
    while (connections.get() > 0 || incoming() > 0) && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
    let open = connections.get();
    if open == 0 {
        info!(shard = ctx.shard, "shard drained");
        return;
    }
    warn!(
        shard = ctx.shard,
        open_connections = open,
        inflight_requests = ctx.inflight.requests(),
        grace_ms = ctx.shared.config.http.shutdown_grace_ms,
        "shutdown deadline hit; closing connections without an answer \
         (events already handed to the producer are still flushed)"
    );
}

/// Counts a live connection for the shutdown drain, the connection cap and the
/// `fanfinity_http_open_connections` gauge.
struct ConnectionGuard {
    count: Rc<Cell<usize>>,
    metrics: Arc<ShardMetrics>,
}

impl ConnectionGuard {
    fn new(count: &Rc<Cell<usize>>, metrics: &Arc<ShardMetrics>) -> Self {
        count.set(count.get() + 1);
        metrics
            .connections
            .open
            .store(count.get() as u64, Ordering::Relaxed);
        Self {
            count: Rc::clone(count),
            metrics: Arc::clone(metrics),
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.count.set(self.count.get().saturating_sub(1));
        self.metrics
            .connections
            .open
            .store(self.count.get() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read, Write};

    use futures_lite::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::ingest::listener::HANDSHAKE_SETTLE;

    /// Clients that connected and sent a request before anything was accepted sit in the
    /// accept queue, where a close would reset them. Stopping the listener hands every one
    /// over, ends the outstanding accept without waiting it out, and then the address
    /// refuses connections.
    #[test]
    fn stopping_a_listener_serves_its_accept_queue_then_refuses_connections() {
        let (addr_tx, addr_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let shard = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(256 * 1024)
            .spawn(move || async move {
                let listener = ShardListener::bind(([127, 0, 0, 1], 0).into(), 64).expect("bind");
                let addr = listener.listener.local_addr().expect("local address");
                addr_tx.send(addr).expect("report the address");
                go_rx.recv().expect("clients queued");

                let started = Instant::now();
                let mut accepted = Vec::new();
                let acceptor = Acceptor::new(0, &listener.listener);
                let deadline = started + Duration::from_secs(5);
                let taken = listener
                    .stop(acceptor, deadline, &mut |stream| accepted.push(stream))
                    .await;
                let took = started.elapsed();
                for mut stream in accepted {
                    let mut request = [0u8; 16];
                    let n = stream.read(&mut request).await.expect("read request");
                    let answer = [b"pong:", &request[..n]].concat();
                    stream.write_all(&answer).await.expect("answer");
                    stream.close().await.expect("close");
                }
                (taken, took)
            })
            .expect("start an executor");
        let addr = addr_rx.recv().expect("listener address");

        let mut clients: Vec<_> = (0..5)
            .map(|i| {
                let mut client = std::net::TcpStream::connect(addr).expect("connect");
                client
                    .write_all(format!("ping{i}").as_bytes())
                    .expect("send");
                client
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        go_tx.send(()).expect("start the stop");

        for (i, client) in clients.iter_mut().enumerate() {
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .expect("read timeout");
            let mut answer = String::new();
            client
                .read_to_string(&mut answer)
                .expect("an answer, not a reset");
            assert_eq!(answer, format!("pong:ping{i}"));
        }
        let (taken, took) = shard.join().expect("executor");
        assert_eq!(taken, 5, "every queued connection handed over");
        assert!(
            took < HANDSHAKE_SETTLE + Duration::from_millis(500),
            "the outstanding accept ended when the socket was shut ({took:?})"
        );
        let late = std::net::TcpStream::connect(addr).map(drop);
        assert_eq!(
            late.map_err(|e| e.kind()),
            Err(ErrorKind::ConnectionRefused)
        );
    }
}
