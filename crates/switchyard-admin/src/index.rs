//! `GET /api/v1/` (and `/api/v1`): the list of the admin API's endpoints, so the admin URL the
//! start-up log advertises leads somewhere a person or a script can read. Kept beside the
//! router in `api.rs`: an endpoint added there belongs here too (a test checks that every
//! path listed answers something other than 404).

use serde::Serialize;

/// One endpoint: its method, its path (`{name}` for a part the caller fills in) and what it
/// does.
#[derive(Debug, Serialize)]
pub struct Endpoint {
    pub method: &'static str,
    pub path: &'static str,
    pub description: &'static str,
}

const fn at(method: &'static str, path: &'static str, description: &'static str) -> Endpoint {
    Endpoint {
        method,
        path,
        description,
    }
}

/// Every endpoint, in the order the README lists them.
pub const ENDPOINTS: &[Endpoint] = &[
    at("GET", "/", "the status page (HTML; no token needed, it fetches the views below)"),
    at("GET", "/healthz", "the load balancer's own liveness: 200 ok, no token"),
    at("GET", "/api/v1/", "this list"),
    at("GET", "/api/v1/routes", "every route: match conditions, split, effective share now, routing counts"),
    at("GET", "/api/v1/routes/{route}", "one route"),
    at("PUT", "/api/v1/routes/{route}/split", "replaces a route's whole split, e.g. {\"blue\": 80, \"green\": 20}"),
    at("GET", "/api/v1/upstreams", "every upstream, whether it has an available backend, and its backends: health, state, weight, effective weight, in flight"),
    at("GET", "/api/v1/upstreams/{upstream}", "one upstream"),
    at("PATCH", "/api/v1/upstreams/{upstream}", "every backend's state and/or weight at once: {\"state\": \"draining\"}; 409 if a route would be left with no upstream, unless \"force\": true"),
    at("POST", "/api/v1/upstreams/{upstream}/backends", "adds a backend: {\"address\": \"IP:port\", \"weight\": 1}"),
    at("PATCH", "/api/v1/upstreams/{upstream}/backends/{address}", "changes a backend's weight and/or state (active, draining, disabled, retiring)"),
    at("DELETE", "/api/v1/upstreams/{upstream}/backends/{address}", "removes a draining or disabled backend with nothing in flight"),
    at("GET", "/api/v1/stats", "requests/s, error rate and p99 per upstream and per route/upstream over the last 1 s and 10 s"),
    at("GET", "/api/v1/rollouts", "every route's current or last rollout"),
    at("POST", "/api/v1/routes/{route}/rollout", "starts a rollout on the route"),
    at("GET", "/api/v1/routes/{route}/rollout", "the route's current or last rollout"),
    at("POST", "/api/v1/routes/{route}/rollout/pause", "holds the rollout at its weight"),
    at("POST", "/api/v1/routes/{route}/rollout/resume", "goes on from where it was held"),
    at("POST", "/api/v1/routes/{route}/rollout/promote", "gives `to` its full share now"),
    at("POST", "/api/v1/routes/{route}/rollout/abort", "gives `from` the whole share back now"),
    at("GET", "/api/v1/events?since={id}&limit={n}", "what changed, oldest first"),
    at("POST", "/api/v1/reload", "re-reads the config file (as SIGHUP)"),
    at("GET", "/api/v1/state", "the runtime state as the state file holds it: splits, backend changes, rollouts"),
    at("POST", "/api/v1/state/reset", "drops every runtime change: the config file alone rules again"),
];

/// The body of `GET /api/v1/`.
#[derive(Debug, Serialize)]
pub struct Index {
    pub service: &'static str,
    pub version: &'static str,
    /// How every `/api/` call authenticates when `admin.token_file` is set.
    pub authorization: &'static str,
    pub endpoints: &'static [Endpoint],
}

pub fn index() -> Index {
    Index {
        service: "switchyard admin API",
        version: env!("CARGO_PKG_VERSION"),
        authorization:
            "with admin.token_file set, every /api/ call needs Authorization: Bearer <token>",
        endpoints: ENDPOINTS,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_is_absolute_and_every_method_known() {
        for e in ENDPOINTS {
            assert!(e.path.starts_with('/'), "{e:?}");
            assert!(
                ["GET", "PUT", "POST", "PATCH", "DELETE"].contains(&e.method),
                "{e:?}"
            );
            assert!(!e.description.is_empty());
        }
        let json = serde_json::to_value(index()).expect("serializes");
        assert_eq!(json["endpoints"][0]["path"], "/");
        assert_eq!(json["endpoints"][0]["method"], "GET");
    }
}
