//! What a route (or a rollout's match step) asks of a request beyond host and path, and which
//! part of a request keys a sticky split or a `hash` upstream: the typed values and their
//! validation, shared by the config file and the admin API's JSON so that both refuse the
//! same mistakes with the same words.
//!
//! Names are checked against HTTP's grammar here, once: the request path then compares bytes
//! and never has to wonder whether a name could ever match.

use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

use crate::raw::UniqueMap;
use crate::Problem;

/// Entries one `match` may have per kind (headers, cookies, query parameters, methods): a
/// route's conditions are checked on every request that reaches it.
pub const MAX_MATCH_ENTRIES: usize = 32;
/// Longest name or value in a `match` or a sticky key, in bytes.
pub const MAX_MATCH_TEXT: usize = 256;

/// Conditions on a request; every entry must hold. Empty: matches every request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteMatch {
    /// Lower-cased names (header names are case-insensitive), in the order of the names as
    /// written, sorted.
    pub headers: Vec<(String, ValueMatch)>,
    /// Cookie names are case-sensitive; sorted.
    pub cookies: Vec<(String, ValueMatch)>,
    /// Query parameter names and values, compared percent-decoded; sorted.
    pub query: Vec<(String, ValueMatch)>,
    /// Upper-case; empty: any method.
    pub methods: Vec<String>,
}

impl RouteMatch {
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
            && self.cookies.is_empty()
            && self.query.is_empty()
            && self.methods.is_empty()
    }
}

/// What one header, cookie or query parameter must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueMatch {
    /// `"*"`: present, with any value (an empty one too).
    Present,
    /// Exactly this value, case-sensitive.
    Exact(String),
}

impl ValueMatch {
    fn from_text(text: String) -> ValueMatch {
        if text == "*" {
            ValueMatch::Present
        } else {
            ValueMatch::Exact(text)
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            ValueMatch::Present => "*",
            ValueMatch::Exact(value) => value,
        }
    }
}

/// The part of a request that identifies a user: for a sticky split and for `hash_on`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKey {
    /// A cookie's value (name case-sensitive).
    Cookie(String),
    /// A header's value (name lower-cased); of several, the first.
    Header(String),
    /// The client's IP address.
    ClientIp,
}

/// A route's sticky split: the key's hash picks the upstream from the split's weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sticky {
    pub key: RequestKey,
    /// A request without the cookie gets one with a fresh random key (cookie keys only).
    pub set_cookie: bool,
}

/// Prefix of the cookie names `set_cookie` may issue: Switchyard's own, never one the
/// application might use for its session.
pub const OWN_COOKIE_PREFIX: &str = "switchyard";

/// Methods a `match` may name: RFC 9110's and PATCH (RFC 5789). Anything else is more likely
/// a typo than a method a backend implements.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// In the shape it is written in (the admin API shows it so, the state file keeps it so).
impl Serialize for RouteMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Entries<'a>(&'a [(String, ValueMatch)]);
        impl Serialize for Entries<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(self.0.iter().map(|(name, value)| (name, value.as_str())))
            }
        }
        let mut map = s.serialize_map(None)?;
        for (field, entries) in [
            ("headers", &self.headers),
            ("cookies", &self.cookies),
            ("query", &self.query),
        ] {
            if !entries.is_empty() {
                map.serialize_entry(field, &Entries(entries))?;
            }
        }
        if !self.methods.is_empty() {
            map.serialize_entry("methods", &self.methods)?;
        }
        map.end()
    }
}

impl Serialize for RequestKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        key_entry(&mut map, self)?;
        map.end()
    }
}

impl Serialize for Sticky {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        key_entry(&mut map, &self.key)?;
        map.serialize_entry("set_cookie", &self.set_cookie)?;
        map.end()
    }
}

/// A key as its one field: `cookie: NAME`, `header: NAME` or `client_ip: true`.
fn key_entry<M: SerializeMap>(map: &mut M, key: &RequestKey) -> Result<(), M::Error> {
    match key {
        RequestKey::Cookie(name) => map.serialize_entry("cookie", name),
        RequestKey::Header(name) => map.serialize_entry("header", name),
        RequestKey::ClientIp => map.serialize_entry("client_ip", &true),
    }
}

/// `match` as written, in YAML or JSON.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatch {
    pub headers: Option<UniqueMap<String>>,
    pub cookies: Option<UniqueMap<String>>,
    pub query: Option<UniqueMap<String>>,
    pub methods: Option<Vec<String>>,
}

/// A request key as written: exactly one of the three.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub cookie: Option<String>,
    pub header: Option<String>,
    pub client_ip: Option<bool>,
}

/// `sticky` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSticky {
    pub cookie: Option<String>,
    pub header: Option<String>,
    pub client_ip: Option<bool>,
    pub set_cookie: Option<bool>,
}

/// Validates a `match` at `path`, pushing every problem; entries with a problem are left out.
pub fn route_match(raw: RawMatch, path: &str, problems: &mut Vec<Problem>) -> RouteMatch {
    let mut out = RouteMatch::default();
    let mut problem = |field: String, message: String| {
        problems.push(Problem {
            path: field,
            message,
        })
    };
    if let Some(headers) = raw.headers {
        too_many(&mut problem, &format!("{path}.headers"), headers.0.len());
        for (name, value) in headers.0 {
            let field = format!("{path}.headers.{name}");
            let lower = name.to_ascii_lowercase();
            let seen = out.headers.iter().any(|(n, _)| *n == lower);
            match (
                token_problem(&name),
                value_problem(&value, is_header_value_byte),
            ) {
                (Some(why), _) => problem(field, format!("header name {why}")),
                (_, Some(why)) => problem(field, format!("header value {why}")),
                // HTTP drops the spaces around a header's value, so such a value never arrives.
                _ if value.trim() != value => problem(
                    field,
                    format!("header value {value:?} starts or ends with a space, which a request's header value never does"),
                ),
                // Two spellings of one header would be two conditions on one value.
                _ if seen => problem(
                    field,
                    format!("header {name:?} is named twice (header names are case-insensitive)"),
                ),
                _ => out.headers.push((lower, ValueMatch::from_text(value))),
            }
        }
    }
    if let Some(cookies) = raw.cookies {
        too_many(&mut problem, &format!("{path}.cookies"), cookies.0.len());
        for (name, value) in cookies.0 {
            let field = format!("{path}.cookies.{name}");
            match (
                token_problem(&name),
                value_problem(&value, is_cookie_value_byte),
            ) {
                (Some(why), _) => problem(field, format!("cookie name {why}")),
                (_, Some(why)) => problem(field, format!("cookie value {why}")),
                _ => out.cookies.push((name, ValueMatch::from_text(value))),
            }
        }
    }
    if let Some(query) = raw.query {
        too_many(&mut problem, &format!("{path}.query"), query.0.len());
        for (name, value) in query.0 {
            let field = format!("{path}.query.{name}");
            if name.is_empty() {
                problem(field, "query parameter name must not be empty".into());
            } else if name.len() > MAX_MATCH_TEXT || value.len() > MAX_MATCH_TEXT {
                problem(field, format!("is longer than {MAX_MATCH_TEXT} bytes"));
            } else {
                out.query.push((name, ValueMatch::from_text(value)));
            }
        }
    }
    if let Some(methods) = raw.methods {
        let field = format!("{path}.methods");
        if methods.is_empty() {
            problem(
                field.clone(),
                "must name at least one method (leave it out to match any)".into(),
            );
        }
        too_many(&mut problem, &field, methods.len());
        for (i, method) in methods.into_iter().enumerate() {
            let upper = method.to_ascii_uppercase();
            if !METHODS.contains(&upper.as_str()) {
                problem(
                    format!("{field}[{i}]"),
                    format!(
                        "{method:?} is not an HTTP method; expected one of {}",
                        METHODS.join(", ")
                    ),
                );
            } else if out.methods.contains(&upper) {
                problem(format!("{field}[{i}]"), format!("{method} is named twice"));
            } else {
                out.methods.push(upper);
            }
        }
    }
    out
}

/// Validates a sticky split's key at `path`.
pub fn sticky(raw: RawSticky, path: &str, problems: &mut Vec<Problem>) -> Option<Sticky> {
    let set_cookie = raw.set_cookie.unwrap_or(false);
    let key = request_key(
        RawKey {
            cookie: raw.cookie,
            header: raw.header,
            client_ip: raw.client_ip,
        },
        path,
        problems,
    )?;
    if set_cookie {
        match &key {
            RequestKey::Cookie(name) if !name.starts_with(OWN_COOKIE_PREFIX) => {
                problems.push(Problem {
                    path: format!("{path}.cookie"),
                    message: format!(
                        "{name:?}: set_cookie issues cookies, so the name must be Switchyard's own (start with {OWN_COOKIE_PREFIX:?}, e.g. switchyard_user), never the application's"
                    ),
                });
                return None;
            }
            RequestKey::Cookie(_) => {}
            _ => {
                problems.push(Problem {
                    path: format!("{path}.set_cookie"),
                    message: "applies only to a cookie key (sticky.cookie)".into(),
                });
                return None;
            }
        }
    }
    Some(Sticky { key, set_cookie })
}

/// Validates a request key (`hash_on`, or a sticky split's) at `path`.
pub fn request_key(raw: RawKey, path: &str, problems: &mut Vec<Problem>) -> Option<RequestKey> {
    let mut problem = |field: String, message: String| {
        problems.push(Problem {
            path: field,
            message,
        })
    };
    let given = usize::from(raw.cookie.is_some())
        + usize::from(raw.header.is_some())
        + usize::from(raw.client_ip.is_some());
    if given != 1 {
        problem(
            path.to_string(),
            "give exactly one of cookie: NAME, header: NAME or client_ip: true".into(),
        );
        return None;
    }
    if let Some(name) = raw.cookie {
        return match token_problem(&name) {
            Some(why) => {
                problem(format!("{path}.cookie"), format!("cookie name {why}"));
                None
            }
            None => Some(RequestKey::Cookie(name)),
        };
    }
    if let Some(name) = raw.header {
        return match token_problem(&name) {
            Some(why) => {
                problem(format!("{path}.header"), format!("header name {why}"));
                None
            }
            None => Some(RequestKey::Header(name.to_ascii_lowercase())),
        };
    }
    if raw.client_ip == Some(false) {
        problem(
            format!("{path}.client_ip"),
            "must be true (leave the key out for no key)".into(),
        );
        return None;
    }
    Some(RequestKey::ClientIp)
}

fn too_many(problem: &mut impl FnMut(String, String), path: &str, count: usize) {
    if count > MAX_MATCH_ENTRIES {
        problem(
            path.to_string(),
            format!("{count} entries, over the limit of {MAX_MATCH_ENTRIES}"),
        );
    }
}

/// Why `name` is not an HTTP token (RFC 9110 §5.6.2), which header and cookie names are.
fn token_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("must not be empty".into());
    }
    if name.len() > MAX_MATCH_TEXT {
        return Some(format!("is longer than {MAX_MATCH_TEXT} bytes"));
    }
    name.bytes().find(|&b| !is_token_byte(b)).map(|b| {
        format!(
            "{name:?} has {:?}, which a name cannot contain (letters, digits and !#$%&'*+-.^_`|~ only)",
            char::from(b)
        )
    })
}

fn value_problem(value: &str, allowed: fn(u8) -> bool) -> Option<String> {
    if value.len() > MAX_MATCH_TEXT {
        return Some(format!("is longer than {MAX_MATCH_TEXT} bytes"));
    }
    value
        .bytes()
        .find(|&b| !allowed(b))
        .map(|b| format!("{value:?} has {:?}, which it cannot contain", char::from(b)))
}

pub(crate) fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Visible ASCII and spaces inside; a value that cannot arrive in a header can never match.
fn is_header_value_byte(b: u8) -> bool {
    (0x20..0x7f).contains(&b)
}

/// RFC 6265's cookie-octet: no spaces, quotes, commas, semicolons or backslashes.
fn is_cookie_value_byte(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> (RouteMatch, Vec<String>) {
        let raw: RawMatch = serde_yaml::from_str(yaml).unwrap();
        let mut problems = Vec::new();
        let m = route_match(raw, "routes[0].match", &mut problems);
        (m, problems.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn a_match_is_typed_with_lower_case_header_names_and_upper_case_methods() {
        let (m, problems) = parse(
            "headers: {X-User-Group: beta, X-Debug: '*'}\ncookies: {group: beta}\nquery: {preview: '1'}\nmethods: [get, HEAD]\n",
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            m.headers,
            vec![
                ("x-debug".to_string(), ValueMatch::Present),
                ("x-user-group".to_string(), ValueMatch::Exact("beta".into())),
            ]
        );
        assert_eq!(
            m.cookies,
            vec![("group".into(), ValueMatch::Exact("beta".into()))]
        );
        assert_eq!(
            m.query,
            vec![("preview".into(), ValueMatch::Exact("1".into()))]
        );
        assert_eq!(m.methods, vec!["GET".to_string(), "HEAD".to_string()]);
    }

    #[test]
    fn every_bad_entry_is_named_by_its_field_path() {
        let (_, problems) = parse(
            "headers: {'': x, 'Bad Name': y, X-A: \"new\\nline\"}\ncookies: {'a;b': x, ok: 'has space'}\nquery: {'': x}\nmethods: [GET, FETCH, get]\n",
        );
        let expected = [
            "routes[0].match.headers.: header name must not be empty",
            "routes[0].match.headers.Bad Name: header name \"Bad Name\" has ' '",
            "routes[0].match.headers.X-A: header value \"new\\nline\" has '\\n'",
            "routes[0].match.cookies.a;b: cookie name \"a;b\" has ';'",
            "routes[0].match.cookies.ok: cookie value \"has space\" has ' '",
            "routes[0].match.query.: query parameter name must not be empty",
            "routes[0].match.methods[1]: \"FETCH\" is not an HTTP method",
            "routes[0].match.methods[2]: get is named twice",
        ];
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
        for (got, want) in problems.iter().zip(expected) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
    }

    #[test]
    fn two_spellings_of_one_header_are_refused() {
        let (_, problems) = parse("headers: {X-Group: a, x-group: b}\n");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("named twice"), "{problems:?}");
    }

    #[test]
    fn empty_methods_are_refused() {
        let (_, problems) = parse("methods: []\n");
        assert!(problems[0].starts_with("routes[0].match.methods: must name at least one"));
    }

    fn sticky_of(yaml: &str) -> (Option<Sticky>, Vec<String>) {
        let raw: RawSticky = serde_yaml::from_str(yaml).unwrap();
        let mut problems = Vec::new();
        let s = sticky(raw, "routes[0].sticky", &mut problems);
        (s, problems.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn sticky_keys_and_their_mistakes() {
        assert_eq!(
            sticky_of("header: X-User-Id\n").0,
            Some(Sticky {
                key: RequestKey::Header("x-user-id".into()),
                set_cookie: false
            })
        );
        assert_eq!(
            sticky_of("cookie: switchyard_user\nset_cookie: true\n").0,
            Some(Sticky {
                key: RequestKey::Cookie("switchyard_user".into()),
                set_cookie: true
            })
        );
        let cases = [
            ("{}", "routes[0].sticky: give exactly one of"),
            (
                "cookie: a\nheader: b\n",
                "routes[0].sticky: give exactly one of",
            ),
            (
                "client_ip: false\n",
                "routes[0].sticky.client_ip: must be true",
            ),
            (
                "cookie: SESSIONID\nset_cookie: true\n",
                "routes[0].sticky.cookie: \"SESSIONID\": set_cookie issues cookies",
            ),
            (
                "header: X-User\nset_cookie: true\n",
                "routes[0].sticky.set_cookie: applies only to a cookie key",
            ),
            (
                "cookie: ''\n",
                "routes[0].sticky.cookie: cookie name must not be empty",
            ),
        ];
        for (yaml, want) in cases {
            let (s, problems) = sticky_of(yaml);
            assert!(s.is_none(), "{yaml}");
            assert!(
                problems.len() == 1 && problems[0].starts_with(want),
                "{yaml}: {problems:?}"
            );
        }
    }
}
