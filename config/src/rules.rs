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

impl Accept {
    /// The test in words, on the named output: `top value of probabilities >= 0.9`.
    pub fn describe(&self, output: &str) -> String {
        match self {
            Self::MaxProbability(x) => format!("top value of {output} >= {x}"),
            Self::Margin(x) => format!("top-two margin of {output} >= {x}"),
        }
    }
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

/// Where a pipeline mapping reads a tensor from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client's request.
    Request,
    /// The step at this index.
    Step(usize),
}

/// A pipeline step's name: 1 to 64 letters, digits, `_` or `-` (a mapping splits
/// `STEP.TENSOR` at its first `.`), and not `request`.
pub fn step_name(name: &str) -> Result<(), String> {
    if name == "request" {
        return Err(
            "'request' names the client's request in mappings; call the step something else".into(),
        );
    }
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{name}' is not a step name: use 1 to 64 letters, digits, '_' or '-'"
        ))
    }
}

/// Parses a pipeline mapping `request.NAME` or `STEP.NAME` into its source and tensor.
/// `steps` are the pipeline's step names in order; `reader` is the index of the step that
/// reads (`None`: the pipeline's `outputs`, which read any step but not the request).
pub fn mapping<'a>(
    text: &'a str,
    steps: &[&str],
    reader: Option<usize>,
) -> Result<(Source, &'a str), String> {
    let Some((from, tensor)) = text
        .split_once('.')
        .filter(|(f, t)| !f.is_empty() && !t.is_empty())
    else {
        return Err(format!(
            "'{text}' is not a tensor reference: expected request.TENSOR or STEP.TENSOR"
        ));
    };
    if from == "request" {
        return match reader {
            Some(_) => Ok((Source::Request, tensor)),
            None => Err(format!(
                "'{text}': the pipeline's outputs come from its steps, not from the request"
            )),
        };
    }
    let Some(i) = steps.iter().position(|s| *s == from) else {
        return Err(format!(
            "'{text}' reads step '{from}', but the pipeline has no such step; its steps: {}",
            steps.join(", ")
        ));
    };
    match reader {
        Some(r) if i == r => Err(format!(
            "'{text}': step '{from}' cannot read its own outputs; read the request or an earlier step"
        )),
        Some(r) if i > r => Err(format!(
            "'{text}' reads step '{from}', which runs after this one (step {} of {}); a step reads the request or earlier steps",
            i + 1,
            steps.len()
        )),
        _ => Ok((Source::Step(i), tensor)),
    }
}

/// A switch case's probability threshold: above 0 and at most 1.
pub fn below(what: &str, x: f64) -> Result<f64, String> {
    if x > 0.0 && x <= 1.0 {
        Ok(x)
    } else {
        Err(format!("{what} must be above 0 and at most 1, got {x}"))
    }
}

/// A switch case's `argmax` list: indices, none negative, at least one.
pub fn argmax_classes(classes: &[i64]) -> Result<Box<[usize]>, String> {
    if classes.is_empty() {
        return Err("argmax needs at least one class index".into());
    }
    classes
        .iter()
        .map(|&c| {
            usize::try_from(c).map_err(|_| format!("argmax class indices start at 0, got {c}"))
        })
        .collect()
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
        let steps = ["features", "classify"];
        assert_eq!(
            mapping("request.INPUT__0", &steps, Some(0)),
            Ok((Source::Request, "INPUT__0"))
        );
        assert_eq!(
            mapping("features.input.1", &steps, Some(1)),
            Ok((Source::Step(0), "input.1")),
            "split at the first dot: tensor names may have dots"
        );
        assert!(
            mapping("classify.x", &steps, Some(0))
                .unwrap_err()
                .contains("runs after this one (step 2 of 2)")
        );
        assert!(
            mapping("features.x", &steps, Some(0))
                .unwrap_err()
                .contains("its own outputs")
        );
        assert!(
            mapping("nope.x", &steps, Some(1))
                .unwrap_err()
                .contains("its steps: features, classify")
        );
        assert!(
            mapping("features", &steps, Some(1))
                .unwrap_err()
                .contains("expected request.TENSOR")
        );
        assert!(
            mapping("request.x", &steps, None)
                .unwrap_err()
                .contains("not from the request")
        );
        assert_eq!(
            mapping("classify.p", &steps, None),
            Ok((Source::Step(1), "p"))
        );
        assert!(
            step_name("request").is_err() && step_name("a.b").is_err() && step_name("").is_err()
        );
        assert!(step_name("pca-1_x").is_ok());
        assert!(below("margin_below", 0.0).is_err() && below("margin_below", 1.0).is_ok());
        assert_eq!(argmax_classes(&[3, 8]).as_deref(), Ok(&[3usize, 8][..]));
        assert!(argmax_classes(&[]).is_err() && argmax_classes(&[-1]).is_err());
    }
}
