//! Distributed tracing as both sides run it: the W3C trace context (`traceparent`,
//! `tracestate`) read from a request's headers or gRPC metadata and written to the calls
//! it makes, and the OpenTelemetry tracer that exports finished spans over OTLP/gRPC.
//!
//! Tracing is off unless configured. When on, spans are handed to the SDK's batch
//! processor: a bounded queue (spans beyond it are dropped and counted by the SDK, never
//! waited for) drained by its own thread. The OTLP exporter (tonic) needs a Tokio reactor,
//! which that thread has not, so it runs on a one-thread runtime of its own
//! ([`OnRuntime`]); the request path only ends spans.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, SpanData,
    SpanExporter,
};

/// A started span: ended when dropped (or by `end()`).
pub type Span = opentelemetry_sdk::trace::Span;

/// The W3C header names.
pub const TRACEPARENT: &str = "traceparent";
/// The vendor part of the trace context, passed along as received.
pub const TRACESTATE: &str = "tracestate";

/// Where spans go and which traces are kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The OTLP/gRPC receiver, e.g. `http://127.0.0.1:4317`.
    pub endpoint: String,
    /// The share of traces started here that are recorded (0 to 1). A request that
    /// arrives with a trace context follows its caller's sampling decision.
    pub sample_ratio: f64,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Spans held for export at most; more are dropped.
    pub max_queue: usize,
}

/// The tracer of a process, with what keeps its exporter running.
pub struct Tracing {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracing").finish_non_exhaustive()
    }
}

impl Tracing {
    /// Builds the exporter and the tracer. Nothing is sent until a span ends; a receiver
    /// that is down costs the spans of the batches it misses, nothing else.
    pub fn start(settings: &Settings) -> Result<Self, String> {
        if !(0.0..=1.0).contains(&settings.sample_ratio) {
            return Err(format!(
                "tracing.sample_ratio is {}: expected a share from 0 to 1",
                settings.sample_ratio
            ));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()
            .map_err(|e| format!("the OTLP exporter's runtime: {e}"))?;
        let built = {
            // tonic makes its channel on the runtime it is built in.
            let _in = runtime.enter();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(settings.endpoint.clone())
                .with_timeout(Duration::from_secs(5))
                .build()
        };
        let exporter = match built {
            Ok(e) => e,
            Err(e) => {
                // Dropped in place, a runtime waits for its thread: forbidden (a panic)
                // in the async context the gateway and the backend start in.
                runtime.shutdown_background();
                return Err(format!(
                    "tracing.otlp_endpoint {}: the OTLP exporter cannot be built: {e}",
                    settings.endpoint
                ));
            }
        };
        let exporter = OnRuntime {
            inner: Arc::new(exporter),
            runtime: runtime.handle().clone(),
        };
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(settings.max_queue.max(1))
                    .with_scheduled_delay(Duration::from_millis(500))
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sample_ratio,
            ))))
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(settings.service_name.clone())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("switchyard");
        Ok(Self {
            provider,
            tracer,
            runtime: Some(runtime),
        })
    }

    /// Starts a span under `parent` (a caller's context or one of this process's spans),
    /// or a new trace without one.
    pub fn span(
        &self,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        parent: Option<&SpanContext>,
        attributes: Vec<KeyValue>,
    ) -> Span {
        let cx = match parent {
            Some(p) => Context::new().with_remote_span_context(p.clone()),
            None => Context::new(),
        };
        self.tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &cx)
    }

    /// A span that already happened, from `start` to `end` (a scheduler's queue wait and
    /// compute, measured on its own threads).
    pub fn happened(
        &self,
        name: impl Into<Cow<'static, str>>,
        parent: &SpanContext,
        attributes: Vec<KeyValue>,
        (start, end): (std::time::SystemTime, std::time::SystemTime),
    ) {
        let cx = Context::new().with_remote_span_context(parent.clone());
        let mut span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_attributes(attributes)
            .with_start_time(start)
            .start_with_context(&self.tracer, &cx);
        opentelemetry::trace::Span::end_with_timestamp(&mut span, end);
    }

    /// Exports what is queued and stops the exporter (at shutdown). It waits for the
    /// export: call it where blocking is allowed.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("tracing: the last spans were not all exported: {e}");
        }
    }
}

impl Drop for Tracing {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
        // Dropping a runtime waits for its threads, which an async context forbids.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Runs the OTLP exporter's calls on its runtime, for the batch processor's thread.
#[derive(Debug)]
struct OnRuntime {
    inner: Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
}

impl SpanExporter for OnRuntime {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = OTelSdkResult> + Send {
        let inner = self.inner.clone();
        let call = self.runtime.spawn(async move { inner.export(batch).await });
        async move {
            call.await
                .unwrap_or_else(|e| Err(OTelSdkError::InternalFailure(e.to_string())))
        }
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// The caller's trace context from its `traceparent` and `tracestate` values; `None`
/// when there is none or it is malformed (the W3C rule: a bad `traceparent` starts a new
/// trace, a bad `tracestate` is dropped).
pub fn remote_parent(traceparent: Option<&[u8]>, tracestate: Option<&[u8]>) -> Option<SpanContext> {
    let (trace_id, span_id, flags) = parse_traceparent(traceparent?)?;
    let state = tracestate
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(SpanContext::new(trace_id, span_id, flags, true, state))
}

/// `version-traceid-parentid-flags`, lower-case hex: version 00 exactly so; a later
/// version may append fields after a `-`; `ff`, all-zero ids and upper case are invalid.
fn parse_traceparent(v: &[u8]) -> Option<(TraceId, SpanId, TraceFlags)> {
    let s = std::str::from_utf8(v)
        .ok()?
        .trim_matches(|c| c == ' ' || c == '\t');
    if s.len() < 55 {
        return None;
    }
    let (version, rest) = (&s[..2], &s[2..]);
    let hex = |x: &str| {
        x.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(version) || version == "ff" || (version == "00" && s.len() != 55) {
        return None;
    }
    if s.len() > 55 && s.as_bytes()[55] != b'-' {
        return None;
    }
    let b = rest.as_bytes();
    if b[0] != b'-' || b[33] != b'-' || b[50] != b'-' {
        return None;
    }
    let (trace, span, flags) = (&rest[1..33], &rest[34..50], &rest[51..53]);
    if !hex(trace) || !hex(span) || !hex(flags) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace).ok()?;
    let span_id = SpanId::from_hex(span).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some((trace_id, span_id, TraceFlags::new(flags & 1)))
}

/// The `traceparent` value that names `cx` as the parent of a call.
pub fn traceparent(cx: &SpanContext) -> http::HeaderValue {
    // Written by hand: every call made under a trace carries one, and `format!` cost
    // three times as much.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut v = *b"00-00000000000000000000000000000000-0000000000000000-00";
    let mut put = |at: usize, bytes: &[u8]| {
        for (i, b) in bytes.iter().enumerate() {
            v[at + 2 * i] = HEX[usize::from(b >> 4)];
            v[at + 2 * i + 1] = HEX[usize::from(b & 15)];
        }
    };
    put(3, &cx.trace_id().to_bytes());
    put(36, &cx.span_id().to_bytes());
    put(53, &[cx.trace_flags().to_u8()]);
    http::HeaderValue::from_bytes(&v).expect("hex and dashes")
}

/// The `tracestate` value of `cx`, when it has one.
pub fn tracestate(cx: &SpanContext) -> Option<http::HeaderValue> {
    let s = cx.trace_state().header();
    if s.is_empty() {
        None
    } else {
        http::HeaderValue::from_str(&s).ok()
    }
}

/// A span's trace id as the access log writes it (32 hex digits).
pub fn trace_id(cx: &SpanContext) -> String {
    cx.trace_id().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_w3c_traceparent_parses_and_writes_back_the_same() {
        let cx = remote_parent(Some(GOOD.as_bytes()), Some(b"congo=t61rcWkgMzE")).unwrap();
        assert!(cx.is_sampled());
        assert_eq!(traceparent(&cx).to_str().unwrap(), GOOD);
        assert_eq!(tracestate(&cx).unwrap(), "congo=t61rcWkgMzE");
        assert_eq!(trace_id(&cx), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[tokio::test]
    async fn an_exporter_that_cannot_be_built_is_an_error_not_a_panic() {
        // No TLS is built in; the refusal must come back as an error even from an async
        // context, where dropping the exporter's runtime in place panics.
        let e = Tracing::start(&Settings {
            endpoint: "https://127.0.0.1:4317".into(),
            sample_ratio: 1.0,
            service_name: "t".into(),
            max_queue: 16,
        })
        .unwrap_err();
        assert!(
            e.contains("tracing.otlp_endpoint https://127.0.0.1:4317"),
            "{e}"
        );
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(remote_parent(Some(bad.as_bytes()), None).is_none(), "{bad}");
        }
        // A later version may add fields; the first four are read.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes";
        assert!(remote_parent(Some(later.as_bytes()), None).is_some());
        // A bad tracestate is dropped, the parent kept.
        let cx = remote_parent(Some(GOOD.as_bytes()), Some(b"not a list")).unwrap();
        assert!(tracestate(&cx).is_none());
    }
}
