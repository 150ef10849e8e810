//! The YAML file exactly as written: field names, optionality and types, nothing more.
//! Defaults and cross-field checks belong to `validate`, so that every problem can be reported.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::access_log::RawAccessLog;
use crate::duration::YamlDuration;
use crate::matching::{RawKey, RawMatch, RawSticky};
use crate::tls::{RawListener, RawUpstreamTls, UpstreamProtocol};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub server: Server,
    pub listeners: Option<Vec<RawListener>>,
    pub admin: Option<Admin>,
    pub metrics: Option<Metrics>,
    pub state_file: Option<PathBuf>,
    pub state_store: Option<crate::state_store::RawStateStore>,
    pub access_log: Option<RawAccessLog>,
    pub upstreams: Option<UniqueMap<Upstream>>,
    pub routes: Option<Vec<Route>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub threads: Option<usize>,
    pub grace_period: Option<YamlDuration>,
    pub upgrade_socket: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub debug_headers: Option<bool>,
    pub keepalive_timeout: Option<YamlDuration>,
    pub header_timeout: Option<YamlDuration>,
    pub max_request_header_bytes: Option<usize>,
    pub max_connections: Option<usize>,
    pub body_timeout: Option<YamlDuration>,
    pub send_timeout: Option<YamlDuration>,
    pub max_request_body_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub address: String,
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub address: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
    IpHash,
    /// Consistent hashing on the request key of `hash_on`.
    Hash,
}

impl Algorithm {
    /// `ip_hash` and `hash`: a consistent-hashing ring, on which a backend's users are keys.
    pub fn is_hash_ring(self) -> bool {
        matches!(self, Algorithm::IpHash | Algorithm::Hash)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::WeightedRoundRobin => "weighted_round_robin",
            Algorithm::LeastConnections => "least_connections",
            Algorithm::IpHash => "ip_hash",
            Algorithm::Hash => "hash",
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    #[serde(default)]
    pub algorithm: Algorithm,
    pub backends: Option<Vec<Backend>>,
    pub health_check: Option<HealthCheck>,
    #[serde(default)]
    pub timeouts: Timeouts,
    pub max_connect_failures: Option<u32>,
    pub failure_cooldown: Option<YamlDuration>,
    pub slow_start: Option<YamlDuration>,
    pub hash_on: Option<RawKey>,
    pub retire_timeout: Option<YamlDuration>,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    pub tls: Option<RawUpstreamTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub address: String,
    pub weight: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckType {
    Http,
    Tcp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub kind: HealthCheckType,
    pub path: Option<String>,
    pub expect_status: Option<u16>,
    pub host: Option<String>,
    pub interval: Option<YamlDuration>,
    pub timeout: Option<YamlDuration>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    pub connect: Option<YamlDuration>,
    pub read: Option<YamlDuration>,
    pub write: Option<YamlDuration>,
    pub idle: Option<YamlDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub name: Option<String>,
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    #[serde(rename = "match")]
    pub matching: Option<RawMatch>,
    pub split: Option<UniqueMap<u32>>,
    pub sticky: Option<RawSticky>,
}

/// A YAML mapping whose keys must be unique. serde_yaml keeps the last of two equal keys in a
/// `BTreeMap`, which would silently drop an upstream or a split entry.
#[derive(Debug)]
pub struct UniqueMap<V>(pub BTreeMap<String, V>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visitor<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a mapping of names")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut access: A,
            ) -> Result<Self::Value, A::Error> {
                let mut map = BTreeMap::new();
                while let Some(key) = access.next_key::<String>()? {
                    if map.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!(
                            "{key:?} is defined twice"
                        )));
                    }
                    let value = access.next_value()?;
                    map.insert(key, value);
                }
                Ok(UniqueMap(map))
            }
        }
        d.deserialize_map(Visitor(std::marker::PhantomData))
    }
}
