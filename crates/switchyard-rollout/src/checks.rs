//! The checks a rollout runs before each step: HTTP GETs that must answer with the expected
//! status (and body substring), within their timeout. Behind a trait, so the engine's timing
//! is tested on a paused clock without sockets; the real one is Pingora's own HTTP client.
//! An `https://` URL is reached over TLS with the URL's host as SNI, its certificate verified
//! for that name against the system's roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` when set),
//! loaded once when the engine starts.

use async_trait::async_trait;
use pingora_core::connectors::http::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use switchyard_config::rollout::{Check, HttpUrl};

/// The most of a check's body read to look for `expect_body`.
const MAX_CHECK_BODY: usize = 64 * 1024;

#[async_trait]
pub trait Prober: Send + Sync {
    /// `Err` says in words what was wrong (status, body, timeout, refused).
    async fn probe(&self, check: &Check) -> Result<(), String>;
}

/// Runs the checks in order; the first failure names its URL.
pub async fn run_checks(prober: &dyn Prober, checks: &[Check]) -> Result<(), String> {
    for check in checks {
        prober
            .probe(check)
            .await
            .map_err(|why| format!("check {} failed: {why}", check.url))?;
    }
    Ok(())
}

pub struct HttpProber {
    connector: Connector,
}

impl Default for HttpProber {
    fn default() -> Self {
        HttpProber {
            connector: Connector::new(None),
        }
    }
}

#[async_trait]
impl Prober for HttpProber {
    async fn probe(&self, check: &Check) -> Result<(), String> {
        match tokio::time::timeout(check.timeout, self.get(check)).await {
            Ok(result) => result,
            Err(_) => Err(format!(
                "no answer within {}",
                switchyard_config::format_duration(check.timeout)
            )),
        }
    }
}

impl HttpProber {
    async fn get(&self, check: &Check) -> Result<(), String> {
        let want = check.expect_body.as_deref().filter(|w| !w.is_empty());
        let (status, body) = send(&self.connector, "GET", &check.url, None, want.is_some()).await?;
        if status != check.expect_status {
            return Err(format!("status {status}, expected {}", check.expect_status));
        }
        let Some(want) = want else {
            return Ok(());
        };
        if body.windows(want.len()).any(|w| w == want.as_bytes()) {
            Ok(())
        } else {
            Err(format!(
                "the body (first {} bytes) does not contain {want:?}",
                body.len()
            ))
        }
    }
}

/// One HTTP/1.1 request on a new connection (over TLS for `https://`): the status, and the
/// first [`MAX_CHECK_BODY`] bytes of the body when `read_body`.
pub(crate) async fn send(
    connector: &Connector,
    method: &str,
    url: &HttpUrl,
    body: Option<(&str, Vec<u8>)>,
    read_body: bool,
) -> Result<(u16, Vec<u8>), String> {
    let address = tokio::net::lookup_host((url.host.as_str(), url.port))
        .await
        .map_err(|e| format!("cannot resolve {}: {e}", url.host))?
        .next()
        .ok_or_else(|| format!("{} resolves to no address", url.host))?;
    // Pingora verifies the certificate for the SNI: the URL's host, a name or an address.
    let sni = if url.tls {
        url.host.clone()
    } else {
        String::new()
    };
    let peer = HttpPeer::new(address, url.tls, sni);
    let (mut session, _) = connector.get_http_session(&peer).await.map_err(|e| {
        // A TLS failure's reason is in the context ("invalid peer certificate: ..."), an I/O
        // error's in the cause.
        let reason = [
            e.context.as_ref().map(ToString::to_string),
            e.cause.as_ref().map(ToString::to_string),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(": ");
        let reason = if reason.is_empty() {
            String::new()
        } else {
            format!(" ({reason})")
        };
        format!(
            "cannot connect to {address}: {}{reason}",
            e.etype().as_str()
        )
    })?;
    let mut request = RequestHeader::build(method, url.path.as_bytes(), None)
        .map_err(|e| format!("bad request: {e}"))?;
    let length = body.as_ref().map(|(_, b)| b.len().to_string());
    let mut headers = vec![
        ("Host", url.authority.as_str()),
        ("User-Agent", "switchyard"),
        ("Connection", "close"),
    ];
    if let (Some((content_type, _)), Some(length)) = (&body, &length) {
        headers.push(("Content-Type", content_type));
        headers.push(("Content-Length", length));
    }
    for (name, value) in headers {
        request
            .insert_header(name, value)
            .map_err(|e| format!("bad request header {name}: {e}"))?;
    }
    let failed = |e: Box<pingora_core::Error>| format!("{}: {e}", e.etype().as_str());
    session
        .write_request_header(Box::new(request))
        .await
        .map_err(failed)?;
    if let Some((_, bytes)) = body {
        session
            .write_request_body(bytes.into(), true)
            .await
            .map_err(failed)?;
    }
    session.finish_request_body().await.map_err(failed)?;
    session.read_response_header().await.map_err(failed)?;
    let status = session
        .response_header()
        .map(|r| r.status.as_u16())
        .unwrap_or_default();
    let mut kept = Vec::new();
    if read_body {
        while let Some(chunk) = session.read_response_body().await.map_err(failed)? {
            let room = MAX_CHECK_BODY - kept.len();
            kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            if kept.len() >= MAX_CHECK_BODY {
                break;
            }
        }
    }
    Ok((status, kept))
}
