//! A small blocking HTTP/1.1 client for the commands that talk to a running instance's admin
//! API (`status`, `rollout`).
//!
//! Written by hand on purpose: each command sends one request to an API we wrote ourselves,
//! which always answers with a `Content-Length` body, so a client crate (and the async stack or
//! TLS it brings) would add more to the binary's dependencies than it saves. One request per
//! connection (`Connection: close`), the answer read to the end; no chunked bodies, no
//! redirects, no TLS.

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long connecting, and each read or write, may take before the command gives up.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The most of an answer we read: far above anything the admin API sends, low enough that a
/// wrong peer cannot make the command eat memory.
const MAX_RESPONSE: u64 = 16 * 1024 * 1024;

#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Why a request got no answer; every variant names the address it was for.
#[derive(Debug)]
pub enum Error {
    /// Nothing accepted the connection in time.
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The connection broke, or timed out, while sending or reading.
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// What came back is not an HTTP/1.1 answer we can read.
    Malformed { addr: SocketAddr, why: String },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect { addr, source } => write!(f, "cannot connect to {addr}: {source}"),
            Error::Io { addr, source } => write!(f, "talking to {addr}: {source}"),
            Error::Malformed { addr, why } => write!(f, "unreadable answer from {addr}: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// One request, one answer. `headers` go out as given, after `Host`; a `body` is sent with its
/// `Content-Length` (and `Content-Type: application/json`, the only kind we send).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response, Error> {
    let io = |source| Error::Io { addr, source };
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .map_err(|source| Error::Connect { addr, source })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    stream
        .write_all(&encode_request(addr, method, path, headers, body))
        .map_err(io)?;
    let mut answer = Vec::new();
    stream
        .take(MAX_RESPONSE + 1)
        .read_to_end(&mut answer)
        .map_err(io)?;
    if answer.len() as u64 > MAX_RESPONSE {
        return Err(Error::Malformed {
            addr,
            why: format!("the answer is longer than {MAX_RESPONSE} bytes"),
        });
    }
    parse_response(&answer).map_err(|why| Error::Malformed { addr, why })
}

fn encode_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    match body {
        Some(body) => head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        )),
        // A POST without a body still says so: some servers refuse one with no length (411).
        None if method != "GET" && method != "HEAD" => head.push_str("Content-Length: 0\r\n"),
        None => {}
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    bytes
}

/// Reads a whole answer: status line, headers, and a body delimited by `Content-Length` or,
/// without one, by the end of the connection.
pub fn parse_response(bytes: &[u8]) -> Result<Response, String> {
    let Some(head_end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(if bytes.is_empty() {
            "the connection closed without an answer".into()
        } else {
            "the answer's head does not end (no blank line)".into()
        });
    };
    let head = std::str::from_utf8(&bytes[..head_end])
        .map_err(|_| "the answer's head is not text".to_string())?;
    let rest = &bytes[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|s| s.get(2..))
        .and_then(|s| s.split(' ').next())
        .filter(|code| code.len() == 3)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP/1 status line: {status_line:?}"))?;
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("a header line without a colon: {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length: usize = value
                .parse()
                .map_err(|_| format!("Content-Length is not a number: {value:?}"))?;
            if content_length.is_some_and(|seen| seen != length) {
                return Err("two different Content-Length headers".into());
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!(
                "Transfer-Encoding {value:?} is not supported (the admin API sends Content-Length)"
            ));
        }
    }
    let body = match content_length {
        Some(length) if rest.len() < length => {
            return Err(format!(
                "the body ended after {} of its {length} bytes",
                rest.len()
            ))
        }
        Some(length) => &rest[..length],
        None => rest,
    };
    Ok(Response {
        status,
        body: body.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_length_body_is_read_to_its_length() {
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\nContent-Length: 15\r\n\r\n{\"error\": \"x\"}\nextra",
        );
        assert_eq!(
            r,
            Ok(Response {
                status: 404,
                body: b"{\"error\": \"x\"}\n".to_vec()
            })
        );
    }

    #[test]
    fn without_a_length_the_body_ends_with_the_connection() {
        let r = parse_response(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nok\n");
        assert_eq!(
            r,
            Ok(Response {
                status: 200,
                body: b"ok\n".to_vec()
            })
        );
        let r = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(r.map(|r| (r.status, r.body.len())), Ok((204, 0)));
    }

    #[test]
    fn broken_answers_say_what_is_wrong() {
        let cases: [(&[u8], &str); 7] = [
            (b"", "closed without an answer"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n", "does not end"),
            (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1 status line"),
            (b"HTTP/1.1 20 OK\r\n\r\n", "not an HTTP/1 status line"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
                "not a number",
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
                "after 5 of its 10",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                "not supported",
            ),
        ];
        for (bytes, want) in cases {
            let e = parse_response(bytes).expect_err(want);
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn requests_say_who_they_are_for_and_close() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 9000));
        let bytes = encode_request(
            addr,
            "POST",
            "/api/v1/reload",
            &[("Authorization", "Bearer t")],
            Some(b"{}"),
        );
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            "POST /api/v1/reload HTTP/1.1\r\nHost: 127.0.0.1:9000\r\nConnection: close\r\n\
             Authorization: Bearer t\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        );
    }

    #[test]
    fn a_request_reads_the_whole_answer_from_a_peer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let peer = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                conn.read_exact(&mut byte).expect("read");
                head.push(byte[0]);
            }
            // Two writes: the client must read on until the end, not stop after one read.
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
                .expect("write");
            conn.flush().expect("flush");
            std::thread::sleep(Duration::from_millis(50));
            conn.write_all(b"llo").expect("write");
            String::from_utf8_lossy(&head).into_owned()
        });
        let r = request(addr, "GET", "/healthz", &[], None).expect("answer");
        assert_eq!((r.status, r.body), (200, b"hello".to_vec()));
        let head = peer.join().expect("peer");
        assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
    }

    #[test]
    fn a_refused_connection_names_the_address() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        drop(listener);
        let e = request(addr, "GET", "/", &[], None).expect_err("nothing listens");
        assert!(matches!(e, Error::Connect { .. }), "{e:?}");
        assert!(
            e.to_string()
                .starts_with(&format!("cannot connect to {addr}: ")),
            "{e}"
        );
    }
}
