//! Validates a `ModelInferRequest` against a model's spec and turns it into the scheduler's
//! form: input bytes in the model's input order, shapes, requested outputs, timeout.
//!
//! Every check names the tensor and what was expected. All arithmetic on client-supplied
//! shapes is checked, and sizes are compared against bytes actually received before
//! anything is allocated, so no request can panic the server or make it allocate more
//! than the request itself carried.

use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use switchyard_proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, infer_parameter::ParameterChoice,
};
use switchyard_proto::{ElementType, element_count};

use crate::error::BackendError;
use crate::spec::{ModelSpec, TensorSpec};

/// A request checked against its model.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) rows: usize,
    pub(crate) inputs: Vec<Bytes>,
    pub(crate) shapes: Vec<Vec<usize>>,
    /// Indices into `ModelSpec::outputs`, in the order the response lists them.
    pub(crate) outputs: Vec<usize>,
    pub(crate) timeout: Option<Duration>,
}

/// Checks `req` against `spec`; takes the tensors out of `req` without copying raw ones.
pub(crate) fn prepare(
    spec: &ModelSpec,
    req: &mut ModelInferRequest,
) -> Result<Prepared, BackendError> {
    let model = &spec.name;
    let invalid = BackendError::InvalidRequest;
    let raw = std::mem::take(&mut req.raw_input_contents);
    if !raw.is_empty() && raw.len() != req.inputs.len() {
        return Err(invalid(format!(
            "raw_input_contents has {} entries but the request has {} inputs; send one entry per input, in order",
            raw.len(),
            req.inputs.len()
        )));
    }
    // Position in the request of each model input.
    let mut position: Vec<Option<usize>> = vec![None; spec.inputs.len()];
    for (i, input) in req.inputs.iter().enumerate() {
        let Some(k) = spec.inputs.iter().position(|s| s.name == input.name) else {
            return Err(invalid(format!(
                "unexpected inference input '{}' for model '{model}'; its inputs are {}",
                input.name,
                names(&spec.inputs)
            )));
        };
        if position[k].replace(i).is_some() {
            return Err(invalid(format!(
                "input '{}' appears more than once in the request",
                input.name
            )));
        }
    }
    if let Some(k) = position.iter().position(Option::is_none) {
        return Err(invalid(format!(
            "expected {} inputs but got {} inputs for model '{model}'; missing input '{}'",
            spec.inputs.len(),
            req.inputs.len(),
            spec.inputs[k].name
        )));
    }

    let batched = spec.max_batch_size > 0;
    let mut rows: Option<(usize, &str)> = None;
    let mut inputs = Vec::with_capacity(spec.inputs.len());
    let mut shapes = Vec::with_capacity(spec.inputs.len());
    for (k, tensor) in spec.inputs.iter().enumerate() {
        // Invariant: every slot was filled above.
        let i = position[k].unwrap_or_default();
        let input = &mut req.inputs[i];
        let name = tensor.name.as_str();
        let element = ElementType::from_wire(&input.datatype).ok_or_else(|| {
            invalid(format!(
                "input '{name}': unknown datatype '{}'; expected {}",
                input.datatype, tensor.element
            ))
        })?;
        if element != tensor.element {
            return Err(invalid(format!(
                "inference input '{name}' data-type is '{element}', but model '{model}' expects '{}'",
                tensor.element
            )));
        }
        let shape = check_shape(spec, tensor, &input.shape)?;
        if batched {
            let n = shape[0];
            if n == 0 || n > spec.max_batch_size {
                return Err(invalid(format!(
                    "inference request batch-size must be between 1 and {} for '{model}', got {n} (input '{name}')",
                    spec.max_batch_size
                )));
            }
            match rows {
                Some((m, other)) if m != n => {
                    return Err(invalid(format!(
                        "input '{name}' has batch size {n} but input '{other}' has {m}; all inputs share the batch dimension"
                    )));
                }
                _ => rows = Some((n, name)),
            }
        }
        let count = element_count(&input.shape).ok_or_else(|| {
            invalid(format!(
                "input '{name}': shape {:?} is too large",
                input.shape
            ))
        })?;
        let size = element.byte_size().ok_or_else(|| {
            invalid(format!(
                "input '{name}': {element} tensors are not supported"
            ))
        })?;
        let expected = count.checked_mul(size).ok_or_else(|| {
            invalid(format!(
                "input '{name}': shape {:?} is too large",
                input.shape
            ))
        })?;
        let bytes = if raw.is_empty() {
            let contents = input.contents.take().unwrap_or_default();
            from_contents(name, element, count, &contents)?
        } else {
            if input.contents.is_some() {
                return Err(invalid(format!(
                    "input '{name}' has typed contents while the request uses raw_input_contents; use one or the other"
                )));
            }
            let bytes = raw[i].clone();
            if bytes.len() != expected {
                return Err(invalid(format!(
                    "input byte size mismatch for input '{name}' for model '{model}'. Expected {expected}, got {} (shape {:?} of {element})",
                    bytes.len(),
                    input.shape
                )));
            }
            bytes
        };
        if element == ElementType::Bool
            && let Some(at) = bytes.iter().position(|&b| b > 1)
        {
            return Err(invalid(format!(
                "input '{name}': BOOL elements are bytes 0 or 1, element {at} is {}",
                bytes[at]
            )));
        }
        inputs.push(bytes);
        shapes.push(shape);
    }

    let outputs =
        if req.outputs.is_empty() {
            (0..spec.outputs.len()).collect()
        } else {
            let mut wanted = Vec::with_capacity(req.outputs.len());
            for out in &req.outputs {
                let k = spec.outputs.iter().position(|s| s.name == out.name).ok_or_else(|| {
                invalid(format!(
                    "unexpected inference output '{}' for model '{model}'; its outputs are {}",
                    out.name,
                    names(&spec.outputs)
                ))
            })?;
                if wanted.contains(&k) {
                    return Err(invalid(format!(
                        "output '{}' is requested more than once",
                        out.name
                    )));
                }
                wanted.push(k);
            }
            wanted
        };

    Ok(Prepared {
        rows: rows.map_or(1, |(n, _)| n),
        inputs,
        shapes,
        outputs,
        timeout: timeout(req.parameters.get("timeout"))?,
    })
}

fn check_shape(
    spec: &ModelSpec,
    tensor: &TensorSpec,
    shape: &[i64],
) -> Result<Vec<usize>, BackendError> {
    let batch = usize::from(spec.max_batch_size > 0);
    let expected: Vec<i64> = std::iter::repeat_n(-1, batch)
        .chain(tensor.dims.iter().copied())
        .collect();
    let fits = shape.len() == expected.len()
        && shape
            .iter()
            .zip(&expected)
            .all(|(&s, &e)| s >= 0 && (e == -1 || s == e));
    if !fits {
        return Err(BackendError::InvalidRequest(format!(
            "unexpected shape for input '{}' for model '{}'. Expected {}, got {}",
            tensor.name,
            spec.name,
            dims(&expected),
            dims(shape)
        )));
    }
    // Invariant: every dimension is >= 0 (checked just above).
    Ok(shape.iter().map(|&d| d as usize).collect())
}

/// Converts typed contents to little-endian bytes, checking the element count first.
fn from_contents(
    name: &str,
    element: ElementType,
    count: usize,
    c: &InferTensorContents,
) -> Result<Bytes, BackendError> {
    let (field, got) = match element {
        ElementType::Bool => ("bool_contents", c.bool_contents.len()),
        ElementType::Int8 | ElementType::Int16 | ElementType::Int32 => {
            ("int_contents", c.int_contents.len())
        }
        ElementType::Int64 => ("int64_contents", c.int64_contents.len()),
        ElementType::Uint8 | ElementType::Uint16 | ElementType::Uint32 => {
            ("uint_contents", c.uint_contents.len())
        }
        ElementType::Uint64 => ("uint64_contents", c.uint64_contents.len()),
        ElementType::Fp32 => ("fp32_contents", c.fp32_contents.len()),
        ElementType::Fp64 => ("fp64_contents", c.fp64_contents.len()),
        ElementType::Fp16 | ElementType::Bf16 | ElementType::Bytes => {
            return Err(BackendError::InvalidRequest(format!(
                "input '{name}': {element} tensors have no typed contents field; send them in raw_input_contents"
            )));
        }
    };
    if got != count {
        return Err(BackendError::InvalidRequest(format!(
            "input '{name}': its shape holds {count} elements but contents.{field} has {got}"
        )));
    }
    // Invariant: `count` elements are present, so this allocation is bounded by the request.
    let mut out = BytesMut::with_capacity(count * element.byte_size().unwrap_or(1));
    let range = |v: i64| {
        BackendError::InvalidRequest(format!("input '{name}': value {v} does not fit {element}"))
    };
    match element {
        ElementType::Bool => c
            .bool_contents
            .iter()
            .for_each(|&b| out.put_u8(u8::from(b))),
        ElementType::Int8 => {
            for &v in &c.int_contents {
                out.put_i8(i8::try_from(v).map_err(|_| range(v.into()))?);
            }
        }
        ElementType::Int16 => {
            for &v in &c.int_contents {
                out.put_i16_le(i16::try_from(v).map_err(|_| range(v.into()))?);
            }
        }
        ElementType::Int32 => c.int_contents.iter().for_each(|&v| out.put_i32_le(v)),
        ElementType::Int64 => c.int64_contents.iter().for_each(|&v| out.put_i64_le(v)),
        ElementType::Uint8 => {
            for &v in &c.uint_contents {
                out.put_u8(u8::try_from(v).map_err(|_| range(v.into()))?);
            }
        }
        ElementType::Uint16 => {
            for &v in &c.uint_contents {
                out.put_u16_le(u16::try_from(v).map_err(|_| range(v.into()))?);
            }
        }
        ElementType::Uint32 => c.uint_contents.iter().for_each(|&v| out.put_u32_le(v)),
        ElementType::Uint64 => c.uint64_contents.iter().for_each(|&v| out.put_u64_le(v)),
        ElementType::Fp32 => c.fp32_contents.iter().for_each(|&v| out.put_f32_le(v)),
        ElementType::Fp64 => c.fp64_contents.iter().for_each(|&v| out.put_f64_le(v)),
        ElementType::Fp16 | ElementType::Bf16 | ElementType::Bytes => {}
    }
    Ok(out.freeze())
}

/// Triton's `timeout` request parameter: microseconds a request may wait in the queue.
fn timeout(param: Option<&InferParameter>) -> Result<Option<Duration>, BackendError> {
    let micros = match param.and_then(|p| p.parameter_choice.as_ref()) {
        None => return Ok(None),
        Some(ParameterChoice::Int64Param(v)) => u64::try_from(*v).ok(),
        Some(ParameterChoice::Uint64Param(v)) => Some(*v),
        Some(_) => None,
    };
    match micros {
        Some(0) => Ok(None),
        Some(us) => Ok(Some(Duration::from_micros(us))),
        None => Err(BackendError::InvalidRequest(
            "parameter 'timeout' must be a non-negative integer number of microseconds".to_owned(),
        )),
    }
}

fn names(tensors: &[TensorSpec]) -> String {
    tensors
        .iter()
        .map(|t| format!("'{}'", t.name))
        .collect::<Vec<_>>()
        .join(", ")
}

fn dims(d: &[i64]) -> String {
    format!(
        "[{}]",
        d.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
    )
}
