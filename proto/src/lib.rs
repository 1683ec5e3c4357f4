//! KServe v2 / Triton wire types: the `inference.GRPCInferenceService` service, its messages
//! and Triton's `ModelConfig`, generated at build time from `proto/*.proto` by protox and
//! tonic-prost-build (no system `protoc`).
//!
//! # Overview
//! * [`inference`]: the generated prost messages, the tonic client
//!   (`grpc_inference_service_client`) and server (`grpc_inference_service_server`).
//! * [`wire`]: the `ModelInferRequest` walk both sides share: checked as prost would
//!   decode it, its decoded size bounded by its encoded size, split for forwarding.
//! * [`codec`]: the codec of the generated client and server, prost's behind that check.
//! * [`pbtxt`]: Triton's `config.pbtxt` text format into `ModelConfig`, errors as
//!   `file:line:col`.
//! * [`ElementType`]: a tensor element type in its three spellings (protocol string such as
//!   `"FP32"`, config enum such as `TYPE_FP32`, byte width), shared by backend and gateway.
//!
//! Tensor payloads (`raw_input_contents`, `raw_output_contents`) are `bytes::Bytes`, so a
//! payload moves between requests, batches and caches by reference count, never by copy.

pub mod codec;
mod element;
#[doc(hidden)]
pub mod fuzzing;
pub mod pbtxt;
pub mod trace;
pub mod wire;

pub use element::{ElementType, element_count};

/// Generated KServe v2 and Triton model-config types.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    rust_2018_idioms,
    missing_debug_implementations
)]
pub mod inference {
    tonic::include_proto!("inference");
    include!(concat!(env!("OUT_DIR"), "/prescan.rs"));
}

/// The encoded `FileDescriptorSet` of both protos, for reflection (text format, JSON).
pub const FILE_DESCRIPTOR_SET_BYTES: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/file_descriptor_set.bin"));

pub use prost_reflect;
