//! The ONNX Runtime runtime (feature `onnxruntime`): `libonnxruntime.so` is loaded at run
//! time (`ort` with `load-dynamic`), so building needs no download and no C++ toolchain.
//! The PyPI `onnxruntime` wheel provides the CPU library; `onnxruntime-gpu` adds the CUDA
//! execution provider, used for `instance_group { kind: KIND_GPU }`.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use bytes::Bytes;
use ort::session::{Session, SessionInputValue, builder::GraphOptimizationLevel};
use ort::value::{DynValue, Tensor};
use switchyard_proto::ElementType;

use super::{Device, InputBatch, Instance, LoadSpec, LoadedModel, OutputTensor, Runtime};

/// ONNX Runtime with its environment.
#[derive(Debug)]
pub(crate) struct OrtRuntime {
    env: ort::environment::Environment,
    library: PathBuf,
}

/// ONNX Runtime allows one environment per process, so every repository (tests start
/// several backends in one process) shares the first one loaded.
static ENVIRONMENT: OnceLock<Result<(ort::environment::Environment, PathBuf), String>> =
    OnceLock::new();

impl OrtRuntime {
    /// Loads the library from `library`, or `$ORT_DYLIB_PATH`.
    pub(crate) fn new(library: Option<&Path>) -> Result<Self, String> {
        let library = match library {
            Some(p) => p.to_path_buf(),
            None => std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from).ok_or(
                "no ONNX Runtime library: pass --onnxruntime-lib or set ORT_DYLIB_PATH to libonnxruntime.so",
            )?,
        };
        let (env, loaded) = ENVIRONMENT
            .get_or_init(|| {
                let env = ort::init_from(&library)
                    .map_err(|e| format!("cannot load {}: {e}", library.display()))?
                    .with_name("switchyard")
                    .build()
                    .map_err(|e| {
                        format!("cannot start ONNX Runtime from {}: {e}", library.display())
                    })?;
                tracing::info!(library = %library.display(), "ONNX Runtime loaded");
                Ok((env, library.clone()))
            })
            .clone()?;
        if loaded != library {
            tracing::warn!(requested = %library.display(), loaded = %loaded.display(), "ONNX Runtime is already loaded from another file; using it");
        }
        Ok(Self {
            env,
            library: loaded,
        })
    }
}

impl Runtime for OrtRuntime {
    fn load(&self, onnx: &[u8], spec: &LoadSpec<'_>) -> Result<Box<dyn LoadedModel>, String> {
        for (name, element) in spec.inputs {
            if !supported(*element) {
                return Err(format!(
                    "input '{name}': the onnxruntime runtime cannot take {element} tensors"
                ));
            }
        }
        let model = OrtModel {
            env: self.env.clone(),
            bytes: onnx.to_vec(),
            inputs: spec
                .inputs
                .iter()
                .map(|(n, e)| ((*n).to_owned(), *e))
                .collect(),
            outputs: spec.outputs.iter().map(|n| (*n).to_owned()).collect(),
            device: spec.device,
            library: self.library.clone(),
        };
        // Build one session now so that a model ONNX Runtime rejects is refused at load.
        model.session()?;
        Ok(Box::new(model))
    }
}

#[derive(Debug)]
struct OrtModel {
    env: ort::environment::Environment,
    bytes: Vec<u8>,
    inputs: Vec<(String, ElementType)>,
    outputs: Vec<String>,
    device: Device,
    library: PathBuf,
}

impl OrtModel {
    fn session(&self) -> Result<Session, String> {
        let err = |e: ort::Error<_>| format!("ONNX Runtime ({}): {e}", self.library.display());
        let mut builder = Session::builder(&self.env)
            .map_err(|e| format!("ONNX Runtime: {e}"))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(err)?
            // Each instance is one scheduler thread; ORT's own pool would compete with it.
            .with_intra_threads(1)
            .map_err(err)?;
        if let Device::Gpu(id) = self.device {
            builder = builder
                .with_execution_providers([ort::ep::CUDA::default().with_device_id(id).build().error_on_failure()])
                .map_err(|e| format!("the CUDA execution provider is unavailable (onnxruntime-gpu and CUDA 12/13 needed): {e}"))?;
        }
        builder
            .commit_from_memory(&self.bytes)
            .map_err(|e| format!("ONNX Runtime rejects the model: {e}"))
    }
}

impl LoadedModel for OrtModel {
    fn instance(&self) -> Result<Box<dyn Instance>, String> {
        Ok(Box::new(OrtInstance {
            session: self.session()?,
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
        }))
    }
}

struct OrtInstance {
    session: Session,
    inputs: Vec<(String, ElementType)>,
    outputs: Vec<String>,
}

impl Instance for OrtInstance {
    fn run(&mut self, inputs: &[InputBatch<'_>]) -> Result<Vec<OutputTensor>, String> {
        let mut values: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(inputs.len());
        for ((name, _), input) in self.inputs.iter().zip(inputs) {
            values.push((Cow::Borrowed(name.as_str()), to_value(input)?.into()));
        }
        let outputs = self
            .session
            .run(values)
            .map_err(|e| format!("ONNX Runtime: {e}"))?;
        self.outputs
            .iter()
            .map(|name| {
                let value = outputs
                    .get(name)
                    .ok_or_else(|| format!("ONNX Runtime returned no output '{name}'"))?;
                from_value(name, value)
            })
            .collect()
    }
}

fn supported(element: ElementType) -> bool {
    !matches!(
        element,
        ElementType::Fp16 | ElementType::Bf16 | ElementType::Bytes
    )
}

macro_rules! by_element {
    ($element:expr, $mac:ident, $($arg:expr),*) => {
        match $element {
            ElementType::Fp32 => $mac!(f32, $($arg),*),
            ElementType::Fp64 => $mac!(f64, $($arg),*),
            ElementType::Int8 => $mac!(i8, $($arg),*),
            ElementType::Int16 => $mac!(i16, $($arg),*),
            ElementType::Int32 => $mac!(i32, $($arg),*),
            ElementType::Int64 => $mac!(i64, $($arg),*),
            ElementType::Uint8 => $mac!(u8, $($arg),*),
            ElementType::Uint16 => $mac!(u16, $($arg),*),
            ElementType::Uint32 => $mac!(u32, $($arg),*),
            ElementType::Uint64 => $mac!(u64, $($arg),*),
            ElementType::Bool => $mac!(bool, $($arg),*),
            other => Err(format!("the onnxruntime runtime cannot carry {other} tensors")),
        }
    };
}

/// Decodes little-endian bytes of one element type.
trait FromLe: Sized {
    fn from_le(bytes: &[u8]) -> Self;
    fn to_le(&self, out: &mut Vec<u8>);
}

macro_rules! from_le_num {
    ($($t:ty),*) => {$(
        impl FromLe for $t {
            fn from_le(bytes: &[u8]) -> Self {
                // Invariant: callers pass exactly size_of::<Self>() bytes (chunks_exact).
                <$t>::from_le_bytes(bytes.try_into().unwrap_or_default())
            }
            fn to_le(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
        }
    )*};
}
from_le_num!(f32, f64, i8, i16, i32, i64, u8, u16, u32, u64);

impl FromLe for bool {
    fn from_le(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
    fn to_le(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
}

fn to_value(input: &InputBatch<'_>) -> Result<DynValue, String> {
    let shape: Vec<i64> = input.shape.iter().map(|&d| d as i64).collect();
    macro_rules! build {
        ($t:ty, $input:expr, $shape:expr) => {{
            let size = std::mem::size_of::<$t>();
            let data: Vec<$t> = $input
                .chunks
                .iter()
                .flat_map(|c| c.chunks_exact(size).map(<$t as FromLe>::from_le))
                .collect();
            Tensor::from_array(($shape, data))
                .map(|t| t.into_dyn())
                .map_err(|e| format!("ONNX Runtime: {e}"))
        }};
    }
    by_element!(input.element, build, input, shape)
}

fn from_value(name: &str, value: &DynValue) -> Result<OutputTensor, String> {
    let element = match value.dtype().tensor_type() {
        Some(t) => element_of(t).ok_or_else(|| {
            format!("output '{name}' has element type {t:?}, which KServe cannot carry")
        })?,
        None => return Err(format!("output '{name}' is not a tensor")),
    };
    macro_rules! extract {
        ($t:ty, $value:expr, $element:expr) => {{
            let (shape, data) = $value
                .try_extract_tensor::<$t>()
                .map_err(|e| format!("output '{name}': {e}"))?;
            let mut out = Vec::with_capacity(data.len() * std::mem::size_of::<$t>());
            data.iter().for_each(|v| v.to_le(&mut out));
            Ok(OutputTensor {
                element: $element,
                shape: shape.iter().map(|&d| d.max(0) as usize).collect(),
                data: Bytes::from(out),
            })
        }};
    }
    by_element!(element, extract, value, element)
}

fn element_of(t: ort::value::TensorElementType) -> Option<ElementType> {
    use ort::value::TensorElementType as T;
    Some(match t {
        T::Float32 => ElementType::Fp32,
        T::Float64 => ElementType::Fp64,
        T::Int8 => ElementType::Int8,
        T::Int16 => ElementType::Int16,
        T::Int32 => ElementType::Int32,
        T::Int64 => ElementType::Int64,
        T::Uint8 => ElementType::Uint8,
        T::Uint16 => ElementType::Uint16,
        T::Uint32 => ElementType::Uint32,
        T::Uint64 => ElementType::Uint64,
        T::Bool => ElementType::Bool,
        _ => return None,
    })
}
