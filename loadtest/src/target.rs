//! Where the load generator may send traffic.
//!
//! A load generator pointed at the wrong host is an attack, so every URL goes through
//! here: plain `http://` only, and the host must be this machine (`localhost`, `127.0.0.0/8`
//! or `::1`), both as written and as resolved, unless `--allow-remote` is given.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, ensure, Context, Result};
use hyper::Uri;

/// A checked HTTP endpoint.
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL as given, for reports.
    pub url: String,
    /// `host[:port]` for the `Host` header.
    pub authority: String,
    /// Path prefix without a trailing slash (usually empty).
    pub base_path: String,
    /// The resolved address every connection goes to.
    pub addr: SocketAddr,
    /// Sent as `X-Fanfinity-Key` with every request, when set.
    pub api_key: Option<String>,
}

/// The parts of a URL before name resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ParsedUrl {
    host: String,
    port: u16,
    authority: String,
    base_path: String,
}

/// Whether a host, as written in a URL, names this machine.
fn is_local_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn parse_url(url: &str, allow_remote: bool) -> Result<ParsedUrl> {
    let uri: Uri = url
        .parse()
        .with_context(|| format!("{url:?} is not a URL"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => bail!("{url}: scheme {other:?} is not supported, use http://"),
        None => bail!("{url}: missing http:// scheme"),
    }
    let host = uri
        .host()
        .with_context(|| format!("{url}: missing host"))?
        .to_string();
    ensure!(
        allow_remote || is_local_host(&host),
        "{url}: host {host} is not this machine; the load generator only targets \
         localhost/127.0.0.1/[::1] unless --allow-remote is given"
    );
    ensure!(
        uri.query().is_none(),
        "{url}: a query string is not allowed"
    );

    let port = uri.port_u16().unwrap_or(80);
    let authority = match uri.port_u16() {
        Some(p) => format!("{host}:{p}"),
        None => host.clone(),
    };
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok(ParsedUrl {
        host,
        port,
        authority,
        base_path,
    })
}

impl Target {
    /// Checks and resolves `url`.
    ///
    /// # Errors
    /// When the URL is malformed, not `http://`, names another machine (without
    /// `allow_remote`), or resolves to no address or to a non-loopback one.
    pub async fn resolve(url: &str, allow_remote: bool) -> Result<Target> {
        let parsed = parse_url(url, allow_remote)?;
        let bare_host = parsed.host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare_host, parsed.port))
            .await
            .with_context(|| format!("resolving {}", parsed.host))?
            .collect();

        // `localhost` could be mapped elsewhere in /etc/hosts: check what it resolved to.
        let addr = addrs
            .iter()
            .copied()
            .find(|a| allow_remote || a.ip().is_loopback())
            .with_context(|| format!("{url}: resolved to {addrs:?}, none of them loopback"))?;

        Ok(Target {
            url: url.to_string(),
            authority: parsed.authority,
            base_path: parsed.base_path,
            addr,
            api_key: None,
        })
    }

    /// The same endpoint, sending `key` as `X-Fanfinity-Key`.
    pub fn with_key(&self, key: Option<String>) -> Target {
        Target {
            api_key: key,
            ..self.clone()
        }
    }

    /// The request target (origin form) for `path_and_query` under this URL.
    pub fn path(&self, path_and_query: &str) -> String {
        format!("{}{}", self.base_path, path_and_query)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_loopback_hosts() {
        for url in [
            "http://127.0.0.1:8080",
            "http://localhost:8080/",
            "http://LOCALHOST",
            "http://[::1]:18123",
            "http://127.1.2.3:9",
        ] {
            parse_url(url, false).unwrap_or_else(|e| panic!("{url}: {e:#}"));
        }
    }

    #[test]
    fn refuses_other_hosts_without_allow_remote() {
        for url in [
            "http://10.0.0.1:8080",
            "http://192.168.1.10",
            "http://example.com",
            "http://localhost.example.com",
            "http://0.0.0.0:8080",
        ] {
            let err = parse_url(url, false).expect_err(url);
            assert!(format!("{err:#}").contains("--allow-remote"), "{url}");
            parse_url(url, true).unwrap_or_else(|e| panic!("{url}: {e:#}"));
        }
    }

    #[test]
    fn refuses_https_and_queries() {
        assert!(parse_url("https://127.0.0.1", false).is_err());
        assert!(parse_url("127.0.0.1:8080", false).is_err());
        assert!(parse_url("http://127.0.0.1/?a=b", false).is_err());
    }

    #[test]
    fn keeps_port_and_base_path() {
        let p = parse_url("http://127.0.0.1:18123/ch/", false).expect("valid");
        assert_eq!(p.port, 18123);
        assert_eq!(p.authority, "127.0.0.1:18123");
        assert_eq!(p.base_path, "/ch");
        let p = parse_url("http://localhost", false).expect("valid");
        assert_eq!(
            (p.port, p.authority.as_str(), p.base_path.as_str()),
            (80, "localhost", "")
        );
    }

    #[tokio::test]
    async fn resolves_localhost_to_loopback() {
        let t = Target::resolve("http://localhost:8080", false)
            .await
            .expect("localhost resolves");
        assert!(t.addr.ip().is_loopback());
        assert_eq!(t.path("/v1/events"), "/v1/events");
    }
}
