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
//! since the last plain start.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};

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

/// The socket keys of each of `threads` workers of one listener, when `inherited` sockets of
/// its address came from the previous process: every inherited socket is served, and every
/// worker has at least one socket.
pub fn plan(address: SocketAddr, threads: usize, inherited: usize) -> Vec<Vec<String>> {
    let threads = threads.max(1);
    let sockets = threads.max(inherited);
    let mut workers = vec![Vec::new(); threads];
    for index in 0..sockets {
        workers[index % threads].push(socket_key(address, index));
    }
    workers
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
        // SAFETY: the descriptor is only borrowed for the calls below, while it is open: this
        // runs before any service starts, so nothing else in the process closes descriptors.
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

    #[test]
    fn every_inherited_socket_is_served_and_every_worker_has_one() {
        let address: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let keys =
            |workers: Vec<Vec<String>>| -> Vec<usize> { workers.iter().map(Vec::len).collect() };
        assert_eq!(keys(plan(address, 2, 0)), vec![1, 1]);
        assert_eq!(keys(plan(address, 2, 1)), vec![1, 1]);
        assert_eq!(keys(plan(address, 2, 4)), vec![2, 2]);
        assert_eq!(keys(plan(address, 3, 4)), vec![2, 1, 1]);
        assert_eq!(keys(plan(address, 1, 3)), vec![3]);
        let workers = plan(address, 2, 3);
        assert_eq!(
            workers,
            vec![
                vec!["127.0.0.1:8080".to_string(), "127.0.0.1:008080".to_string()],
                vec!["127.0.0.1:08080".to_string()],
            ]
        );
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
