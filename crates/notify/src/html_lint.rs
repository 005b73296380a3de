//! Where an HTML template puts a value that autoescaping cannot make safe.
//!
//! HTML autoescaping (minijinja's, for `html:` parts) escapes `<`, `>`, `&`, `"` and `'`: a
//! value can neither open a tag nor leave a *quoted* attribute. It does not help where the
//! value is read as something else: an unquoted attribute (a space starts a new attribute:
//! `<a title={{ x }}>` with `x = "a onmouseover=…"`), a URL attribute whose whole value
//! comes from the data (`href="{{ x }}"` with `x = "javascript:…"`), a `javascript:` URL,
//! an event handler attribute (`onclick="…{{ x }}…"`), or the inside of a `<script>` or
//! `<style>` element. `idsync check` reports each such place with the template's line, so
//! the author can quote the attribute or build the URL from a fixed prefix.
//!
//! A small scanner, not a full HTML parser: it follows tags, attribute names, quoted and
//! unquoted values and raw-text elements, and skips template tags (`{% %}`, `{# #}`).

/// Why a value's place in the template is unsafe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hazard {
    /// In an attribute value without quotes.
    UnquotedAttribute,
    /// At the start of a URL attribute (`href`, `src`, `action`, …): the value decides the
    /// scheme, `javascript:` included.
    WholeUrl,
    /// Inside a `javascript:` URL.
    ScriptUrl,
    /// Inside an event handler attribute (`onclick`, …).
    EventHandler,
    /// Inside a `<script>` or `<style>` element.
    ScriptOrStyle,
}

impl Hazard {
    /// What to tell the template's author.
    pub fn explain(self) -> &'static str {
        match self {
            Hazard::UnquotedAttribute => {
                "a value in an unquoted attribute: autoescaping does not stop a space from starting a new attribute; put the attribute in double quotes"
            }
            Hazard::WholeUrl => {
                "a value at the start of a URL attribute decides its scheme (a javascript: URL would run); start the URL with a fixed https:// prefix"
            }
            Hazard::ScriptUrl => {
                "a value inside a javascript: URL runs as script; autoescaping does not apply to it"
            }
            Hazard::EventHandler => {
                "a value inside an event handler attribute runs as script; autoescaping does not apply to it"
            }
            Hazard::ScriptOrStyle => {
                "a value inside <script> or <style> is read as code; autoescaping does not apply to it"
            }
        }
    }
}

/// A hazardous place: the 1-based line of the template and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Line of the `{{`.
    pub line: usize,
    /// Why.
    pub hazard: Hazard,
}

/// Attributes whose value is a URL.
const URL_ATTRIBUTES: &[&str] = &[
    "href",
    "src",
    "action",
    "formaction",
    "background",
    "poster",
    "xlink:href",
    "srcset",
];

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Text,
    /// Inside `<script>` or `<style>` until its end tag.
    RawText(&'static str),
    /// Reading a tag's name.
    TagName(String),
    /// Inside a tag, between attributes.
    InTag,
    AttrName(String),
    /// After an attribute name and some spaces: `=` may still follow.
    AfterName(String),
    /// After `name=`, before the value.
    BeforeValue(String),
    Quoted {
        quote: char,
        name: String,
        value: String,
    },
    Unquoted,
}

/// Every hazardous place of `template` (see the module doc).
pub fn scan(template: &str) -> Vec<Finding> {
    let mut found = Vec::new();
    let mut state = State::Text;
    let mut pending_raw: Option<&'static str> = None;
    let mut line = 1;
    let mut rest = template;
    while let Some(c) = rest.chars().next() {
        // Template tags: an expression is where the hazard is; statements and comments
        // are skipped whole.
        if let Some(after) = rest.strip_prefix("{{") {
            if let Some(hazard) = hazard_at(&state) {
                found.push(Finding { line, hazard });
            }
            let end = after.find("}}").map_or(after.len(), |i| i + 2);
            line += after[..end].matches('\n').count();
            rest = &after[end..];
            if let State::Quoted { value, .. } = &mut state {
                value.push('x');
            }
            if let State::BeforeValue(_) = state {
                state = State::Unquoted;
            }
            continue;
        }
        if let Some(after) = rest.strip_prefix("{%").or_else(|| rest.strip_prefix("{#")) {
            let close = if rest.starts_with("{%") { "%}" } else { "#}" };
            let end = after.find(close).map_or(after.len(), |i| i + 2);
            line += after[..end].matches('\n').count();
            rest = &after[end..];
            continue;
        }
        if c == '\n' {
            line += 1;
        }
        rest = &rest[c.len_utf8()..];
        state = match state {
            State::Text if c == '<' => State::TagName(String::new()),
            State::Text => State::Text,
            State::RawText(end) => {
                if c == '<' && rest.to_ascii_lowercase().starts_with(&format!("/{end}")) {
                    State::Text
                } else {
                    State::RawText(end)
                }
            }
            State::TagName(mut name) => {
                if c.is_ascii_alphanumeric() || (c == '/' && name.is_empty()) {
                    name.push(c.to_ascii_lowercase());
                    State::TagName(name)
                } else if name.is_empty() || name == "/" {
                    State::Text
                } else {
                    pending_raw = match name.as_str() {
                        "script" => Some("script"),
                        "style" => Some("style"),
                        _ => None,
                    };
                    end_of_tag_or(c, &mut pending_raw, State::InTag)
                }
            }
            State::InTag => {
                if c.is_whitespace() || c == '/' {
                    State::InTag
                } else {
                    end_of_tag_or(
                        c,
                        &mut pending_raw,
                        State::AttrName(c.to_ascii_lowercase().to_string()),
                    )
                }
            }
            State::AttrName(mut name) => {
                if c == '=' {
                    State::BeforeValue(name)
                } else if c.is_whitespace() {
                    State::AfterName(name)
                } else if c == '/' {
                    State::InTag
                } else {
                    name.push(c.to_ascii_lowercase());
                    end_of_tag_or(c, &mut pending_raw, State::AttrName(name))
                }
            }
            State::AfterName(name) => match c {
                '=' => State::BeforeValue(name),
                c if c.is_whitespace() => State::AfterName(name),
                '/' => State::InTag,
                _ => end_of_tag_or(
                    c,
                    &mut pending_raw,
                    State::AttrName(c.to_ascii_lowercase().to_string()),
                ),
            },
            State::BeforeValue(name) => match c {
                '"' | '\'' => State::Quoted {
                    quote: c,
                    name,
                    value: String::new(),
                },
                c if c.is_whitespace() => State::BeforeValue(name),
                _ => end_of_tag_or(c, &mut pending_raw, State::Unquoted),
            },
            State::Quoted {
                quote,
                name,
                mut value,
            } => {
                if c == quote {
                    State::InTag
                } else {
                    value.push(c);
                    State::Quoted { quote, name, value }
                }
            }
            State::Unquoted => {
                if c.is_whitespace() {
                    State::InTag
                } else {
                    end_of_tag_or(c, &mut pending_raw, State::Unquoted)
                }
            }
        };
    }
    found
}

/// At `>` the tag ends (into the raw text of a `<script>`/`<style>`, or text); otherwise
/// `next`.
fn end_of_tag_or(c: char, pending_raw: &mut Option<&'static str>, next: State) -> State {
    if c != '>' {
        return next;
    }
    match pending_raw.take() {
        Some(end) => State::RawText(end),
        None => State::Text,
    }
}

/// The hazard of an expression met in `state`, if any.
fn hazard_at(state: &State) -> Option<Hazard> {
    match state {
        State::RawText(_) => Some(Hazard::ScriptOrStyle),
        State::BeforeValue(_) | State::Unquoted => Some(Hazard::UnquotedAttribute),
        State::Quoted { name, value, .. } => {
            let start = value.trim_start().to_ascii_lowercase();
            if name.starts_with("on") {
                Some(Hazard::EventHandler)
            } else if start.starts_with("javascript:") {
                Some(Hazard::ScriptUrl)
            } else if URL_ATTRIBUTES.contains(&name.as_str()) && start.is_empty() {
                Some(Hazard::WholeUrl)
            } else {
                None
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hazards(t: &str) -> Vec<(usize, Hazard)> {
        scan(t).into_iter().map(|f| (f.line, f.hazard)).collect()
    }

    #[test]
    fn safe_places_are_not_reported() {
        let t = "<p class=\"x\">Hello {{ name }}</p>\n<a href=\"https://intranet/{{ id }}\" title='{{ t }}'>x</a>{% if a %}<b>{{ a }}</b>{% endif %}";
        assert_eq!(hazards(t), []);
    }

    #[test]
    fn unsafe_places_are_reported_with_their_line() {
        let t = "<p>\n<a title={{ t }}>x</a>\n<a href=\"{{ url }}\">y</a>\n<a href=\"javascript:go('{{ id }}')\">z</a>\n<b onclick=\"f({{ x }})\">w</b>\n<script>var n = \"{{ name }}\";</script><p>{{ safe }}</p>\n<img src = {{ pic }} alt=\"\">";
        assert_eq!(
            hazards(t),
            [
                (2, Hazard::UnquotedAttribute),
                (3, Hazard::WholeUrl),
                (4, Hazard::ScriptUrl),
                (5, Hazard::EventHandler),
                (6, Hazard::ScriptOrStyle),
                (7, Hazard::UnquotedAttribute),
            ]
        );
    }
}
