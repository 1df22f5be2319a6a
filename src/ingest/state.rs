//! What a shard's handlers can reach: process-wide parts behind `Arc`, and the shard's
//! own parts, which never leave its executor.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use super::cors::CorsPolicy;
use super::inflight::InFlight;
use super::rate_limit::RateLimits;
use crate::app::config::Config;
use crate::auth::{AuthState, ShardKeys};
use crate::kafka::producer::EventProducer;
use crate::metrics::shard::ShardMetrics;
use crate::query::cache::{AnswerCache, PublishedAnswers};
use crate::query::runtime::QueryRuntime;
use crate::sink::status::SinkStatus;

/// Parts shared by every shard.
pub struct IngestShared {
    pub config: Arc<Config>,
    /// `None` only in the no-op benchmark server (`fanfinity noop-server`), which answers
    /// every event post 202 without decoding it or touching Kafka, to measure the
    /// ceiling of the HTTP layer (benches/compare).
    pub producer: Option<Arc<EventProducer>>,
    /// `None` when the process serves no queries.
    pub query: Option<Arc<QueryRuntime>>,
    /// Every shard's metrics, so any shard can answer a scrape.
    pub shard_metrics: Vec<Arc<ShardMetrics>>,
    /// `None` when the process runs no sink.
    pub sink: Option<Arc<SinkStatus>>,
    /// Set once at shutdown: stop accepting, refuse new events, finish in-flight ones.
    pub stopping: Arc<AtomicBool>,
    /// The API keys in force (replaced on SIGHUP).
    pub auth: Arc<AuthState>,
    /// The newest analytics answers of every shard (see `query::cache`).
    pub answers: Arc<PublishedAnswers>,
}

/// Which listener a request came in on, set by the connection layer as a request
/// extension: with `http.admin_listen` set, the operational endpoints live only on the
/// admin one (docs/connections.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Public,
    Admin,
}

/// One shard's view: its id, its metrics and its local stop signal.
pub struct ShardContext {
    pub shard: usize,
    pub shared: Arc<IngestShared>,
    pub metrics: Arc<ShardMetrics>,
    pub stop: Rc<LocalStop>,
    /// This shard's bound on event requests in progress.
    pub inflight: Rc<InFlight>,
    /// This shard's copy of the key set, refreshed when it is replaced.
    pub keys: ShardKeys,
    /// This shard's rate-limit buckets (per key and per client IP), never shared.
    pub limits: RateLimits,
    /// Which browser origins may post events.
    pub cors: CorsPolicy,
    /// This shard's finished analytics answers (`query.cache_ttl_ms`).
    pub answers: Rc<AnswerCache>,
}

/// A shard-local "stop now" signal that many connection tasks can await without each
/// polling a timer. Not thread-safe by design: the shard's accept loop watches the
/// process-wide flag and fires this one. Each waiter registers once and unregisters
/// when dropped, so closed connections leave nothing behind.
#[derive(Default)]
pub struct LocalStop {
    fired: Cell<bool>,
    next_id: Cell<u64>,
    waiters: RefCell<BTreeMap<u64, Waker>>,
}

impl LocalStop {
    /// Fires the signal and wakes every waiter.
    pub fn fire(&self) {
        self.fired.set(true);
        let waiters = std::mem::take(&mut *self.waiters.borrow_mut());
        for waker in waiters.into_values() {
            waker.wake();
        }
    }

    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }

    /// Resolves once the signal fired.
    pub fn wait(self: &Rc<Self>) -> StopWait {
        StopWait {
            stop: Rc::clone(self),
            id: None,
        }
    }
}

/// Future returned by [`LocalStop::wait`].
pub struct StopWait {
    stop: Rc<LocalStop>,
    id: Option<u64>,
}

impl Future for StopWait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.stop.fired.get() {
            return Poll::Ready(());
        }
        let id = match self.id {
            Some(id) => id,
            None => {
                let id = self.stop.next_id.get();
                self.stop.next_id.set(id + 1);
                self.id = Some(id);
                id
            }
        };
        let mut waiters = self.stop.waiters.borrow_mut();
        match waiters.get(&id) {
            Some(existing) if existing.will_wake(cx.waker()) => {}
            _ => {
                waiters.insert(id, cx.waker().clone());
            }
        }
        Poll::Pending
    }
}

impl Drop for StopWait {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.stop.waiters.borrow_mut().remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_waiters_unregister() {
        let stop = Rc::new(LocalStop::default());
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut a = Box::pin(stop.wait());
        assert!(a.as_mut().poll(&mut cx).is_pending());
        assert!(a.as_mut().poll(&mut cx).is_pending());
        assert_eq!(stop.waiters.borrow().len(), 1);
        drop(a);
        assert_eq!(stop.waiters.borrow().len(), 0);
        let mut b = Box::pin(stop.wait());
        assert!(b.as_mut().poll(&mut cx).is_pending());
        stop.fire();
        assert!(b.as_mut().poll(&mut cx).is_ready());
    }
}
