//! The cookie a sticky route with `set_cookie: true` gives a request that has none: a fresh
//! random key, used for that request's pick already, and sent back in `Set-Cookie` so the
//! user's next requests carry it. Only requests that get a cookie allocate here.

use http::HeaderValue;
use pingora_core::{ErrorType, OrErr, Result};

/// How long a browser keeps an issued key: 30 days, long enough for a canary or an A/B test
/// to run its course without users being reshuffled, short enough not to be a tracking id.
pub const MAX_AGE_SECS: u64 = 30 * 24 * 3600;

/// A key issued with one request.
pub struct IssuedCookie {
    name: Box<str>,
    /// 128 random bits in hex: unguessable, and as evenly spread by the hash as any key.
    value: String,
}

impl IssuedCookie {
    pub fn new(name: &str) -> IssuedCookie {
        IssuedCookie {
            name: name.into(),
            value: format!("{:032x}", rand::random::<u128>()),
        }
    }

    /// The cookie as the request's own, for its pick.
    pub fn as_pair(&self) -> (&str, &str) {
        (&self.name, &self.value)
    }

    /// The `Set-Cookie` value: for every path, not readable by scripts, sent on top-level
    /// navigations from other sites but not on their sub-requests; over TLS (`secure`), never
    /// sent in cleartext.
    pub fn header(&self, secure: bool) -> Result<HeaderValue> {
        HeaderValue::try_from(format!(
            "{}={}; Path=/; Max-Age={MAX_AGE_SECS}; HttpOnly; SameSite=Lax{}",
            self.name,
            self.value,
            if secure { "; Secure" } else { "" }
        ))
        .or_err(ErrorType::InternalError, "sticky cookie")
    }
}

/// The `Cache-Control` an answer carrying an issued cookie must have, so that no shared cache
/// hands this user's key to others (as HAProxy's `cookie ... nocache` does): `private`, on top
/// of the backend's other directives, without `public` and `s-maxage` (which are for shared
/// caches). `None`: the backend's value already keeps shared caches out (`private` or
/// `no-store`).
pub fn private_cache_control(existing: Option<&HeaderValue>) -> Option<HeaderValue> {
    let existing = existing.and_then(|v| v.to_str().ok()).unwrap_or("");
    let directives: Vec<&str> = existing
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let name = |d: &str| {
        d.split('=')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    };
    if directives
        .iter()
        .any(|d| matches!(name(d).as_str(), "private" | "no-store"))
    {
        return None;
    }
    let mut kept: Vec<&str> = directives
        .into_iter()
        .filter(|d| !matches!(name(d).as_str(), "public" | "s-maxage"))
        .collect();
    kept.insert(0, "private");
    HeaderValue::from_str(&kept.join(", ")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_with_a_cookie_is_private_to_caches() {
        let value = |text: &str| HeaderValue::from_str(text).unwrap();
        let private = |existing: Option<&str>| {
            private_cache_control(existing.map(value).as_ref())
                .map(|v| v.to_str().unwrap().to_string())
        };
        assert_eq!(private(None).as_deref(), Some("private"));
        assert_eq!(
            private(Some("public, max-age=300, s-maxage=600")).as_deref(),
            Some("private, max-age=300")
        );
        assert_eq!(private(Some("Private, max-age=60")), None);
        assert_eq!(private(Some("no-store")), None);
        assert_eq!(
            private(Some("no-cache")).as_deref(),
            Some("private, no-cache")
        );
    }

    #[test]
    fn an_issued_cookie_is_random_and_well_formed() {
        let a = IssuedCookie::new("switchyard_user");
        let b = IssuedCookie::new("switchyard_user");
        assert_ne!(a.as_pair().1, b.as_pair().1);
        assert_eq!(a.as_pair().1.len(), 32);
        let header = a.header(false).unwrap();
        let text = header.to_str().unwrap();
        assert!(text.starts_with(&format!("switchyard_user={}; ", a.as_pair().1)));
        assert!(text.ends_with("; Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax"));
        let secure = a.header(true).unwrap();
        assert!(secure.to_str().unwrap().ends_with("; SameSite=Lax; Secure"));
    }
}
