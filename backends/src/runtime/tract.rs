//! The tract runtime: ONNX on the CPU in pure Rust, the default, so a fresh machine builds
//! and serves models with cargo alone.

use std::sync::Arc;

use bytes::Bytes;
use switchyard_proto::ElementType;
use tract_onnx::prelude::*;

use super::{Device, InputBatch, Instance, LoadSpec, LoadedModel, OutputTensor, Runtime};

/// The tract runtime.
#[derive(Debug, Default)]
pub(crate) struct TractRuntime;

impl Runtime for TractRuntime {
    fn load(&self, onnx: &[u8], spec: &LoadSpec<'_>) -> Result<Box<dyn LoadedModel>, String> {
        if let Device::Gpu(_) = spec.device {
            return Err(
                "the tract runtime runs on the CPU only; use the onnxruntime runtime for KIND_GPU"
                    .to_owned(),
            );
        }
        for (name, element) in spec.inputs {
            datum_type(*element)
                .ok_or_else(|| format!("input '{name}': tract cannot run {element} tensors"))?;
        }
        let build = || -> TractResult<Arc<TypedRunnableModel>> {
            let mut model = tract_onnx::onnx().model_for_read(&mut &onnx[..])?;
            model.set_input_names(spec.inputs.iter().map(|(name, _)| *name))?;
            model.select_outputs_by_name(spec.outputs.iter().copied())?;
            model.into_optimized()?.into_runnable()
        };
        let plan = build().map_err(|e| format!("tract cannot build the model: {e:#}"))?;
        Ok(Box::new(TractModel { plan }))
    }
}

#[derive(Debug)]
struct TractModel {
    plan: Arc<TypedRunnableModel>,
}

impl LoadedModel for TractModel {
    fn instance(&self) -> Result<Box<dyn Instance>, String> {
        // A state per instance keeps op scratch space between runs.
        let state = self.plan.spawn().map_err(|e| format!("{e:#}"))?;
        Ok(Box::new(TractInstance {
            plan: self.plan.clone(),
            state,
        }))
    }
}

struct TractInstance {
    plan: Arc<TypedRunnableModel>,
    state: TypedSimpleState,
}

impl TractInstance {
    /// A fresh state after a failed run: a run that fails, or panics (an index out of a
    /// Gather's range does), leaves the state's symbol values and scratch as it stopped,
    /// and every later run of the instance failed with "Clashing resolution for
    /// expression".
    fn reset(&mut self) {
        if let Ok(state) = self.plan.spawn() {
            self.state = state;
        }
    }
}

/// A panic's message, when it has one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

impl Instance for TractInstance {
    fn run(&mut self, inputs: &[InputBatch<'_>]) -> Result<Vec<OutputTensor>, String> {
        let mut values = TVec::with_capacity(inputs.len());
        for input in inputs {
            let dt = datum_type(input.element).ok_or("unsupported element type")?;
            let mut tensor = Tensor::zero_dt(dt, input.shape).map_err(|e| format!("{e:#}"))?;
            let dst = tensor.as_bytes_mut();
            let mut at = 0;
            for chunk in input.chunks {
                // Invariant: the scheduler checked that the chunks add up to the shape.
                dst[at..at + chunk.len()].copy_from_slice(chunk);
                at += chunk.len();
            }
            values.push(tensor.into_tvalue());
        }
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.state.run(values)));
        let outputs = match run {
            Ok(Ok(outputs)) => outputs,
            Ok(Err(e)) => {
                self.reset();
                return Err(format!("{e:#}"));
            }
            Err(panic) => {
                self.reset();
                return Err(format!("tract panicked: {}", panic_message(&*panic)));
            }
        };
        outputs
            .into_iter()
            .map(|value| {
                let tensor = value.into_tensor();
                let element = element_type(tensor.datum_type()).ok_or_else(|| {
                    format!("the model produced a {:?} tensor", tensor.datum_type())
                })?;
                let view = tensor.try_as_plain_ram().map_err(|e| format!("{e:#}"))?;
                Ok(OutputTensor {
                    element,
                    shape: view.shape().to_vec(),
                    data: Bytes::copy_from_slice(view.as_bytes()),
                })
            })
            .collect()
    }
}

fn datum_type(element: ElementType) -> Option<DatumType> {
    Some(match element {
        ElementType::Bool => DatumType::Bool,
        ElementType::Uint8 => DatumType::U8,
        ElementType::Uint16 => DatumType::U16,
        ElementType::Uint32 => DatumType::U32,
        ElementType::Uint64 => DatumType::U64,
        ElementType::Int8 => DatumType::I8,
        ElementType::Int16 => DatumType::I16,
        ElementType::Int32 => DatumType::I32,
        ElementType::Int64 => DatumType::I64,
        ElementType::Fp16 => DatumType::F16,
        ElementType::Fp32 => DatumType::F32,
        ElementType::Fp64 => DatumType::F64,
        ElementType::Bf16 | ElementType::Bytes => return None,
    })
}

fn element_type(dt: DatumType) -> Option<ElementType> {
    Some(match dt {
        DatumType::Bool => ElementType::Bool,
        DatumType::U8 => ElementType::Uint8,
        DatumType::U16 => ElementType::Uint16,
        DatumType::U32 => ElementType::Uint32,
        DatumType::U64 => ElementType::Uint64,
        DatumType::I8 => ElementType::Int8,
        DatumType::I16 => ElementType::Int16,
        DatumType::I32 => ElementType::Int32,
        DatumType::I64 => ElementType::Int64,
        DatumType::F16 => ElementType::Fp16,
        DatumType::F32 => ElementType::Fp32,
        DatumType::F64 => ElementType::Fp64,
        _ => return None,
    })
}
