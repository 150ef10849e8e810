//! `GET /api/v1/events?since=ID&limit=N`: the pool's event log, oldest first.
//!
//! `since` returns the events after that id, `limit` (default and most [`MAX_LIMIT`]) how many
//! at most; without `since`, the newest `limit` (still oldest first), which is what a person
//! looking at the log wants. A client follows the log by asking again with the last id it got. A `limit` above the maximum is refused with 400 rather than cut
//! down: a client that asked for 5 000 and silently got 1 000 could take the answer for all
//! there is, and the rest of the API refuses out-of-range values the same way.

use serde_json::Value;
use switchyard_pool::Events;

/// The most events one answer carries, and the default.
pub const MAX_LIMIT: usize = 1000;

/// What a query asks for.
#[derive(Debug, PartialEq, Eq)]
struct Query {
    since: Option<u64>,
    limit: usize,
}

/// The answer's body for the request's query string, or the 400 message naming the parameter.
pub fn list(events: &Events, query: Option<&str>) -> Result<Value, String> {
    let query = parse_query(query)?;
    let since = query
        .since
        .unwrap_or_else(|| events.last_id().saturating_sub(query.limit as u64));
    // An event is plain strings and JSON values: turning it into a `Value` cannot fail.
    Ok(Value::Array(
        events
            .since(since, query.limit)
            .iter()
            .filter_map(|e| serde_json::to_value(e).ok())
            .collect(),
    ))
}

fn parse_query(query: Option<&str>) -> Result<Query, String> {
    let mut since = None;
    let mut limit = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match name {
            "since" => &mut since,
            "limit" => &mut limit,
            other => {
                return Err(format!(
                    "{}: unknown query parameter; expected \"since\" and/or \"limit\"",
                    shown(other)
                ))
            }
        };
        if slot.is_some() {
            return Err(format!("{name}: given more than once"));
        }
        let number = value.parse::<u64>().map_err(|_| {
            format!(
                "{name}: must be a non-negative integer, got {:?}",
                shown(value)
            )
        })?;
        *slot = Some(number);
    }
    let limit = match limit {
        None => MAX_LIMIT,
        Some(n) => usize::try_from(n)
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| format!("limit: {n} is out of range 1..={MAX_LIMIT}"))?,
    };
    Ok(Query { since, limit })
}

/// A client's text in an error message, cut short: the message is for a person, not an echo.
fn shown(text: &str) -> String {
    text.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(text: &str) -> Result<Query, String> {
        parse_query(Some(text))
    }

    #[test]
    fn defaults_are_the_newest_up_to_the_limit() {
        let all = Query {
            since: None,
            limit: MAX_LIMIT,
        };
        assert_eq!(parse_query(None), Ok(all));
        assert_eq!(
            query(""),
            Ok(Query {
                since: None,
                limit: MAX_LIMIT
            })
        );
        assert_eq!(
            query("since=42&limit=5"),
            Ok(Query {
                since: Some(42),
                limit: 5
            })
        );
        assert_eq!(
            query("limit=1000"),
            Ok(Query {
                since: None,
                limit: 1000
            })
        );
    }

    #[test]
    fn bad_values_and_unknown_parameters_name_the_parameter() {
        for (text, starts) in [
            ("since=abc", "since: must be a non-negative integer"),
            ("since=-1", "since: must be a non-negative integer"),
            ("since=", "since: must be a non-negative integer"),
            ("limit=1.5", "limit: must be a non-negative integer"),
            ("limit=1001", "limit: 1001 is out of range 1..=1000"),
            ("limit=0", "limit: 0 is out of range"),
            ("limit=99999999999999999999", "limit: must be"),
            ("after=3", "after: unknown query parameter"),
            ("since=1&since=2", "since: given more than once"),
        ] {
            let e = query(text).expect_err(text);
            assert!(e.starts_with(starts), "{text}: {e}");
        }
    }

    #[test]
    fn the_answer_is_the_events_after_since() {
        let events = Events::new();
        for kind in ["a", "b", "c"] {
            events.record(switchyard_pool::Draft::new(
                switchyard_pool::Source::Api,
                kind,
                kind,
            ));
        }
        let ids = |query: &str| -> Vec<u64> {
            list(&events, Some(query))
                .expect("valid")
                .as_array()
                .expect("array")
                .iter()
                .filter_map(|e| e["id"].as_u64())
                .collect()
        };
        assert_eq!(ids("since=1&limit=1"), [2]);
        assert_eq!(ids("since=0"), [1, 2, 3]);
        // Without `since`: the newest, oldest first.
        assert_eq!(ids("limit=2"), [2, 3]);
        assert_eq!(ids(""), [1, 2, 3]);
    }
}
