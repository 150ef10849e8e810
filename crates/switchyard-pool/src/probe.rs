//! One health probe of one backend: a TCP connect (with the TLS handshake for a TLS upstream),
//! or an HTTP GET (over TLS, over HTTP/2, as the upstream speaks) that must answer the
//! expected status.
//!
//! The probe logic is that of Pingora's `TcpHealthCheck` and `HttpHealthCheck`, over
//! connectors that every probe of the process shares ([`Connectors`]). Each of Pingora's
//! probes makes connectors of its own, and with the rustls feature a connector reads and
//! parses the system's CA certificates when it is made, an HTTP probe's twice (HTTP/1 and
//! HTTP/2): measured at 12 ms of CPU per checked backend in a release build (100 ms in a
//! debug one), and two root stores kept per backend for as long as its check runs.

use std::net::SocketAddr;

use pingora_core::connectors::http::Connector as HttpConnector;
use pingora_core::connectors::TransportConnector;
use pingora_core::upstreams::peer::{BasicPeer, HttpPeer};
use pingora_core::{Error, ErrorType, Result};
use pingora_http::RequestHeader;
use switchyard_config::{HealthCheck, Probe as ProbeConfig};

use crate::peer::Connect;

/// The connectors every probe uses; they keep no connection (a probe never gives one back).
pub(crate) struct Connectors {
    http: HttpConnector,
    tcp: TransportConnector,
}

impl Connectors {
    pub(crate) fn new() -> Connectors {
        Connectors {
            http: HttpConnector::new(None),
            tcp: TransportConnector::new(None),
        }
    }
}

/// What one backend's check sends, made once when its check task starts (so the variants'
/// sizes do not matter).
#[allow(clippy::large_enum_variant)]
pub(crate) enum Probe {
    Tcp(BasicPeer),
    Http {
        peer: HttpPeer,
        request: RequestHeader,
        expect_status: u16,
    },
}

impl Probe {
    /// The probe of `check` for the backend at `address`, reached as `connect` says requests
    /// reach it.
    pub(crate) fn new(
        check: &HealthCheck,
        connect: &Connect,
        address: SocketAddr,
    ) -> Result<Probe> {
        Ok(match &check.probe {
            ProbeConfig::Tcp => Probe::Tcp(connect.tcp_probe_peer(address, check.timeout)),
            ProbeConfig::Http {
                path,
                expect_status,
                host,
            } => {
                // A backend that routes by name expects the name its certificate is checked
                // against, not its address.
                let host = host
                    .clone()
                    .or_else(|| connect.tls.as_ref().and_then(|t| t.server_name.clone()))
                    .unwrap_or_else(|| address.to_string());
                let mut request = RequestHeader::build("GET", path.as_bytes(), None)?;
                request.insert_header("Host", host)?;
                request.insert_header("User-Agent", "switchyard-health-check")?;
                Probe::Http {
                    peer: connect.http_probe_peer(address, check.timeout),
                    request,
                    expect_status: *expect_status,
                }
            }
        })
    }

    /// One probe; a wrong status is `CustomCode("unexpected status", status)`.
    pub(crate) async fn run(&self, connectors: &Connectors) -> Result<()> {
        match self {
            Probe::Tcp(peer) => connectors.tcp.get_stream(peer).await.map(drop),
            Probe::Http {
                peer,
                request,
                expect_status,
            } => {
                let (mut session, _) = connectors.http.get_http_session(peer).await?;
                session.set_write_timeout(peer.options.write_timeout);
                session
                    .write_request_header(Box::new(request.clone()))
                    .await?;
                session.finish_request_body().await?;
                session.set_read_timeout(peer.options.read_timeout);
                session.read_response_header().await?;
                let status = session.response_header().map_or(0, |r| r.status.as_u16());
                if status != *expect_status {
                    return Error::e_explain(
                        ErrorType::CustomCode("unexpected status", status),
                        format!("expected {expect_status}"),
                    );
                }
                while session.read_response_body().await?.is_some() {}
                Ok(())
            }
        }
    }
}
