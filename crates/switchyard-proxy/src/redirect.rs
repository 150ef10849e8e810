//! `redirect_https` on a cleartext listener: every request is answered `308` to the same host
//! (without its port: the https listener has its own), path and query over https, except the
//! ACME HTTP-01 challenge, which a certificate authority fetches over plain HTTP.

use http::HeaderValue;
use pingora_http::RequestHeader;

const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";

/// What a request on a redirecting listener gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Redirect {
    /// `Location` for the `308`.
    To(HeaderValue),
    /// An ACME challenge: routed like any request.
    Serve,
    /// An HTTP/1.0 request without `Host`: there is no name to send it to.
    NoHost,
}

/// Where `req`, routed on `host` (already checked, without port), goes over https.
pub fn https_redirect(req: &RequestHeader, host: Option<&str>) -> Redirect {
    let target = req
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| p.starts_with('/'))
        .unwrap_or("/");
    if is_acme_challenge(target) {
        return Redirect::Serve;
    }
    let Some(host) = host else {
        return Redirect::NoHost;
    };
    // An IP literal comes with its brackets.
    let location = format!("https://{host}{target}");
    // Host and target were parsed as a header and a URI: nothing in them can break a header.
    match HeaderValue::try_from(location) {
        Ok(location) => Redirect::To(location),
        Err(_) => Redirect::NoHost,
    }
}

/// `/.well-known/acme-challenge/<token>` and nothing else: a token is base64url (RFC 8555
/// §8.3), so `..`, `%2e` or a query cannot ride the exemption to another path in cleartext.
fn is_acme_challenge(target: &str) -> bool {
    target.strip_prefix(ACME_CHALLENGE).is_some_and(|token| {
        !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// The `308`, with a short body for clients that show it.
/// The body of the `308` (the proxy sends it with `Location`).
pub const BODY: &str = "308 Permanent Redirect: this site is served over https\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn redirect(uri: &str, host: Option<&str>) -> Redirect {
        let req = RequestHeader::build("GET", uri.as_bytes(), None).unwrap();
        https_redirect(&req, host)
    }

    fn to(location: &str) -> Redirect {
        Redirect::To(HeaderValue::from_str(location).unwrap())
    }

    #[test]
    fn keeps_host_path_and_query() {
        assert_eq!(
            redirect("/a/b?x=1&y", Some("example.com")),
            to("https://example.com/a/b?x=1&y")
        );
        assert_eq!(
            redirect("/", Some("example.com")),
            to("https://example.com/")
        );
        assert_eq!(
            redirect("http://example.com:8080/p?q", Some("example.com")),
            to("https://example.com/p?q")
        );
        assert_eq!(redirect("/x", Some("[::1]")), to("https://[::1]/x"));
        assert_eq!(
            redirect("*", Some("example.com")),
            to("https://example.com/")
        );
    }

    #[test]
    fn acme_challenges_and_hostless_requests_are_not_redirected() {
        assert_eq!(
            redirect("/.well-known/acme-challenge/token", Some("example.com")),
            Redirect::Serve
        );
        assert_eq!(
            redirect("/.well-known/acme-challenge/t", None),
            Redirect::Serve
        );
        assert_eq!(redirect("/", None), Redirect::NoHost);
        for sneaky in [
            "/.well-known/acme-challenge/../../account",
            "/.well-known/acme-challenge/%2e%2e/account",
            "/.well-known/acme-challenge/t?x=1",
            "/.well-known/acme-challenge/",
            "/.well-known/acme-challenge/a/b",
        ] {
            assert_eq!(
                redirect(sneaky, Some("example.com")),
                to(&format!("https://example.com{sneaky}")),
                "{sneaky}"
            );
        }
    }
}
