//! The backend's closed set of request errors and their one mapping to `tonic::Status`.
//!
//! Messages name the model, version or tensor involved and what was expected, so a client
//! can fix its request from the message alone. They carry no trailing period.

use std::time::Duration;

/// Why a request to the backend failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No model of that name is in the repository (or it was unloaded).
    #[error("Request for unknown model: '{model}' is not found")]
    ModelNotFound {
        /// The requested model.
        model: String,
    },
    /// The model exists but not this version.
    #[error("Request for unknown model: '{model}' version {version} is not found")]
    VersionNotFound {
        /// The requested model.
        model: String,
        /// The requested version, as the client spelled it.
        version: String,
    },
    /// The model is known but none of its versions is ready, with the load failure.
    #[error("model '{model}' has no ready version: {reason}")]
    ModelNotReady {
        /// The requested model.
        model: String,
        /// Why no version is ready.
        reason: String,
    },
    /// The request does not fit the model's inputs or outputs.
    #[error("{0}")]
    InvalidRequest(String),
    /// The dynamic batcher's queue is at `max_queue_size`.
    #[error(
        "queue of model '{model}' version {version} is full (max_queue_size {limit}); retry later"
    )]
    QueueFull {
        /// The model.
        model: String,
        /// The version.
        version: u64,
        /// The configured limit.
        limit: usize,
    },
    /// The backend's requests hold `--max-queue-bytes` of inputs.
    #[error(
        "the backend's requests hold its limit of {limit} input bytes (--max-queue-bytes); retry later"
    )]
    QueueBytes {
        /// The configured limit.
        limit: usize,
    },
    /// The request's `timeout` parameter expired before it ran.
    #[error(
        "Request timeout expired: waited {waited:?} in the queue of model '{model}', the request allowed {allowed:?}"
    )]
    Timeout {
        /// The model.
        model: String,
        /// Time spent queued.
        waited: Duration,
        /// The request's timeout.
        allowed: Duration,
    },
    /// The version was unloaded or the server is stopping while the request waited.
    #[error("model '{model}' version {version} was unloaded before the request ran")]
    Unloaded {
        /// The model.
        model: String,
        /// The version.
        version: u64,
    },
    /// The runtime failed to execute the model.
    #[error("inference failed for model '{model}' version {version}: {message}")]
    Runtime {
        /// The model.
        model: String,
        /// The version.
        version: u64,
        /// What the runtime reported.
        message: String,
    },
    /// A repository-control request could not be carried out (load or unload).
    #[error("{0}")]
    Repository(String),
}

impl From<BackendError> for tonic::Status {
    fn from(err: BackendError) -> Self {
        use tonic::Code;
        let code = match &err {
            BackendError::ModelNotFound { .. } | BackendError::VersionNotFound { .. } => {
                Code::NotFound
            }
            BackendError::ModelNotReady { .. }
            | BackendError::QueueFull { .. }
            | BackendError::Unloaded { .. } => Code::Unavailable,
            BackendError::InvalidRequest(_) | BackendError::Repository(_) => Code::InvalidArgument,
            BackendError::Timeout { .. } => Code::DeadlineExceeded,
            BackendError::QueueBytes { .. } => Code::ResourceExhausted,
            BackendError::Runtime { .. } => Code::Internal,
        };
        tonic::Status::new(code, err.to_string())
    }
}
