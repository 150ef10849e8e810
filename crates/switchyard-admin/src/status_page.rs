//! `GET /` on the admin address: the status page, one self-contained HTML file
//! (`status_page.html`, inline CSS and JS, no external resource, no build step) embedded in
//! the binary. It holds no data — it fetches the same JSON views as every other client, with
//! the bearer token when the API needs one — so it needs no token itself.
//!
//! The page is served with a strict Content-Security-Policy: nothing loads but the page, its
//! own inline script and style (allowed by their SHA-256, so an injected `<script>` would not
//! run even if a name from the config ever reached the page as markup), and fetches to this
//! origin; no framing, no form posts, no base URL.

use std::sync::OnceLock;

use base64::Engine as _;
use http::{header, Method, Response, StatusCode};

/// The page.
pub const PAGE: &str = include_str!("status_page.html");

/// The policy the page is served with, made once from the page's own inline blocks.
pub fn content_security_policy() -> &'static str {
    static POLICY: OnceLock<String> = OnceLock::new();
    POLICY.get_or_init(|| {
        let script = inline_block(PAGE, "script");
        let style = inline_block(PAGE, "style");
        format!(
            "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
            sha256_base64(script),
            sha256_base64(style)
        )
    })
}

/// The text between `<tag>` and `</tag>` (the page has one of each): what the browser hashes.
fn inline_block<'a>(page: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    page.split_once(&open)
        .and_then(|(_, rest)| rest.split_once(&close))
        .map_or("", |(inside, _)| inside)
}

fn sha256_base64(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// The answer to a request for `/`: the page for GET and HEAD (Pingora sends no body for
/// HEAD, and keeps the GET's `Content-Length`), 405 for anything else.
pub fn serve(method: &Method) -> Response<Vec<u8>> {
    let builder = Response::builder()
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::REFERRER_POLICY, "no-referrer")
        // The page is the same for every version of the data: always fetch it anew, so an
        // upgrade's new page is what the operator sees.
        .header(header::CACHE_CONTROL, "no-store");
    let response = match *method {
        Method::GET | Method::HEAD => builder
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
            .header(header::CONTENT_SECURITY_POLICY, content_security_policy())
            .header(header::X_FRAME_OPTIONS, "DENY")
            .header(header::CONTENT_LENGTH, PAGE.len())
            .body(PAGE.as_bytes().to_vec()),
        _ => {
            let body = format!(
                "{:#}\n",
                serde_json::json!({
                    "error": format!("method {method} is not allowed here; allowed: GET, HEAD")
                })
            )
            .into_bytes();
            builder
                .status(StatusCode::METHOD_NOT_ALLOWED)
                .header(header::ALLOW, "GET, HEAD")
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_LENGTH, body.len())
                .body(body)
        }
    };
    // Every header above is a valid constant or number: building cannot fail.
    response.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        // Nor does it parse data as markup or code.
        let as_markup = [
            ".innerHTML",
            ".outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ];
        for outside in ["http://", "https://", "//", "@import", "<iframe"]
            .into_iter()
            .chain(as_markup)
        {
            let found = PAGE
                .match_indices(outside)
                .map(|(at, _)| &PAGE[at.saturating_sub(30)..(at + 40).min(PAGE.len())])
                .collect::<Vec<_>>();
            // Comments in the script start with `//` and say why: those are fine.
            let found: Vec<_> = found
                .into_iter()
                .filter(|context| !(outside == "//" && context.contains("// ")))
                .collect();
            assert!(found.is_empty(), "{outside}: {found:?}");
        }
        // One inline script and one inline style, both covered by the policy's hashes.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert!(
            !PAGE.contains(" style=\""),
            "no style attributes: the policy forbids them"
        );
    }

    #[test]
    fn the_policy_hashes_the_inline_blocks() {
        let policy = content_security_policy();
        assert!(policy.starts_with("default-src 'none'; script-src 'sha256-"));
        let script = inline_block(PAGE, "script");
        assert!(script.contains("TICK_MS"));
        assert!(policy.contains(&format!("'sha256-{}'", sha256_base64(script))));
        // A known SHA-256, in the base64 form CSP uses.
        assert_eq!(
            sha256_base64(""),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }

    #[test]
    fn get_and_head_serve_the_page_and_other_methods_are_refused() {
        for method in [Method::GET, Method::HEAD] {
            let r = serve(&method);
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(
                r.headers()[header::CONTENT_SECURITY_POLICY],
                content_security_policy()
            );
            assert_eq!(r.headers()[header::CONTENT_LENGTH], PAGE.len().to_string());
        }
        let r = serve(&Method::POST);
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD");
    }
}
