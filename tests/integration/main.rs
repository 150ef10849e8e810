//! Integration tests: the real `switchyard` binary in front of real backends on 127.0.0.1,
//! driven by a real HTTP client. One test binary, shared fixtures.

mod certs;
mod fixtures;

mod access_log;
mod admin;
mod balancing;
mod check;
mod cli;
mod clients;
mod demo;
mod deploy;
mod deploy_assets;
mod deploy_tls;
mod events;
mod files;
mod health;
mod lifecycle;
mod limits;
mod load;
mod matching;
mod metrics;
mod proxying;
mod retiring;
mod rollout_lifecycle;
mod rollouts;
mod shared_state;
mod state;
mod status_page;
mod tls;
mod upstream_tls;
mod websocket;
