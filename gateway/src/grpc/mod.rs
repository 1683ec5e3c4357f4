//! The gRPC codec both sides share: framing (`frame`), status codes, `grpc-message` and
//! `grpc-timeout` (`status`), the `ModelInferRequest` surgery that routes a request
//! without decoding its tensors (`infer`), and the method paths of Triton's service.

pub(crate) mod frame;
pub(crate) use switchyard_proto::wire as infer;
pub(crate) mod status;

/// The service's path prefix.
pub(crate) const SERVICE: &str = "/inference.GRPCInferenceService/";
pub(crate) const MODEL_INFER: &str = "/inference.GRPCInferenceService/ModelInfer";
pub(crate) const SERVER_READY: &str = "/inference.GRPCInferenceService/ServerReady";
pub(crate) const MODEL_READY: &str = "/inference.GRPCInferenceService/ModelReady";
pub(crate) const MODEL_METADATA: &str = "/inference.GRPCInferenceService/ModelMetadata";
pub(crate) const MODEL_CONFIG: &str = "/inference.GRPCInferenceService/ModelConfig";
pub(crate) const MODEL_STATISTICS: &str = "/inference.GRPCInferenceService/ModelStatistics";
