//! Reads an event request's body off the wire: the size limits, the read deadline and the
//! content coding (`identity` or `gzip`).
//!
//! What the body means (JSON, NDJSON) is `decode`'s business; this module only hands it
//! the plain bytes, or refuses the body before it costs more than `http.max_body_bytes` of
//! memory or `http.body_read_timeout_ms` of a connection. The policy for every hostile
//! body is written down in docs/input-policy.md.

use std::io::Read;
use std::time::Duration;

use bytes::Bytes;
use flate2::read::MultiGzDecoder;
use http::header::CONTENT_ENCODING;
use http::HeaderMap;
use http_body_util::{BodyExt, Limited};
use tracing::debug;

use super::error::IngestError;
use super::request_body::RequestBody;

/// How the body's bytes are encoded on the wire, from `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentCoding {
    /// No header, an empty one, or `identity`.
    Identity,
    /// `gzip` (or its old alias `x-gzip`, which RFC 9110 asks servers to accept): one or
    /// more gzip members, all of which are read.
    Gzip,
}

impl ContentCoding {
    /// Reads every `Content-Encoding` header. Only a single coding is accepted: a stack
    /// such as `gzip, gzip` is never produced by a browser or mobile HTTP stack, and
    /// undoing it would multiply the work a hostile body can ask for.
    ///
    /// # Errors
    /// [`IngestError::UnsupportedEncoding`] naming the coding for anything else
    /// (`deflate`, `br`, `zstd`, a list of codings, bytes that are not text).
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, IngestError> {
        let mut codings = Vec::new();
        for value in headers.get_all(CONTENT_ENCODING) {
            let text = value
                .to_str()
                .map_err(|_| IngestError::UnsupportedEncoding {
                    encoding: String::from_utf8_lossy(value.as_bytes()).into_owned(),
                })?;
            codings.extend(
                text.split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("identity"))
                    .map(str::to_ascii_lowercase),
            );
        }
        match codings.as_slice() {
            [] => Ok(ContentCoding::Identity),
            [one] if one == "gzip" || one == "x-gzip" => Ok(ContentCoding::Gzip),
            _ => Err(IngestError::UnsupportedEncoding {
                encoding: codings.join(", "),
            }),
        }
    }
}

/// The bounds one body is read within.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body, in bytes, both as sent (compressed) and once decompressed.
    pub max_body_bytes: usize,
    /// Longest the whole body may take to arrive, from the first read to the last byte.
    pub read_timeout: Duration,
}

/// Reads the whole body within `limits` and undoes its content coding.
///
/// A declared length over the limit is refused before any body byte is read; a chunked
/// body is refused as soon as it passes the limit, without reading the rest; a body that
/// stops arriving is refused once `read_timeout` has passed since the read began.
///
/// # Errors
/// [`IngestError::PayloadTooLarge`], [`IngestError::BodyTimeout`],
/// [`IngestError::BodyRead`] (the connection failed mid-body) and, for gzip,
/// [`IngestError::BadEncoding`] or [`IngestError::DecompressedTooLarge`].
pub async fn read_body(
    body: RequestBody,
    declared_length: Option<u64>,
    coding: ContentCoding,
    limits: BodyLimits,
) -> Result<Bytes, IngestError> {
    let limit = limits.max_body_bytes;
    if declared_length.is_some_and(|len| len > limit as u64) {
        return Err(IngestError::PayloadTooLarge { limit_bytes: limit });
    }

    let collect = Limited::new(body, limit).collect();
    // glommio's timeout wants a fallible future; the read's own error rides inside.
    let read = glommio::timer::timeout(limits.read_timeout, async { Ok(collect.await) }).await;
    let wire = match read {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
            return Err(IngestError::PayloadTooLarge { limit_bytes: limit })
        }
        Ok(Err(err)) => {
            return Err(IngestError::BodyRead {
                detail: err.to_string(),
            })
        }
        Err(_) => {
            let timeout_ms = u64::try_from(limits.read_timeout.as_millis()).unwrap_or(u64::MAX);
            debug!(
                timeout_ms,
                ?declared_length,
                "request body stopped arriving, answering 408"
            );
            return Err(IngestError::BodyTimeout { timeout_ms });
        }
    };

    match coding {
        ContentCoding::Identity => Ok(wire),
        // An empty body is empty whatever it claims to be; decode answers `empty_body`.
        ContentCoding::Gzip if wire.is_empty() => Ok(wire),
        ContentCoding::Gzip => inflate_gzip(&wire, limit)
            .map(Bytes::from)
            .inspect_err(|err| {
                debug!(compressed_bytes = wire.len(), error = %err, "gzip body refused");
            }),
    }
}

/// Output read from the decoder per step: small enough that a bomb is stopped within one
/// step of the limit, large enough that a normal body takes few steps.
const INFLATE_STEP_BYTES: usize = 64 * 1024;

/// Decompresses every gzip member in `compressed`, stopping as soon as the output passes
/// `limit`: a decompression bomb costs at most `limit` plus one step of memory and the
/// time to inflate that much, never its full size.
///
/// # Errors
/// [`IngestError::DecompressedTooLarge`] past the limit; [`IngestError::BadEncoding`] for
/// anything that is not complete, intact gzip (a bad header, a corrupt stream, a wrong
/// checksum, a truncated member, bytes after the last member).
pub fn inflate_gzip(compressed: &[u8], limit: usize) -> Result<Vec<u8>, IngestError> {
    let mut decoder = MultiGzDecoder::new(compressed);
    let mut plain = Vec::with_capacity(compressed.len().saturating_mul(4).min(limit));
    let mut step = vec![0u8; INFLATE_STEP_BYTES];
    loop {
        let read = decoder
            .read(&mut step)
            .map_err(|err| IngestError::BadEncoding {
                encoding: "gzip",
                detail: err.to_string(),
            })?;
        if read == 0 {
            return Ok(plain);
        }
        if plain.len() + read > limit {
            return Err(IngestError::DecompressedTooLarge { limit_bytes: limit });
        }
        plain.extend_from_slice(&step[..read]);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use flate2::write::GzEncoder;
    use flate2::Compression;
    use http::HeaderValue;

    use super::*;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
        encoder.write_all(bytes).expect("compress in memory");
        encoder.finish().expect("finish in memory")
    }

    fn coding(values: &[&str]) -> Result<ContentCoding, IngestError> {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append(
                CONTENT_ENCODING,
                HeaderValue::from_str(value).expect("header"),
            );
        }
        ContentCoding::from_headers(&headers)
    }

    #[test]
    fn reads_identity_gzip_and_names_the_rest() {
        assert_eq!(coding(&[]).expect("none"), ContentCoding::Identity);
        assert_eq!(coding(&["identity"]).expect("id"), ContentCoding::Identity);
        assert_eq!(coding(&["GZip"]).expect("gzip"), ContentCoding::Gzip);
        assert_eq!(coding(&["x-gzip"]).expect("x-gzip"), ContentCoding::Gzip);
        for bad in [&["br"][..], &["deflate"], &["gzip, gzip"], &["gzip", "br"]] {
            match coding(bad) {
                Err(IngestError::UnsupportedEncoding { encoding }) => {
                    assert!(!encoding.is_empty(), "{bad:?}")
                }
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn inflates_every_concatenated_member() {
        let mut body = gzip(b"[{\"a\":1},");
        body.extend(gzip(b"{\"a\":2}]"));
        assert_eq!(
            inflate_gzip(&body, 1000).expect("two members"),
            b"[{\"a\":1},{\"a\":2}]"
        );
    }

    #[test]
    fn stops_a_bomb_at_the_limit() {
        let bomb = gzip(&vec![0u8; 10 * 1024 * 1024]);
        assert!(bomb.len() < 20 * 1024, "{} bytes", bomb.len());
        assert!(matches!(
            inflate_gzip(&bomb, 1024 * 1024),
            Err(IngestError::DecompressedTooLarge { .. })
        ));
    }

    #[test]
    fn refuses_truncated_corrupt_and_plain_bodies() {
        let whole = gzip(br#"{"match_id":"m","user_id":"u","type":"cheer"}"#);
        let truncated = &whole[..whole.len() - 6];
        let mut corrupt = whole.clone();
        let middle = corrupt.len() / 2;
        corrupt[middle] ^= 0xff;
        let mut trailing = whole.clone();
        trailing.extend_from_slice(b"junk");
        for bad in [
            truncated,
            &corrupt[..],
            &trailing[..],
            &b"{\"plain\":1}"[..],
        ] {
            assert!(
                matches!(
                    inflate_gzip(bad, 1000),
                    Err(IngestError::BadEncoding { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
