//! Self-signed certificates for the TLS tests, made by the real `openssl` command line as an
//! operator makes them: one key and certificate per call, in the test's own temp directory.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The key type of a test certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    Rsa2048,
}

/// A certificate and its key on disk, with the serial number `openssl` gave it.
#[derive(Debug, Clone)]
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Upper-case hex, as `openssl x509 -serial` prints it.
    pub serial: String,
}

impl Cert {
    /// A self-signed certificate for `names` (DNS names, or IP addresses), valid for `days`,
    /// written as `<dir>/<stem>.crt` and `<dir>/<stem>.key` (replacing files of those names).
    pub fn self_signed(dir: &Path, stem: &str, names: &[&str], kind: KeyKind, days: u32) -> Cert {
        std::fs::create_dir_all(dir).expect("cert dir");
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        let sans = names
            .iter()
            .map(|n| {
                if n.parse::<std::net::IpAddr>().is_ok() {
                    format!("IP:{n}")
                } else {
                    format!("DNS:{n}")
                }
            })
            .collect::<Vec<_>>()
            .join(",");
        let mut command = Command::new("openssl");
        command.args(["req", "-x509", "-nodes", "-days", &days.to_string()]);
        match kind {
            KeyKind::EcdsaP256 => {
                command.args(["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"])
            }
            KeyKind::Rsa2048 => command.args(["-newkey", "rsa:2048"]),
        };
        let subject = format!(
            "/CN={}",
            names.first().copied().unwrap_or("switchyard test")
        );
        command.args(["-subj", &subject]);
        if !sans.is_empty() {
            command.args(["-addext", &format!("subjectAltName={sans}")]);
        }
        command.arg("-keyout").arg(&key).arg("-out").arg(&cert);
        let out = command.output().expect("run openssl");
        assert!(
            out.status.success(),
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let serial = serial_of_file(&cert);
        Cert { cert, key, serial }
    }
}

/// The serial number of the (first) certificate in a PEM file.
pub fn serial_of_file(path: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(path)
        .output()
        .expect("run openssl x509");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_serial(&String::from_utf8_lossy(&out.stdout))
}

/// `serial=0A1B...` as printed by `openssl x509 -serial`.
fn parse_serial(text: &str) -> String {
    text.trim()
        .strip_prefix("serial=")
        .unwrap_or(text.trim())
        .to_ascii_uppercase()
}

/// The serial number of the certificate a TLS server at `addr` serves for `sni` (`None`: a
/// ClientHello without SNI), as `openssl s_client` sees it.
pub fn served_serial(addr: std::net::SocketAddr, sni: Option<&str>) -> String {
    let mut command = Command::new("sh");
    let servername = match sni {
        Some(name) => format!("-servername {name}"),
        None => "-noservername".to_string(),
    };
    command.arg("-c").arg(format!(
        "openssl s_client -connect {addr} {servername} </dev/null 2>/dev/null | openssl x509 -noout -serial"
    ));
    let out = command.output().expect("run openssl s_client");
    assert!(
        out.status.success(),
        "no certificate from {addr} for {sni:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_serial(&String::from_utf8_lossy(&out.stdout))
}
