//! A request's place in a trace (`tracing:` in gateway.yaml): [`Cx`] is handed down
//! with the request, by copy, to everything it runs, and says which span a child span
//! hangs under and what `traceparent` a call to a backend carries.
//!
//! Without `tracing:` nothing is started: a caller's `traceparent` and `tracestate` go on
//! to the backends as they came, so the gateway is transparent to the caller's trace.

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanContext, SpanKind};
use switchyard_proto::trace::{self as w3c, Span, Tracing};

/// The header names, parsed once: a lookup by `&str` parses the name every time.
pub(crate) const TRACEPARENT: HeaderName = HeaderName::from_static(w3c::TRACEPARENT);
pub(crate) const TRACESTATE: HeaderName = HeaderName::from_static(w3c::TRACESTATE);

/// The trace context headers a call to a backend carries.
#[derive(Debug, Clone)]
pub(crate) struct Propagate {
    pub(crate) traceparent: HeaderValue,
    pub(crate) tracestate: Option<HeaderValue>,
}

impl Propagate {
    /// A caller's headers, as they came (tracing off).
    pub(crate) fn from_caller(headers: &HeaderMap) -> Option<Self> {
        Some(Self {
            traceparent: headers.get(TRACEPARENT)?.clone(),
            tracestate: headers.get(TRACESTATE).cloned(),
        })
    }

    /// The headers that name `cx` as the parent.
    fn of(cx: &SpanContext) -> Self {
        Self {
            traceparent: w3c::traceparent(cx),
            tracestate: w3c::tracestate(cx),
        }
    }
}

/// Where a request stands in its trace.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Cx<'a> {
    /// The tracer, when tracing is on.
    tracing: Option<&'a Tracing>,
    /// The span children of this point hang under.
    parent: Option<&'a SpanContext>,
    /// Tracing off: the caller's headers, for the backends.
    caller: Option<&'a Propagate>,
}

impl<'a> Cx<'a> {
    /// A request's context: under `span` when tracing is on, else passing the caller's.
    pub(crate) fn new(
        tracing: Option<&'a Tracing>,
        span: Option<&'a SpanContext>,
        caller: Option<&'a Propagate>,
    ) -> Self {
        Self {
            tracing,
            parent: span,
            caller,
        }
    }

    /// The span children of this point hang under, when the request is traced.
    pub(crate) fn parent(&self) -> Option<&'a SpanContext> {
        self.parent.filter(|_| self.tracing.is_some())
    }

    /// Whether children of this point are recorded (their names and attributes are only
    /// made then).
    pub(crate) fn recording(&self) -> bool {
        self.tracing.is_some() && self.parent.is_some_and(SpanContext::is_sampled)
    }

    /// A child span of this point, when recording.
    pub(crate) fn child(
        &self,
        name: impl FnOnce() -> String,
        kind: SpanKind,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Span> {
        if !self.recording() {
            return None;
        }
        let tracing = self.tracing?;
        Some(tracing.span(name(), kind, self.parent, attributes()))
    }

    /// The context under `span` (a child's own children hang under it).
    pub(crate) fn under<'b>(&self, span: &'b SpanContext) -> Cx<'b>
    where
        'a: 'b,
    {
        Cx {
            tracing: self.tracing,
            parent: Some(span),
            caller: self.caller,
        }
    }

    /// What a call made at this point carries: the parent span's context, or the
    /// caller's headers when the gateway does not trace.
    pub(crate) fn propagate(&self) -> Option<Propagate> {
        match (self.tracing, self.parent) {
            (Some(_), Some(p)) if p.is_valid() => Some(Propagate::of(p)),
            _ => self.caller.cloned(),
        }
    }
}

/// Ends `span` (if any) with these attributes and an error status when `error` says so.
pub(crate) fn end(
    span: Option<Span>,
    attributes: impl FnOnce() -> Vec<KeyValue>,
    error: Option<&str>,
) {
    if let Some(mut span) = span {
        // A span the sampler dropped records nothing: its attributes are not even made.
        if span.is_recording() {
            span.set_attributes(attributes());
            if let Some(e) = error {
                span.set_status(opentelemetry::trace::Status::error(e.to_owned()));
            }
        }
        span.end();
    }
}

/// The context of a started span, kept beside it so children can borrow it.
pub(crate) fn context(span: &Option<Span>) -> Option<SpanContext> {
    span.as_ref().map(|s| s.span_context().clone())
}
