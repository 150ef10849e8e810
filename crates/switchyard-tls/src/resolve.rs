//! Which certificate a handshake gets: rustls asks [`SniResolver::resolve`] with the client's
//! SNI and signature schemes. It runs synchronously on the handshake path, so everything is
//! decided when the listener's certificates are loaded: two hash maps (exact names, and
//! wildcards keyed by the part after `*.`) to candidate lists, and each key's schemes. A
//! lookup is at most two hash probes and a scan of a few candidates, with no allocation
//! (rustls already lowercases the SNI; only a direct caller with upper case pays for a copy).
//!
//! Order of preference: the exact name, then a wildcard covering exactly one leftmost label
//! (`*.example.com` covers `a.example.com`, not `example.com` nor `a.b.example.com`, as RFC
//! 6125 and browsers have it), else the listener's first certificate (clients without SNI, or
//! with a name no certificate has). Among the certificates of one name, in file order, the
//! first whose key can sign with a scheme the client offers wins: an ECDSA certificate listed
//! before an RSA one of the same names serves modern clients, the RSA one the rest.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::load::Certificate;

struct Candidate {
    key: Arc<CertifiedKey>,
    schemes: Box<[SignatureScheme]>,
}

/// One listener's certificates, indexed by name.
pub struct SniResolver {
    /// In file order.
    certificates: Box<[Candidate]>,
    /// Name -> indices into `certificates`, in file order.
    exact: HashMap<Box<str>, Box<[usize]>>,
    /// `example.com` for `*.example.com` -> indices.
    wildcard: HashMap<Box<str>, Box<[usize]>>,
    /// The first certificate and those that carry the same names as it (its twins with
    /// another key type): clients without SNI choose among them by signature scheme too.
    default: Box<[usize]>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("certificates", &self.certificates.len())
            .field("names", &(self.exact.len() + self.wildcard.len()))
            .finish()
    }
}

impl SniResolver {
    /// `None` for no certificate at all (the config refuses a TLS listener without one).
    pub fn new(certificates: &[Certificate]) -> Option<SniResolver> {
        let first = certificates.first()?;
        let mut exact: HashMap<Box<str>, Vec<usize>> = HashMap::new();
        let mut wildcard: HashMap<Box<str>, Vec<usize>> = HashMap::new();
        for (index, certificate) in certificates.iter().enumerate() {
            for name in &certificate.names {
                match name.strip_prefix("*.") {
                    // Only a whole leftmost label: `*.*.a` or `w*.a` match nothing.
                    Some(parent) if !parent.contains('*') => {
                        wildcard.entry(parent.into()).or_default().push(index)
                    }
                    Some(_) => {}
                    None if name.contains('*') => {}
                    None => exact.entry(name.as_str().into()).or_default().push(index),
                }
            }
        }
        let mut first_names = first.names.clone();
        first_names.sort_unstable();
        let default = certificates
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                let mut names = c.names.clone();
                names.sort_unstable();
                names == first_names
            })
            .map(|(index, _)| index)
            .collect();
        let freeze = |map: HashMap<Box<str>, Vec<usize>>| {
            map.into_iter()
                .map(|(name, indices)| (name, indices.into_boxed_slice()))
                .collect()
        };
        Some(SniResolver {
            certificates: certificates
                .iter()
                .map(|c| Candidate {
                    key: Arc::clone(&c.key),
                    schemes: c.schemes.clone(),
                })
                .collect(),
            exact: freeze(exact),
            wildcard: freeze(wildcard),
            default,
        })
    }

    /// The certificate for a client that sent `server_name` (SNI) and can verify `schemes`.
    pub fn lookup(
        &self,
        server_name: Option<&str>,
        schemes: &[SignatureScheme],
    ) -> &Arc<CertifiedKey> {
        let candidates = server_name
            .and_then(|name| self.by_name(name))
            .unwrap_or(&self.default);
        let chosen = candidates
            .iter()
            .map(|&index| &self.certificates[index])
            .find(|c| c.schemes.iter().any(|s| schemes.contains(s)))
            // None can sign for this client: serve the first anyway and let rustls refuse
            // the handshake with its own alert (no overlapping signature schemes).
            .or_else(|| candidates.first().map(|&index| &self.certificates[index]))
            .unwrap_or(&self.certificates[0]);
        &chosen.key
    }

    fn by_name(&self, name: &str) -> Option<&[usize]> {
        let name = name.strip_suffix('.').unwrap_or(name);
        let name: Cow<'_, str> = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(name.to_ascii_lowercase())
        } else {
            Cow::Borrowed(name)
        };
        if let Some(indices) = self.exact.get(name.as_ref()) {
            return Some(indices);
        }
        let (label, parent) = name.split_once('.')?;
        if label.is_empty() {
            return None;
        }
        self.wildcard.get(parent).map(|indices| &indices[..])
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(self.lookup(
            client_hello.server_name(),
            client_hello.signature_schemes(),
        )))
    }
}
