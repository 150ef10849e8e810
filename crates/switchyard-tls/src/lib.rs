//! Switchyard's TLS listeners: the certificates they serve, which one a handshake gets, and
//! how a reload replaces them without a restart.
//!
//! - [`load`]: reads and checks the certificate and key files of a listener (one-line errors
//!   with the field path and the file; expiry as warnings).
//! - [`resolve`]: the SNI certificate resolver rustls calls on every handshake.
//! - [`front`]: one [`TlsFront`] per TLS listener holding its current acceptor and HSTS value
//!   behind an `ArcSwap`, and [`TlsFronts`], built at start, with the prepare/commit reload.
//! - `metric`: `switchyard_tls_certificate_expiry_timestamp_seconds{listener,name}`.
//!
//! We build rustls's `ServerConfig` ourselves instead of using Pingora's `TlsSettings`: it
//! panics on a file it cannot load, is built once per listener at service start with no way
//! to swap it, and has no session ticketer. Ours is wrapped with
//! `Acceptor::from_server_config`, and a reload swaps the whole acceptor.
//!
//! **Session resumption**: every TLS listener has a stateful session cache
//! ([`front::SESSION_CACHE_SIZE`] sessions) and, with `session_tickets` (the default),
//! stateless tickets (RFC 5077 / TLS 1.3 PSK tickets) under keys rustls rotates every 6 hours.
//! The cache serves clients that do not take tickets and costs memory only in this process;
//! tickets let returning clients resume without server-side state at all. Both are made once
//! per listener and handed to every `ServerConfig` a reload builds, so a certificate reload
//! does not force every client into a full handshake (a resumed session keeps the certificate
//! it was established with, as in nginx). With several processes behind one address (binary
//! upgrade), tickets from the old process do not resume on the new one: the keys are random
//! per process, never written anywhere.

pub mod front;
pub mod load;
mod metric;
pub mod resolve;

#[cfg(test)]
mod tests;

pub use front::{check, Checked, PreparedTls, TlsFront, TlsFronts, TlsState};
pub use load::{Certificate, EXPIRY_WARNING};
pub use resolve::SniResolver;
