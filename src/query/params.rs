//! Parsing and validation of the analytics endpoints' query strings.
//!
//! Values reach SQL only as bound numbers and a match id that passed the strict
//! `[A-Za-z0-9_.:-]` check, never as raw text. Each endpoint names the parameters it
//! takes, and anything else is refused, so a typo such as `form=` is not silently
//! ignored.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::QueryError;
use crate::event::is_valid_match_id;

/// Every window and bucket is a whole number of these: the resolution of the coarsest
/// aggregate the API mixes in (`fan_buckets`).
pub const BASE_BUCKET_SECS: u32 = 10;
/// Largest bucket: one hour.
const MAX_BUCKET_SECS: u32 = 3_600;
/// Largest `limit`.
pub const MAX_LIMIT: u32 = 1_000;

/// A query-string parameter an endpoint may accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Param {
    From,
    To,
    Bucket,
    Limit,
}

impl Param {
    fn name(self) -> &'static str {
        match self {
            Param::From => "from",
            Param::To => "to",
            Param::Bucket => "bucket",
            Param::Limit => "limit",
        }
    }
}

/// The validated parameters of one request; absent ones are `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct QueryParams {
    /// Inclusive lower bound on event time, epoch seconds.
    pub from_secs: Option<u32>,
    /// Exclusive upper bound on event time, epoch seconds.
    pub to_secs: Option<u32>,
    pub bucket_secs: Option<u32>,
    pub limit: Option<u32>,
}

impl QueryParams {
    /// Reads the parameters in `allowed` from `query`: `from`, `to` (RFC 3339 or epoch
    /// milliseconds), `bucket` (`10s`, `1m`, `5m`, ...: a multiple of 10 s up to 1 h) and
    /// `limit` (1-1000).
    ///
    /// # Errors
    /// [`QueryError::BadParam`] naming the first bad or unknown parameter, a repeated
    /// one, or `from` not before `to`.
    pub fn parse(query: Option<&str>, allowed: &[Param]) -> Result<Self, QueryError> {
        let mut params = QueryParams::default();
        let (mut from_ms, mut to_ms) = (None, None);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s| percent_decode(s).ok_or_else(|| bad("query", "bad percent-encoding"));
            let (key, value) = (decode(key)?, decode(value)?);
            let param = allowed
                .iter()
                .copied()
                .find(|p| p.name() == key)
                .ok_or_else(|| bad("query", &format!("unknown parameter {:?}", clip(&key))))?;
            let repeated = match param {
                Param::From => from_ms.replace(parse_time("from", &value)?).is_some(),
                Param::To => to_ms.replace(parse_time("to", &value)?).is_some(),
                Param::Bucket => params.bucket_secs.replace(parse_bucket(&value)?).is_some(),
                Param::Limit => params.limit.replace(parse_limit(&value)?).is_some(),
            };
            if repeated {
                return Err(bad(param.name(), "given more than once"));
            }
        }
        if let (Some(from), Some(to)) = (from_ms, to_ms) {
            if from >= to {
                return Err(bad("to", "must be after from"));
            }
        }
        // Whole seconds, widened: `from` down, `to` up, so no millisecond asked for is
        // left out.
        params.from_secs = from_ms.map(|ms| seconds(ms.div_euclid(1000)));
        params.to_secs = to_ms.map(|ms| seconds((ms + 999).div_euclid(1000)));
        Ok(params)
    }
}

/// Checks a match id taken from the path.
///
/// # Errors
/// [`QueryError::BadParam`] on `match_id`.
pub fn match_id(id: &str) -> Result<String, QueryError> {
    if is_valid_match_id(id) {
        Ok(id.to_string())
    } else {
        Err(bad(
            "match_id",
            "must be 1-64 characters of [A-Za-z0-9_.:-]",
        ))
    }
}

pub(super) fn bad(param: &'static str, reason: &str) -> QueryError {
    QueryError::BadParam {
        param,
        reason: reason.to_string(),
    }
}

/// The latest time `from`/`to` may name, in epoch ms: the last hour of `DateTime` is kept
/// free so a window end widened to a whole bucket still fits.
const LAST_MS: i64 = (u32::MAX - MAX_BUCKET_SECS) as i64 * 1000;

/// Reads epoch milliseconds or RFC 3339 into epoch milliseconds in 1970..[`LAST_MS`].
fn parse_time(param: &'static str, value: &str) -> Result<i64, QueryError> {
    let ms = if let Ok(ms) = value.parse::<i64>() {
        ms
    } else {
        let at = OffsetDateTime::parse(value, &Rfc3339)
            .map_err(|_| bad(param, "must be RFC 3339 or epoch milliseconds"))?;
        i64::try_from(at.unix_timestamp_nanos().div_euclid(1_000_000))
            .map_err(|_| bad(param, "must be between 1970-01-01 and 2106-02-07"))?
    };
    if (0..LAST_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(bad(param, "must be between 1970-01-01 and 2106-02-07"))
    }
}

/// Epoch seconds of a value [`parse_time`] bounded, so it fits.
fn seconds(secs: i64) -> u32 {
    u32::try_from(secs).unwrap_or(u32::MAX - MAX_BUCKET_SECS)
}

/// At most 64 characters of a client's text, for error messages.
fn clip(text: &str) -> String {
    match text.char_indices().nth(64) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.to_string(),
    }
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
    digits
        .parse::<u32>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .filter(|s| (BASE_BUCKET_SECS..=MAX_BUCKET_SECS).contains(s))
        .filter(|s| s % BASE_BUCKET_SECS == 0)
        .ok_or_else(|| bad("bucket", "must be a multiple of 10s between 10s and 1h"))
}

fn parse_limit(value: &str) -> Result<u32, QueryError> {
    value
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
        .ok_or_else(|| bad("limit", "must be between 1 and 1000"))
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

    const ALL: &[Param] = &[Param::From, Param::To, Param::Bucket, Param::Limit];

    #[test]
    fn reads_rfc3339_epoch_ms_bucket_units_and_limit() {
        let p = QueryParams::parse(
            Some("from=2022-12-18T15%3A00%3A00Z&to=1671390000000&bucket=5m&limit=7"),
            ALL,
        )
        .expect("valid");
        assert_eq!(p.from_secs, Some(1_671_375_600));
        assert_eq!(p.to_secs, Some(1_671_390_000));
        assert_eq!(p.bucket_secs, Some(300));
        assert_eq!(p.limit, Some(7));
        for (q, secs) in [("bucket=10s", 10), ("bucket=60", 60), ("bucket=1h", 3600)] {
            let p = QueryParams::parse(Some(q), ALL).expect("valid");
            assert_eq!(p.bucket_secs, Some(secs), "{q}");
        }
        assert_eq!(QueryParams::parse(None, &[]), Ok(QueryParams::default()));
        // Parameter names are percent-decoded like values.
        let p = QueryParams::parse(Some("b%75cket=5%6D"), ALL).expect("valid");
        assert_eq!(p.bucket_secs, Some(300));
    }

    #[test]
    fn sub_second_bounds_widen_the_window_instead_of_vanishing() {
        let p = QueryParams::parse(Some("from=1796432159000&to=1796432159001"), ALL)
            .expect("a millisecond is a window");
        assert_eq!(
            (p.from_secs, p.to_secs),
            (Some(1_796_432_159), Some(1_796_432_160))
        );
        let p =
            QueryParams::parse(Some("from=1796432159999&to=1796432160400"), ALL).expect("valid");
        assert_eq!(
            (p.from_secs, p.to_secs),
            (Some(1_796_432_159), Some(1_796_432_161))
        );
    }

    #[test]
    fn unknown_names_are_clipped_in_the_answer() {
        let long = "x".repeat(60_000);
        let err = QueryParams::parse(Some(&long), ALL).expect_err("unknown");
        assert!(err.to_string().len() < 200, "{}", err.to_string().len());
    }

    #[test]
    fn refuses_bad_values_repeats_and_unknown_params() {
        for q in [
            "bucket=0s",
            "bucket=5s",
            "bucket=15s",
            "bucket=2h",
            "bucket=abc",
            "from=yesterday",
            "from=-5",
            "form=1",
            "from=5000&to=1000",
            "from=1&from=2",
            "limit=0",
            "limit=1001",
            "limit=x",
            "from=%zz",
            "from=1796432159000&to=1796432159000",
            "to=2106-02-07T06:28:15Z",
        ] {
            assert!(QueryParams::parse(Some(q), ALL).is_err(), "{q}");
        }
        assert!(QueryParams::parse(Some("bucket=1m"), &[Param::Limit]).is_err());
        assert!(match_id("bad id").is_err());
        assert!(match_id(&"m".repeat(65)).is_err());
        assert_eq!(
            match_id("wc2022-final").ok().as_deref(),
            Some("wc2022-final")
        );
    }
}
