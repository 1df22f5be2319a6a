//! The open-model profiles' keep-alive connections, used strictly in turn.
//!
//! The pool is a FIFO of slots behind a fair semaphore: a request takes the slot at the
//! front (the one idle longest) and puts it back at the end. So every connection is used
//! once per `C` requests, and none sits idle while others work; `sweep_idle` touches the
//! ones a slow run would leave idle past the server's 75 s timeout. A slot holds a
//! connection or nothing; an empty one connects when next taken, from the same source
//! address as before.
//!
//! One loopback source address has about 28,000 ephemeral ports
//! (`ip_local_port_range` 32768-60999), so slot `i` binds to source address
//! `i mod K` of `127.0.0.1 .. 127.0.0.K`.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::client::SendError;
use crate::wire::{self, WireConnection};

/// Connections per source address `--source-ips auto` plans for, below the ~28k
/// ephemeral ports of one address so TIME_WAIT leftovers of a previous run still fit.
pub const CONNECTIONS_PER_SOURCE_IP: usize = 20_000;

/// How many connects may be in flight while pre-opening.
const PREOPEN_CONCURRENCY: usize = 256;

/// Bound on the first exchange of a pre-opened connection.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection's place in the rotation.
#[derive(Debug)]
pub struct Slot {
    pub index: usize,
    pub connection: Option<WireConnection>,
}

/// The slots and the semaphore counting the idle ones.
pub struct ConnPool {
    addr: SocketAddr,
    sources: Vec<IpAddr>,
    idle: Mutex<VecDeque<Slot>>,
    permits: Arc<Semaphore>,
    size: usize,
}

/// A slot taken from the pool; give it back with `ConnPool::put`.
pub struct Taken {
    pub slot: Slot,
    _permit: OwnedSemaphorePermit,
}

/// Source addresses `127.0.0.1 ..= 127.0.0.k`.
pub fn loopback_sources(k: usize) -> Vec<IpAddr> {
    (1..=k.clamp(1, 254))
        .map(|last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last as u8)))
        .collect()
}

/// How many source addresses `connections` need: `ceil(C / 20,000)`.
pub fn auto_source_ips(connections: usize) -> usize {
    connections.div_ceil(CONNECTIONS_PER_SOURCE_IP).max(1)
}

/// The source address of slot `index` (round robin), or none when not binding.
pub fn source_for(sources: &[IpAddr], index: usize) -> Option<IpAddr> {
    if sources.is_empty() {
        None
    } else {
        Some(sources[index % sources.len()])
    }
}

impl ConnPool {
    /// `size` empty slots to `addr`, bound round robin to `sources` (none: the kernel
    /// picks the source address).
    pub fn new(addr: SocketAddr, size: usize, sources: Vec<IpAddr>) -> ConnPool {
        let idle = (0..size)
            .map(|index| Slot {
                index,
                connection: None,
            })
            .collect();
        ConnPool {
            addr,
            sources,
            idle: Mutex::new(idle),
            permits: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<Slot>> {
        // A panic while holding this lock leaves a valid queue; keep going.
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open connections among the idle slots (a snapshot).
    pub fn open_idle(&self) -> usize {
        self.lock()
            .iter()
            .filter(|s| s.connection.is_some())
            .count()
    }

    /// Takes the slot idle longest, waiting (in arrival order) while all are busy.
    pub async fn take(&self) -> Taken {
        // The semaphore is never closed, so acquiring cannot fail.
        let permit = match Arc::clone(&self.permits).acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => unreachable!("the pool's semaphore is never closed"),
        };
        let slot = self.lock().pop_front();
        // A permit is only ever held by someone holding a slot, so a free permit means a
        // slot is queued.
        let slot = slot.unwrap_or(Slot {
            index: 0,
            connection: None,
        });
        Taken {
            slot,
            _permit: permit,
        }
    }

    /// Puts a slot back at the end of the rotation.
    pub fn put(&self, taken: Taken) {
        let Taken { slot, _permit } = taken;
        self.lock().push_back(slot);
        // `_permit` drops here, after the slot is queued.
    }

    /// The slot's connection, opening one if it has none.
    ///
    /// # Errors
    /// As `wire::connect`.
    pub async fn connection<'a>(
        &self,
        slot: &'a mut Slot,
    ) -> Result<&'a mut WireConnection, SendError> {
        if slot.connection.is_none() {
            let source = source_for(&self.sources, slot.index);
            slot.connection = Some(wire::connect(self.addr, source).await?);
        }
        match slot.connection.as_mut() {
            Some(c) => Ok(c),
            None => Err(SendError::Body("connection vanished".into())),
        }
    }

    /// Opens every slot's connection before the run, at most `per_second` connects a
    /// second, and sends `GET /healthz` on each: a client that connects and says nothing
    /// is what a slowloris does, and a server is right to close it (fanfinity answers 408
    /// after `http.header_read_timeout_ms`). An app or a load balancer talks at once and
    /// then keeps the connection idle between requests, which is what is held here. Fails
    /// on the first connection that cannot be opened or that the server closes.
    ///
    /// # Errors
    /// When any connect or first exchange fails, with how many were open by then.
    pub async fn open_all(&self, per_second: f64, authority: &str) -> Result<Duration> {
        let hello: Arc<[u8]> =
            wire::request_head("GET", "/healthz", authority, "text/plain", None, 0).into();
        let started = Instant::now();
        let mut slots: Vec<Slot> = self.lock().drain(..).collect();
        let interval = Duration::from_secs_f64(1.0 / per_second.max(1.0));
        let gate = Arc::new(Semaphore::new(PREOPEN_CONCURRENCY));
        let mut tasks = tokio::task::JoinSet::new();
        let mut failure = None;

        for n in 0..slots.len() {
            if slots[n].connection.is_some() {
                continue;
            }
            tokio::time::sleep_until((started + interval.mul_f64(n as f64)).into()).await;
            let Ok(permit) = Arc::clone(&gate).acquire_owned().await else {
                break;
            };
            let (addr, source, index) = (self.addr, source_for(&self.sources, slots[n].index), n);
            let hello = Arc::clone(&hello);
            tasks.spawn(async move {
                let result = match wire::connect(addr, source).await {
                    Ok(mut c) => {
                        let first = tokio::time::timeout(HELLO_TIMEOUT, c.exchange(&hello));
                        match first.await {
                            Ok(Ok((_, true))) => Ok(c),
                            Ok(Ok((_, false))) => Err(SendError::Body(
                                "the server closed it after its first answer".into(),
                            )),
                            Ok(Err(e)) => Err(e),
                            Err(_) => Err(SendError::Timeout(HELLO_TIMEOUT)),
                        }
                    }
                    Err(e) => Err(e),
                };
                drop(permit);
                (index, source, result)
            });
            // Collect finished connects as we go so a failure stops the loop early.
            while let Some(done) = tasks.try_join_next() {
                if let Err(e) = store(&mut slots, done) {
                    failure = Some(e);
                }
            }
            if failure.is_some() {
                break;
            }
        }
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = store(&mut slots, done) {
                failure.get_or_insert(e);
            }
        }
        let open = slots.iter().filter(|s| s.connection.is_some()).count();
        self.lock().extend(slots);
        if let Some(e) = failure {
            bail!("opened only {open} of {} connections: {e}", self.size);
        }
        Ok(started.elapsed())
    }

    /// Sends `GET /healthz` on idle connections not used for `max_idle`, so the server's
    /// idle timeout never closes them mid-run. Answers are not counted; a connection whose
    /// touch fails is dropped and reopened on its next turn.
    pub async fn sweep_idle(&self, max_idle: Duration, authority: &str) {
        let request = wire::request_head("GET", "/healthz", authority, "text/plain", None, 0);
        // Each touched connection goes to the back, so one lap over the pool is enough.
        for _ in 0..self.size {
            let stale = {
                let idle = self.lock();
                idle.front().is_some_and(|s| {
                    s.connection
                        .as_ref()
                        .is_some_and(|c| c.last_used.elapsed() > max_idle)
                })
            };
            if !stale {
                return;
            }
            let mut taken = self.take().await;
            if let Some(c) = taken.slot.connection.as_mut() {
                let answer = tokio::time::timeout(Duration::from_secs(5), c.exchange(&request));
                match answer.await {
                    Ok(Ok((_, true))) => {}
                    _ => taken.slot.connection = None,
                }
            }
            self.put(taken);
        }
    }
}

type ConnectDone = std::result::Result<
    (
        usize,
        Option<IpAddr>,
        std::result::Result<WireConnection, SendError>,
    ),
    tokio::task::JoinError,
>;

fn store(slots: &mut [Slot], done: ConnectDone) -> Result<()> {
    let (index, source, result) = done.map_err(|e| anyhow::anyhow!("connect task: {e}"))?;
    match result {
        Ok(c) => {
            slots[index].connection = Some(c);
            Ok(())
        }
        Err(e) => {
            let from = source.map(|s| format!(" from {s}")).unwrap_or_default();
            bail!("connection {index}{from}: {e}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_slots_over_source_addresses_round_robin() {
        let sources = loopback_sources(3);
        let got: Vec<String> = (0..7)
            .map(|i| source_for(&sources, i).expect("bound").to_string())
            .collect();
        assert_eq!(
            got,
            [
                "127.0.0.1",
                "127.0.0.2",
                "127.0.0.3",
                "127.0.0.1",
                "127.0.0.2",
                "127.0.0.3",
                "127.0.0.1"
            ]
        );
        assert_eq!(source_for(&[], 5), None);
    }

    #[test]
    fn plans_one_source_address_per_20k_connections() {
        assert_eq!(auto_source_ips(64), 1);
        assert_eq!(auto_source_ips(20_000), 1);
        assert_eq!(auto_source_ips(20_001), 2);
        assert_eq!(auto_source_ips(50_000), 3);
    }

    #[tokio::test]
    async fn hands_out_slots_in_turn() {
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("valid");
        let pool = ConnPool::new(addr, 3, Vec::new());
        let mut order = Vec::new();
        for _ in 0..6 {
            let taken = pool.take().await;
            order.push(taken.slot.index);
            pool.put(taken);
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2]);
    }

    #[tokio::test]
    async fn opens_every_connection_first_from_several_sources() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Answers each connection's first request (the pre-open's GET /healthz) and
        // keeps it open.
        let accept = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut peers = Vec::new();
            while let Ok((mut stream, peer)) = listener.accept().await {
                peers.push(peer.ip().to_string());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 512];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    let _ = stream.write_all(ok).await;
                    let _ = stream.read(&mut buf).await;
                });
                if peers.len() == 6 {
                    break;
                }
            }
            peers
        });
        let pool = ConnPool::new(addr, 6, loopback_sources(2));
        pool.open_all(1000.0, "test").await.expect("all open");
        assert_eq!(pool.open_idle(), 6);
        let mut ips = accept.await.expect("accept task");
        ips.sort();
        ips.dedup();
        assert_eq!(ips, ["127.0.0.1", "127.0.0.2"]);
    }

    #[tokio::test]
    async fn touches_connections_idle_too_long() {
        let mock = crate::mock_server::MockServer::start(Default::default()).await;
        let addr: SocketAddr = mock
            .url()
            .trim_start_matches("http://")
            .parse()
            .expect("mock address");
        let pool = ConnPool::new(addr, 3, Vec::new());
        pool.open_all(1000.0, "mock").await.expect("all open");
        let opened: Vec<Instant> = pool
            .lock()
            .iter()
            .filter_map(|s| s.connection.as_ref().map(|c| c.last_used))
            .collect();

        tokio::time::sleep(Duration::from_millis(30)).await;
        pool.sweep_idle(Duration::from_millis(20), "mock").await;
        let idle = pool.lock();
        assert_eq!(idle.len(), 3);
        for (slot, before) in idle.iter().zip(&opened) {
            let after = slot.connection.as_ref().expect("still open").last_used;
            assert!(after > *before, "slot {} was not touched", slot.index);
        }
    }
}
