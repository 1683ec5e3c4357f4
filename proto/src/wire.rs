//! Just enough protobuf to route a `ModelInferRequest` without decoding its tensors, and
//! to bound what decoding it would cost before anything decodes it. The gateway and the
//! backend share it.
//!
//! [`split_infer_request`] reads `model_name` (field 1), `model_version` (field 2) and a
//! `timeout` parameter (field 4), and splits the message into the bytes to forward without
//! fields 1 and 2. Forwarding then prepends the target's fields and appends the deadline
//! parameter; protobuf merges repeated and map fields and lets the last scalar win, so no
//! byte of the tensors moves.
//!
//! The same pass checks the whole message the way the backend's decoder (prost, via
//! tonic) will, so a request the backend could not decode is the client's fault, an
//! INVALID_ARGUMENT naming the field, and never an INTERNAL that would count against a
//! backend. The check walks every field of every nested message once, without allocating
//! and without decoding a tensor: wire types against the schema, varints (at most 10
//! bytes, a 10th byte of 0 or 1), lengths within the enclosing message, UTF-8 of strings,
//! packed repeated numbers (varints whole, fixed widths a multiple of 4 or 8), and unknown
//! fields skipped as prost skips them, groups included, within prost's recursion limit of
//! 100.
//!
//! It also adds up what prost would allocate ([`Footprint`]): every message and map entry
//! at its in-memory size, every string and byte field at its length, every element of a
//! repeated number at its width. Protobuf lets a few wire bytes stand for hundreds of
//! decoded ones (an empty `inputs` entry is 2 bytes on the wire and about 300 in memory),
//! so a request whose decoded size would exceed [`decoded_limit`] of its encoded size is
//! refused, RESOURCE_EXHAUSTED, before anything is decoded ([`check_infer_request`]).

use std::fmt;
use std::mem::size_of;
use std::ops::Range;

use crate::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::inference::{InferParameter, ModelInferRequest};
use bytes::Bytes;

/// How many times its encoded size a request may take once decoded: 8, the widest
/// honest expansion (a packed `int64` of small values is 1 byte a value on the wire and 8
/// in memory).
pub const DECODE_EXPANSION: usize = 8;

/// What a request may take once decoded beyond [`DECODE_EXPANSION`] times its size, so a
/// small request with a few tensors and parameters is never refused: 1 MiB.
pub const DECODE_ALLOWANCE: usize = 1 << 20;

/// The most bytes a `len`-byte request may take once decoded.
pub fn decoded_limit(len: usize) -> usize {
    len.saturating_mul(DECODE_EXPANSION)
        .saturating_add(DECODE_ALLOWANCE)
}

/// Why a `ModelInferRequest` is refused before it is decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// prost would fail to decode it; the message names the field.
    #[error("{0}")]
    Malformed(String),
    /// Decoding it would take more memory than [`decoded_limit`] allows.
    #[error(
        "ModelInferRequest of {len} bytes would take about {decoded} bytes once decoded, over the \
         limit of {limit} ({DECODE_EXPANSION} × its size + {DECODE_ALLOWANCE} bytes); send \
         tensors in raw_input_contents"
    )]
    TooLarge {
        /// The encoded size.
        len: usize,
        /// What decoding it would take.
        decoded: usize,
        /// What it may take, [`decoded_limit`] of `len`.
        limit: usize,
    },
}

impl From<String> for WireError {
    fn from(message: String) -> Self {
        Self::Malformed(message)
    }
}

/// A `ModelInferRequest` as the gateway forwards it.
#[derive(Debug, Clone)]
pub struct InferMessage {
    /// Field 1, the route (or model) the client named.
    pub model_name: String,
    /// Field 2, the version the client pinned, `""` for none.
    pub model_version: String,
    /// The client's own `timeout` parameter (µs), if it set one.
    pub timeout_us: Option<u64>,
    /// The message without fields 1 and 2, as slices of the received bytes: whole fields
    /// each.
    pub rest: Vec<Bytes>,
    /// More `raw_input_contents` (field 7), after `rest`: the tensors of a request that
    /// was not protobuf to begin with (REST), sent as they are, never copied into one
    /// buffer.
    pub tensors: Vec<Bytes>,
}

/// What prost would allocate to decode a message, in bytes: an estimate from the wire,
/// counting every message, map entry, string, byte field and repeated element (see the
/// module's documentation), not the growth slack of vectors and maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Footprint(pub usize);

impl Footprint {
    fn add(&mut self, n: usize) {
        self.0 = self.0.saturating_add(n);
    }
}

/// What one walk of a `ModelInferRequest` read.
struct Walked<'a> {
    model_name: &'a str,
    model_version: &'a str,
    timeout_us: Option<u64>,
}

/// Splits an encoded `ModelInferRequest`, checking all of it as prost would decode it:
/// `Ok` exactly when `ModelInferRequest::decode` would succeed and its decoded size is
/// within [`decoded_limit`]. Errors name the field, as in
/// `ModelInferRequest.inputs[2].shape (field 3): packed varints are truncated or
/// over-long`.
pub fn split_infer_request(msg: &Bytes) -> Result<InferMessage, WireError> {
    let mut rest = Vec::new();
    let walked = walk(msg, |r| rest.push(msg.slice(r)))?;
    Ok(InferMessage {
        model_name: walked.model_name.to_owned(),
        model_version: walked.model_version.to_owned(),
        timeout_us: walked.timeout_us,
        rest,
        tensors: Vec::new(),
    })
}

/// Checks an encoded `ModelInferRequest` as [`split_infer_request`] does, for a decoder
/// about to decode it; returns its decoded size.
pub fn check_infer_request(msg: &[u8]) -> Result<Footprint, WireError> {
    let mut size = Footprint::default();
    walk_sized(msg, |_| {}, &mut size)?;
    Ok(size)
}

fn walk(msg: &[u8], keep: impl FnMut(Range<usize>)) -> Result<Walked<'_>, WireError> {
    walk_sized(msg, keep, &mut Footprint::default())
}

/// The one walk: checks every field, hands `keep` the ranges outside fields 1 and 2, adds
/// the decoded size to `size` and refuses a message over its limit.
fn walk_sized<'a>(
    msg: &'a [u8],
    mut keep: impl FnMut(Range<usize>),
    size: &mut Footprint,
) -> Result<Walked<'a>, WireError> {
    const NAMES: &[&str] = &[
        "model_name",
        "model_version",
        "id",
        "parameters",
        "inputs",
        "outputs",
        "raw_input_contents",
    ];
    let path = Path::Root;
    let budget = RECURSION_LIMIT;
    let mut out = Walked {
        model_name: "",
        model_version: "",
        timeout_us: None,
    };
    size.add(size_of::<ModelInferRequest>());
    let (mut parameters, mut inputs, mut outputs) = (0, 0, 0);
    let mut keep_from = 0;
    let mut c = Cursor::new(msg);
    while !c.done() {
        let field_start = c.at;
        let (tag, wire) = c.field(&path, NAMES)?;
        let here = |p| fail(&path, named(NAMES, Some(tag)), p);
        match tag {
            1 | 2 => {
                let text = string(&mut c, wire).map_err(here)?;
                size.add(text.len());
                if tag == 1 {
                    out.model_name = text;
                } else {
                    out.model_version = text;
                }
                if keep_from < field_start {
                    keep(keep_from..field_start);
                }
                keep_from = c.at;
            }
            3 => {
                size.add(string(&mut c, wire).map_err(here)?.len());
            }
            4 => {
                let entry = map_entry(
                    &mut c,
                    wire,
                    budget,
                    (&path, tag, "parameters", parameters),
                    size,
                )?;
                parameters += 1;
                if entry.key == "timeout" {
                    out.timeout_us = match entry.choice {
                        Some((INT64_PARAM, v)) if i64::try_from(v).is_ok_and(|v| v > 0) => Some(v),
                        Some((UINT64_PARAM, v)) if v > 0 => Some(v),
                        _ => None,
                    };
                }
            }
            5 => {
                let item = Path::Item(&path, "inputs", inputs);
                inputs += 1;
                let m = message(&mut c, wire, budget, "an InferInputTensor")
                    .map_err(|p| fail(&item, Some((tag, "")), p))?;
                size.add(size_of::<InferInputTensor>());
                check_input(m, budget - 1, &item, size)?;
            }
            6 => {
                let item = Path::Item(&path, "outputs", outputs);
                outputs += 1;
                let m = message(&mut c, wire, budget, "an InferRequestedOutputTensor")
                    .map_err(|p| fail(&item, Some((tag, "")), p))?;
                size.add(size_of::<InferRequestedOutputTensor>());
                check_output(m, budget - 1, &item, size)?;
            }
            7 => {
                let raw = bytes(&mut c, wire).map_err(here)?;
                size.add(size_of::<Bytes>() + raw.len());
            }
            _ => skip(&mut c, tag, wire, budget).map_err(here)?,
        }
    }
    if keep_from < msg.len() {
        keep(keep_from..msg.len());
    }
    let limit = decoded_limit(msg.len());
    if size.0 > limit {
        return Err(WireError::TooLarge {
            len: msg.len(),
            decoded: size.0,
            limit,
        });
    }
    Ok(out)
}

impl InferMessage {
    /// The chunks to send to a target: its model and version, the client's fields, then the
    /// deadline as Triton's `timeout` parameter (µs), which wins over an earlier one.
    pub fn chunks(&self, model: &str, version: &str, timeout_us: u64) -> Vec<Bytes> {
        let timeout = self.timeout_us.map_or(timeout_us, |t| t.min(timeout_us));
        let mut chunks = Vec::with_capacity(self.rest.len() + 2 * self.tensors.len() + 2);
        chunks.push(head(model, version));
        chunks.extend(self.rest.iter().cloned());
        for tensor in &self.tensors {
            chunks.push(raw_input_key(tensor.len()));
            chunks.push(tensor.clone());
        }
        chunks.push(timeout_parameter(
            i64::try_from(timeout).unwrap_or(i64::MAX),
        ));
        chunks
    }
}

/// `model_name` (field 1) and `model_version` (field 2) as prost encodes them (an empty
/// string is left out), written straight into one buffer.
fn head(model: &str, version: &str) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint};
    let mut b = Vec::with_capacity(model.len() + version.len() + 12);
    for (tag, text) in [(1, model), (2, version)] {
        if !text.is_empty() {
            encode_key(tag, WireType::LengthDelimited, &mut b);
            encode_varint(text.len() as u64, &mut b);
            b.extend_from_slice(text.as_bytes());
        }
    }
    Bytes::from(b)
}

/// `parameters` (field 4) with the one entry `"timeout"` → `int64_param` (field 2 of
/// `InferParameter`) `us`, as prost encodes a map entry, without building the map.
fn timeout_parameter(us: i64) -> Bytes {
    use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint};
    const KEY: &[u8] = b"timeout";
    // The parameter's value as a varint: i64 as two's complement in 64 bits.
    let value = us as u64;
    let parameter_len = 1 + encoded_len_varint(value);
    let entry_len =
        1 + 1 + KEY.len() + 1 + encoded_len_varint(parameter_len as u64) + parameter_len;
    let mut b = Vec::with_capacity(entry_len + 11);
    encode_key(4, WireType::LengthDelimited, &mut b);
    encode_varint(entry_len as u64, &mut b);
    encode_key(1, WireType::LengthDelimited, &mut b);
    encode_varint(KEY.len() as u64, &mut b);
    b.extend_from_slice(KEY);
    encode_key(2, WireType::LengthDelimited, &mut b);
    encode_varint(parameter_len as u64, &mut b);
    encode_key(INT64_PARAM, WireType::Varint, &mut b);
    encode_varint(value, &mut b);
    Bytes::from(b)
}

/// The key and length that precede a `raw_input_contents` entry (field 7) of `len` bytes,
/// to send a tensor as a chunk of its own after the rest of a message.
fn raw_input_key(len: usize) -> Bytes {
    let mut b = Vec::with_capacity(11);
    prost::encoding::encode_key(7, prost::encoding::WireType::LengthDelimited, &mut b);
    prost::encoding::encode_varint(len as u64, &mut b);
    Bytes::from(b)
}

/// prost's `RECURSION_LIMIT`: the nesting budget of the fields of the outermost message.
/// A nested message, a map entry and a skipped group each take one from it, and a field
/// met with none left is an error, so only unknown groups nested ~100 deep can reach it.
const RECURSION_LIMIT: u32 = 100;

/// What one entry of a `map<string, InferParameter>` takes in a `HashMap`: the pair and a
/// control byte, with the table's slack for its load factor.
const MAP_ENTRY: usize = size_of::<(String, InferParameter)>() * 8 / 7 + 1;

/// `InferParameter`'s oneof tags the `timeout` parameter reads.
const INT64_PARAM: u32 = 2;
const UINT64_PARAM: u32 = 5;

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const START_GROUP: u8 = 3;
const END_GROUP: u8 = 4;
const FIXED32: u8 = 5;

/// Checks a `ModelInferRequest.InferInputTensor`.
fn check_input(
    buf: &[u8],
    budget: u32,
    path: &Path<'_>,
    size: &mut Footprint,
) -> Result<(), String> {
    const NAMES: &[&str] = &["name", "datatype", "shape", "parameters", "contents"];
    let mut parameters = 0;
    let mut c = Cursor::new(buf);
    while !c.done() {
        let (tag, wire) = c.field(path, NAMES)?;
        let here = |p| fail(path, named(NAMES, Some(tag)), p);
        match tag {
            1 | 2 => {
                size.add(string(&mut c, wire).map_err(here)?.len());
            }
            3 => size.add(8 * repeated_varint(&mut c, wire, "an int64").map_err(here)?),
            4 => {
                map_entry(
                    &mut c,
                    wire,
                    budget,
                    (path, tag, "parameters", parameters),
                    size,
                )?;
                parameters += 1;
            }
            5 => {
                let m = message(&mut c, wire, budget, "an InferTensorContents").map_err(here)?;
                check_contents(m, budget - 1, &Path::Field(path, "contents"), size)?;
            }
            _ => skip(&mut c, tag, wire, budget).map_err(here)?,
        }
    }
    Ok(())
}

/// Checks a `ModelInferRequest.InferRequestedOutputTensor`.
fn check_output(
    buf: &[u8],
    budget: u32,
    path: &Path<'_>,
    size: &mut Footprint,
) -> Result<(), String> {
    const NAMES: &[&str] = &["name", "parameters"];
    let mut parameters = 0;
    let mut c = Cursor::new(buf);
    while !c.done() {
        let (tag, wire) = c.field(path, NAMES)?;
        let here = |p| fail(path, named(NAMES, Some(tag)), p);
        match tag {
            1 => {
                size.add(string(&mut c, wire).map_err(here)?.len());
            }
            2 => {
                map_entry(
                    &mut c,
                    wire,
                    budget,
                    (path, tag, "parameters", parameters),
                    size,
                )?;
                parameters += 1;
            }
            _ => skip(&mut c, tag, wire, budget).map_err(here)?,
        }
    }
    Ok(())
}

/// Checks an `InferTensorContents`: every element's encoding, none of them decoded.
fn check_contents(
    buf: &[u8],
    budget: u32,
    path: &Path<'_>,
    size: &mut Footprint,
) -> Result<(), String> {
    const NAMES: &[&str] = &[
        "bool_contents",
        "int_contents",
        "int64_contents",
        "uint_contents",
        "uint64_contents",
        "fp32_contents",
        "fp64_contents",
        "bytes_contents",
    ];
    let mut c = Cursor::new(buf);
    while !c.done() {
        let (tag, wire) = c.field(path, NAMES)?;
        let here = |p| fail(path, named(NAMES, Some(tag)), p);
        match tag {
            1 => size.add(repeated_varint(&mut c, wire, "a bool").map_err(here)?),
            2 => size.add(4 * repeated_varint(&mut c, wire, "an int32").map_err(here)?),
            3 => size.add(8 * repeated_varint(&mut c, wire, "an int64").map_err(here)?),
            4 => size.add(4 * repeated_varint(&mut c, wire, "a uint32").map_err(here)?),
            5 => size.add(8 * repeated_varint(&mut c, wire, "a uint64").map_err(here)?),
            6 => size.add(4 * repeated_fixed(&mut c, wire, FIXED32, "a float").map_err(here)?),
            7 => size.add(8 * repeated_fixed(&mut c, wire, FIXED64, "a double").map_err(here)?),
            8 => {
                let b = bytes(&mut c, wire).map_err(here)?;
                size.add(size_of::<Vec<u8>>() + b.len());
            }
            _ => skip(&mut c, tag, wire, budget).map_err(here)?,
        }
    }
    Ok(())
}

/// What a `map<string, InferParameter>` entry holds, as prost would decode it.
#[derive(Debug)]
struct ParameterEntry<'a> {
    /// The last key (field 1), `""` without one.
    key: &'a str,
    /// The oneof field the value ends with, and its varint (0 for the other kinds).
    choice: Option<(u32, u64)>,
}

/// Reads and checks one entry of a `map<string, InferParameter>` field; `index` counts the
/// field's entries before it, to name the entry when it has no readable key.
fn map_entry<'a>(
    c: &mut Cursor<'a>,
    wire: u8,
    budget: u32,
    (parent, tag, name, index): (&Path<'_>, u32, &'static str, usize),
    size: &mut Footprint,
) -> Result<ParameterEntry<'a>, String> {
    const NAMES: &[&str] = &["key", "value"];
    let entry = message(c, wire, budget, "a map entry")
        .map_err(|p| fail(&Path::Entry(parent, name, index, &[]), Some((tag, "")), p))?;
    let path = Path::Entry(parent, name, index, entry);
    let budget = budget - 1;
    size.add(MAP_ENTRY);
    let mut out = ParameterEntry {
        key: "",
        choice: None,
    };
    let mut c = Cursor::new(entry);
    while !c.done() {
        let (tag, wire) = c.field(&path, NAMES)?;
        let here = |p| fail(&path, named(NAMES, Some(tag)), p);
        match tag {
            1 => {
                out.key = string(&mut c, wire).map_err(here)?;
                size.add(out.key.len());
            }
            2 => {
                // A repeated value merges into the first, so an empty one keeps its choice.
                let m = message(&mut c, wire, budget, "an InferParameter").map_err(here)?;
                if let Some(choice) = check_parameter(m, budget - 1, &path, size)? {
                    out.choice = Some(choice);
                }
            }
            _ => skip(&mut c, tag, wire, budget).map_err(here)?,
        }
    }
    Ok(out)
}

/// Checks an `InferParameter`; returns the oneof field it ends with, and its varint.
fn check_parameter(
    buf: &[u8],
    budget: u32,
    path: &Path<'_>,
    size: &mut Footprint,
) -> Result<Option<(u32, u64)>, String> {
    const NAMES: &[&str] = &[
        "bool_param",
        "int64_param",
        "string_param",
        "double_param",
        "uint64_param",
    ];
    let mut choice = None;
    let mut c = Cursor::new(buf);
    while !c.done() {
        let (tag, wire) = c.field(path, NAMES)?;
        let here = |p| fail(path, named(NAMES, Some(tag)), p);
        match tag {
            1 | 2 | 5 => {
                let what = match tag {
                    1 => "a bool (varint)",
                    2 => "an int64 (varint)",
                    _ => "a uint64 (varint)",
                };
                expect(wire, VARINT, what).map_err(here)?;
                let v = c.varint().ok_or(Problem::BadVarint).map_err(here)?;
                choice = Some((tag, v));
            }
            3 => {
                size.add(string(&mut c, wire).map_err(here)?.len());
                choice = Some((tag, 0));
            }
            4 => {
                expect(wire, FIXED64, "a double (fixed64)").map_err(here)?;
                c.fixed(8).map_err(here)?;
                choice = Some((tag, 0));
            }
            _ => skip(&mut c, tag, wire, budget).map_err(here)?,
        }
    }
    Ok(choice)
}

/// A string field's value: length-delimited, UTF-8.
fn string<'a>(c: &mut Cursor<'a>, wire: u8) -> Result<&'a str, Problem> {
    expect(wire, LEN, "a string (length-delimited)")?;
    std::str::from_utf8(c.len_delimited()?).map_err(|_| Problem::NotUtf8)
}

/// A bytes field's value.
fn bytes<'a>(c: &mut Cursor<'a>, wire: u8) -> Result<&'a [u8], Problem> {
    expect(wire, LEN, "bytes (length-delimited)")?;
    c.len_delimited()
}

/// A message field's bytes; `budget` is that of the field's own message.
fn message<'a>(
    c: &mut Cursor<'a>,
    wire: u8,
    budget: u32,
    what: &'static str,
) -> Result<&'a [u8], Problem> {
    if wire != LEN {
        return Err(Problem::WireType {
            expected: what,
            how: " (length-delimited)",
            got: wire,
        });
    }
    if budget == 0 {
        return Err(Problem::RecursionLimit);
    }
    c.len_delimited()
}

/// One occurrence of a repeated varint field: one varint, or a packed run of them; how
/// many.
fn repeated_varint(c: &mut Cursor<'_>, wire: u8, what: &'static str) -> Result<usize, Problem> {
    match wire {
        VARINT => c.varint().map(|_| 1).ok_or(Problem::BadVarint),
        LEN => packed_varints(c.len_delimited()?),
        _ => Err(Problem::WireType {
            expected: what,
            how: " (varint, or packed length-delimited)",
            got: wire,
        }),
    }
}

/// One occurrence of a repeated fixed-width field (`fixed`: its wire type); how many
/// elements.
fn repeated_fixed(
    c: &mut Cursor<'_>,
    wire: u8,
    fixed: u8,
    what: &'static str,
) -> Result<usize, Problem> {
    let width = if fixed == FIXED32 { 4 } else { 8 };
    if wire == fixed {
        return c.fixed(width).map(|()| 1);
    }
    if wire != LEN {
        return Err(Problem::WireType {
            expected: what,
            how: if fixed == FIXED32 {
                " (fixed32, or packed length-delimited)"
            } else {
                " (fixed64, or packed length-delimited)"
            },
            got: wire,
        });
    }
    let len = c.len_delimited()?.len();
    if len.is_multiple_of(width) {
        Ok(len / width)
    } else {
        Err(Problem::PackedWidth { len, width })
    }
}

/// Whether packed varints end where their field does, none over 10 bytes or over 64 bits;
/// how many there are.
fn packed_varints(b: &[u8]) -> Result<usize, Problem> {
    let (mut run, mut count) = (0, 0);
    for &byte in b {
        run += 1;
        if byte < 0x80 {
            count += 1;
            if run == 10 && byte > 1 {
                return Err(Problem::PackedVarint);
            }
            run = 0;
        } else if run == 10 {
            return Err(Problem::PackedVarint);
        }
    }
    if run == 0 {
        Ok(count)
    } else {
        Err(Problem::PackedVarint)
    }
}

/// A scalar's wire type.
fn expect(wire: u8, want: u8, what: &'static str) -> Result<(), Problem> {
    if wire == want {
        Ok(())
    } else {
        Err(Problem::WireType {
            expected: what,
            how: "",
            got: wire,
        })
    }
}

/// Skips an unknown field as prost's `skip_field` does, groups included.
fn skip(c: &mut Cursor<'_>, tag: u32, wire: u8, budget: u32) -> Result<(), Problem> {
    if budget == 0 {
        return Err(Problem::RecursionLimit);
    }
    match wire {
        VARINT => c.varint().map(drop).ok_or(Problem::BadVarint),
        FIXED64 => c.fixed(8),
        LEN => c.len_delimited().map(drop),
        FIXED32 => c.fixed(4),
        START_GROUP => loop {
            if c.done() {
                return Err(Problem::UnendedGroup);
            }
            let (inner, inner_wire) = c.key().map_err(|(_, p)| p)?;
            if inner_wire == END_GROUP {
                if inner != tag {
                    return Err(Problem::GroupMismatch {
                        start: tag,
                        end: inner,
                    });
                }
                return Ok(());
            }
            skip(c, inner, inner_wire, budget - 1)?;
        },
        _ => Err(Problem::UnexpectedEndGroup),
    }
}

/// A position in one message's bytes; every read stays within them, so a field that runs
/// past the end of its enclosing message is an error, as prost's nested limits make it.
#[derive(Debug)]
struct Cursor<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, at: 0 }
    }

    fn done(&self) -> bool {
        self.at >= self.buf.len()
    }

    fn left(&self) -> usize {
        self.buf.len().saturating_sub(self.at)
    }

    /// A varint as prost reads it: at most 10 bytes, the 10th 0 or 1.
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let byte = *self.buf.get(self.at + i)?;
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                if i == 9 && byte > 1 {
                    return None;
                }
                self.at += i + 1;
                return Some(v);
            }
        }
        None
    }

    /// A field key as prost's `decode_key` reads it; the error carries the field number
    /// where the key had a readable one.
    fn key(&mut self) -> Result<(u32, u8), (Option<u32>, Problem)> {
        let key = self.varint().ok_or((None, Problem::BadKey))?;
        let key = u32::try_from(key).map_err(|_| (None, Problem::KeyTooLarge(key)))?;
        let (tag, wire) = (key >> 3, (key & 7) as u8);
        if wire > FIXED32 {
            return Err((Some(tag).filter(|&t| t > 0), Problem::BadWireType(wire)));
        }
        if tag == 0 {
            return Err((None, Problem::FieldZero));
        }
        Ok((tag, wire))
    }

    /// The next field's key in a message at `path` with fields `names`.
    fn field(&mut self, path: &Path<'_>, names: &[&'static str]) -> Result<(u32, u8), String> {
        self.key()
            .map_err(|(tag, p)| fail(path, named(names, tag), p))
    }

    fn fixed(&mut self, width: usize) -> Result<(), Problem> {
        if self.left() < width {
            return Err(Problem::Truncated(width));
        }
        self.at += width;
        Ok(())
    }

    fn len_delimited(&mut self) -> Result<&'a [u8], Problem> {
        let len = self.varint().ok_or(Problem::BadLength)?;
        let left = self.left();
        let n = usize::try_from(len)
            .ok()
            .filter(|&n| n <= left)
            .ok_or(Problem::PastEnd { len, left })?;
        let start = self.at;
        self.at += n;
        self.buf
            .get(start..self.at)
            .ok_or(Problem::PastEnd { len, left })
    }
}

/// What is wrong with a field, named in `fail` with where it is.
#[derive(Debug, Clone, Copy)]
enum Problem {
    BadKey,
    KeyTooLarge(u64),
    FieldZero,
    BadWireType(u8),
    WireType {
        expected: &'static str,
        /// The wire types `expected` takes, unless it says them.
        how: &'static str,
        got: u8,
    },
    BadVarint,
    BadLength,
    Truncated(usize),
    PastEnd {
        len: u64,
        left: usize,
    },
    NotUtf8,
    PackedWidth {
        len: usize,
        width: usize,
    },
    PackedVarint,
    GroupMismatch {
        start: u32,
        end: u32,
    },
    UnexpectedEndGroup,
    UnendedGroup,
    RecursionLimit,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Problem::BadKey => f.write_str("invalid field key: truncated or over-long varint"),
            Problem::KeyTooLarge(key) => write!(f, "invalid field key {key}: over 32 bits"),
            Problem::FieldZero => f.write_str("invalid field number 0"),
            Problem::BadWireType(w) => write!(f, "invalid wire type {w}"),
            Problem::WireType { expected, how, got } => {
                write!(f, "expected {expected}{how}, got {}", wire_name(got))
            }
            Problem::BadVarint => f.write_str("truncated or over-long varint"),
            Problem::BadLength => f.write_str("invalid length: truncated or over-long varint"),
            Problem::Truncated(width) => write!(f, "truncated fixed{}", width * 8),
            Problem::PastEnd { len, left } => write!(
                f,
                "length {len} runs past the end of the enclosing message ({left} bytes left)"
            ),
            Problem::NotUtf8 => f.write_str("not valid UTF-8"),
            Problem::PackedWidth { len, width } => {
                write!(f, "packed length {len} is not a multiple of {width}")
            }
            Problem::PackedVarint => f.write_str("packed varints are truncated or over-long"),
            Problem::GroupMismatch { start, end } => {
                write!(f, "a group started as field {start} ends as field {end}")
            }
            Problem::UnexpectedEndGroup => f.write_str("an end-group without its start-group"),
            Problem::UnendedGroup => f.write_str("a group that never ends"),
            Problem::RecursionLimit => write!(
                f,
                "nested deeper than the decoder's recursion limit ({RECURSION_LIMIT})"
            ),
        }
    }
}

fn wire_name(wire: u8) -> &'static str {
    match wire {
        VARINT => "a varint",
        FIXED64 => "a fixed64",
        LEN => "a length-delimited field",
        START_GROUP => "a start-group",
        END_GROUP => "an end-group",
        FIXED32 => "a fixed32",
        _ => "an invalid wire type",
    }
}

/// Where a field is, rendered only for an error: `ModelInferRequest.inputs[2].contents`.
#[derive(Debug, Clone, Copy)]
enum Path<'a> {
    Root,
    /// A singular message field.
    Field(&'a Path<'a>, &'static str),
    /// The `index`th message of a repeated field.
    Item(&'a Path<'a>, &'static str, usize),
    /// The `index`th entry of a map field, with its bytes, to name it by its key.
    Entry(&'a Path<'a>, &'static str, usize, &'a [u8]),
}

impl fmt::Display for Path<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Path::Root => f.write_str("ModelInferRequest"),
            Path::Field(p, name) => write!(f, "{p}.{name}"),
            Path::Item(p, name, i) => write!(f, "{p}.{name}[{i}]"),
            Path::Entry(p, name, i, entry) => match entry_key(entry) {
                Some(key) => write!(f, "{p}.{name}[{key:?}]"),
                None => write!(f, "{p}.{name}[entry {i}]"),
            },
        }
    }
}

/// The top-level fields of a message that [`split_infer_request`] accepted (or any well
/// formed message): `(field number, value)`, the value of a length-delimited field being
/// its contents and of any other field its encoded bytes. Nothing is allocated; iteration
/// stops at anything unreadable.
pub fn fields(buf: &[u8]) -> impl Iterator<Item = (u32, &[u8])> {
    let mut c = Cursor::new(buf);
    std::iter::from_fn(move || {
        if c.done() {
            return None;
        }
        let (tag, wire) = c.key().ok()?;
        if wire == LEN {
            return c.len_delimited().ok().map(|v| (tag, v));
        }
        let start = c.at;
        skip(&mut c, tag, wire, RECURSION_LIMIT).ok()?;
        c.buf.get(start..c.at).map(|v| (tag, v))
    })
}

/// A map entry's key: the last field 1 read before anything unreadable, if it is a
/// string.
pub fn entry_key(entry: &[u8]) -> Option<&str> {
    let mut key = None;
    let mut c = Cursor::new(entry);
    while !c.done() {
        let Ok((tag, wire)) = c.key() else { break };
        if tag == 1 {
            match string(&mut c, wire) {
                Ok(k) => key = Some(k),
                Err(_) => return None,
            }
        } else if skip(&mut c, tag, wire, RECURSION_LIMIT).is_err() {
            break;
        }
    }
    key
}

/// A field number with its name in a message (`""` for an unknown field).
fn named(names: &[&'static str], tag: Option<u32>) -> Option<(u32, &'static str)> {
    let tag = tag?;
    let name = usize::try_from(tag)
        .ok()
        .and_then(|t| names.get(t.checked_sub(1)?))
        .copied()
        .unwrap_or("");
    Some((tag, name))
}

/// The error for `problem` at `field` of the message at `path`.
fn fail(path: &Path<'_>, field: Option<(u32, &str)>, problem: Problem) -> String {
    match field {
        Some((tag, "")) => format!("{path} (field {tag}): {problem}"),
        Some((tag, name)) => format!("{path}.{name} (field {tag}): {problem}"),
        None => format!("{path}: {problem}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::inference::infer_parameter::ParameterChoice;
    use prost::Message;

    #[test]
    fn the_hand_written_head_and_timeout_encode_as_prost_does() {
        for (model, version) in [
            ("digits_mlp", "1"),
            ("m", ""),
            ("", "7"),
            ("x".repeat(200).as_str(), "12"),
        ] {
            let want = ModelInferRequest {
                model_name: model.to_owned(),
                model_version: version.to_owned(),
                ..Default::default()
            };
            assert_eq!(
                head(model, version),
                want.encode_to_vec(),
                "{model:?} {version:?}"
            );
        }
        for us in [0i64, 1, 127, 128, 30_000_000, i64::MAX, -1] {
            let mut want = ModelInferRequest::default();
            want.parameters.insert(
                "timeout".to_owned(),
                InferParameter {
                    parameter_choice: Some(ParameterChoice::Int64Param(us)),
                },
            );
            assert_eq!(timeout_parameter(us), want.encode_to_vec(), "{us}");
        }
    }
    use crate::inference::InferTensorContents;
    use crate::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};

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
            let cut = &good[..cut];
            assert_eq!(
                split_infer_request(&Bytes::copy_from_slice(cut)).is_ok(),
                ModelInferRequest::decode(cut).is_ok(),
                "{cut:?}"
            );
        }
        assert!(
            split_infer_request(&Bytes::from_static(&[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f]))
                .is_err()
        );
        assert!(
            split_infer_request(&Bytes::from_static(&[0x0b])).is_err(),
            "a known field as a group"
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

    // Hand-built protobuf, for what prost never writes.
    fn key(tag: u32, wire: u8) -> Vec<u8> {
        varint_bytes(u64::from((tag << 3) | u32::from(wire)))
    }

    fn varint_bytes(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
        out
    }

    /// A varint field.
    fn vi(tag: u32, v: u64) -> Vec<u8> {
        [key(tag, VARINT), varint_bytes(v)].concat()
    }

    /// A length-delimited field.
    fn ld(tag: u32, body: &[u8]) -> Vec<u8> {
        [
            key(tag, LEN),
            varint_bytes(body.len() as u64),
            body.to_vec(),
        ]
        .concat()
    }

    /// `depth` unknown groups (field 9) nested, the innermost holding `inner`.
    fn groups(depth: usize, inner: &[u8]) -> Vec<u8> {
        let mut out = key(9, START_GROUP).repeat(depth);
        out.extend_from_slice(inner);
        out.extend(key(9, END_GROUP).repeat(depth));
        out
    }

    #[test]
    fn checks_every_field_like_prost() {
        let input = |body: &[u8]| ld(5, body);
        let contents = |body: &[u8]| input(&ld(5, body));
        let param = |k: &str, value: &[u8]| ld(4, &[ld(1, k.as_bytes()), ld(2, value)].concat());
        let over_long = [vec![0x48], vec![0xff; 10], vec![0x01]].concat();
        let ten_bytes_max = [vec![0x48], vec![0xff; 9], vec![0x01]].concat();
        let ten_bytes_over = [vec![0x48], vec![0xff; 9], vec![0x02]].concat();
        #[rustfmt::skip]
        let cases: Vec<(&str, Vec<u8>, Result<(), &str>)> = vec![
            ("empty", vec![], Ok(())),
            ("id as a varint", vi(3, 1),
                Err("ModelInferRequest.id (field 3): expected a string (length-delimited), got a varint")),
            ("model_name not UTF-8", ld(1, &[0xff]),
                Err("ModelInferRequest.model_name (field 1): not valid UTF-8")),
            ("model_version as a fixed32", [key(2, FIXED32), vec![0; 4]].concat(),
                Err("ModelInferRequest.model_version (field 2): expected a string (length-delimited), got a fixed32")),
            ("raw_input_contents as a varint", vi(7, 0),
                Err("ModelInferRequest.raw_input_contents (field 7): expected bytes (length-delimited), got a varint")),
            ("inputs as a start-group", [key(5, START_GROUP), key(5, END_GROUP)].concat(),
                Err("ModelInferRequest.inputs[0] (field 5): expected an InferInputTensor (length-delimited), got a start-group")),
            ("outputs as a varint", [input(&[]), vi(6, 3)].concat(),
                Err("ModelInferRequest.outputs[0] (field 6): expected an InferRequestedOutputTensor (length-delimited), got a varint")),
            ("inputs past the end", vec![0x2a, 0x05, 0x0a],
                Err("ModelInferRequest.inputs[0] (field 5): length 5 runs past the end of the enclosing message (1 bytes left)")),
            ("a name past the end of its input, not of the request",
                [vec![0x2a, 0x02, 0x0a, 0x05], b"hello".to_vec()].concat(),
                Err("ModelInferRequest.inputs[0].name (field 1): length 5 runs past the end of the enclosing message (0 bytes left)")),
            ("shape as a fixed32", [input(&[]), input(&[key(3, FIXED32), vec![0; 4]].concat())].concat(),
                Err("ModelInferRequest.inputs[1].shape (field 3): expected an int64 (varint, or packed length-delimited), got a fixed32")),
            ("shape packed, cut in a varint", input(&ld(3, &[0x01, 0x80])),
                Err("ModelInferRequest.inputs[0].shape (field 3): packed varints are truncated or over-long")),
            ("shape packed, an 11-byte varint", input(&ld(3, &[vec![0xff; 10], vec![0x01]].concat())),
                Err("ModelInferRequest.inputs[0].shape (field 3): packed varints are truncated or over-long")),
            ("shape packed and unpacked", input(&[ld(3, &[1, 2]), vi(3, 3), ld(3, &[])].concat()), Ok(())),
            ("datatype not UTF-8", input(&ld(2, &[0xc3, 0x28])),
                Err("ModelInferRequest.inputs[0].datatype (field 2): not valid UTF-8")),
            ("contents as a fixed32", input(&[key(5, FIXED32), vec![0; 4]].concat()),
                Err("ModelInferRequest.inputs[0].contents (field 5): expected an InferTensorContents (length-delimited), got a fixed32")),
            ("fp32_contents packed, 6 bytes", contents(&ld(6, &[0; 6])),
                Err("ModelInferRequest.inputs[0].contents.fp32_contents (field 6): packed length 6 is not a multiple of 4")),
            ("fp64_contents packed, 12 bytes", contents(&ld(7, &[0; 12])),
                Err("ModelInferRequest.inputs[0].contents.fp64_contents (field 7): packed length 12 is not a multiple of 8")),
            ("fp32_contents as a fixed64", contents(&[key(6, FIXED64), vec![0; 8]].concat()),
                Err("ModelInferRequest.inputs[0].contents.fp32_contents (field 6): expected a float (fixed32, or packed length-delimited), got a fixed64")),
            ("fp64_contents unpacked, cut", contents(&[key(7, FIXED64), vec![0; 7]].concat()),
                Err("ModelInferRequest.inputs[0].contents.fp64_contents (field 7): truncated fixed64")),
            ("bool_contents as a fixed32", contents(&[key(1, FIXED32), vec![0; 4]].concat()),
                Err("ModelInferRequest.inputs[0].contents.bool_contents (field 1): expected a bool (varint, or packed length-delimited), got a fixed32")),
            ("bytes_contents as a varint", contents(&vi(8, 1)),
                Err("ModelInferRequest.inputs[0].contents.bytes_contents (field 8): expected bytes (length-delimited), got a varint")),
            ("every contents field, unpacked, any varint for a bool or an int32", contents(&[
                vi(1, 7), vi(2, u64::MAX), vi(3, 1), vi(4, 1 << 40), vi(5, 1),
                key(6, FIXED32), vec![0; 4], key(7, FIXED64), vec![0; 8], ld(8, &[0xff]),
            ].concat()), Ok(())),
            ("a parameter's string not UTF-8", param("k", &ld(3, &[0xc3])),
                Err(r#"ModelInferRequest.parameters["k"].string_param (field 3): not valid UTF-8"#)),
            ("a parameter's double as a varint", param("timeout", &vi(4, 1)),
                Err(r#"ModelInferRequest.parameters["timeout"].double_param (field 4): expected a double (fixed64), got a varint"#)),
            ("a parameter's int64 as a fixed64", param("t", &[key(2, FIXED64), vec![0; 8]].concat()),
                Err(r#"ModelInferRequest.parameters["t"].int64_param (field 2): expected an int64 (varint), got a fixed64"#)),
            ("a parameter key not UTF-8", ld(4, &ld(1, &[0xff])),
                Err("ModelInferRequest.parameters[entry 0].key (field 1): not valid UTF-8")),
            ("a parameter entry as a varint", [param("a", &[]), vi(4, 1)].concat(),
                Err("ModelInferRequest.parameters[entry 1] (field 4): expected a map entry (length-delimited), got a varint")),
            ("an output parameter's value as a varint",
                ld(6, &[ld(1, b"out"), ld(2, &[ld(1, b"k"), vi(2, 1)].concat())].concat()),
                Err(r#"ModelInferRequest.outputs[0].parameters["k"].value (field 2): expected an InferParameter (length-delimited), got a varint"#)),
            ("an input parameter's bool as a fixed32",
                input(&ld(4, &[ld(2, &[key(1, FIXED32), vec![0; 4]].concat()), ld(1, b"k")].concat())),
                Err(r#"ModelInferRequest.inputs[0].parameters["k"].bool_param (field 1): expected a bool (varint), got a fixed32"#)),
            ("a map entry's value before its key, values repeated, unknown fields",
                ld(4, &[ld(2, &vi(2, 5)), vi(3, 1), ld(1, b"timeout"), ld(2, &[])].concat()), Ok(())),
            ("an over-long varint", over_long,
                Err("ModelInferRequest (field 9): truncated or over-long varint")),
            ("a 10-byte varint, 10th byte 1", ten_bytes_max, Ok(())),
            ("a 10-byte varint, 10th byte 2", ten_bytes_over,
                Err("ModelInferRequest (field 9): truncated or over-long varint")),
            ("a truncated key", vec![0x80],
                Err("ModelInferRequest: invalid field key: truncated or over-long varint")),
            ("a key over 32 bits", vec![0x80, 0x80, 0x80, 0x80, 0x10],
                Err("ModelInferRequest: invalid field key 4294967296: over 32 bits")),
            ("field number 0", vec![0x00, 0x00],
                Err("ModelInferRequest: invalid field number 0")),
            ("wire type 6 on a known field", vec![0x0e],
                Err("ModelInferRequest.model_name (field 1): invalid wire type 6")),
            ("wire type 7 on an unknown field", key(9, 7),
                Err("ModelInferRequest (field 9): invalid wire type 7")),
            ("an unknown length past the end", [key(9, LEN), vec![3, 0]].concat(),
                Err("ModelInferRequest (field 9): length 3 runs past the end of the enclosing message (1 bytes left)")),
            ("an unknown fixed64, cut", [key(9, FIXED64), vec![0; 7]].concat(),
                Err("ModelInferRequest (field 9): truncated fixed64")),
            ("unknown fields of every wire type are skipped", [
                vi(9, 1), key(10, FIXED64), vec![0; 8], ld(11, &[0xff]), key(12, FIXED32), vec![0; 4],
                groups(2, &[vi(1, 1), ld(2, &[0xff])].concat()),
            ].concat(), Ok(())),
            ("an unknown group in a parameter", param("k", &groups(1, &vi(1, 1))), Ok(())),
            ("an unknown group in contents, unended", contents(&key(9, START_GROUP)),
                Err("ModelInferRequest.inputs[0].contents (field 9): a group that never ends")),
            ("a group ended by another field", [key(9, START_GROUP), key(8, END_GROUP)].concat(),
                Err("ModelInferRequest (field 9): a group started as field 9 ends as field 8")),
            ("an end-group alone", key(9, END_GROUP),
                Err("ModelInferRequest (field 9): an end-group without its start-group")),
            ("groups 99 deep around a field", groups(99, &vi(1, 1)), Ok(())),
            ("groups 100 deep around a field", groups(100, &vi(1, 1)),
                Err("ModelInferRequest (field 9): nested deeper than the decoder's recursion limit (100)")),
            ("empty groups 100 deep", groups(100, &[]), Ok(())),
            ("empty groups 101 deep", groups(101, &[]),
                Err("ModelInferRequest (field 9): nested deeper than the decoder's recursion limit (100)")),
            ("empty groups 98 deep in a parameter", param("k", &groups(98, &[])), Ok(())),
            ("empty groups 99 deep in a parameter", param("k", &groups(99, &[])),
                Err(r#"ModelInferRequest.parameters["k"] (field 9): nested deeper than the decoder's recursion limit (100)"#)),
        ];
        for (name, bytes, want) in cases {
            let got = split_infer_request(&Bytes::from(bytes.clone()));
            assert_eq!(
                got.as_ref().map(drop).map_err(ToString::to_string),
                want.map_err(String::from),
                "{name}"
            );
            assert_eq!(
                ModelInferRequest::decode(&bytes[..]).is_ok(),
                want.is_ok(),
                "{name}: prost disagrees"
            );
        }
    }

    #[test]
    fn reads_the_timeout_prost_would_decode() {
        let entry = |body: Vec<u8>| ld(4, &body);
        let ok = |bytes: Vec<u8>| split_infer_request(&Bytes::from(bytes)).unwrap().timeout_us;
        let int64 = |v: u64| ld(2, &vi(2, v));
        assert_eq!(ok(entry([ld(1, b"timeout"), int64(5)].concat())), Some(5));
        assert_eq!(ok(entry([int64(5), ld(1, b"timeout")].concat())), Some(5));
        assert_eq!(
            ok(entry([ld(1, b"timeout"), ld(2, &vi(5, 7))].concat())),
            Some(7)
        );
        assert_eq!(
            ok(entry([ld(1, b"timeout"), int64(u64::MAX)].concat())),
            None,
            "-1"
        );
        assert_eq!(
            ok(entry(
                [ld(1, b"timeout"), int64(5), ld(2, &vi(1, 1))].concat()
            )),
            None,
            "the oneof ends as a bool"
        );
        assert_eq!(
            ok(entry([ld(1, b"timeout"), int64(5), ld(2, &[])].concat())),
            Some(5),
            "an empty value merges into the first"
        );
        assert_eq!(
            ok([
                entry([ld(1, b"timeout"), int64(5)].concat()),
                entry([ld(1, b"timeout")].concat())
            ]
            .concat()),
            None,
            "the last entry wins"
        );
        assert_eq!(ok(entry([ld(1, b"other"), int64(5)].concat())), None);
    }

    /// Valid requests: one with every kind of field from prost, a small one, and one
    /// hand-built with what prost never writes (unpacked numbers, unknown fields, groups,
    /// a map entry's value before its key).
    fn valid_requests() -> Vec<Vec<u8>> {
        // Map entries are written here, in a fixed order: prost writes a `HashMap` in an
        // order that changes from run to run, and the mutations would with it.
        let params = [
            ("b", ParameterChoice::BoolParam(true)),
            ("i", ParameterChoice::Int64Param(-3)),
            ("s", ParameterChoice::StringParam("é".into())),
            ("d", ParameterChoice::DoubleParam(0.5)),
            ("u", ParameterChoice::Uint64Param(1 << 40)),
            ("timeout", ParameterChoice::Uint64Param(250)),
        ];
        let entries = |tag: u32, list: &[(&str, ParameterChoice)]| -> Vec<u8> {
            let entry = |(k, c): &(&str, ParameterChoice)| {
                let value = InferParameter {
                    parameter_choice: Some(c.clone()),
                };
                ld(
                    tag,
                    &[ld(1, k.as_bytes()), ld(2, &value.encode_to_vec())].concat(),
                )
            };
            list.iter().flat_map(entry).collect()
        };
        let top = ModelInferRequest {
            model_name: "digits".into(),
            model_version: "3".into(),
            id: "req-1".into(),
            raw_input_contents: vec![Bytes::from_static(&[0, 0, 0x80, 0x3f, 0, 0, 0, 0x40])],
            ..Default::default()
        }
        .encode_to_vec();
        let input0 = InferInputTensor {
            name: "INPUT0".into(),
            datatype: "INT64".into(),
            shape: vec![2, 300],
            parameters: HashMap::new(),
            contents: Some(InferTensorContents {
                bool_contents: vec![true, false],
                int_contents: vec![-1, 1 << 20],
                int64_contents: vec![-(1 << 40), 7],
                uint_contents: vec![u32::MAX, 0],
                uint64_contents: vec![u64::MAX, 1],
                fp32_contents: vec![1.5, -0.0],
                fp64_contents: vec![2.25],
                bytes_contents: vec![b"ab".to_vec(), vec![0xff, 0x00]],
            }),
        }
        .encode_to_vec();
        let input1 = InferInputTensor {
            name: "INPUT1".into(),
            datatype: "FP32".into(),
            shape: vec![1, 2],
            ..Default::default()
        }
        .encode_to_vec();
        let output0 = InferRequestedOutputTensor {
            name: "OUT".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let full = [
            top.clone(),
            entries(4, &params),
            ld(5, &[input0.clone(), entries(4, &params)].concat()),
            ld(5, &input1),
            ld(
                6,
                &[
                    output0,
                    entries(2, &[("classification", ParameterChoice::Int64Param(3))]),
                ]
                .concat(),
            ),
            ld(6, &[]),
        ]
        .concat();
        let one_input = [top, ld(5, &input0)].concat();
        let small = request().encode_to_vec();
        let hand = [
            ld(1, b"m"),
            vi(9, 300),
            ld(
                5,
                &[
                    ld(1, b"x"),
                    vi(3, 4),
                    vi(3, 5),
                    groups(2, &vi(1, 1)),
                    ld(4, &[ld(2, &vi(2, 8)), ld(1, b"k")].concat()),
                    ld(
                        5,
                        &[vi(2, 1), vi(2, 2), key(6, FIXED32), vec![0; 4]].concat(),
                    ),
                ]
                .concat(),
            ),
            ld(4, &[ld(1, b"timeout"), ld(2, &vi(2, 40))].concat()),
            [key(10, FIXED64), vec![1; 8]].concat(),
            ld(2, b"v"),
        ]
        .concat();
        vec![full, small, hand, one_input]
    }

    /// xorshift64*, so the mutations are the same on every run.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
        const INTERESTING: &[u8] = &[0x00, 0x01, 0x02, 0x7f, 0x80, 0xff, 0x0b, 0x0c, 0x0e];
        let at = rng.below(bytes.len());
        let random = rng.next() as u8;
        match rng.below(8) {
            0 if !bytes.is_empty() => bytes[at] ^= 1 << (random % 8),
            1 if !bytes.is_empty() => bytes[at] = random,
            2 => bytes.insert(at, random),
            3 if !bytes.is_empty() => {
                bytes.remove(at);
            }
            4 if !bytes.is_empty() => bytes[at] = INTERESTING[rng.below(INTERESTING.len())],
            // Another wire type, or another field number.
            5 if !bytes.is_empty() => bytes[at] = (bytes[at] & !7) | (random & 7),
            6 if !bytes.is_empty() => bytes[at] = (random & 0x78) | (bytes[at] & 7),
            _ => {
                let len = rng.below(8);
                let from = rng.below(bytes.len().saturating_sub(len));
                let piece = bytes[from..(from + len).min(bytes.len())].to_vec();
                let to = rng.below(bytes.len());
                bytes.splice(to..to, piece);
            }
        }
    }

    fn has_nan(r: &ModelInferRequest) -> bool {
        let params = |m: &HashMap<String, InferParameter>| {
            m.values().any(
                |p| matches!(p.parameter_choice, Some(ParameterChoice::DoubleParam(d)) if d.is_nan()),
            )
        };
        params(&r.parameters)
            || r.outputs.iter().any(|o| params(&o.parameters))
            || r.inputs.iter().any(|i| {
                params(&i.parameters)
                    || i.contents.as_ref().is_some_and(|c| {
                        c.fp32_contents.iter().any(|x| x.is_nan())
                            || c.fp64_contents.iter().any(|x| x.is_nan())
                    })
            })
    }

    /// What forwarding must deliver: prost's decoding of the client's bytes, with the
    /// target's model and version and the shorter of the two timeouts.
    fn check_forwarding(bytes: &[u8], m: &InferMessage) {
        let client = ModelInferRequest::decode(bytes).unwrap();
        assert_eq!(m.model_name, client.model_name, "{bytes:?}");
        assert_eq!(m.model_version, client.model_version, "{bytes:?}");
        let timeout = match client
            .parameters
            .get("timeout")
            .and_then(|p| p.parameter_choice.clone())
        {
            Some(ParameterChoice::Int64Param(v)) if v > 0 => u64::try_from(v).ok(),
            Some(ParameterChoice::Uint64Param(v)) if v > 0 => Some(v),
            _ => None,
        };
        assert_eq!(m.timeout_us, timeout, "{bytes:?}");
        let forwarded = ModelInferRequest::decode(&m.chunks("target", "7", 5_000).concat()[..])
            .expect("forwarded bytes decode");
        let mut want = client;
        want.model_name = "target".into();
        want.model_version = "7".into();
        want.parameters.insert(
            "timeout".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(
                    timeout.map_or(5_000, |t| t.min(5_000)) as i64,
                )),
            },
        );
        if !has_nan(&want) {
            assert_eq!(forwarded, want, "{bytes:?}");
        }
    }

    #[test]
    fn accepts_exactly_what_prost_decodes() {
        const MUTATIONS_PER_REQUEST: usize = 5_000;
        let mut rng = Rng(0x5eed_cafe_f00d_d00d);
        let (mut valid, mut invalid) = (0, 0);
        for base in valid_requests() {
            let m = split_infer_request(&Bytes::from(base.clone())).expect("a valid request");
            check_forwarding(&base, &m);
            for _ in 0..MUTATIONS_PER_REQUEST {
                let mut bytes = base.clone();
                for _ in 0..=rng.below(3) {
                    mutate(&mut rng, &mut bytes);
                }
                let ours = split_infer_request(&Bytes::from(bytes.clone()));
                let prost = ModelInferRequest::decode(&bytes[..]);
                assert_eq!(
                    ours.is_ok(),
                    prost.is_ok(),
                    "{bytes:?}: ours {:?}, prost {:?}",
                    ours.as_ref().map(drop),
                    prost.map(drop)
                );
                match ours {
                    Ok(m) => {
                        valid += 1;
                        check_forwarding(&bytes, &m);
                    }
                    Err(_) => invalid += 1,
                }
            }
        }
        eprintln!(
            "{} mutations: {valid} valid, {invalid} invalid",
            valid + invalid
        );
        assert!(
            valid > 1_000 && invalid > 1_000,
            "{valid} valid, {invalid} invalid"
        );
    }

    #[test]
    fn a_request_that_would_decode_much_larger_than_it_is_refused() {
        // 2 bytes on the wire, a whole InferInputTensor in memory.
        let empty_inputs: Vec<u8> = std::iter::repeat_n([0x2a, 0x00], 1 << 18)
            .flatten()
            .collect();
        let empty_outputs: Vec<u8> = std::iter::repeat_n([0x32, 0x00], 1 << 18)
            .flatten()
            .collect();
        let empty_params: Vec<u8> = std::iter::repeat_n([0x22, 0x00], 1 << 18)
            .flatten()
            .collect();
        let empty_raw: Vec<u8> = std::iter::repeat_n([0x3a, 0x00], 1 << 18)
            .flatten()
            .collect();
        for (name, bytes) in [
            ("inputs", empty_inputs),
            ("outputs", empty_outputs),
            ("parameters", empty_params),
            ("raw_input_contents", empty_raw),
        ] {
            let err = check_infer_request(&bytes).unwrap_err();
            let WireError::TooLarge {
                len,
                decoded,
                limit,
            } = err
            else {
                panic!("{name}: {err}");
            };
            assert_eq!(
                (len, limit),
                (bytes.len(), decoded_limit(bytes.len())),
                "{name}"
            );
            assert!(decoded > limit, "{name}");
            assert!(err.to_string().contains("once decoded"), "{name}: {err}");
            assert!(matches!(
                split_infer_request(&Bytes::from(bytes)),
                Err(WireError::TooLarge { .. })
            ));
        }
    }

    #[test]
    fn tensors_sent_as_chunks_of_their_own_decode_as_raw_input_contents() {
        let mut r = request();
        let tensor = r.raw_input_contents.pop().unwrap();
        let mut m = split_infer_request(&Bytes::from(r.encode_to_vec())).unwrap();
        m.tensors.push(tensor.clone());
        let bytes = m.chunks("digits", "v1.1.0", 900).concat();
        let decoded = ModelInferRequest::decode(&bytes[..]).unwrap();
        assert_eq!(decoded, request());
        assert!(
            m.chunks("digits", "", 900)
                .iter()
                .any(|c| c.as_ptr() == tensor.as_ptr())
        );
        let big = raw_input_key(300);
        assert_eq!(&big[..], &[0x3a, 0xac, 0x02]);
    }

    #[test]
    fn honest_requests_fit_their_decoded_limit() {
        // Raw tensors decode to their own size.
        let mut r = request();
        r.raw_input_contents = vec![Bytes::from(vec![7u8; 4 << 20])];
        let bytes = r.encode_to_vec();
        let size = check_infer_request(&bytes).unwrap();
        assert!(
            size.0 >= 4 << 20 && size.0 <= bytes.len() + 4096,
            "{size:?}"
        );
        // A packed int64 of small values: 1 byte each on the wire, 8 in memory, still in.
        let mut r = request();
        r.raw_input_contents.clear();
        r.inputs[0].contents = Some(InferTensorContents {
            int64_contents: vec![1; 4 << 20],
            ..Default::default()
        });
        let bytes = r.encode_to_vec();
        let size = check_infer_request(&bytes).unwrap();
        assert!(size.0 >= 8 * (4 << 20), "{size:?}");
        // Many small tensors with names and parameters: the allowance covers them.
        let mut r = request();
        r.inputs = (0..64)
            .map(|i| InferInputTensor {
                name: format!("INPUT__{i}"),
                datatype: "FP32".into(),
                shape: vec![1, 4],
                ..Default::default()
            })
            .collect();
        r.raw_input_contents = vec![Bytes::from_static(&[0; 16]); 64];
        assert!(check_infer_request(&r.encode_to_vec()).is_ok());
    }
}
