//! The data set of a batch job: every input row of the file, read and checked before any
//! request is sent, held as one little-endian buffer per model input in the model's element
//! type (a chunk's request is a slice of it). Readers for JSON Lines, CSV, `.npy`, `.npz` and
//! Parquet; every refusal names the file, the row (and line, for text) and the column.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use switchyard_proto::ElementType;

/// What the model takes for one input: its name, element type and per-row dims (`-1`:
/// any length, taken from the data).
#[derive(Debug, Clone)]
pub(crate) struct Want {
    pub(crate) name: String,
    pub(crate) dtype: ElementType,
    pub(crate) dims: Vec<i64>,
}

/// One input tensor of every row.
#[derive(Debug)]
pub(crate) struct Column {
    pub(crate) name: String,
    pub(crate) dtype: ElementType,
    /// The shape of one row (the model's dims with any `-1` resolved from the data).
    pub(crate) row_shape: Vec<i64>,
    /// Bytes per row.
    pub(crate) row_bytes: usize,
    pub(crate) data: Bytes,
}

/// Every row of the input file.
#[derive(Debug)]
pub(crate) struct Dataset {
    pub(crate) rows: usize,
    pub(crate) columns: Vec<Column>,
}

/// The input file's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Jsonl,
    Csv,
    Npy,
    Npz,
    Parquet,
}

impl Format {
    /// Parses `--input-format`/`--output-format`.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "jsonl" | "ndjson" | "json" => Self::Jsonl,
            "csv" => Self::Csv,
            "npy" => Self::Npy,
            "npz" => Self::Npz,
            "parquet" | "pq" => Self::Parquet,
            other => {
                return Err(format!(
                    "unknown format `{other}`: expected jsonl, csv, npy, npz or parquet"
                ));
            }
        })
    }

    /// The format a file name's extension says.
    pub(crate) fn of_path(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        Self::parse(&ext).map_err(|_| {
            anyhow!(
                "{}: cannot tell the format from the extension `.{ext}`; name it .jsonl, .csv, \
                 .npy, .npz or .parquet, or pass --input-format/--output-format",
                path.display()
            )
        })
    }
}

/// A number as read from a file, before it is put in the model's element type.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Num {
    F(f64),
    I(i64),
    U(u64),
    B(bool),
}

impl std::fmt::Display for Num {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Num::F(v) => write!(f, "{v}"),
            Num::I(v) => write!(f, "{v}"),
            Num::U(v) => write!(f, "{v}"),
            Num::B(v) => write!(f, "{v}"),
        }
    }
}

/// Appends `v` as one element of `dtype`, refusing a value the type cannot hold exactly
/// (a fraction or an out-of-range number for an integer type); floats narrow as NumPy's
/// `astype` does.
pub(crate) fn put(dtype: ElementType, v: Num, out: &mut Vec<u8>) -> Result<(), String> {
    use ElementType as E;
    let as_f64 = || match v {
        Num::F(x) => x,
        Num::I(x) => x as f64,
        Num::U(x) => x as f64,
        Num::B(x) => f64::from(u8::from(x)),
    };
    let as_i128 = || -> Result<i128, String> {
        match v {
            Num::I(x) => Ok(i128::from(x)),
            Num::U(x) => Ok(i128::from(x)),
            Num::B(x) => Ok(i128::from(x)),
            Num::F(x) if x.fract() == 0.0 && x.abs() < 1.8e19 => Ok(x as i128),
            Num::F(x) => Err(format!(
                "{x} is not an integer ({} takes integers)",
                dtype.as_str()
            )),
        }
    };
    macro_rules! int {
        ($t:ty) => {{
            let i = as_i128()?;
            let x = <$t>::try_from(i)
                .map_err(|_| format!("{i} does not fit {} ({})", dtype.as_str(), stringify!($t)))?;
            out.extend_from_slice(&x.to_le_bytes());
        }};
    }
    match dtype {
        E::Fp32 => out.extend_from_slice(&(as_f64() as f32).to_le_bytes()),
        E::Fp64 => out.extend_from_slice(&as_f64().to_le_bytes()),
        E::Fp16 => out.extend_from_slice(&half::f16::from_f64(as_f64()).to_le_bytes()),
        E::Bf16 => out.extend_from_slice(&half::bf16::from_f64(as_f64()).to_le_bytes()),
        E::Int8 => int!(i8),
        E::Int16 => int!(i16),
        E::Int32 => int!(i32),
        E::Int64 => int!(i64),
        E::Uint8 => int!(u8),
        E::Uint16 => int!(u16),
        E::Uint32 => int!(u32),
        E::Uint64 => int!(u64),
        E::Bool => match v {
            Num::B(b) => out.push(u8::from(b)),
            Num::I(0) | Num::U(0) => out.push(0),
            Num::I(1) | Num::U(1) => out.push(1),
            Num::F(x) if x == 0.0 || x == 1.0 => out.push(u8::from(x == 1.0)),
            other => return Err(format!("{other} is not a BOOL (true, false, 0 or 1)")),
        },
        E::Bytes => return Err("BYTES inputs are not supported by `switchyard batch`".into()),
    }
    Ok(())
}

/// A text cell as a number of `dtype`'s family.
fn parse_cell(dtype: ElementType, text: &str) -> Result<Num, String> {
    let t = text.trim();
    let bad = || {
        format!(
            "`{}` is not a number ({} expected)",
            t.chars().take(40).collect::<String>(),
            dtype.as_str()
        )
    };
    if t.is_empty() {
        return Err(format!("empty cell ({} expected)", dtype.as_str()));
    }
    match dtype {
        ElementType::Bool => match t {
            "true" | "True" | "TRUE" | "1" => Ok(Num::B(true)),
            "false" | "False" | "FALSE" | "0" => Ok(Num::B(false)),
            _ => Err(format!("`{t}` is not a BOOL (true, false, 0 or 1)")),
        },
        ElementType::Fp16 | ElementType::Bf16 | ElementType::Fp32 | ElementType::Fp64 => {
            t.parse::<f64>().map(Num::F).map_err(|_| bad())
        }
        _ => {
            if let Ok(i) = t.parse::<i64>() {
                Ok(Num::I(i))
            } else if let Ok(u) = t.parse::<u64>() {
                Ok(Num::U(u))
            } else if let Ok(f) = t.parse::<f64>() {
                Ok(Num::F(f))
            } else {
                Err(bad())
            }
        }
    }
}

/// Elements per row of dims with every `-1` already resolved.
fn count(dims: &[i64]) -> usize {
    dims.iter()
        .map(|&d| usize::try_from(d).unwrap_or(0))
        .product()
}

/// The row shape of `want` for a row of `n` elements: the model's dims, a single `-1`
/// taking what is left; `None` when `n` does not fit.
fn fit(want: &Want, n: usize) -> Option<Vec<i64>> {
    let free = want.dims.iter().filter(|&&d| d < 0).count();
    let fixed: usize = want
        .dims
        .iter()
        .filter(|&&d| d >= 0)
        .map(|&d| d as usize)
        .product();
    match free {
        0 => (fixed == n).then(|| want.dims.clone()),
        1 if fixed > 0 && n.is_multiple_of(fixed) => Some(
            want.dims
                .iter()
                .map(|&d| if d < 0 { (n / fixed) as i64 } else { d })
                .collect(),
        ),
        _ => None,
    }
}

fn dims_text(dims: &[i64]) -> String {
    let mut s = String::from("[");
    for (i, d) in dims.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{d}");
    }
    s.push(']');
    s
}

/// A column being filled row by row: the first row fixes the row shape.
struct Builder {
    want: Want,
    row_shape: Option<Vec<i64>>,
    data: Vec<u8>,
}

impl Builder {
    fn new(want: &Want) -> Self {
        let row_shape = want.dims.iter().all(|&d| d >= 0).then(|| want.dims.clone());
        Self {
            want: want.clone(),
            row_shape,
            data: Vec::new(),
        }
    }

    /// Checks that a row of `n` elements fits, fixing the shape on the first row.
    fn shape_row(&mut self, n: usize) -> Result<(), String> {
        match &self.row_shape {
            Some(s) if count(s) == n => Ok(()),
            Some(s) => Err(format!(
                "{n} values, but input `{}` takes {} per row (dims {})",
                self.want.name,
                count(s),
                dims_text(s)
            )),
            None => {
                let s = fit(&self.want, n).ok_or_else(|| {
                    format!(
                        "{n} values do not fit input `{}` (dims {})",
                        self.want.name,
                        dims_text(&self.want.dims)
                    )
                })?;
                self.row_shape = Some(s);
                Ok(())
            }
        }
    }

    fn finish(self, rows: usize) -> Column {
        let row_shape = self.row_shape.unwrap_or_else(|| self.want.dims.clone());
        let row_bytes = self.data.len().checked_div(rows).unwrap_or(0);
        Column {
            name: self.want.name,
            dtype: self.want.dtype,
            row_shape,
            row_bytes,
            data: Bytes::from(self.data),
        }
    }
}

/// Which file columns feed which input (CSV and Parquet): `--columns`.
#[derive(Debug, Clone, Default)]
pub(crate) struct ColumnMap {
    /// (input name or `None` for the model's only input, the file's column names).
    pub(crate) entries: Vec<(Option<String>, Vec<String>)>,
}

impl ColumnMap {
    /// Parses one `--columns` value: `[INPUT=]a,b,c`, where `name0..name63` stands for
    /// `name0`, `name1`, … `name63`.
    pub(crate) fn add(&mut self, spec: &str) -> Result<(), String> {
        let (input, list) = match spec.split_once('=') {
            Some((i, l)) => (Some(i.trim().to_owned()), l),
            None => (None, spec),
        };
        let mut names = Vec::new();
        for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            names.extend(expand(part)?);
        }
        if names.is_empty() {
            return Err(format!("--columns `{spec}` names no column"));
        }
        self.entries.push((input, names));
        Ok(())
    }

    /// The file columns of `input` (`only`: the model has one input).
    fn of(&self, input: &str, only: bool) -> Option<&[String]> {
        self.entries
            .iter()
            .find(|(i, _)| i.as_deref() == Some(input) || (i.is_none() && only))
            .map(|(_, c)| &c[..])
    }

    fn check(&self, wants: &[Want]) -> Result<()> {
        for (input, _) in &self.entries {
            match input {
                Some(i) if !wants.iter().any(|w| &w.name == i) => bail!(
                    "--columns names input `{i}`, which the model does not have (it takes {})",
                    names(wants)
                ),
                None if wants.len() > 1 => bail!(
                    "the model takes {} inputs ({}): write --columns INPUT=a,b,c for each",
                    wants.len(),
                    names(wants)
                ),
                _ => {}
            }
        }
        Ok(())
    }
}

/// `px0..px63` → `px0` … `px63`; anything else as it is.
fn expand(part: &str) -> Result<Vec<String>, String> {
    let Some((a, b)) = part.split_once("..") else {
        return Ok(vec![part.to_owned()]);
    };
    let split = |s: &str| {
        let digits = s.len() - s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let (stem, n) = s.split_at(s.len() - digits);
        n.parse::<usize>().ok().map(|n| (stem.to_owned(), n))
    };
    match (
        split(a),
        split(b.trim_start_matches(|c: char| !c.is_ascii_digit())),
    ) {
        (Some((stem, from)), Some((_, to))) if from <= to && to - from < 1 << 20 => {
            Ok((from..=to).map(|i| format!("{stem}{i}")).collect())
        }
        _ => Err(format!(
            "`{part}` is not a column range (write name0..name63 or name0..63)"
        )),
    }
}

fn names(wants: &[Want]) -> String {
    wants
        .iter()
        .map(|w| format!("`{}`", w.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads and checks the whole input file against the model's inputs.
pub(crate) fn read(
    path: &Path,
    format: Format,
    wants: &[Want],
    map: &ColumnMap,
) -> Result<Dataset> {
    map.check(wants)?;
    let shown = path.display().to_string();
    let data = match format {
        Format::Jsonl => read_jsonl(path, &shown, wants)?,
        Format::Csv => read_csv(path, &shown, wants, map)?,
        Format::Npy => read_npy(path, &shown, wants)?,
        Format::Npz => read_npz(path, &shown, wants)?,
        Format::Parquet => read_parquet(path, &shown, wants, map)?,
    };
    if data.rows == 0 {
        bail!("{shown}: no rows");
    }
    Ok(data)
}

fn open(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))
}

// ---------------------------------------------------------------------------------- JSONL

/// One request's tensors per line, as the KServe v2 REST body: `{"inputs": [{"name",
/// "shape", "datatype", "data"}]}`; a line is one row (a leading batch dimension, if any,
/// must be 1).
fn read_jsonl(path: &Path, shown: &str, wants: &[Want]) -> Result<Dataset> {
    use std::io::BufRead;
    let reader = std::io::BufReader::new(open(path)?);
    let mut builders: Vec<Builder> = wants.iter().map(Builder::new).collect();
    let mut rows = 0usize;
    for (n, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{shown}: line {}: cannot read", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let at =
            |col: &str, msg: String| anyhow!("{shown}: line {} (row {rows}), {col}: {msg}", n + 1);
        let value: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| anyhow!("{shown}: line {} (row {rows}): not JSON: {e}", n + 1))?;
        let inputs = value
            .get("inputs")
            .and_then(|i| i.as_array())
            .ok_or_else(|| {
                at(
                    "`inputs`",
                    "missing: each line is {\"inputs\": [...]}".into(),
                )
            })?;
        for b in &mut builders {
            let name = &b.want.name;
            let col = format!("input `{name}`");
            let t = inputs
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
                .ok_or_else(|| at(&col, "missing from this line".into()))?;
            if let Some(dt) = t.get("datatype").and_then(|d| d.as_str())
                && ElementType::from_wire(dt).is_none()
            {
                return Err(at(&col, format!("unknown datatype `{dt}`")));
            }
            let mut flat = Vec::new();
            flatten(t.get("data").unwrap_or(&serde_json::Value::Null), &mut flat)
                .map_err(|e| at(&col, e))?;
            if let Some(shape) = t.get("shape").and_then(|s| s.as_array()) {
                let shape: Vec<i64> = shape.iter().filter_map(serde_json::Value::as_i64).collect();
                let product: i64 = shape.iter().product();
                if product as usize != flat.len() {
                    return Err(at(
                        &col,
                        format!(
                            "shape {} holds {product} values, data has {}",
                            dims_text(&shape),
                            flat.len()
                        ),
                    ));
                }
                if shape.len() == b.want.dims.len() + 1 && shape[0] != 1 {
                    return Err(at(
                        &col,
                        format!(
                            "shape {}: each line is one row, so its batch dimension must be 1",
                            dims_text(&shape)
                        ),
                    ));
                }
            }
            b.shape_row(flat.len()).map_err(|e| at(&col, e))?;
            for (k, v) in flat.into_iter().enumerate() {
                put(b.want.dtype, v, &mut b.data)
                    .map_err(|e| at(&col, format!("element {k}: {e}")))?;
            }
        }
        rows += 1;
    }
    Ok(Dataset {
        rows,
        columns: builders.into_iter().map(|b| b.finish(rows)).collect(),
    })
}

fn flatten(v: &serde_json::Value, out: &mut Vec<Num>) -> Result<(), String> {
    match v {
        serde_json::Value::Array(items) => items.iter().try_for_each(|i| flatten(i, out)),
        serde_json::Value::Number(n) => {
            out.push(if let Some(i) = n.as_i64() {
                Num::I(i)
            } else if let Some(u) = n.as_u64() {
                Num::U(u)
            } else {
                Num::F(n.as_f64().unwrap_or(f64::NAN))
            });
            Ok(())
        }
        serde_json::Value::Bool(b) => {
            out.push(Num::B(*b));
            Ok(())
        }
        serde_json::Value::Null => Err("`data` is missing or null".into()),
        other => Err(format!("`{other}` is not a number")),
    }
}

// ------------------------------------------------------------------------------------ CSV

/// A header row, then one row per line; `--columns` picks the columns of each input (all
/// columns, in order, for a model with one input).
fn read_csv(path: &Path, shown: &str, wants: &[Want], map: &ColumnMap) -> Result<Dataset> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(std::io::BufReader::new(open(path)?));
    let header: Vec<String> = reader
        .headers()
        .with_context(|| format!("{shown}: line 1: cannot read the header row"))?
        .iter()
        .map(|h| h.trim().to_owned())
        .collect();
    let only = wants.len() == 1;
    let mut picks: Vec<Vec<usize>> = Vec::new();
    for w in wants {
        let cols: Vec<usize> = match map.of(&w.name, only) {
            Some(names) => names
                .iter()
                .map(|c| {
                    header.iter().position(|h| h == c).ok_or_else(|| {
                        anyhow!("{shown}: line 1: no column `{c}` (input `{}`); the header has {} columns: {}", w.name, header.len(), preview(&header))
                    })
                })
                .collect::<Result<_>>()?,
            None if only => (0..header.len()).collect(),
            None => bail!(
                "{shown}: say which columns feed input `{}` with --columns {}=a,b,c",
                w.name,
                w.name
            ),
        };
        picks.push(cols);
    }
    let mut builders: Vec<Builder> = wants.iter().map(Builder::new).collect();
    for (b, cols) in builders.iter_mut().zip(&picks) {
        b.shape_row(cols.len())
            .map_err(|e| anyhow!("{shown}: line 1: {e} ({} columns chosen)", cols.len()))?;
    }
    let mut record = csv::StringRecord::new();
    let mut rows = 0usize;
    loop {
        let more = reader.read_record(&mut record).map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            anyhow!("{shown}: line {line} (row {rows}): {e}")
        })?;
        if !more {
            break;
        }
        let line = record.position().map_or(0, |p| p.line());
        if record.len() != header.len() {
            bail!(
                "{shown}: line {line} (row {rows}): {} fields, but the header has {} (a ragged row; column `{}` is where they part)",
                record.len(),
                header.len(),
                header
                    .get(record.len().min(header.len().saturating_sub(1)))
                    .map_or("?", String::as_str)
            );
        }
        for (b, cols) in builders.iter_mut().zip(&picks) {
            for &c in cols {
                parse_cell(b.want.dtype, &record[c])
                    .and_then(|v| put(b.want.dtype, v, &mut b.data))
                    .map_err(|e| {
                        anyhow!(
                            "{shown}: line {line} (row {rows}), column `{}`: {e}",
                            header[c]
                        )
                    })?;
            }
        }
        rows += 1;
    }
    Ok(Dataset {
        rows,
        columns: builders.into_iter().map(|b| b.finish(rows)).collect(),
    })
}

fn preview(names: &[String]) -> String {
    let mut s: Vec<String> = names.iter().take(8).map(|n| format!("`{n}`")).collect();
    if names.len() > 8 {
        s.push("…".into());
    }
    s.join(", ")
}

// ------------------------------------------------------------------------------ npy / npz

/// A `.npy` array's header as npyz parsed it, and where its data starts.
struct Npy {
    descr: String,
    shape: Vec<u64>,
    fortran: bool,
}

fn npy_header(bytes: &[u8], shown: &str) -> Result<(Npy, usize)> {
    let mut cursor = std::io::Cursor::new(bytes);
    let file = npyz::NpyFile::new(&mut cursor)
        .map_err(|e| anyhow!("{shown}: not a .npy array (header: {e})"))?;
    let descr = match file.dtype() {
        npyz::DType::Plain(t) => t.to_string(),
        other => bail!(
            "{shown}: dtype {} is a structured or array dtype; save a plain numeric array",
            other.descr()
        ),
    };
    let npy = Npy {
        descr,
        shape: file.shape().to_vec(),
        fortran: file.order() == npyz::Order::Fortran,
    };
    drop(file);
    Ok((npy, cursor.position() as usize))
}

/// Reads element `i` of a plain numeric dtype (`<f4`, `>i8`, `|b1`, …).
fn npy_element(descr: &str, raw: &[u8]) -> Option<Num> {
    let big = descr.starts_with('>');
    let kind = descr.get(1..2)?;
    macro_rules! num {
        ($t:ty, $wrap:expr) => {{
            let a: [u8; std::mem::size_of::<$t>()] = raw.try_into().ok()?;
            let v = if big {
                <$t>::from_be_bytes(a)
            } else {
                <$t>::from_le_bytes(a)
            };
            Some($wrap(v))
        }};
    }
    match (kind, raw.len()) {
        ("f", 2) => num!(u16, |b| Num::F(f64::from(half::f16::from_bits(b)))),
        ("f", 4) => num!(f32, |v| Num::F(f64::from(v))),
        ("f", 8) => num!(f64, Num::F),
        ("i", 1) => Some(Num::I(i64::from(raw[0] as i8))),
        ("i", 2) => num!(i16, |v| Num::I(i64::from(v))),
        ("i", 4) => num!(i32, |v| Num::I(i64::from(v))),
        ("i", 8) => num!(i64, Num::I),
        ("u", 1) => Some(Num::U(u64::from(raw[0]))),
        ("u", 2) => num!(u16, |v| Num::U(u64::from(v))),
        ("u", 4) => num!(u32, |v| Num::U(u64::from(v))),
        ("u", 8) => num!(u64, Num::U),
        ("b", 1) => Some(Num::B(raw[0] != 0)),
        _ => None,
    }
}

/// NumPy's little-endian `descr` of an element type (none for the types NumPy lacks).
pub(crate) fn native(dtype: ElementType) -> &'static str {
    use ElementType as E;
    match dtype {
        E::Bool => "|b1",
        E::Uint8 => "|u1",
        E::Uint16 => "<u2",
        E::Uint32 => "<u4",
        E::Uint64 => "<u8",
        E::Int8 => "|i1",
        E::Int16 => "<i2",
        E::Int32 => "<i4",
        E::Int64 => "<i8",
        E::Fp16 => "<f2",
        E::Fp32 => "<f4",
        E::Fp64 => "<f8",
        E::Bf16 | E::Bytes => "",
    }
}

fn npy_width(descr: &str) -> Option<usize> {
    descr.get(2..)?.parse().ok()
}

/// One array (`[rows, per-row dims…]`) of a `.npy` file or an `.npz` member into `b`.
fn npy_column(bytes: &[u8], shown: &str, b: &mut Builder) -> Result<usize> {
    let (h, start) = npy_header(bytes, shown)?;
    let width = npy_width(&h.descr)
        .filter(|&w| w <= 8 && npy_element(&h.descr, &[0; 8][..w]).is_some())
        .ok_or_else(|| {
            anyhow!(
                "{shown}: dtype `{}` is not numeric (input `{}` takes {})",
                h.descr,
                b.want.name,
                b.want.dtype.as_str()
            )
        })?;
    if h.fortran && h.shape.len() > 1 {
        bail!("{shown}: the array is in Fortran order; save it with np.ascontiguousarray");
    }
    let Some((&rows, rest)) = h.shape.split_first() else {
        bail!("{shown}: a 0-d array; the first dimension must be the rows");
    };
    let rows = rows as usize;
    let per_row: usize = rest.iter().map(|&d| d as usize).product::<usize>().max(1);
    b.shape_row(per_row)
        .map_err(|e| anyhow!("{shown}: shape {:?}: {e}", h.shape))?;
    let data = &bytes[start..];
    let need = rows * per_row * width;
    if data.len() < need {
        let have = data.len() / width;
        bail!(
            "{shown}: truncated: the header says {rows} rows of {per_row} `{}` ({need} bytes), but {} bytes follow; row {} is cut at column {} and rows {}..{rows} are missing",
            h.descr,
            data.len(),
            have / per_row,
            have % per_row,
            have / per_row
        );
    }
    if h.descr == native(b.want.dtype) {
        // The file holds the input's element type, little-endian: the bytes as they are.
        b.data.extend_from_slice(&data[..need]);
        return Ok(rows);
    }
    for (i, raw) in data[..need].chunks_exact(width).enumerate() {
        let v = npy_element(&h.descr, raw).unwrap_or(Num::F(f64::NAN));
        put(b.want.dtype, v, &mut b.data)
            .map_err(|e| anyhow!("{shown}: row {}, column {}: {e}", i / per_row, i % per_row))?;
    }
    Ok(rows)
}

fn read_npy(path: &Path, shown: &str, wants: &[Want]) -> Result<Dataset> {
    if wants.len() != 1 {
        bail!(
            "{shown}: a .npy file holds one array, but the model takes {} inputs ({}); use an .npz with one array per input",
            wants.len(),
            names(wants)
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("{shown}: cannot read"))?;
    let mut b = Builder::new(&wants[0]);
    let rows = npy_column(&bytes, shown, &mut b)?;
    Ok(Dataset {
        rows,
        columns: vec![b.finish(rows)],
    })
}

/// One array per input, named after it (the model's only input may take the archive's
/// only array whatever its name).
fn read_npz(path: &Path, shown: &str, wants: &[Want]) -> Result<Dataset> {
    use std::io::Read;
    let mut archive = npyz::npz::NpzArchive::open(path)
        .map_err(|e| anyhow!("{shown}: not an .npz archive: {e}"))?;
    let present: Vec<String> = archive.array_names().map(str::to_owned).collect();
    let mut columns = Vec::new();
    let mut rows = None;
    for w in wants {
        let name = if present.iter().any(|p| p == &w.name) {
            w.name.clone()
        } else if wants.len() == 1 && present.len() == 1 {
            present[0].clone()
        } else {
            bail!(
                "{shown}: no array `{}` (input of the model); the archive has {}",
                w.name,
                preview(&present)
            );
        };
        let member = format!("{shown}[{name}]");
        let zip = archive.zip_archive();
        let mut file = zip
            .by_name(&npyz::npz::file_name_from_array_name(&name))
            .map_err(|e| anyhow!("{member}: {e}"))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| anyhow!("{member}: cannot read (truncated archive?): {e}"))?;
        let mut b = Builder::new(w);
        let n = npy_column(&bytes, &member, &mut b)?;
        if let Some(r) = rows
            && r != n
        {
            bail!("{member}: {n} rows, but the other arrays have {r}");
        }
        rows = Some(n);
        columns.push(b.finish(n));
    }
    Ok(Dataset {
        rows: rows.unwrap_or(0),
        columns,
    })
}

// -------------------------------------------------------------------------------- Parquet

/// Parquet: an input is a (fixed-size) list column named after it, or the columns
/// `--columns` names (all columns in order, for a model with one input), one per feature.
fn read_parquet(path: &Path, shown: &str, wants: &[Want], map: &ColumnMap) -> Result<Dataset> {
    use arrow_schema::DataType;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let builder = ParquetRecordBatchReaderBuilder::try_new(open(path)?)
        .map_err(|e| anyhow!("{shown}: not a Parquet file: {e}"))?;
    let schema = builder.schema().clone();
    let fields: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let only = wants.len() == 1;
    // Per input: a list column, or the scalar columns it is made of.
    enum Source {
        List(usize),
        Scalars(Vec<usize>),
    }
    let numeric = |t: &DataType| t.is_numeric() || matches!(t, DataType::Boolean);
    let mut sources = Vec::new();
    for w in wants {
        let named = fields.iter().position(|f| f == &w.name);
        let source = match (map.of(&w.name, only), named) {
            (Some(cols), _) => Source::Scalars(
                cols.iter()
                    .map(|c| {
                        fields.iter().position(|f| f == c).ok_or_else(|| {
                            anyhow!(
                                "{shown}: no column `{c}` (input `{}`); the schema has {}",
                                w.name,
                                preview(&fields)
                            )
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            (None, Some(i)) => match schema.field(i).data_type() {
                DataType::FixedSizeList(..) | DataType::List(_) | DataType::LargeList(_) => {
                    Source::List(i)
                }
                t if numeric(t) => Source::Scalars(vec![i]),
                t => bail!(
                    "{shown}: row 0, column `{}`: {t}, but input `{}` takes {} (a list of numbers)",
                    w.name,
                    w.name,
                    w.dtype.as_str()
                ),
            },
            (None, None) if only => Source::Scalars((0..fields.len()).collect()),
            (None, None) => bail!(
                "{shown}: no column `{}`; name a list column after each input or pass --columns {}=a,b,c",
                w.name,
                w.name
            ),
        };
        // The schema is checked before any row is read.
        match &source {
            Source::List(i) => {
                let item = match schema.field(*i).data_type() {
                    DataType::FixedSizeList(f, _) | DataType::List(f) | DataType::LargeList(f) => {
                        f.data_type().clone()
                    }
                    _ => unreachable!("a list column"),
                };
                if !numeric(&item) {
                    bail!(
                        "{shown}: row 0, column `{}`: a list of {item}, but input `{}` takes {}",
                        fields[*i],
                        w.name,
                        w.dtype.as_str()
                    );
                }
            }
            Source::Scalars(cols) => {
                for &c in cols {
                    let t = schema.field(c).data_type();
                    if !numeric(t) {
                        bail!(
                            "{shown}: row 0, column `{}`: {t}, but input `{}` takes {} (wrong schema)",
                            fields[c],
                            w.name,
                            w.dtype.as_str()
                        );
                    }
                }
            }
        }
        sources.push(source);
    }
    let reader = builder
        .with_batch_size(8192)
        .build()
        .map_err(|e| anyhow!("{shown}: {e}"))?;
    let mut builders: Vec<Builder> = wants.iter().map(Builder::new).collect();
    let mut rows = 0usize;
    for batch in reader {
        let batch = batch.map_err(|e| anyhow!("{shown}: after row {rows}: cannot read: {e}"))?;
        for r in 0..batch.num_rows() {
            let row = rows + r;
            for (b, source) in builders.iter_mut().zip(&sources) {
                match source {
                    Source::List(i) => {
                        let at =
                            |e: String| anyhow!("{shown}: row {row}, column `{}`: {e}", fields[*i]);
                        let values = list_item(batch.column(*i).as_ref(), r).map_err(at)?;
                        b.shape_row(values.len()).map_err(at)?;
                        for (k, v) in values.into_iter().enumerate() {
                            put(b.want.dtype, v, &mut b.data)
                                .map_err(|e| at(format!("element {k}: {e}")))?;
                        }
                    }
                    Source::Scalars(cols) => {
                        if row == 0 {
                            b.shape_row(cols.len())
                                .map_err(|e| anyhow!("{shown}: {e} ({} columns)", cols.len()))?;
                        }
                        for &c in cols {
                            let at = |e: String| {
                                anyhow!("{shown}: row {row}, column `{}`: {e}", fields[c])
                            };
                            let v = scalar(batch.column(c).as_ref(), r).map_err(at)?;
                            put(b.want.dtype, v, &mut b.data).map_err(at)?;
                        }
                    }
                }
            }
        }
        rows += batch.num_rows();
    }
    Ok(Dataset {
        rows,
        columns: builders.into_iter().map(|b| b.finish(rows)).collect(),
    })
}

/// Element `i` of a numeric arrow array.
fn scalar(array: &dyn arrow_array::Array, i: usize) -> Result<Num, String> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::*;
    use arrow_schema::DataType as D;
    if array.is_null(i) {
        return Err("null (every value must be present)".into());
    }
    Ok(match array.data_type() {
        D::Float16 => Num::F(f64::from(array.as_primitive::<Float16Type>().value(i))),
        D::Float32 => Num::F(f64::from(array.as_primitive::<Float32Type>().value(i))),
        D::Float64 => Num::F(array.as_primitive::<Float64Type>().value(i)),
        D::Int8 => Num::I(i64::from(array.as_primitive::<Int8Type>().value(i))),
        D::Int16 => Num::I(i64::from(array.as_primitive::<Int16Type>().value(i))),
        D::Int32 => Num::I(i64::from(array.as_primitive::<Int32Type>().value(i))),
        D::Int64 => Num::I(array.as_primitive::<Int64Type>().value(i)),
        D::UInt8 => Num::U(u64::from(array.as_primitive::<UInt8Type>().value(i))),
        D::UInt16 => Num::U(u64::from(array.as_primitive::<UInt16Type>().value(i))),
        D::UInt32 => Num::U(u64::from(array.as_primitive::<UInt32Type>().value(i))),
        D::UInt64 => Num::U(array.as_primitive::<UInt64Type>().value(i)),
        D::Boolean => Num::B(array.as_boolean().value(i)),
        other => return Err(format!("{other} is not a number")),
    })
}

/// Row `i` of a list column, as numbers.
fn list_item(array: &dyn arrow_array::Array, i: usize) -> Result<Vec<Num>, String> {
    use arrow_array::cast::AsArray;
    use arrow_schema::DataType as D;
    if array.is_null(i) {
        return Err("null (every row needs its list)".into());
    }
    let values = match array.data_type() {
        D::FixedSizeList(..) => array.as_fixed_size_list().value(i),
        D::List(_) => array.as_list::<i32>().value(i),
        D::LargeList(_) => array.as_list::<i64>().value(i),
        other => return Err(format!("{other} is not a list")),
    };
    (0..values.len())
        .map(|k| scalar(values.as_ref(), k).map_err(|e| format!("element {k}: {e}")))
        .collect()
}

/// The default checkpoint path of an output.
pub(crate) fn beside(output: &Path, suffix: &str) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    output.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_ranges_expand() {
        assert_eq!(expand("px0..px2").unwrap(), ["px0", "px1", "px2"]);
        assert_eq!(expand("f1..3").unwrap(), ["f1", "f2", "f3"]);
        assert!(expand("a..b").is_err());
    }

    #[test]
    fn values_that_do_not_fit_are_refused() {
        let mut out = Vec::new();
        assert!(
            put(ElementType::Uint8, Num::I(300), &mut out)
                .unwrap_err()
                .contains("does not fit UINT8")
        );
        assert!(
            put(ElementType::Int32, Num::F(1.5), &mut out)
                .unwrap_err()
                .contains("not an integer")
        );
        put(ElementType::Fp32, Num::I(3), &mut out).unwrap();
        assert_eq!(out, 3.0f32.to_le_bytes());
    }

    #[test]
    fn a_free_dimension_takes_the_rest() {
        let w = Want {
            name: "x".into(),
            dtype: ElementType::Fp32,
            dims: vec![-1, 4],
        };
        assert_eq!(fit(&w, 12), Some(vec![3, 4]));
        assert_eq!(fit(&w, 10), None);
    }
}
