//! A rollout's specification: the body of `POST /api/v1/routes/{route}/rollout`, parsed once
//! into typed values and validated with the field path in every problem, as the config file
//! is. The same types are written to the state file (in the same JSON shape as the request,
//! with the defaults filled in), so a restarted process reads them back through this
//! validation too.
//!
//! What a spec cannot know by itself (whether `to` is in the route's split, which upstream
//! `from` defaults to) is checked when the rollout starts, against the state it starts from.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::duration::{format_duration, parse_duration, YamlDuration};
use crate::matching::{route_match, RawMatch, RouteMatch};
use crate::{Problem, Problems};

/// What a rollout does, step by step, and how it judges the new version.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSpec {
    pub to: String,
    /// `None`: the other upstream with the largest weight in the route's split.
    pub from: Option<String>,
    /// Weight steps increasing, the last step a weight step at 100; match steps anywhere
    /// before it.
    pub steps: Vec<Step>,
    /// How long each step holds unless it says otherwise.
    pub step_interval: Duration,
    pub analysis: Analysis,
    pub checks: Vec<Check>,
    pub on_failure: OnFailure,
    /// A rollout that cannot advance for this long (no passing window) fails.
    pub progress_deadline: Duration,
    /// Each event of the rollout is POSTed here as JSON.
    pub notify: Option<HttpUrl>,
}

/// One step: what moves, and how long it holds before the next.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub target: StepTarget,
    pub pause: Hold,
}

/// What a step changes.
#[derive(Debug, Clone, PartialEq)]
pub enum StepTarget {
    /// `to`'s share in percent of the two upstreams' weight, in (0, 100].
    Weight(f64),
    /// From this step to the end of the rollout, requests that match go to `to` whatever the
    /// weights; the weight stays where it was. Never empty.
    Match(RouteMatch),
}

impl Step {
    /// The weight a weight step sets, in percent; `None` for a match step (which keeps the
    /// weight in force).
    pub fn weight(&self) -> Option<f64> {
        match self.target {
            StepTarget::Weight(w) => Some(w),
            StepTarget::Match(_) => None,
        }
    }

    /// The conditions a match step adds; `None` for a weight step.
    pub fn matching(&self) -> Option<&RouteMatch> {
        match &self.target {
            StepTarget::Match(m) => Some(m),
            StepTarget::Weight(_) => None,
        }
    }
}

/// For event and log lines: `25%`, or `match {"headers":{"x-user-group":"beta"}}`.
impl fmt::Display for StepTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepTarget::Weight(w) => write!(f, "{w}%"),
            StepTarget::Match(m) => {
                let json = serde_json::to_string(m).map_err(|_| fmt::Error)?;
                write!(f, "match {json}")
            }
        }
    }
}

/// How long a step holds before the rollout moves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// The rollout's `step_interval`.
    Interval,
    For(Duration),
    /// Until an operator resumes or promotes.
    Manual,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Analysis {
    pub interval: Duration,
    pub min_requests: u64,
    pub max_error_rate: f64,
    pub max_p99_latency: Option<Duration>,
    pub max_latency_ratio: Option<f64>,
    pub failure_limit: u32,
}

impl Default for Analysis {
    fn default() -> Self {
        Analysis {
            interval: Duration::from_secs(10),
            min_requests: 20,
            max_error_rate: 0.01,
            max_p99_latency: None,
            max_latency_ratio: None,
            failure_limit: 0,
        }
    }
}

/// A GET that must answer as expected before the weight moves.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub url: HttpUrl,
    pub expect_status: u16,
    pub expect_body: Option<String>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// `from` gets the whole share back at once.
    Rollback,
    /// Hold where it is, with the reason.
    Pause,
}

/// An `http://` or `https://` URL, split into what a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpUrl {
    text: String,
    /// `https://`: TLS, with the host as SNI and the name verified against the system's roots.
    pub tls: bool,
    /// `host` or `host:port` as written, for the `Host` header.
    pub authority: String,
    pub host: String,
    pub port: u16,
    /// Starts with `/`.
    pub path: String,
}

impl HttpUrl {
    pub fn parse(text: &str) -> Result<HttpUrl, String> {
        let (tls, rest) = match (text.strip_prefix("http://"), text.strip_prefix("https://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err(format!("{text:?} is not an http:// or https:// URL")),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if path.contains('#') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!(
                "{text:?}: the path may not hold spaces, control characters or a fragment"
            ));
        }
        if authority.contains('@') {
            return Err(format!("{text:?}: user info in a URL is not supported"));
        }
        let (host, port) = match authority.rsplit_once(':') {
            // `[::1]:8080`, or a port after a name or IPv4 address.
            Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
                let port: u16 = port
                    .parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| format!("{text:?}: port {port:?} is not 1..=65535"))?;
                (host, port)
            }
            _ => (authority, if tls { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let valid_host = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b));
        if !valid_host {
            return Err(format!("{text:?}: {host:?} is not a host name or address"));
        }
        Ok(HttpUrl {
            text: text.to_string(),
            tls,
            authority: authority.to_string(),
            host: host.to_string(),
            port,
            path,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for HttpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// More steps than this is a typo, not a plan.
pub const MAX_STEPS: usize = 100;
/// More checks than this would hold every step back for their timeouts.
pub const MAX_CHECKS: usize = 16;
/// Shortest analysis interval: shorter windows hold too few requests to judge.
pub const MIN_ANALYSIS_INTERVAL: Duration = Duration::from_millis(100);
/// Longest check timeout: a step waits for its checks.
pub const MAX_CHECK_TIMEOUT: Duration = Duration::from_secs(60);
/// The contract's default steps.
pub const DEFAULT_STEPS: [f64; 4] = [10.0, 25.0, 50.0, 100.0];

impl RolloutSpec {
    /// Parses and validates a JSON request body; every problem names its field.
    pub fn from_json(body: &[u8]) -> Result<RolloutSpec, Problems> {
        if body.trim_ascii_start().first() != Some(&b'{') {
            return Err(Problems::one(
                "",
                "the body must be a JSON object such as {\"to\": \"green\"}",
            ));
        }
        let mut de = serde_json::Deserializer::from_slice(body);
        let raw: RawSpec = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            Problems::one(path, strip_position(&e.into_inner().to_string()))
        })?;
        raw.validate()
    }

    /// The step after which the rollout is complete.
    pub fn last_step(&self) -> usize {
        self.steps.len() - 1
    }

    /// How long step `i` holds.
    pub fn hold(&self, i: usize) -> Hold {
        match self.steps.get(i).map(|s| s.pause) {
            Some(Hold::Interval) | None => Hold::For(self.step_interval),
            Some(hold) => hold,
        }
    }
}

/// serde_json ends its messages with "at line 1 column 42", which says nothing the path does
/// not; the path is what an operator fixes.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// The body as written. Read with its steps as written ([`RawStep`]), and written from a
/// validated spec with its typed [`Step`]s, which serialize in the same shape.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, bound(deserialize = "S: Deserialize<'de>"))]
struct RawSpec<S = RawStep> {
    to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<String>,
    #[serde(default)]
    steps: Option<Vec<S>>,
    #[serde(default, with = "opt_duration")]
    step_interval: Option<Duration>,
    #[serde(default)]
    analysis: Option<RawAnalysis>,
    #[serde(default)]
    checks: Option<Vec<RawCheck>>,
    #[serde(default)]
    on_failure: Option<OnFailure>,
    #[serde(default, with = "opt_duration")]
    progress_deadline: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    notify: Option<String>,
}

#[derive(Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAnalysis {
    #[serde(default, with = "opt_duration")]
    interval: Option<Duration>,
    #[serde(default)]
    min_requests: Option<u64>,
    #[serde(default)]
    max_error_rate: Option<f64>,
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    max_p99_latency: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_latency_ratio: Option<f64>,
    #[serde(default)]
    failure_limit: Option<u32>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    url: String,
    #[serde(default)]
    expect_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expect_body: Option<String>,
    #[serde(default, with = "opt_duration")]
    timeout: Option<Duration>,
}

/// A step as written: a bare percentage, or an object with a weight or a match, and its own
/// hold.
#[derive(Debug)]
struct RawStep {
    weight: Option<f64>,
    pause: Option<Hold>,
    /// A match step's `match`, validated with the rest of the spec.
    matching: Option<RawMatch>,
    /// Written as an object: a problem with its weight is at `steps[i].weight`.
    object: bool,
}

impl<'de> Deserialize<'de> for RawStep {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct StepVisitor;
        impl<'de> Visitor<'de> for StepVisitor {
            type Value = RawStep;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a percentage such as 25, or an object such as {\"weight\": 25, \"pause\": \"2m\"} or {\"match\": {\"headers\": {\"X-User-Group\": \"beta\"}}}",
                )
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawStep, E> {
                Ok(RawStep {
                    weight: Some(v),
                    pause: None,
                    matching: None,
                    object: false,
                })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawStep, E> {
                self.visit_f64(v as f64)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawStep, E> {
                self.visit_f64(v as f64)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawStep, A::Error> {
                let mut step = RawStep {
                    weight: None,
                    pause: None,
                    matching: None,
                    object: true,
                };
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "weight" => step.weight = Some(map.next_value()?),
                        "pause" => step.pause = Some(map.next_value::<RawHold>()?.0),
                        "match" => step.matching = Some(map.next_value()?),
                        other => {
                            return Err(de::Error::unknown_field(
                                other,
                                &["weight", "pause", "match"],
                            ))
                        }
                    }
                }
                Ok(step)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<RawStep, A::Error> {
                Err(de::Error::invalid_type(de::Unexpected::Seq, &self))
            }
        }
        d.deserialize_any(StepVisitor)
    }
}

/// In the request's shape: a bare percentage when the step holds for `step_interval`, else
/// an object with its `weight` or `match` and its `pause`.
impl Serialize for Step {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        if let (StepTarget::Weight(w), Hold::Interval) = (&self.target, self.pause) {
            return s.serialize_f64(*w);
        }
        let mut map = s.serialize_map(None)?;
        match &self.target {
            StepTarget::Weight(w) => map.serialize_entry("weight", w)?,
            StepTarget::Match(m) => map.serialize_entry("match", m)?,
        }
        if self.pause != Hold::Interval {
            map.serialize_entry("pause", &hold_text(self.pause))?;
        }
        map.end()
    }
}

struct RawHold(Hold);

impl<'de> Deserialize<'de> for RawHold {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == "manual" {
            return Ok(RawHold(Hold::Manual));
        }
        parse_duration(&text)
            .map(|d| RawHold(Hold::For(d)))
            .map_err(|e| de::Error::custom(format!("{e}, or \"manual\"")))
    }
}

fn hold_text(hold: Hold) -> String {
    match hold {
        Hold::Manual => "manual".into(),
        Hold::For(d) => format_duration(d),
        Hold::Interval => String::new(),
    }
}

/// Optional durations written as `"250ms"` (serde's `with` for `Option<Duration>`).
mod opt_duration {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<YamlDuration>::deserialize(d).map(|o| o.map(|d| d.0))
    }

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_none(),
        }
    }
}

impl RawSpec<RawStep> {
    fn validate(self) -> Result<RolloutSpec, Problems> {
        let mut problems = Vec::new();
        let mut problem = |path: &str, message: String| {
            problems.push(Problem {
                path: path.to_string(),
                message,
            })
        };
        if self.to.trim().is_empty() {
            problem("to", "must name an upstream".into());
        }
        if self.from.as_deref() == Some(self.to.as_str()) {
            problem(
                "from",
                format!(
                    "{:?} is also \"to\"; a rollout moves weight between two upstreams",
                    self.to
                ),
            );
        }
        let mut steps = Vec::new();
        let raw_steps = self.steps.unwrap_or_else(|| {
            DEFAULT_STEPS
                .iter()
                .map(|w| RawStep {
                    weight: Some(*w),
                    pause: None,
                    matching: None,
                    object: false,
                })
                .collect()
        });
        if raw_steps.is_empty() {
            problem(
                "steps",
                "must hold at least one step (or leave it out for the default [10, 25, 50, 100])"
                    .into(),
            );
        }
        if raw_steps.len() > MAX_STEPS {
            problem(
                "steps",
                format!(
                    "{} steps, more than the limit of {MAX_STEPS}",
                    raw_steps.len()
                ),
            );
        }
        let mut previous: Option<f64> = None;
        for (i, step) in raw_steps.into_iter().enumerate() {
            let path = format!("steps[{i}]");
            let pause = step.pause.unwrap_or(Hold::Interval);
            if let Some(raw) = step.matching {
                if step.weight.is_some() {
                    problem(
                        &path,
                        "a step either sets a weight or adds a match, not both; make them two steps"
                            .into(),
                    );
                    continue;
                }
                let match_path = format!("{path}.match");
                let mut found = Vec::new();
                let matching = route_match(raw, &match_path, &mut found);
                if previous == Some(100.0) {
                    problem(
                        &match_path,
                        "comes after the 100% step, where \"to\" already has every request; put it before"
                            .into(),
                    );
                } else if found.is_empty() && matching.is_empty() {
                    problem(
                        &match_path,
                        "must hold at least one condition (headers, cookies, query or methods): an empty match would send every request to \"to\""
                            .into(),
                    );
                }
                for p in found {
                    problem(&p.path, p.message);
                }
                steps.push(Step {
                    target: StepTarget::Match(matching),
                    pause,
                });
                continue;
            }
            let Some(weight) = step.weight else {
                problem(
                    &format!("{path}.weight"),
                    "is required (or \"match\", for a match step)".into(),
                );
                continue;
            };
            let weight_path = if step.object {
                format!("{path}.weight")
            } else {
                path.clone()
            };
            if !(weight > 0.0 && weight <= 100.0) {
                problem(
                    &weight_path,
                    format!("{weight} is not a percentage in (0, 100]"),
                );
                continue;
            }
            // Match steps in between do not count: they leave the weight where it was.
            if let Some(before) = previous.filter(|before| weight <= *before) {
                problem(
                    &weight_path,
                    format!("{weight} does not increase on the weight step before it ({before}); weight steps must increase"),
                );
            }
            previous = Some(weight);
            steps.push(Step {
                target: StepTarget::Weight(weight),
                pause,
            });
        }
        // The last step gives `to` the whole share; a match step is never last.
        if steps.last().is_some_and(|s| s.weight() != Some(100.0)) {
            steps.push(Step {
                target: StepTarget::Weight(100.0),
                pause: Hold::Interval,
            });
        }
        let raw = self.analysis.unwrap_or_default();
        let defaults = Analysis::default();
        let analysis = Analysis {
            interval: raw.interval.unwrap_or(defaults.interval),
            min_requests: raw.min_requests.unwrap_or(defaults.min_requests),
            max_error_rate: raw.max_error_rate.unwrap_or(defaults.max_error_rate),
            max_p99_latency: raw.max_p99_latency,
            max_latency_ratio: raw.max_latency_ratio,
            failure_limit: raw.failure_limit.unwrap_or(defaults.failure_limit),
        };
        if analysis.interval < MIN_ANALYSIS_INTERVAL {
            problem(
                "analysis.interval",
                format!(
                    "{} is shorter than the shortest window, {}",
                    format_duration(analysis.interval),
                    format_duration(MIN_ANALYSIS_INTERVAL)
                ),
            );
        }
        if analysis.min_requests == 0 {
            problem(
                "analysis.min_requests",
                "must be at least 1: a window without requests says nothing".into(),
            );
        }
        if !(0.0..=1.0).contains(&analysis.max_error_rate) {
            problem(
                "analysis.max_error_rate",
                format!(
                    "{} is not a fraction in [0, 1] (0.01 = 1%)",
                    analysis.max_error_rate
                ),
            );
        }
        if analysis.max_p99_latency == Some(Duration::ZERO) {
            problem("analysis.max_p99_latency", "must be longer than 0s".into());
        }
        if let Some(ratio) = analysis
            .max_latency_ratio
            .filter(|r| !(*r > 0.0 && r.is_finite()))
        {
            problem(
                "analysis.max_latency_ratio",
                format!("{ratio} must be a number above 0 (1.5 = 50% slower than from)"),
            );
        }
        if self.checks.as_ref().is_some_and(|c| c.len() > MAX_CHECKS) {
            problem(
                "checks",
                format!("more than the limit of {MAX_CHECKS} checks"),
            );
        }
        let mut checks = Vec::new();
        for (i, check) in self.checks.unwrap_or_default().into_iter().enumerate() {
            let url = match HttpUrl::parse(&check.url) {
                Ok(url) => url,
                Err(why) => {
                    problem(&format!("checks[{i}].url"), why);
                    continue;
                }
            };
            let expect_status = check.expect_status.unwrap_or(200);
            if !(100..=599).contains(&expect_status) {
                problem(
                    &format!("checks[{i}].expect_status"),
                    format!("{expect_status} is not an HTTP status (100..=599)"),
                );
            }
            let timeout = check.timeout.unwrap_or(Duration::from_secs(2));
            if timeout.is_zero() || timeout > MAX_CHECK_TIMEOUT {
                problem(
                    &format!("checks[{i}].timeout"),
                    format!(
                        "{} is not in (0s, {}]",
                        format_duration(timeout),
                        format_duration(MAX_CHECK_TIMEOUT)
                    ),
                );
            }
            checks.push(Check {
                url,
                expect_status,
                expect_body: check.expect_body,
                timeout,
            });
        }
        let progress_deadline = self
            .progress_deadline
            .unwrap_or(Duration::from_secs(30 * 60));
        if progress_deadline.is_zero() {
            problem("progress_deadline", "must be longer than 0s".into());
        }
        let notify = match self.notify.as_deref().map(HttpUrl::parse) {
            Some(Ok(url)) => Some(url),
            Some(Err(why)) => {
                problem("notify", why);
                None
            }
            None => None,
        };
        if !problems.is_empty() {
            return Err(Problems(problems));
        }
        Ok(RolloutSpec {
            to: self.to,
            from: self.from,
            steps,
            step_interval: self.step_interval.unwrap_or(Duration::from_secs(60)),
            analysis,
            checks,
            on_failure: self.on_failure.unwrap_or(OnFailure::Rollback),
            progress_deadline,
            notify,
        })
    }
}

impl From<&RolloutSpec> for RawSpec<Step> {
    fn from(spec: &RolloutSpec) -> RawSpec<Step> {
        let a = &spec.analysis;
        RawSpec {
            to: spec.to.clone(),
            from: spec.from.clone(),
            steps: Some(spec.steps.clone()),
            step_interval: Some(spec.step_interval),
            analysis: Some(RawAnalysis {
                interval: Some(a.interval),
                min_requests: Some(a.min_requests),
                max_error_rate: Some(a.max_error_rate),
                max_p99_latency: a.max_p99_latency,
                max_latency_ratio: a.max_latency_ratio,
                failure_limit: Some(a.failure_limit),
            }),
            checks: Some(
                spec.checks
                    .iter()
                    .map(|c| RawCheck {
                        url: c.url.as_str().to_string(),
                        expect_status: Some(c.expect_status),
                        expect_body: c.expect_body.clone(),
                        timeout: Some(c.timeout),
                    })
                    .collect(),
            ),
            on_failure: Some(spec.on_failure),
            progress_deadline: Some(spec.progress_deadline),
            notify: spec.notify.as_ref().map(|u| u.as_str().to_string()),
        }
    }
}

/// Written in the request's own shape, defaults filled in.
impl Serialize for RolloutSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        RawSpec::<Step>::from(self).serialize(s)
    }
}

/// Read back through the same validation as a request (a state file may have been edited).
impl<'de> Deserialize<'de> for RolloutSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        RawSpec::<RawStep>::deserialize(d)?
            .validate()
            .map_err(|problems| de::Error::custom(problems.to_string().replace('\n', "; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<RolloutSpec, String> {
        RolloutSpec::from_json(body.as_bytes()).map_err(|p| p.to_string())
    }

    #[test]
    fn the_contracts_example_parses() {
        let spec = parse(
            r#"{"to": "green", "from": "blue", "steps": [1, 5, 25, 50, 100], "step_interval": "1m",
                "analysis": {"interval": "10s", "min_requests": 20, "max_error_rate": 0.01,
                             "max_p99_latency": "500ms", "max_latency_ratio": 1.5, "failure_limit": 0},
                "checks": [{"url": "http://127.0.0.1:9002/version", "expect_status": 200, "timeout": "2s"}],
                "on_failure": "rollback"}"#,
        )
        .unwrap();
        assert_eq!(spec.to, "green");
        assert_eq!(spec.from.as_deref(), Some("blue"));
        let weights: Vec<f64> = spec.steps.iter().filter_map(Step::weight).collect();
        assert_eq!(weights, [1.0, 5.0, 25.0, 50.0, 100.0]);
        assert_eq!(
            spec.analysis.max_p99_latency,
            Some(Duration::from_millis(500))
        );
        assert_eq!(spec.checks[0].url.port, 9002);
        assert_eq!(spec.checks[0].url.path, "/version");
        assert_eq!(spec.on_failure, OnFailure::Rollback);
    }

    #[test]
    fn defaults_follow_the_contract() {
        let spec = parse(r#"{"to": "green"}"#).unwrap();
        let weights: Vec<f64> = spec.steps.iter().filter_map(Step::weight).collect();
        assert_eq!(weights, DEFAULT_STEPS);
        assert_eq!(spec.analysis, Analysis::default());
        assert_eq!(spec.progress_deadline, Duration::from_secs(1800));
        assert_eq!(spec.on_failure, OnFailure::Rollback);
        assert_eq!(spec.hold(0), Hold::For(Duration::from_secs(60)));
    }

    #[test]
    fn steps_take_fractions_objects_and_gain_a_last_100() {
        let spec = parse(
            r#"{"to": "g", "steps": [0.5, {"weight": 5, "pause": "2m"}, {"weight": 50, "pause": "manual"}]}"#,
        )
        .unwrap();
        let weights: Vec<f64> = spec.steps.iter().filter_map(Step::weight).collect();
        assert_eq!(weights, [0.5, 5.0, 50.0, 100.0]);
        assert_eq!(spec.hold(1), Hold::For(Duration::from_secs(120)));
        assert_eq!(spec.hold(2), Hold::Manual);
    }

    #[test]
    fn problems_name_their_fields() {
        for (body, want) in [
            (
                r#"{"to": "g", "steps": [5, 5]}"#,
                "steps[1]: 5 does not increase",
            ),
            (
                r#"{"to": "g", "steps": [0]}"#,
                "steps[0]: 0 is not a percentage",
            ),
            (
                r#"{"to": "g", "steps": [150]}"#,
                "steps[0]: 150 is not a percentage",
            ),
            (r#"{"to": "g", "from": "g"}"#, "from: \"g\" is also \"to\""),
            (
                r#"{"to": "g", "checks": [{"url": "ftp://x/"}]}"#,
                "checks[0].url: \"ftp://x/\" is not an http:// or https:// URL",
            ),
            (
                r#"{"to": "g", "analysis": {"max_error_rate": 2}}"#,
                "analysis.max_error_rate: 2 is not a fraction",
            ),
            (
                r#"{"to": "g", "analysis": {"interval": "5x"}}"#,
                "analysis.interval: invalid duration",
            ),
            (
                r#"{"to": "g", "analysis": {"bogus": 1}}"#,
                "analysis.bogus: unknown field `bogus`",
            ),
            (
                r#"{"to": "g", "steps": [{"weight": 5, "pause": "soon"}]}"#,
                "steps[0].pause: invalid duration",
            ),
            (
                r#"{"to": "g", "on_failure": "panic"}"#,
                "on_failure: unknown variant `panic`",
            ),
            (r#"{"from": "b"}"#, "missing field `to`"),
            (r#"[1]"#, "the body must be a JSON object"),
        ] {
            let got = parse(body).unwrap_err();
            assert!(got.contains(want), "{body}: {got}");
        }
    }

    #[test]
    fn a_match_step_adds_its_conditions_and_keeps_the_weight_steps_rules() {
        let spec = parse(
            r#"{"to": "g", "steps": [{"match": {"headers": {"X-User-Group": "beta"}, "methods": ["get"]}, "pause": "5m"}, 10, {"match": {"cookies": {"plan": "pro"}}}, 50]}"#,
        )
        .unwrap();
        assert_eq!(spec.steps.len(), 5, "{:?}", spec.steps);
        let beta = spec.steps[0].matching().expect("a match step");
        assert_eq!(
            beta.headers,
            [(
                "x-user-group".to_string(),
                crate::ValueMatch::Exact("beta".into())
            )]
        );
        assert_eq!(beta.methods, ["GET"]);
        assert_eq!(spec.steps[0].weight(), None);
        assert_eq!(spec.hold(0), Hold::For(Duration::from_secs(300)));
        assert!(spec.steps[2].matching().is_some());
        // Weights increase among weight steps; the last 100 is added after them.
        let weights: Vec<f64> = spec.steps.iter().filter_map(Step::weight).collect();
        assert_eq!(weights, [10.0, 50.0, 100.0]);
        // A list of match steps alone still ends at 100.
        let only =
            parse(r#"{"to": "g", "steps": [{"match": {"query": {"preview": "1"}}}]}"#).unwrap();
        assert_eq!(only.steps.len(), 2);
        assert_eq!(only.steps[1].weight(), Some(100.0));
        assert_eq!(
            only.steps[0].target.to_string(),
            "match {\"query\":{\"preview\":\"1\"}}"
        );
    }

    #[test]
    fn bad_match_steps_name_their_fields() {
        for (body, want) in [
            (
                r#"{"to": "g", "steps": [{"match": {"headers": {"": "beta"}}}]}"#,
                "steps[0].match.headers.: header name must not be empty",
            ),
            (
                r#"{"to": "g", "steps": [5, {"match": {"cookies": {"a;b": "x"}}}]}"#,
                "steps[1].match.cookies.a;b: cookie name \"a;b\" has ';'",
            ),
            (
                r#"{"to": "g", "steps": [{"match": {"methods": ["FETCH"]}}]}"#,
                "steps[0].match.methods[0]: \"FETCH\" is not an HTTP method",
            ),
            (
                r#"{"to": "g", "steps": [{"match": {}}]}"#,
                "steps[0].match: must hold at least one condition",
            ),
            (
                r#"{"to": "g", "steps": [{"match": {"header": {"X": "y"}}}]}"#,
                "steps[0].match.header: unknown field `header`",
            ),
            (
                r#"{"to": "g", "steps": [{"weight": 5, "match": {"headers": {"X": "y"}}}]}"#,
                "steps[0]: a step either sets a weight or adds a match",
            ),
            (
                r#"{"to": "g", "steps": [50, {"match": {"headers": {"X": "y"}}}, 20]}"#,
                "steps[2]: 20 does not increase on the weight step before it (50)",
            ),
            (
                r#"{"to": "g", "steps": [100, {"match": {"headers": {"X": "y"}}}]}"#,
                "steps[1].match: comes after the 100% step",
            ),
            (
                r#"{"to": "g", "steps": [{"pause": "1m"}]}"#,
                "steps[0].weight: is required (or \"match\", for a match step)",
            ),
        ] {
            let got = parse(body).unwrap_err();
            assert!(got.contains(want), "{body}: {got}");
        }
    }

    #[test]
    fn urls_split_into_their_parts() {
        let url = HttpUrl::parse("http://[::1]:8080/a?b=1").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str()),
            ("::1", 8080, "/a?b=1")
        );
        let url = HttpUrl::parse("http://example.com?x").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str(), url.tls),
            ("example.com", 80, "/?x", false)
        );
        let url = HttpUrl::parse("https://deploy.example.com/hooks/1").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.path.as_str(), url.tls),
            ("deploy.example.com", 443, "/hooks/1", true)
        );
        let url = HttpUrl::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!((url.port, url.path.as_str(), url.tls), (8443, "/", true));
        assert_eq!(url.authority, "127.0.0.1:8443");
        for bad in [
            "http://",
            "https://",
            "http://a:0/",
            "http://a:x/",
            "http://u@a/",
            "http://a/ b",
            "ftp://a/",
        ] {
            assert!(HttpUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_spec_round_trips_through_its_json() {
        let spec = parse(
            r#"{"to": "g", "steps": [{"match": {"headers": {"X-User-Group": "beta", "X-Debug": "*"}, "cookies": {"plan": "pro"}, "query": {"preview": "1"}, "methods": ["GET"]}, "pause": "5m"},
                                     1, {"match": {"headers": {"X-Group": "b"}}}, {"weight": 50, "pause": "manual"}], "analysis": {"max_latency_ratio": 2},
                "checks": [{"url": "http://127.0.0.1:1/", "expect_body": "ok"}], "notify": "http://127.0.0.1:2/hook"}"#,
        )
        .unwrap();
        let json = serde_json::to_string(&spec).unwrap();
        let back: RolloutSpec = serde_json::from_str(&json).unwrap();
        assert_eq!(back, spec);
        // Written as requested: a match step as its `match` and `pause`, a bare weight as a
        // number.
        let steps = &serde_json::to_value(&spec).unwrap()["steps"];
        assert_eq!(
            steps[0],
            serde_json::json!({"match": {"headers": {"x-debug": "*", "x-user-group": "beta"}, "cookies": {"plan": "pro"}, "query": {"preview": "1"}, "methods": ["GET"]}, "pause": "5m"})
        );
        assert_eq!(steps[1], serde_json::json!(1.0));
        assert_eq!(
            steps[2],
            serde_json::json!({"match": {"headers": {"x-group": "b"}}})
        );
    }
}
