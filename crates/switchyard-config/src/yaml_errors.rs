//! serde_yaml's errors as sentences for an operator: the field path first (the unknown field
//! itself, not its parent), what was expected in the file's words (`a whole number`, not
//! `u32`), and the line. A syntax or type error stops the parse, so nothing after it can be
//! checked: the message says so, instead of promising a complete list.

use crate::{Problem, Problems};

/// Said after a problem that stopped the parse.
pub const NOT_CHECKED_FURTHER: &str = "problems after this one are not checked until it is fixed";

/// The one problem a failed parse of the file gives.
pub(crate) fn yaml_problem(e: serde_yaml::Error) -> Problems {
    let location = e.location().map(|l| (l.line(), l.column()));
    let text = e.to_string();
    let (path, message) = match text.split_once(": ") {
        Some((path, rest)) if is_field_path(path) => (path.to_string(), rest.to_string()),
        _ => (String::new(), text),
    };
    let message = strip_location(&message);
    let (path, sentence) = sentence(&path, message);
    let at = match location {
        Some((line, column)) => format!(" (line {line}, column {column})"),
        None => String::new(),
    };
    Problems(vec![Problem {
        path,
        message: format!("{sentence}{at}; {NOT_CHECKED_FURTHER}"),
    }])
}

fn is_field_path(s: &str) -> bool {
    !s.is_empty()
        && !s.contains(' ')
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.[]".contains(c))
}

/// serde_yaml's ` at line L column C`: the error's own position is said once, at the end,
/// from the error itself; a later one (where the enclosing block starts, as in `..., while
/// parsing a block mapping at line 2 column 3`) is kept as words.
fn strip_location(message: &str) -> String {
    const AT: &str = " at line ";
    let Some(first) = message.find(AT) else {
        return message.to_string();
    };
    let mut out = message[..first].to_string();
    let mut rest = skip_position(&message[first + AT.len()..]);
    if let Some(tail) = rest.strip_prefix(", ") {
        out.push(' ');
        rest = tail;
    }
    while let Some(at) = rest.find(AT) {
        out.push_str(&rest[..at]);
        let position = &rest[at + AT.len()..];
        let after = skip_position(position);
        let spelled = position[..position.len() - after.len()].replacen(" column ", ", column ", 1);
        out.push_str(&format!(" that starts at line {spelled}"));
        rest = after;
    }
    out.push_str(rest);
    out
}

/// What follows `L column C`.
fn skip_position(text: &str) -> &str {
    let digits = |t: &str| t.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let after_line = &text[text.len() - digits(text)..];
    match after_line.strip_prefix(" column ") {
        Some(column) => &column[column.len() - digits(column)..],
        None => after_line,
    }
}

/// The field path and the sentence for one serde message.
fn sentence(path: &str, message: String) -> (String, String) {
    let join = |field: &str| {
        if path.is_empty() {
            field.to_string()
        } else {
            format!("{path}.{field}")
        }
    };
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, expected)) = rest.split_once('`') {
            let expected = expected
                .trim_start_matches(", expected ")
                .trim_start_matches("one of ");
            let expected = unquote(expected);
            let hint = if expected.is_empty() || expected == "there are no fields" {
                "this section takes no fields".to_string()
            } else {
                format!("expected one of {expected}")
            };
            return (join(field), format!("unknown field; {hint}"));
        }
    }
    if let Some(rest) = message.strip_prefix("missing field `") {
        if let Some((field, _)) = rest.split_once('`') {
            return (join(field), "is required".to_string());
        }
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        if let Some((value, expected)) = rest.split_once('`') {
            let expected = unquote(
                expected
                    .trim_start_matches(", expected ")
                    .trim_start_matches("one of "),
            );
            return (
                path.to_string(),
                format!("unknown value {value:?}; expected one of {expected}"),
            );
        }
    }
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(prefix) {
            if let Some((got, expected)) = rest.split_once(", expected ") {
                return (
                    path.to_string(),
                    format!(
                        "expected {}, got {}",
                        expected_words(expected),
                        got_words(got)
                    ),
                );
            }
        }
    }
    if path.is_empty() {
        // serde_yaml's own parser messages: `did not find expected node content ...`.
        return (String::new(), format!("YAML syntax error: {message}"));
    }
    (path.to_string(), message)
}

/// `` `a`, `b` `` as `a, b`.
fn unquote(list: &str) -> String {
    list.replace('`', "")
}

/// What serde expected, in the file's words.
fn expected_words(expected: &str) -> String {
    let words = match expected {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number (0 or more)",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        "a string" | "string" | "a borrowed string" | "path string" => "a string",
        "a sequence" => "a list",
        "a map" | "a mapping of names" => "a mapping (name: value lines)",
        other if other.starts_with("struct ") => "a mapping (name: value lines)",
        other => return other.to_string(),
    };
    words.to_string()
}

/// What the file had, as serde describes it (`string "x"`, ``integer `-3` ``, `map`).
fn got_words(got: &str) -> String {
    if let Some(text) = got.strip_prefix("string ") {
        return format!("the string {text}");
    }
    for prefix in ["integer ", "floating point ", "boolean "] {
        if let Some(value) = got.strip_prefix(prefix) {
            return value.trim_matches('`').to_string();
        }
    }
    match got {
        "map" => "a mapping".into(),
        "sequence" => "a list".into(),
        "unit value" | "unit" => "nothing (an empty value)".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    fn error(yaml: &str) -> String {
        match Config::from_yaml(yaml) {
            Ok(_) => panic!("accepted:\n{yaml}"),
            Err(problems) => {
                assert_eq!(problems.0.len(), 1, "{problems}");
                problems.to_string()
            }
        }
    }

    #[test]
    fn type_errors_speak_the_files_words_with_path_and_line() {
        let cases = [
            (
                "server:\n  threads: x\n",
                "server.threads: expected a whole number (0 or more), got the string \"x\" (line 2, column 12)",
            ),
            (
                "upstreams:\n  a:\n    backends:\n      - address: 127.0.0.1:1\n        weight: -3\n",
                "upstreams.a.backends[0].weight: expected a whole number (0 or more), got -3 (line 5, column 17)",
            ),
            (
                "server:\n  debug_headers: maybe\n",
                "server.debug_headers: expected true or false, got the string \"maybe\" (line 2, column 18)",
            ),
            (
                "listeners:\n  address: 127.0.0.1:8080\n",
                "listeners: expected a list, got a mapping (line 2, column 3)",
            ),
            (
                "upstreams:\n  a:\n    algorithm: fast\n",
                "upstreams.a.algorithm: unknown value \"fast\"; expected one of round_robin, weighted_round_robin, least_connections, ip_hash, hash (line 3, column 16)",
            ),
        ];
        for (yaml, want) in cases {
            assert_eq!(
                error(yaml),
                format!("{want}; problems after this one are not checked until it is fixed"),
                "{yaml}"
            );
        }
    }

    #[test]
    fn unknown_and_missing_fields_name_the_field_itself() {
        assert_eq!(
            error("bogus: 1\nupstreams: {}\n"),
            "bogus: unknown field; expected one of server, listeners, admin, metrics, state_file, state_store, access_log, upstreams, routes (line 1, column 1); problems after this one are not checked until it is fixed"
        );
        assert_eq!(
            error("listeners:\n  - address: 127.0.0.1:8080\n    wieght: 3\n"),
            "listeners[0].wieght: unknown field; expected one of address, tls, http2, h2c, redirect_https (line 3, column 5); problems after this one are not checked until it is fixed"
        );
        assert_eq!(
            error("admin:\n  token_file: /x\n"),
            "admin.address: is required (line 2, column 3); problems after this one are not checked until it is fixed"
        );
    }

    #[test]
    fn syntax_errors_say_so_with_the_line() {
        assert_eq!(
            error("upstreams:\n  a:\n    backends: [\n"),
            "YAML syntax error: did not find expected node content while parsing a flow node (line 4, column 1); problems after this one are not checked until it is fixed"
        );
        assert_eq!(
            error("upstreams:\n  a:\n    backends:\n  - [\n"),
            "YAML syntax error: did not find expected key while parsing a block mapping that starts at line 2, column 3 (line 4, column 3); problems after this one are not checked until it is fixed"
        );
    }
}
