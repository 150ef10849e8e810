//! Reading and checking one listener's certificate and key files: the only place that touches
//! them. We read the PEM ourselves rather than hand the paths to Pingora, whose `TlsSettings`
//! panics on any file it cannot load; here every problem is one line naming the field path and
//! the file, so `check`, the start and a reload can all say what is wrong and where.
//!
//! A certificate's *names* (the SNI names it is served for) are its DNS SANs, or its subject
//! CN when it has none; its validity dates only ever make warnings, never errors (as nginx
//! serves an expired certificate, so a forgotten renewal degrades rather than stops a site).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, Utc};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{Error as RustlsError, InconsistentKeys, SignatureScheme};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use switchyard_config::{CertificateFiles, ListenerTls};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// A certificate that expires sooner than this makes a warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Every signature scheme rustls knows. A key's own list ([`Certificate::schemes`]) is the
/// subset it can sign with, found once at load so that the handshake never has to ask the key
/// (`SigningKey::choose_scheme` allocates a signer per call).
const ALL_SCHEMES: [SignatureScheme; 13] = [
    SignatureScheme::RSA_PKCS1_SHA1,
    SignatureScheme::ECDSA_SHA1_Legacy,
    SignatureScheme::RSA_PKCS1_SHA256,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::RSA_PKCS1_SHA512,
    SignatureScheme::ECDSA_NISTP521_SHA512,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::ED25519,
    SignatureScheme::ED448,
];

/// One certificate pair of a listener, loaded and checked.
#[derive(Debug, Clone)]
pub struct Certificate {
    /// What rustls serves: the chain as in the file, and the signing key.
    pub key: Arc<CertifiedKey>,
    /// SNI names, lowercased and without a trailing dot; a wildcard stays `*.example.com`.
    /// Empty for a certificate that names nothing (usable only as the default).
    pub names: Vec<String>,
    /// The signature schemes the key can sign with.
    pub schemes: Box<[SignatureScheme]>,
    /// The leaf's notAfter, Unix seconds.
    pub not_after: i64,
    /// The leaf's serial number, as `openssl x509 -serial` prints it (hex, upper case).
    pub serial: String,
}

/// A listener's certificates in file order, and the warnings about them.
#[derive(Debug)]
pub struct Loaded {
    pub certificates: Vec<Certificate>,
    pub warnings: Vec<String>,
}

/// Loads every certificate pair of the TLS listener at `listeners[index]`. `Err` has one line
/// per problem, for every pair (not just the first that fails).
pub fn load_listener(
    index: usize,
    tls: &ListenerTls,
    provider: &CryptoProvider,
    now: SystemTime,
) -> Result<Loaded, Vec<String>> {
    let mut certificates = Vec::with_capacity(tls.certificates.len());
    let mut warnings = Vec::new();
    let mut errors = Vec::new();
    for (i, files) in tls.certificates.iter().enumerate() {
        let field = format!("listeners[{index}].tls.certificates[{i}]");
        match load_pair(&field, files, provider) {
            Ok((certificate, validity)) => {
                warnings.extend(validity.warnings(&format!("{field}.cert"), &files.cert, now));
                certificates.push(certificate);
            }
            Err(error) => errors.push(error),
        }
    }
    if errors.is_empty() {
        Ok(Loaded {
            certificates,
            warnings,
        })
    } else {
        Err(errors)
    }
}

/// The leaf's validity window, Unix seconds.
#[derive(Debug, Clone, Copy)]
struct Validity {
    not_before: i64,
    not_after: i64,
}

impl Validity {
    /// Expired, expiring within [`EXPIRY_WARNING`], or not valid yet, at `now`.
    fn warnings(&self, field: &str, file: &Path, now: SystemTime) -> Vec<String> {
        let now = unix_seconds(now);
        let file = file.display();
        let mut out = Vec::new();
        if now < self.not_before {
            out.push(format!(
                "{field}: {file}: not valid before {}",
                utc(self.not_before)
            ));
        }
        let left = self.not_after.saturating_sub(now);
        if left <= 0 {
            out.push(format!(
                "{field}: {file}: expired on {}",
                utc(self.not_after)
            ));
        } else if u64::try_from(left).is_ok_and(|left| left < EXPIRY_WARNING.as_secs()) {
            // Rounded up: a certificate made with `-days 3` "expires in 3 days", not 2, and
            // one with an hour left in 1 day rather than 0; the date says it exactly.
            let days = (left + 86_399) / 86_400;
            let unit = if days == 1 { "day" } else { "days" };
            out.push(format!(
                "{field}: {file}: expires in {days} {unit} ({})",
                utc(self.not_after)
            ));
        }
        out
    }
}

fn load_pair(
    field: &str,
    files: &CertificateFiles,
    provider: &CryptoProvider,
) -> Result<(Certificate, Validity), String> {
    let cert_field = format!("{field}.cert");
    let key_field = format!("{field}.key");
    let chain = read_chain(&cert_field, &files.cert)?;
    let (names, validity, serial) = inspect_leaf(&cert_field, &files.cert, &chain)?;
    let key = read_key(&key_field, &files.key)?;
    let signing_key = provider.key_provider.load_private_key(key).map_err(|e| {
        format!(
            "{key_field}: {}: unsupported key: {}",
            files.key.display(),
            rustls_reason(&e)
        )
    })?;
    let schemes = ALL_SCHEMES
        .iter()
        .copied()
        .filter(|scheme| signing_key.choose_scheme(&[*scheme]).is_some())
        .collect();
    let key = CertifiedKey::new(chain, signing_key);
    match key.keys_match() {
        // `Unknown`: the key cannot tell its public half. No ring key does that, and rustls
        // itself accepts it (`CertifiedKey::from_der`); a real mismatch still fails the
        // handshake's signature check on the client.
        Ok(()) | Err(RustlsError::InconsistentKeys(InconsistentKeys::Unknown)) => {}
        Err(RustlsError::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            return Err(format!(
                "{field}: {} does not match the certificate in {}",
                files.key.display(),
                files.cert.display()
            ))
        }
        // webpki could not read a leaf that x509-parser could.
        Err(e) => {
            return Err(format!(
                "{cert_field}: {}: not a valid certificate: {}",
                files.cert.display(),
                rustls_reason(&e)
            ))
        }
    }
    Ok((
        Certificate {
            key: Arc::new(key),
            names,
            schemes,
            not_after: validity.not_after,
            serial,
        },
        validity,
    ))
}

/// A certificate or key file is at most this big: a chain is a few KiB.
const MAX_PEM_BYTES: u64 = 1 << 20;

fn read_file(field: &str, file: &Path) -> Result<Vec<u8>, String> {
    let fail = |why: String| format!("{field}: {}: {why}", file.display());
    // A FIFO or a device would block the start or the reload that reads it; only a regular
    // file (or a link to one) is read.
    let meta = std::fs::metadata(file).map_err(|e| fail(format!("cannot read: {e}")))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    if meta.len() > MAX_PEM_BYTES {
        return Err(fail(format!(
            "{} bytes, over the limit of {MAX_PEM_BYTES} for a certificate or key file",
            meta.len()
        )));
    }
    std::fs::read(file).map_err(|e| fail(format!("cannot read: {e}")))
}

/// The certificates of a PEM file, leaf first (as the file must have them).
fn read_chain(field: &str, file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read_file(field, file)?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{field}: {}: {}", file.display(), pem_reason(&e)))?;
    if chain.is_empty() {
        return Err(format!(
            "{field}: {}: no PEM certificate in it",
            file.display()
        ));
    }
    Ok(chain)
}

fn read_key(field: &str, file: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read_file(field, file)?;
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(key) => Ok(key),
        // The PEM reader skips sections it does not know, so an encrypted key reads as none:
        // say what it is, since "no key" would send the operator looking at the wrong thing.
        Err(pem::Error::NoItemsFound)
            if bytes
                .windows(b"BEGIN ENCRYPTED PRIVATE KEY".len())
                .any(|w| w == b"BEGIN ENCRYPTED PRIVATE KEY") =>
        {
            Err(format!(
                "{field}: {}: an encrypted private key; it must be unencrypted (openssl pkey -in FILE -out FILE)",
                file.display()
            ))
        }
        Err(pem::Error::NoItemsFound) => Err(format!(
            "{field}: {}: no PEM private key in it",
            file.display()
        )),
        Err(e) => Err(format!("{field}: {}: {}", file.display(), pem_reason(&e))),
    }
}

/// The leaf's names, validity and serial; every certificate of the chain must parse, since
/// the chain goes to every client as it is.
fn inspect_leaf(
    field: &str,
    file: &Path,
    chain: &[CertificateDer<'_>],
) -> Result<(Vec<String>, Validity, String), String> {
    let invalid = |position: usize, reason: String| {
        let which = if position == 0 {
            String::new()
        } else {
            format!(" (certificate {} of the chain)", position + 1)
        };
        format!(
            "{field}: {}: not a valid certificate{which}: {reason}",
            file.display()
        )
    };
    let mut leaf = None;
    for (position, der) in chain.iter().enumerate() {
        let cert = X509Certificate::from_der(der)
            .map(|(_, cert)| cert)
            .map_err(|e| invalid(position, x509_reason(e)))?;
        if position == 0 {
            leaf = Some(cert);
        }
    }
    // `read_chain` never returns an empty chain.
    let Some(leaf) = leaf else {
        return Err(format!(
            "{field}: {}: no PEM certificate in it",
            file.display()
        ));
    };
    let names = names(&leaf).map_err(|reason| invalid(0, reason))?;
    let validity = Validity {
        not_before: leaf.validity().not_before.timestamp(),
        not_after: leaf.validity().not_after.timestamp(),
    };
    let serial = serial_hex(leaf.raw_serial());
    Ok((names, validity, serial))
}

/// DNS SANs; without a SAN extension, the subject CN (what clients did before SANs, still
/// seen on internal CAs). A SAN extension with only IP addresses gives no name: clients then
/// ignore the CN, so choosing the certificate by it would serve one they reject. IP SANs are
/// left out: SNI never carries an address.
fn names(cert: &X509Certificate<'_>) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("subjectAltName: {e}"))?;
    for general in san.iter().flat_map(|san| &san.value.general_names) {
        if let GeneralName::DNSName(name) = general {
            push_name(&mut names, name);
        }
    }
    if san.is_none() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(name) = cn.as_str() {
                push_name(&mut names, name);
            }
        }
    }
    Ok(names)
}

fn push_name(names: &mut Vec<String>, name: &str) {
    let name = name.trim().trim_end_matches('.').to_ascii_lowercase();
    if !name.is_empty() && !names.contains(&name) {
        names.push(name);
    }
}

fn x509_reason(e: x509_parser::nom::Err<x509_parser::error::X509Error>) -> String {
    match e {
        // The parser's own words for "ran out of input" are "nom error: Eof".
        x509_parser::nom::Err::Error(x509_parser::error::X509Error::NomError(kind))
        | x509_parser::nom::Err::Failure(x509_parser::error::X509Error::NomError(kind)) => {
            format!("malformed DER ({kind:?})")
        }
        x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e.to_string(),
        x509_parser::nom::Err::Incomplete(_) => "truncated".into(),
    }
}

fn pem_reason(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "not valid PEM: a section has no end line {:?}",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "not valid PEM: a bad section start line {:?}",
            String::from_utf8_lossy(line)
        ),
        other => format!("not valid PEM: {other}"),
    }
}

/// rustls's `General("...")` errors print with a prefix that says nothing to an operator.
fn rustls_reason(e: &RustlsError) -> String {
    match e {
        RustlsError::General(reason) => reason.clone(),
        other => other.to_string(),
    }
}

/// Hex as `openssl x509 -serial` prints it: upper case, without the zero byte DER puts
/// before a serial whose first bit is set.
pub(crate) fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    raw[start..].iter().map(|b| format!("{b:02X}")).collect()
}

pub(crate) fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// `2026-11-02 10:00:00 UTC`.
fn utc(seconds: i64) -> String {
    match DateTime::<Utc>::from_timestamp(seconds, 0) {
        Some(time) => time.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        None => format!("{seconds} (Unix seconds)"),
    }
}
