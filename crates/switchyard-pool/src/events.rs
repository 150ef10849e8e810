//! The event log: what changed in this process, by whom, oldest first (`GET /api/v1/events`).
//!
//! Every change of the runtime state (an admin change, a reload, a health transition, a
//! rollout step) and every lifecycle moment (start, upgrade) is recorded once here, with the
//! route, upstream or backend it is about and the values before and after. An operator asking
//! "why did traffic move at 10:02?" reads one list instead of grepping logs of two processes.
//!
//! Events are rare (changes, not requests), so a `Mutex<VecDeque>` is enough: no request ever
//! takes the lock. The ring keeps the last [`CAPACITY`] events in memory only; it does not
//! survive a restart or an upgrade (the contract says in-memory), and each event is also
//! logged as one line, which is what lasts. Followers ([`Events::subscribe`]) get every new
//! event through a broadcast channel; one that falls behind catches up with [`Events::since`].

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::SystemTime;

use chrono::{DateTime, SecondsFormat, Utc};
use log::{info, warn};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::broadcast;

/// How many events are kept; the contract asks for at least 1 000.
pub const CAPACITY: usize = 4096;

/// How many events a follower may fall behind before it sees `Lagged` (and reads `since`).
const FOLLOW_BUFFER: usize = 256;

/// Who made a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Api,
    Reload,
    Rollout,
    Health,
    Passive,
    Startup,
    Upgrade,
    Store,
    /// A retiring backend's timeout ran out (it became draining).
    Retire,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Api => "api",
            Source::Reload => "reload",
            Source::Rollout => "rollout",
            Source::Health => "health",
            Source::Passive => "passive",
            Source::Startup => "startup",
            Source::Upgrade => "upgrade",
            Source::Store => "store",
            Source::Retire => "retire",
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One recorded event, as `GET /api/v1/events` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// 1 for the first event of the process, one more for each next one.
    pub id: u64,
    /// RFC 3339 UTC with milliseconds: `2026-12-01T10:00:00.123Z`.
    pub time: String,
    pub source: Source,
    /// A short machine word: `split_changed`, `backend_unhealthy`, `reloaded`, ...
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// One sentence a person reads.
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Value>,
}

/// An event before it is recorded: everything but its id and time. Built with
/// `Draft::new(source, kind, message)` and the setters, so a caller names only what applies.
#[derive(Debug, Clone)]
#[must_use = "a draft does nothing until it is recorded"]
pub struct Draft {
    source: Source,
    kind: String,
    route: Option<String>,
    upstream: Option<String>,
    backend: Option<String>,
    message: String,
    before: Option<Value>,
    after: Option<Value>,
    warning: bool,
}

impl Draft {
    /// What the event will say.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn new(source: Source, kind: impl Into<String>, message: impl Into<String>) -> Draft {
        Draft {
            source,
            kind: kind.into(),
            route: None,
            upstream: None,
            backend: None,
            message: message.into(),
            before: None,
            after: None,
            warning: false,
        }
    }

    pub fn route(mut self, route: impl Into<String>) -> Draft {
        self.route = Some(route.into());
        self
    }

    pub fn upstream(mut self, upstream: impl Into<String>) -> Draft {
        self.upstream = Some(upstream.into());
        self
    }

    /// The backend's address (`IP:port`).
    pub fn backend(mut self, backend: impl ToString) -> Draft {
        self.backend = Some(backend.to_string());
        self
    }

    pub fn before(mut self, before: Value) -> Draft {
        self.before = Some(before);
        self
    }

    pub fn after(mut self, after: Value) -> Draft {
        self.after = Some(after);
        self
    }

    /// Logs the event's line at `warn` rather than `info` (still in every log that shows
    /// `info`): for what an operator should look at, such as a refused reload or dropped state,
    /// which were warnings before they were events.
    pub fn warning(mut self) -> Draft {
        self.warning = true;
        self
    }
}

/// The bounded, in-memory event log of one process.
pub struct Events {
    ring: Mutex<Ring>,
    follow: broadcast::Sender<Event>,
}

struct Ring {
    /// The id the next event gets.
    next_id: u64,
    events: VecDeque<Event>,
}

impl Default for Events {
    fn default() -> Self {
        Events::new()
    }
}

impl Events {
    pub fn new() -> Events {
        Events {
            ring: Mutex::new(Ring {
                next_id: 1,
                events: VecDeque::with_capacity(CAPACITY),
            }),
            follow: broadcast::Sender::new(FOLLOW_BUFFER),
        }
    }

    /// Records `draft` (evicting the oldest event when full), logs it as one line and tells
    /// followers. Returns its id.
    pub fn record(&self, draft: Draft) -> u64 {
        let event = {
            let mut ring = self.lock();
            let event = Event {
                id: ring.next_id,
                time: format_time(SystemTime::now()),
                source: draft.source,
                kind: draft.kind,
                route: draft.route,
                upstream: draft.upstream,
                backend: draft.backend,
                message: draft.message,
                before: draft.before,
                after: draft.after,
            };
            ring.next_id += 1;
            if ring.events.len() >= CAPACITY {
                ring.events.pop_front();
            }
            ring.events.push_back(event.clone());
            event
        };
        let line = log_line(&event);
        if draft.warning {
            warn!("{line}");
        } else {
            info!("{line}");
        }
        // No follower is no error: the ring keeps the event for whoever asks later.
        let _ = self.follow.send(event.clone());
        event.id
    }

    /// Up to `limit` events with an id above `after_id`, oldest first.
    pub fn since(&self, after_id: u64, limit: usize) -> Vec<Event> {
        let ring = self.lock();
        let start = ring.events.partition_point(|e| e.id <= after_id);
        ring.events.range(start..).take(limit).cloned().collect()
    }

    /// The id of the last event recorded (0: none yet).
    pub fn last_id(&self) -> u64 {
        self.lock().next_id - 1
    }

    /// Every event recorded from now on. A receiver that falls more than a few hundred events
    /// behind gets `RecvError::Lagged`, and reads what it missed with [`Events::since`].
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.follow.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `event 7 [api split_changed] route web: <message>`: one line that a grep for the id, the
/// source, the kind or a name finds.
fn log_line(event: &Event) -> String {
    let mut names = String::new();
    for (label, name) in [
        ("route", &event.route),
        ("upstream", &event.upstream),
        ("backend", &event.backend),
    ] {
        // Most messages name what they are about already: said once.
        if let Some(name) = name {
            let named = format!(" {label} {name}");
            if !names_whole(&format!(" {}", event.message), &named) {
                names.push_str(&named);
            }
        }
    }
    format!(
        "event {} [{} {}]{names}: {}",
        event.id, event.source, event.kind, event.message
    )
}

/// Whether `text` has `named` followed by the end or a character no name has (so that
/// "upstream blue" is not found in "upstream blue-canary").
fn names_whole(text: &str, named: &str) -> bool {
    text.match_indices(named).any(|(at, _)| {
        text[at + named.len()..]
            .chars()
            .next()
            .is_none_or(|c| c.is_whitespace() || matches!(c, ':' | ',' | ';' | ')'))
    })
}

/// Now, as [`format_time`] writes it.
pub fn now() -> String {
    format_time(SystemTime::now())
}

/// RFC 3339 in UTC with milliseconds, the `Z` form.
pub fn format_time(time: SystemTime) -> String {
    DateTime::<Utc>::from(time).to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::{Duration, UNIX_EPOCH};

    fn ids(events: &[Event]) -> Vec<u64> {
        events.iter().map(|e| e.id).collect()
    }

    fn note(events: &Events, n: usize) {
        for i in 0..n {
            events.record(Draft::new(Source::Api, "note", format!("note {i}")));
        }
    }

    #[test]
    fn ids_count_up_from_one_and_since_reads_after_an_id() {
        let events = Events::new();
        assert_eq!(events.last_id(), 0);
        assert!(events.since(0, 10).is_empty());
        note(&events, 5);
        assert_eq!(events.last_id(), 5);
        assert_eq!(ids(&events.since(0, 10)), [1, 2, 3, 4, 5]);
        assert_eq!(ids(&events.since(2, 10)), [3, 4, 5]);
        assert_eq!(ids(&events.since(2, 2)), [3, 4], "limit keeps the oldest");
        assert!(events.since(5, 10).is_empty());
        assert!(events.since(99, 10).is_empty());
        assert!(events.since(0, 0).is_empty());
    }

    #[test]
    fn the_oldest_are_evicted_past_capacity_and_ids_go_on() {
        let events = Events::new();
        note(&events, CAPACITY + 10);
        let kept = events.since(0, usize::MAX);
        assert_eq!(kept.len(), CAPACITY);
        assert_eq!(kept[0].id, 11, "the first ten are gone");
        assert_eq!(kept[CAPACITY - 1].id, (CAPACITY + 10) as u64);
        assert!(kept.windows(2).all(|w| w[1].id == w[0].id + 1));
        assert_eq!(ids(&events.since(5, 2)), [11, 12], "an evicted id reads on");
        assert_eq!(events.last_id(), (CAPACITY + 10) as u64);
    }

    #[test]
    fn events_serialize_as_the_contract_says() {
        let events = Events::new();
        events.record(
            Draft::new(Source::Api, "split_changed", "route web split changed")
                .route("web")
                .before(json!({"blue": 100}))
                .after(json!({"blue": 90, "green": 10})),
        );
        events.record(Draft::new(Source::Startup, "started", "started"));
        let all = events.since(0, 10);
        let first = serde_json::to_value(&all[0]).expect("json");
        let time = first["time"].as_str().expect("time").to_string();
        assert_eq!(
            first,
            json!({
                "id": 1, "time": time, "source": "api", "kind": "split_changed", "route": "web",
                "message": "route web split changed",
                "before": {"blue": 100}, "after": {"blue": 90, "green": 10},
            })
        );
        let second = serde_json::to_value(&all[1]).expect("json");
        let keys: Vec<&str> = second
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys.len(), 5, "absent fields are left out: {keys:?}");
        assert_eq!(second["source"], "startup");
        let back: Event = serde_json::from_value(first).expect("reads back");
        assert_eq!(back, all[0]);
    }

    #[test]
    fn every_source_is_its_lowercase_name() {
        for source in [
            Source::Api,
            Source::Reload,
            Source::Rollout,
            Source::Health,
            Source::Passive,
            Source::Startup,
            Source::Upgrade,
            Source::Store,
            Source::Retire,
        ] {
            assert_eq!(serde_json::to_value(source).expect("json"), source.as_str());
            assert_eq!(source.as_str(), format!("{source:?}").to_lowercase());
        }
    }

    #[test]
    fn time_is_rfc3339_utc_with_milliseconds() {
        let at = UNIX_EPOCH + Duration::from_millis(1_796_119_200_123);
        assert_eq!(format_time(at), "2026-12-01T10:00:00.123Z");
        assert_eq!(format_time(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let now = format_time(SystemTime::now());
        assert_eq!(now.len(), 24, "{now}");
        assert!(now.ends_with('Z'), "{now}");
    }

    #[test]
    fn log_lines_name_the_id_source_kind_and_names() {
        let events = Events::new();
        events.record(
            Draft::new(Source::Health, "backend_unhealthy", "it failed")
                .upstream("blue")
                .backend("127.0.0.1:9001"),
        );
        events.record(
            Draft::new(
                Source::Api,
                "split_changed",
                "route web split set to blue 5",
            )
            .route("web"),
        );
        let [first, second] = &events.since(0, 2)[..] else {
            panic!("two events");
        };
        assert_eq!(
            log_line(first),
            "event 1 [health backend_unhealthy] upstream blue backend 127.0.0.1:9001: it failed"
        );
        // A message that names its route already does not get it twice; another name that
        // only begins like it does not count.
        assert_eq!(
            log_line(second),
            "event 2 [api split_changed]: route web split set to blue 5"
        );
        assert!(names_whole(" upstream blue: down", " upstream blue"));
        assert!(!names_whole(
            " upstream blue-canary: down",
            " upstream blue"
        ));
    }

    #[test]
    fn followers_get_each_new_event() {
        let events = Events::new();
        let mut follower = events.subscribe();
        note(&events, 2);
        assert_eq!(follower.try_recv().expect("first").id, 1);
        assert_eq!(follower.try_recv().expect("second").id, 2);
        assert!(follower.try_recv().is_err());
    }
}
