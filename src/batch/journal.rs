//! What a batch job has done, kept so that a crash loses nothing and repeats nothing: the
//! journal (`<output>.journal`), one length-prefixed record per finished chunk (its answer
//! or its final error), and the checkpoint (`<output>.checkpoint.json`), written atomically
//! (temporary file, fsync, rename), which says how many journal bytes are durable. A resumed
//! run cuts the journal back to that length, so a chunk written after the last checkpoint is
//! simply sent again: each row ends up in the output exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use prost::Message;
use serde::{Deserialize, Serialize};
use switchyard_proto::inference::ModelInferResponse;

/// A response header the gateway set (`x-switchyard-*`).
#[derive(Clone, PartialEq, Message)]
pub(crate) struct Header {
    #[prost(string, tag = "1")]
    pub(crate) name: String,
    #[prost(string, tag = "2")]
    pub(crate) value: String,
}

/// One finished chunk: rows `first_row .. first_row + rows`.
#[derive(Clone, PartialEq, Message)]
pub(crate) struct ChunkRecord {
    #[prost(uint64, tag = "1")]
    pub(crate) index: u64,
    #[prost(uint64, tag = "2")]
    pub(crate) first_row: u64,
    #[prost(uint32, tag = "3")]
    pub(crate) rows: u32,
    /// The answer, when the chunk succeeded.
    #[prost(message, optional, tag = "4")]
    pub(crate) response: Option<ModelInferResponse>,
    #[prost(message, repeated, tag = "5")]
    pub(crate) headers: Vec<Header>,
    /// The gRPC status code of the final failure; 0 when it succeeded.
    #[prost(int32, tag = "6")]
    pub(crate) code: i32,
    #[prost(string, tag = "7")]
    pub(crate) message: String,
    /// Calls made, the first included.
    #[prost(uint32, tag = "8")]
    pub(crate) attempts: u32,
    /// The successful (or last) call's latency.
    #[prost(uint64, tag = "9")]
    pub(crate) latency_us: u64,
}

impl ChunkRecord {
    /// The answering target: the gateway's `x-switchyard-target`, else the model and
    /// version that answered (a backend or Triton).
    pub(crate) fn target(&self) -> String {
        if let Some(h) = self
            .headers
            .iter()
            .find(|h| h.name == "x-switchyard-target")
        {
            return h.value.clone();
        }
        match &self.response {
            Some(r) if r.model_version.is_empty() => r.model_name.clone(),
            Some(r) => format!("{}/{}", r.model_name, r.model_version),
            None => String::new(),
        }
    }
}

/// What identifies a job: a checkpoint of another job is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Job {
    pub(crate) url: String,
    pub(crate) model: String,
    pub(crate) model_version: String,
    pub(crate) input: String,
    pub(crate) input_bytes: u64,
    pub(crate) input_modified_ns: u128,
    pub(crate) rows: u64,
    pub(crate) chunk_rows: u64,
    pub(crate) outputs: Vec<String>,
}

/// The checkpoint file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Checkpoint {
    pub(crate) format: u32,
    pub(crate) job: Job,
    /// Journal bytes that hold complete, synced records.
    pub(crate) journal_bytes: u64,
    pub(crate) chunks_done: u64,
    pub(crate) rows_done: u64,
    pub(crate) chunks_total: u64,
}

/// What the done records add up to, kept as they are appended (or read back on resume) so
/// that the summary and the output's columns need no pass over the journal.
#[derive(Debug)]
pub(crate) struct Counts {
    pub(crate) chunks: u64,
    pub(crate) requests: u64,
    pub(crate) retries: u64,
    pub(crate) rows_ok: u64,
    pub(crate) rows_failed: u64,
    /// Per answering target: (rows, requests).
    pub(crate) targets: BTreeMap<String, (u64, u64)>,
    /// Failed rows per final gRPC status code.
    pub(crate) failures: BTreeMap<i32, u64>,
    /// Every response header name seen (the strategy columns of the output).
    pub(crate) headers: BTreeSet<String>,
    /// Latency of the answered calls, µs.
    pub(crate) latency: hdrhistogram::Histogram<u64>,
}

impl Counts {
    fn new() -> Self {
        Self {
            chunks: 0,
            requests: 0,
            retries: 0,
            rows_ok: 0,
            rows_failed: 0,
            targets: BTreeMap::new(),
            failures: BTreeMap::new(),
            headers: BTreeSet::new(),
            latency: hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
                .expect("static histogram bounds"),
        }
    }

    fn add(&mut self, rec: &ChunkRecord) {
        let rows = u64::from(rec.rows);
        self.chunks += 1;
        self.requests += u64::from(rec.attempts);
        self.retries += u64::from(rec.attempts.saturating_sub(1));
        if rec.code == 0 {
            self.rows_ok += rows;
            let t = self.targets.entry(rec.target()).or_default();
            t.0 += rows;
            t.1 += 1;
            let _ = self.latency.record(rec.latency_us.max(1));
            for h in &rec.headers {
                if !self.headers.contains(&h.name) {
                    self.headers.insert(h.name.clone());
                }
            }
        } else {
            self.rows_failed += rows;
            *self.failures.entry(rec.code).or_default() += rows;
        }
    }
}

/// The journal of a job being run: records appended, the checkpoint advanced.
#[derive(Debug)]
pub(crate) struct Journal {
    file: BufWriter<File>,
    path: PathBuf,
    checkpoint: PathBuf,
    pub(crate) job: Job,
    pub(crate) chunks_total: u64,
    /// Offset of each done chunk's record.
    pub(crate) done: BTreeMap<u64, u64>,
    pub(crate) rows_done: u64,
    pub(crate) counts: Counts,
    len: u64,
}

/// Reads one record at the reader's position; `None` at a clean end, an error for a cut one.
fn read_record(r: &mut impl Read) -> Result<Option<(ChunkRecord, u64)>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let n = u32::from_le_bytes(len) as usize;
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf)?;
    let rec = ChunkRecord::decode(&buf[..])?;
    Ok(Some((rec, 4 + n as u64)))
}

impl Journal {
    /// Starts a job (whether an unfinished one may be replaced is the caller's check).
    pub(crate) fn create(
        path: PathBuf,
        checkpoint: PathBuf,
        job: Job,
        chunks_total: u64,
    ) -> Result<Self> {
        let file =
            File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut j = Self {
            file: BufWriter::with_capacity(1 << 20, file),
            path,
            checkpoint,
            job,
            chunks_total,
            done: BTreeMap::new(),
            rows_done: 0,
            counts: Counts::new(),
            len: 0,
        };
        j.sync()?;
        Ok(j)
    }

    /// Continues a job from its checkpoint: the journal is cut back to the checkpoint's
    /// length (records past it may be torn) and its records say which chunks are done.
    pub(crate) fn resume(
        path: PathBuf,
        checkpoint: PathBuf,
        job: Job,
        chunks_total: u64,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(&checkpoint).with_context(|| {
            format!(
                "--resume: cannot read the checkpoint {}",
                checkpoint.display()
            )
        })?;
        let saved: Checkpoint = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not a switchyard batch checkpoint",
                checkpoint.display()
            )
        })?;
        if saved.job != job {
            let a = serde_json::to_value(&saved.job)?;
            let b = serde_json::to_value(&job)?;
            let differs: Vec<String> = a
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, v)| b.get(k.as_str()) != Some(v))
                .map(|(k, v)| format!("{k} was {v}, now {}", b[k.as_str()]))
                .collect();
            bail!(
                "{}: the checkpoint is of another job ({}); run without --resume (and with --overwrite) to start this one",
                checkpoint.display(),
                differs.join("; ")
            );
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| {
                format!(
                    "{}: the journal of the checkpoint is missing",
                    path.display()
                )
            })?;
        let on_disk = file.metadata()?.len();
        if on_disk < saved.journal_bytes {
            bail!(
                "{}: {on_disk} bytes, but the checkpoint says {} are done; the journal was changed",
                path.display(),
                saved.journal_bytes
            );
        }
        file.set_len(saved.journal_bytes)?;
        file.seek(SeekFrom::Start(0))?;
        let mut done = BTreeMap::new();
        let mut rows_done = 0;
        let mut counts = Counts::new();
        let mut at = 0u64;
        {
            let mut r = std::io::BufReader::new(&mut file);
            while let Some((rec, n)) = read_record(&mut r)
                .map_err(|e| anyhow!("{}: record at byte {at}: {e}", path.display()))?
            {
                rows_done += u64::from(rec.rows);
                counts.add(&rec);
                done.insert(rec.index, at);
                at += n;
            }
        }
        file.seek(SeekFrom::End(0))?;
        Ok(Self {
            file: BufWriter::with_capacity(1 << 20, file),
            path,
            checkpoint,
            job,
            chunks_total,
            done,
            rows_done,
            counts,
            len: at,
        })
    }

    /// Appends a finished chunk (durable at the next [`Journal::sync`]).
    pub(crate) fn append(&mut self, rec: &ChunkRecord) -> Result<()> {
        let bytes = rec.encode_to_vec();
        self.file.write_all(&(bytes.len() as u32).to_le_bytes())?;
        self.file.write_all(&bytes)?;
        self.done.insert(rec.index, self.len);
        self.rows_done += u64::from(rec.rows);
        self.counts.add(rec);
        self.len += 4 + bytes.len() as u64;
        Ok(())
    }

    /// Makes every appended record durable, then says so in the checkpoint.
    pub(crate) fn sync(&mut self) -> Result<()> {
        self.file.flush()?;
        self.file.get_ref().sync_data()?;
        let cp = Checkpoint {
            format: 1,
            job: self.job.clone(),
            journal_bytes: self.len,
            chunks_done: self.done.len() as u64,
            rows_done: self.rows_done,
            chunks_total: self.chunks_total,
        };
        write_atomically(&self.checkpoint, &serde_json::to_vec_pretty(&cp)?)
    }

    /// Reads the done records in chunk order.
    pub(crate) fn records(&mut self) -> Result<Records> {
        self.file.flush()?;
        let file = File::open(&self.path)?;
        Ok(Records {
            file: std::io::BufReader::with_capacity(1 << 16, file),
            offsets: self.done.values().copied().collect(),
            next: 0,
            pos: 0,
            path: self.path.clone(),
        })
    }

    /// Where the checkpoint is.
    pub(crate) fn checkpoint(&self) -> &Path {
        &self.checkpoint
    }

    /// Removes the journal and the checkpoint once the output is in place.
    pub(crate) fn remove(self) -> Result<()> {
        drop(self.file);
        std::fs::remove_file(&self.checkpoint)?;
        std::fs::remove_file(&self.path)?;
        Ok(())
    }
}

/// The done records, in chunk order.
#[derive(Debug)]
pub(crate) struct Records {
    file: std::io::BufReader<File>,
    offsets: Vec<u64>,
    next: usize,
    /// Where the reader is: records mostly follow each other, and a seek within the
    /// buffer keeps it.
    pos: u64,
    path: PathBuf,
}

impl Iterator for Records {
    type Item = Result<ChunkRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        let at = *self.offsets.get(self.next)?;
        self.next += 1;
        let mut read = || -> Result<ChunkRecord> {
            if at != self.pos {
                self.file.seek_relative(at as i64 - self.pos as i64)?;
            }
            let (rec, n) = read_record(&mut self.file)?
                .ok_or_else(|| anyhow!("{}: no record at byte {at}", self.path.display()))?;
            self.pos = at + n;
            Ok(rec)
        };
        Some(read())
    }
}

/// Writes `path` so that a reader sees the old or the new content, never a part.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = crate::batch::data::beside(path, ".tmp");
    {
        let mut f =
            File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("{}: cannot rename into place", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job {
            url: "u".into(),
            model: "m".into(),
            model_version: String::new(),
            input: "i".into(),
            input_bytes: 1,
            input_modified_ns: 2,
            rows: 10,
            chunk_rows: 5,
            outputs: vec!["o".into()],
        }
    }

    #[test]
    fn a_torn_tail_is_cut_at_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let (jp, cp) = (dir.path().join("j"), dir.path().join("c"));
        let mut j = Journal::create(jp.clone(), cp.clone(), job(), 2).unwrap();
        let rec = |index| ChunkRecord {
            index,
            first_row: index * 5,
            rows: 5,
            ..Default::default()
        };
        j.append(&rec(1)).unwrap();
        j.sync().unwrap();
        j.append(&rec(0)).unwrap();
        j.file.flush().unwrap();
        drop(j);
        // Half a record more, as a SIGKILL mid-write leaves it.
        let mut f = OpenOptions::new().append(true).open(&jp).unwrap();
        f.write_all(&[9, 0, 0, 0, 1]).unwrap();
        let mut j = Journal::resume(jp, cp.clone(), job(), 2).unwrap();
        assert_eq!(j.done.keys().copied().collect::<Vec<_>>(), [1]);
        assert_eq!(j.rows_done, 5);
        let got: Vec<u64> = j.records().unwrap().map(|r| r.unwrap().index).collect();
        assert_eq!(got, [1]);
        let other = Job {
            chunk_rows: 4,
            ..job()
        };
        let err = Journal::resume(dir.path().join("j"), cp, other, 3).unwrap_err();
        assert!(err.to_string().contains("chunk_rows was 5, now 4"), "{err}");
    }
}
