//! One request as one line: JSON or nginx's `combined`, written straight into a byte buffer
//! (no intermediate strings; the time's text is made once per second per thread). Numbers and
//! IPv4 addresses are written with `itoa`, not `core::fmt`, which cost more than all the rest of
//! a line (measured with callgrind: ~7 000 instructions a line with `write!`).
//!
//! Everything a client sends (path, host, user agent, referer, request id) is escaped, so
//! that no request can break a line in two or forge a field.

use std::cell::RefCell;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use switchyard_config::LogFormat;

/// What one request leaves in the access log. Borrowed from the request's state: building
/// one costs nothing, formatting it is the only work.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// When the answer was done (as nginx's `$time_iso8601`).
    pub time: SystemTime,
    pub client: Option<IpAddr>,
    /// `None` for a head refused before it was parsed (`408`, `414`, `431`): no request line.
    pub method: Option<&'a str>,
    /// The `Host` header (or HTTP/2 `:authority`), as sent.
    pub host: Option<&'a [u8]>,
    pub path: Option<&'a str>,
    pub query: Option<&'a str>,
    /// `HTTP/1.1`, `HTTP/2.0`, ...
    pub protocol: Option<&'static str>,
    pub status: u16,
    /// Response body bytes sent to the client (nginx's `$body_bytes_sent`).
    pub bytes_sent: usize,
    /// From the first byte of the request to the end of the answer.
    pub duration: Duration,
    pub route: Option<&'a str>,
    pub upstream: Option<&'a str>,
    pub backend: Option<SocketAddr>,
    pub request_id: &'a [u8],
    /// Attempts on another backend or connection after the first.
    pub retries: u8,
    pub user_agent: Option<&'a [u8]>,
    pub referer: Option<&'a [u8]>,
    /// TLS version and cipher, on a TLS listener.
    pub tls: Option<(&'a str, &'a str)>,
    /// Why the request failed, when it did (Pingora's error type, e.g. `ConnectRefused`).
    pub error: Option<&'a str>,
}

/// Appends `record` as one line, ending in `\n`, in `format`.
pub fn write_line(out: &mut Vec<u8>, format: LogFormat, record: &Record<'_>) {
    match format {
        LogFormat::Json => json(out, record),
        LogFormat::Combined => combined(out, record),
    }
}

fn json(out: &mut Vec<u8>, r: &Record<'_>) {
    out.extend_from_slice(b"{\"time\":\"");
    TIME.with(|t| t.borrow_mut().iso8601(out, r.time));
    out.extend_from_slice(b"\",\"client\":");
    match r.client {
        Some(ip) => {
            out.push(b'"');
            ip_text(out, ip);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"method\":");
    json_opt(out, r.method.map(str::as_bytes));
    out.extend_from_slice(b",\"host\":");
    json_opt(out, r.host);
    out.extend_from_slice(b",\"path\":");
    json_opt(out, r.path.map(str::as_bytes));
    if let Some(query) = r.query {
        out.extend_from_slice(b",\"query\":");
        json_str(out, query.as_bytes());
    }
    out.extend_from_slice(b",\"protocol\":");
    json_opt(out, r.protocol.map(str::as_bytes));
    out.extend_from_slice(b",\"status\":");
    number(out, r.status);
    out.extend_from_slice(b",\"bytes_sent\":");
    number(out, r.bytes_sent);
    out.extend_from_slice(b",\"duration_ms\":");
    number(out, r.duration.as_millis() as u64);
    out.push(b'.');
    three_digits(out, r.duration.subsec_micros() % 1000);
    out.extend_from_slice(b",\"route\":");
    json_opt(out, r.route.map(str::as_bytes));
    out.extend_from_slice(b",\"upstream\":");
    json_opt(out, r.upstream.map(str::as_bytes));
    out.extend_from_slice(b",\"backend\":");
    match r.backend {
        Some(address) => {
            out.push(b'"');
            socket_text(out, address);
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"request_id\":");
    json_str(out, r.request_id);
    out.extend_from_slice(b",\"retries\":");
    number(out, r.retries);
    out.extend_from_slice(b",\"user_agent\":");
    json_opt(out, r.user_agent);
    if let Some(referer) = r.referer {
        out.extend_from_slice(b",\"referer\":");
        json_str(out, referer);
    }
    if let Some((version, cipher)) = r.tls {
        out.extend_from_slice(b",\"tls_version\":");
        json_str(out, version.as_bytes());
        out.extend_from_slice(b",\"tls_cipher\":");
        json_str(out, cipher.as_bytes());
    }
    if let Some(error) = r.error {
        out.extend_from_slice(b",\"error\":");
        json_str(out, error.as_bytes());
    }
    out.extend_from_slice(b"}\n");
}

/// `$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent
/// "$http_referer" "$http_user_agent"`, exactly nginx's `combined`, so that GoAccess, AWStats
/// and friends read it unchanged.
fn combined(out: &mut Vec<u8>, r: &Record<'_>) {
    match r.client {
        Some(ip) => ip_text(out, ip),
        None => out.push(b'-'),
    }
    out.extend_from_slice(b" - - [");
    TIME.with(|t| t.borrow_mut().clf(out, r.time));
    out.extend_from_slice(b"] \"");
    match (r.method, r.path) {
        (Some(method), Some(path)) => {
            escaped(out, method.as_bytes());
            out.push(b' ');
            escaped(out, path.as_bytes());
            if let Some(query) = r.query {
                out.push(b'?');
                escaped(out, query.as_bytes());
            }
            out.push(b' ');
            out.extend_from_slice(r.protocol.unwrap_or("-").as_bytes());
        }
        // As nginx logs a request it could not read: `"-"`.
        _ => out.push(b'-'),
    }
    out.extend_from_slice(b"\" ");
    number(out, r.status);
    out.push(b' ');
    number(out, r.bytes_sent);
    out.extend_from_slice(b" \"");
    escaped_or_dash(out, r.referer);
    out.extend_from_slice(b"\" \"");
    escaped_or_dash(out, r.user_agent);
    out.extend_from_slice(b"\"\n");
}

fn number(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn three_digits(out: &mut Vec<u8>, n: u32) {
    let n = n.min(999);
    let digit = |d: u32| b'0' + (d % 10) as u8;
    out.extend_from_slice(&[digit(n / 100), digit(n / 10), digit(n)]);
}

/// An address as text, appended to `out`: the access log's `client` field and the proxy's
/// `X-Forwarded-For`, both written once per request.
pub fn ip_text(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            octet(out, a);
            out.push(b'.');
            octet(out, b);
            out.push(b'.');
            octet(out, c);
            out.push(b'.');
            octet(out, d);
        }
        // Rare enough for `core::fmt` (and its shortest form is subtle).
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

fn octet(out: &mut Vec<u8>, n: u8) {
    let digit = |d: u8| b'0' + d % 10;
    match n {
        100.. => out.extend_from_slice(&[digit(n / 100), digit(n / 10), digit(n)]),
        10.. => out.extend_from_slice(&[digit(n / 10), digit(n)]),
        _ => out.push(digit(n)),
    }
}

fn socket_text(out: &mut Vec<u8>, address: SocketAddr) {
    match address {
        SocketAddr::V4(v4) => ip_text(out, IpAddr::V4(*v4.ip())),
        SocketAddr::V6(v6) => {
            out.push(b'[');
            ip_text(out, IpAddr::V6(*v6.ip()));
            out.push(b']');
        }
    }
    out.push(b':');
    number(out, address.port());
}

fn json_opt(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(v) => json_str(out, v),
        None => out.extend_from_slice(b"null"),
    }
}

/// A JSON string. Bytes that are not UTF-8 (header values may carry any octet) become
/// `\u00XX`, so the line stays valid JSON and the byte can still be read off it.
fn json_str(out: &mut Vec<u8>, value: &[u8]) {
    out.reserve(value.len() + 2);
    out.push(b'"');
    // Almost every value needs no escape at all: one pass to tell, one copy.
    match value.iter().position(|&b| JSON_ESCAPE[usize::from(b)]) {
        None => out.extend_from_slice(value),
        Some(first) => json_escaped(out, value, first),
    }
    out.push(b'"');
}

/// The rest of [`json_str`] from the first byte that may need an escape. Bytes of 0x80 and up
/// pass as they are in UTF-8 text, and are escaped otherwise.
#[cold]
fn json_escaped(out: &mut Vec<u8>, value: &[u8], first: usize) {
    let high_ok = std::str::from_utf8(value).is_ok();
    out.extend_from_slice(&value[..first]);
    let mut start = first;
    for (at, &b) in value.iter().enumerate().skip(first) {
        if !JSON_ESCAPE[usize::from(b)] || (b >= 0x80 && high_ok) {
            continue;
        }
        out.extend_from_slice(&value[start..at]);
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&[HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
            }
        }
        start = at + 1;
    }
    out.extend_from_slice(&value[start..]);
}

/// The bytes a JSON string cannot carry as they are: control characters, `"`, `\\`, DEL, and
/// (unless the text is UTF-8) 0x80 and up.
const JSON_ESCAPE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = b < 0x20 || b == b'"' as usize || b == b'\\' as usize || b >= 0x7f;
        b += 1;
    }
    table
};

/// nginx's default log escaping: `"`, `\`, control and non-ASCII bytes as `\xXX`.
fn escaped(out: &mut Vec<u8>, value: &[u8]) {
    for &b in value {
        match b {
            b'"' | b'\\' | ..0x20 | 0x7f.. => {
                let _ = write!(out, "\\x{b:02X}");
            }
            _ => out.push(b),
        }
    }
}

fn escaped_or_dash(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(v) if !v.is_empty() => escaped(out, v),
        _ => out.push(b'-'),
    }
}

thread_local! {
    static TIME: RefCell<TimeText> = const { RefCell::new(TimeText::EMPTY) };
}

/// The text of the current second in both formats, made once per second (per thread).
struct TimeText {
    second: u64,
    /// `2026-12-01T10:00:00`
    iso: [u8; 19],
    /// `01/Dec/2026:10:00:00 +0000`
    clf: [u8; 26],
}

impl TimeText {
    const EMPTY: TimeText = TimeText {
        second: u64::MAX,
        iso: [0; 19],
        clf: [0; 26],
    };

    fn at(&mut self, time: SystemTime) -> u32 {
        let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
        let second = since.as_secs();
        if second != self.second {
            let utc: DateTime<Utc> = DateTime::from(UNIX_EPOCH + Duration::from_secs(second));
            let mut iso = &mut self.iso[..];
            let _ = write!(iso, "{}", utc.format("%Y-%m-%dT%H:%M:%S"));
            let mut clf = &mut self.clf[..];
            let _ = write!(clf, "{}", utc.format("%d/%b/%Y:%H:%M:%S +0000"));
            self.second = second;
        }
        since.subsec_millis()
    }

    /// `2026-12-01T10:00:00.123Z`, as the events' times.
    fn iso8601(&mut self, out: &mut Vec<u8>, time: SystemTime) {
        let millis = self.at(time);
        out.extend_from_slice(&self.iso);
        out.push(b'.');
        three_digits(out, millis);
        out.push(b'Z');
    }

    fn clf(&mut self, out: &mut Vec<u8>, time: SystemTime) {
        self.at(time);
        out.extend_from_slice(&self.clf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record<'static> {
        Record {
            time: UNIX_EPOCH + Duration::from_millis(1_796_119_200_123),
            client: Some("192.0.2.7".parse().unwrap()),
            method: Some("GET"),
            host: Some(b"example.com"),
            path: Some("/cart"),
            query: Some("id=1"),
            protocol: Some("HTTP/1.1"),
            status: 200,
            bytes_sent: 512,
            duration: Duration::from_micros(12_345),
            route: Some("web"),
            upstream: Some("green"),
            backend: Some("127.0.0.1:9003".parse().unwrap()),
            request_id: b"abc-123",
            retries: 1,
            user_agent: Some(b"curl/8.5"),
            referer: None,
            tls: None,
            error: None,
        }
    }

    fn line(format: LogFormat, record: &Record<'_>) -> String {
        let mut out = Vec::new();
        write_line(&mut out, format, record);
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn json_has_the_contract_fields() {
        let text = line(LogFormat::Json, &record());
        assert!(text.ends_with("}\n"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(
            v,
            serde_json::json!({
                "time": "2026-12-01T10:00:00.123Z", "client": "192.0.2.7", "method": "GET",
                "host": "example.com", "path": "/cart", "query": "id=1", "protocol": "HTTP/1.1",
                "status": 200, "bytes_sent": 512, "duration_ms": 12.345, "route": "web",
                "upstream": "green", "backend": "127.0.0.1:9003", "request_id": "abc-123",
                "retries": 1, "user_agent": "curl/8.5"
            })
        );
    }

    #[test]
    fn a_request_that_reached_no_backend_has_nulls_and_its_error() {
        let r = Record {
            route: None,
            upstream: None,
            backend: None,
            client: None,
            host: None,
            query: None,
            user_agent: None,
            status: 404,
            duration: Duration::from_micros(7),
            tls: Some(("TLSv1.3", "TLS13_AES_128_GCM_SHA256")),
            error: Some("ConnectRefused"),
            ..record()
        };
        let v: serde_json::Value = serde_json::from_str(&line(LogFormat::Json, &r)).expect("json");
        for field in [
            "route",
            "upstream",
            "backend",
            "client",
            "host",
            "user_agent",
        ] {
            assert_eq!(v[field], serde_json::Value::Null, "{field}");
        }
        assert_eq!(v["duration_ms"], 0.007);
        assert_eq!(v["tls_version"], "TLSv1.3");
        assert_eq!(v["error"], "ConnectRefused");
    }

    #[test]
    fn client_bytes_cannot_break_a_line_or_the_json() {
        let r = Record {
            user_agent: Some(b"evil\"\n{\"status\":1}\\\xff"),
            host: Some("h\u{e9}te".as_bytes()),
            ..record()
        };
        let text = line(LogFormat::Json, &r);
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["user_agent"], "evil\"\n{\"status\":1}\\\u{ff}");
        assert_eq!(v["host"], "h\u{e9}te");
        assert_eq!(v["status"], 200);
        let text = line(LogFormat::Combined, &r);
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(
            text.ends_with("\"evil\\x22\\x0A{\\x22status\\x22:1}\\x5C\\xFF\"\n"),
            "{text}"
        );
    }

    #[test]
    fn addresses_and_numbers_read_as_std_writes_them() {
        let r = Record {
            client: Some("2001:db8::7".parse().unwrap()),
            backend: Some("[::1]:9002".parse().unwrap()),
            bytes_sent: 0,
            duration: Duration::from_micros(1_000_007),
            ..record()
        };
        let v: serde_json::Value = serde_json::from_str(&line(LogFormat::Json, &r)).expect("json");
        assert_eq!(v["client"], "2001:db8::7");
        assert_eq!(v["backend"], "[::1]:9002");
        assert_eq!(v["bytes_sent"], 0);
        assert_eq!(v["duration_ms"], 1000.007);
        let r = Record {
            client: Some("10.0.255.1".parse().unwrap()),
            backend: Some("192.168.0.10:65535".parse().unwrap()),
            ..record()
        };
        let v: serde_json::Value = serde_json::from_str(&line(LogFormat::Json, &r)).expect("json");
        assert_eq!(
            (v["client"].as_str(), v["backend"].as_str()),
            (Some("10.0.255.1"), Some("192.168.0.10:65535"))
        );
    }

    #[test]
    fn combined_is_nginx_combined() {
        assert_eq!(
            line(LogFormat::Combined, &record()),
            "192.0.2.7 - - [01/Dec/2026:10:00:00 +0000] \"GET /cart?id=1 HTTP/1.1\" 200 512 \"-\" \"curl/8.5\"\n"
        );
    }

    #[test]
    fn a_head_refused_unread_has_no_request_line() {
        let r = Record {
            method: None,
            path: None,
            query: None,
            protocol: None,
            host: None,
            status: 431,
            ..record()
        };
        assert!(line(LogFormat::Combined, &r).contains("] \"-\" 431 512 "));
        let v: serde_json::Value = serde_json::from_str(&line(LogFormat::Json, &r)).expect("json");
        assert_eq!(
            (v["method"].clone(), v["path"].clone()),
            (serde_json::Value::Null, serde_json::Value::Null)
        );
        assert_eq!(v["protocol"], serde_json::Value::Null);
    }

    #[test]
    fn the_cached_second_follows_the_clock() {
        let first = line(LogFormat::Json, &record());
        let r = Record {
            time: record().time + Duration::from_secs(61),
            ..record()
        };
        let later = line(LogFormat::Json, &r);
        assert!(first.contains("\"time\":\"2026-12-01T10:00:00.123Z\""));
        assert!(
            later.contains("\"time\":\"2026-12-01T10:01:01.123Z\""),
            "{later}"
        );
    }
}
