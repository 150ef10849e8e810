//! The CA files upstreams name (`tls.ca_file`), read into the certificates Pingora's TLS
//! client checks a backend's certificate against.
//!
//! Read at start, by `switchyard check` and at each reload, never on the request path nor at
//! an admin change: [`load_upstream_tls`] is the one function all three call, so they refuse
//! the same files with the same words. A file that cannot be read or holds no certificate
//! Pingora could use is an error naming the field and the file, and the config is then refused
//! whole, as for any other problem: the running one (and its certificates) stays.
//!
//! Every certificate is checked here the way Pingora uses it later, once per new backend
//! connection: parsed as X.509 (Pingora's `WrappedX509` panics on a certificate it cannot
//! parse) and added to a rustls root store (Pingora fails every connection when one of the
//! list cannot be added).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use pingora_core::protocols::tls::CaType;
use pingora_core::tls::{CertificateDer, RootCertStore};
use pingora_core::utils::tls::WrappedX509;
use rustls_pki_types::pem::PemObject;
use switchyard_config::Config;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A CA file bigger than this is refused: the system's whole bundle is about 200 KiB, and a
/// path pointing at a device or a huge file by mistake must not be read to its end.
pub const MAX_CA_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// The CA certificates of one upstream's `tls.ca_file`.
#[derive(Clone)]
pub struct CaCertificates {
    pub(crate) certificates: Arc<CaType>,
    /// A hash of every certificate's bytes: two loads of the same file compare equal, and
    /// backend connections checked against other certificates are never reused for these.
    pub(crate) digest: u64,
}

impl CaCertificates {
    /// How many certificates the file holds.
    pub fn len(&self) -> usize {
        self.certificates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certificates.is_empty()
    }
}

impl std::fmt::Debug for CaCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaCertificates")
            .field("certificates", &self.len())
            .field("digest", &format_args!("{:016x}", self.digest))
            .finish()
    }
}

/// Every upstream's CA certificates, by upstream name: only upstreams with a `tls.ca_file`
/// are in it (the others verify against the system's roots, or speak no TLS).
#[derive(Clone, Debug, Default)]
pub struct UpstreamCas(BTreeMap<String, CaCertificates>);

impl UpstreamCas {
    pub fn get(&self, upstream: &str) -> Option<&CaCertificates> {
        self.0.get(upstream)
    }
}

/// Reads the `tls.ca_file` of every upstream of `config`. `Err` has one line per file that
/// cannot be used, e.g. `upstreams.api.tls.ca_file: /x.pem: no PEM certificate in it`.
pub fn load_upstream_tls(config: &Config) -> Result<UpstreamCas, Vec<String>> {
    let mut loaded = BTreeMap::new();
    let mut problems = Vec::new();
    for upstream in &config.upstreams {
        let Some(file) = upstream.tls.as_ref().and_then(|t| t.ca_file.as_deref()) else {
            continue;
        };
        match load_ca_file(file) {
            Ok(cas) => {
                loaded.insert(upstream.name.clone(), cas);
            }
            Err(why) => problems.push(format!(
                "upstreams.{}.tls.ca_file: {}: {why}",
                upstream.name,
                file.display()
            )),
        }
    }
    if problems.is_empty() {
        Ok(UpstreamCas(loaded))
    } else {
        Err(problems)
    }
}

/// One PEM file's certificates; `Err` says what is wrong with it, without the file's name.
pub fn load_ca_file(path: &Path) -> Result<CaCertificates, String> {
    // A FIFO or a device would block the start or the reload that reads it.
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut pem = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CA_FILE_BYTES + 1).read_to_end(&mut pem))
        .map_err(|e| format!("cannot read: {e}"))?;
    if pem.len() as u64 > MAX_CA_FILE_BYTES {
        return Err(format!(
            "over {MAX_CA_FILE_BYTES} bytes; a file of CA certificates is far smaller"
        ));
    }
    parse_ca_pem(&pem)
}

/// The certificates of PEM text, each checked as Pingora will use it.
fn parse_ca_pem(pem: &[u8]) -> Result<CaCertificates, String> {
    let mut certificates = Vec::new();
    let mut store = RootCertStore::empty();
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for (i, der) in CertificateDer::pem_slice_iter(pem).enumerate() {
        let n = i + 1;
        let der = der.map_err(|e| format!("certificate {n} is not valid PEM: {e}"))?;
        store
            .add(der.clone())
            .map_err(|e| format!("certificate {n} cannot be a CA certificate: {e}"))?;
        let raw = der.to_vec();
        hasher.update(&(raw.len() as u64).to_le_bytes());
        hasher.update(&raw);
        let parsed = WrappedX509::try_new(raw, |raw| {
            X509Certificate::from_der(raw).map(|(_, certificate)| certificate)
        })
        .map_err(|e| format!("certificate {n} is not valid X.509: {e}"))?;
        certificates.push(parsed);
    }
    if certificates.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(CaCertificates {
        certificates: Arc::from(certificates),
        digest: hasher.digest(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `backend.test` and 127.0.0.1 (made once with `openssl
    /// req -x509`; its key is not kept, these tests only parse it).
    const CERT: &str = include_str!("testdata/backend-ca.pem");

    fn config(ca_file: &Path) -> Config {
        Config::from_yaml(&format!(
            "listeners: [{{address: 127.0.0.1:8080}}]\nupstreams:\n  api:\n    tls: {{ca_file: {}}}\n    backends: [{{address: 127.0.0.1:9443}}]\n  plain:\n    backends: [{{address: 127.0.0.1:9000}}]\nroutes:\n  - name: all\n    split: {{api: 1, plain: 1}}\n",
            ca_file.display()
        ))
        .expect("valid config")
    }

    fn temp_file(name: &str, content: &[u8]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "switchyard-upstream-tls-{}-{name}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        path
    }

    #[test]
    fn a_pem_certificate_loads_for_its_upstream_only() {
        let path = temp_file("ca.pem", CERT.as_bytes());
        let cas = load_upstream_tls(&config(&path)).expect("loads");
        assert_eq!(cas.get("api").map(CaCertificates::len), Some(1));
        assert!(cas.get("plain").is_none());
        let again = load_upstream_tls(&config(&path)).unwrap();
        assert_eq!(
            cas.get("api").unwrap().digest,
            again.get("api").unwrap().digest,
            "the same file, the same digest"
        );
    }

    #[test]
    fn a_bundle_loads_every_certificate_with_text_and_keys_around_them() {
        let bundle = format!(
            "# a comment\n{CERT}\nsome text\n-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n{CERT}"
        );
        let cas = parse_ca_pem(bundle.as_bytes()).expect("loads");
        assert_eq!(cas.len(), 2);
        assert_ne!(cas.digest, parse_ca_pem(CERT.as_bytes()).unwrap().digest);
    }

    #[test]
    fn the_system_bundle_loads_when_there_is_one() {
        let system = Path::new("/etc/ssl/certs/ca-certificates.crt");
        if system.exists() {
            let cas = load_ca_file(system).expect("the system's CA bundle");
            assert!(cas.len() > 10, "{cas:?}");
        }
    }

    #[test]
    fn unusable_files_are_named_with_their_field() {
        let missing = std::env::temp_dir().join("switchyard-no-such-ca.pem");
        let problems = load_upstream_tls(&config(&missing)).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with(&format!(
                "upstreams.api.tls.ca_file: {}: cannot read: ",
                missing.display()
            )),
            "{problems:?}"
        );

        let text = temp_file("text.pem", b"not a certificate\n");
        assert_eq!(
            load_upstream_tls(&config(&text)).unwrap_err(),
            [format!(
                "upstreams.api.tls.ca_file: {}: no PEM certificate in it",
                text.display()
            )]
        );

        let cut = CERT.replace("-----END CERTIFICATE-----", "");
        let why = parse_ca_pem(cut.as_bytes()).unwrap_err();
        assert!(why.starts_with("certificate 1 is not valid PEM"), "{why}");

        let garbage = "-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n";
        let why = parse_ca_pem(garbage.as_bytes()).unwrap_err();
        assert!(why.starts_with("certificate 1 cannot be a CA"), "{why}");

        let directory = std::env::temp_dir();
        assert_eq!(load_ca_file(&directory).unwrap_err(), "not a regular file");
    }
}
