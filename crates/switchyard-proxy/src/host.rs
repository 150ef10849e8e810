//! The host a request is for, read once and the same for routing and for the backend.
//!
//! A request names its host in `Host` or in an absolute-form target (`GET http://a/ HTTP/1.1`);
//! Pingora already refuses the two when they disagree, and a duplicated `Host`. What is left
//! is ours: an HTTP/1.1 request without `Host` (RFC 9112 §3.2: `400`), and a host that is not a
//! host name at all. Like nginx, a name is letters, digits, `-`, `_` and dots, not starting
//! with a dot and without an empty label; one trailing dot (the DNS root) is dropped for
//! routing, and routes compare names without case. An IP literal in brackets is hex digits,
//! `:` and `.`; a port is digits.

use http::{HeaderValue, Version};
use pingora_http::authority::raw_target_authority;
use pingora_http::RequestHeader;

/// Why a request's host cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostError {
    /// HTTP/1.1 without `Host`.
    Missing,
    /// Characters or a shape no host has.
    Invalid,
}

impl HostError {
    /// The plain-text body of the `400` answer.
    pub fn answer(self) -> &'static str {
        match self {
            HostError::Missing => "400 Bad Request: an HTTP/1.1 request needs a Host header\n",
            HostError::Invalid => "400 Bad Request: the Host is not a valid host name\n",
        }
    }
}

/// The authority of the request target: Pingora keeps an absolute-form target as it came (its
/// `Uri` has only the path), an HTTP/2 request has it in its `Uri`.
pub fn target_authority(req: &RequestHeader) -> Option<&[u8]> {
    match req.uri.authority() {
        Some(authority) => Some(authority.as_str().as_bytes()),
        None => raw_target_authority(req.raw_path()).authority(),
    }
}

/// The host to route `req` on (without port and trailing dot), `None` when an HTTP/1.0
/// request names none.
pub fn route_host(req: &RequestHeader) -> Result<Option<&str>, HostError> {
    route_host_of(
        req.version,
        req.headers.get(http::header::HOST),
        target_authority(req),
    )
}

fn route_host_of<'a>(
    version: Version,
    host: Option<&'a HeaderValue>,
    target: Option<&'a [u8]>,
) -> Result<Option<&'a str>, HostError> {
    let authority = match (host, target) {
        (Some(host), _) => host.as_bytes(),
        (None, _) if version == Version::HTTP_11 => return Err(HostError::Missing),
        (None, Some(authority)) => authority,
        (None, None) if version < Version::HTTP_11 => return Ok(None),
        (None, None) => return Err(HostError::Missing),
    };
    host_name(authority).map(Some).ok_or(HostError::Invalid)
}

/// The name part of `host[:port]`, checked, without a trailing dot.
fn host_name(authority: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(authority).ok()?;
    let (name, port) = if let Some(rest) = text.strip_prefix('[') {
        let (literal, after) = rest.split_once(']')?;
        let literal_ok = !literal.is_empty()
            && literal
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        if !literal_ok {
            return None;
        }
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':')?),
        };
        (&text[..literal.len() + 2], port)
    } else {
        match text.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (text, None),
        }
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    if !port_ok {
        return None;
    }
    if name.starts_with('[') {
        return Some(name);
    }
    let name = name.strip_suffix('.').unwrap_or(name);
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && !name.contains("..")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    valid.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(
        version: Version,
        host: Option<&str>,
        target: &str,
    ) -> Result<Option<String>, HostError> {
        let mut req = RequestHeader::build("GET", target.as_bytes(), None).expect("request");
        req.set_version(version);
        if let Some(host) = host {
            let value = HeaderValue::from_bytes(host.as_bytes()).expect("header");
            req.append_header("Host", value).expect("host");
        }
        route_host(&req).map(|h| h.map(str::to_string))
    }

    #[test]
    fn names_are_taken_without_port_and_trailing_dot() {
        let ok = |h: &str, want: &str| {
            assert_eq!(
                route(Version::HTTP_11, Some(h), "/"),
                Ok(Some(want.into())),
                "{h}"
            );
        };
        ok("example.com", "example.com");
        ok("Example.COM:8080", "Example.COM");
        ok("example.com.", "example.com");
        ok("example.com.:80", "example.com");
        ok("my_host-1.internal", "my_host-1.internal");
        ok("127.0.0.1:80", "127.0.0.1");
        ok("[::1]:8080", "[::1]");
        ok("[::1]", "[::1]");
    }

    #[test]
    fn what_no_host_has_is_refused() {
        for bad in [
            "",
            ".",
            "..",
            "a..b",
            ".example.com",
            "exa mple.com",
            "a/b",
            "a\\b",
            "a@b",
            "a:b",
            "a:",
            "a:123456",
            "[::1",
            "[]",
            "[g::1]",
            "[::1]x",
            "[::1]:x",
            "é.com",
            "a;b",
        ] {
            assert_eq!(
                route(Version::HTTP_11, Some(bad), "/"),
                Err(HostError::Invalid),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn http_1_1_needs_a_host_and_http_1_0_may_go_without() {
        assert_eq!(route(Version::HTTP_11, None, "/"), Err(HostError::Missing));
        assert_eq!(route(Version::HTTP_10, None, "/"), Ok(None));
        assert_eq!(
            route(Version::HTTP_10, None, "http://a.example/x"),
            Ok(Some("a.example".into()))
        );
        // RFC 9112 §3.2: even with an absolute-form target.
        assert_eq!(
            route(Version::HTTP_11, None, "http://a.example:81/x"),
            Err(HostError::Missing)
        );
        assert_eq!(
            route(Version::HTTP_2, None, "http://a.example:81/x"),
            Ok(Some("a.example".into()))
        );
    }
}
