//! The analytics endpoints: which paths exist, which parameters each takes, and the
//! cache key of a request.

use super::params::{match_id, Param, QueryParams};
use super::QueryError;

/// One analytics endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `GET /v1/matches`
    Matches,
    /// `GET /v1/matches/{id}/metrics`
    Metrics,
    /// `GET /v1/matches/{id}/moments`
    Moments,
    /// `GET /v1/matches/{id}/reactions`
    Reactions,
    /// `GET /v1/matches/{id}/polls`
    Polls,
    /// `GET /v1/matches/{id}/fans`
    Fans,
    /// `GET /v1/matches/{id}/live`
    Live,
}

/// The per-match endpoints by their last path segment.
const PER_MATCH: [(&str, Endpoint); 6] = [
    ("metrics", Endpoint::Metrics),
    ("moments", Endpoint::Moments),
    ("reactions", Endpoint::Reactions),
    ("polls", Endpoint::Polls),
    ("fans", Endpoint::Fans),
    ("live", Endpoint::Live),
];

/// Every analytics path as the OpenAPI file spells it, for the test that compares them.
pub const PATHS: [&str; 7] = [
    "/v1/matches",
    "/v1/matches/{match_id}/metrics",
    "/v1/matches/{match_id}/moments",
    "/v1/matches/{match_id}/reactions",
    "/v1/matches/{match_id}/polls",
    "/v1/matches/{match_id}/fans",
    "/v1/matches/{match_id}/live",
];

impl Endpoint {
    /// The endpoint a path (split on `/`, without the leading empty segment) names, and
    /// its raw match id; `None` for any other path.
    pub fn from_path<'a>(segments: &[&'a str]) -> Option<(Endpoint, Option<&'a str>)> {
        match segments {
            ["v1", "matches"] => Some((Endpoint::Matches, None)),
            ["v1", "matches", id, last] => PER_MATCH
                .iter()
                .find(|(name, _)| name == last)
                .map(|(_, endpoint)| (*endpoint, Some(*id))),
            _ => None,
        }
    }

    /// The query parameters the endpoint takes.
    pub fn params(self) -> &'static [Param] {
        match self {
            Endpoint::Matches | Endpoint::Reactions | Endpoint::Fans => {
                &[Param::From, Param::To, Param::Limit]
            }
            Endpoint::Metrics => &[Param::From, Param::To, Param::Bucket],
            Endpoint::Moments => &[Param::From, Param::To, Param::Bucket, Param::Limit],
            Endpoint::Polls => &[Param::From, Param::To],
            Endpoint::Live => &[],
        }
    }
}

/// A validated analytics request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AnalyticsRequest {
    pub endpoint: Endpoint,
    /// Empty for [`Endpoint::Matches`].
    pub match_id: String,
    pub params: QueryParams,
}

impl AnalyticsRequest {
    /// Validates the match id and the query string for `endpoint`.
    ///
    /// # Errors
    /// [`QueryError::BadParam`] naming what is wrong.
    pub fn parse(
        endpoint: Endpoint,
        raw_match_id: Option<&str>,
        query: Option<&str>,
    ) -> Result<Self, QueryError> {
        let match_id = raw_match_id.map(match_id).transpose()?.unwrap_or_default();
        let params = QueryParams::parse(query, endpoint.params())?;
        Ok(Self {
            endpoint,
            match_id,
            params,
        })
    }

    /// The cache key: built from the parsed values, so `bucket=60s` and `bucket=1m`
    /// share an answer.
    pub fn cache_key(&self) -> String {
        let p = &self.params;
        format!(
            "{:?}/{}/{:?}/{:?}/{:?}/{:?}",
            self.endpoint, self.match_id, p.from_secs, p.to_secs, p.bucket_secs, p.limit
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_endpoints() {
        assert_eq!(
            Endpoint::from_path(&["v1", "matches"]),
            Some((Endpoint::Matches, None))
        );
        assert_eq!(
            Endpoint::from_path(&["v1", "matches", "m1", "live"]),
            Some((Endpoint::Live, Some("m1")))
        );
        assert_eq!(Endpoint::from_path(&["v1", "matches", "m1", "nope"]), None);
        assert_eq!(Endpoint::from_path(&["v1", "events"]), None);
    }

    #[test]
    fn equivalent_requests_share_a_key() {
        let a = AnalyticsRequest::parse(Endpoint::Metrics, Some("m"), Some("bucket=60s"));
        let b = AnalyticsRequest::parse(Endpoint::Metrics, Some("m"), Some("bucket=1m"));
        assert_eq!(a.map(|r| r.cache_key()), b.map(|r| r.cache_key()));
        assert!(AnalyticsRequest::parse(Endpoint::Live, Some("m"), Some("bucket=1m")).is_err());
        assert!(AnalyticsRequest::parse(Endpoint::Live, Some("bad id"), None).is_err());
    }
}
