//! Two reference systems for `make bench` (tests/bench/bench.py), never shipped: the floor
//! under Switchyard, so that the bench can say what our features cost over the framework and
//! what the framework costs over nginx (issue 16, item 2).
//!
//! - `bare-pingora-proxy`: pingora-proxy's `ProxyHttp` with nothing overridden but
//!   `upstream_peer` (round robin through `pingora::lb::LoadBalancer<RoundRobin>`).
//! - `bare-pingora-core`: a pingora-core `HttpServerApp` and no pingora-proxy: read the head,
//!   take a pooled connection from the same HTTP connector pingora-proxy uses, write the head,
//!   stream the bodies, write the response head, give the connection back, keep the client's.
//!
//! Both are built with the workspace's release profile (fat LTO, one codegen unit) and the
//! same allocator as Switchyard (mimalloc, below), and use Pingora's defaults otherwise: what
//! Switchyard tunes and these do not (the 4 KiB listener read buffer, for one) is listed in the
//! bench's notes. This module holds what the two share: the allocator, the command line and
//! the server.

use std::net::SocketAddr;

use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `--listen ADDR --backend ADDR... --threads N`.
pub struct Args {
    pub listen: SocketAddr,
    pub backends: Vec<SocketAddr>,
    pub threads: usize,
}

const USAGE: &str = "usage: --listen ADDR --backend ADDR [--backend ADDR ...] [--threads N]";

impl Args {
    /// The process's arguments, or exit 2 with the usage line: a bench tool, so std's
    /// arguments suffice (no `--help` pages, no completions).
    pub fn from_env() -> Args {
        match Args::parse(std::env::args().skip(1)) {
            Ok(args) => args,
            Err(problem) => {
                eprintln!("{problem}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }

    fn parse(mut words: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut listen = None;
        let mut backends = Vec::new();
        let mut threads = 1;
        while let Some(flag) = words.next() {
            let value = words
                .next()
                .ok_or_else(|| format!("{flag} needs a value"))?;
            match flag.as_str() {
                "--listen" => listen = Some(address(&flag, &value)?),
                "--backend" => backends.push(address(&flag, &value)?),
                "--threads" => {
                    threads = value
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("--threads {value}: not a positive number"))?
                }
                _ => return Err(format!("unknown argument {flag}")),
            }
        }
        let listen = listen.ok_or("--listen is required")?;
        if backends.is_empty() {
            return Err("at least one --backend is required".into());
        }
        Ok(Args {
            listen,
            backends,
            threads,
        })
    }
}

fn address(flag: &str, value: &str) -> Result<SocketAddr, String> {
    value
        .parse()
        .map_err(|e| format!("{flag} {value}: not an IP:port ({e})"))
}

/// A Pingora server with its defaults but the worker threads, and no grace period at
/// shutdown: the bench stops a system with SIGTERM after each scenario, and Pingora's default
/// would keep it 300 s longer. Shutdown timing is not on the request path.
pub fn server(threads: usize) -> Server {
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    server
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Args, String> {
        Args::parse(line.split_whitespace().map(String::from))
    }

    #[test]
    fn reads_every_flag() {
        let args = parse(
            "--listen 127.0.0.1:8080 --backend 127.0.0.1:1 --backend 127.0.0.1:2 --threads 2",
        )
        .expect("valid");
        assert_eq!(args.listen.port(), 8080);
        assert_eq!(args.backends.len(), 2);
        assert_eq!(args.threads, 2);
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        assert!(parse("--backend 127.0.0.1:1").is_err());
        assert!(parse("--listen 127.0.0.1:1").is_err());
        assert!(parse("--listen 127.0.0.1:1 --backend x").is_err());
        assert!(parse("--listen 127.0.0.1:1 --backend 127.0.0.1:2 --threads 0").is_err());
        assert!(parse("--listen 127.0.0.1:1 --backend 127.0.0.1:2 --threads").is_err());
    }
}
