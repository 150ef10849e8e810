//! The admin API as the commands that steer a running instance reach it: where it listens and
//! which token it wants (both from the config file the running instance was started with), and
//! what a refusal means. One request per call, over [`crate::http_client`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde_json::Value;
use switchyard_admin::Token;
use switchyard_config::Config;

use crate::http_client;

pub struct AdminClient {
    /// Where we dial: the configured address, on loopback when that is a wildcard.
    addr: SocketAddr,
    /// `admin.address` as the config has it, and the config's path: an unreachable API is
    /// explained with both.
    configured: SocketAddr,
    config_path: PathBuf,
    /// `Bearer <token>` when the config names a token file.
    authorization: Option<String>,
}

#[derive(Debug)]
pub enum ApiError {
    /// The request got no answer (nothing listens, timeout, a broken connection); `hint`
    /// says where the address came from and what to check.
    Unreachable {
        error: http_client::Error,
        hint: String,
    },
    /// The API answered with a 4xx or 5xx; `message` is its `error` field.
    Refused { status: u16, message: String },
    /// A success whose body is not JSON.
    NotJson { path: String, why: String },
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Unreachable { error, hint } => {
                write!(f, "the admin API is unreachable: {error}; {hint}")
            }
            ApiError::Refused { status, message } => write!(f, "{message} (HTTP {status})"),
            ApiError::NotJson { path, why } => {
                write!(f, "the admin API's answer to {path} is not JSON: {why}")
            }
        }
    }
}

impl std::error::Error for ApiError {}

impl AdminClient {
    /// The admin API `config_path` names; an error names the file, the section or the token
    /// file that stands in the way.
    pub fn from_config(config_path: &Path) -> Result<AdminClient, String> {
        let config = Config::load(config_path).map_err(|problems| problems.to_string())?;
        AdminClient::for_config(config_path, &config)
    }

    /// The admin API of `config`, read from `config_path`.
    pub fn for_config(config_path: &Path, config: &Config) -> Result<AdminClient, String> {
        let Some(admin) = &config.admin else {
            return Err(no_admin_section(config_path));
        };
        let authorization = match &admin.token_file {
            Some(file) => Some(format!("Bearer {}", Token::read_text(file)?)),
            None => None,
        };
        Ok(AdminClient {
            addr: dial_address(admin.address),
            configured: admin.address,
            config_path: config_path.to_path_buf(),
            authorization,
        })
    }

    pub fn get(&self, path: &str) -> Result<Value, ApiError> {
        self.call("GET", path, None)
    }

    pub fn post(&self, path: &str, body: Option<&Value>) -> Result<Value, ApiError> {
        self.call("POST", path, body)
    }

    pub fn put(&self, path: &str, body: &Value) -> Result<Value, ApiError> {
        self.call("PUT", path, Some(body))
    }

    pub fn patch(&self, path: &str, body: &Value) -> Result<Value, ApiError> {
        self.call("PATCH", path, Some(body))
    }

    pub fn delete(&self, path: &str) -> Result<Value, ApiError> {
        self.call("DELETE", path, None)
    }

    /// The address dialled.
    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// Where the dialled address came from, and what to check when nothing answers there.
    fn unreachable_hint(&self) -> String {
        let config = self.config_path.display();
        let whence = if self.addr == self.configured {
            format!("{} is admin.address in {config}", self.addr)
        } else {
            format!(
                "admin.address in {config} is {}, a wildcard, dialled on loopback as {}",
                self.configured, self.addr
            )
        };
        format!("{whence}; is `switchyard run --config {config}` running with this config?")
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ApiError> {
        let body = body.map(|b| b.to_string().into_bytes());
        let headers: Vec<(&str, &str)> = self
            .authorization
            .as_deref()
            .map(|a| ("Authorization", a))
            .into_iter()
            .collect();
        let response = http_client::request(self.addr, method, path, &headers, body.as_deref())
            .map_err(|error| ApiError::Unreachable {
                error,
                hint: self.unreachable_hint(),
            })?;
        judge(path, response)
    }
}

/// Said when the config has no admin API to talk to.
pub fn no_admin_section(config_path: &Path) -> String {
    format!(
        "{} has no admin section, so the instance it runs has no admin API for this command; add one (admin: {{address: 127.0.0.1:9000}}) and restart it",
        config_path.display()
    )
}

/// A success's JSON, or the refusal with the API's own words.
fn judge(path: &str, response: http_client::Response) -> Result<Value, ApiError> {
    let parsed = serde_json::from_slice::<Value>(&response.body);
    if response.status >= 400 {
        let message = match parsed.as_ref().ok().and_then(|v| v.get("error")) {
            Some(Value::String(message)) => message.clone(),
            Some(other) => other.to_string(),
            // Not our API's JSON (a proxy in between, a wrong port): say what came.
            None => match String::from_utf8_lossy(&response.body).trim() {
                "" => format!("{path} was refused with no explanation"),
                text => text.chars().take(300).collect(),
            },
        };
        return Err(ApiError::Refused {
            status: response.status,
            message,
        });
    }
    parsed.map_err(|e| ApiError::NotJson {
        path: path.to_string(),
        why: e.to_string(),
    })
}

/// An API listening on every address (`0.0.0.0`, `::`) is dialled on loopback, in its family.
fn dial_address(configured: SocketAddr) -> SocketAddr {
    let ip = match configured.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, configured.port())
}

/// A name as one path segment: everything but RFC 3986's unreserved characters is
/// percent-encoded, so a route named `a/b` or `50%` reaches the API as that name.
pub fn segment(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_client::Response;

    #[test]
    fn wildcards_are_dialled_on_loopback() {
        let cases = [
            ("0.0.0.0:9000", "127.0.0.1:9000"),
            ("[::]:9000", "[::1]:9000"),
            ("10.0.0.5:9000", "10.0.0.5:9000"),
        ];
        for (configured, dialled) in cases {
            let configured: SocketAddr = configured.parse().expect("address");
            assert_eq!(dial_address(configured).to_string(), dialled);
        }
    }

    #[test]
    fn an_unreachable_api_says_where_the_address_came_from() {
        let client = |configured: &str| AdminClient {
            addr: dial_address(configured.parse().expect("address")),
            configured: configured.parse().expect("address"),
            config_path: PathBuf::from("/etc/switchyard/switchyard.yaml"),
            authorization: None,
        };
        assert_eq!(
            client("127.0.0.1:9000").unreachable_hint(),
            "127.0.0.1:9000 is admin.address in /etc/switchyard/switchyard.yaml; is `switchyard run --config /etc/switchyard/switchyard.yaml` running with this config?"
        );
        assert_eq!(
            client("0.0.0.0:9000").unreachable_hint(),
            "admin.address in /etc/switchyard/switchyard.yaml is 0.0.0.0:9000, a wildcard, dialled on loopback as 127.0.0.1:9000; is `switchyard run --config /etc/switchyard/switchyard.yaml` running with this config?"
        );
    }

    #[test]
    fn names_become_one_path_segment() {
        assert_eq!(segment("web-2_a.b~"), "web-2_a.b~");
        assert_eq!(segment("a/b c%"), "a%2Fb%20c%25");
        assert_eq!(segment("é"), "%C3%A9");
    }

    #[test]
    fn a_refusal_carries_the_apis_error() {
        let refused = |status, body: &str| {
            judge(
                "/api/v1/routes/x/rollout",
                Response {
                    status,
                    body: body.as_bytes().to_vec(),
                },
            )
        };
        match refused(404, r#"{"error": "no route named \"x\""}"#) {
            Err(e @ ApiError::Refused { status: 404, .. }) => {
                assert_eq!(e.to_string(), "no route named \"x\" (HTTP 404)")
            }
            other => panic!("{other:?}"),
        }
        match refused(502, "Bad Gateway\n") {
            Err(ApiError::Refused { status, message }) => {
                assert_eq!((status, message.as_str()), (502, "Bad Gateway"))
            }
            other => panic!("{other:?}"),
        }
        match refused(500, "") {
            Err(ApiError::Refused { message, .. }) => {
                assert!(message.contains("no explanation"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        match refused(200, "ok\n") {
            Err(e @ ApiError::NotJson { .. }) => assert!(e.to_string().contains("not JSON")),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            refused(200, r#"{"route": "x"}"#).ok(),
            Some(serde_json::json!({"route": "x"}))
        );
    }
}
