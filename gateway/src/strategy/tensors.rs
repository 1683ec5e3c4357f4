//! Output tensors as numbers: decoding `raw_output_contents`, the confidence tests of
//! cascades, the combiners of ensembles and the comparison of shadow answers.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use switchyard_proto::ElementType;
use switchyard_proto::inference::{ModelInferResponse, model_infer_response::InferOutputTensor};

use crate::routing::{Accept, Case, Combine, When};

/// One output tensor with its values widened to f64.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tensor {
    pub(crate) name: String,
    pub(crate) element: ElementType,
    pub(crate) shape: Vec<i64>,
    pub(crate) values: Vec<f64>,
}

impl Tensor {
    /// Rows (the first dimension, 1 for scalars and vectors) and the row length.
    pub(crate) fn rows(&self) -> (usize, usize) {
        if self.shape.len() >= 2 {
            let rows = usize::try_from(self.shape[0]).unwrap_or(0).max(1);
            (rows, self.values.len() / rows)
        } else {
            (1, self.values.len())
        }
    }

    fn row(&self, i: usize) -> &[f64] {
        let (_, cols) = self.rows();
        &self.values[i * cols..(i + 1) * cols]
    }
}

/// The outputs of an encoded `ModelInferResponse`.
pub(crate) fn decode(response: &Bytes) -> Result<(ModelInferResponse, Vec<Tensor>), String> {
    let resp = ModelInferResponse::decode(response.clone())
        .map_err(|e| format!("undecodable ModelInferResponse: {e}"))?;
    let mut tensors = Vec::with_capacity(resp.outputs.len());
    for (i, out) in resp.outputs.iter().enumerate() {
        let element = ElementType::from_wire(&out.datatype)
            .ok_or_else(|| format!("output '{}': unknown datatype '{}'", out.name, out.datatype))?;
        let raw = resp
            .raw_output_contents
            .get(i)
            .ok_or_else(|| format!("output '{}' has no raw contents", out.name))?;
        tensors.push(Tensor {
            name: out.name.clone(),
            element,
            shape: out.shape.clone(),
            values: widen(element, raw)?,
        });
    }
    Ok((resp, tensors))
}

fn widen(element: ElementType, raw: &[u8]) -> Result<Vec<f64>, String> {
    let w = element
        .byte_size()
        .ok_or_else(|| format!("{element} outputs cannot be compared or combined"))?;
    if !raw.len().is_multiple_of(w) {
        return Err(format!(
            "{} bytes are not a whole number of {element} elements",
            raw.len()
        ));
    }
    let c = raw.chunks_exact(w);
    Ok(match element {
        ElementType::Fp32 => c
            .map(|b| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        ElementType::Fp64 => c
            .map(|b| f64::from_le_bytes(b.try_into().unwrap_or_default()))
            .collect(),
        ElementType::Fp16 => c
            .map(|b| f64::from(half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()))
            .collect(),
        ElementType::Bf16 => c
            .map(|b| f64::from(half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()))
            .collect(),
        ElementType::Int8 => c.map(|b| f64::from(b[0] as i8)).collect(),
        ElementType::Uint8 | ElementType::Bool => c.map(|b| f64::from(b[0])).collect(),
        ElementType::Int16 => c
            .map(|b| f64::from(i16::from_le_bytes([b[0], b[1]])))
            .collect(),
        ElementType::Uint16 => c
            .map(|b| f64::from(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        ElementType::Int32 => c
            .map(|b| f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        ElementType::Uint32 => c
            .map(|b| f64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        ElementType::Int64 => c
            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or_default()) as f64)
            .collect(),
        ElementType::Uint64 => c
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as f64)
            .collect(),
        ElementType::Bytes => return Err("BYTES outputs cannot be compared or combined".to_owned()),
    })
}

/// Encodes values back into the tensor's own element type.
fn narrow(t: &Tensor) -> Bytes {
    let mut out = BytesMut::with_capacity(t.values.len() * t.element.byte_size().unwrap_or(8));
    for &v in &t.values {
        match t.element {
            ElementType::Fp32 => out.put_f32_le(v as f32),
            ElementType::Fp64 => out.put_f64_le(v),
            ElementType::Fp16 => out.put_u16_le(half::f16::from_f64(v).to_bits()),
            ElementType::Bf16 => out.put_u16_le(half::bf16::from_f64(v).to_bits()),
            ElementType::Int8 => out.put_i8(v as i8),
            ElementType::Uint8 | ElementType::Bool => out.put_u8(v as u8),
            ElementType::Int16 => out.put_i16_le(v as i16),
            ElementType::Uint16 => out.put_u16_le(v as u16),
            ElementType::Int32 => out.put_i32_le(v as i32),
            ElementType::Uint32 => out.put_u32_le(v as u32),
            ElementType::Int64 => out.put_i64_le(v as i64),
            ElementType::Uint64 => out.put_u64_le(v as u64),
            ElementType::Bytes => {}
        }
    }
    out.freeze()
}

/// The output a test reads: by name, else the first.
fn pick<'a>(tensors: &'a [Tensor], output: Option<&str>) -> Result<&'a Tensor, String> {
    match output {
        Some(name) => tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| format!("the answer has no output '{name}'")),
        None => tensors
            .first()
            .ok_or_else(|| "the answer has no outputs".to_owned()),
    }
}

fn top_two(row: &[f64]) -> (f64, f64) {
    row.iter()
        .fold((f64::NEG_INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            if v > a {
                (v, a)
            } else if v > b {
                (a, v)
            } else {
                (a, b)
            }
        })
}

/// Argmax of a row (first index on ties).
pub(crate) fn argmax(row: &[f64]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}

/// The first switch case whose condition every row of the output meets, if any.
pub(crate) fn first_case(
    tensors: &[Tensor],
    output: Option<&str>,
    cases: &[Case],
) -> Result<Option<usize>, String> {
    let t = pick(tensors, output)?;
    let (rows, cols) = t.rows();
    if cols == 0 || t.values.is_empty() {
        return Err(format!("output '{}' is empty", t.name));
    }
    let meets = |when: &When, row: &[f64]| {
        let (top, second) = top_two(row);
        when.argmax
            .as_ref()
            .is_none_or(|classes| classes.contains(&argmax(row)))
            && when.max_probability_below.is_none_or(|x| top < x)
            && when.margin_below.is_none_or(|x| top - second < x)
    };
    Ok(cases
        .iter()
        .position(|c| (0..rows).all(|i| meets(&c.when, t.row(i)))))
}

/// A cascade stage's confidence: the lowest over rows of the test's statistic, and
/// whether every row passes.
pub(crate) fn confidence(
    tensors: &[Tensor],
    accept: &Accept,
    output: Option<&str>,
) -> Result<(f64, bool), String> {
    let t = pick(tensors, output)?;
    let (rows, _) = t.rows();
    let (stat, threshold) = match accept {
        Accept::MaxProbability(x) => (0, *x),
        Accept::Margin(x) => (1, *x),
    };
    let mut lowest = f64::INFINITY;
    for i in 0..rows {
        let (a, b) = top_two(t.row(i));
        let v = if stat == 0 { a } else { a - b };
        lowest = lowest.min(v);
    }
    Ok((lowest, lowest >= threshold))
}

/// Combines members' outputs, each a `(tensors, weight)`; outputs are matched by name and
/// must agree in shape and type.
pub(crate) fn combine(members: &[(Vec<Tensor>, f64)], how: Combine) -> Result<Vec<Tensor>, String> {
    let (first, _) = members.first().ok_or("no member answered")?;
    let mut out = Vec::with_capacity(first.len());
    for t in first {
        let others: Vec<(&Tensor, f64)> = members
            .iter()
            .map(|(ts, w)| {
                let o = ts
                    .iter()
                    .find(|o| o.name == t.name)
                    .ok_or_else(|| format!("a member's answer has no output '{}'", t.name))?;
                if o.shape != t.shape || o.element != t.element {
                    return Err(format!(
                        "ensemble members disagree on output '{}': {} {:?} and {} {:?}",
                        t.name, t.element, t.shape, o.element, o.shape
                    ));
                }
                Ok((o, *w))
            })
            .collect::<Result<_, String>>()?;
        let float = matches!(
            t.element,
            ElementType::Fp16 | ElementType::Bf16 | ElementType::Fp32 | ElementType::Fp64
        );
        if !float && how != Combine::Max {
            return Err(format!(
                "output '{}' is {}: only floating-point outputs can be averaged or voted",
                t.name, t.element
            ));
        }
        let n = t.values.len();
        let values = match how {
            Combine::Mean | Combine::WeightedMean => {
                let total: f64 = others.iter().map(|(_, w)| w).sum();
                (0..n)
                    .map(|i| others.iter().map(|(o, w)| o.values[i] * w).sum::<f64>() / total)
                    .collect()
            }
            Combine::Max => (0..n)
                .map(|i| {
                    others
                        .iter()
                        .map(|(o, _)| o.values[i])
                        .fold(f64::NEG_INFINITY, f64::max)
                })
                .collect(),
            Combine::MajorityVote => vote(&others, t),
        };
        out.push(Tensor {
            name: t.name.clone(),
            element: t.element,
            shape: t.shape.clone(),
            values,
        });
    }
    Ok(out)
}

/// Per row: the class most members rank first, ties broken by the highest summed value;
/// the row becomes the mean of the rows of the members that voted for it.
fn vote(members: &[(&Tensor, f64)], like: &Tensor) -> Vec<f64> {
    let (rows, cols) = like.rows();
    let mut values = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let picks: Vec<usize> = members.iter().map(|(t, _)| argmax(t.row(r))).collect();
        let score = |class: usize| {
            let votes = picks.iter().filter(|&&p| p == class).count();
            let mass: f64 = members.iter().map(|(t, _)| t.row(r)[class]).sum();
            (votes, mass)
        };
        let winner = (0..cols)
            .max_by(|&a, &b| {
                score(a)
                    .partial_cmp(&score(b))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .unwrap_or(0);
        let voters: Vec<&&Tensor> = members
            .iter()
            .map(|(t, _)| t)
            .zip(&picks)
            .filter(|(_, p)| **p == winner)
            .map(|(t, _)| t)
            .collect();
        for c in 0..cols {
            let n = voters.len().max(1) as f64;
            values.push(voters.iter().map(|t| t.row(r)[c]).sum::<f64>() / n);
        }
    }
    values
}

/// An encoded `ModelInferResponse` carrying `tensors`.
pub(crate) fn encode(model_name: &str, model_version: &str, id: &str, tensors: &[Tensor]) -> Bytes {
    let resp = ModelInferResponse {
        model_name: model_name.to_owned(),
        model_version: model_version.to_owned(),
        id: id.to_owned(),
        outputs: tensors
            .iter()
            .map(|t| InferOutputTensor {
                name: t.name.clone(),
                datatype: t.element.as_str().to_owned(),
                shape: t.shape.clone(),
                ..Default::default()
            })
            .collect(),
        raw_output_contents: tensors.iter().map(narrow).collect(),
        ..Default::default()
    };
    Bytes::from(resp.encode_to_vec())
}

/// How a shadow's answer compares with the primary's.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Comparison {
    /// Every row's argmax of the first output agrees.
    pub(crate) agree: bool,
    /// Largest absolute difference of any element of each output the two share.
    pub(crate) max_abs_diff: Vec<(String, f64)>,
}

/// Compares two answers output by output.
pub(crate) fn compare(primary: &[Tensor], shadow: &[Tensor]) -> Result<Comparison, String> {
    let p = primary.first().ok_or("the primary answer has no outputs")?;
    let s = shadow
        .iter()
        .find(|t| t.name == p.name)
        .ok_or_else(|| format!("the shadow answer has no output '{}'", p.name))?;
    if p.values.len() != s.values.len() {
        return Err(format!(
            "output '{}' has {} values in the primary answer and {} in the shadow's",
            p.name,
            p.values.len(),
            s.values.len()
        ));
    }
    let (rows, _) = p.rows();
    let agree = (0..rows).all(|r| argmax(p.row(r)) == argmax(s.row(r)));
    let mut max_abs_diff = Vec::new();
    for t in primary {
        if let Some(o) = shadow
            .iter()
            .find(|o| o.name == t.name && o.values.len() == t.values.len())
        {
            let d = t
                .values
                .iter()
                .zip(&o.values)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            max_abs_diff.push((t.name.clone(), d));
        }
    }
    Ok(Comparison {
        agree,
        max_abs_diff,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn probs(rows: &[&[f64]]) -> Vec<Tensor> {
        vec![Tensor {
            name: "probabilities".into(),
            element: ElementType::Fp32,
            shape: vec![rows.len() as i64, rows[0].len() as i64],
            values: rows.iter().flat_map(|r| r.iter().copied()).collect(),
        }]
    }

    #[test]
    fn combiners_give_the_expected_tensors() {
        let a = probs(&[&[0.6, 0.3, 0.1], &[0.2, 0.2, 0.6]]);
        let b = probs(&[&[0.2, 0.7, 0.1], &[0.1, 0.3, 0.6]]);
        let c = probs(&[&[0.5, 0.4, 0.1], &[0.4, 0.5, 0.1]]);
        let m = |v: Vec<Tensor>, w: f64| (v, w);
        let mean = combine(
            &[m(a.clone(), 1.0), m(b.clone(), 1.0), m(c.clone(), 1.0)],
            Combine::Mean,
        )
        .unwrap();
        let want = [(0.6 + 0.2 + 0.5) / 3.0, (0.3 + 0.7 + 0.4) / 3.0];
        assert!(
            (mean[0].values[0] - want[0]).abs() < 1e-12
                && (mean[0].values[1] - want[1]).abs() < 1e-12
        );
        let weighted = combine(
            &[m(a.clone(), 3.0), m(b.clone(), 1.0)],
            Combine::WeightedMean,
        )
        .unwrap();
        assert!((weighted[0].values[0] - (0.6 * 3.0 + 0.2) / 4.0).abs() < 1e-12);
        let max = combine(&[m(a.clone(), 1.0), m(b.clone(), 1.0)], Combine::Max).unwrap();
        assert_eq!(&max[0].values[..3], &[0.6, 0.7, 0.1]);
        // Row 0: a and c pick class 0, b picks 1 -> class 0 wins, mean of a and c.
        // Row 1: a and b pick class 2, c picks 1 -> class 2 wins, mean of a and b.
        let vote = combine(&[m(a, 1.0), m(b, 1.0), m(c, 1.0)], Combine::MajorityVote).unwrap();
        let v = &vote[0].values;
        assert!((v[0] - 0.55).abs() < 1e-12 && (v[1] - 0.35).abs() < 1e-12);
        assert!((v[3] - 0.15).abs() < 1e-12 && (v[5] - 0.6).abs() < 1e-12);
    }

    #[test]
    fn majority_vote_ties_go_to_the_larger_summed_probability() {
        let a = probs(&[&[0.9, 0.1]]);
        let b = probs(&[&[0.4, 0.6]]);
        let v = combine(&[(a, 1.0), (b, 1.0)], Combine::MajorityVote).unwrap();
        assert_eq!(
            argmax(&v[0].values),
            0,
            "one vote each; class 0 has 1.3 against 0.7"
        );
    }

    #[test]
    fn members_that_disagree_on_shapes_are_an_error() {
        let a = probs(&[&[0.5, 0.5]]);
        let b = probs(&[&[0.3, 0.3, 0.4]]);
        let e = combine(&[(a, 1.0), (b, 1.0)], Combine::Mean).unwrap_err();
        assert!(
            e.contains("ensemble members disagree on output 'probabilities'"),
            "{e}"
        );
    }

    #[test]
    fn confidence_tests_look_at_every_row() {
        let t = probs(&[&[0.95, 0.05], &[0.55, 0.45]]);
        assert_eq!(
            confidence(&t, &Accept::MaxProbability(0.9), None).unwrap(),
            (0.55, false)
        );
        assert!(
            confidence(&t, &Accept::MaxProbability(0.5), None)
                .unwrap()
                .1
        );
        let (m, pass) = confidence(&t, &Accept::Margin(0.1), Some("probabilities")).unwrap();
        assert!((m - 0.1).abs() < 1e-9 && pass);
        assert!(confidence(&t, &Accept::Margin(0.1), Some("logits")).is_err());
    }

    #[test]
    fn encode_and_decode_round_trip() {
        let t = probs(&[&[0.25, 0.75]]);
        let bytes = encode("m", "1", "id-1", &t);
        let (resp, back) = decode(&bytes).unwrap();
        assert_eq!((resp.model_name.as_str(), resp.id.as_str()), ("m", "id-1"));
        assert_eq!(back, t);
    }

    #[test]
    fn comparisons() {
        let p = probs(&[&[0.6, 0.4], &[0.1, 0.9]]);
        let s = probs(&[&[0.7, 0.3], &[0.2, 0.8]]);
        let c = compare(&p, &s).unwrap();
        assert!(c.agree);
        assert!((c.max_abs_diff[0].1 - 0.1).abs() < 1e-9);
        let flipped = probs(&[&[0.4, 0.6], &[0.1, 0.9]]);
        assert!(!compare(&p, &flipped).unwrap().agree);
    }
}
