//! How correlation compares the values of one identity attribute: exactly (the default),
//! or after a declared normalisation — case folded, surrounding and repeated whitespace
//! removed, diacritics removed — so that `Ada.LOVELACE@Example.com` finds
//! `ada.lovelace@example.com` and `Zoë  Brontë` finds `zoe bronte`.
//!
//! A [`Normalisation`] is a set of [`Step`]s applied in one fixed order whatever order they
//! were declared in (case, diacritics, spaces), so one set always gives the same form. The
//! repository keeps the normalised form in its correlation index and remembers, per
//! attribute, the normalisation the index was built with ([`Normalisation::token`]).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// One normalisation step, as the config names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Step {
    /// Lower case (Unicode): `LOVELACE` → `lovelace`.
    Case,
    /// Whitespace trimmed at both ends and every run of it inside made one space.
    Spaces,
    /// Accents and other marks removed (`é` → `e`, `ø` → `o`, `ł` → `l`, `ș` → `s`), and the
    /// letters `æ`, `œ`, `ß` written out (`ae`, `oe`, `ss`), as the rules' `ascii_fold` does.
    Diacritics,
}

impl Step {
    /// Every step, in the order they are applied.
    pub const ALL: [Step; 3] = [Step::Case, Step::Diacritics, Step::Spaces];

    /// The config's name of the step.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Case => "case",
            Step::Spaces => "spaces",
            Step::Diacritics => "diacritics",
        }
    }
}

/// A set of normalisation steps; the empty set ([`Normalisation::EXACT`]) compares values
/// exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Normalisation {
    case: bool,
    spaces: bool,
    diacritics: bool,
}

impl Normalisation {
    /// No step: values compare exactly.
    pub const EXACT: Normalisation = Normalisation {
        case: false,
        spaces: false,
        diacritics: false,
    };

    /// Every step.
    pub const FULL: Normalisation = Normalisation {
        case: true,
        spaces: true,
        diacritics: true,
    };

    /// The set of `steps` (repeats and order do not matter).
    pub fn of(steps: &[Step]) -> Normalisation {
        let mut n = Normalisation::EXACT;
        for s in steps {
            match s {
                Step::Case => n.case = true,
                Step::Spaces => n.spaces = true,
                Step::Diacritics => n.diacritics = true,
            }
        }
        n
    }

    /// Whether it has no step.
    pub fn is_exact(self) -> bool {
        self == Normalisation::EXACT
    }

    /// Whether it has `step`.
    pub fn has(self, step: Step) -> bool {
        match step {
            Step::Case => self.case,
            Step::Spaces => self.spaces,
            Step::Diacritics => self.diacritics,
        }
    }

    /// Its steps, in the order they are applied.
    pub fn steps(self) -> Vec<Step> {
        Step::ALL.into_iter().filter(|s| self.has(*s)).collect()
    }

    /// The stored form: step names joined by commas in application order (`case,spaces`),
    /// the empty string for [`Normalisation::EXACT`].
    pub fn token(self) -> String {
        self.steps()
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Reads a [`Normalisation::token`]; `None` for a step name this build does not know.
    pub fn from_token(token: &str) -> Option<Normalisation> {
        let mut steps = Vec::new();
        for name in token.split(',').filter(|s| !s.is_empty()) {
            steps.push(Step::ALL.into_iter().find(|s| s.as_str() == name)?);
        }
        Some(Normalisation::of(&steps))
    }

    /// `value` in normalised form (borrowed when no step changes it).
    pub fn apply(self, value: &str) -> Cow<'_, str> {
        let mut out = Cow::Borrowed(value);
        if self.case && out.chars().any(char::is_uppercase) {
            out = Cow::Owned(out.to_lowercase());
        }
        if self.diacritics && !out.is_ascii() {
            out = Cow::Owned(strip_diacritics(&out));
        }
        if self.spaces && !spaces_are_normal(&out) {
            out = Cow::Owned(out.split_whitespace().collect::<Vec<_>>().join(" "));
        }
        out
    }
}

impl fmt::Display for Normalisation {
    /// `case, spaces`, or `exact`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_exact() {
            return f.write_str("exact");
        }
        let names: Vec<&str> = self.steps().iter().map(|s| s.as_str()).collect();
        f.write_str(&names.join(", "))
    }
}

/// The declared normalisation of each identity attribute (names folded to lower case);
/// an attribute not listed compares exactly.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Normalisations(BTreeMap<String, Normalisation>);

impl Normalisations {
    /// Declares `attribute` (any case) normalised by `n`; an exact one is not listed.
    pub fn declare(&mut self, attribute: &str, n: Normalisation) {
        let folded = attribute.to_lowercase();
        if n.is_exact() {
            self.0.remove(&folded);
        } else {
            self.0.insert(folded, n);
        }
    }

    /// The normalisation of `attribute` (any case).
    pub fn of(&self, attribute: &str) -> Normalisation {
        if self.0.is_empty() {
            return Normalisation::EXACT;
        }
        self.0
            .get(&attribute.to_lowercase())
            .copied()
            .unwrap_or_default()
    }

    /// Whether no attribute is normalised.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether `s` has no leading, trailing, repeated or non-space whitespace.
fn spaces_are_normal(s: &str) -> bool {
    let mut previous_space = true; // a leading space is not normal
    for c in s.chars() {
        if c.is_whitespace() {
            if previous_space || c != ' ' {
                return false;
            }
            previous_space = true;
        } else {
            previous_space = false;
        }
    }
    !previous_space || s.is_empty()
}

/// Canonical decomposition without its combining marks, the letters that have no
/// decomposition folded by hand, then recomposed (so that a Hangul syllable, say, stays
/// one character).
fn strip_diacritics(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.nfd().filter(|c| !is_combining_mark(*c)) {
        match fold_letter(c) {
            Some(folded) => out.push_str(folded),
            None => out.push(c),
        }
    }
    out.nfc().collect()
}

/// Letters with a stroke or a ligature, which canonical decomposition leaves as they are.
fn fold_letter(c: char) -> Option<&'static str> {
    Some(match c {
        'Ø' => "O",
        'ø' => "o",
        'Ł' => "L",
        'ł' => "l",
        'Đ' | 'Ð' => "D",
        'đ' | 'ð' => "d",
        'Ħ' => "H",
        'ħ' => "h",
        'Ŧ' => "T",
        'ŧ' => "t",
        'ı' => "i",
        'Æ' => "AE",
        'æ' => "ae",
        'Œ' => "OE",
        'œ' => "oe",
        'ß' => "ss",
        'Þ' => "TH",
        'þ' => "th",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(steps: &[Step], s: &str) -> String {
        Normalisation::of(steps).apply(s).into_owned()
    }

    #[test]
    fn each_step_alone() {
        assert_eq!(
            norm(&[Step::Case], "Ada.LOVELACE@Example.com"),
            "ada.lovelace@example.com"
        );
        assert_eq!(norm(&[Step::Case], "  Zoë "), "  zoë ");
        assert_eq!(norm(&[Step::Spaces], "  Zoë \t Brontë\n"), "Zoë Brontë");
        assert_eq!(norm(&[Step::Diacritics], "Zoë Brontë"), "Zoe Bronte");
        assert_eq!(
            norm(
                &[Step::Diacritics],
                "Søren Łukasz Đorđe Ștefan Nguyễn Straße Æsa"
            ),
            "Soren Lukasz Dorde Stefan Nguyen Strasse AEsa"
        );
        // Scripts without marks are left alone (and recomposed).
        assert_eq!(norm(&[Step::Diacritics], "김민준 山田"), "김민준 山田");
    }

    #[test]
    fn every_step_in_one_order_whatever_the_declaration() {
        let a = Normalisation::of(&[Step::Spaces, Step::Diacritics, Step::Case]);
        let b = Normalisation::of(&[Step::Case, Step::Spaces, Step::Diacritics, Step::Case]);
        assert_eq!(a, b);
        assert_eq!(a, Normalisation::FULL);
        assert_eq!(a.apply("  ZOË   Brontë "), "zoe bronte");
        assert_eq!(a.apply("zoe bronte"), "zoe bronte");
        // Dotted capital I: lower case gives i + a combining dot, which diacritics drops.
        assert_eq!(a.apply("İlker"), "ilker");
        assert_eq!(a.to_string(), "case, diacritics, spaces");
        assert_eq!(Normalisation::EXACT.to_string(), "exact");
    }

    #[test]
    fn unchanged_values_are_borrowed() {
        assert!(matches!(
            Normalisation::FULL.apply("ada lovelace"),
            Cow::Borrowed(_)
        ));
        assert!(matches!(
            Normalisation::EXACT.apply(" Ada "),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn spaces_detection() {
        for (s, normal) in [
            ("", true),
            ("a", true),
            ("a b", true),
            (" a", false),
            ("a ", false),
            ("a  b", false),
            ("a\tb", false),
            (" ", false),
        ] {
            assert_eq!(spaces_are_normal(s), normal, "{s:?}");
        }
    }

    #[test]
    fn tokens_round_trip() {
        for steps in [
            &[][..],
            &[Step::Case],
            &[Step::Spaces, Step::Case],
            &[Step::Diacritics, Step::Spaces, Step::Case],
        ] {
            let n = Normalisation::of(steps);
            assert_eq!(Normalisation::from_token(&n.token()), Some(n));
        }
        assert_eq!(Normalisation::EXACT.token(), "");
        assert_eq!(
            Normalisation::of(&[Step::Spaces, Step::Case]).token(),
            "case,spaces"
        );
        assert_eq!(Normalisation::from_token("case,soundex"), None);
    }

    #[test]
    fn declarations_fold_attribute_names() {
        let mut d = Normalisations::default();
        d.declare("Mail", Normalisation::of(&[Step::Case]));
        assert_eq!(d.of("MAIL"), Normalisation::of(&[Step::Case]));
        assert!(d.of("sn").is_exact());
        d.declare("mail", Normalisation::EXACT);
        assert!(d.is_empty());
    }
}
