//! The process's open-file limit, raised at start to what `server.max_connections` needs.
//!
//! Every client connection holds one descriptor and usually one to a backend; a process that
//! runs out mid-flight fails requests it had accepted. So the limit is settled before anything
//! listens: raised (the soft limit up to the hard one, and the hard one too when we may), or
//! the start refused with both numbers, as the contract asks.

/// Descriptors beyond two per connection: listeners, health checks, the state file, logs.
const MARGIN: u64 = 256;

/// Raises `RLIMIT_NOFILE` to what `max_connections` needs, or says why it cannot.
pub fn raise_open_files(max_connections: usize) -> Result<(), String> {
    let needed = max_connections as u64 * 2 + MARGIN;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!(
            "cannot read the open-file limit: {}",
            std::io::Error::last_os_error()
        ));
    }
    if limit.rlim_cur >= needed {
        return Ok(());
    }
    let raised = libc::rlimit {
        rlim_cur: needed,
        rlim_max: limit.rlim_max.max(needed),
    };
    // SAFETY: setrlimit reads the struct it is given and nothing else.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        log::info!(
            "open-file limit raised from {} to {needed} for server.max_connections {max_connections}",
            limit.rlim_cur
        );
        return Ok(());
    }
    Err(format!(
        "server.max_connections: {max_connections} connections need an open-file limit of {needed}, but it is {} (hard limit {}) and cannot be raised: {}; lower max_connections or raise the limit (ulimit -n, LimitNOFILE=)",
        limit.rlim_cur,
        limit.rlim_max,
        std::io::Error::last_os_error()
    ))
}
