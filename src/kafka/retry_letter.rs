//! A row ClickHouse refused for its content, parked on `fanfinity.events.retry` until its
//! next attempt.
//!
//! The record keeps the original key and bytes; everything the retry consumer needs rides
//! in headers, so the topic stays readable with any Kafka tool:
//!
//! | header | value |
//! |---|---|
//! | `fanfinity-attempt` | attempts made so far (1 after the main sink's refusal) |
//! | `fanfinity-first-error` | ClickHouse's reason the first time |
//! | `fanfinity-last-error` | its reason the last time |
//! | `fanfinity-source-topic` / `-partition` / `-offset` | where the event was first read |
//! | `fanfinity-next-attempt-at-ms` | Unix ms before which it is not retried |
//! | `fanfinity-failed-at-ms` | Unix ms of the last refusal |
//!
//! Keeping the original position across attempts means the row finally stored carries
//! the same `kafka_partition`/`kafka_offset` the main sink would have written, and a dead
//! letter names the events-topic record, not a hop on the retry topic.

use std::time::Duration;

use rdkafka::message::{Header, Headers, OwnedHeaders};

pub const ATTEMPT: &str = "fanfinity-attempt";
pub const FIRST_ERROR: &str = "fanfinity-first-error";
pub const LAST_ERROR: &str = "fanfinity-last-error";
pub const SOURCE_TOPIC: &str = "fanfinity-source-topic";
pub const SOURCE_PARTITION: &str = "fanfinity-source-partition";
pub const SOURCE_OFFSET: &str = "fanfinity-source-offset";
pub const NEXT_ATTEMPT_AT_MS: &str = "fanfinity-next-attempt-at-ms";
pub const FAILED_AT_MS: &str = "fanfinity-failed-at-ms";

/// Longest error text kept in a header: ClickHouse messages can quote whole rows.
const MAX_ERROR_CHARS: usize = 1_000;

/// One refused row waiting for another attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub attempt: u32,
    pub first_error: String,
    pub last_error: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub next_attempt_at_ms: i64,
    pub failed_at_ms: i64,
}

/// When, after `attempt` refusals, the next attempt is due: `base` doubled per earlier
/// attempt, capped at `max`.
pub fn delay_after(attempt: u32, base: Duration, max: Duration) -> Duration {
    let doublings = attempt.saturating_sub(1).min(30);
    base.saturating_mul(1 << doublings).min(max)
}

impl RetryLetter {
    /// The letter for a row refused for the first time.
    #[allow(clippy::too_many_arguments)]
    pub fn first(
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        error: &str,
        source_topic: &str,
        source_partition: i32,
        source_offset: i64,
        now_ms: i64,
        delay: Duration,
    ) -> Self {
        let error = clip(error);
        Self {
            key,
            payload,
            attempt: 1,
            first_error: error.clone(),
            last_error: error,
            source_topic: source_topic.to_string(),
            source_partition,
            source_offset,
            next_attempt_at_ms: now_ms.saturating_add(delay.as_millis() as i64),
            failed_at_ms: now_ms,
        }
    }

    /// The same letter after one more refusal.
    pub fn refused_again(mut self, error: &str, now_ms: i64, delay: Duration) -> Self {
        self.attempt = self.attempt.saturating_add(1);
        self.last_error = clip(error);
        self.failed_at_ms = now_ms;
        self.next_attempt_at_ms = now_ms.saturating_add(delay.as_millis() as i64);
        self
    }

    /// Milliseconds until the letter is due (zero when it is).
    pub fn wait_ms(&self, now_ms: i64) -> u64 {
        u64::try_from(self.next_attempt_at_ms.saturating_sub(now_ms)).unwrap_or(0)
    }

    /// The headers written with the record.
    pub fn headers(&self) -> OwnedHeaders {
        let numbers = [
            (ATTEMPT, self.attempt.to_string()),
            (SOURCE_PARTITION, self.source_partition.to_string()),
            (SOURCE_OFFSET, self.source_offset.to_string()),
            (NEXT_ATTEMPT_AT_MS, self.next_attempt_at_ms.to_string()),
            (FAILED_AT_MS, self.failed_at_ms.to_string()),
        ];
        let texts = [
            (FIRST_ERROR, self.first_error.as_str()),
            (LAST_ERROR, self.last_error.as_str()),
            (SOURCE_TOPIC, self.source_topic.as_str()),
        ];
        let mut headers = OwnedHeaders::new_with_capacity(numbers.len() + texts.len());
        for (key, value) in &numbers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_str()),
            });
        }
        for (key, value) in texts {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        headers
    }

    /// Reads a letter back from a retry-topic record.
    ///
    /// # Errors
    /// The header that is missing or unreadable: the record was not written by fanfinity
    /// (or by an incompatible version) and goes to the dead topic with that reason.
    pub fn from_record(
        key: Option<&[u8]>,
        payload: &[u8],
        headers: Option<&impl Headers>,
    ) -> Result<Self, String> {
        let text = |name: &str| -> Result<String, String> {
            headers
                .and_then(|hs| hs.iter().find(|h| h.key == name))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .ok_or_else(|| format!("retry record without header {name}"))
        };
        let number = |name: &str| -> Result<i64, String> {
            text(name)?
                .parse::<i64>()
                .map_err(|_| format!("retry record header {name} is not a number"))
        };
        let attempt = u32::try_from(number(ATTEMPT)?)
            .ok()
            .filter(|a| *a >= 1)
            .ok_or_else(|| format!("retry record header {ATTEMPT} out of range"))?;
        let source_partition = i32::try_from(number(SOURCE_PARTITION)?)
            .map_err(|_| format!("retry record header {SOURCE_PARTITION} out of range"))?;
        Ok(Self {
            key: key.map(<[u8]>::to_vec),
            payload: payload.to_vec(),
            attempt,
            first_error: text(FIRST_ERROR)?,
            last_error: text(LAST_ERROR)?,
            source_topic: text(SOURCE_TOPIC)?,
            source_partition,
            source_offset: number(SOURCE_OFFSET)?,
            next_attempt_at_ms: number(NEXT_ATTEMPT_AT_MS)?,
            failed_at_ms: number(FAILED_AT_MS).unwrap_or(0),
        })
    }
}

fn clip(error: &str) -> String {
    match error.char_indices().nth(MAX_ERROR_CHARS) {
        Some((end, _)) => format!("{}...", &error[..end]),
        None => error.to_string(),
    }
}

/// The current time in Unix milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter() -> RetryLetter {
        RetryLetter::first(
            Some(b"m1".to_vec()),
            b"{\"x\":1}".to_vec(),
            "Code: 395, value passed to throwIf",
            "fanfinity.events",
            2,
            41,
            1_000,
            Duration::from_secs(30),
        )
    }

    #[test]
    fn headers_round_trip() {
        let sent = letter().refused_again("second reason", 50_000, Duration::from_secs(60));
        let headers = sent.headers();
        let read =
            RetryLetter::from_record(Some(b"m1"), b"{\"x\":1}", Some(&headers)).expect("readable");
        assert_eq!(read, sent);
        assert_eq!(read.attempt, 2);
        assert_eq!(read.first_error, "Code: 395, value passed to throwIf");
        assert_eq!(read.last_error, "second reason");
        assert_eq!(read.next_attempt_at_ms, 110_000);
    }

    #[test]
    fn a_record_without_our_headers_is_named() {
        let err = RetryLetter::from_record(None, b"x", None::<&OwnedHeaders>).unwrap_err();
        assert!(err.contains(ATTEMPT), "{err}");
        let partial = OwnedHeaders::new().insert(Header {
            key: ATTEMPT,
            value: Some("zero"),
        });
        let err = RetryLetter::from_record(None, b"x", Some(&partial)).unwrap_err();
        assert!(err.contains("not a number"), "{err}");
    }

    #[test]
    fn delays_double_and_cap() {
        let base = Duration::from_secs(30);
        let max = Duration::from_secs(100);
        let seen: Vec<u64> = (1..=4)
            .map(|a| delay_after(a, base, max).as_secs())
            .collect();
        assert_eq!(seen, vec![30, 60, 100, 100]);
        assert_eq!(delay_after(u32::MAX, base, max), max);
    }

    #[test]
    fn long_errors_are_clipped_and_wait_never_underflows() {
        let long = "é".repeat(5_000);
        let l = RetryLetter::first(None, vec![], &long, "t", 0, 0, 0, Duration::ZERO);
        assert_eq!(l.first_error.chars().count(), MAX_ERROR_CHARS + 3);
        assert_eq!(l.wait_ms(10), 0);
        assert_eq!(letter().wait_ms(1_000), 30_000);
    }
}
