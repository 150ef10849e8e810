//! Requests to `/api/` that a web page made, not an operator: refused before anything else.
//!
//! A browser lets any page it shows send a "simple" cross-site `POST` (a `text/plain` body
//! needs no CORS preflight), and the status page puts operators' browsers on the admin API's
//! origin. Two checks keep other pages out:
//! - **Origin**: a browser names the page's origin on every cross-site request, and on
//!   same-origin ones other than `GET`/`HEAD`. One that is not this API's own (the origin the
//!   request's `Host` names) is refused. curl and scripts send no `Origin` and are not affected.
//! - **Host**, without a token file: a page can rebind its own DNS name to 127.0.0.1 and then
//!   be same-origin with the API. Without a token nothing else stops it, so the API answers
//!   only requests to an IP address or `localhost` then. With a token the rebound page has no
//!   token to send (the status page keeps it per origin).

use http::HeaderMap;

/// Why the request is refused (`403`), or `None`.
pub fn refuse_cross_site(headers: &HeaderMap, token_configured: bool) -> Option<String> {
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::trim);
    if !token_configured {
        if let Some(host) = host.filter(|h| !is_address_or_localhost(h)) {
            return Some(format!(
                "this admin API has no token and answers requests to an IP address or localhost only (Host: {host}); set admin.token_file to reach it by name"
            ));
        }
    }
    let origin = headers.get(http::header::ORIGIN)?;
    let same = origin
        .to_str()
        .ok()
        .and_then(|o| o.strip_prefix("http://"))
        .zip(host)
        .is_some_and(|(origin_host, host)| origin_host.eq_ignore_ascii_case(host));
    (!same).then(|| {
        format!(
            "cross-site request refused: Origin {} is not this admin API (send requests from the status page on this address, curl or a script)",
            String::from_utf8_lossy(origin.as_bytes())
        )
    })
}

/// `127.0.0.1`, `127.0.0.1:9000`, `[::1]:9000`, `localhost:9000`, ...
fn is_address_or_localhost(host: &str) -> bool {
    if host.parse::<std::net::SocketAddr>().is_ok() || host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    name.eq_ignore_ascii_case("localhost")
        || (name.starts_with('[')
            && name.ends_with(']')
            && name[1..name.len() - 1]
                .parse::<std::net::Ipv6Addr>()
                .is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(
                http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn operators_tools_and_the_page_itself_pass() {
        for (pairs, token) in [
            (vec![("host", "127.0.0.1:9000")], false),
            (vec![("host", "localhost:9000")], false),
            (vec![("host", "[::1]:9000")], false),
            (vec![], false),
            (
                vec![
                    ("host", "127.0.0.1:9000"),
                    ("origin", "http://127.0.0.1:9000"),
                ],
                false,
            ),
            (vec![("host", "admin.example.com:9000")], true),
        ] {
            assert_eq!(
                refuse_cross_site(&headers(&pairs), token),
                None,
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn other_pages_and_rebound_names_are_refused() {
        let cross = headers(&[
            ("host", "127.0.0.1:9000"),
            ("origin", "https://evil.example"),
        ]);
        let e = refuse_cross_site(&cross, true).expect("refused");
        assert!(
            e.starts_with("cross-site request refused: Origin https://evil.example"),
            "{e}"
        );
        assert!(refuse_cross_site(
            &headers(&[("host", "127.0.0.1:9000"), ("origin", "null")]),
            true
        )
        .is_some());
        // DNS rebinding: same origin as far as the browser knows, but a name.
        let rebound = headers(&[
            ("host", "evil.example:9000"),
            ("origin", "http://evil.example:9000"),
        ]);
        let e = refuse_cross_site(&rebound, false).expect("refused");
        assert!(e.contains("(Host: evil.example:9000)"), "{e}");
        // With a token the name is fine (the rebound page has no token), another origin not.
        assert_eq!(refuse_cross_site(&rebound, true), None);
    }
}
