//! Model runtimes behind one trait: tract (pure Rust, the default) and, behind the
//! `onnxruntime` feature, ONNX Runtime loaded from a shared library at run time.
//!
//! A runtime turns ONNX bytes into a [`LoadedModel`]; each model instance
//! (`instance_group.count`) is one [`Instance`], owned by one scheduler thread, so an
//! instance never needs a lock. Inputs arrive as the chunks of the requests that make up a
//! batch and are copied once into the runtime's own tensor; outputs are copied once into
//! `Bytes` that the scheduler slices per request without further copies.

use std::fmt;

use bytes::Bytes;
use switchyard_proto::ElementType;
use tract_onnx::prelude::Framework;

#[cfg(feature = "onnxruntime")]
pub(crate) mod ort;
pub(crate) mod tract;

/// Which runtime executes a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    /// tract-onnx on the CPU (pure Rust).
    Tract,
    /// ONNX Runtime (`--features onnxruntime`), CPU or CUDA execution provider.
    OnnxRuntime,
}

impl RuntimeKind {
    /// Parses the name used in flags and in `config.pbtxt` parameters.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "tract" => Some(Self::Tract),
            "onnxruntime" | "ort" => Some(Self::OnnxRuntime),
            _ => None,
        }
    }

    /// The name used in flags, logs and metadata.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tract => "tract",
            Self::OnnxRuntime => "onnxruntime",
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a model instance runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Device {
    Cpu,
    /// A CUDA device, by index (`instance_group.kind: KIND_GPU`, `gpus: [..]`).
    Gpu(i32),
}

/// One declared input or output of an ONNX graph.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GraphTensor {
    pub(crate) name: String,
    /// `Err` holds the ONNX type name when it has no KServe equivalent.
    pub(crate) element: Result<ElementType, String>,
    /// `None` when the graph does not declare a shape; `-1` marks a symbolic dimension.
    pub(crate) dims: Option<Vec<i64>>,
}

/// The declared inputs (initializers excluded) and outputs of an ONNX graph.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Signature {
    pub(crate) inputs: Vec<GraphTensor>,
    pub(crate) outputs: Vec<GraphTensor>,
}

/// Reads the graph signature without building the model; an error means the bytes are not
/// a readable ONNX model.
pub(crate) fn onnx_signature(bytes: &[u8]) -> Result<Signature, String> {
    let proto = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| format!("not a valid ONNX model: {e}"))?;
    let graph = proto
        .graph
        .as_ref()
        .ok_or("not a valid ONNX model: it has no graph")?;
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let convert = |vi: &tract_onnx::pb::ValueInfoProto| {
        use tract_onnx::pb::tensor_shape_proto::dimension::Value;
        use tract_onnx::pb::type_proto;
        let tensor = vi
            .r#type
            .as_ref()
            .and_then(|t| t.value.as_ref())
            .map(|type_proto::Value::TensorType(t)| t);
        let element = match tensor {
            Some(t) => onnx_element(t.elem_type),
            None => Err("a non-tensor type".to_owned()),
        };
        let dims = tensor.and_then(|t| t.shape.as_ref()).map(|shape| {
            shape
                .dim
                .iter()
                .map(|d| match d.value {
                    Some(Value::DimValue(v)) if v > 0 => v,
                    _ => -1,
                })
                .collect()
        });
        GraphTensor {
            name: vi.name.clone(),
            element,
            dims,
        }
    };
    Ok(Signature {
        inputs: graph
            .input
            .iter()
            .filter(|vi| !initializers.contains(vi.name.as_str()))
            .map(convert)
            .collect(),
        outputs: graph.output.iter().map(convert).collect(),
    })
}

/// ONNX `TensorProto.DataType` numbers to KServe element types.
fn onnx_element(elem_type: i32) -> Result<ElementType, String> {
    Ok(match elem_type {
        1 => ElementType::Fp32,
        2 => ElementType::Uint8,
        3 => ElementType::Int8,
        4 => ElementType::Uint16,
        5 => ElementType::Int16,
        6 => ElementType::Int32,
        7 => ElementType::Int64,
        8 => ElementType::Bytes,
        9 => ElementType::Bool,
        10 => ElementType::Fp16,
        11 => ElementType::Fp64,
        12 => ElementType::Uint32,
        13 => ElementType::Uint64,
        16 => ElementType::Bf16,
        14 => return Err("COMPLEX64".to_owned()),
        15 => return Err("COMPLEX128".to_owned()),
        other => return Err(format!("ONNX type {other}")),
    })
}

/// What a runtime needs to build a model: the tensors the scheduler will feed and read,
/// in that order, and where to run.
#[derive(Debug)]
pub(crate) struct LoadSpec<'a> {
    pub(crate) inputs: &'a [(&'a str, ElementType)],
    pub(crate) outputs: &'a [&'a str],
    pub(crate) device: Device,
}

/// One input of a batch: its element type, the batch shape and the requests' bytes, in
/// order, whose concatenation is the tensor.
#[derive(Debug)]
pub(crate) struct InputBatch<'a> {
    pub(crate) element: ElementType,
    pub(crate) shape: &'a [usize],
    pub(crate) chunks: &'a [&'a [u8]],
}

/// One output of a batch.
#[derive(Debug)]
pub(crate) struct OutputTensor {
    pub(crate) element: ElementType,
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Bytes,
}

/// A runtime: builds models from ONNX bytes.
pub(crate) trait Runtime: Send + Sync + fmt::Debug {
    fn load(&self, onnx: &[u8], spec: &LoadSpec<'_>) -> Result<Box<dyn LoadedModel>, String>;
}

/// A built model, from which instances are made.
pub(crate) trait LoadedModel: Send + Sync + fmt::Debug {
    fn instance(&self) -> Result<Box<dyn Instance>, String>;
}

/// One model instance: runs batches, one at a time, on the thread that owns it.
pub(crate) trait Instance: Send {
    /// Runs one batch; outputs come back in `LoadSpec::outputs` order.
    fn run(&mut self, inputs: &[InputBatch<'_>]) -> Result<Vec<OutputTensor>, String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_sample_signature() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/model_repository/digits_mlp/1/model.onnx"
        );
        let sig = onnx_signature(&std::fs::read(path).unwrap()).unwrap();
        assert_eq!(sig.inputs.len(), 1, "initializers are not inputs");
        assert_eq!(sig.inputs[0].name, "INPUT__0");
        assert_eq!(sig.inputs[0].element, Ok(ElementType::Fp32));
        assert_eq!(sig.inputs[0].dims, Some(vec![-1, 64]));
        assert_eq!(sig.outputs[0].name, "probabilities");
        assert_eq!(sig.outputs[0].dims, Some(vec![-1, 10]));
    }

    #[test]
    fn garbage_is_not_an_onnx_model() {
        let err = onnx_signature(b"\x08\x07garbage that is not protobuf\xff\xff").unwrap_err();
        assert!(err.starts_with("not a valid ONNX model"), "{err}");
    }
}
