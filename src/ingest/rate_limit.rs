//! Rate limits per API key and per client IP: token buckets held by each shard.
//!
//! Two limits, each off when its rate is 0 (`[limits]` in the configuration):
//! - **per key, in events**: a request of `n` events costs `n` tokens of its key's bucket
//!   (one up front, before the body is read, the rest once the body is decoded), so a
//!   client sending 1000-event batches and one sending single events are held to the
//!   same event rate. Only authenticated event posts are counted; with `auth.enabled =
//!   false` there is no key and no key limit. A request refused later for a server-side
//!   reason (5xx: Kafka down, delivery timeout) gets its tokens back, so clients
//!   retrying a 503 do not use up their key.
//! - **per client IP, in requests**: every API request (`POST /v1/events`, the metrics
//!   query) costs one token, checked before the key is, so one address flooding with
//!   bad keys is stopped before any key is hashed. The address is the TCP peer's; the
//!   `X-Forwarded-For` header is read only with `limits.trust_forwarded_for`. IPv6
//!   clients are counted per /64, the block one subscriber gets, so rotating addresses
//!   inside it gains nothing.
//!
//! Each shard enforces the full limit on its own, with no coordination (no locks, no
//! cross-core traffic on the hot path). One keep-alive connection lives on one shard and
//! gets exactly the limit; a client spreading requests over connections on all `N`
//! shards can get up to `N` times it. `docs/rate-limits.md` says why that trade was made.
//!
//! # Memory
//! A shard tracks at most `limits.max_buckets_per_shard` buckets per limit. When a new
//! client arrives at the cap, buckets that refilled to full are forgotten first (a full
//! bucket is the same as no bucket). If more than three quarters of the cap remain, the
//! fullest of the remaining buckets are forgotten too, down to three quarters of the cap:
//! those clients start again with a full burst, so under a flood of more distinct
//! clients than the cap, the limit is looser for some of them, never stricter. Each
//! sweep costs time linear in the cap and then leaves room for a quarter of it, so the
//! cost per new client stays constant. Buckets live in a `HashMap` with std's randomly
//! keyed SipHash, so chosen addresses cannot force collisions.
//!
//! # Limitations
//! A 429 given before the body is read closes a keep-alive connection (hyper does not
//! reuse a connection whose body was not read), so a limited client pays a reconnect and
//! may land on another shard, within the `N` times bound above. Forgetting buckets still
//! in use is logged at warn but not yet counted in a metric; 429s are counted per shard
//! and route in `fanfinity_http_requests_total`.

use std::borrow::Borrow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use http::HeaderMap;
use tracing::warn;

use crate::app::config::LimitsConfig;

/// The TCP peer of the connection a request came on, put in the request's extensions by
/// the connection handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// `limits.per_key_events_per_sec`.
    KeyEvents,
    /// `limits.per_ip_requests_per_sec`.
    IpRequests,
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LimitKind::KeyEvents => "too many events for this API key",
            LimitKind::IpRequests => "too many requests from this address",
        })
    }
}

/// A request over a limit: answered 429 `rate_limited` with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{limit}; retry in {retry_after_secs} s")]
pub struct RateLimited {
    pub limit: LimitKind,
    /// Whole seconds until the bucket holds what the request costs, at least 1.
    pub retry_after_secs: u64,
}

/// A bucket's refill rate and size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: f64,
}

impl Rate {
    /// `None` when `per_sec` is 0 (the limit is off).
    pub fn new(per_sec: u32, burst: u32) -> Option<Self> {
        (per_sec > 0).then(|| Self {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst.max(1)),
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_sec).min(rate.burst);
        self.updated = now;
    }
}

/// Token buckets by client, at most `cap` of them (see the module's "Memory").
#[derive(Debug)]
pub struct BucketMap<K> {
    rate: Rate,
    cap: usize,
    buckets: HashMap<K, Bucket>,
    forgotten_in_use: usize,
}

/// What [`BucketMap::take`] refuses with: whole seconds to wait, at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    pub secs: u64,
}

impl<K: Hash + Eq> BucketMap<K> {
    pub fn new(rate: Rate, cap: usize) -> Self {
        Self {
            rate,
            cap: cap.max(1),
            buckets: HashMap::new(),
            forgotten_in_use: 0,
        }
    }

    /// Buckets held now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Takes `cost` tokens from `key`'s bucket, all or nothing. A cost above the burst is
    /// charged as the whole burst, so no request can be refused forever.
    ///
    /// # Errors
    /// [`Wait`] with the whole seconds until the bucket holds `cost`.
    pub fn take<Q>(&mut self, key: &Q, cost: f64, now: Instant) -> Result<(), Wait>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let rate = self.rate;
        let cost = cost.min(rate.burst);
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.cap {
            self.make_room(now);
        }
        let bucket = match self.buckets.get_mut(key) {
            Some(bucket) => {
                bucket.refill(rate, now);
                bucket
            }
            None => self.buckets.entry(key.to_owned()).or_insert(Bucket {
                tokens: rate.burst,
                updated: now,
            }),
        };
        if bucket.tokens >= cost {
            bucket.tokens -= cost;
            return Ok(());
        }
        let secs = ((cost - bucket.tokens) / rate.per_sec).ceil();
        Err(Wait {
            secs: (secs as u64).max(1),
        })
    }

    /// Returns tokens taken for a request that did not get served after all.
    pub fn give_back<Q>(&mut self, key: &Q, tokens: f64, now: Instant)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let rate = self.rate;
        if let Some(bucket) = self.buckets.get_mut(key) {
            bucket.refill(rate, now);
            bucket.tokens = (bucket.tokens + tokens).min(rate.burst);
        }
    }

    /// Forgets full buckets; if more than 3/4 of the cap remain, also the fullest ones,
    /// down to 3/4 of the cap. Counts those that were still in use.
    fn make_room(&mut self, now: Instant) {
        let rate = self.rate;
        self.buckets.retain(|_, bucket| {
            bucket.refill(rate, now);
            bucket.tokens < rate.burst
        });
        let target = self.cap - (self.cap / 4).max(1);
        if self.buckets.len() <= target {
            return;
        }
        let excess = self.buckets.len() - target;

        // The `excess` fullest buckets cost least to forget: their clients regain least.
        let mut tokens: Vec<f64> = self.buckets.values().map(|b| b.tokens).collect();
        let (_, threshold, _) = tokens.select_nth_unstable_by(excess - 1, |a, b| b.total_cmp(a));
        let threshold = *threshold;
        let before = self.buckets.len();
        self.buckets.retain(|_, bucket| bucket.tokens <= threshold);
        let mut ties = excess.saturating_sub(before - self.buckets.len());
        self.buckets.retain(|_, bucket| {
            if ties > 0 && bucket.tokens >= threshold {
                ties -= 1;
                return false;
            }
            true
        });
        self.forgotten_in_use += excess;
    }

    /// Buckets still in use that were forgotten to stay under the cap since the last
    /// call, for the log.
    pub fn take_forgotten(&mut self) -> usize {
        std::mem::take(&mut self.forgotten_in_use)
    }
}

/// The key a client IP is counted under: IPv4 as is (IPv4-mapped IPv6 included), IPv6
/// by its /64.
pub fn ip_bucket_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

/// The address a request is counted under: the TCP peer, or with `trust_forwarded_for`
/// the last address in `X-Forwarded-For` (the one the nearest proxy appended; anything
/// left of it is what the client claimed), when it parses. `None` when neither is known.
pub fn client_ip(
    peer: Option<PeerAddr>,
    headers: &HeaderMap,
    trust_forwarded_for: bool,
) -> Option<IpAddr> {
    if trust_forwarded_for {
        // Only the last entry: falling back to an earlier one would trust the client.
        let forwarded = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .next_back()
            .and_then(|last| {
                let last = last.trim();
                let with_port = last.parse::<SocketAddr>().map(|a| a.ip());
                last.parse::<IpAddr>().or(with_port).ok()
            });
        if forwarded.is_some() {
            return forwarded;
        }
    }
    peer.map(|p| p.0.ip())
}

/// One shard's rate limits. Not thread-safe by design: each shard owns its own.
#[derive(Debug)]
pub struct RateLimits {
    shard: usize,
    keys: Option<RefCell<BucketMap<String>>>,
    ips: Option<RefCell<BucketMap<IpAddr>>>,
    /// Whether `X-Forwarded-For` names the client (`limits.trust_forwarded_for`).
    pub trust_forwarded_for: bool,
}

impl RateLimits {
    pub fn new(config: &LimitsConfig, shard: usize) -> Self {
        let cap = config.max_buckets_per_shard;
        let keys = Rate::new(config.per_key_events_per_sec, config.per_key_burst);
        let ips = Rate::new(config.per_ip_requests_per_sec, config.per_ip_burst);
        Self {
            shard,
            keys: keys.map(|rate| RefCell::new(BucketMap::new(rate, cap))),
            ips: ips.map(|rate| RefCell::new(BucketMap::new(rate, cap))),
            trust_forwarded_for: config.trust_forwarded_for,
        }
    }

    /// Charges one request to the client's address.
    ///
    /// # Errors
    /// [`RateLimited`] when the address has no token left.
    pub fn check_ip(&self, ip: Option<IpAddr>, now: Instant) -> Result<(), RateLimited> {
        let (Some(ips), Some(ip)) = (&self.ips, ip) else {
            return Ok(());
        };
        let mut ips = ips.borrow_mut();
        let taken = ips.take(&ip_bucket_key(ip), 1.0, now);
        note_eviction(self.shard, "ip", &mut ips);
        taken.map_err(|wait| RateLimited {
            limit: LimitKind::IpRequests,
            retry_after_secs: wait.secs,
        })
    }

    /// Starts charging an event request to its key: one token now, before the body is
    /// read. `key_id` is `None` with auth off (then nothing is charged).
    ///
    /// # Errors
    /// [`RateLimited`] when the key has no token left.
    pub fn charge_key(
        &self,
        key_id: Option<String>,
        now: Instant,
    ) -> Result<KeyCharge<'_>, RateLimited> {
        let charge = KeyCharge {
            limits: self,
            key_id: key_id.filter(|_| self.keys.is_some()),
            taken: Cell::new(0.0),
        };
        charge.take(1.0, now)?;
        Ok(charge)
    }

    fn keys(&self) -> Option<std::cell::RefMut<'_, BucketMap<String>>> {
        self.keys.as_ref().map(RefCell::borrow_mut)
    }
}

/// Logs when a sweep had to forget buckets still in use: the limit is looser for those
/// clients from now on. At most once per quarter of the cap of new clients.
fn note_eviction<K: Hash + Eq>(shard: usize, limit: &'static str, map: &mut BucketMap<K>) {
    let forgotten = map.take_forgotten();
    if forgotten > 0 {
        warn!(
            shard,
            limit,
            forgotten,
            tracked = map.len(),
            cap = map.cap,
            "rate-limit buckets at their cap, forgot the fullest ones in use"
        );
    }
}

/// The tokens an event request has taken from its key so far, to be completed once its
/// events are counted and given back if the server fails it.
#[derive(Debug)]
pub struct KeyCharge<'a> {
    limits: &'a RateLimits,
    key_id: Option<String>,
    taken: Cell<f64>,
}

impl KeyCharge<'_> {
    fn take(&self, tokens: f64, now: Instant) -> Result<(), RateLimited> {
        let (Some(key_id), Some(mut keys)) = (&self.key_id, self.limits.keys()) else {
            return Ok(());
        };
        if tokens <= 0.0 {
            return Ok(());
        }
        let taken = keys.take(key_id.as_str(), tokens, now);
        note_eviction(self.limits.shard, "key", &mut keys);
        taken.map_err(|wait| RateLimited {
            limit: LimitKind::KeyEvents,
            retry_after_secs: wait.secs,
        })?;
        self.taken.set(self.taken.get() + tokens);
        Ok(())
    }

    /// Charges the rest of a request of `events` events (one token was taken up front).
    ///
    /// # Errors
    /// [`RateLimited`] when the key has fewer tokens than that; nothing more is taken.
    pub fn charge_events(&self, events: usize, now: Instant) -> Result<(), RateLimited> {
        self.take(events as f64 - 1.0, now)
    }

    /// Gives every token back: the server, not the client, failed the request.
    pub fn refund(&self, now: Instant) {
        if let (Some(key_id), Some(mut keys)) = (&self.key_id, self.limits.keys()) {
            keys.give_back(key_id.as_str(), self.taken.replace(0.0), now);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;

    fn rate(per_sec: u32, burst: u32) -> Rate {
        Rate::new(per_sec, burst).expect("limit on")
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let mut map: BucketMap<String> = BucketMap::new(rate(10, 5), 100);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(map.take("k", 1.0, t0), Ok(()));
        }
        assert_eq!(map.take("k", 1.0, t0), Err(Wait { secs: 1 }));
        assert_eq!(
            map.take("other", 1.0, t0),
            Ok(()),
            "another key is unaffected"
        );
        let later = t0 + Duration::from_millis(300);
        assert_eq!(
            map.take("k", 3.0, later),
            Ok(()),
            "3 tokens back after 0.3 s"
        );
        assert!(map.take("k", 1.0, later).is_err());
    }

    #[test]
    fn retry_after_is_the_whole_seconds_until_the_cost_is_there() {
        let mut map: BucketMap<String> = BucketMap::new(rate(100, 1000), 100);
        let t0 = Instant::now();
        assert_eq!(map.take("k", 1000.0, t0), Ok(()));
        assert_eq!(map.take("k", 250.0, t0), Err(Wait { secs: 3 }));
        assert_eq!(map.take("k", 1.0, t0), Err(Wait { secs: 1 }), "at least 1");
    }

    #[test]
    fn a_request_above_the_burst_costs_the_burst_and_can_pass() {
        let mut map: BucketMap<String> = BucketMap::new(rate(10, 50), 100);
        assert_eq!(map.take("k", 1000.0, Instant::now()), Ok(()));
    }

    #[test]
    fn tokens_given_back_are_usable_again_but_never_above_the_burst() {
        let mut map: BucketMap<String> = BucketMap::new(rate(1, 10), 100);
        let t0 = Instant::now();
        assert_eq!(map.take("k", 10.0, t0), Ok(()));
        map.give_back("k", 25.0, t0);
        assert_eq!(map.take("k", 10.0, t0), Ok(()));
        assert!(map.take("k", 1.0, t0).is_err());
    }

    #[test]
    fn a_million_distinct_addresses_never_hold_more_than_the_cap() {
        let cap = 1000;
        let mut map: BucketMap<IpAddr> = BucketMap::new(rate(1, 100), cap);
        let t0 = Instant::now();
        for i in 0..1_000_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(i));
            let _ = map.take(&ip, 1.0, t0);
            assert!(map.len() <= cap, "{} buckets after {i}", map.len());
        }
        assert!(map.len() >= cap / 2, "still tracking recent clients");
    }

    #[test]
    fn at_the_cap_full_buckets_go_first_and_a_busy_client_stays_limited() {
        let cap = 100;
        let mut map: BucketMap<IpAddr> = BucketMap::new(rate(1, 10), cap);
        let t0 = Instant::now();
        let busy = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        for _ in 0..10 {
            assert_eq!(map.take(&busy, 1.0, t0), Ok(()));
        }
        // 99 idle clients, each with 1 token used; they are full again 1 s later.
        for i in 0..99u32 {
            let _ = map.take(&IpAddr::V4(Ipv4Addr::from(i + 1000)), 1.0, t0);
        }
        assert_eq!(map.len(), cap);
        let t1 = t0 + Duration::from_millis(1500);
        let _ = map.take(&IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 1.0, t1);
        assert_eq!(
            map.len(),
            2,
            "only the busy client and the new one are kept"
        );
        assert_eq!(
            map.take(&busy, 2.0, t1),
            Err(Wait { secs: 1 }),
            "busy keeps its debt"
        );

        // All in use: the fullest are forgotten, the emptiest (the busy one) stays.
        for i in 0..200u32 {
            let _ = map.take(&IpAddr::V4(Ipv4Addr::from(i + 5000)), 1.0, t1);
            assert!(map.len() <= cap);
        }
        assert!(
            map.take(&busy, 2.0, t1).is_err(),
            "the busy client was not reset"
        );
    }

    #[test]
    fn ipv6_clients_are_counted_per_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(ip_bucket_key(a), ip_bucket_key(b));
        assert_ne!(ip_bucket_key(a), ip_bucket_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
        assert_eq!(
            ip_bucket_key(mapped),
            "192.0.2.7".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn forwarded_for_is_read_only_when_trusted_and_then_its_last_entry() {
        let peer = Some(PeerAddr(([127, 0, 0, 1], 5000).into()));
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, 203.0.113.9".parse().expect("header"),
        );
        let loopback: IpAddr = [127, 0, 0, 1].into();
        assert_eq!(client_ip(peer, &headers, false), Some(loopback));
        assert_eq!(
            client_ip(peer, &headers, true),
            Some("203.0.113.9".parse().expect("ip"))
        );
        assert_eq!(client_ip(peer, &HeaderMap::new(), true), Some(loopback));
        headers.insert(
            "x-forwarded-for",
            "6.6.6.6, garbage".parse().expect("header"),
        );
        assert_eq!(
            client_ip(peer, &headers, true),
            Some(loopback),
            "never an earlier one"
        );
    }

    #[test]
    fn key_charges_count_events_and_refund_on_server_failure() {
        let config = LimitsConfig {
            per_key_events_per_sec: 1,
            per_key_burst: 100,
            ..LimitsConfig::default()
        };
        let limits = RateLimits::new(&config, 0);
        let t0 = Instant::now();
        let key = || Some("k1".to_string());
        let charge = limits.charge_key(key(), t0).expect("first token");
        assert_eq!(charge.charge_events(60, t0), Ok(()));
        charge.refund(t0);
        let charge = limits.charge_key(key(), t0).expect("refunded");
        assert_eq!(charge.charge_events(100, t0), Ok(()));
        let refused = limits.charge_key(key(), t0).expect_err("empty");
        assert_eq!(refused.limit, LimitKind::KeyEvents);
        assert!(limits.charge_key(None, t0).is_ok(), "no key, no key limit");
    }
}
