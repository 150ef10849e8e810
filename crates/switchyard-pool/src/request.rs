//! What the pool may see of a request: borrowed parts of its head, nothing of Pingora's
//! session. Routing (match conditions), sticky splits and `hash` upstreams read their keys
//! from here; every lookup borrows from the head and allocates nothing.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, Method};
use switchyard_config::RequestKey;

/// The parts of a request head that routing decisions read.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// Lower- or mixed-case host without port, as the proxy found it.
    pub host: Option<&'a str>,
    pub path: &'a str,
    /// The raw query, without `?`.
    pub query: Option<&'a str>,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    pub client: Option<IpAddr>,
    /// A sticky cookie value issued for this very request (`set_cookie`): it counts as the
    /// request's cookie of that name.
    pub issued: Option<(&'a str, &'a str)>,
}

impl<'a> Request<'a> {
    /// The first value of a header.
    pub fn header(&self, name: &HeaderName) -> Option<&'a [u8]> {
        self.headers.get(name).map(|v| v.as_bytes())
    }

    /// A cookie's value, from every `Cookie` header read as one (HTTP/2 sends one header per
    /// cookie); the first of the name wins, as browsers send the most specific first. A value
    /// in double quotes is returned without them (RFC 6265 §4.1.1).
    pub fn cookie(&self, name: &str) -> Option<&'a [u8]> {
        if let Some((issued, value)) = self.issued {
            if issued == name {
                return Some(value.as_bytes());
            }
        }
        self.headers
            .get_all(http::header::COOKIE)
            .iter()
            .find_map(|header| cookie_in(header.as_bytes(), name.as_bytes()))
    }

    /// Whether the query has parameter `name` (percent-decoded, `+` as space), and the raw
    /// value of its first occurrence.
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        self.query?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            decoded_eq(key, name).then_some(value)
        })
    }
}

/// A request key compiled for lookups: the header's name as a `HeaderName`.
pub(crate) enum KeyField {
    Cookie(Box<str>),
    Header(HeaderName),
    ClientIp,
}

impl KeyField {
    pub(crate) fn new(key: &RequestKey) -> Option<KeyField> {
        Some(match key {
            RequestKey::Cookie(name) => KeyField::Cookie(name.as_str().into()),
            RequestKey::Header(name) => {
                KeyField::Header(HeaderName::from_bytes(name.as_bytes()).ok()?)
            }
            RequestKey::ClientIp => KeyField::ClientIp,
        })
    }

    /// The key's bytes in `request`, if it has the key (an empty value is no key).
    pub(crate) fn of<'a>(&self, request: &Request<'a>) -> Option<Key<'a>> {
        let bytes = match self {
            KeyField::Cookie(name) => request.cookie(name),
            KeyField::Header(name) => request.header(name),
            KeyField::ClientIp => return request.client.map(Key::ip),
        };
        bytes.filter(|b| !b.is_empty()).map(Key::Bytes)
    }
}

/// A key's bytes: borrowed from the request, or a client address's octets.
pub(crate) enum Key<'a> {
    Bytes(&'a [u8]),
    Ip([u8; 16], usize),
}

impl Key<'_> {
    pub(crate) fn ip(ip: IpAddr) -> Self {
        let mut bytes = [0u8; 16];
        let len = match ip {
            IpAddr::V4(v4) => {
                bytes[..4].copy_from_slice(&v4.octets());
                4
            }
            IpAddr::V6(v6) => {
                bytes.copy_from_slice(&v6.octets());
                16
            }
        };
        Key::Ip(bytes, len)
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Key::Bytes(bytes) => bytes,
            Key::Ip(bytes, len) => &bytes[..*len],
        }
    }
}

/// The value of cookie `name` in one `Cookie` header's `a=1; b=2`.
fn cookie_in<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let at = pair.iter().position(|&b| b == b'=')?;
        let (key, value) = (pair[..at].trim_ascii(), pair[at + 1..].trim_ascii());
        (key == name).then(|| unquoted(value))
    })
}

fn unquoted(value: &[u8]) -> &[u8] {
    match value {
        [b'"', inner @ .., b'"'] => inner,
        _ => value,
    }
}

/// Whether a raw query component, percent-decoded and with `+` as space, equals `want`. A
/// malformed escape (`%zz`) stands for itself.
pub fn decoded_eq(raw: &str, want: &str) -> bool {
    let mut want = want.bytes();
    let raw = raw.as_bytes();
    let mut i = 0;
    while i < raw.len() {
        let (byte, used) = match raw[i] {
            b'+' => (b' ', 1),
            b'%' => match (raw.get(i + 1).and_then(hex), raw.get(i + 2).and_then(hex)) {
                (Some(hi), Some(lo)) => (hi << 4 | lo, 3),
                _ => (b'%', 1),
            },
            b => (b, 1),
        };
        if want.next() != Some(byte) {
            return false;
        }
        i += used;
    }
    want.next().is_none()
}

fn hex(b: &u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn request<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Request<'a> {
        Request {
            host: None,
            path: "/",
            query,
            method: &Method::GET,
            headers,
            client: None,
            issued: None,
        }
    }

    #[test]
    fn cookies_are_read_across_every_cookie_header() {
        let map = headers(&[
            ("cookie", "a=1; group=beta"),
            ("cookie", "b=\"quoted\""),
            ("cookie", "group=second;c"),
        ]);
        let req = request(&map, None);
        assert_eq!(req.cookie("group"), Some(&b"beta"[..]));
        assert_eq!(req.cookie("b"), Some(&b"quoted"[..]));
        assert_eq!(req.cookie("a"), Some(&b"1"[..]));
        assert_eq!(req.cookie("c"), None, "a pair without '=' has no value");
        assert_eq!(req.cookie("Group"), None, "cookie names are case-sensitive");
        assert_eq!(req.cookie("grou"), None);
    }

    #[test]
    fn an_issued_cookie_counts_for_its_own_request() {
        let map = headers(&[("cookie", "switchyard_user=old")]);
        let mut req = request(&map, None);
        req.issued = Some(("switchyard_user", "fresh"));
        assert_eq!(req.cookie("switchyard_user"), Some(&b"fresh"[..]));
    }

    #[test]
    fn query_parameters_compare_decoded() {
        let map = HeaderMap::new();
        let req = request(&map, Some("a=1&pre%76iew=yes+please&empty&x=%zz"));
        assert_eq!(req.query_param("preview"), Some("yes+please"));
        assert!(decoded_eq("yes+please", "yes please"));
        assert!(decoded_eq("caf%C3%A9", "café"));
        assert!(decoded_eq("%zz", "%zz"));
        assert!(!decoded_eq("ab", "abc"));
        assert!(!decoded_eq("abc", "ab"));
        assert_eq!(req.query_param("empty"), Some(""));
        assert_eq!(req.query_param("missing"), None);
        assert_eq!(request(&map, None).query_param("a"), None);
    }
}
