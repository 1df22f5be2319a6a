//! Accept-time connection balancing between shards.
//!
//! SO_REUSEPORT picks a shard for each new connection by hashing its addresses and ports.
//! Over thousands of short connections that evens out; over the few long-lived ones a
//! load balancer keeps open it does not. Measured with `benches/reuseport_spread.py`
//! against two shards (docs/connections.md): with 4 connections one shard got none of
//! them in 6 of 40 trials, and with 64 the busiest shard held more than half in 36 of 40.
//! A connection that lands on the wrong shard stays there for hours, and its core does the
//! work of two while another idles.
//!
//! So a shard that accepts a connection which would leave it [`MIN_SURPLUS`] or more
//! ahead of the least-loaded shard hands it over: the socket's file
//! descriptor is duplicated, the copy travels through a glommio shared channel, and the
//! other shard wraps and serves it as if it had accepted it. Only the count of open
//! connections is compared, not their traffic: the kernel's hash does not see traffic
//! either, and a count is what a load balancer's connections have in common.
//!
//! Every shard has a channel to every other (`shards x (shards - 1)` channels of
//! [`CHANNEL_CAPACITY`]). A hand-off that cannot go (channel not yet connected, full,
//! or closed because the other shard is stopping) leaves the connection where it landed.
//!
//! Shutdown: no hand-off starts once the process-wide stop flag is set, and a shard waits
//! for connections announced to it ([`Board::incoming`]) as it waits for its own, so a
//! connection in a channel is served, not dropped. What this cannot cover: a hand-off
//! decided in the instant the flag is set and still in the channel after the receiving
//! shard's whole drain (at least 100 ms); it would be closed without an answer.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use glommio::channels::shared_channel::{self, ConnectedSender, SharedReceiver, SharedSender};
use glommio::net::TcpStream;
use tracing::{debug, warn};

use crate::metrics::shard::{ConnectionStats, ShardMetrics};

/// How far ahead of the least-loaded shard a shard would be, counting the connection it
/// just accepted, for it to hand that connection over. Two, not one: moving a connection
/// between shards one apart would only swap which of them is ahead.
pub const MIN_SURPLUS: usize = 2;

/// Connections in flight between one pair of shards. A goal brings bursts of new
/// connections; one that finds the channel full is simply served where it landed.
const CHANNEL_CAPACITY: usize = 1024;

/// Per-shard counts every shard can read.
#[derive(Debug)]
pub struct Board {
    /// Connections handed to a shard and not yet counted in its open gauge.
    incoming: Vec<AtomicUsize>,
}

impl Board {
    fn new(shards: usize) -> Self {
        Self {
            incoming: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
        }
    }

    /// Connections on their way to `shard`.
    pub fn incoming(&self, shard: usize) -> usize {
        self.incoming
            .get(shard)
            .map_or(0, |n| n.load(Ordering::Acquire))
    }
}

/// One shard's ends of the channels, made before the executors start (the ends are
/// `Send`; they are connected inside their executors).
pub struct Links {
    /// (other shard, sender to it).
    outboxes: Vec<(usize, SharedSender<OwnedFd>)>,
    inboxes: Vec<SharedReceiver<OwnedFd>>,
    board: Arc<Board>,
}

/// Makes every shard's [`Links`], index = shard.
pub fn mesh(shards: usize) -> Vec<Links> {
    let board = Arc::new(Board::new(shards));
    let mut links: Vec<Links> = (0..shards)
        .map(|_| Links {
            outboxes: Vec::new(),
            inboxes: Vec::new(),
            board: Arc::clone(&board),
        })
        .collect();
    for from in 0..shards {
        for to in (0..shards).filter(|&to| to != from) {
            let (tx, rx) = shared_channel::new_bounded(CHANNEL_CAPACITY);
            links[from].outboxes.push((to, tx));
            links[to].inboxes.push(rx);
        }
    }
    links
}

/// A shard's side of the balancing.
pub struct Balancer {
    shard: usize,
    board: Arc<Board>,
    /// Every shard's metrics; `connections.open` is what is compared.
    metrics: Vec<Arc<ShardMetrics>>,
    /// Connected senders by target shard (`None` until connected, and after `close`).
    outboxes: RefCell<Vec<Option<ConnectedSender<OwnedFd>>>>,
}

impl Balancer {
    /// Connects this shard's channels and starts serving connections handed to it with
    /// `serve`, which must count the connection before it returns (the shard's drain
    /// relies on `incoming + open` never dropping to zero in between).
    pub fn start(
        shard: usize,
        links: Links,
        metrics: Vec<Arc<ShardMetrics>>,
        serve: Rc<dyn Fn(TcpStream)>,
    ) -> Rc<Self> {
        let balancer = Rc::new(Self {
            shard,
            board: Arc::clone(&links.board),
            outboxes: RefCell::new((0..metrics.len()).map(|_| None).collect()),
            metrics,
        });
        for (to, sender) in links.outboxes {
            let weak = Rc::downgrade(&balancer);
            glommio::spawn_local(async move {
                let connected = sender.connect().await;
                if let Some(balancer) = weak.upgrade() {
                    if let Some(slot) = balancer.outboxes.borrow_mut().get_mut(to) {
                        *slot = Some(connected);
                    }
                }
            })
            .detach();
        }
        for inbox in links.inboxes {
            let board = Arc::clone(&links.board);
            let serve = Rc::clone(&serve);
            glommio::spawn_local(async move {
                let inbox = inbox.connect().await;
                while let Some(fd) = inbox.recv().await {
                    // SAFETY: the descriptor is a connected TCP socket that the sending
                    // shard duplicated for us and no longer uses; `into_raw_fd` passes
                    // its ownership to the stream.
                    let stream = unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) };
                    serve(stream);
                    board.incoming[shard].fetch_sub(1, Ordering::AcqRel);
                }
            })
            .detach();
        }
        balancer
    }

    /// Connections this shard is in charge of: open, plus announced and not yet served.
    fn load(&self, shard: usize) -> usize {
        let open = self
            .metrics
            .get(shard)
            .map_or(0, |m| ConnectionStats::read(&m.connections.open) as usize);
        open + self.board.incoming(shard)
    }

    /// Hands `stream` to the least-loaded shard when keeping it would leave this one
    /// (serving `open` before it) [`MIN_SURPLUS`] ahead; gives it back when it should
    /// stay here.
    pub fn route(&self, stream: TcpStream, open: usize) -> Option<TcpStream> {
        let mine = open + self.board.incoming(self.shard);
        let Some((target, theirs)) = (0..self.metrics.len())
            .filter(|&s| s != self.shard)
            .map(|s| (s, self.load(s)))
            .min_by_key(|&(_, load)| load)
        else {
            return Some(stream);
        };
        // Counting the new connection: keeping it here would leave this shard
        // `mine + 1 - theirs` ahead.
        if mine + 1 < theirs + MIN_SURPLUS {
            return Some(stream);
        }
        let outboxes = self.outboxes.borrow();
        let Some(Some(sender)) = outboxes.get(target) else {
            return Some(stream);
        };
        let copy = match duplicate(&stream) {
            Ok(copy) => copy,
            Err(err) => {
                warn!(shard = self.shard, error = %err, "cannot duplicate a socket to hand it over; serving it here");
                return Some(stream);
            }
        };
        self.board.incoming[target].fetch_add(1, Ordering::AcqRel);
        if sender.try_send(copy).is_err() {
            // Full or closed; the copy (if it was not consumed) is closed on drop, which
            // leaves the original untouched.
            self.board.incoming[target].fetch_sub(1, Ordering::AcqRel);
            return Some(stream);
        }
        if let Some(mine) = self.metrics.get(self.shard) {
            ConnectionStats::bump(&mine.connections.handed_off);
        }
        debug!(
            shard = self.shard,
            to_shard = target,
            open_here = mine,
            open_there = theirs,
            "connection handed to a less loaded shard"
        );
        // Our descriptor closes here; the socket lives on in the copy.
        drop(stream);
        None
    }

    /// Connections other shards handed to this one that it has not counted yet.
    pub fn incoming_here(&self) -> usize {
        self.board.incoming(self.shard)
    }

    /// Stops handing connections over; the other shards' receive loops end once they
    /// have served what is already in their channels.
    pub fn close(&self) {
        for slot in self.outboxes.borrow_mut().iter_mut() {
            *slot = None;
        }
    }
}

/// A second descriptor for the stream's socket, close-on-exec like the first.
fn duplicate(stream: &TcpStream) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new descriptor (or -1); it
    // touches no memory.
    let fd = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by fcntl and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_links_every_shard_to_every_other() {
        let links = mesh(3);
        assert_eq!(links.len(), 3);
        for (shard, l) in links.iter().enumerate() {
            let targets: Vec<usize> = l.outboxes.iter().map(|(to, _)| *to).collect();
            assert_eq!(targets.len(), 2);
            assert!(!targets.contains(&shard));
            assert_eq!(l.inboxes.len(), 2);
        }
    }

    #[test]
    fn one_shard_has_no_channels() {
        let links = mesh(1);
        assert!(links[0].outboxes.is_empty());
        assert!(links[0].inboxes.is_empty());
    }
}
