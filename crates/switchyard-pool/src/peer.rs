//! How the balancer reaches an upstream's backends: plain HTTP/1.1, HTTPS/1.1, HTTP/2 over
//! TLS (`h2`) or cleartext HTTP/2 by prior knowledge (`h2c`), with the timeouts of the upstream.
//!
//! Worked out when a snapshot is built, from the config and the CA certificates read with it
//! ([`crate::upstream_tls`]): a TLS or HTTP/2 upstream keeps one ready [`HttpPeer`] per
//! backend, so a request's peer is one clone; a plain HTTP/1.1 upstream keeps none and builds
//! its peer as it always has. The health checks make their probes from the same settings, so
//! a backend is checked the way it is reached.
//!
//! What Pingora 0.9's rustls client does with these settings (`connectors/tls/rustls`):
//! - The SNI is also the name the certificate is verified against. An empty SNI turns every
//!   check off, so an upstream without `server_name` sends each backend's IP address as text:
//!   rustls then parses it as an IP server name, sends no SNI extension (RFC 6066 has none for
//!   addresses) and verifies the certificate's IP address SANs.
//! - `verify_cert` off accepts any certificate; `verify_hostname` off accepts one for another
//!   name. `verify: false` turns both off, `true` both on.
//! - `ca` replaces the roots for this peer; without it the connector's roots are the
//!   system's (`SSL_CERT_FILE` / `SSL_CERT_DIR` when set, as with OpenSSL).
//! - The CA list is not part of the connection-reuse hash, nor is the protocol:
//!   `group_key` carries both, so a connection verified against one upstream's CAs is never
//!   reused for another's (or after a reload changed the file).
//! - `set_http_version(2, 2)` offers only `h2` by ALPN over TLS, and on a plain peer speaks
//!   HTTP/2 at once (prior knowledge). `max_h2_streams` defaults to 1: one backend
//!   connection per concurrent request; [`MAX_H2_STREAMS`] lets one connection multiplex.

use std::net::SocketAddr;
use std::sync::Arc;

use pingora_core::protocols::tls::CaType;
use pingora_core::upstreams::peer::{BasicPeer, HttpPeer, PeerOptions};
use switchyard_config::{Timeouts, UpstreamProtocol, UpstreamTls};

use crate::upstream_tls::UpstreamCas;

/// Concurrent requests one HTTP/2 connection to a backend carries before Pingora opens
/// another (the backend may allow fewer: its `SETTINGS_MAX_CONCURRENT_STREAMS` wins). 100 is
/// the least RFC 9113 §6.5.2 recommends a server allow, and what nginx and Envoy default to.
pub const MAX_H2_STREAMS: usize = 100;

/// The protocol and TLS settings of one upstream towards its backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub protocol: UpstreamProtocol,
    pub tls: Option<PeerTls>,
}

/// TLS towards the backends, with the CA certificates loaded.
#[derive(Clone)]
pub struct PeerTls {
    /// SNI and the name verified; `None`: each backend's IP address.
    pub server_name: Option<String>,
    pub verify: bool,
    /// `None`: the system's roots.
    ca: Option<Arc<CaType>>,
    /// Identifies the certificates in `ca` (0 without).
    ca_digest: u64,
}

impl PartialEq for PeerTls {
    /// By the certificates' content: the same file read again is the same setting.
    fn eq(&self, other: &PeerTls) -> bool {
        self.server_name == other.server_name
            && self.verify == other.verify
            && self.ca.is_some() == other.ca.is_some()
            && self.ca_digest == other.ca_digest
    }
}

impl Eq for PeerTls {}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls")
            .field("server_name", &self.server_name)
            .field("verify", &self.verify)
            .field("ca", &self.ca.as_ref().map(|c| c.len()))
            .finish()
    }
}

impl Connect {
    /// Plain HTTP/1.1: what an upstream without `protocol` and `tls` speaks.
    pub const PLAIN: Connect = Connect {
        protocol: UpstreamProtocol::Http1,
        tls: None,
    };

    /// The settings of upstream `name`, with its CA certificates from `cas` (loaded from the
    /// same config). A `ca_file` whose certificates are missing from `cas` gets none, so the
    /// system's roots: verification stays on, it fails closed.
    pub fn new(
        name: &str,
        protocol: UpstreamProtocol,
        tls: Option<&UpstreamTls>,
        cas: &UpstreamCas,
    ) -> Connect {
        let tls = tls.map(|tls| {
            let loaded = tls.ca_file.as_ref().and_then(|_| cas.get(name));
            debug_assert!(
                tls.ca_file.is_none() || loaded.is_some(),
                "upstream {name}: ca_file not loaded"
            );
            PeerTls {
                server_name: tls.server_name.clone(),
                verify: tls.verify,
                ca: loaded.map(|c| Arc::clone(&c.certificates)),
                ca_digest: loaded.map_or(0, |c| c.digest),
            }
        });
        Connect { protocol, tls }
    }

    /// Plain HTTP/1.1, whose peers are built per request as they always were.
    pub fn is_plain(&self) -> bool {
        self.protocol == UpstreamProtocol::Http1 && self.tls.is_none()
    }

    /// The SNI (and name verified) for a backend at `address`; empty without TLS.
    pub fn server_name(&self, address: SocketAddr) -> String {
        match &self.tls {
            Some(PeerTls {
                server_name: Some(name),
                ..
            }) => name.clone(),
            Some(PeerTls {
                server_name: None, ..
            }) => address.ip().to_string(),
            None => String::new(),
        }
    }

    /// The peer a request to the backend at `address` goes to.
    pub fn peer(&self, address: SocketAddr, timeouts: &Timeouts) -> HttpPeer {
        let mut peer = HttpPeer::new(address, self.tls.is_some(), self.server_name(address));
        set_timeouts(&mut peer.options, timeouts);
        self.set_options(&mut peer.options);
        if !self.is_plain() {
            peer.group_key = self.group_key();
        }
        peer
    }

    /// An HTTP health check's peer: as a request's, with the check's timeout for everything,
    /// and one stream per HTTP/2 connection. With more, Pingora's HTTP/2 connector would keep
    /// the probe's connection in use and send every later probe over it: no new connect or
    /// handshake would ever be checked again, and connections of removed backends would stay.
    pub fn http_probe_peer(&self, address: SocketAddr, timeout: std::time::Duration) -> HttpPeer {
        let timeouts = Timeouts {
            connect: timeout,
            read: timeout,
            write: timeout,
            idle: timeout,
        };
        let mut peer = self.peer(address, &timeouts);
        peer.options.max_h2_streams = 1;
        peer
    }

    /// A TCP health check's peer: a TLS upstream's check completes the TLS handshake with the
    /// same name, roots and verification as requests (as HAProxy's `check` on an `ssl`
    /// server does), offering the same ALPN; others only connect.
    pub fn tcp_probe_peer(&self, address: SocketAddr, timeout: std::time::Duration) -> BasicPeer {
        let mut peer = BasicPeer::new(&address.to_string());
        // `BasicPeer` speaks TLS exactly when it has an SNI.
        peer.sni = self.server_name(address);
        peer.options.connection_timeout = Some(timeout);
        self.set_options(&mut peer.options);
        peer
    }

    fn set_options(&self, options: &mut PeerOptions) {
        if let Some(tls) = &self.tls {
            options.verify_cert = tls.verify;
            options.verify_hostname = tls.verify;
            options.ca = tls.ca.clone();
        }
        if self.protocol.is_h2() {
            options.set_http_version(2, 2);
            options.max_h2_streams = MAX_H2_STREAMS;
        }
    }

    /// Keeps backend connections of other protocols and CA certificates apart (see the module
    /// doc); the SNI, scheme and verification are in Pingora's reuse hash already.
    fn group_key(&self) -> u64 {
        let ca = self.tls.as_ref().map_or(0, |t| t.ca_digest);
        let protocol = match self.protocol {
            UpstreamProtocol::Http1 => 1,
            UpstreamProtocol::H2 => 2,
            UpstreamProtocol::H2c => 3,
        };
        ca.rotate_left(2) ^ protocol
    }
}

/// An upstream's timeouts on a peer.
pub(crate) fn set_timeouts(options: &mut PeerOptions, t: &Timeouts) {
    options.connection_timeout = Some(t.connect);
    options.read_timeout = Some(t.read);
    options.write_timeout = Some(t.write);
    options.idle_timeout = Some(t.idle);
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora_core::upstreams::peer::Peer;
    use std::time::Duration;

    const TIMEOUTS: Timeouts = Timeouts {
        connect: Duration::from_secs(1),
        read: Duration::from_secs(2),
        write: Duration::from_secs(3),
        idle: Duration::from_secs(4),
    };

    fn tls(server_name: Option<&str>, verify: bool) -> UpstreamTls {
        UpstreamTls {
            ca_file: None,
            server_name: server_name.map(Into::into),
            verify,
        }
    }

    fn address() -> SocketAddr {
        "127.0.0.1:9443".parse().unwrap()
    }

    #[test]
    fn plain_http1_is_a_plain_peer() {
        let connect = Connect::new("a", UpstreamProtocol::Http1, None, &UpstreamCas::default());
        assert!(connect.is_plain());
        let peer = connect.peer(address(), &TIMEOUTS);
        assert!(!peer.is_tls());
        assert_eq!(peer.sni, "");
        assert_eq!(peer.group_key, 0);
        assert_eq!(peer.options.alpn.get_max_http_version(), 1);
        assert_eq!(peer.options.read_timeout, Some(Duration::from_secs(2)));
        assert_eq!(peer.options.idle_timeout, Some(Duration::from_secs(4)));
    }

    #[test]
    fn tls_sends_the_server_name_or_the_backend_ip_and_verifies_it() {
        let cas = UpstreamCas::default();
        let named = Connect::new(
            "a",
            UpstreamProtocol::Http1,
            Some(&tls(Some("api.internal"), true)),
            &cas,
        );
        let peer = named.peer(address(), &TIMEOUTS);
        assert!(peer.is_tls());
        assert_eq!(peer.sni, "api.internal");
        assert!(peer.options.verify_cert && peer.options.verify_hostname);
        assert!(peer.options.ca.is_none(), "the system's roots");
        assert_eq!(peer.options.alpn.get_max_http_version(), 1, "HTTPS/1.1");

        let by_ip = Connect::new("a", UpstreamProtocol::Http1, Some(&tls(None, true)), &cas);
        assert_eq!(by_ip.peer(address(), &TIMEOUTS).sni, "127.0.0.1");
        let v6: SocketAddr = "[::1]:9443".parse().unwrap();
        assert_eq!(
            by_ip.server_name(v6),
            "::1",
            "no brackets: an IP server name"
        );

        let lab = Connect::new("a", UpstreamProtocol::Http1, Some(&tls(None, false)), &cas);
        let peer = lab.peer(address(), &TIMEOUTS);
        assert!(!peer.options.verify_cert && !peer.options.verify_hostname);
        assert_ne!(lab, by_ip);
    }

    #[test]
    fn http2_multiplexes_over_tls_and_in_cleartext() {
        let cas = UpstreamCas::default();
        let h2 = Connect::new("a", UpstreamProtocol::H2, Some(&tls(None, true)), &cas);
        let h2c = Connect::new("a", UpstreamProtocol::H2c, None, &cas);
        for (connect, tls) in [(&h2, true), (&h2c, false)] {
            assert!(!connect.is_plain());
            let peer = connect.peer(address(), &TIMEOUTS);
            assert_eq!(peer.is_tls(), tls);
            assert_eq!(
                peer.options.alpn.get_min_http_version(),
                2,
                "h2 only, no h1 fallback"
            );
            assert_eq!(peer.options.max_h2_streams, MAX_H2_STREAMS);
        }
        assert_ne!(
            h2.peer(address(), &TIMEOUTS).group_key,
            h2c.peer(address(), &TIMEOUTS).group_key
        );
    }

    #[test]
    fn probes_reach_a_backend_as_requests_do() {
        let cas = UpstreamCas::default();
        let h2 = Connect::new(
            "a",
            UpstreamProtocol::H2,
            Some(&tls(Some("b.test"), true)),
            &cas,
        );
        let timeout = Duration::from_millis(700);
        let http = h2.http_probe_peer(address(), timeout);
        assert_eq!(http.sni, "b.test");
        assert_eq!(http.options.alpn.get_min_http_version(), 2);
        assert_eq!(http.options.read_timeout, Some(timeout));
        let tcp = h2.tcp_probe_peer(address(), timeout);
        assert!(tcp.tls(), "a TLS upstream's TCP check shakes hands");
        assert_eq!(tcp.sni(), "b.test");
        assert_eq!(tcp.options.connection_timeout, Some(timeout));
        let plain = Connect::PLAIN.tcp_probe_peer(address(), timeout);
        assert!(!plain.tls());
    }
}
