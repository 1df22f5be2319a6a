//! A shard's cache of finished answers, so 200 dashboards polling the same match cost
//! ClickHouse one query per answer and TTL, not 200.
//!
//! One per glommio shard: an entry holds the encoded JSON body and when its computation
//! started, and at most one recomputation in flight, shared by every request of that
//! shard that has to wait for it (`futures_util`'s `Shared`). Finished answers are also
//! published to one process-wide [`PublishedAnswers`] map, and a shard serves whichever
//! of its own and the published answer is newer: a client whose requests land on
//! different shards (a browser opens several connections) never sees an answer older than
//! one it was already given, so totals never go backwards. That map is the only lock, held
//! for a lookup or an insert.
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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{FutureExt, Shared};

use super::QueryError;

type Computation = Shared<Pin<Box<dyn Future<Output = Result<Bytes, QueryError>>>>>;

/// An encoded answer and when the computation that made it started (so of two answers,
/// the later-started one saw at least the data the other saw).
type Answer = (Bytes, Instant);

struct Entry {
    answer: Option<Answer>,
    computing: Option<Computation>,
}

/// The newest finished answer per key, across all shards; bounded like a shard's map.
pub struct PublishedAnswers {
    capacity: usize,
    answers: Mutex<HashMap<String, Answer>>,
}

impl PublishedAnswers {
    /// A map of at most `capacity` answers.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity: capacity.max(1),
            answers: Mutex::new(HashMap::new()),
        })
    }

    fn get(&self, key: &str) -> Option<Answer> {
        self.lock().get(key).cloned()
    }

    /// Keeps `answer` unless a later-started one is there already.
    fn publish(&self, key: &str, answer: &Answer) {
        let mut answers = self.lock();
        if let Some(held) = answers.get(key) {
            if held.1 >= answer.1 {
                return;
            }
        } else if answers.len() >= self.capacity {
            let oldest = answers
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                answers.remove(&oldest);
            }
        }
        answers.insert(key.to_string(), answer.clone());
    }

    /// A shard that panicked while holding the lock left nothing half-written (every
    /// change is one insert or remove), so the map is used as it is.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Answer>> {
        self.answers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no answer is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One shard's answers by key.
pub struct AnswerCache {
    ttl: Duration,
    max_stale: Duration,
    capacity: usize,
    entries: RefCell<HashMap<String, Entry>>,
    published: Arc<PublishedAnswers>,
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
    pub fn new(
        ttl: Duration,
        max_stale: Duration,
        capacity: usize,
        published: Arc<PublishedAnswers>,
    ) -> Rc<Self> {
        Self::with_driver(ttl, max_stale, capacity, published, spawn_on_shard)
    }

    fn with_driver(
        ttl: Duration,
        max_stale: Duration,
        capacity: usize,
        published: Arc<PublishedAnswers>,
        drive: fn(Computation),
    ) -> Rc<Self> {
        Rc::new(Self {
            ttl,
            max_stale: max_stale.max(ttl),
            capacity: capacity.max(1),
            entries: RefCell::new(HashMap::new()),
            published,
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
        let published = self.published.get(&key);
        let mut entries = self.entries.borrow_mut();
        if !entries.contains_key(&key) && entries.len() >= self.capacity {
            self.evict(&mut entries, now);
        }
        let entry = entries.entry(key.clone()).or_insert(Entry {
            answer: None,
            computing: None,
        });
        if let Some(other) = published {
            if entry.answer.as_ref().is_none_or(|(_, at)| *at < other.1) {
                entry.answer = Some(other);
            }
        }
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
        let started = Instant::now();
        let fut: Pin<Box<dyn Future<Output = Result<Bytes, QueryError>>>> = Box::pin(async move {
            let result = work.await;
            cache.finish(&key, &result, started);
            result
        });
        fut.shared()
    }

    fn finish(&self, key: &str, result: &Result<Bytes, QueryError>, started: Instant) {
        let answer = result.as_ref().ok().map(|body| (body.clone(), started));
        if let Some(answer) = &answer {
            self.published.publish(key, answer);
        }
        let mut entries = self.entries.borrow_mut();
        if let Some(entry) = entries.get_mut(key) {
            entry.computing = None;
            if let Some(answer) = answer {
                if entry.answer.as_ref().is_none_or(|(_, at)| *at < answer.1) {
                    entry.answer = Some(answer);
                }
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
        AnswerCache::with_driver(
            ttl,
            ttl * 2,
            capacity,
            PublishedAnswers::new(capacity),
            |_| {},
        )
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
    fn a_newer_answer_from_another_shard_wins() {
        let published = PublishedAnswers::new(8);
        let shard = |p: &Arc<PublishedAnswers>| {
            AnswerCache::with_driver(
                Duration::from_secs(60),
                Duration::from_secs(120),
                8,
                Arc::clone(p),
                |_| {},
            )
        };
        let (a, b) = (shard(&published), shard(&published));
        let old = block_on(a.get("k".into(), || async { Ok(Bytes::from_static(b"old")) }));
        assert_eq!(old.ok(), Some(Bytes::from_static(b"old")));
        let new = block_on(b.get("k".into(), || async { Ok(Bytes::from_static(b"x")) }));
        // Shard b adopted a's published answer instead of computing its own.
        assert_eq!(new.ok(), Some(Bytes::from_static(b"old")));
        published.publish("k", &(Bytes::from_static(b"newer"), Instant::now()));
        let seen = block_on(a.get("k".into(), || async { Ok(Bytes::from_static(b"y")) }));
        assert_eq!(seen.ok(), Some(Bytes::from_static(b"newer")));
        assert!(published.len() <= 8);
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
