//! Header conditions of rules, compiled once at load: parsed header names, anchored regexes.

use http::{HeaderMap, HeaderName};
use regex::bytes::Regex;

/// One compiled condition on one header.
#[derive(Debug, Clone)]
pub enum HeaderMatcher {
    /// The header's value equals these bytes.
    Exact(HeaderName, Box<[u8]>),
    /// The value starts with these bytes.
    Prefix(HeaderName, Box<[u8]>),
    /// The whole value matches (the pattern is anchored at compile time).
    Regex(HeaderName, Regex),
    /// The header is present (`true`) or absent (`false`).
    Present(HeaderName, bool),
}

impl HeaderMatcher {
    /// Whether `headers` satisfy this condition. A header that appears several times
    /// satisfies it when any of its values does.
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        match self {
            Self::Exact(name, v) => headers.get_all(name).iter().any(|h| h.as_bytes() == &**v),
            Self::Prefix(name, p) => headers
                .get_all(name)
                .iter()
                .any(|h| h.as_bytes().starts_with(p)),
            Self::Regex(name, re) => headers
                .get_all(name)
                .iter()
                .any(|h| re.is_match(h.as_bytes())),
            Self::Present(name, want) => headers.contains_key(name) == *want,
        }
    }

    /// A short description for `switchyard explain`.
    pub fn describe(&self) -> String {
        match self {
            Self::Exact(n, v) => format!("{n} == {:?}", String::from_utf8_lossy(v)),
            Self::Prefix(n, p) => format!("{n} starts with {:?}", String::from_utf8_lossy(p)),
            Self::Regex(n, re) => format!("{n} =~ {}", re.as_str()),
            Self::Present(n, true) => format!("{n} is present"),
            Self::Present(n, false) => format!("{n} is absent"),
        }
    }
}
