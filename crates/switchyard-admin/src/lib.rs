//! The operator's side of Switchyard: the admin HTTP API (JSON; changes go to the pool as
//! typed `Change`s), config reload (shared by `POST /api/v1/reload` and SIGHUP), the admin
//! token, the status page with the traffic sampler behind `GET /api/v1/stats`, and the
//! Prometheus endpoint. Both endpoints are Pingora HTTP services, so their sockets are handed
//! over in a binary upgrade like the proxy's.

mod api;
mod control;
mod events;
mod index;
mod metrics_endpoint;
mod origin;
pub mod rollouts;
mod state;
pub mod stats;
mod status_page;

pub use api::{AdminApi, MAX_BODY};
pub use control::{Control, ReloadRefused, ReloadReport, Token};
pub use metrics_endpoint::MetricsEndpoint;
pub use stats::StatsSampler;
