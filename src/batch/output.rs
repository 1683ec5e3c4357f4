//! The output of a batch job, written from the journal once every chunk is done, in row
//! order: one row per answered input row with its row id, each requested output, the target
//! that answered and the route's strategy headers (JSON Lines, CSV, `.npz` or Parquet), and
//! the failed rows in an errors file (JSON Lines) with their status and message. Both are
//! written to a temporary file and renamed into place.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use switchyard_proto::ElementType;

use super::data::{Format, beside};
use super::journal::{ChunkRecord, Records};

/// The headers written as columns: `x-switchyard-cascade-stage` → `cascade_stage`. The
/// route and target have columns of their own.
pub(crate) fn column_of(header: &str) -> Option<String> {
    let rest = header.strip_prefix("x-switchyard-")?;
    (rest != "target" && rest != "route").then(|| rest.replace('-', "_"))
}

/// One output tensor of an answered chunk, split into rows.
struct Out<'a> {
    dtype: ElementType,
    width: usize,
    /// Per-row shape.
    shape: Vec<i64>,
    bytes: &'a [u8],
    per_row: usize,
}

/// The requested outputs of a chunk's answer, in the order asked.
fn outputs<'a>(rec: &'a ChunkRecord, names: &[String]) -> Result<Vec<Out<'a>>> {
    let resp = rec
        .response
        .as_ref()
        .ok_or_else(|| anyhow!("chunk {} has no answer", rec.index))?;
    let rows = rec.rows as usize;
    names
        .iter()
        .map(|name| {
            let at = |m: String| {
                anyhow!(
                    "chunk {} (rows {}..{}), output `{name}`: {m}",
                    rec.index,
                    rec.first_row,
                    rec.first_row + u64::from(rec.rows)
                )
            };
            let k = resp
                .outputs
                .iter()
                .position(|o| &o.name == name)
                .ok_or_else(|| at("not in the answer".into()))?;
            let o = &resp.outputs[k];
            let dtype = ElementType::from_wire(&o.datatype)
                .ok_or_else(|| at(format!("datatype `{}`", o.datatype)))?;
            let width = dtype.byte_size().ok_or_else(|| {
                at("BYTES outputs are not supported by `switchyard batch`".into())
            })?;
            let bytes = resp
                .raw_output_contents
                .get(k)
                .map(|b| &b[..])
                .ok_or_else(|| at("the answer has no raw_output_contents".into()))?;
            if rows == 0 || bytes.len() % (rows * width) != 0 {
                return Err(at(format!(
                    "{} bytes do not split into {rows} rows",
                    bytes.len()
                )));
            }
            let shape = if o.shape.len() > 1 {
                o.shape[1..].to_vec()
            } else {
                vec![(bytes.len() / rows / width) as i64]
            };
            Ok(Out {
                dtype,
                width,
                shape,
                bytes,
                per_row: bytes.len() / rows,
            })
        })
        .collect()
}

impl Out<'_> {
    fn row(&self, r: usize) -> &[u8] {
        &self.bytes[r * self.per_row..(r + 1) * self.per_row]
    }
}

/// Writes element `raw` as a JSON/CSV number (floats in their shortest exact form).
fn number(dtype: ElementType, raw: &[u8], out: &mut Vec<u8>) {
    use ElementType as E;
    macro_rules! int {
        ($t:ty) => {{
            let v = <$t>::from_le_bytes(raw.try_into().unwrap_or_default());
            let _ = write!(out, "{v}");
        }};
    }
    let float = |v: f32, out: &mut Vec<u8>| {
        if v.is_finite() {
            let _ = serde_json::to_writer(&mut *out, &v);
        } else {
            out.extend_from_slice(b"null");
        }
    };
    match dtype {
        E::Fp32 => float(f32::from_le_bytes(raw.try_into().unwrap_or_default()), out),
        E::Fp16 => float(
            half::f16::from_le_bytes(raw.try_into().unwrap_or_default()).to_f32(),
            out,
        ),
        E::Bf16 => float(
            half::bf16::from_le_bytes(raw.try_into().unwrap_or_default()).to_f32(),
            out,
        ),
        E::Fp64 => {
            let v = f64::from_le_bytes(raw.try_into().unwrap_or_default());
            if v.is_finite() {
                let _ = serde_json::to_writer(&mut *out, &v);
            } else {
                out.extend_from_slice(b"null");
            }
        }
        E::Int8 => int!(i8),
        E::Int16 => int!(i16),
        E::Int32 => int!(i32),
        E::Int64 => int!(i64),
        E::Uint8 => int!(u8),
        E::Uint16 => int!(u16),
        E::Uint32 => int!(u32),
        E::Uint64 => int!(u64),
        E::Bool => out.extend_from_slice(if raw[0] != 0 { b"true" } else { b"false" }),
        E::Bytes => {}
    }
}

/// Where the output goes, and what it holds.
#[derive(Debug)]
pub(crate) struct Plan {
    pub(crate) path: PathBuf,
    pub(crate) format: Format,
    pub(crate) errors: PathBuf,
    pub(crate) outputs: Vec<String>,
    /// Strategy header columns, in order (every header seen in the journal).
    pub(crate) meta: Vec<String>,
}

/// What the writing counted.
#[derive(Debug, Default)]
pub(crate) struct Written {
    pub(crate) rows_ok: u64,
    pub(crate) rows_failed: u64,
}

/// Writes the output and the errors file from the journal's records (in chunk order).
pub(crate) fn write(plan: &Plan, records: Records) -> Result<Written> {
    let tmp = beside(&plan.path, ".partial");
    let etmp = beside(&plan.errors, ".partial");
    // Created at the first failed row.
    let mut errors: Option<BufWriter<std::fs::File>> = None;
    let mut written = Written::default();
    let mut sink = Sink::new(plan, &tmp)?;
    for rec in records {
        let rec = rec?;
        if rec.code != 0 {
            for r in 0..u64::from(rec.rows) {
                let line = serde_json::json!({
                    "row": rec.first_row + r,
                    "status": super::code_name(rec.code),
                    "grpc_status": rec.code,
                    "message": rec.message,
                    "attempts": rec.attempts,
                });
                let w = match &mut errors {
                    Some(w) => w,
                    None => errors
                        .insert(BufWriter::new(std::fs::File::create(&etmp).with_context(
                            || format!("{}: cannot create", etmp.display()),
                        )?)),
                };
                serde_json::to_writer(&mut *w, &line)?;
                w.write_all(b"\n")?;
            }
            written.rows_failed += u64::from(rec.rows);
            continue;
        }
        let outs = outputs(&rec, &plan.outputs)?;
        sink.chunk(plan, &rec, &outs)?;
        written.rows_ok += u64::from(rec.rows);
    }
    sink.finish()?;
    if let Some(mut w) = errors {
        w.flush()?;
        w.get_ref().sync_all()?;
    }
    std::fs::rename(&tmp, &plan.path)
        .with_context(|| format!("{}: cannot rename into place", plan.path.display()))?;
    if written.rows_failed > 0 {
        std::fs::rename(&etmp, &plan.errors)?;
    } else {
        let _ = std::fs::remove_file(&plan.errors);
    }
    Ok(written)
}

/// A format's writer.
enum Sink {
    Jsonl(BufWriter<std::fs::File>),
    Csv(Box<csv::Writer<std::fs::File>>, bool),
    Columns(Box<Columns>),
}

/// An output's element type, per-row shape and bytes of every row so far.
type Gathered = (ElementType, Vec<i64>, Vec<u8>);

/// Columnar outputs (npz, Parquet) are gathered, then written at the end.
struct Columns {
    path: PathBuf,
    format: Format,
    rows: Vec<u64>,
    target: Vec<String>,
    /// (column name, value per row) of each strategy header.
    meta: Vec<(String, Vec<Option<String>>)>,
    /// Each output by name, once its first chunk is in.
    outs: Vec<(String, Option<Gathered>)>,
}

impl Sink {
    fn new(plan: &Plan, tmp: &Path) -> Result<Self> {
        let create = || {
            std::fs::File::create(tmp).with_context(|| format!("{}: cannot create", tmp.display()))
        };
        Ok(match plan.format {
            Format::Jsonl => Self::Jsonl(BufWriter::with_capacity(1 << 20, create()?)),
            Format::Csv => Self::Csv(Box::new(csv::Writer::from_writer(create()?)), false),
            Format::Npz | Format::Parquet => Self::Columns(Box::new(Columns {
                path: tmp.to_owned(),
                format: plan.format,
                rows: Vec::new(),
                target: Vec::new(),
                meta: plan
                    .meta
                    .iter()
                    .map(|m| (column_of(m).unwrap_or_else(|| m.clone()), Vec::new()))
                    .collect(),
                outs: plan.outputs.iter().map(|o| (o.clone(), None)).collect(),
            })),
            Format::Npy => bail!(
                "{}: a .npy file holds one array and no row ids or targets; write .npz (one array per output, plus `row` and `target`)",
                plan.path.display()
            ),
        })
    }

    fn chunk(&mut self, plan: &Plan, rec: &ChunkRecord, outs: &[Out<'_>]) -> Result<()> {
        let target = rec.target();
        let meta: Vec<Option<&str>> = plan
            .meta
            .iter()
            .map(|m| {
                rec.headers
                    .iter()
                    .find(|h| &h.name == m)
                    .map(|h| h.value.as_str())
            })
            .collect();
        match self {
            Self::Jsonl(w) => {
                let mut line = Vec::with_capacity(256);
                for r in 0..rec.rows as usize {
                    line.clear();
                    let _ = write!(line, "{{\"row\":{},\"target\":", rec.first_row + r as u64);
                    serde_json::to_writer(&mut line, &target)?;
                    for (m, v) in plan.meta.iter().zip(&meta) {
                        if let (Some(col), Some(v)) = (column_of(m), v) {
                            let _ = write!(line, ",\"{col}\":");
                            serde_json::to_writer(&mut line, v)?;
                        }
                    }
                    for (name, o) in plan.outputs.iter().zip(outs) {
                        line.push(b',');
                        serde_json::to_writer(&mut line, name)?;
                        line.extend_from_slice(b":[");
                        for (k, e) in o.row(r).chunks_exact(o.width).enumerate() {
                            if k > 0 {
                                line.push(b',');
                            }
                            number(o.dtype, e, &mut line);
                        }
                        line.push(b']');
                    }
                    line.extend_from_slice(b"}\n");
                    w.write_all(&line)?;
                }
            }
            Self::Csv(w, header) => {
                if !*header {
                    let mut names = vec!["row".to_owned(), "target".to_owned()];
                    names.extend(plan.meta.iter().filter_map(|m| column_of(m)));
                    for (name, o) in plan.outputs.iter().zip(outs) {
                        names.extend((0..o.per_row / o.width).map(|k| format!("{name}_{k}")));
                    }
                    w.write_record(&names)?;
                    *header = true;
                }
                let mut cell = Vec::new();
                for r in 0..rec.rows as usize {
                    w.write_field((rec.first_row + r as u64).to_string())?;
                    w.write_field(&target)?;
                    for (m, v) in plan.meta.iter().zip(&meta) {
                        if column_of(m).is_some() {
                            w.write_field(v.unwrap_or(""))?;
                        }
                    }
                    for o in outs {
                        for e in o.row(r).chunks_exact(o.width) {
                            cell.clear();
                            number(o.dtype, e, &mut cell);
                            w.write_field(&cell)?;
                        }
                    }
                    w.write_record(None::<&[u8]>)?;
                }
            }
            Self::Columns(c) => {
                for r in 0..u64::from(rec.rows) {
                    c.rows.push(rec.first_row + r);
                    c.target.push(target.clone());
                    for ((_, col), v) in c.meta.iter_mut().zip(&meta) {
                        col.push(v.map(str::to_owned));
                    }
                }
                for ((_, slot), o) in c.outs.iter_mut().zip(outs) {
                    let (dtype, shape, bytes) =
                        slot.get_or_insert_with(|| (o.dtype, o.shape.clone(), Vec::new()));
                    if *dtype != o.dtype || *shape != o.shape {
                        bail!(
                            "chunk {}: an output changed type or shape between chunks ({} {:?}, then {} {:?}); write JSON Lines instead",
                            rec.index,
                            dtype.as_str(),
                            shape,
                            o.dtype.as_str(),
                            o.shape
                        );
                    }
                    bytes.extend_from_slice(o.bytes);
                }
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        match self {
            Self::Jsonl(mut w) => {
                w.flush()?;
                w.get_ref().sync_all()?;
            }
            Self::Csv(mut w, _) => {
                w.flush()?;
                w.get_ref().sync_all()?;
            }
            Self::Columns(c) => c.write()?,
        }
        Ok(())
    }
}

/// NumPy's `descr` for an element type (bfloat16, which NumPy lacks, as its raw bits).
fn descr(dtype: ElementType) -> &'static str {
    match dtype {
        ElementType::Bf16 => "<u2",
        ElementType::Bytes => "|O",
        other => super::data::native(other),
    }
}

/// A `.npy` member: format version 1.0, the header padded to 64 bytes, then `data`.
fn npy(descr: &str, shape: &[u64], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    let dims = if dims.len() == 1 {
        format!("{},", dims[0])
    } else {
        dims.join(", ")
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Strings as NumPy's `<U{n}`: UTF-32 code points, padded with zeros.
fn unicode(values: &[Option<String>]) -> (String, Vec<u8>) {
    let n = values
        .iter()
        .map(|v| v.as_deref().map_or(0, |s| s.chars().count()))
        .max()
        .unwrap_or(0)
        .max(1);
    let mut data = Vec::with_capacity(values.len() * n * 4);
    for v in values {
        let s = v.as_deref().unwrap_or("");
        let mut k = 0;
        for c in s.chars() {
            data.extend_from_slice(&u32::from(c).to_le_bytes());
            k += 1;
        }
        data.resize(data.len() + (n - k) * 4, 0);
    }
    (format!("<U{n}"), data)
}

impl Columns {
    fn write(self) -> Result<()> {
        match self.format {
            Format::Npz => self.write_npz(),
            _ => self.write_parquet(),
        }
    }

    /// One array per output (`[rows, per-row dims…]`, the model's element type), `row`
    /// (int64), `target` and one per strategy header (unicode strings).
    fn write_npz(self) -> Result<()> {
        let file = std::fs::File::create(&self.path)?;
        let mut zip = zip::ZipWriter::new(BufWriter::new(file));
        let options = zip::write::FileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        let n = self.rows.len() as u64;
        let mut member = |name: &str, bytes: Vec<u8>| -> Result<()> {
            zip.start_file(format!("{name}.npy"), options)?;
            zip.write_all(&bytes)?;
            Ok(())
        };
        let rows: Vec<u8> = self
            .rows
            .iter()
            .flat_map(|&r| (r as i64).to_le_bytes())
            .collect();
        member("row", npy("<i8", &[n], &rows))?;
        let targets: Vec<Option<String>> = self.target.into_iter().map(Some).collect();
        let (d, bytes) = unicode(&targets);
        member("target", npy(&d, &[n], &bytes))?;
        for (name, values) in &self.meta {
            let (d, bytes) = unicode(values);
            member(name, npy(&d, &[n], &bytes))?;
        }
        for (name, out) in self.outs {
            let Some((dtype, shape, bytes)) = out else {
                continue;
            };
            let mut full = vec![n];
            full.extend(shape.iter().map(|&d| d.max(0) as u64));
            member(&name, npy(descr(dtype), &full, &bytes))?;
        }
        let mut w = zip.finish()?;
        w.flush()?;
        w.get_ref().sync_all()?;
        Ok(())
    }

    /// `row` (uint64), `target` and the strategy headers (utf8), and each output as a
    /// fixed-size list of its element type (its per-row shape in the field's metadata),
    /// snappy-compressed.
    fn write_parquet(self) -> Result<()> {
        use arrow_array::{
            Array, ArrayRef, FixedSizeListArray, RecordBatch, StringArray, UInt64Array,
        };
        use arrow_schema::{Field, Schema};
        let mut fields = vec![
            Field::new("row", arrow_schema::DataType::UInt64, false),
            Field::new("target", arrow_schema::DataType::Utf8, false),
        ];
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(UInt64Array::from(self.rows)),
            Arc::new(StringArray::from(self.target)),
        ];
        for (name, values) in self.meta {
            fields.push(Field::new(name, arrow_schema::DataType::Utf8, true));
            arrays.push(Arc::new(StringArray::from(values)));
        }
        for (name, out) in self.outs {
            let Some((dtype, shape, bytes)) = out else {
                continue;
            };
            let values = arrow_values(dtype, &bytes);
            let per_row: i64 = shape.iter().product();
            let item = Arc::new(Field::new("item", values.data_type().clone(), false));
            let list = FixedSizeListArray::try_new(item, per_row as i32, values, None)?;
            let meta = std::collections::HashMap::from([(
                "switchyard.shape".to_owned(),
                serde_json::to_string(&shape)?,
            )]);
            fields.push(Field::new(name, list.data_type().clone(), false).with_metadata(meta));
            arrays.push(Arc::new(list));
        }
        let schema = Arc::new(Schema::new(fields));
        let batch = RecordBatch::try_new(schema.clone(), arrays)?;
        let props = parquet::file::properties::WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build();
        let file = std::fs::File::create(&self.path)?;
        let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, Some(props))?;
        writer.write(&batch)?;
        let file = writer.into_inner()?;
        file.sync_all()?;
        Ok(())
    }
}

/// Little-endian elements as an arrow array (bfloat16, which arrow lacks, as float32).
fn arrow_values(dtype: ElementType, bytes: &[u8]) -> arrow_array::ArrayRef {
    use ElementType as E;
    use arrow_array::types::*;
    use arrow_array::{BooleanArray, PrimitiveArray};
    macro_rules! prim {
        ($arrow:ty, $t:ty) => {{
            let w = std::mem::size_of::<$t>();
            Arc::new(PrimitiveArray::<$arrow>::from_iter_values(
                bytes
                    .chunks_exact(w)
                    .map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or_default())),
            ))
        }};
    }
    match dtype {
        E::Fp32 => prim!(Float32Type, f32),
        E::Fp64 => prim!(Float64Type, f64),
        E::Fp16 => prim!(Float16Type, half::f16),
        E::Bf16 => Arc::new(PrimitiveArray::<Float32Type>::from_iter_values(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        )),
        E::Int8 => prim!(Int8Type, i8),
        E::Int16 => prim!(Int16Type, i16),
        E::Int32 => prim!(Int32Type, i32),
        E::Int64 => prim!(Int64Type, i64),
        E::Uint8 => prim!(UInt8Type, u8),
        E::Uint16 => prim!(UInt16Type, u16),
        E::Uint32 => prim!(UInt32Type, u32),
        E::Uint64 => prim!(UInt64Type, u64),
        E::Bool | E::Bytes => Arc::new(BooleanArray::from(
            bytes.iter().map(|&b| b != 0).collect::<Vec<_>>(),
        )),
    }
}
