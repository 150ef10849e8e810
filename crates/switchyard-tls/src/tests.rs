//! Unit tests with certificates made at test time by the `openssl` command: loading and its
//! exact error lines, names, SNI resolution, expiry warnings, prepare/commit and the metric,
//! and real handshakes (served certificate, ALPN, resumption across a reload).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, HandshakeKind, SignatureScheme};
use switchyard_config::{CertificateFiles, Config, ListenerTls, TlsVersion};
use switchyard_pool::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use x509_parser::prelude::FromDer;

use crate::load::{load_listener, Loaded};
use crate::{check, SniResolver, TlsFronts};

/// A directory of its own under the system's temp dir, removed at the end of the test.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "switchyard-tls-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.path(file);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Clone, Copy)]
enum KeyType {
    P256,
    P521,
    Rsa,
}

impl KeyType {
    fn newkey(self) -> &'static [&'static str] {
        match self {
            KeyType::P256 => &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
            KeyType::P521 => &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"],
            KeyType::Rsa => &["-newkey", "rsa:2048"],
        }
    }
}

fn openssl(dir: &Dir, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(&dir.0)
        .output()
        .expect("the openssl command");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What to put in a test certificate.
struct Spec<'a> {
    key: KeyType,
    cn: &'a str,
    /// Each a DNS SAN; empty: no SAN extension.
    sans: &'a [&'a str],
    days: u32,
    serial: u32,
}

impl Default for Spec<'_> {
    fn default() -> Self {
        Spec {
            key: KeyType::P256,
            cn: "test",
            sans: &[],
            days: 30,
            serial: 1,
        }
    }
}

/// Writes `<stem>.crt` and `<stem>.key`, self-signed.
fn make(dir: &Dir, stem: &str, spec: Spec<'_>) -> CertificateFiles {
    let (cert, key) = (format!("{stem}.crt"), format!("{stem}.key"));
    let subj = format!("/CN={}", spec.cn);
    let days = spec.days.to_string();
    let serial = format!("0x{:X}", spec.serial);
    let san = format!(
        "subjectAltName={}",
        spec.sans
            .iter()
            .map(|s| format!("DNS:{s}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut args = vec!["req", "-x509"];
    args.extend_from_slice(spec.key.newkey());
    args.extend_from_slice(&[
        "-nodes",
        "-keyout",
        &key,
        "-out",
        &cert,
        "-subj",
        &subj,
        "-days",
        &days,
        "-set_serial",
        &serial,
    ]);
    if !spec.sans.is_empty() {
        args.extend_from_slice(&["-addext", &san]);
    }
    openssl(dir, &args);
    CertificateFiles {
        cert: dir.path(&cert),
        key: dir.path(&key),
    }
}

/// A self-signed certificate with these exact dates (`YYYYMMDDHHMMSSZ`), which `req -x509`
/// cannot make (its `-days` must be positive): `openssl ca -selfsign` can.
fn make_dated(dir: &Dir, stem: &str, name: &str, start: &str, end: &str) -> CertificateFiles {
    let (cert, key, csr) = (
        format!("{stem}.crt"),
        format!("{stem}.key"),
        format!("{stem}.csr"),
    );
    dir.write(
        "ca.cnf",
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n\
         default_md = sha256\npolicy = p\ncopy_extensions = copy\n[p]\ncommonName = supplied\n",
    );
    dir.write("index.txt", "");
    dir.write("serial", "01\n");
    let subj = format!("/CN={name}");
    let san = format!("subjectAltName=DNS:{name}");
    let mut args = vec!["req", "-new"];
    args.extend_from_slice(KeyType::P256.newkey());
    args.extend_from_slice(&[
        "-nodes", "-keyout", &key, "-out", &csr, "-subj", &subj, "-addext", &san,
    ]);
    openssl(dir, &args);
    openssl(
        dir,
        &[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-selfsign",
            "-keyfile",
            &key,
            "-in",
            &csr,
            "-out",
            &cert,
            "-startdate",
            start,
            "-enddate",
            end,
        ],
    );
    CertificateFiles {
        cert: dir.path(&cert),
        key: dir.path(&key),
    }
}

fn listener_tls(certificates: Vec<CertificateFiles>) -> ListenerTls {
    ListenerTls {
        certificates,
        min_version: TlsVersion::Tls12,
        http2: true,
        session_tickets: true,
        hsts: None,
    }
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

fn load(certificates: Vec<CertificateFiles>) -> Result<Loaded, Vec<String>> {
    load_listener(
        0,
        &listener_tls(certificates),
        &provider(),
        SystemTime::now(),
    )
}

fn errors(certificates: Vec<CertificateFiles>) -> Vec<String> {
    match load(certificates) {
        Ok(_) => panic!("loaded"),
        Err(errors) => errors,
    }
}

fn serial_of(der: &CertificateDer<'_>) -> String {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    crate::load::serial_hex(cert.raw_serial())
}

fn served_serial(
    resolver: &SniResolver,
    name: Option<&str>,
    schemes: &[SignatureScheme],
) -> String {
    serial_of(&resolver.lookup(name, schemes).cert[0])
}

const ECDSA_AND_RSA: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA256,
];
const RSA_ONLY: &[SignatureScheme] = &[
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA256,
];

// ---- loading and its error lines ----

#[test]
fn names_are_the_dns_sans_lowercased_with_wildcards_kept() {
    let dir = Dir::new("names");
    let files = make(
        &dir,
        "a",
        Spec {
            cn: "ignored.example.com",
            sans: &["A.Example.com", "*.w.example.com", "a.example.com"],
            serial: 0xA1,
            ..Spec::default()
        },
    );
    let loaded = load(vec![files]).unwrap();
    let cert = &loaded.certificates[0];
    assert_eq!(cert.names, ["a.example.com", "*.w.example.com"]);
    assert_eq!(cert.serial, "A1");
    assert!(cert
        .schemes
        .contains(&SignatureScheme::ECDSA_NISTP256_SHA256));
    assert!(!cert.schemes.contains(&SignatureScheme::RSA_PSS_SHA256));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

#[test]
fn without_sans_the_name_is_the_subject_cn() {
    let dir = Dir::new("cn");
    let files = make(
        &dir,
        "a",
        Spec {
            cn: "Legacy.Example.com",
            ..Spec::default()
        },
    );
    assert_eq!(
        load(vec![files]).unwrap().certificates[0].names,
        ["legacy.example.com"]
    );
}

#[test]
fn a_missing_file_is_one_line_with_field_and_file() {
    let dir = Dir::new("missing");
    let good = make(&dir, "good", Spec::default());
    let missing = dir.path("nope.crt");
    let errors = errors(vec![
        good.clone(),
        CertificateFiles {
            cert: missing.clone(),
            key: good.key.clone(),
        },
        CertificateFiles {
            cert: good.cert.clone(),
            key: dir.path("nope.key"),
        },
    ]);
    assert_eq!(
        errors,
        [
            format!(
                "listeners[0].tls.certificates[1].cert: {}: cannot read: No such file or directory (os error 2)",
                missing.display()
            ),
            format!(
                "listeners[0].tls.certificates[2].key: {}: cannot read: No such file or directory (os error 2)",
                dir.path("nope.key").display()
            ),
        ]
    );
}

#[test]
fn files_without_pem_say_so() {
    let dir = Dir::new("nopem");
    let good = make(&dir, "good", Spec::default());
    let text = dir.write("text.txt", "not a certificate\n");
    // The key file where the certificate should be, and the other way round.
    let swapped = errors(vec![CertificateFiles {
        cert: good.key.clone(),
        key: good.cert.clone(),
    }]);
    assert_eq!(
        swapped,
        [format!(
            "listeners[0].tls.certificates[0].cert: {}: no PEM certificate in it",
            good.key.display()
        )]
    );
    let no_key = errors(vec![CertificateFiles {
        cert: good.cert.clone(),
        key: text.clone(),
    }]);
    assert_eq!(
        no_key,
        [format!(
            "listeners[0].tls.certificates[0].key: {}: no PEM private key in it",
            text.display()
        )]
    );
}

#[test]
fn a_pem_block_that_is_not_a_certificate_is_invalid() {
    let dir = Dir::new("invalid");
    let good = make(&dir, "good", Spec::default());
    let bogus = dir.write(
        "bogus.crt",
        "-----BEGIN CERTIFICATE-----\naGVsbG8gd29ybGQ=\n-----END CERTIFICATE-----\n",
    );
    let errors = errors(vec![CertificateFiles {
        cert: bogus.clone(),
        key: good.key,
    }]);
    assert_eq!(errors.len(), 1);
    let prefix = format!(
        "listeners[0].tls.certificates[0].cert: {}: not a valid certificate: ",
        bogus.display()
    );
    assert_eq!(errors[0], format!("{prefix}malformed DER (Eof)"));
    assert!(!errors[0].contains('\n'), "{}", errors[0]);
}

#[test]
fn an_unsupported_key_says_why() {
    let dir = Dir::new("p521");
    // ring signs with P-256 and P-384, not P-521.
    let files = make(
        &dir,
        "p521",
        Spec {
            key: KeyType::P521,
            ..Spec::default()
        },
    );
    assert_eq!(
        errors(vec![files.clone()]),
        [format!(
            "listeners[0].tls.certificates[0].key: {}: unsupported key: failed to parse private key as RSA, ECDSA, or EdDSA",
            files.key.display()
        )]
    );
}

#[test]
fn an_encrypted_key_is_named_as_such() {
    let dir = Dir::new("encrypted");
    let files = make(&dir, "a", Spec::default());
    openssl(
        &dir,
        &[
            "pkey", "-in", "a.key", "-out", "enc.key", "-aes256", "-passout", "pass:x",
        ],
    );
    let key = dir.path("enc.key");
    assert_eq!(
        errors(vec![CertificateFiles {
            cert: files.cert,
            key: key.clone()
        }]),
        [format!(
            "listeners[0].tls.certificates[0].key: {}: an encrypted private key; it must be unencrypted (openssl pkey -in FILE -out FILE)",
            key.display()
        )]
    );
}

#[test]
fn a_key_of_another_certificate_does_not_match() {
    let dir = Dir::new("mismatch");
    let a = make(&dir, "a", Spec::default());
    let b = make(&dir, "b", Spec::default());
    let errors = errors(vec![
        a.clone(),
        CertificateFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        },
    ]);
    assert_eq!(
        errors,
        [format!(
            "listeners[0].tls.certificates[1]: {} does not match the certificate in {}",
            b.key.display(),
            a.cert.display()
        )]
    );
}

// ---- expiry ----

#[test]
fn expiring_soon_is_a_warning() {
    let dir = Dir::new("soon");
    let files = make(
        &dir,
        "soon",
        Spec {
            days: 3,
            ..Spec::default()
        },
    );
    let loaded = load(vec![files.clone()]).unwrap();
    let not_after = chrono::DateTime::from_timestamp(loaded.certificates[0].not_after, 0)
        .unwrap()
        .format("%Y-%m-%d %H:%M:%S UTC")
        .to_string();
    assert_eq!(
        loaded.warnings,
        [format!(
            "listeners[0].tls.certificates[0].cert: {}: expires in 3 days ({not_after})",
            files.cert.display()
        )]
    );
}

#[test]
fn expired_and_not_yet_valid_are_warnings() {
    let dir = Dir::new("dated");
    let old = make_dated(
        &dir,
        "old",
        "old.example.com",
        "20200101000000Z",
        "20211102100000Z",
    );
    let future = make_dated(
        &dir,
        "future",
        "future.example.com",
        "20990101000000Z",
        "21000101000000Z",
    );
    let loaded = load(vec![old.clone(), future.clone()]).unwrap();
    assert_eq!(
        loaded.warnings,
        [
            format!(
                "listeners[0].tls.certificates[0].cert: {}: expired on 2021-11-02 10:00:00 UTC",
                old.cert.display()
            ),
            format!(
                "listeners[0].tls.certificates[1].cert: {}: not valid before 2099-01-01 00:00:00 UTC",
                future.cert.display()
            ),
        ]
    );
    // Still served: the expired one is the default.
    let resolver = SniResolver::new(&loaded.certificates).unwrap();
    assert_eq!(served_serial(&resolver, None, ECDSA_AND_RSA), "01");
}

#[test]
fn one_day_left_is_said_in_the_singular() {
    let dir = Dir::new("oneday");
    let files = make(
        &dir,
        "a",
        Spec {
            days: 10,
            ..Spec::default()
        },
    );
    let tls = listener_tls(vec![files]);
    let at = SystemTime::now() + Duration::from_secs(9 * 86_400 + 3_600);
    let warnings = load_listener(0, &tls, &provider(), at).unwrap().warnings;
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0].contains(": expires in 1 day ("),
        "{}",
        warnings[0]
    );
}

// ---- SNI resolution ----

fn resolver_of(dir: &Dir, specs: Vec<(&str, Spec<'_>)>) -> SniResolver {
    let files = specs
        .into_iter()
        .map(|(stem, spec)| make(dir, stem, spec))
        .collect();
    SniResolver::new(&load(files).unwrap().certificates).unwrap()
}

#[test]
fn exact_then_wildcard_then_the_first_certificate() {
    let dir = Dir::new("sni");
    let resolver = resolver_of(
        &dir,
        vec![
            (
                "default",
                Spec {
                    sans: &["default.example.com"],
                    serial: 0x10,
                    ..Spec::default()
                },
            ),
            (
                "wild",
                Spec {
                    sans: &["*.example.com"],
                    serial: 0x20,
                    ..Spec::default()
                },
            ),
            (
                "exact",
                Spec {
                    sans: &["api.example.com", "*.w.example.com"],
                    serial: 0x30,
                    ..Spec::default()
                },
            ),
        ],
    );
    let served = |name: Option<&str>| served_serial(&resolver, name, ECDSA_AND_RSA);
    // The exact name wins over the wildcard that also covers it.
    assert_eq!(served(Some("api.example.com")), "30");
    assert_eq!(served(Some("API.Example.COM")), "30");
    assert_eq!(served(Some("api.example.com.")), "30");
    assert_eq!(served(Some("www.example.com")), "20");
    assert_eq!(served(Some("default.example.com")), "10");
    assert_eq!(served(Some("x.w.example.com")), "30");
    // One label only: not the parent, not two labels down.
    assert_eq!(served(Some("example.com")), "10");
    assert_eq!(served(Some("a.b.example.com")), "10");
    assert_eq!(served(Some("a.x.w.example.com")), "10");
}

#[test]
fn a_wildcard_covers_exactly_one_label() {
    let dir = Dir::new("wild");
    let resolver = resolver_of(
        &dir,
        vec![
            (
                "default",
                Spec {
                    sans: &["other.test"],
                    serial: 0x10,
                    ..Spec::default()
                },
            ),
            (
                "wild",
                Spec {
                    sans: &["*.example.com"],
                    serial: 0x20,
                    ..Spec::default()
                },
            ),
        ],
    );
    let served = |name: Option<&str>| served_serial(&resolver, name, ECDSA_AND_RSA);
    assert_eq!(served(Some("a.example.com")), "20");
    assert_eq!(served(Some("example.com")), "10");
    assert_eq!(served(Some("a.b.example.com")), "10");
    assert_eq!(served(Some(".example.com")), "10");
    assert_eq!(served(Some("unknown.test")), "10");
    assert_eq!(served(None), "10");
}

#[test]
fn a_certificate_without_names_serves_as_the_default() {
    let dir = Dir::new("nameless");
    let resolver = resolver_of(
        &dir,
        vec![
            (
                "nameless",
                Spec {
                    cn: "",
                    serial: 0x10,
                    ..Spec::default()
                },
            ),
            (
                "named",
                Spec {
                    sans: &["a.example.com"],
                    serial: 0x20,
                    ..Spec::default()
                },
            ),
        ],
    );
    assert_eq!(served_serial(&resolver, None, ECDSA_AND_RSA), "10");
    assert_eq!(
        served_serial(&resolver, Some("a.example.com"), ECDSA_AND_RSA),
        "20"
    );
}

#[test]
fn among_certificates_of_one_name_the_client_schemes_choose() {
    let dir = Dir::new("schemes");
    let resolver = resolver_of(
        &dir,
        vec![
            (
                "ecdsa",
                Spec {
                    sans: &["a.example.com"],
                    serial: 0xEC,
                    ..Spec::default()
                },
            ),
            (
                "rsa",
                Spec {
                    key: KeyType::Rsa,
                    sans: &["a.example.com"],
                    serial: 0x5A,
                    ..Spec::default()
                },
            ),
        ],
    );
    let served = |name, schemes| served_serial(&resolver, name, schemes);
    assert_eq!(served(Some("a.example.com"), ECDSA_AND_RSA), "EC");
    assert_eq!(served(Some("a.example.com"), RSA_ONLY), "5A");
    // The default's twins (same names, another key) are chosen among the same way.
    assert_eq!(served(None, ECDSA_AND_RSA), "EC");
    assert_eq!(served(None, RSA_ONLY), "5A");
    // Nothing fits: the first, for rustls to refuse with its own alert.
    assert_eq!(
        served(Some("a.example.com"), &[SignatureScheme::ED25519]),
        "EC"
    );
}

// ---- fronts: start, check, prepare and commit, the metric ----

fn config(listeners: &[(&str, &[&CertificateFiles])]) -> Config {
    let mut yaml = String::from("listeners:\n");
    for (address, certificates) in listeners {
        yaml.push_str(&format!("  - address: {address}\n"));
        if certificates.is_empty() {
            continue;
        }
        yaml.push_str("    tls:\n      certificates:\n");
        for c in *certificates {
            yaml.push_str(&format!(
                "        - {{cert: {:?}, key: {:?}}}\n",
                c.cert.display().to_string(),
                c.key.display().to_string()
            ));
        }
    }
    yaml.push_str(
        "upstreams:\n  a:\n    backends:\n      - address: 127.0.0.1:9001\n\
         routes:\n  - name: r\n    path_prefix: /\n    split: {a: 100}\n",
    );
    match Config::from_yaml(&yaml) {
        Ok(config) => config,
        Err(problems) => panic!("{problems}\n{yaml}"),
    }
}

fn address(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn default_serial(fronts: &TlsFronts, listener: &str) -> String {
    let front = fronts.front(address(listener)).unwrap();
    served_serial(front.current().resolver(), None, ECDSA_AND_RSA)
}

#[test]
fn prepare_then_commit_swaps_and_a_failed_prepare_changes_nothing() {
    let dir = Dir::new("reload");
    let one = make(
        &dir,
        "one",
        Spec {
            sans: &["a.example.com"],
            serial: 0x1,
            ..Spec::default()
        },
    );
    let two = make(
        &dir,
        "two",
        Spec {
            sans: &["b.example.com"],
            serial: 0x2,
            days: 60,
            ..Spec::default()
        },
    );
    let other = make(
        &dir,
        "other",
        Spec {
            sans: &["c.example.com"],
            serial: 0x3,
            ..Spec::default()
        },
    );
    let started = config(&[
        ("127.0.0.1:8443", &[&one]),
        ("127.0.0.1:9443", &[&other]),
        ("127.0.0.1:8080", &[]),
    ]);
    let metrics = Metrics::new();
    let fronts = TlsFronts::load(&started, &metrics).unwrap();
    assert!(fronts.front(address("127.0.0.1:8080")).is_none());
    assert_eq!(default_serial(&fronts, "127.0.0.1:8443"), "01");
    let expiry = |fronts: &TlsFronts| -> Vec<(String, String)> {
        fronts.expiry_values().into_keys().collect()
    };
    let series = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(l, n)| (l.to_string(), n.to_string()))
            .collect()
    };
    assert_eq!(
        expiry(&fronts),
        series(&[
            ("127.0.0.1:8443", "a.example.com"),
            ("127.0.0.1:9443", "c.example.com")
        ])
    );

    // A broken file: refused, and everything stays as it was.
    let broken = CertificateFiles {
        cert: two.cert.clone(),
        key: one.key.clone(),
    };
    let next = config(&[
        ("127.0.0.1:8443", &[&broken]),
        ("127.0.0.1:9443", &[&other]),
    ]);
    let errors = fronts.prepare(&next).err().unwrap();
    assert_eq!(
        errors,
        [format!(
            "listeners[0].tls.certificates[0]: {} does not match the certificate in {}",
            one.key.display(),
            two.cert.display()
        )]
    );
    assert_eq!(default_serial(&fronts, "127.0.0.1:8443"), "01");

    // A good one: nothing changes until the commit. The listener that became plain keeps
    // what it serves (and its series); a new TLS listener is a restart matter.
    let before = fronts.front(address("127.0.0.1:8443")).unwrap().current();
    let next = config(&[
        ("127.0.0.1:8443", &[&two]),
        ("127.0.0.1:9443", &[]),
        ("127.0.0.1:7443", &[&one]),
    ]);
    let prepared = fronts.prepare(&next).unwrap();
    assert!(prepared.warnings().is_empty());
    assert_eq!(default_serial(&fronts, "127.0.0.1:8443"), "01");
    assert!(prepared.commit().is_empty());
    assert_eq!(default_serial(&fronts, "127.0.0.1:8443"), "02");
    assert_eq!(default_serial(&fronts, "127.0.0.1:9443"), "03");
    assert!(fronts.front(address("127.0.0.1:7443")).is_none());
    // What a connection loaded before the commit stays as it was.
    assert_eq!(served_serial(before.resolver(), None, ECDSA_AND_RSA), "01");
    assert_eq!(
        expiry(&fronts),
        series(&[
            ("127.0.0.1:8443", "b.example.com"),
            ("127.0.0.1:9443", "c.example.com")
        ])
    );
    let values = fronts.expiry_values();
    let two_expires = load(vec![two.clone()]).unwrap().certificates[0].not_after;
    assert_eq!(
        values[&("127.0.0.1:8443".to_string(), "b.example.com".to_string())],
        two_expires
    );
}

#[test]
fn start_and_check_report_every_problem_and_warnings() {
    let dir = Dir::new("start");
    let good = make(
        &dir,
        "good",
        Spec {
            days: 2,
            ..Spec::default()
        },
    );
    let missing = CertificateFiles {
        cert: dir.path("missing.crt"),
        key: good.key.clone(),
    };
    let bad = config(&[
        ("127.0.0.1:8443", &[&good]),
        ("127.0.0.1:9443", &[&good, &missing]),
    ]);
    let line = format!(
        "listeners[1].tls.certificates[1].cert: {}: cannot read: No such file or directory (os error 2)",
        dir.path("missing.crt").display()
    );
    let Err(errors) = TlsFronts::load(&bad, &Metrics::new()) else {
        panic!("started");
    };
    assert_eq!(errors, std::slice::from_ref(&line));
    let checked = check(&bad);
    assert_eq!(checked.errors, [line]);
    // The listener that fails says only what fails; the others their warnings too.
    assert_eq!(checked.warnings.len(), 1, "{:?}", checked.warnings);
    assert!(checked.warnings[0].starts_with(&format!(
        "listeners[0].tls.certificates[0].cert: {}: expires in 2 days (",
        good.cert.display()
    )));

    let fine = config(&[("127.0.0.1:8443", &[&good])]);
    let checked = check(&fine);
    assert!(checked.errors.is_empty());
    assert_eq!(checked.warnings.len(), 1);
}

// ---- real handshakes ----

/// Accepts anything and lets the test look at what was served.
#[derive(Debug)]
struct AcceptAnything(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(provider());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Serves `front` on a loopback port as a listener would: each connection loads the current
/// state and handshakes with its acceptor, then writes one byte and waits for the close.
async fn serve(front: Arc<crate::TlsFront>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let state = front.current();
            tokio::spawn(async move {
                let stream = pingora_core::protocols::l4::stream::Stream::from(tcp);
                let Ok(mut tls) = state.acceptor.tls_handshake(stream).await else {
                    return;
                };
                let _ = tls.write_all(b"x").await;
                let _ = tls.flush().await;
                let mut rest = Vec::new();
                let _ = tls.read_to_end(&mut rest).await;
            });
        }
    });
    address
}

struct Served {
    serial: String,
    alpn: Option<Vec<u8>>,
    kind: Option<HandshakeKind>,
}

async fn connect(client: &Arc<rustls::ClientConfig>, address: SocketAddr, sni: &str) -> Served {
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let connector = pingora_core::tls::TlsConnector::from(Arc::clone(client));
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    // Reading the server's byte also reads the session tickets sent after the handshake.
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).await.unwrap();
    let (_, connection) = tls.get_ref();
    let served = Served {
        serial: serial_of(&connection.peer_certificates().unwrap()[0]),
        alpn: connection.alpn_protocol().map(<[u8]>::to_vec),
        kind: connection.handshake_kind(),
    };
    let _ = tls.shutdown().await;
    served
}

#[tokio::test]
async fn handshakes_get_the_sni_certificate_and_resume_across_a_reload() {
    let dir = Dir::new("handshake");
    let a = make(
        &dir,
        "a",
        Spec {
            sans: &["a.example.com"],
            serial: 0xA,
            ..Spec::default()
        },
    );
    let b = make(
        &dir,
        "b",
        Spec {
            sans: &["b.example.com"],
            serial: 0xB,
            ..Spec::default()
        },
    );
    let renewed = make(
        &dir,
        "renewed",
        Spec {
            sans: &["b.example.com"],
            serial: 0xC,
            ..Spec::default()
        },
    );
    let started = config(&[("127.0.0.1:8443", &[&a, &b])]);
    let fronts = TlsFronts::load(&started, &Metrics::new()).unwrap();
    let front = fronts.front(address("127.0.0.1:8443")).unwrap();
    let address = serve(front).await;

    let h2 = client(&[b"h2", b"http/1.1"]);
    let served = connect(&h2, address, "b.example.com").await;
    assert_eq!(served.serial, "0B");
    assert_eq!(served.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(served.kind, Some(HandshakeKind::Full));
    let served = connect(&client(&[b"http/1.1"]), address, "unknown.example.com").await;
    assert_eq!(served.serial, "0A");
    assert_eq!(served.alpn.as_deref(), Some(&b"http/1.1"[..]));

    // The renewed certificate: a fresh client gets it, and the earlier client resumes its
    // session (the cache and ticket keys outlive the reload).
    let next = config(&[("127.0.0.1:8443", &[&a, &renewed])]);
    fronts.prepare(&next).unwrap().commit();
    assert_eq!(
        connect(&client(&[b"h2"]), address, "b.example.com")
            .await
            .serial,
        "0C"
    );
    let resumed = connect(&h2, address, "b.example.com").await;
    assert_eq!(resumed.kind, Some(HandshakeKind::Resumed));
}

#[tokio::test]
async fn without_http2_alpn_offers_http11_only_and_tls13_only_refuses_tls12() {
    let dir = Dir::new("alpn");
    let a = make(
        &dir,
        "a",
        Spec {
            sans: &["a.example.com"],
            ..Spec::default()
        },
    );
    let yaml = format!(
        "listeners:\n  - address: 127.0.0.1:8443\n    http2: false\n    tls:\n      min_version: \"1.3\"\n      \
         certificates:\n        - {{cert: {:?}, key: {:?}}}\n      hsts: {{max_age: 8760h}}\n\
         upstreams:\n  a:\n    backends:\n      - address: 127.0.0.1:9001\n\
         routes:\n  - name: r\n    path_prefix: /\n    split: {{a: 100}}\n",
        a.cert.display().to_string(),
        a.key.display().to_string()
    );
    let config = Config::from_yaml(&yaml).unwrap();
    let fronts = TlsFronts::load(&config, &Metrics::new()).unwrap();
    let front = fronts.front(address("127.0.0.1:8443")).unwrap();
    assert_eq!(
        front.current().hsts.as_ref().unwrap().to_str().unwrap(),
        "max-age=31536000"
    );
    let address = serve(front).await;
    let served = connect(&client(&[b"h2", b"http/1.1"]), address, "a.example.com").await;
    assert_eq!(served.alpn.as_deref(), Some(&b"http/1.1"[..]));

    let provider = Arc::new(provider());
    let tls12 = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider)))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let connector = pingora_core::tls::TlsConnector::from(Arc::new(tls12));
    let name = ServerName::try_from("a.example.com").unwrap();
    assert!(connector.connect(name, tcp).await.is_err());
}
