//! The access log (`access_log:` in gateway.yaml): one JSON line per inference request,
//! written by a thread of its own. The request path formats its line and offers it to a
//! bounded queue without waiting: when the writer falls behind (a slow disk, a blocked
//! stderr pipe) lines beyond the queue are dropped and counted in
//! `switchyard_access_log_dropped_total`, and no request is held up.

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;
use serde::Serialize;

/// The sending side; the writer thread owns the other.
#[derive(Debug)]
pub(crate) struct AccessLog {
    lines: SyncSender<Vec<u8>>,
    dropped: IntCounter,
    written: IntCounter,
}

/// One request, as its line says it.
#[derive(Debug, Serialize)]
pub(crate) struct Line<'a> {
    /// RFC 3339, milliseconds, UTC: when the request arrived.
    pub(crate) time: String,
    pub(crate) route: &'a str,
    /// The plan decided (a target's or named plan's name, or its kind).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) plan: Option<&'a str>,
    /// `x-switchyard-target`: what answered (or was last tried).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) target: Option<&'a str>,
    pub(crate) protocol: &'static str,
    /// The HTTP status (REST) or what it would be (gRPC, beside `grpc_status`).
    pub(crate) status: u16,
    pub(crate) grpc_status: i32,
    pub(crate) latency_ms: f64,
    /// The `result` label of `switchyard_requests_total`.
    pub(crate) result: &'static str,
    pub(crate) policy_version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cache: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cascade: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cascade_stage: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) shadow: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) rollout: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pipeline: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) switch: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) overflow: Option<&'a str>,
    /// 32 hex digits, when the request is in a trace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) trace_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
}

impl AccessLog {
    /// Opens `path` (`stderr`, or a file appended to) and starts the writer thread.
    pub(crate) fn open(
        path: &str,
        buffer: usize,
        dropped: IntCounter,
        written: IntCounter,
    ) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = if path == "stderr" {
            Box::new(std::io::stderr())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| {
                        std::io::Error::new(e.kind(), format!("access_log.path {path}: {e}"))
                    })?,
            )
        };
        let (lines, rx) = sync_channel(buffer.max(1));
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx, out))?;
        Ok(Self {
            lines,
            dropped,
            written,
        })
    }

    /// Offers `line` to the writer; drops it (counted) when the queue is full.
    pub(crate) fn write(&self, line: &Line<'_>) {
        let mut bytes = Vec::with_capacity(384);
        if serde_json::to_writer(&mut bytes, line).is_err() {
            return;
        }
        bytes.push(b'\n');
        match self.lines.try_send(bytes) {
            Ok(()) => self.written.inc(),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// The writer: lines are written through a buffer that is flushed whenever the queue
/// runs empty, so a quiet gateway's lines are on disk at once and a busy one's go out in
/// large writes.
fn write_lines(rx: Receiver<Vec<u8>>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(line) = rx.recv() {
        let _ = out.write_all(&line);
        while let Ok(more) = rx.try_recv() {
            let _ = out.write_all(&more);
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

/// `time` of a line: RFC 3339 in UTC with milliseconds.
pub(crate) fn timestamp(at: SystemTime) -> String {
    let d = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day): Howard Hinnant's `civil_from_days`.
fn civil(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_780_000_123);
        assert_eq!(timestamp(at), "2025-12-03T16:40:00.123Z");
        assert_eq!(
            timestamp(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        // A writer that never drains: the pipe to a reader that does not read.
        let (lines, _rx) = sync_channel(2);
        let log = AccessLog {
            lines,
            dropped: IntCounter::new("d", "d").unwrap(),
            written: IntCounter::new("w", "w").unwrap(),
        };
        let line = Line {
            time: timestamp(SystemTime::now()),
            route: "digits",
            plan: Some("split"),
            target: Some("digits_mlp/1"),
            protocol: "grpc",
            status: 200,
            grpc_status: 0,
            latency_ms: 1.5,
            result: "ok",
            policy_version: 1,
            cache: None,
            cascade: None,
            cascade_stage: None,
            shadow: Some("sent"),
            rollout: None,
            pipeline: None,
            switch: None,
            overflow: None,
            trace_id: None,
            error: None,
        };
        for _ in 0..5 {
            log.write(&line);
        }
        assert_eq!(log.written.get(), 2);
        assert_eq!(log.dropped.get(), 3);
        let v: serde_json::Value = serde_json::from_slice(&_rx.recv().unwrap()).unwrap();
        assert_eq!(v["route"], "digits");
        assert_eq!(v["shadow"], "sent");
        assert!(v.get("cache").is_none());
    }
}
