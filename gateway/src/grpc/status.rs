//! gRPC status on the wire, for both sides: the codes the gateway reasons about, the
//! `grpc-status`/`grpc-message` pair of a reply, `grpc-message` percent-coding, and
//! `grpc-timeout` values.

use std::time::Duration;

use http::HeaderMap;

/// gRPC status codes the gateway reasons about.
pub(crate) mod code {
    pub(crate) const OK: i32 = 0;
    pub(crate) const CANCELLED: i32 = 1;
    pub(crate) const UNKNOWN: i32 = 2;
    pub(crate) const INVALID_ARGUMENT: i32 = 3;
    pub(crate) const DEADLINE_EXCEEDED: i32 = 4;
    pub(crate) const NOT_FOUND: i32 = 5;
    pub(crate) const FAILED_PRECONDITION: i32 = 9;
    pub(crate) const RESOURCE_EXHAUSTED: i32 = 8;
    pub(crate) const UNIMPLEMENTED: i32 = 12;
    pub(crate) const INTERNAL: i32 = 13;
    pub(crate) const UNAVAILABLE: i32 = 14;
}

/// `grpc-status` and `grpc-message` from trailers, or from the headers of a trailers-only
/// response.
pub(crate) fn grpc_status(
    headers: Option<&HeaderMap>,
    trailers: Option<&HeaderMap>,
) -> (Option<i32>, String) {
    for map in [trailers, headers].into_iter().flatten() {
        if let Some(s) = map
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()?.parse().ok())
        {
            let message = map
                .get("grpc-message")
                .and_then(|v| v.to_str().ok())
                .map(percent_decode)
                .unwrap_or_default();
            return (Some(s), message);
        }
    }
    (None, String::new())
}

/// A `grpc-timeout` value: at most 8 digits and a unit.
pub(crate) fn grpc_timeout(d: Duration) -> String {
    let micros = d.as_micros();
    if micros < 100_000_000 {
        format!("{}u", micros.max(1))
    } else {
        format!("{}m", (d.as_millis()).min(99_999_999))
    }
}

/// Parses a `grpc-timeout` header (`100m`, `5S`, `250000u`).
pub(crate) fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// gRPC percent-encodes `grpc-message`; malformed escapes stay as they are.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| {
                std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            })
            .flatten();
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// gRPC percent-encodes `grpc-message`: everything outside printable ASCII, and `%`.
pub(crate) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_round_trip() {
        for d in [
            Duration::from_micros(1),
            Duration::from_millis(250),
            Duration::from_secs(600),
        ] {
            let back = parse_grpc_timeout(&grpc_timeout(d)).unwrap();
            assert!(
                back <= d && d - back < Duration::from_millis(1),
                "{d:?} -> {back:?}"
            );
        }
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("123456789m"), None, "at most 8 digits");
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
    }

    #[test]
    fn grpc_messages_are_percent_coded() {
        let m = "shape 100% wrong: é";
        assert_eq!(percent_decode(&percent_encode(m)), m);
        assert_eq!(percent_encode("a%b"), "a%25b");
        assert_eq!(percent_decode("bad %zz end %4"), "bad %zz end %4");
    }
}
