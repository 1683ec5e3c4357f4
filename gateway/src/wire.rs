//! Just enough protobuf to route a `ModelInferRequest` without decoding its tensors: read
//! `model_name` (field 1), `model_version` (field 2) and a `timeout` parameter (field 4),
//! and split the message into the bytes to forward without fields 1 and 2. Forwarding then
//! prepends the target's fields and appends the deadline parameter; protobuf merges
//! repeated and map fields and lets the last scalar win, so no byte of the tensors moves.

use bytes::Bytes;
use prost::Message;
use switchyard_proto::inference::{
    InferParameter, ModelInferRequest, infer_parameter::ParameterChoice,
};

/// A `ModelInferRequest` as the gateway forwards it.
#[derive(Debug, Clone)]
pub(crate) struct InferMessage {
    pub(crate) model_name: String,
    pub(crate) model_version: String,
    /// The client's own `timeout` parameter (µs), if it set one.
    pub(crate) timeout_us: Option<u64>,
    /// The message without fields 1 and 2, as slices of the received bytes.
    pub(crate) rest: Vec<Bytes>,
}

/// A map entry of `parameters` (field 4), for reading a client's `timeout`.
#[derive(Clone, PartialEq, Message)]
struct ParameterEntry {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(message, optional, tag = "2")]
    value: Option<InferParameter>,
}

/// Splits an encoded `ModelInferRequest`. Errors name what is malformed.
pub(crate) fn split_infer_request(msg: &Bytes) -> Result<InferMessage, String> {
    let mut out = InferMessage {
        model_name: String::new(),
        model_version: String::new(),
        timeout_us: None,
        rest: Vec::new(),
    };
    let mut keep_from = 0;
    let mut at = 0;
    while at < msg.len() {
        let field_start = at;
        let (key, n) = varint(&msg[at..]).ok_or("ModelInferRequest: truncated field key")?;
        at += n;
        let (field, wire) = (key >> 3, key & 7);
        let value_start;
        match wire {
            0 => {
                let (_, n) = varint(&msg[at..]).ok_or("ModelInferRequest: truncated varint")?;
                value_start = at;
                at += n;
            }
            1 => {
                value_start = at;
                at = at
                    .checked_add(8)
                    .filter(|&e| e <= msg.len())
                    .ok_or("ModelInferRequest: truncated fixed64")?;
            }
            2 => {
                let (len, n) = varint(&msg[at..]).ok_or("ModelInferRequest: truncated length")?;
                value_start = at + n;
                at = usize::try_from(len)
                    .ok()
                    .and_then(|l| value_start.checked_add(l))
                    .filter(|&e| e <= msg.len())
                    .ok_or("ModelInferRequest: a field runs past the end of the message")?;
            }
            5 => {
                value_start = at;
                at = at
                    .checked_add(4)
                    .filter(|&e| e <= msg.len())
                    .ok_or("ModelInferRequest: truncated fixed32")?;
            }
            _ => {
                return Err(format!(
                    "ModelInferRequest: unsupported wire type {wire} (field {field})"
                ));
            }
        }
        match (field, wire) {
            (1 | 2, 2) => {
                let text = std::str::from_utf8(&msg[value_start..at])
                    .map_err(|_| format!("ModelInferRequest: field {field} is not UTF-8"))?
                    .to_owned();
                if field == 1 {
                    out.model_name = text;
                } else {
                    out.model_version = text;
                }
                if keep_from < field_start {
                    out.rest.push(msg.slice(keep_from..field_start));
                }
                keep_from = at;
            }
            (1 | 2, _) => return Err(format!("ModelInferRequest: field {field} must be a string")),
            (4, 2) => {
                let entry = ParameterEntry::decode(&msg[value_start..at])
                    .map_err(|e| format!("ModelInferRequest.parameters: {e}"))?;
                if entry.key == "timeout" {
                    out.timeout_us = match entry.value.and_then(|v| v.parameter_choice) {
                        Some(ParameterChoice::Int64Param(v)) if v > 0 => Some(v as u64),
                        Some(ParameterChoice::Uint64Param(v)) if v > 0 => Some(v),
                        _ => None,
                    };
                }
            }
            _ => {}
        }
    }
    if keep_from < msg.len() {
        out.rest.push(msg.slice(keep_from..));
    }
    Ok(out)
}

impl InferMessage {
    /// The chunks to send to a target: its model and version, the client's fields, then the
    /// deadline as Triton's `timeout` parameter (µs), which wins over an earlier one.
    pub(crate) fn chunks(&self, model: &str, version: &str, timeout_us: u64) -> Vec<Bytes> {
        let head = ModelInferRequest {
            model_name: model.to_owned(),
            model_version: version.to_owned(),
            ..Default::default()
        };
        let mut tail = ModelInferRequest::default();
        let timeout = self.timeout_us.map_or(timeout_us, |t| t.min(timeout_us));
        tail.parameters.insert(
            "timeout".to_owned(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(
                    i64::try_from(timeout).unwrap_or(i64::MAX),
                )),
            },
        );
        let mut chunks = Vec::with_capacity(self.rest.len() + 2);
        chunks.push(Bytes::from(head.encode_to_vec()));
        chunks.extend(self.rest.iter().cloned());
        chunks.push(Bytes::from(tail.encode_to_vec()));
        chunks
    }
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, &byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::inference::model_infer_request::InferInputTensor;

    fn request() -> ModelInferRequest {
        let mut r = ModelInferRequest {
            model_name: "digits".into(),
            model_version: "v1.1.0".into(),
            id: "abc".into(),
            inputs: vec![InferInputTensor {
                name: "INPUT__0".into(),
                datatype: "FP32".into(),
                shape: vec![1, 2],
                ..Default::default()
            }],
            raw_input_contents: vec![Bytes::from_static(&[1, 2, 3, 4, 5, 6, 7, 8])],
            ..Default::default()
        };
        r.parameters.insert(
            "timeout".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(900)),
            },
        );
        r
    }

    #[test]
    fn rewrites_model_fields_and_keeps_everything_else() {
        let bytes = Bytes::from(request().encode_to_vec());
        let m = split_infer_request(&bytes).unwrap();
        assert_eq!(
            (
                m.model_name.as_str(),
                m.model_version.as_str(),
                m.timeout_us
            ),
            ("digits", "v1.1.0", Some(900))
        );
        let forwarded: Vec<u8> = m.chunks("digits_mlp", "2", 5_000).concat();
        let back = ModelInferRequest::decode(&forwarded[..]).unwrap();
        assert_eq!(
            (back.model_name.as_str(), back.model_version.as_str()),
            ("digits_mlp", "2")
        );
        assert_eq!(back.id, "abc");
        assert_eq!(back.inputs, request().inputs);
        assert_eq!(back.raw_input_contents, request().raw_input_contents);
        let t = back.parameters["timeout"].parameter_choice.clone();
        assert_eq!(
            t,
            Some(ParameterChoice::Int64Param(900)),
            "the client's shorter timeout stays"
        );
        let looser = split_infer_request(&bytes)
            .unwrap()
            .chunks("m", "", 100)
            .concat();
        let t = ModelInferRequest::decode(&looser[..]).unwrap().parameters["timeout"]
            .parameter_choice
            .clone();
        assert_eq!(
            t,
            Some(ParameterChoice::Int64Param(100)),
            "the gateway's shorter budget wins"
        );
    }

    #[test]
    fn tensors_are_not_copied() {
        let bytes = Bytes::from(request().encode_to_vec());
        let m = split_infer_request(&bytes).unwrap();
        let base = bytes.as_ptr() as usize;
        assert!(
            m.rest.iter().all(
                |c| (c.as_ptr() as usize) >= base && (c.as_ptr() as usize) < base + bytes.len()
            )
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let good = request().encode_to_vec();
        for cut in 0..good.len() {
            let _ = split_infer_request(&Bytes::copy_from_slice(&good[..cut]));
        }
        assert!(
            split_infer_request(&Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]))
                .is_err()
        );
        assert!(
            split_infer_request(&Bytes::from_static(&[0x0b])).is_err(),
            "groups are refused"
        );
        assert!(
            split_infer_request(&Bytes::from_static(&[0x08, 0x01])).is_err(),
            "model_name as a varint"
        );
        assert!(
            split_infer_request(&Bytes::new())
                .unwrap()
                .model_name
                .is_empty()
        );
    }
}
