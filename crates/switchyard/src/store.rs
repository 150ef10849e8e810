//! Which state store the process runs on: the state file (or memory) alone, or the shared
//! store the config names, opened before `bootstrap` so that a bad password or certificate
//! file stops a start (or a binary upgrade) before it takes the listening sockets. The store
//! connects in the background: one that is down never holds a start up.

use std::sync::Arc;

use switchyard_config::{Config, StateStoreConfig};
use switchyard_pool::SharedStore;

/// The shared store and this instance's name in it, or `None` on one node.
pub fn open(config: &Config) -> Result<Option<(SharedStore, String)>, String> {
    let Some(StateStoreConfig::Etcd(etcd)) = &config.state_store else {
        return Ok(None);
    };
    let name = etcd.name.clone().unwrap_or_else(|| default_name(config));
    let store = switchyard_etcd::EtcdStore::start(etcd, name.clone())?;
    Ok(Some((Arc::new(store), name)))
}

/// `host:port`: the host name and the admin API's port (else the first listener's), which
/// tells apart the instances of one host as much as those of several.
fn default_name(config: &Config) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let port = config
        .admin
        .as_ref()
        .map(|a| a.address.port())
        .or_else(|| config.listeners.first().map(|l| l.address.port()))
        .unwrap_or(0);
    format!("{host}:{port}")
}
