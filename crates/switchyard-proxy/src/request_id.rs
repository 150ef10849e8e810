//! `X-Request-Id`: the client's own when it is one of at most 128 printable ASCII
//! characters, otherwise a new one: 32 random hex digits, as nginx's `$request_id`. It goes to
//! the backend, back to the client, and into the access log, so one id follows a request
//! through every log it touches.
//!
//! A new id costs no system call: it comes from rand's per-thread ChaCha generator, which
//! goes back to the OS for a new seed only after 64 KiB of output (once per ~4 000 ids).

use http::{HeaderMap, HeaderName, HeaderValue};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client id kept.
pub const MAX_LEN: usize = 128;

/// The request's id: the one it came with if that is acceptable, else a new one.
pub fn of(headers: &HeaderMap) -> HeaderValue {
    let mut sent = headers.get_all(X_REQUEST_ID).iter();
    match (sent.next(), sent.next()) {
        (Some(id), None) if acceptable(id.as_bytes()) => id.clone(),
        // Absent, repeated (which one would be the id?) or not printable.
        _ => generate(),
    }
}

fn acceptable(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_LEN && id.iter().all(|b| (0x20..=0x7e).contains(b))
}

/// A new id, for an answer that has no request to take one from.
pub fn new_id() -> HeaderValue {
    generate()
}

fn generate() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = rand::random::<u128>();
    let mut text = [0u8; 32];
    // By hand: `format!("{:032x}")` goes through core::fmt, several times the cost.
    for (i, digit) in text.iter_mut().enumerate() {
        *digit = HEX[((bits >> (124 - 4 * i)) & 0xf) as usize];
    }
    // Hex digits are always a valid header value.
    HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(values: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(X_REQUEST_ID, HeaderValue::from_bytes(v).unwrap());
        }
        headers
    }

    fn is_generated(id: &HeaderValue) -> bool {
        id.len() == 32
            && id
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    }

    #[test]
    fn a_good_client_id_is_kept() {
        let id = "req 42/abc:Z~".as_bytes();
        assert_eq!(of(&with(&[id])).as_bytes(), id);
        let longest = vec![b'x'; MAX_LEN];
        assert_eq!(of(&with(&[&longest])).as_bytes(), &longest[..]);
    }

    #[test]
    fn anything_else_gets_a_new_id() {
        let too_long = vec![b'x'; MAX_LEN + 1];
        for headers in [
            with(&[]),
            with(&[b""]),
            with(&[&too_long]),
            with(&[b"caf\xc3\xa9"]),
            with(&[b"tab\there"]),
            with(&[b"one", b"two"]),
        ] {
            let id = of(&headers);
            assert!(is_generated(&id), "{id:?} for {headers:?}");
        }
    }

    #[test]
    fn new_ids_differ() {
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| generate()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(ids.iter().all(is_generated));
    }
}
