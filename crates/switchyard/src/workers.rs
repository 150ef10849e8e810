//! Shared-nothing workers: which listening sockets each proxy worker thread accepts on.
//!
//! At `server.threads: N` every proxy listener is served by N single-threaded Pingora services,
//! each accepting on sockets of its own, all bound with `SO_REUSEPORT` to the listener's
//! address. The kernel spreads new connections over the sockets, and a connection then lives on
//! the thread that accepted it, as in nginx's worker model: no work stealing, no cross-thread
//! wake-ups, one upstream connection pool per worker.
//!
//! Pingora 0.9 hands listening sockets to the next process at a binary upgrade in a table keyed
//! by the listener's address *string*; two sockets under one key would be wrapped twice from
//! one descriptor. So every socket of an address gets a key of its own that still parses to the
//! same address: socket `k` writes the port with `k` leading zeros (`127.0.0.1:8080`,
//! `127.0.0.1:08080`, `127.0.0.1:008080`, ...), which Pingora's bind (`ToSocketAddrs`, whose
//! port is a `u16` parse) reads as the same port. Socket 0 is the plain address, the key an
//! older binary (one socket per address) used.
//!
//! A socket is never given up: Pingora closes inherited sockets that no service claims, and
//! closing one socket of a `SO_REUSEPORT` group resets the connections queued in it. So a new
//! process takes every socket it inherits for an address, however many threads it has itself:
//! an upgrade from 4 threads to 2 serves the 4 sockets on 2 threads (two each), one from 2 to 4
//! binds 2 more. The number of sockets only grows, up to the most threads an address has had
//! since the last plain start. (A binary from before these workers claims only socket 0: at an
//! upgrade to it Pingora closes the others once the old process has gone, and connections
//! queued in them at that moment are reset. Go back to such a binary with a restart.)
//!
//! Pingora's hand-over carries at most [`HANDOVER_FDS`] descriptors, with their keys in
//! [`HANDOVER_KEY_BYTES`]; a process that holds more would send them and the new process would
//! fail to take them, leaving no one listening. So the sockets per listener are capped to fit
//! beside the admin and metrics sockets, and when a listener has fewer sockets than threads,
//! its workers get several threads each (connections spread over a worker's threads at
//! random, as Pingora does). A process that still holds more than fits (inherited from a
//! process with fewer listeners) refuses SIGQUIT and says so: restart it instead.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};

/// Pingora's hand-over takes at most this many descriptors (`MAX_FDS` in its `transfer_fd`).
pub const HANDOVER_FDS: usize = 32;
/// And their keys, joined by spaces, in this many bytes (more are cut silently there).
pub const HANDOVER_KEY_BYTES: usize = 2048;

/// One proxy worker of a listener: a Pingora service with `threads` threads (1 unless the
/// listener has fewer sockets than threads), accepting on the sockets `keys` name.
#[derive(Debug, PartialEq)]
pub struct Worker {
    pub keys: Vec<String>,
    pub threads: usize,
}

/// Every listener's workers, and whether the sockets fit in one hand-over.
#[derive(Debug)]
pub struct Plan {
    /// Per listener, in the order given.
    pub workers: Vec<Vec<Worker>>,
    /// `None` if the sockets fit; else why the next binary upgrade could not take them.
    pub too_many: Option<String>,
}

/// The key of the `index`-th listening socket of `address` (see the module doc).
pub fn socket_key(address: SocketAddr, index: usize) -> String {
    let plain = address.to_string();
    if index == 0 {
        return plain;
    }
    // `SocketAddr`'s text always ends in `:port`, after the bracketed IPv6 host if there is one.
    let (host, port) = plain.rsplit_once(':').unwrap_or((plain.as_str(), ""));
    format!("{host}:{}{port}", "0".repeat(index))
}

/// The workers of every listener at `threads` threads, when `inherited` sockets per address
/// came from the previous process, beside the `others` (admin, metrics) keys: every inherited
/// socket is served, every worker has at least one socket, and as many sockets as threads per
/// listener unless that would not fit in one hand-over.
pub fn plan(
    addresses: &[SocketAddr],
    threads: usize,
    inherited: &HashMap<SocketAddr, usize>,
    others: &[String],
) -> Plan {
    let threads = threads.max(1);
    let had = |address: &SocketAddr| inherited.get(address).copied().unwrap_or(0);
    let listeners = addresses.len().max(1);
    let mut budget = (HANDOVER_FDS.saturating_sub(others.len()) / listeners).max(1);
    let (counts, bytes) = loop {
        let counts: Vec<usize> = addresses
            .iter()
            .map(|a| threads.min(budget).max(had(a)))
            .collect();
        let bytes = key_bytes(addresses, &counts, others);
        if bytes <= HANDOVER_KEY_BYTES || budget == 1 {
            break (counts, bytes);
        }
        budget -= 1;
    };
    let sockets: usize = counts.iter().sum::<usize>() + others.len();
    let too_many = (sockets > HANDOVER_FDS || bytes > HANDOVER_KEY_BYTES).then(|| {
        format!(
            "this process holds {sockets} listening sockets ({bytes} bytes of keys), more than a binary upgrade can hand over ({HANDOVER_FDS}, {HANDOVER_KEY_BYTES} bytes); restart it instead"
        )
    });
    let workers = addresses
        .iter()
        .zip(&counts)
        .map(|(address, &count)| listener_workers(*address, threads, count))
        .collect();
    Plan { workers, too_many }
}

/// One listener's `sockets` spread over `threads`: a worker per thread with one socket or
/// more, or, with fewer sockets than threads, a worker per socket with the threads shared out.
fn listener_workers(address: SocketAddr, threads: usize, sockets: usize) -> Vec<Worker> {
    let workers = threads.min(sockets).max(1);
    let mut out: Vec<Worker> = (0..workers)
        .map(|w| Worker {
            keys: Vec::new(),
            threads: threads / workers + usize::from(w < threads % workers),
        })
        .collect();
    for index in 0..sockets.max(1) {
        out[index % workers].keys.push(socket_key(address, index));
    }
    out
}

/// The bytes Pingora's hand-over needs for the keys: all of them, joined by spaces.
fn key_bytes(addresses: &[SocketAddr], counts: &[usize], others: &[String]) -> usize {
    let keys = addresses
        .iter()
        .zip(counts)
        .flat_map(|(a, &n)| (0..n).map(move |i| socket_key(*a, i).len()))
        .chain(others.iter().map(String::len));
    let (bytes, n) = keys.fold((0usize, 0usize), |(b, n), len| (b + len, n + 1));
    bytes + n.saturating_sub(1)
}

/// Counts, per address in `addresses`, the listening TCP sockets this process holds, which
/// after `Server::bootstrap` are the ones inherited from the previous process, and sets
/// `SO_REUSEPORT` on each: a socket from an older binary lacks it, and without it on every
/// socket of a group the kernel refuses to bind the workers' further sockets.
pub fn inherited_sockets(addresses: &[SocketAddr]) -> Result<HashMap<SocketAddr, usize>, String> {
    let mut counts = HashMap::new();
    let entries = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| format!("cannot list this process's descriptors in /proc/self/fd: {e}"))?;
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<RawFd>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for the three calls below. This runs before
        // any service starts; the only other thread then (the access log's writer) closes no
        // descriptor but its own file's at a reopen, which cannot happen yet (signals are
        // ignored until listening). At worst a number reused in between names another
        // descriptor: it is only changed if it is a listening socket on one of our addresses.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        // Not a socket (the directory listing itself, files, pipes), or not listening.
        if !socket.is_listener().unwrap_or(false) {
            continue;
        }
        let Some(local) = socket.local_addr().ok().and_then(|a| a.as_socket()) else {
            continue;
        };
        if !addresses.contains(&local) {
            continue;
        }
        socket.set_reuse_port(true).map_err(|e| {
            format!("{local}: cannot set SO_REUSEPORT on the inherited socket: {e}")
        })?;
        *counts.entry(local).or_insert(0) += 1;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::ToSocketAddrs;

    #[test]
    fn every_key_parses_back_to_the_address() {
        for address in ["127.0.0.1:8080", "[::1]:443", "0.0.0.0:1", "[::]:65535"] {
            let address: SocketAddr = address.parse().unwrap();
            let keys: Vec<String> = (0..40).map(|i| socket_key(address, i)).collect();
            for key in &keys {
                let parsed: Vec<SocketAddr> = key.to_socket_addrs().unwrap().collect();
                assert_eq!(parsed, vec![address], "{key}");
            }
            let distinct: std::collections::HashSet<&String> = keys.iter().collect();
            assert_eq!(distinct.len(), keys.len());
        }
        let address: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert_eq!(socket_key(address, 0), "127.0.0.1:8080");
        assert_eq!(socket_key(address, 2), "127.0.0.1:008080");
    }

    fn shape(plan: &Plan, listener: usize) -> Vec<(usize, usize)> {
        plan.workers[listener]
            .iter()
            .map(|w| (w.keys.len(), w.threads))
            .collect()
    }

    #[test]
    fn every_inherited_socket_is_served_and_every_worker_has_one() {
        let address: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let with = |threads, inherited| {
            let inherited = HashMap::from([(address, inherited)]);
            shape(&plan(&[address], threads, &inherited, &[]), 0)
        };
        assert_eq!(with(2, 0), vec![(1, 1), (1, 1)]);
        assert_eq!(with(2, 1), vec![(1, 1), (1, 1)]);
        assert_eq!(with(2, 4), vec![(2, 1), (2, 1)]);
        assert_eq!(with(3, 4), vec![(2, 1), (1, 1), (1, 1)]);
        assert_eq!(with(1, 3), vec![(3, 1)]);
        let inherited = HashMap::from([(address, 3)]);
        let workers = plan(&[address], 2, &inherited, &[]).workers;
        assert_eq!(
            workers[0],
            vec![
                Worker {
                    keys: vec!["127.0.0.1:8080".into(), "127.0.0.1:008080".into()],
                    threads: 1
                },
                Worker {
                    keys: vec!["127.0.0.1:08080".into()],
                    threads: 1
                },
            ]
        );
    }

    #[test]
    fn many_threads_fit_in_one_hand_over() {
        let addresses: Vec<SocketAddr> = vec![
            "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:443"
                .parse()
                .unwrap(),
            "[2001:db8:ffff:ffff:ffff:ffff:ffff:fffe]:80"
                .parse()
                .unwrap(),
        ];
        let others = vec!["127.0.0.1:9000".to_string(), "127.0.0.1:9210".to_string()];
        let plan = plan(&addresses, 64, &HashMap::new(), &others);
        assert_eq!(plan.too_many, None);
        let mut sockets = others.len();
        let mut bytes = others.iter().map(|k| k.len() + 1).sum::<usize>();
        for (listener, workers) in plan.workers.iter().enumerate() {
            // Fewer sockets than threads: each worker has one and several threads, 64 in all.
            assert!(workers.iter().all(|w| w.keys.len() == 1), "{workers:?}");
            assert_eq!(workers.iter().map(|w| w.threads).sum::<usize>(), 64);
            sockets += workers.len();
            bytes += workers.iter().map(|w| w.keys[0].len() + 1).sum::<usize>();
            assert!(shape(&plan, listener).len() >= 2);
        }
        assert!(sockets <= HANDOVER_FDS, "{sockets}");
        assert!(bytes <= HANDOVER_KEY_BYTES + 1, "{bytes}");
    }

    #[test]
    fn more_inherited_sockets_than_fit_are_served_and_said() {
        let a: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:443".parse().unwrap();
        // From a process with one listener and 30 threads, to one with two listeners.
        let inherited = HashMap::from([(a, 30)]);
        let plan = plan(&[a, b], 30, &inherited, &[]);
        assert_eq!(
            plan.workers[0].iter().map(|w| w.keys.len()).sum::<usize>(),
            30
        );
        assert!(plan.too_many.is_some());
    }

    #[test]
    fn listening_sockets_on_the_address_are_counted_and_made_reusable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let counts = inherited_sockets(&[address]).unwrap();
        assert_eq!(counts.get(&address), Some(&1));
        assert_eq!(counts.len(), 1, "{counts:?}");
        // A second socket can now join the first one's address.
        let joined =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        joined.set_reuse_port(true).unwrap();
        joined.bind(&address.into()).unwrap();
        drop(other);
    }
}
