//! Fuzz oracles for what this crate parses, shared by the `fuzz/` targets (cargo-fuzz,
//! nightly) and the corpus replay test (`tests/fuzz_corpus.rs`, stable): each takes
//! arbitrary bytes and panics only when a promise of the code is broken.

use std::path::Path;

use bytes::Bytes;
use prost::Message;

use crate::inference::{InferParameter, ModelInferRequest, infer_parameter::ParameterChoice};
use crate::wire::{WireError, check_infer_request, split_infer_request};

/// The `ModelInferRequest` walk against prost itself: it refuses as malformed exactly
/// what prost cannot decode, and a request forwarded from its split decodes to the
/// client's request with the target's model fields and the deadline parameter.
pub fn infer_wire(data: &[u8]) {
    let prost = ModelInferRequest::decode(data);
    match (check_infer_request(data), &prost) {
        (Err(WireError::Malformed(m)), Ok(_)) => {
            panic!("the walk refuses what prost decodes: {m}")
        }
        (Ok(_) | Err(WireError::TooLarge { .. }), Err(e)) => {
            panic!("the walk passes what prost refuses: {e}")
        }
        _ => {}
    }
    let (Ok(mut want), Ok(split)) = (prost, split_infer_request(&Bytes::copy_from_slice(data)))
    else {
        return;
    };
    let forwarded = split.chunks("m", "7", 5_000).concat();
    let got = ModelInferRequest::decode(&forwarded[..]).expect("a forwarded request decodes");
    want.model_name = "m".to_owned();
    want.model_version = "7".to_owned();
    let timeout = split.timeout_us.map_or(5_000, |t| t.min(5_000));
    want.parameters.insert(
        "timeout".to_owned(),
        InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(timeout as i64)),
        },
    );
    assert!(
        canonical(got) == canonical(want),
        "forwarding changed the request"
    );
}

/// `m` with every NaN made 0, so that equality means the same bytes went through (NaN is
/// not equal to itself).
fn canonical(mut m: ModelInferRequest) -> ModelInferRequest {
    fn param(p: &mut InferParameter) {
        if let Some(ParameterChoice::DoubleParam(d)) = &mut p.parameter_choice
            && d.is_nan()
        {
            *d = 0.0;
        }
    }
    m.parameters.values_mut().for_each(param);
    for input in &mut m.inputs {
        input.parameters.values_mut().for_each(param);
        if let Some(c) = &mut input.contents {
            c.fp32_contents
                .iter_mut()
                .filter(|v| v.is_nan())
                .for_each(|v| *v = 0.0);
            c.fp64_contents
                .iter_mut()
                .filter(|v| v.is_nan())
                .for_each(|v| *v = 0.0);
        }
    }
    for output in &mut m.outputs {
        output.parameters.values_mut().for_each(param);
    }
    m
}

/// `config.pbtxt` text: parsing never panics, and an error names the file, a line and a
/// column within the text.
pub fn model_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = crate::pbtxt::parse_model_config(Path::new("fuzz/config.pbtxt"), text) {
        let rest = e
            .strip_prefix("fuzz/config.pbtxt")
            .unwrap_or_else(|| panic!("the error does not name the file: {e}"));
        if let Some(at) = rest.strip_prefix(':') {
            let mut parts = at.splitn(3, ':');
            let line: usize = parts.next().and_then(|l| l.parse().ok()).expect("a line");
            let col: usize = parts.next().and_then(|c| c.parse().ok()).expect("a column");
            let lines = text.split('\n').count();
            assert!(line >= 1 && line <= lines, "line {line} of {lines}: {e}");
            assert!(col >= 1, "column {col}: {e}");
        }
    }
}
