//! gRPC answers, for rollout analysis. A gRPC call that fails still answers HTTP `200`: its
//! outcome is the `grpc-status` code, in the response trailers, or in the headers of a
//! trailers-only response (a call that fails before sending any message). Any code other than
//! `0` (OK) counts as an error of the backend in the rollout windows, as Linkerd's default
//! gRPC classifier counts it; `switchyard_requests_total` keeps the HTTP status as its
//! `status` label.
//!
//! Only responses from `h2` and `h2c` upstreams are looked at: gRPC needs HTTP/2 to the
//! backend, and a plain HTTP/1.1 upstream's answers are not read for a header none of them
//! has.

use http::{HeaderMap, HeaderName};

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Whether `headers` (a response head or its trailers) end a gRPC call with an error:
/// `Some(true)` for a `grpc-status` other than `0`, `Some(false)` for `0`, `None` without
/// one. A value that is not a number is an error too (gRPC clients read it as UNKNOWN).
pub(crate) fn call_failed(headers: &HeaderMap) -> Option<bool> {
    let status = headers.get(GRPC_STATUS)?;
    Some(status.as_bytes().trim_ascii() != b"0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with_status(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        headers.insert(GRPC_STATUS, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn ok_is_no_error_and_every_other_code_is_one() {
        assert_eq!(call_failed(&with_status("0")), Some(false));
        for code in ["1", "2", "4", "5", "13", "14", "16", "UNAVAILABLE", ""] {
            assert_eq!(call_failed(&with_status(code)), Some(true), "{code:?}");
        }
    }

    #[test]
    fn no_status_says_nothing() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/grpc"));
        assert_eq!(call_failed(&headers), None, "a head before its trailers");
        assert_eq!(call_failed(&HeaderMap::new()), None);
    }
}
