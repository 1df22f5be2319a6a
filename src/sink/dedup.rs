//! Drops rows that are already in ClickHouse before they are inserted, because the
//! aggregates of migration 2 count every inserted row.
//!
//! Materialized views (`event_counts`, `reaction_counts`, `poll_votes`, `fan_counts`)
//! add each INSERT to their sums; the raw `events` table collapsing repeats on merge does
//! not undo a sum. So before every insert, including each half of a bisect and each
//! retry after a failed or ambiguous insert, [`Dedup`] keeps only the rows that are new:
//!
//! 1. **Repeats inside the batch** of one `(match_id, event_id)`: the first is kept
//!    ([`first_occurrences`]).
//! 2. **Redelivered** rows, whose Kafka position (`kafka_partition`, `kafka_offset` of
//!    the events topic) is already in `event_ledger`: a batch read again after a crash
//!    before its offsets were committed, or an insert that timed out but landed. One
//!    range query per partition per insert, by the ledger's primary key.
//! 3. **Resent** events, whose `(match_id, event_id)` this consumer thread inserted
//!    recently under another offset (a client that retried a request it thought failed):
//!    a bounded [`RecentWindow`] of hashes, warmed from the ledger the first time a
//!    partition shows up.
//!
//! Dropped rows are treated as written: their offsets are stored like the rest.
//!
//! # Limits
//! - A resend older than the window (`sink.dedup_window` events of this thread) is
//!   inserted again and counts twice in the aggregates (the raw table still collapses it).
//! - The ledger is read before the insert, not atomically with it: an insert that timed
//!   out on our side but is still running in ClickHouse when its retry checks the ledger
//!   is inserted twice. Likewise a zombie consumer that lost its partitions in a
//!   rebalance but still inserts races the new owner.
//! - The window is per thread: a resend consumed by another thread (another partition,
//!   or the retry consumer) is caught only if it is in that thread's window, which is
//!   warmed once per partition and not refreshed with other threads' inserts.

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};
use std::sync::atomic::Ordering;

use clickhouse::Row;
use serde::Deserialize;
use tracing::{info, warn};
use uuid::Uuid;

use super::row::EventRow;
use super::status::SinkStatus;
use super::writer::BatchWriter;
use super::SinkError;

/// The table every inserted row's Kafka position lands in (migration 2).
pub const LEDGER_TABLE: &str = "event_ledger";

/// Offsets of one partition further apart than this are checked with separate range
/// queries, so scattered offsets (retried rows) never read a long stretch of ledger.
const MAX_RANGE_GAP: i64 = 4_096;

/// Why a row was dropped: the `reason` label of
/// `fanfinity_sink_duplicates_dropped_total` and of the log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropReason {
    /// Its Kafka position is already in the ledger.
    Redelivered,
    /// Its `(match_id, event_id)` was earlier in the batch or in the recent window.
    Resent,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Redelivered => "redelivered",
            DropReason::Resent => "resent",
        }
    }
}

/// Rows dropped, per (partition, reason), until they are counted and logged.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tally(BTreeMap<(i32, DropReason), u64>);

impl Tally {
    fn add(&mut self, partition: i32, reason: DropReason) {
        *self.0.entry((partition, reason)).or_default() += 1;
    }

    /// Rows dropped for `reason`, over all partitions.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.0
            .iter()
            .filter(|((_, r), _)| *r == reason)
            .map(|(_, n)| n)
            .sum()
    }

    /// Adds the drops to the sink's counters and logs one line per partition and reason.
    pub fn report(&self, status: &SinkStatus, consumer: &str) {
        for (&(partition, reason), &dropped) in &self.0 {
            let counter = match reason {
                DropReason::Redelivered => &status.duplicates_redelivered,
                DropReason::Resent => &status.duplicates_resent,
            };
            counter.fetch_add(dropped, Ordering::Relaxed);
            info!(
                consumer,
                partition,
                dropped,
                reason = reason.as_str(),
                "duplicates dropped before insert"
            );
        }
    }
}

/// Indices of the rows whose `(match_id, event_id)` appears for the first time in
/// `rows`, ascending, and the repeats dropped. Exact (no hashing): a batch is small.
pub fn first_occurrences(rows: &[EventRow]) -> (Vec<usize>, Tally) {
    let mut seen: HashSet<(&str, Uuid)> = HashSet::with_capacity(rows.len());
    let mut keep = Vec::with_capacity(rows.len());
    let mut tally = Tally::default();
    for (index, row) in rows.iter().enumerate() {
        if seen.insert((row.match_id.as_str(), row.event_id)) {
            keep.push(index);
        } else {
            tally.add(row.kafka_partition, DropReason::Resent);
        }
    }
    (keep, tally)
}

/// A bounded FIFO set of 64-bit hashes of `(match_id, event_id)`: the events one
/// consumer thread inserted most recently.
///
/// Hashes, not keys, keep an entry at a fixed, small size. Memory: 8 bytes in the FIFO
/// plus a hash-set slot (8 bytes and a control byte, at most 7/8 full, rounded to a power
/// of two): about 27 bytes per entry at worst, 13.5 MB for the default 500,000. Nothing
/// is allocated up front; the window grows as events are inserted.
///
/// Collisions: hashes are SipHash-1-3 with keys drawn at random per window, so clients
/// cannot aim at one. A new event is wrongly taken for a resend when its hash equals one
/// of the `n` in the window: probability `n / 2^64`, about 2.7e-14 at 500,000, or one
/// event wrongly dropped per 3.7e13 events.
pub struct RecentWindow {
    capacity: usize,
    order: VecDeque<u64>,
    members: HashSet<u64, BuildHasherDefault<PassThrough>>,
    keys: RandomState,
}

impl RecentWindow {
    /// A window of `capacity` entries; 0 remembers nothing.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            order: VecDeque::new(),
            members: HashSet::default(),
            keys: RandomState::new(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.capacity > 0
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// The entry for one event.
    pub fn key(&self, match_id: &str, event_id: &Uuid) -> u64 {
        self.keys.hash_one((match_id, event_id.as_bytes()))
    }

    pub fn contains(&self, key: u64) -> bool {
        self.members.contains(&key)
    }

    /// Adds `key`, evicting the oldest entry when full. A key already present keeps its
    /// place (it is not refreshed): the window counts distinct events.
    pub fn insert(&mut self, key: u64) {
        if self.capacity == 0 || !self.members.insert(key) {
            return;
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.members.remove(&oldest);
            }
        }
    }
}

/// The hash set's hasher for keys that are already SipHash outputs: hashing them again
/// would only cost time.
#[derive(Default)]
pub struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

/// One ledger row, as read to warm the window.
#[derive(Debug, Row, Deserialize)]
struct LedgerEvent {
    match_id: String,
    #[serde(with = "clickhouse::serde::uuid")]
    event_id: Uuid,
}

/// One consumer thread's dedup state: its recent window and which partitions it has
/// warmed the window for.
pub struct Dedup {
    consumer: String,
    window: RecentWindow,
    warmed: HashSet<i32>,
}

impl Dedup {
    /// `window`: `sink.dedup_window`.
    pub fn new(consumer: &str, window: usize) -> Self {
        Self {
            consumer: consumer.to_string(),
            window: RecentWindow::new(window),
            warmed: HashSet::new(),
        }
    }

    /// Entries in the recent window.
    pub fn window_len(&self) -> usize {
        self.window.len()
    }

    /// Warms the window again for every partition as it shows up: after a rebalance
    /// another thread may have inserted into a partition this one owned before.
    pub fn forget_warmth(&mut self) {
        self.warmed.clear();
    }

    /// The rows of `part` (indices into `rows`, ascending) that are neither in the ledger
    /// nor in the recent window, ascending, and what was dropped. Repeats inside `part`
    /// must already be gone ([`first_occurrences`]).
    ///
    /// # Errors
    /// [`SinkError::Dedup`] or [`SinkError::DedupTimeout`] when ClickHouse cannot answer:
    /// the caller handles it like a failed insert (retry, nothing committed).
    pub fn unseen(
        &mut self,
        writer: &BatchWriter,
        rows: &[EventRow],
        part: &[usize],
    ) -> Result<(Vec<usize>, Tally), SinkError> {
        let mut by_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
        for &i in part {
            let row = &rows[i];
            // Rows not read from Kafka (negative partition) have no position to check.
            if row.kafka_partition >= 0 {
                by_partition
                    .entry(row.kafka_partition)
                    .or_default()
                    .push(row.kafka_offset);
            }
        }
        for &partition in by_partition.keys() {
            self.warm(writer, partition)?;
        }
        let mut in_ledger: HashSet<(i32, i64)> = HashSet::new();
        for (partition, offsets) in &mut by_partition {
            offsets.sort_unstable();
            for (first, last) in ranges(offsets) {
                for offset in ledger_offsets(writer, *partition, first, last)? {
                    in_ledger.insert((*partition, offset));
                }
            }
        }

        let mut keep = Vec::with_capacity(part.len());
        let mut tally = Tally::default();
        for &i in part {
            let row = &rows[i];
            if in_ledger.contains(&(row.kafka_partition, row.kafka_offset)) {
                tally.add(row.kafka_partition, DropReason::Redelivered);
            } else if self
                .window
                .contains(self.window.key(&row.match_id, &row.event_id))
            {
                tally.add(row.kafka_partition, DropReason::Resent);
            } else {
                keep.push(i);
            }
        }
        Ok((keep, tally))
    }

    /// Adds the rows of `part` to the window. Call only once they are in ClickHouse
    /// (inserted, or dropped because they already were).
    pub fn remember(&mut self, rows: &[EventRow], part: &[usize]) {
        if !self.window.is_enabled() {
            return;
        }
        for &i in part {
            let key = self.window.key(&rows[i].match_id, &rows[i].event_id);
            self.window.insert(key);
        }
    }

    /// Loads the newest `sink.dedup_window` ledger rows of `partition` into the window,
    /// the first time this thread sees the partition, so a resend right after a restart
    /// or a rebalance is still caught.
    fn warm(&mut self, writer: &BatchWriter, partition: i32) -> Result<(), SinkError> {
        if !self.window.is_enabled() || self.warmed.contains(&partition) {
            return Ok(());
        }
        let query = writer
            .client()
            .query(
                "SELECT match_id, event_id FROM ? WHERE kafka_partition = ? \
                 ORDER BY kafka_offset DESC LIMIT ?",
            )
            .bind(clickhouse::sql::Identifier(LEDGER_TABLE))
            .bind(partition)
            .bind(self.window.capacity as u64);
        let newest = match writer.run_bounded(query.fetch_all::<LedgerEvent>()) {
            Some(Ok(rows)) => rows,
            Some(Err(source)) => {
                return Err(SinkError::Dedup {
                    what: "warm the recent window",
                    partition,
                    source,
                })
            }
            None => {
                return Err(SinkError::DedupTimeout {
                    what: "warm the recent window",
                    partition,
                    timeout_ms: writer.timeout_ms(),
                })
            }
        };
        // Oldest first, so the newest are evicted last.
        for event in newest.iter().rev() {
            let key = self.window.key(&event.match_id, &event.event_id);
            self.window.insert(key);
        }
        if newest.len() == self.window.capacity {
            warn!(
                consumer = %self.consumer,
                partition,
                loaded = newest.len(),
                "recent window filled by one partition's ledger; other partitions of \
                 this thread start with fewer entries"
            );
        }
        info!(
            consumer = %self.consumer,
            partition,
            loaded = newest.len(),
            window = self.window.len(),
            "recent window warmed from the ledger"
        );
        self.warmed.insert(partition);
        Ok(())
    }
}

/// Sorted offsets cut into `(first, last)` ranges wherever two neighbours are more
/// than [`MAX_RANGE_GAP`] apart.
fn ranges(sorted: &[i64]) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = Vec::new();
    for &offset in sorted {
        match out.last_mut() {
            Some((_, last)) if offset - *last <= MAX_RANGE_GAP => *last = offset,
            _ => out.push((offset, offset)),
        }
    }
    out
}

/// The offsets of `partition` between `first` and `last` (inclusive) already in the
/// ledger.
fn ledger_offsets(
    writer: &BatchWriter,
    partition: i32,
    first: i64,
    last: i64,
) -> Result<Vec<i64>, SinkError> {
    let query = writer
        .client()
        .query(
            "SELECT kafka_offset FROM ? \
             WHERE kafka_partition = ? AND kafka_offset >= ? AND kafka_offset <= ?",
        )
        .bind(clickhouse::sql::Identifier(LEDGER_TABLE))
        .bind(partition)
        .bind(first)
        .bind(last);
    match writer.run_bounded(query.fetch_all::<i64>()) {
        Some(Ok(offsets)) => Ok(offsets),
        Some(Err(source)) => Err(SinkError::Dedup {
            what: "check the ledger",
            partition,
            source,
        }),
        None => Err(SinkError::DedupTimeout {
            what: "check the ledger",
            partition,
            timeout_ms: writer.timeout_ms(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::row::KafkaPosition;

    fn row(match_id: &str, event_id: Uuid, partition: i32, offset: i64) -> EventRow {
        let record = crate::event::EventRecord {
            event_id,
            match_id: match_id.into(),
            user_id: "fan".into(),
            event_type: crate::event::EventType::Cheer,
            ts: None,
            team: None,
            payload: None,
            received_at: 1_700_000_000_000,
        };
        EventRow::from_record(record, KafkaPosition { partition, offset })
    }

    #[test]
    fn window_evicts_the_oldest_first() {
        let mut window = RecentWindow::new(3);
        for key in [1, 2, 3, 4] {
            window.insert(key);
        }
        assert_eq!(window.len(), 3);
        assert!(!window.contains(1), "the oldest went first");
        assert!(window.contains(2) && window.contains(3) && window.contains(4));
        window.insert(5);
        assert!(!window.contains(2));
        assert!(window.contains(5));
    }

    #[test]
    fn window_never_exceeds_its_capacity() {
        let mut window = RecentWindow::new(100);
        for key in 0..10_000u64 {
            window.insert(key);
            assert!(window.len() <= 100);
        }
        assert_eq!(window.len(), 100);
        assert!((9_900..10_000).all(|k| window.contains(k)));
        assert!(!window.contains(9_899));
    }

    #[test]
    fn a_key_present_twice_takes_one_place() {
        let mut window = RecentWindow::new(2);
        window.insert(7);
        window.insert(7);
        window.insert(8);
        assert_eq!(window.len(), 2);
        assert!(window.contains(7) && window.contains(8));
    }

    #[test]
    fn a_disabled_window_remembers_nothing() {
        let mut window = RecentWindow::new(0);
        window.insert(1);
        assert!(window.is_empty());
        assert!(!window.contains(1));
        let mut dedup = Dedup::new("sink-0", 0);
        let rows = vec![row("m", Uuid::new_v4(), 0, 1)];
        dedup.remember(&rows, &[0]);
        assert_eq!(dedup.window_len(), 0);
    }

    #[test]
    fn keys_tell_matches_and_events_apart() {
        let window = RecentWindow::new(10);
        let id = Uuid::new_v4();
        assert_eq!(window.key("m1", &id), window.key("m1", &id));
        assert_ne!(window.key("m1", &id), window.key("m2", &id));
        assert_ne!(window.key("m1", &id), window.key("m1", &Uuid::new_v4()));
    }

    #[test]
    fn remembered_events_are_in_the_window() {
        let mut dedup = Dedup::new("sink-0", 10);
        let rows = vec![
            row("m", Uuid::new_v4(), 0, 1),
            row("m", Uuid::new_v4(), 0, 2),
        ];
        dedup.remember(&rows, &[1]);
        let key = |r: &EventRow| dedup.window.key(&r.match_id, &r.event_id);
        assert!(dedup.window.contains(key(&rows[1])));
        assert!(!dedup.window.contains(key(&rows[0])));
    }

    #[test]
    fn in_batch_repeats_keep_the_first() {
        let a = Uuid::new_v4();
        let b = Uuid::new_v4();
        let rows = vec![
            row("m1", a, 0, 10),
            row("m1", b, 0, 11),
            row("m1", a, 1, 5),
            row("m2", a, 1, 6),
            row("m1", b, 0, 12),
        ];
        let (keep, tally) = first_occurrences(&rows);
        assert_eq!(
            keep,
            vec![0, 1, 3],
            "same id in another match is another event"
        );
        assert_eq!(tally.dropped(DropReason::Resent), 2);
        assert_eq!(tally.dropped(DropReason::Redelivered), 0);
        assert_eq!(tally.0.get(&(1, DropReason::Resent)), Some(&1));
        assert_eq!(tally.0.get(&(0, DropReason::Resent)), Some(&1));
    }

    #[test]
    fn a_batch_without_repeats_is_kept_whole() {
        let rows: Vec<EventRow> = (0..5).map(|i| row("m", Uuid::new_v4(), 0, i)).collect();
        let (keep, tally) = first_occurrences(&rows);
        assert_eq!(keep, vec![0, 1, 2, 3, 4]);
        assert_eq!(tally, Tally::default());
    }

    #[test]
    fn scattered_offsets_are_checked_in_separate_ranges() {
        assert_eq!(ranges(&[]), vec![]);
        assert_eq!(ranges(&[1, 2, 3, 10]), vec![(1, 10)]);
        assert_eq!(
            ranges(&[5, 6, 5 + MAX_RANGE_GAP + 7, 1_000_000]),
            vec![
                (5, 6),
                (5 + MAX_RANGE_GAP + 7, 5 + MAX_RANGE_GAP + 7),
                (1_000_000, 1_000_000)
            ]
        );
    }
}
