//! Parsing and validation of the metrics endpoint's query string.
//!
//! Values end up in SQL only as bound numbers and a match id that passed the strict
//! `[A-Za-z0-9_.:-]` check, never as raw text.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::QueryError;
use crate::event::is_valid_match_id;

/// Largest bucket: one day.
const MAX_BUCKET_SECS: u32 = 86_400;

/// A validated metrics request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsParams {
    pub match_id: String,
    /// Inclusive lower bound on event time, epoch seconds.
    pub from_secs: Option<u32>,
    /// Exclusive upper bound on event time, epoch seconds.
    pub to_secs: Option<u32>,
    pub bucket_secs: u32,
}

impl MetricsParams {
    /// Reads `from`, `to` (RFC 3339 or epoch milliseconds) and `bucket` (`10s`, `1m`,
    /// `5m`, `1h` or plain seconds; default `60s`).
    ///
    /// # Errors
    /// [`QueryError::BadParam`] naming the first bad parameter; unknown parameters too,
    /// so a typo such as `form=` is not silently ignored.
    pub fn parse(match_id: &str, query: Option<&str>) -> Result<Self, QueryError> {
        if !is_valid_match_id(match_id) {
            return Err(bad(
                "match_id",
                "must be 1-64 characters of [A-Za-z0-9_.:-]",
            ));
        }
        let mut params = MetricsParams {
            match_id: match_id.to_string(),
            from_secs: None,
            to_secs: None,
            bucket_secs: 60,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value =
                percent_decode(value).ok_or_else(|| bad("query", "bad percent-encoding"))?;
            match key {
                "from" => params.from_secs = Some(parse_time("from", &value)?),
                "to" => params.to_secs = Some(parse_time("to", &value)?),
                "bucket" => params.bucket_secs = parse_bucket(&value)?,
                _ => return Err(bad("query", &format!("unknown parameter {key:?}"))),
            }
        }
        if let (Some(from), Some(to)) = (params.from_secs, params.to_secs) {
            if from >= to {
                return Err(bad("to", "must be after from"));
            }
        }
        Ok(params)
    }

    /// Refuses a window that would need more than `max` timeline buckets.
    ///
    /// # Errors
    /// [`QueryError::BadParam`] on `bucket`.
    pub fn check_bucket_count(&self, first: u32, last: u32, max: u64) -> Result<(), QueryError> {
        let span = u64::from(last.saturating_sub(first));
        let buckets = span / u64::from(self.bucket_secs) + 1;
        if buckets > max {
            return Err(bad(
                "bucket",
                &format!("window needs {buckets} buckets, more than {max}; use a larger bucket"),
            ));
        }
        Ok(())
    }
}

fn bad(param: &'static str, reason: &str) -> QueryError {
    QueryError::BadParam {
        param,
        reason: reason.to_string(),
    }
}

fn parse_time(param: &'static str, value: &str) -> Result<u32, QueryError> {
    let secs = if let Ok(ms) = value.parse::<i64>() {
        ms.div_euclid(1000)
    } else {
        OffsetDateTime::parse(value, &Rfc3339)
            .map_err(|_| bad(param, "must be RFC 3339 or epoch milliseconds"))?
            .unix_timestamp()
    };
    u32::try_from(secs).map_err(|_| bad(param, "must be between 1970 and 2106"))
}

fn parse_bucket(value: &str) -> Result<u32, QueryError> {
    let (digits, unit) = match value.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => value.split_at(i),
        None => (value, "s"),
    };
    let multiplier = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(bad("bucket", "unit must be s, m or h")),
    };
    let secs = digits
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .filter(|s| (1..=MAX_BUCKET_SECS).contains(s))
        .ok_or_else(|| bad("bucket", "must be between 1s and 24h"))?;
    Ok(secs)
}

/// Decodes `%XX` escapes and `+`; `None` for a malformed escape or non-UTF-8 result.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_sixty_second_buckets_and_whole_match() {
        let p = MetricsParams::parse("m1", None).expect("valid");
        assert_eq!((p.bucket_secs, p.from_secs, p.to_secs), (60, None, None));
    }

    #[test]
    fn reads_rfc3339_epoch_ms_and_bucket_units() {
        let p = MetricsParams::parse(
            "m1",
            Some("from=2022-12-18T15%3A00%3A00Z&to=1671390000000&bucket=5m"),
        )
        .expect("valid");
        assert_eq!(p.from_secs, Some(1_671_375_600));
        assert_eq!(p.to_secs, Some(1_671_390_000));
        assert_eq!(p.bucket_secs, 300);
        assert_eq!(
            MetricsParams::parse("m", Some("bucket=10s"))
                .expect("ok")
                .bucket_secs,
            10
        );
        assert_eq!(
            MetricsParams::parse("m", Some("bucket=60"))
                .expect("ok")
                .bucket_secs,
            60
        );
    }

    #[test]
    fn refuses_bad_bucket_window_and_unknown_params() {
        for q in [
            "bucket=0s",
            "bucket=2d",
            "bucket=abc",
            "from=yesterday",
            "form=1",
            "from=5000&to=1000",
        ] {
            assert!(MetricsParams::parse("m", Some(q)).is_err(), "{q}");
        }
        assert!(MetricsParams::parse("bad id", None).is_err());
    }

    #[test]
    fn refuses_too_many_buckets() {
        let p = MetricsParams::parse("m", Some("bucket=1s")).expect("valid");
        assert!(p.check_bucket_count(0, 100, 1000).is_ok());
        assert!(p.check_bucket_count(0, 100_000, 1000).is_err());
    }
}
