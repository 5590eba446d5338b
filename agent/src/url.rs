//! Registry URLs: `http://HOST[:PORT][/BASE]` or `https://HOST[:PORT][/BASE]` (TLS with
//! rustls, verified against `--registry-ca`).

use std::fmt;
use std::str::FromStr;

/// One parsed registry URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryUrl {
    /// `https://`.
    pub tls: bool,
    /// Host name or IP address, without IPv6 brackets.
    pub host: String,
    /// TCP port (80, or 443 for https, when absent).
    pub port: u16,
    /// Path prefix without trailing slash (`""` for the root).
    pub base_path: String,
}

impl RegistryUrl {
    /// The `Host:` header value (`host:port`, IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Whether the host is a loopback address (or `localhost`): traffic never leaves the
    /// machine.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// The request target for an API path like `/v1/...`.
    pub fn path(&self, p: &str) -> String {
        format!("{}{}", self.base_path, p)
    }
}

impl fmt::Display for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.base_path)
    }
}

impl FromStr for RegistryUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (tls, rest) = if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else {
            return Err(format!(
                "{s:?} is not an http:// or https:// URL (expected http[s]://HOST[:PORT], e.g. http://127.0.0.1:8765)"
            ));
        };
        if rest.contains(['?', '#']) {
            return Err(format!(
                "{s:?}: query strings and fragments are not allowed"
            ));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(format!(
                "{s:?}: credentials in the URL are not supported; use --token"
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6
                .find(']')
                .ok_or_else(|| format!("{s:?}: unterminated IPv6 address"))?;
            let host = &v6[..end];
            let after = &v6[end + 1..];
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(format!("{s:?}: unexpected {after:?} after the address")),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{s:?}: missing host"));
        }
        let port = match port {
            None if tls => 443,
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(format!("{s:?}: port {p:?} is not 1-65535")),
            },
        };
        Ok(RegistryUrl {
            tls,
            host: host.to_string(),
            port,
            base_path: path.trim_end_matches('/').to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        let u: RegistryUrl = "http://127.0.0.1:8765".parse().unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.base_path.as_str()),
            ("127.0.0.1", 8765, "")
        );
        assert_eq!(u.path("/health"), "/health");
        let u: RegistryUrl = "http://registry/api/".parse().unwrap();
        assert_eq!((u.port, u.base_path.as_str()), (80, "/api"));
        assert_eq!(u.path("/health"), "/api/health");
        let u: RegistryUrl = "http://[::1]:99".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 99));
        assert_eq!(u.authority(), "[::1]:99");
        assert_eq!(u.to_string(), "http://[::1]:99");
        let u: RegistryUrl = "https://registry.example".parse().unwrap();
        assert_eq!((u.tls, u.port), (true, 443));
        assert_eq!(u.to_string(), "https://registry.example:443");
    }

    #[test]
    fn loopback_hosts() {
        for (u, lo) in [
            ("http://127.0.0.1:1", true),
            ("http://127.3.4.5:1", true),
            ("http://[::1]:1", true),
            ("http://localhost:1", true),
            ("http://10.0.0.1:1", false),
            ("http://registry:1", false),
        ] {
            assert_eq!(u.parse::<RegistryUrl>().unwrap().is_loopback(), lo, "{u}");
        }
    }

    #[test]
    fn rejects_with_reason() {
        for (bad, needle) in [
            ("ftp://r", "not an http:// or https:// URL"),
            ("r:8765", "not an http:// or https:// URL"),
            ("http://:80", "missing host"),
            ("http://r:0", "port"),
            ("http://r:x", "port"),
            ("http://u:p@r", "credentials"),
            ("http://r/?a=1", "query"),
            ("http://[::1", "unterminated"),
        ] {
            let e = bad.parse::<RegistryUrl>().unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
