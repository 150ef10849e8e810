//! A route's `match` (or a rollout's match step) compiled for the request path: header names
//! as `HeaderName`s and methods as `Method`s, so checking a request compares bytes and
//! allocates nothing. Built once per snapshot from the validated config.

use http::{HeaderName, Method};
use switchyard_config::{RouteMatch, ValueMatch};

use crate::request::{decoded_eq, Request};

/// Conditions that must all hold; none: every request matches.
pub struct Matcher {
    headers: Box<[(HeaderName, ValueMatch)]>,
    cookies: Box<[(Box<str>, ValueMatch)]>,
    query: Box<[(Box<str>, ValueMatch)]>,
    methods: Box<[Method]>,
    /// A condition could not be compiled: nothing matches.
    never: bool,
}

impl Matcher {
    /// `None` for a match without conditions. A name the config validated but `http` refuses
    /// (there should be none) makes a matcher that matches nothing, with an error in the
    /// log: left out, the condition would let through requests it was written to keep out.
    pub fn new(spec: &RouteMatch) -> Option<Matcher> {
        if spec.is_empty() {
            return None;
        }
        let headers: Result<Box<[_]>, String> = spec
            .headers
            .iter()
            .map(|(name, value)| {
                HeaderName::from_bytes(name.as_bytes())
                    .map(|header| (header, value.clone()))
                    .map_err(|e| format!("header name {name:?}: {e}"))
            })
            .collect();
        let methods: Result<Box<[_]>, String> = spec
            .methods
            .iter()
            .map(|m| Method::from_bytes(m.as_bytes()).map_err(|e| format!("method {m:?}: {e}")))
            .collect();
        let named = |entries: &[(String, ValueMatch)]| {
            entries
                .iter()
                .map(|(name, value)| (name.as_str().into(), value.clone()))
                .collect()
        };
        let (headers, methods, never) = match (headers, methods) {
            (Ok(headers), Ok(methods)) => (headers, methods, false),
            (Err(e), _) | (_, Err(e)) => {
                log::error!("match: {e}; the match takes no request");
                (Box::default(), Box::default(), true)
            }
        };
        Some(Matcher {
            headers,
            cookies: named(&spec.cookies),
            query: named(&spec.query),
            methods,
            never,
        })
    }

    /// Whether every condition holds for `request`. A header matches when any of its values
    /// does (a header sent twice); a cookie or query parameter by its first occurrence.
    pub fn is_match(&self, request: &Request) -> bool {
        !self.never
            && (self.methods.is_empty() || self.methods.contains(request.method))
            && self.headers.iter().all(|(name, want)| {
                let mut values = request.headers.get_all(name).iter();
                match want {
                    ValueMatch::Present => values.next().is_some(),
                    ValueMatch::Exact(value) => values.any(|v| v.as_bytes() == value.as_bytes()),
                }
            })
            && self.cookies.iter().all(|(name, want)| {
                request
                    .cookie(name)
                    .is_some_and(|got| value_matches(want, got))
            })
            && self.query.iter().all(|(name, want)| {
                request.query_param(name).is_some_and(|got| match want {
                    ValueMatch::Present => true,
                    ValueMatch::Exact(value) => decoded_eq(got, value),
                })
            })
    }
}

fn value_matches(want: &ValueMatch, got: &[u8]) -> bool {
    match want {
        ValueMatch::Present => true,
        ValueMatch::Exact(value) => got == value.as_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn spec(json: &str) -> RouteMatch {
        let raw = serde_json::from_str(json).unwrap();
        let mut problems = Vec::new();
        let m = switchyard_config::matching::route_match(raw, "m", &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        m
    }

    fn check(
        matcher: &Matcher,
        method: Method,
        pairs: &[(&str, &str)],
        query: Option<&str>,
    ) -> bool {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        matcher.is_match(&Request {
            host: None,
            path: "/",
            query,
            method: &method,
            headers: &headers,
            client: None,
            issued: None,
        })
    }

    #[test]
    fn every_condition_must_hold() {
        let m = Matcher::new(&spec(
            r#"{"headers": {"X-User-Group": "beta"}, "cookies": {"plan": "pro"}, "query": {"preview": "1"}, "methods": ["GET"]}"#,
        ))
        .unwrap();
        let all = [("x-user-group", "beta"), ("cookie", "plan=pro")];
        assert!(check(&m, Method::GET, &all, Some("preview=1")));
        assert!(!check(&m, Method::POST, &all, Some("preview=1")), "method");
        assert!(
            !check(&m, Method::GET, &all, Some("preview=2")),
            "query value"
        );
        assert!(!check(&m, Method::GET, &all, None), "no query");
        assert!(
            !check(
                &m,
                Method::GET,
                &[("x-user-group", "Beta"), ("cookie", "plan=pro")],
                Some("preview=1")
            ),
            "header values are case-sensitive"
        );
        assert!(
            !check(
                &m,
                Method::GET,
                &[("x-user-group", "beta")],
                Some("preview=1")
            ),
            "no cookie"
        );
    }

    #[test]
    fn star_means_present_and_a_repeated_header_matches_on_any_value() {
        let m = Matcher::new(&spec(r#"{"headers": {"X-Debug": "*", "X-Group": "b"}}"#)).unwrap();
        assert!(check(
            &m,
            Method::GET,
            &[("X-Debug", ""), ("x-group", "a"), ("x-group", "b")],
            None
        ));
        assert!(!check(&m, Method::GET, &[("x-group", "b")], None));
    }

    #[test]
    fn a_condition_that_cannot_be_compiled_matches_nothing() {
        let spec = RouteMatch {
            headers: vec![("bad name".into(), ValueMatch::Present)],
            ..RouteMatch::default()
        };
        let m = Matcher::new(&spec).unwrap();
        assert!(!check(&m, Method::GET, &[("x", "y")], None));
    }

    #[test]
    fn an_empty_match_is_no_matcher() {
        assert!(Matcher::new(&RouteMatch::default()).is_none());
    }
}
