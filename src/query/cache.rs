//! A shard's cache of finished answers, so 200 dashboards polling the same match cost
//! ClickHouse one query per answer and TTL, not 200.
//!
//! Single-threaded by design (one per glommio shard, no locks): an entry holds the
//! encoded JSON body and when it was computed, and at most one recomputation in flight,
//! shared by every request that has to wait for it (`futures_util`'s `Shared`).
//!
//! Freshness rules, with `ttl` = `query.cache_ttl_ms` and `max_stale` =
//! `query.cache_max_stale_ms`:
//! - younger than `ttl`: served as is;
//! - older, but younger than `max_stale`: served as is while one recomputation runs in
//!   the background (stale-while-revalidate), so a poller never waits on ClickHouse; the
//!   first request after `ttl` starts it, so an answer polled steadily is at most `ttl`
//!   plus one query old;
//! - older than `max_stale`, or absent: the request waits for the (shared) recomputation.
//!
//! `generated_at_ms` in every answer says how old it is exactly. Failures are not cached: the next request tries again. The map holds at
//! most `capacity` answers; past that the stalest is dropped, so hostile clients varying
//! parameters cost queries, not memory.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{FutureExt, Shared};

use super::QueryError;

type Computation = Shared<Pin<Box<dyn Future<Output = Result<Bytes, QueryError>>>>>;

struct Entry {
    answer: Option<(Bytes, Instant)>,
    computing: Option<Computation>,
}

/// One shard's answers by key.
pub struct AnswerCache {
    ttl: Duration,
    max_stale: Duration,
    capacity: usize,
    entries: RefCell<HashMap<String, Entry>>,
    /// Drives a background recomputation: a glommio task on a shard.
    drive: fn(Computation),
}

/// What [`AnswerCache::get`] decided, decided while the map is borrowed and acted on
/// after.
enum Plan {
    Ready(Bytes),
    Wait(Computation),
}

impl AnswerCache {
    /// A cache keeping answers `ttl` fresh and serving them up to `max_stale` old while
    /// they are recomputed, at most `capacity` of them. A zero `ttl` turns caching off
    /// (every request queries).
    ///
    /// Must be used on a glommio executor, which runs the background recomputations.
    pub fn new(ttl: Duration, max_stale: Duration, capacity: usize) -> Rc<Self> {
        Self::with_driver(ttl, max_stale, capacity, spawn_on_shard)
    }

    fn with_driver(
        ttl: Duration,
        max_stale: Duration,
        capacity: usize,
        drive: fn(Computation),
    ) -> Rc<Self> {
        Rc::new(Self {
            ttl,
            max_stale: max_stale.max(ttl),
            capacity: capacity.max(1),
            entries: RefCell::new(HashMap::new()),
            drive,
        })
    }

    /// The answer for `key`: cached, or computed by `compute` (at most one at a time per
    /// key), following the module's freshness rules.
    ///
    /// # Errors
    /// The computation's error, when the request had to wait for it.
    pub async fn get<F, Fut>(self: &Rc<Self>, key: String, compute: F) -> Result<Bytes, QueryError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, QueryError>> + 'static,
    {
        if self.ttl.is_zero() {
            return compute().await;
        }
        let plan = self.plan(key, compute);
        match plan {
            Plan::Ready(body) => Ok(body),
            Plan::Wait(computation) => computation.await,
        }
    }

    fn plan<F, Fut>(self: &Rc<Self>, key: String, compute: F) -> Plan
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Bytes, QueryError>> + 'static,
    {
        let now = Instant::now();
        let mut entries = self.entries.borrow_mut();
        if !entries.contains_key(&key) && entries.len() >= self.capacity {
            self.evict(&mut entries, now);
        }
        let entry = entries.entry(key.clone()).or_insert(Entry {
            answer: None,
            computing: None,
        });
        let age = entry.answer.as_ref().map(|(_, at)| now.duration_since(*at));
        if let (Some((body, _)), Some(age)) = (&entry.answer, age) {
            if age < self.ttl {
                return Plan::Ready(body.clone());
            }
        }
        let computing = entry
            .computing
            .get_or_insert_with(|| self.start(key, compute()))
            .clone();
        match (&entry.answer, age) {
            (Some((body, _)), Some(age)) if age < self.max_stale => {
                // Serve the previous answer; someone must still drive the computation.
                let body = body.clone();
                drop(entries);
                (self.drive)(computing);
                Plan::Ready(body)
            }
            _ => Plan::Wait(computing),
        }
    }

    /// Wraps `work` so that, whoever drives it, its result lands in the map.
    fn start<Fut>(self: &Rc<Self>, key: String, work: Fut) -> Computation
    where
        Fut: Future<Output = Result<Bytes, QueryError>> + 'static,
    {
        let cache = Rc::clone(self);
        let fut: Pin<Box<dyn Future<Output = Result<Bytes, QueryError>>>> = Box::pin(async move {
            let result = work.await;
            cache.finish(&key, &result);
            result
        });
        fut.shared()
    }

    fn finish(&self, key: &str, result: &Result<Bytes, QueryError>) {
        let mut entries = self.entries.borrow_mut();
        if let Some(entry) = entries.get_mut(key) {
            entry.computing = None;
            if let Ok(body) = result {
                entry.answer = Some((body.clone(), Instant::now()));
            }
        }
    }

    /// Drops answers past `max_stale` that nobody is computing; if none, the oldest.
    fn evict(&self, entries: &mut HashMap<String, Entry>, now: Instant) {
        entries.retain(|_, e| {
            e.computing.is_some()
                || e.answer
                    .as_ref()
                    .is_some_and(|(_, at)| now.duration_since(*at) < self.max_stale)
        });
        if entries.len() < self.capacity {
            return;
        }
        let oldest = entries
            .iter()
            .min_by_key(|(_, e)| e.answer.as_ref().map(|(_, at)| *at))
            .map(|(k, _)| k.clone());
        if let Some(key) = oldest {
            entries.remove(&key);
        }
    }

    /// Answers held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    /// Whether no answer is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Drives a background recomputation on the current glommio executor; the result lands
/// in the map whoever drives it, so the task only has to poll it.
fn spawn_on_shard(computing: Computation) {
    glommio::spawn_local(async move {
        let _ = computing.await;
    })
    .detach();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn block_on<F: Future>(f: F) -> F::Output {
        futures_lite::future::block_on(f)
    }

    /// No executor here: a background recomputation is left for the next waiter.
    fn cache(ttl: Duration, capacity: usize) -> Rc<AnswerCache> {
        AnswerCache::with_driver(ttl, ttl * 2, capacity, |_| {})
    }

    #[test]
    fn fresh_answers_are_served_without_recomputing() {
        let cache = cache(Duration::from_secs(60), 8);
        let calls = Rc::new(Cell::new(0));
        for _ in 0..3 {
            let calls = Rc::clone(&calls);
            let body = block_on(cache.get("k".into(), move || async move {
                calls.set(calls.get() + 1);
                Ok(Bytes::from_static(b"a"))
            }));
            assert_eq!(body.ok(), Some(Bytes::from_static(b"a")));
        }
        assert_eq!(calls.get(), 1);
    }

    #[test]
    fn failures_are_not_cached() {
        let cache = cache(Duration::from_secs(60), 8);
        let failed = block_on(cache.get("k".into(), || async { Err(QueryError::RuntimeGone) }));
        assert!(failed.is_err());
        let ok = block_on(cache.get("k".into(), || async { Ok(Bytes::from_static(b"b")) }));
        assert_eq!(ok.ok(), Some(Bytes::from_static(b"b")));
    }

    #[test]
    fn stale_answers_are_served_while_refreshing_then_replaced() {
        let cache = cache(Duration::from_millis(20), 8);
        let first = block_on(cache.get("k".into(), || async { Ok(Bytes::from_static(b"1")) }));
        assert_eq!(first.ok(), Some(Bytes::from_static(b"1")));
        std::thread::sleep(Duration::from_millis(25));
        // Stale but within max_stale (2 x ttl here): the old answer; the refresh is left
        // pending.
        let stale = block_on(cache.get("k".into(), || async { Ok(Bytes::from_static(b"2")) }));
        assert_eq!(stale.ok(), Some(Bytes::from_static(b"1")));
        std::thread::sleep(Duration::from_millis(25));
        // Too old: this request waits for, and drives, the pending refresh.
        let fresh = block_on(cache.get("k".into(), || async { Ok(Bytes::from_static(b"3")) }));
        assert_eq!(fresh.ok(), Some(Bytes::from_static(b"2")));
    }

    #[test]
    fn the_map_stays_within_capacity() {
        let cache = cache(Duration::from_secs(60), 4);
        for i in 0..50 {
            let _ = block_on(cache.get(format!("k{i}"), || async { Ok(Bytes::new()) }));
        }
        assert!(cache.len() <= 4);
    }
}
