//! Tells systemd (`Type=notify`) that the load balancer is serving, and which process is now
//! the main one: after a binary upgrade started from `ExecReload`, the new process says
//! `MAINPID=<itself>` so systemd follows it instead of the old one that drains and exits.

use std::os::unix::net::UnixDatagram;

use async_trait::async_trait;
use log::{info, warn};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

/// Sends `READY=1` (and `MAINPID`) once the proxy serves.
pub struct Notify;

#[async_trait]
impl BackgroundService for Notify {
    async fn start(&self, _shutdown: ShutdownWatch) {
        tell(&format!("READY=1\nMAINPID={}\n", std::process::id()));
    }
}

/// Sends one notification when systemd asked for them (`NOTIFY_SOCKET`). Called with
/// `MAINPID=` as soon as an upgrading process holds the sockets: the old process may exit
/// before the new one is ready, and systemd must follow the new one by then.
pub fn tell(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    match send(&path.to_string_lossy(), message.as_bytes()) {
        Ok(_) => info!("told systemd: {}", message.trim().replace('\n', " ")),
        Err(e) => warn!("cannot notify systemd at {}: {e}", path.to_string_lossy()),
    }
}

/// `@name` is an abstract socket, anything else a path.
fn send(path: &str, message: &[u8]) -> std::io::Result<usize> {
    let socket = UnixDatagram::unbound()?;
    match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            socket.send_to_addr(message, &address)
        }
        None => socket.send_to(message, path),
    }
}
