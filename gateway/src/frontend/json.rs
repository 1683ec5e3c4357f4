//! KServe v2 REST bodies: JSON requests and responses, and Triton's binary-tensor extension
//! (`Inference-Header-Content-Length`: a JSON header followed by raw tensor bytes).
//!
//! Binary tensors pass through as slices of the request body (no copy); JSON tensor data is
//! parsed straight into the little-endian bytes the gRPC upstream expects (no JSON value
//! tree, so a tensor costs about its JSON text and its bytes), the element count checked
//! against the shape as it goes.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use switchyard_proto::inference::{
    InferParameter, ModelInferRequest, ModelInferResponse,
    infer_parameter::ParameterChoice,
    model_infer_request::{InferInputTensor, InferRequestedOutputTensor},
};
use switchyard_proto::{ElementType, element_count};

#[derive(Debug, Deserialize)]
struct RequestJson<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(borrow)]
    inputs: Vec<InputJson<'a>>,
    #[serde(default)]
    outputs: Vec<OutputJson>,
}

#[derive(Debug, Deserialize)]
struct InputJson<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    /// The tensor's JSON text as the body holds it, parsed once its datatype is known
    /// (`tensor_bytes`); `null` is no data.
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Debug, Deserialize)]
struct OutputJson {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// Which outputs go back as binary (Triton's `binary_data` / `binary_data_output`).
#[derive(Debug, Clone, Default)]
pub(crate) struct OutputFormat {
    all_binary: bool,
    binary: Vec<String>,
}

impl OutputFormat {
    fn is_binary(&self, name: &str) -> bool {
        self.all_binary || self.binary.iter().any(|b| b == name)
    }
}

/// Parses a REST infer body. `json_len`: the `Inference-Header-Content-Length` value, if any.
pub(crate) fn parse_request(
    body: &Bytes,
    json_len: Option<usize>,
) -> Result<(ModelInferRequest, OutputFormat), String> {
    let json_len = json_len.unwrap_or(body.len());
    if json_len > body.len() {
        return Err(format!(
            "Inference-Header-Content-Length is {json_len} but the body has {} bytes",
            body.len()
        ));
    }
    let req: RequestJson<'_> = serde_json::from_slice(&body[..json_len])
        .map_err(|e| format!("invalid inference request JSON: {e}"))?;
    let mut binary = body.slice(json_len..);
    let mut out = ModelInferRequest {
        id: req.id.unwrap_or_default(),
        ..Default::default()
    };
    let mut format = OutputFormat::default();
    for (key, value) in &req.parameters {
        match key.as_str() {
            "binary_data_output" => format.all_binary = value.as_bool().unwrap_or(false),
            _ => {
                out.parameters.insert(key.clone(), parameter(key, value)?);
            }
        }
    }
    let mut raw_inputs = Vec::with_capacity(req.inputs.len());
    for input in &req.inputs {
        let element = ElementType::from_wire(&input.datatype).ok_or_else(|| {
            format!(
                "input '{}': unknown datatype '{}'",
                input.name, input.datatype
            )
        })?;
        let count = element_count(&input.shape).ok_or_else(|| {
            format!(
                "input '{}': shape {:?} is not a shape",
                input.name, input.shape
            )
        })?;
        let bytes = match (input.parameters.get("binary_data_size"), &input.data) {
            (Some(size), None) => {
                let size = size.as_u64().ok_or_else(|| {
                    format!(
                        "input '{}': binary_data_size must be a non-negative integer",
                        input.name
                    )
                })? as usize;
                if size > binary.len() {
                    return Err(format!(
                        "input '{}': binary_data_size is {size} but only {} binary bytes remain in the body",
                        input.name,
                        binary.len()
                    ));
                }
                // A fixed-width tensor is exactly its shape's bytes (BYTES elements carry
                // their own lengths).
                if let Some(width) = element.byte_size()
                    && count.checked_mul(width) != Some(size)
                {
                    return Err(format!(
                        "input '{}': binary_data_size is {size} but shape {:?} of {element} holds {} bytes",
                        input.name,
                        input.shape,
                        count.saturating_mul(width)
                    ));
                }
                binary.split_to(size)
            }
            (None, Some(data)) => tensor_bytes(&input.name, element, count, data)?,
            (Some(_), Some(_)) => {
                return Err(format!(
                    "input '{}' has both data and binary_data_size",
                    input.name
                ));
            }
            (None, None) => {
                return Err(format!(
                    "input '{}' has neither data nor binary_data_size",
                    input.name
                ));
            }
        };
        raw_inputs.push(bytes);
        out.inputs.push(InferInputTensor {
            name: input.name.clone(),
            datatype: input.datatype.clone(),
            shape: input.shape.clone(),
            ..Default::default()
        });
    }
    if !binary.is_empty() {
        return Err(format!(
            "{} binary bytes follow the JSON header that no input claims",
            binary.len()
        ));
    }
    out.raw_input_contents = raw_inputs;
    for output in &req.outputs {
        if output
            .parameters
            .get("binary_data")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            format.binary.push(output.name.clone());
        }
        out.outputs.push(InferRequestedOutputTensor {
            name: output.name.clone(),
            ..Default::default()
        });
    }
    Ok((out, format))
}

fn parameter(key: &str, v: &Value) -> Result<InferParameter, String> {
    let choice = match v {
        Value::Bool(b) => ParameterChoice::BoolParam(*b),
        Value::String(s) => ParameterChoice::StringParam(s.clone()),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => ParameterChoice::Int64Param(i),
            (None, Some(u), _) => ParameterChoice::Uint64Param(u),
            (_, _, Some(f)) => ParameterChoice::DoubleParam(f),
            _ => return Err(format!("parameter '{key}': unsupported number")),
        },
        _ => {
            return Err(format!(
                "parameter '{key}' must be a boolean, number or string"
            ));
        }
    };
    Ok(InferParameter {
        parameter_choice: Some(choice),
    })
}

/// Parses JSON `data` (possibly nested arrays) straight into the little-endian bytes of
/// `element`: one pass over the text the body holds, no JSON value built, the buffer sized
/// by what the text can hold, and the element count checked against the shape as it goes.
fn tensor_bytes(
    name: &str,
    element: ElementType,
    count: usize,
    data: &RawValue,
) -> Result<Bytes, String> {
    let text = data.get();
    // Every element takes at least one byte of JSON text, so the text bounds the buffer
    // whatever the shape claims.
    let width = element.byte_size().unwrap_or(8);
    let mut sink = Elements {
        element,
        count,
        seen: 0,
        out: BytesMut::with_capacity(count.min(text.len()).saturating_mul(width)),
        depth: 0,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    serde::de::DeserializeSeed::deserialize(&mut sink, &mut de)
        .map_err(|e| format!("input '{name}': {}", tidy(&e)))?;
    if sink.seen != count {
        return Err(format!(
            "input '{name}': the shape holds {count} elements but data has {}",
            sink.seen
        ));
    }
    Ok(sink.out.freeze())
}

/// serde_json's message without its position in the `data` text alone.
fn tidy(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) if e.is_data() => s[..i].to_owned(),
        _ => s,
    }
}

/// Where JSON tensor elements go, in order, as they are parsed.
struct Elements {
    element: ElementType,
    /// Elements the shape holds; one more is an error before it is stored.
    count: usize,
    seen: usize,
    out: BytesMut,
    depth: usize,
}

impl Elements {
    fn push<E: serde::de::Error>(&mut self, v: Leaf<'_>) -> Result<(), E> {
        let i = self.seen;
        if i == self.count {
            return Err(E::custom(format_args!(
                "the shape holds {} elements but data has more",
                self.count
            )));
        }
        self.seen += 1;
        let element = self.element;
        let bad = || E::custom(format_args!("element {i} ({v}) is not a valid {element}"));
        let int = || v.int().ok_or_else(bad);
        let uint = || v.uint().ok_or_else(bad);
        let float = || v.float().ok_or_else(bad);
        let out = &mut self.out;
        match element {
            ElementType::Bool => match v {
                Leaf::Bool(b) => out.put_u8(u8::from(b)),
                _ => return Err(bad()),
            },
            ElementType::Int8 => out.put_i8(i8::try_from(int()?).map_err(|_| bad())?),
            ElementType::Int16 => out.put_i16_le(i16::try_from(int()?).map_err(|_| bad())?),
            ElementType::Int32 => out.put_i32_le(i32::try_from(int()?).map_err(|_| bad())?),
            ElementType::Int64 => out.put_i64_le(int()?),
            ElementType::Uint8 => out.put_u8(u8::try_from(uint()?).map_err(|_| bad())?),
            ElementType::Uint16 => out.put_u16_le(u16::try_from(uint()?).map_err(|_| bad())?),
            ElementType::Uint32 => out.put_u32_le(u32::try_from(uint()?).map_err(|_| bad())?),
            ElementType::Uint64 => out.put_u64_le(uint()?),
            ElementType::Fp16 => out.put_u16_le(half::f16::from_f64(float()?).to_bits()),
            ElementType::Bf16 => out.put_u16_le(half::bf16::from_f64(float()?).to_bits()),
            ElementType::Fp32 => out.put_f32_le(float()? as f32),
            ElementType::Fp64 => out.put_f64_le(float()?),
            ElementType::Bytes => match v {
                Leaf::Str(s) => {
                    let len = u32::try_from(s.len()).map_err(|_| bad())?;
                    out.put_u32_le(len);
                    out.put_slice(s.as_bytes());
                }
                _ => return Err(bad()),
            },
        }
        Ok(())
    }
}

/// One JSON scalar of tensor data.
#[derive(Clone, Copy)]
enum Leaf<'a> {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(&'a str),
}

impl Leaf<'_> {
    fn int(self) -> Option<i64> {
        match self {
            Leaf::Int(i) => Some(i),
            Leaf::Uint(u) => i64::try_from(u).ok(),
            _ => None,
        }
    }

    fn uint(self) -> Option<u64> {
        match self {
            Leaf::Int(i) => u64::try_from(i).ok(),
            Leaf::Uint(u) => Some(u),
            _ => None,
        }
    }

    fn float(self) -> Option<f64> {
        match self {
            Leaf::Int(i) => Some(i as f64),
            Leaf::Uint(u) => Some(u as f64),
            Leaf::Float(f) => Some(f),
            _ => None,
        }
    }
}

impl std::fmt::Display for Leaf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Leaf::Bool(b) => write!(f, "{b}"),
            Leaf::Int(i) => write!(f, "{i}"),
            Leaf::Uint(u) => write!(f, "{u}"),
            Leaf::Float(x) => write!(f, "{x}"),
            Leaf::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// Nested arrays deeper than this are refused (a shape has at most a handful of dims).
const MAX_DATA_DEPTH: usize = 32;

impl<'de> serde::de::DeserializeSeed<'de> for &mut Elements {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for &mut Elements {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} elements, or arrays of them", self.element)
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.push(Leaf::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.push(Leaf::Int(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.push(Leaf::Uint(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.push(Leaf::Float(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.push(Leaf::Str(v))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth == MAX_DATA_DEPTH {
            return Err(serde::de::Error::custom(format_args!(
                "data is nested more than {MAX_DATA_DEPTH} levels deep"
            )));
        }
        self.depth += 1;
        while seq.next_element_seed(&mut *self)?.is_some() {}
        self.depth -= 1;
        Ok(())
    }
}

/// Renders a `ModelInferResponse` as KServe v2 JSON, with binary outputs appended after
/// the JSON where asked. Returns the JSON length and the body chunks.
pub(crate) fn render_response(
    resp: &ModelInferResponse,
    format: &OutputFormat,
) -> Result<(usize, Vec<Bytes>), String> {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut binary: Vec<Bytes> = Vec::new();
    for (i, out) in resp.outputs.iter().enumerate() {
        let raw = resp.raw_output_contents.get(i).cloned().unwrap_or_default();
        let mut o = json!({ "name": out.name, "datatype": out.datatype, "shape": out.shape });
        if format.is_binary(&out.name) {
            o["parameters"] = json!({ "binary_data_size": raw.len() });
            binary.push(raw);
        } else {
            let element = ElementType::from_wire(&out.datatype).ok_or_else(|| {
                format!("output '{}': unknown datatype '{}'", out.name, out.datatype)
            })?;
            o["data"] = Value::Array(values(element, &raw));
        }
        outputs.push(o);
    }
    let mut body = json!({ "model_name": resp.model_name, "model_version": resp.model_version, "outputs": outputs });
    if !resp.id.is_empty() {
        body["id"] = json!(resp.id);
    }
    let text = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let json_len = text.len();
    let mut chunks = Vec::with_capacity(1 + binary.len());
    chunks.push(Bytes::from(text));
    chunks.extend(binary);
    Ok((json_len, chunks))
}

fn values(element: ElementType, raw: &[u8]) -> Vec<Value> {
    let n = |w: usize| raw.chunks_exact(w);
    match element {
        ElementType::Bool => raw.iter().map(|&b| Value::Bool(b != 0)).collect(),
        ElementType::Int8 => raw.iter().map(|&b| json!(b as i8)).collect(),
        ElementType::Uint8 => raw.iter().map(|&b| json!(b)).collect(),
        ElementType::Int16 => n(2)
            .map(|c| json!(i16::from_le_bytes([c[0], c[1]])))
            .collect(),
        ElementType::Uint16 => n(2)
            .map(|c| json!(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        ElementType::Int32 => n(4)
            .map(|c| json!(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        ElementType::Uint32 => n(4)
            .map(|c| json!(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        ElementType::Int64 => n(8)
            .map(|c| json!(i64::from_le_bytes(c.try_into().unwrap_or_default())))
            .collect(),
        ElementType::Uint64 => n(8)
            .map(|c| json!(u64::from_le_bytes(c.try_into().unwrap_or_default())))
            .collect(),
        ElementType::Fp16 => n(2)
            .map(|c| json!(half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
            .collect(),
        ElementType::Bf16 => n(2)
            .map(|c| json!(half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()))
            .collect(),
        ElementType::Fp32 => n(4)
            .map(|c| json!(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        ElementType::Fp64 => n(8)
            .map(|c| json!(f64::from_le_bytes(c.try_into().unwrap_or_default())))
            .collect(),
        ElementType::Bytes => {
            let mut out = Vec::new();
            let mut rest = raw;
            while rest.len() >= 4 {
                let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                let Some(s) = rest.get(4..4 + len) else { break };
                out.push(json!(String::from_utf8_lossy(s)));
                rest = &rest[4 + len..];
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_tensors_become_little_endian_bytes() {
        let body = Bytes::from(
            r#"{"id":"7","inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4.5]]}],"outputs":[{"name":"y","parameters":{"binary_data":true}}],"parameters":{"timeout":100}}"#,
        );
        let (req, format) = parse_request(&body, None).unwrap();
        assert_eq!(req.id, "7");
        let floats: Vec<f32> = req.raw_input_contents[0]
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(floats, [1.0, 2.0, 3.0, 4.5]);
        assert!(format.is_binary("y") && !format.is_binary("z"));
        assert_eq!(
            req.parameters["timeout"].parameter_choice,
            Some(ParameterChoice::Int64Param(100))
        );
    }

    #[test]
    fn binary_tensors_are_slices_of_the_body() {
        let header = r#"{"inputs":[{"name":"x","shape":[1,2],"datatype":"INT32","parameters":{"binary_data_size":8}}]}"#;
        let mut body = header.as_bytes().to_vec();
        body.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0]);
        let body = Bytes::from(body);
        let (req, _) = parse_request(&body, Some(header.len())).unwrap();
        assert_eq!(&req.raw_input_contents[0][..], &[1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(
            req.raw_input_contents[0].as_ptr(),
            body[header.len()..].as_ptr(),
            "no copy"
        );
    }

    #[test]
    fn malformed_bodies_are_named() {
        for (body, len, words) in [
            ("{", None, "invalid inference request JSON"),
            (
                r#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#,
                None,
                "holds 3 elements but data has 2",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[300]}]}"#,
                None,
                "not a valid INT8",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FLOAT","data":[1]}]}"#,
                None,
                "unknown datatype 'FLOAT'",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","parameters":{"binary_data_size":4}}]}"#,
                Some(200),
                "Inference-Header-Content-Length is 200",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP32","data":[]}]}"#,
                None,
                "is not a shape",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[0,2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}abcdefgh"#,
                Some(93),
                "input 'x': binary_data_size is 8 but shape [0, 2] of FP32 holds 0 bytes",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","data":[1,2,3]}]}"#,
                None,
                "input 'x': the shape holds 2 elements but data has more",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[2],"datatype":"BOOL","data":[true,1]}]}"#,
                None,
                "input 'x': element 1 (1) is not a valid BOOL",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[{"a":1}]}]}"#,
                None,
                "input 'x': invalid type: map, expected FP32 elements, or arrays of them",
            ),
            (
                &format!(
                    r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP32","data":{}1{}}}]}}"#,
                    "[".repeat(40),
                    "]".repeat(40)
                ),
                None,
                "data is nested more than 32 levels deep",
            ),
        ] {
            let err = parse_request(&Bytes::from(body.to_owned()), len).unwrap_err();
            assert!(err.contains(words), "{err:?} lacks {words:?}");
        }
    }

    #[test]
    fn a_shape_bigger_than_its_data_costs_only_the_data() {
        // The shape claims 2^40 FP32 elements; the buffer is sized by the text, and the
        // count is refused once the data ends.
        let body =
            r#"{"inputs":[{"name":"x","shape":[1099511627776],"datatype":"FP32","data":[1,2]}]}"#;
        let err = parse_request(&Bytes::from(body), None).unwrap_err();
        assert!(
            err.contains("holds 1099511627776 elements but data has 2"),
            "{err}"
        );
        // Strings of BYTES tensors keep their length prefix.
        let body = r#"{"inputs":[{"name":"s","shape":[2],"datatype":"BYTES","data":["ab",""]}]}"#;
        let (req, _) = parse_request(&Bytes::from(body), None).unwrap();
        assert_eq!(&req.raw_input_contents[0][..], b"\x02\0\0\0ab\0\0\0\0");
    }

    #[test]
    fn responses_render_json_and_binary_outputs() {
        use switchyard_proto::inference::model_infer_response::InferOutputTensor;
        let resp = ModelInferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            outputs: vec![
                InferOutputTensor {
                    name: "a".into(),
                    datatype: "FP32".into(),
                    shape: vec![2],
                    ..Default::default()
                },
                InferOutputTensor {
                    name: "b".into(),
                    datatype: "INT64".into(),
                    shape: vec![1],
                    ..Default::default()
                },
            ],
            raw_output_contents: vec![
                Bytes::from([1.5f32.to_le_bytes(), 2.0f32.to_le_bytes()].concat()),
                Bytes::from(7i64.to_le_bytes().to_vec()),
            ],
            ..Default::default()
        };
        let format = OutputFormat {
            all_binary: false,
            binary: vec!["b".into()],
        };
        let (len, chunks) = render_response(&resp, &format).unwrap();
        let v: Value = serde_json::from_slice(&chunks[0][..len]).unwrap();
        assert_eq!(v["outputs"][0]["data"], json!([1.5, 2.0]));
        assert_eq!(v["outputs"][1]["parameters"]["binary_data_size"], json!(8));
        assert_eq!(&chunks[1][..], &7i64.to_le_bytes());
    }
}
