//! The largest config Switchyard accepts, and the addresses no backend can have.
//!
//! Whatever `check` accepts, `run` must start in seconds with memory that can be stated in
//! advance (docs/configuration.md, "Limits", has the figures measured at these limits). Two
//! things grow faster than the file: YAML aliases, which serde_yaml replays in full every time
//! they are used (it bounds only the number of replays, at 100 per event, not their size, so
//! a 300 KB file can stand for millions of entries), and the route × upstream pairs that each
//! get their own metric series. So the file's size, its size with every alias expanded and
//! the counts of routes, upstreams, backends and pairs are all bounded, and each refusal names
//! its limit.

use std::cell::Cell;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::de::{DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess};

use crate::{Problem, Problems};

/// Largest config file, in bytes.
pub const MAX_CONFIG_BYTES: usize = 4 << 20;
/// Most YAML nodes (scalars, sequences and mappings) in a config once every alias is expanded.
pub const MAX_YAML_NODES: usize = 1_000_000;
/// Most bytes of scalar text in a config once every alias is expanded.
pub const MAX_YAML_TEXT_BYTES: usize = 16 << 20;
/// Most upstreams in a config.
pub const MAX_UPSTREAMS: usize = 1000;
/// Most routes in a config.
pub const MAX_ROUTES: usize = 1000;
/// Most backends of one upstream, in the config and after admin changes.
pub const MAX_BACKENDS_PER_UPSTREAM: usize = 1000;
/// Most backends over all upstreams of a config.
pub const MAX_BACKENDS: usize = 10_000;
/// Most route → upstream pairs (entries of all routes' splits together).
pub const MAX_ROUTE_UPSTREAM_PAIRS: usize = 10_000;
/// Most route → backend pairs (for every route, the backends of the upstreams it splits to):
/// each may get its own `switchyard_requests_total` series, so they bound the metrics.
pub const MAX_ROUTE_BACKEND_PAIRS: usize = 100_000;

/// Why `address` cannot be a backend, if it cannot: nothing listens on port 0, and an
/// unspecified, broadcast or multicast address names no single host (Linux even connects
/// `0.0.0.0` to itself, so such a "backend" would get traffic). Loopback and private
/// addresses are fine.
pub fn backend_address_problem(address: SocketAddr) -> Option<String> {
    if address.port() == 0 {
        return Some(format!("{address} has port 0; give a real port"));
    }
    // `::ffff:0.0.0.0` is `0.0.0.0` to the kernel.
    let why = match address.ip().to_canonical() {
        IpAddr::V4(ip) if ip.octets()[0] == 0 => "is unspecified (0.0.0.0/8: this host)",
        IpAddr::V4(ip) if ip.is_broadcast() => "is the broadcast address",
        IpAddr::V4(ip) if ip.is_multicast() => "is a multicast address (224.0.0.0/4)",
        IpAddr::V6(ip) if ip.is_unspecified() => "is unspecified (::, this host)",
        IpAddr::V6(ip) if ip.is_multicast() => "is a multicast address (ff00::/8)",
        _ => return None,
    };
    Some(format!(
        "{address} {why}, which no backend can have; give the backend's own address"
    ))
}

/// Refuses a YAML text whose expanded size is beyond [`MAX_YAML_NODES`] or
/// [`MAX_YAML_TEXT_BYTES`] before anything is built from it. A walk that builds nothing,
/// stopping as soon as a limit is passed, costs at most the limit.
pub(crate) fn check_expanded_size(text: &str) -> Result<(), Problems> {
    let budget = Budget::default();
    let walked = (&budget).deserialize(serde_yaml::Deserializer::from_str(text));
    match walked {
        Ok(()) => return Ok(()),
        // A text the walk cannot read to its end is refused here (a syntax error, with its
        // line, as the real parse would say it): the real parse must never build what the
        // walk has not measured.
        Err(e) if !budget.exceeded.get() => return Err(crate::yaml_problem(e)),
        Err(_) => {}
    }
    Err(Problems(vec![Problem {
        path: String::new(),
        message: format!(
            "with its YAML aliases expanded the config has more than the limit of \
             {MAX_YAML_NODES} YAML nodes or {MAX_YAML_TEXT_BYTES} bytes of text (see \
             docs/configuration.md, \"Limits\")"
        ),
    }]))
}

/// What the walk has seen so far.
#[derive(Default)]
struct Budget {
    nodes: Cell<usize>,
    text: Cell<usize>,
    exceeded: Cell<bool>,
}

impl Budget {
    fn spend<E: serde::de::Error>(&self, text: usize) -> Result<(), E> {
        self.nodes.set(self.nodes.get() + 1);
        self.text.set(self.text.get().saturating_add(text));
        if self.nodes.get() > MAX_YAML_NODES || self.text.get() > MAX_YAML_TEXT_BYTES {
            self.exceeded.set(true);
            return Err(E::custom("expanded size limit"));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for &Budget {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for &Budget {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_i128<E: serde::de::Error>(self, _: i128) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_u128<E: serde::de::Error>(self, _: u128) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.spend(v.len())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.spend(0)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.spend(0)?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.spend(0)?;
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }
    /// A tagged value (`!tag value`).
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        let ((), variant) = data.variant_seed(self)?;
        variant.newtype_variant_seed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_no_backend_can_have_are_named() {
        for (address, words) in [
            ("0.0.0.0:0", "port 0"),
            ("127.0.0.1:0", "port 0"),
            ("0.0.0.0:80", "unspecified"),
            ("0.1.2.3:80", "unspecified"),
            ("[::]:80", "unspecified"),
            ("[::ffff:0.0.0.0]:80", "unspecified"),
            ("255.255.255.255:80", "broadcast"),
            ("224.0.0.1:80", "multicast"),
            ("239.255.255.250:1900", "multicast"),
            ("[ff02::1]:80", "multicast"),
        ] {
            let problem = backend_address_problem(address.parse().unwrap());
            assert!(
                problem.as_deref().is_some_and(|p| p.contains(words)),
                "{address}: {problem:?}"
            );
        }
        for address in [
            "127.0.0.1:9001",
            "10.0.0.1:80",
            "192.168.1.255:80",
            "[::1]:80",
            "[fd00::1]:443",
        ] {
            assert_eq!(backend_address_problem(address.parse().unwrap()), None);
        }
    }

    #[test]
    fn alias_fan_out_is_refused_before_it_is_built() {
        // Ten nested levels of ten aliases: 10^10 nodes from a few hundred bytes. serde_yaml's
        // own replay limit stops this one; the walk must not get in its way.
        let mut yaml = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            yaml.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        let started = std::time::Instant::now();
        assert!(crate::Config::from_yaml(&yaml).is_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        // One long string used many times counts its text each time.
        let long = "x".repeat(100_000);
        let mut yaml = format!("s: &s {long}\nl:\n");
        for _ in 0..200 {
            yaml.push_str("  - *s\n");
        }
        assert!(check_expanded_size(&yaml).is_err());
        assert!(check_expanded_size("a: &a [1, 2]\nb: *a\nc: !tag 3\n").is_ok());
    }
}
