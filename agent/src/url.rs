//! Registry URLs: plain `http://HOST[:PORT][/BASE]` only (the sidecar carries no TLS stack;
//! put a local TLS-terminating proxy in front of a remote registry if needed).

use std::fmt;
use std::str::FromStr;

/// One parsed registry URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryUrl {
    /// Host name or IP address, without IPv6 brackets.
    pub host: String,
    /// TCP port (80 when absent).
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

    /// The request target for an API path like `/v1/...`.
    pub fn path(&self, p: &str) -> String {
        format!("{}{}", self.base_path, p)
    }
}

impl fmt::Display for RegistryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.base_path)
    }
}

impl FromStr for RegistryUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let rest = if let Some(r) = s.strip_prefix("http://") {
            r
        } else if s.starts_with("https://") {
            return Err(format!(
                "{s:?}: https is not supported by the agent (no TLS in the sidecar); \
                 use http:// (for example through a local TLS-terminating proxy)"
            ));
        } else {
            return Err(format!(
                "{s:?} is not an http:// URL (expected http://HOST[:PORT], e.g. http://127.0.0.1:8765)"
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
            None => 80,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(format!("{s:?}: port {p:?} is not 1-65535")),
            },
        };
        Ok(RegistryUrl {
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
    }

    #[test]
    fn rejects_with_reason() {
        for (bad, needle) in [
            ("https://r:1", "https is not supported"),
            ("ftp://r", "not an http:// URL"),
            ("r:8765", "not an http:// URL"),
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
