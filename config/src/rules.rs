//! The policy rules that both `switchyard check` (validation, with file and line) and the
//! gateway's compiler apply, written once: what validation accepts is exactly what runs.

use std::time::Duration;

/// The longest deadline a route (or `limits.default_deadline`) may set: 600s.
pub const MAX_DEADLINE: Duration = Duration::from_secs(600);
/// The longest a cached answer may serve: a year.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// The longest health-check interval, breaker ejection or reload debounce: an hour.
pub const MAX_PERIOD: Duration = Duration::from_secs(3600);
/// The longest connect or health-check timeout: a minute.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// A duration above 0 and at most `max`; `what` names it in the message.
pub fn within(what: &str, d: Duration, max: Duration) -> Result<Duration, String> {
    if !d.is_zero() && d <= max {
        Ok(d)
    } else {
        Err(format!(
            "{what} must be above 0 and at most {}s, got {}s",
            max.as_secs_f64(),
            d.as_secs_f64()
        ))
    }
}

/// A sticky split key, `header:NAME`: the header whose value is hashed, lowercased as
/// HTTP/2 sends header names.
pub fn sticky_header(key: &str) -> Result<String, String> {
    match key.strip_prefix("header:") {
        Some(h) if valid_header_name(h) => Ok(h.to_ascii_lowercase()),
        Some(h) => Err(format!("'{h}' is not a valid HTTP header name")),
        None => Err(format!(
            "'{key}' is not a sticky key: expected header:NAME, like header:x-user-id"
        )),
    }
}

/// Whether `s` is an HTTP header name (RFC 9110 token).
pub fn valid_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A cascade stage's confidence test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Accept {
    /// Every row's highest value is at least this.
    MaxProbability(f64),
    /// Every row's highest value minus its second highest is at least this.
    Margin(f64),
}

/// The test an `accept:` block asks for: exactly one of `max_probability` and `margin`,
/// above 0 and at most 1.
pub fn accept(max_probability: Option<f64>, margin: Option<f64>) -> Result<Accept, String> {
    let (test, x) = match (max_probability, margin) {
        (Some(x), None) => (Accept::MaxProbability(x), x),
        (None, Some(x)) => (Accept::Margin(x), x),
        _ => return Err("give exactly one of max_probability or margin".into()),
    };
    if x > 0.0 && x <= 1.0 {
        Ok(test)
    } else {
        Err(format!(
            "the threshold must be above 0 and at most 1, got {x}"
        ))
    }
}

/// A sampling percentage (above 0, at most 100) as a threshold out of 2^32, which a
/// request's random 32 bits are compared with.
pub fn percent_threshold(percent: f64) -> Result<u64, String> {
    if percent > 0.0 && percent <= 100.0 {
        Ok((percent / 100.0 * 4_294_967_296.0) as u64)
    } else {
        Err(format!(
            "percent must be above 0 and at most 100, got {percent}"
        ))
    }
}

/// The percentage a threshold out of 2^32 stands for (for explain and the admin API).
pub fn threshold_percent(threshold: u64) -> f64 {
    threshold as f64 / 4_294_967_296.0 * 100.0
}

/// A split weight: 1 to 1,000,000.
pub fn weight(w: i64) -> Result<u32, String> {
    match u32::try_from(w) {
        Ok(w) if (1..=1_000_000).contains(&w) => Ok(w),
        _ => Err(format!(
            "weight must be between 1 and 1000000, got {w}; remove the target to send it nothing"
        )),
    }
}

/// The regex a header rule runs: anchored at both ends (the whole value must match) and
/// over bytes, as header values are.
pub fn header_regex(re: &str) -> Result<regex::bytes::Regex, String> {
    regex::bytes::Regex::new(&format!("^(?:{re})$")).map_err(|e| {
        let first = e
            .to_string()
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_owned();
        format!("invalid regex '{re}': {first}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_accepts_and_refuses_with_its_message() {
        assert_eq!(sticky_header("header:X-User-Id").unwrap(), "x-user-id");
        assert!(
            sticky_header("cookie:a")
                .unwrap_err()
                .contains("expected header:NAME")
        );
        assert!(
            sticky_header("header:a b")
                .unwrap_err()
                .contains("not a valid HTTP header")
        );
        assert_eq!(accept(Some(0.7), None), Ok(Accept::MaxProbability(0.7)));
        assert_eq!(accept(None, Some(1.0)), Ok(Accept::Margin(1.0)));
        assert!(accept(Some(0.5), Some(0.5)).is_err());
        assert!(accept(None, None).is_err());
        assert!(accept(Some(0.0), None).unwrap_err().contains("above 0"));
        assert!(accept(Some(f64::NAN), None).is_err());
        assert_eq!(percent_threshold(100.0), Ok(1 << 32));
        assert_eq!(percent_threshold(25.0), Ok(1 << 30));
        assert!(percent_threshold(0.0).is_err() && percent_threshold(f64::NAN).is_err());
        assert_eq!(threshold_percent(1 << 30), 25.0);
        assert_eq!(weight(10), Ok(10));
        assert!(weight(0).is_err() && weight(1_000_001).is_err() && weight(-1).is_err());
        let re = header_regex("lin(ear)?").unwrap();
        assert!(
            re.is_match(b"linear") && !re.is_match(b"nonlinear"),
            "anchored"
        );
        assert!(
            header_regex("(")
                .unwrap_err()
                .starts_with("invalid regex '('")
        );
        // Over bytes: a pattern for a non-UTF-8 byte is a valid header rule.
        assert!(header_regex(r"(?-u:\xFF)").is_ok());
        // Extended mode would comment out the anchor: refused, as at run time.
        assert!(header_regex("(?x) premium # note").is_err());
        assert_eq!(
            within("ttl", Duration::from_secs(60), MAX_CACHE_TTL),
            Ok(Duration::from_secs(60))
        );
        assert_eq!(
            within("deadline", Duration::from_secs(700), MAX_DEADLINE).unwrap_err(),
            "deadline must be above 0 and at most 600s, got 700s"
        );
        assert!(within("interval", Duration::ZERO, MAX_PERIOD).is_err());
    }
}
