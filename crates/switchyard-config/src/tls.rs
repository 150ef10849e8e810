//! The edge side of a listener (TLS, HTTP/2, the redirect to https) and the protocol an
//! upstream speaks to its backends: the file's shape, the typed values and their validation.
//!
//! Only paths and choices are checked here. Whether a certificate file can be read, parsed and
//! matches its key is the TLS crate's to say (at start, in `check` and on every reload), since
//! the file can change under a running process while this config stays the same.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::duration::YamlDuration;
use crate::Problem;

/// HSTS `max-age` above this is refused: two years is what the preload list asks for, and a
/// typo of a few more digits would pin browsers to https for centuries.
pub const MAX_HSTS_AGE: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// Certificates one TLS listener may have.
pub const MAX_CERTIFICATES: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub address: String,
    pub tls: Option<RawListenerTls>,
    pub http2: Option<bool>,
    pub h2c: Option<bool>,
    pub redirect_https: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListenerTls {
    pub certificates: Option<Vec<RawCertificate>>,
    pub min_version: Option<String>,
    pub session_tickets: Option<bool>,
    pub hsts: Option<RawHsts>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCertificate {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHsts {
    pub max_age: YamlDuration,
    pub include_subdomains: Option<bool>,
    pub preload: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamTls {
    pub ca_file: Option<PathBuf>,
    pub server_name: Option<String>,
    pub verify: Option<bool>,
}

/// What a listener speaks once a connection is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenerKind {
    /// Cleartext HTTP/1.1; `h2c`: also HTTP/2 by prior knowledge.
    Plain {
        h2c: bool,
        redirect_https: bool,
    },
    Tls(ListenerTls),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// In file order: the first serves clients without SNI or with a name no certificate has.
    pub certificates: Vec<CertificateFiles>,
    pub min_version: TlsVersion,
    /// ALPN `h2` (and `http/1.1`); without it, `http/1.1` only.
    pub http2: bool,
    /// Stateless resumption (RFC 5077 tickets under keys that rotate) on top of the stateful
    /// session cache every TLS listener has.
    pub session_tickets: bool,
    pub hsts: Option<Hsts>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

impl TlsVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsVersion::Tls12 => "1.2",
            TlsVersion::Tls13 => "1.3",
        }
    }
}

/// `Strict-Transport-Security` on every response over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hsts {
    pub max_age: Duration,
    pub include_subdomains: bool,
    pub preload: bool,
}

impl Hsts {
    /// The header value, e.g. `max-age=31536000; includeSubDomains`.
    pub fn header_value(&self) -> String {
        let mut value = format!("max-age={}", self.max_age.as_secs());
        if self.include_subdomains {
            value.push_str("; includeSubDomains");
        }
        if self.preload {
            value.push_str("; preload");
        }
        value
    }
}

/// The protocol an upstream speaks to its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 over TLS (ALPN `h2`).
    H2,
    /// HTTP/2 in cleartext by prior knowledge.
    H2c,
}

impl UpstreamProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamProtocol::Http1 => "http1",
            UpstreamProtocol::H2 => "h2",
            UpstreamProtocol::H2c => "h2c",
        }
    }

    /// HTTP/2 towards the backends, over TLS or not.
    pub fn is_h2(self) -> bool {
        matches!(self, UpstreamProtocol::H2 | UpstreamProtocol::H2c)
    }
}

/// TLS towards an upstream's backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// PEM file of the CAs a backend's certificate must chain to; `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// SNI and the name the backend's certificate must have; `None`: the backend's address
    /// (an IP address SAN).
    pub server_name: Option<String>,
    /// `false` (a lab only): any certificate is accepted.
    pub verify: bool,
}

pub(crate) fn listener_kind(
    raw: &RawListener,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Option<ListenerKind> {
    let mut problem = |field: &str, message: String| {
        problems.push(Problem {
            path: format!("{path}.{field}"),
            message,
        })
    };
    let h2c = raw.h2c.unwrap_or(false);
    let redirect_https = raw.redirect_https.unwrap_or(false);
    let Some(tls) = &raw.tls else {
        if raw.http2.is_some() {
            problem(
                "http2",
                "applies to TLS listeners (ALPN h2); for cleartext HTTP/2 by prior knowledge set h2c: true".into(),
            );
        }
        if h2c && redirect_https {
            problem(
                "h2c",
                "a listener with redirect_https answers every request with a redirect; it has nothing to serve over h2c".into(),
            );
        }
        return Some(ListenerKind::Plain {
            h2c,
            redirect_https,
        });
    };
    if raw.h2c.is_some() {
        problem(
            "h2c",
            "applies to plain listeners; a TLS listener offers HTTP/2 over ALPN (http2)".into(),
        );
    }
    if raw.redirect_https.is_some() {
        problem(
            "redirect_https",
            "applies to plain listeners; this one already is https".into(),
        );
    }
    let before = problems.len();
    let tls = listener_tls(
        tls,
        raw.http2.unwrap_or(true),
        &format!("{path}.tls"),
        problems,
    );
    (problems.len() == before).then_some(ListenerKind::Tls(tls))
}

fn listener_tls(
    raw: &RawListenerTls,
    http2: bool,
    path: &str,
    problems: &mut Vec<Problem>,
) -> ListenerTls {
    let mut problem = |field: &str, message: String| {
        problems.push(Problem {
            path: format!("{path}.{field}"),
            message,
        })
    };
    let certificates: Vec<CertificateFiles> = raw
        .certificates
        .iter()
        .flatten()
        .map(|c| CertificateFiles {
            cert: c.cert.clone(),
            key: c.key.clone(),
        })
        .collect();
    if certificates.is_empty() {
        problem(
            "certificates",
            "at least one certificate is required: [{cert: FILE, key: FILE}]".into(),
        );
    }
    if certificates.len() > MAX_CERTIFICATES {
        problem(
            "certificates",
            format!(
                "{} certificates; at most {MAX_CERTIFICATES} per listener",
                certificates.len()
            ),
        );
    }
    for (i, c) in certificates.iter().enumerate() {
        for (field, file) in [("cert", &c.cert), ("key", &c.key)] {
            if file.as_os_str().is_empty() {
                problem(&format!("certificates[{i}].{field}"), "is empty".into());
            }
        }
    }
    let min_version = match raw.min_version.as_deref() {
        None | Some("1.2") => TlsVersion::Tls12,
        Some("1.3") => TlsVersion::Tls13,
        Some(other) => {
            problem(
                "min_version",
                format!(
                    "{other:?} is not a TLS version this listener offers; use \"1.2\" or \"1.3\""
                ),
            );
            TlsVersion::Tls12
        }
    };
    let hsts = raw.hsts.as_ref().map(|h| Hsts {
        max_age: h.max_age.0,
        include_subdomains: h.include_subdomains.unwrap_or(false),
        preload: h.preload.unwrap_or(false),
    });
    if let Some(h) = &hsts {
        if h.max_age > MAX_HSTS_AGE {
            problem(
                "hsts.max_age",
                format!(
                    "{} s is over the limit of {} s (two years)",
                    h.max_age.as_secs(),
                    MAX_HSTS_AGE.as_secs()
                ),
            );
        }
        if h.preload && (!h.include_subdomains || h.max_age < Duration::from_secs(365 * 24 * 3600))
        {
            problem(
                "hsts.preload",
                "the preload list requires include_subdomains: true and max_age of at least 365d"
                    .into(),
            );
        }
    }
    ListenerTls {
        certificates,
        min_version,
        http2,
        session_tickets: raw.session_tickets.unwrap_or(true),
        hsts,
    }
}

pub(crate) fn upstream_tls(
    protocol: UpstreamProtocol,
    raw: Option<RawUpstreamTls>,
    path: &str,
    problems: &mut Vec<Problem>,
) -> Option<UpstreamTls> {
    let mut problem = |field: &str, message: String| {
        problems.push(Problem {
            path: format!("{path}.{field}"),
            message,
        })
    };
    match (protocol, &raw) {
        (UpstreamProtocol::H2, None) => problem(
            "protocol",
            "h2 is HTTP/2 over TLS and needs tls: {...} (ca_file, server_name); for cleartext HTTP/2 use h2c".into(),
        ),
        (UpstreamProtocol::H2c, Some(_)) => problem(
            "tls",
            "h2c is cleartext HTTP/2; for HTTP/2 over TLS use protocol: h2".into(),
        ),
        _ => {}
    }
    let raw = raw?;
    if let Some(file) = &raw.ca_file {
        if file.as_os_str().is_empty() {
            problem("tls.ca_file", "is empty".into());
        }
    }
    if let Some(name) = &raw.server_name {
        if !valid_server_name(name) {
            problem(
                "tls.server_name",
                format!("{name:?} is not a DNS name or IP address"),
            );
        }
    }
    Some(UpstreamTls {
        ca_file: raw.ca_file,
        server_name: raw.server_name,
        verify: raw.verify.unwrap_or(true),
    })
}

/// A DNS name (letters, digits, `-`, dots; no empty label; the last label not all digits,
/// which TLS libraries take for a malformed address) or an IP address.
fn valid_server_name(name: &str) -> bool {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let last = name.trim_end_matches('.').rsplit('.').next().unwrap_or("");
    if !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    !name.is_empty()
        && name.len() <= 253
        && name.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names() {
        for good in ["api.internal", "a", "10.0.0.1", "::1", "x-y.example.com."] {
            assert!(valid_server_name(good), "{good}");
        }
        for bad in [
            "",
            "a..b",
            "-a.b",
            "a b",
            "a/b",
            "https://a",
            "db.1",
            "10.0.0",
        ] {
            assert!(!valid_server_name(bad), "{bad}");
        }
    }

    #[test]
    fn hsts_header() {
        let hsts = Hsts {
            max_age: Duration::from_secs(31_536_000),
            include_subdomains: true,
            preload: true,
        };
        assert_eq!(
            hsts.header_value(),
            "max-age=31536000; includeSubDomains; preload"
        );
    }
}
