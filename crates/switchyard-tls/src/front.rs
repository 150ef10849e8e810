//! The live TLS side of each TLS listener and its reload.
//!
//! A [`TlsFront`] is made once per TLS listener at start and lives as long as the process:
//! it owns what must outlast a certificate reload (the session cache and the ticket keys, so
//! that clients resume across it) and an `ArcSwap` of the current [`TlsState`] (the Pingora
//! acceptor over our rustls `ServerConfig`, and the HSTS header). A connection loads the state
//! once, lock-free, and the handshake holds its own rustls state from then on: a reload
//! changes what new handshakes get and nothing about open connections.
//!
//! A reload is two steps so that it can be refused without effect: [`TlsFronts::prepare`]
//! reads and checks every file and builds every `ServerConfig` while the old ones serve, and
//! only [`PreparedTls::commit`], which cannot fail, swaps them in.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use http::HeaderValue;
use log::warn;
use pingora_core::listeners::tls::Acceptor;
use rustls::crypto::CryptoProvider;
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::version::{TLS12, TLS13};
use rustls::ServerConfig;
use switchyard_config::{Config, ListenerTls, TlsVersion};
use switchyard_pool::Metrics;

use crate::load::{load_listener, Certificate};
use crate::metric::{self, ExpiryMetric, Series};
use crate::resolve::SniResolver;

/// Sessions the stateful cache of one listener keeps; beyond it rustls drops the oldest. The
/// table is allocated up front (about 2 MiB) and each session adds a few hundred bytes:
/// a few MiB per listener at most, for the clients of the last minutes to hours. rustls's own
/// default (256) would turn a busy listener's returning clients into full handshakes.
pub const SESSION_CACHE_SIZE: usize = 20_000;

/// What a TLS listener serves at the moment.
pub struct TlsState {
    /// Handshakes: `acceptor.tls_handshake(stream)`.
    pub acceptor: Acceptor,
    /// `Strict-Transport-Security` for every response on this listener, when configured.
    pub hsts: Option<HeaderValue>,
    resolver: Arc<SniResolver>,
}

impl TlsState {
    /// The certificate resolver behind the acceptor (to see which certificate a name gets).
    pub fn resolver(&self) -> &SniResolver {
        &self.resolver
    }
}

/// One TLS listener, for the life of the process.
pub struct TlsFront {
    address: SocketAddr,
    current: ArcSwap<TlsState>,
    resumption: Resumption,
}

impl TlsFront {
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The state for a new connection: one lock-free load.
    pub fn current(&self) -> Arc<TlsState> {
        self.current.load_full()
    }

    /// The HSTS header for a response: read under a guard, which takes no reference count
    /// on the shared state (this runs on every response of the listener).
    pub fn hsts(&self) -> Option<HeaderValue> {
        self.current.load().hsts.clone()
    }
}

/// What lets a client resume a session, shared by every `ServerConfig` one listener has had.
struct Resumption {
    /// Stateful resumption (TLS 1.2 session IDs, TLS 1.3 tickets that are cache keys).
    sessions: Arc<dyn StoresServerSessions>,
    /// Stateless tickets, made on the first config that enables them and kept, so that
    /// turning them off and on again by reload does not throw their keys away.
    ticketer: Mutex<Option<Arc<dyn ProducesTickets>>>,
}

impl Resumption {
    fn new(sessions: usize) -> Resumption {
        Resumption {
            sessions: ServerSessionMemoryCache::new(sessions),
            ticketer: Mutex::new(None),
        }
    }

    fn ticketer(&self, field: &str) -> Result<Arc<dyn ProducesTickets>, String> {
        let mut slot = self.ticketer.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(ticketer) = slot.as_ref() {
            return Ok(Arc::clone(ticketer));
        }
        // `Ticketer::new` (rustls 0.23.46, ring) encrypts tickets with ChaCha20-Poly1305 under
        // a random key that it replaces every 6 hours, still accepting the previous key, so a
        // ticket resumes for up to 12 hours and a stolen key opens at most that window.
        let ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| format!("{field}: cannot make session ticket keys: {e}"))?;
        *slot = Some(Arc::clone(&ticketer));
        Ok(ticketer)
    }
}

/// Every TLS listener of the process, by address.
pub struct TlsFronts {
    fronts: HashMap<SocketAddr, Arc<TlsFront>>,
    provider: Arc<CryptoProvider>,
    expiry: ExpiryMetric,
}

/// What a reload will serve, built and checked; nothing serves it until [`Self::commit`].
pub struct PreparedTls<'a> {
    fronts: &'a TlsFronts,
    states: Vec<(Arc<TlsFront>, TlsState)>,
    series: Series,
    warnings: Vec<String>,
}

impl PreparedTls<'_> {
    /// Expired, expiring or not yet valid certificates in the new files.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// New handshakes get the new certificates, on every listener. Returns the warnings for
    /// the caller to record (the reload records them as events, which logs them).
    pub fn commit(self) -> Vec<String> {
        for (front, state) in self.states {
            front.current.store(Arc::new(state));
        }
        self.fronts.expiry.replace(self.series);
        self.warnings
    }
}

impl TlsFronts {
    /// Loads every TLS listener of `config` and registers the expiry metric in `metrics`.
    /// `Err`: one line per problem, each naming its field and file. Warnings are logged.
    pub fn load(config: &Config, metrics: &Metrics) -> Result<TlsFronts, Vec<String>> {
        let provider = provider();
        let now = SystemTime::now();
        let mut fronts = HashMap::new();
        let mut series = Series::new();
        let mut warnings = Vec::new();
        let mut errors = Vec::new();
        for (index, listener) in config.listeners.iter().enumerate() {
            let Some(tls) = listener.tls() else {
                continue;
            };
            let resumption = Resumption::new(SESSION_CACHE_SIZE);
            match build(index, tls, &resumption, &provider, now) {
                Ok(built) => {
                    metric::series(listener.address, &built.certificates, &mut series);
                    warnings.extend(built.warnings);
                    let front = TlsFront {
                        address: listener.address,
                        current: ArcSwap::from_pointee(built.state),
                        resumption,
                    };
                    fronts.insert(listener.address, Arc::new(front));
                }
                Err(problems) => errors.extend(problems),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        for warning in &warnings {
            warn!("{warning}");
        }
        let expiry = ExpiryMetric::register(metrics);
        expiry.replace(series);
        Ok(TlsFronts {
            fronts,
            provider,
            expiry,
        })
    }

    /// The TLS listener on `address`, if that listener is one.
    pub fn front(&self, address: SocketAddr) -> Option<Arc<TlsFront>> {
        self.fronts.get(&address).cloned()
    }

    /// Loads and builds what `next` asks of the TLS listeners that run now (matched by
    /// address), changing nothing. A listener the file adds, removes or turns from plain to
    /// TLS or back takes a restart (the reload says so); it is left as it is here.
    pub fn prepare(&self, next: &Config) -> Result<PreparedTls<'_>, Vec<String>> {
        let now = SystemTime::now();
        let mut states = Vec::new();
        let mut series = Series::new();
        let mut warnings = Vec::new();
        let mut errors = Vec::new();
        let mut seen = Vec::new();
        for (index, listener) in next.listeners.iter().enumerate() {
            let Some(tls) = listener.tls() else {
                continue;
            };
            let Some(front) = self.fronts.get(&listener.address) else {
                // A TLS listener this process does not run (added, moved, or plain until
                // now) waits for a restart, but its files are checked now: the restart or
                // upgrade must not be the first to find them broken.
                let scratch = Resumption::new(1);
                if let Err(problems) = build(index, tls, &scratch, &self.provider, now) {
                    errors.extend(problems);
                }
                continue;
            };
            seen.push(listener.address);
            match build(index, tls, &front.resumption, &self.provider, now) {
                Ok(built) => {
                    metric::series(listener.address, &built.certificates, &mut series);
                    warnings.extend(built.warnings);
                    states.push((Arc::clone(front), built.state));
                }
                Err(problems) => errors.extend(problems),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        // A listener the new file has no TLS for keeps serving what it has, and so keeps
        // its series.
        let kept = self.expiry_series_except(&seen);
        series.extend(kept);
        Ok(PreparedTls {
            fronts: self,
            states,
            series,
            warnings,
        })
    }

    fn expiry_series_except(&self, addresses: &[SocketAddr]) -> Series {
        let addresses: Vec<String> = addresses.iter().map(ToString::to_string).collect();
        self.expiry
            .current()
            .into_iter()
            .filter(|((listener, _), _)| !addresses.contains(listener))
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn expiry_values(&self) -> Series {
        self.expiry.values()
    }
}

/// What [`check`] found in a config's TLS listeners.
#[derive(Debug, Default)]
pub struct Checked {
    /// What would stop a start and refuse a reload.
    pub errors: Vec<String>,
    /// Expired, expiring or not yet valid certificates.
    pub warnings: Vec<String>,
}

/// For `switchyard check`: the same loading and building as a start, with no metric and
/// nothing kept.
pub fn check(config: &Config) -> Checked {
    let provider = provider();
    let now = SystemTime::now();
    let mut checked = Checked::default();
    for (index, listener) in config.listeners.iter().enumerate() {
        let Some(tls) = listener.tls() else {
            continue;
        };
        // Made and dropped: `check` only asks whether the listener can be built.
        let resumption = Resumption::new(1);
        match build(index, tls, &resumption, &provider, now) {
            Ok(built) => checked.warnings.extend(built.warnings),
            Err(problems) => checked.errors.extend(problems),
        }
    }
    checked
}

struct Built {
    state: TlsState,
    certificates: Vec<Certificate>,
    warnings: Vec<String>,
}

/// The provider pingora-rustls uses too. Named rather than the process default, which some
/// other crate may or may not have installed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(
    index: usize,
    tls: &ListenerTls,
    resumption: &Resumption,
    provider: &Arc<CryptoProvider>,
    now: SystemTime,
) -> Result<Built, Vec<String>> {
    let field = format!("listeners[{index}].tls");
    let loaded = load_listener(index, tls, provider, now)?;
    let Some(resolver) = SniResolver::new(&loaded.certificates) else {
        return Err(vec![format!(
            "{field}.certificates: at least one certificate is required"
        )]);
    };
    let resolver = Arc::new(resolver);
    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&TLS12, &TLS13],
        TlsVersion::Tls13 => &[&TLS13],
    };
    let builder = ServerConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(versions)
        .map_err(|e| vec![format!("{field}.min_version: {e}")])?;
    let mut config = builder
        .with_no_client_auth()
        .with_cert_resolver(Arc::clone(&resolver) as Arc<_>);
    config.alpn_protocols = if tls.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    config.session_storage = Arc::clone(&resumption.sessions);
    if tls.session_tickets {
        config.ticketer = resumption
            .ticketer(&format!("{field}.session_tickets"))
            .map_err(|e| vec![e])?;
    }
    let hsts = match &tls.hsts {
        None => None,
        Some(hsts) => Some(
            HeaderValue::from_str(&hsts.header_value())
                .map_err(|e| vec![format!("{field}.hsts: {e}")])?,
        ),
    };
    Ok(Built {
        state: TlsState {
            acceptor: Acceptor::from_server_config(Arc::new(config)),
            hsts,
            resolver,
        },
        certificates: loaded.certificates,
        warnings: loaded.warnings,
    })
}
