//! `switchyard config`: the effective config, as `nginx -T` prints it. The file parsed with
//! every default filled in, with the runtime state merged (splits, backend weights, added and
//! removed backends): from the running instance's admin API when it answers, else from the
//! `state_file` on disk. A header comment says which, and lists the backend states (draining,
//! disabled, retiring) that the file has no field for. The output is a config that `check`
//! accepts, unless an upstream has lost every backend at run time (the header says so, for each
//! one). Backend states and a running rollout are not in the file: an instance started from it
//! sends traffic to backends this one keeps out. The file on disk is merged as it is now, which
//! differs from what runs after an edit not yet reloaded.

use std::path::Path;

use switchyard_config::Config;
use switchyard_pool::{BackendState, RuntimeState};

use crate::admin_client::AdminClient;
use crate::cli::ApiArgs;

/// Where the merged runtime state came from, for the header.
enum Origin {
    Api(String),
    StateFile(String),
    None(String),
}

/// `switchyard config [--config FILE] [--json]`: with `--json`, `{"comment": [the header's
/// lines], "config": {...}}`.
pub fn print(api: &ApiArgs) -> Result<(), String> {
    let config_path = api.config.as_path();
    let config = Config::load(config_path).map_err(|problems| {
        format!(
            "{} is not a valid config:\n{problems}",
            config_path.display()
        )
    })?;
    let (state, origin) = runtime_state(config_path, &config);
    let (state, dropped) = state.fit(&config);
    let header = header(config_path, &config, &state, &origin, &dropped);
    let effective = state.effective_config(&config);
    if api.json {
        let json = serde_json::json!({ "comment": header, "config": effective.to_document() });
        println!("{json:#}");
    } else {
        print!("{}", render(&header, &effective));
    }
    Ok(())
}

/// The running instance's state, or the state file's, or none; the reason a source was
/// passed over goes in the header.
fn runtime_state(config_path: &Path, config: &Config) -> (RuntimeState, Origin) {
    let api = match AdminClient::for_config(config_path, config) {
        Ok(client) => match client.get("/api/v1/state") {
            Ok(json) => match serde_json::from_value::<RuntimeState>(json) {
                Ok(state) => {
                    let from = format!("the running instance's admin API ({})", client.address());
                    return (state, Origin::Api(from));
                }
                Err(e) => format!("its admin API's state is not one this binary reads ({e})"),
            },
            Err(e) => e.to_string(),
        },
        Err(e) => e,
    };
    let Some(path) = &config.state_file else {
        return (
            RuntimeState::default(),
            Origin::None(format!("{api}; and the config has no state_file")),
        );
    };
    match std::fs::read(path) {
        Ok(bytes) => match serde_json::from_slice::<RuntimeState>(&bytes) {
            Ok(state) => (
                state,
                Origin::StateFile(format!(
                    "state_file {} (the admin API did not answer: {api})",
                    path.display()
                )),
            ),
            Err(e) => (
                RuntimeState::default(),
                Origin::None(format!(
                    "{api}; and state_file {} cannot be read as a state ({e})",
                    path.display()
                )),
            ),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
            RuntimeState::default(),
            Origin::StateFile(format!(
                "state_file {}, which does not exist yet: no runtime changes (the admin API did not answer: {api})",
                path.display()
            )),
        ),
        Err(e) => (
            RuntimeState::default(),
            Origin::None(format!(
                "{api}; and state_file {} cannot be read: {e}",
                path.display()
            )),
        ),
    }
}

/// The header comment and the YAML.
fn render(header: &[String], effective: &Config) -> String {
    let mut out: String = header.iter().map(|l| format!("# {l}\n")).collect();
    out.push_str(&effective.to_yaml());
    out
}

/// The header's lines: where the state came from, what of it the file cannot hold.
fn header(
    config_path: &Path,
    config: &Config,
    state: &RuntimeState,
    origin: &Origin,
    dropped: &[String],
) -> Vec<String> {
    let mut header = vec![format!(
        "Effective config of {}: the file with every default filled in,",
        config_path.display()
    )];
    match origin {
        Origin::Api(from) | Origin::StateFile(from) => {
            header.push(format!("and the runtime state from {from}."))
        }
        Origin::None(why) => header.push(format!(
            "without runtime state: none could be read ({why})."
        )),
    }
    for line in dropped {
        header.push(format!("not merged, it no longer fits the file: {line}"));
    }
    let states: Vec<String> = config
        .upstreams
        .iter()
        .flat_map(|u| {
            state
                .backends(config, &u.name)
                .into_iter()
                .filter(|b| b.state != BackendState::Active)
                .map(move |b| {
                    format!(
                        "  upstream {} backend {}: {}",
                        u.name,
                        b.address,
                        b.state.as_str()
                    )
                })
        })
        .collect();
    if !states.is_empty() {
        header.push(
            "Backend states, which the file has no field for (they live in the runtime state):"
                .into(),
        );
        header.extend(states);
    }
    for empty in config
        .upstreams
        .iter()
        .filter(|u| state.backends(config, &u.name).is_empty())
    {
        header.push(format!(
            "NOT A VALID FILE AS IT IS: upstream {} has no backend left at run time, and check refuses an upstream without backends until one is added back",
            empty.name
        ));
    }
    header
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use switchyard_pool::Change;

    #[test]
    fn the_header_says_where_the_state_came_from_and_what_the_file_cannot_hold() {
        let config = Config::from_yaml(
            "listeners: [{address: 127.0.0.1:8080}]\nupstreams:\n  blue:\n    backends: [{address: 127.0.0.1:9001}, {address: 127.0.0.1:9002}]\nroutes: [{name: web, split: {blue: 1}}]\n",
        )
        .unwrap_or_else(|p| panic!("{p}"));
        let drain = Change::UpdateBackend {
            upstream: "blue".into(),
            address: "127.0.0.1:9002".parse().expect("address"),
            weight: Some(7),
            state: Some(BackendState::Draining),
        };
        let state = RuntimeState::default()
            .with_change(&config, &drain, |_: &str, _: SocketAddr| 0)
            .expect("change");
        let header = header(
            Path::new("/etc/sy.yaml"),
            &config,
            &state,
            &Origin::Api("the running instance's admin API (127.0.0.1:9000)".into()),
            &[],
        );
        let text = render(&header, &state.effective_config(&config));
        assert!(
            text.starts_with(
                "# Effective config of /etc/sy.yaml: the file with every default filled in,\n\
                 # and the runtime state from the running instance's admin API (127.0.0.1:9000).\n\
                 # Backend states, which the file has no field for (they live in the runtime state):\n\
                 #   upstream blue backend 127.0.0.1:9002: draining\n"
            ),
            "{text}"
        );
        assert!(text.contains("weight: 7"), "{text}");
        let back = Config::from_yaml(&text).unwrap_or_else(|p| panic!("{p}\n{text}"));
        assert_eq!(back, state.effective_config(&config));
    }
}
