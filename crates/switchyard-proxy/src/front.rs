//! What one listener is to its connections and requests: cleartext (with h2c and the redirect
//! to https, or not) or TLS, whose handshake and HSTS header come from the live TLS settings.
//!
//! The TLS settings themselves (certificates, resolver, reload) belong to the TLS crate; the
//! proxy only needs to run a handshake with whatever is current when a connection arrives, so
//! it sees them through [`TlsTerminator`].

use std::sync::Arc;

use async_trait::async_trait;
use http::HeaderValue;
use pingora_core::protocols::Stream;

/// The live TLS side of one listener.
#[async_trait]
pub trait TlsTerminator: Send + Sync {
    /// Runs the server side of a TLS handshake on an accepted connection with the listener's
    /// current certificates and settings.
    async fn handshake(&self, stream: Stream) -> pingora_core::Result<Stream>;

    /// `Strict-Transport-Security` for the listener's responses, if it has one.
    fn hsts(&self) -> Option<HeaderValue>;
}

/// One proxy listener, as its connection app and its proxy see it.
#[derive(Clone)]
pub struct ListenerFront {
    /// `None`: cleartext.
    pub tls: Option<Arc<dyn TlsTerminator>>,
    /// Cleartext HTTP/2 by prior knowledge, beside HTTP/1.
    pub h2c: bool,
    /// Every request but an ACME challenge is answered `308` to https.
    pub redirect_https: bool,
}

impl ListenerFront {
    pub fn plain() -> ListenerFront {
        ListenerFront {
            tls: None,
            h2c: false,
            redirect_https: false,
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }
}
