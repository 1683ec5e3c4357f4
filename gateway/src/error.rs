//! The gateway's closed set of request errors and their one mapping (`rescue`) to an HTTP
//! status, a gRPC code and a message.

use std::time::Duration;

use switchyard_proto::wire::WireError;

use crate::grpc::status::code;
use crate::routing::RouteError;

/// Why the gateway answered a request with an error.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum GatewayError {
    /// No route of that name.
    #[error("unknown route '{route}'; the gateway serves: {known}")]
    UnknownRoute { route: String, known: String },
    /// Routing refused the request (version pinning).
    #[error("{0}")]
    Route(#[from] RouteError),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The client reset the request or closed its connection before the answer.
    #[error("the client went away before the answer")]
    ClientGone,
    /// The gateway is serving `limits.max_in_flight` requests already.
    #[error(
        "the gateway is serving its limit of {limit} requests at once (limits.max_in_flight); retry shortly"
    )]
    Overloaded { limit: u32 },
    /// The body is over `limits.max_body_bytes`.
    #[error("request body exceeds the {limit}-byte limit (limits.max_body_bytes)")]
    BodyTooLarge { limit: u64 },
    /// The request body stopped arriving.
    #[error("the request body sent nothing for {after:?} (limits.body_timeout)")]
    BodyStalled { after: Duration },
    /// Decoding the request would take more memory than its size allows.
    #[error("{0}")]
    Amplified(String),
    /// A method or feature the gateway does not serve.
    #[error("{0}")]
    Unsupported(String),
    /// Nothing could take the request.
    #[error("route '{route}': no target is available ({detail})")]
    NoTarget { route: String, detail: String },
    /// The deadline passed.
    #[error("route '{route}': deadline of {after:?} exceeded{detail}")]
    Deadline {
        route: String,
        after: Duration,
        detail: String,
    },
    /// The backend answered with an error status, passed through.
    #[error("{message}")]
    Upstream { code: i32, message: String },
    /// A backend's reply was over `limits.max_response_bytes`.
    #[error("route '{route}': {detail}")]
    ReplyTooLarge { route: String, detail: String },
    /// Calling the backend failed and no retry was possible.
    #[error("route '{route}': upstream failure: {reason}")]
    UpstreamFailed { route: String, reason: String },
    /// The target's pool is full (every endpoint at its `max_in_flight` for the
    /// request's priority class, or the backends answered that their queues are full)
    /// and no overflow took the request.
    #[error("route '{route}': {detail}; retry shortly")]
    Saturated { route: String, detail: String },
}

impl From<WireError> for GatewayError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Malformed(message) => Self::BadRequest(message),
            too_large @ WireError::TooLarge { .. } => Self::Amplified(too_large.to_string()),
        }
    }
}

/// What a client sees for an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rescued {
    pub(crate) http: u16,
    pub(crate) grpc: i32,
    pub(crate) message: String,
}

impl GatewayError {
    /// Names `route` in an error raised where the route was not known (strategies).
    pub(crate) fn in_route(mut self, name: &str) -> Self {
        match &mut self {
            Self::NoTarget { route, .. }
            | Self::Deadline { route, .. }
            | Self::UpstreamFailed { route, .. }
            | Self::ReplyTooLarge { route, .. }
            | Self::Saturated { route, .. }
                if route.is_empty() =>
            {
                name.clone_into(route);
            }
            _ => {}
        }
        self
    }

    /// Names where inside a composed plan the error arose (`pipeline 'p' step 's'`),
    /// keeping its kind, and so its status.
    pub(crate) fn in_step(mut self, what: &str) -> Self {
        match &mut self {
            Self::Upstream { message: m, .. }
            | Self::BadRequest(m)
            | Self::NoTarget { detail: m, .. }
            | Self::UpstreamFailed { reason: m, .. }
            | Self::ReplyTooLarge { detail: m, .. }
            | Self::Saturated { detail: m, .. } => *m = format!("{what}: {m}"),
            Self::Deadline { detail, .. } => *detail = format!(" in {what}{detail}"),
            _ => {}
        }
        self
    }

    /// The one mapping from errors to statuses.
    pub(crate) fn rescue(&self) -> Rescued {
        let (http, grpc) = match self {
            Self::UnknownRoute { .. } => (404, code::NOT_FOUND),
            Self::Route(RouteError::UnknownVersion { .. }) => (404, code::NOT_FOUND),
            Self::Route(RouteError::PinningDisabled { .. }) => (400, code::FAILED_PRECONDITION),
            Self::BadRequest(_) => (400, code::INVALID_ARGUMENT),
            Self::BodyTooLarge { .. } | Self::Amplified(_) => (413, code::RESOURCE_EXHAUSTED),
            Self::Overloaded { .. } => (429, code::RESOURCE_EXHAUSTED),
            Self::BodyStalled { .. } => (408, code::DEADLINE_EXCEEDED),
            // Nobody reads it; nginx logs such a request as 499.
            Self::ClientGone => (499, code::CANCELLED),
            Self::Unsupported(_) => (501, code::UNIMPLEMENTED),
            Self::NoTarget { .. } => (503, code::UNAVAILABLE),
            Self::Deadline { .. } => (504, code::DEADLINE_EXCEEDED),
            Self::Upstream { code: c, .. } => (http_status(*c), *c),
            Self::UpstreamFailed { .. } => (502, code::UNAVAILABLE),
            // gRPC's own code for a message over a size limit; the gateway's fault to the
            // HTTP client, as a reply it would not take.
            Self::ReplyTooLarge { .. } => (502, code::RESOURCE_EXHAUSTED),
            Self::Saturated { .. } => (429, code::RESOURCE_EXHAUSTED),
        };
        Rescued {
            http,
            grpc,
            message: self.to_string(),
        }
    }

    /// `Retry-After` (seconds) for a refusal the client should retry shortly.
    pub(crate) fn retry_after(&self) -> Option<&'static str> {
        matches!(self, Self::Overloaded { .. } | Self::Saturated { .. }).then_some("1")
    }

    /// The `result` label of the request metrics.
    pub(crate) fn outcome(&self) -> Outcome {
        match self {
            Self::NoTarget { .. } => Outcome::Unavailable,
            Self::Deadline { .. } => Outcome::DeadlineExceeded,
            // The backend's queue timeout (the budget the gateway forwarded) ran out first.
            Self::Upstream {
                code: code::DEADLINE_EXCEEDED,
                ..
            } => Outcome::DeadlineExceeded,
            Self::UpstreamFailed { .. } => Outcome::UpstreamError,
            Self::Saturated { .. } => Outcome::Shed,
            Self::Upstream { code: c, .. } if is_upstream_failure(*c) => Outcome::UpstreamError,
            _ => Outcome::ClientError,
        }
    }
}

/// How a request ended, for `switchyard_requests_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok = 0,
    ClientError = 1,
    UpstreamError = 2,
    Unavailable = 3,
    DeadlineExceeded = 4,
    /// Refused because its pool was full (by priority class).
    Shed = 5,
}

impl Outcome {
    pub(crate) const ALL: [Outcome; 6] = [
        Outcome::Ok,
        Outcome::ClientError,
        Outcome::UpstreamError,
        Outcome::Unavailable,
        Outcome::DeadlineExceeded,
        Outcome::Shed,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::ClientError => "client_error",
            Self::UpstreamError => "upstream_error",
            Self::Unavailable => "unavailable",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::Shed => "shed",
        }
    }
}

/// Statuses that say the backend, not the request, is at fault: they count against the
/// breaker and may be retried on idempotent routes.
pub(crate) fn is_upstream_failure(grpc: i32) -> bool {
    matches!(
        grpc,
        code::UNAVAILABLE
            | code::INTERNAL
            | code::UNKNOWN
            | code::DEADLINE_EXCEEDED
            | code::CANCELLED
    )
}

/// The HTTP status KServe v2 REST uses for a gRPC code.
pub(crate) fn http_status(grpc: i32) -> u16 {
    match grpc {
        code::OK => 200,
        code::INVALID_ARGUMENT | code::FAILED_PRECONDITION => 400,
        code::NOT_FOUND => 404,
        code::RESOURCE_EXHAUSTED => 429,
        code::UNIMPLEMENTED => 501,
        code::UNAVAILABLE => 503,
        code::DEADLINE_EXCEEDED => 504,
        _ => 500,
    }
}
