//! A small YAML emitter for the generated manifests: block style, every string scalar
//! double-quoted (JSON string syntax, which is valid YAML), keys plain only when they
//! cannot be read as anything but a string.

/// A YAML node.
#[derive(Debug, Clone, PartialEq)]
pub enum Yaml {
    /// A string, always emitted double-quoted.
    Str(String),
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A sequence.
    Seq(Vec<Yaml>),
    /// A mapping, in insertion order.
    Map(Vec<(String, Yaml)>),
}

/// `Yaml::Str`.
pub fn s(v: impl Into<String>) -> Yaml {
    Yaml::Str(v.into())
}

/// A mapping from `(key, value)` pairs.
pub fn map<K: Into<String>>(entries: impl IntoIterator<Item = (K, Yaml)>) -> Yaml {
    Yaml::Map(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
}

/// A sequence of strings.
pub fn strs<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Yaml {
    Yaml::Seq(items.into_iter().map(|i| Yaml::Str(i.into())).collect())
}

/// Whether `c` must be written as an escape: outside YAML's printable set (YAML 1.2 §5.1:
/// x9, xA, xD, x20-x7E, x85, xA0-xD7FF, xE000-xFFFD, x10000-x10FFFF), which makes the whole
/// stream unreadable, or a line break to YAML 1.1 readers (x85, x2028, x2029), which fold it
/// into a space inside a quoted scalar.
fn needs_escape(c: char) -> bool {
    let printable = matches!(
        c,
        '\t' | '\n' | '\r'
            | '\u{20}'..='\u{7e}'
            | '\u{85}'
            | '\u{a0}'..='\u{d7ff}'
            | '\u{e000}'..='\u{fffd}'
            | '\u{10000}'..
    );
    !printable || matches!(c, '\u{85}' | '\u{2028}' | '\u{2029}')
}

/// A double-quoted scalar (JSON string syntax is a subset of YAML's double-quoted style),
/// with every character [`needs_escape`] written as `\uXXXX`.
pub fn quote(v: &str) -> String {
    let json = serde_json::to_string(v).unwrap_or_else(|_| "\"\"".into());
    if !json.chars().any(needs_escape) {
        return json;
    }
    // JSON escapes are ASCII, so no escaped character is part of one.
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if needs_escape(c) {
            // All of them are in the Basic Multilingual Plane.
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// Words a YAML 1.1 or 1.2 reader would not take as a plain string.
const SPECIAL: &[&str] = &[
    "y", "n", "yes", "no", "on", "off", "true", "false", "null", "~",
];

fn key(k: &str) -> String {
    let plain = !k.is_empty()
        && k.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
        && !SPECIAL.contains(&k.to_ascii_lowercase().as_str());
    if plain { k.to_string() } else { quote(k) }
}

fn scalar(v: &Yaml) -> Option<String> {
    match v {
        Yaml::Str(t) => Some(quote(t)),
        Yaml::Int(i) => Some(i.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        Yaml::Seq(items) if items.is_empty() => Some("[]".into()),
        Yaml::Map(entries) if entries.is_empty() => Some("{}".into()),
        _ => None,
    }
}

fn emit(out: &mut String, v: &Yaml, indent: usize) {
    let pad = " ".repeat(indent);
    match v {
        Yaml::Map(entries) => {
            for (k, v) in entries {
                match scalar(v) {
                    Some(sc) => out.push_str(&format!("{pad}{}: {sc}\n", key(k))),
                    None => {
                        out.push_str(&format!("{pad}{}:\n", key(k)));
                        emit(out, v, indent + 2);
                    }
                }
            }
        }
        Yaml::Seq(items) => {
            for item in items {
                match scalar(item) {
                    Some(sc) => out.push_str(&format!("{pad}- {sc}\n")),
                    None => {
                        // Nested block: render it at indent + 2, then put "- " in place of
                        // the first line's indentation.
                        let mut inner = String::new();
                        emit(&mut inner, item, indent + 2);
                        out.push_str(&pad);
                        out.push_str("- ");
                        out.push_str(&inner[indent + 2..]);
                    }
                }
            }
        }
        other => {
            if let Some(sc) = scalar(other) {
                out.push_str(&format!("{pad}{sc}\n"));
            }
        }
    }
}

/// Renders one document (a top-level mapping or sequence), without the `---` marker.
pub fn render(v: &Yaml) -> String {
    let mut out = String::new();
    emit(&mut out, v, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_strings_and_tricky_keys() {
        let doc = map([
            ("plain", s("yes")),
            ("on", s("x")),
            ("1abc", Yaml::Int(3)),
            ("k", s("a \"b\"\n: #c")),
            ("list", strs(["-1", "null"])),
            ("empty", Yaml::Seq(vec![])),
            (
                "nested",
                Yaml::Seq(vec![map([("a", s("1")), ("b", Yaml::Bool(true))])]),
            ),
        ]);
        let out = render(&doc);
        assert_eq!(
            out,
            "plain: \"yes\"\n\"on\": \"x\"\n\"1abc\": 3\nk: \"a \\\"b\\\"\\n: #c\"\nlist:\n  - \"-1\"\n  - \"null\"\nempty: []\nnested:\n  - a: \"1\"\n    b: true\n"
        );
    }

    #[test]
    fn characters_outside_the_printable_set_are_escaped() {
        let raw = "a\u{7f}\u{80}\u{85}\u{9f}\u{2028}\u{2029}\u{fffe}\u{ffff}b";
        assert_eq!(
            quote(raw),
            "\"a\\u007f\\u0080\\u0085\\u009f\\u2028\\u2029\\ufffe\\uffffb\""
        );
        // Printable characters stay as they are, including outside the BMP.
        let printable = "é\u{a0}\u{d7ff}\u{e000}\u{fffd}\u{10000}😀\u{10ffff}";
        assert_eq!(quote(printable), format!("\"{printable}\""));
        // The output is still a JSON string (a subset of YAML's double-quoted style) that
        // reads back as the input.
        for v in [raw, printable, "x\u{0}\t\"\\\u{1b}"] {
            let q = quote(v);
            assert!(!q.chars().any(needs_escape), "{q}");
            assert_eq!(serde_json::from_str::<String>(&q).unwrap(), v);
        }
    }

    #[test]
    fn nested_sequences_of_sequences() {
        let doc = map([(
            "x",
            Yaml::Seq(vec![Yaml::Seq(vec![s("a"), s("b")]), s("c")]),
        )]);
        assert_eq!(render(&doc), "x:\n  - - \"a\"\n    - \"b\"\n  - \"c\"\n");
    }
}
