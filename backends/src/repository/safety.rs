//! Load-time safety checks on model files: no pickle-based formats, no file over the size
//! limit, and every checksum in a `SHA256SUMS` file verified.
//!
//! Pickle files execute arbitrary code when a framework unpickles them (`torch.load`,
//! `joblib.load`), so the backend refuses them even though it would never load them
//! itself: a repository that carries them is not one to trust.

use std::fs;
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// Extensions of pickle-based model formats.
const PICKLE_EXTENSIONS: [&str; 5] = ["pt", "pth", "pkl", "pickle", "joblib"];

/// The checksum file name, in `sha256sum` format (`<hex>  <path>`).
pub(crate) const CHECKSUM_FILE: &str = "SHA256SUMS";

/// Refuses pickle files and files over `max_size` bytes directly in `dir` (and, when
/// `recursive`, below it). Returns every problem found.
pub(crate) fn check_files(dir: &Path, max_size: u64, recursive: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        let entries = match fs::read_dir(&current) {
            Ok(entries) => entries,
            Err(err) => {
                problems.push(format!("cannot list {}: {err}", current.display()));
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            // Follow symlinks: what matters is the file a runtime would read.
            let Ok(meta) = fs::metadata(&path) else {
                problems.push(format!("{} is a broken link", path.display()));
                continue;
            };
            if meta.is_dir() {
                if recursive {
                    stack.push(path);
                }
                continue;
            }
            if let Some(ext) = path.extension().and_then(|e| e.to_str())
                && PICKLE_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str())
            {
                problems.push(format!(
                    "refusing {}: .{ext} is a pickle-based format, and unpickling runs arbitrary code; export the model to ONNX",
                    path.display()
                ));
            }
            if meta.len() > max_size {
                problems.push(format!(
                    "refusing {}: {} bytes is over the {max_size}-byte model size limit (--max-model-size)",
                    path.display(),
                    meta.len()
                ));
            }
        }
    }
    problems.sort();
    problems
}

/// Every pickle file anywhere under `dir`, as refusal messages.
pub(crate) fn find_pickles(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = check_files(dir, u64::MAX, true);
    found.retain(|p| p.contains("pickle-based"));
    found
}

/// One failed `SHA256SUMS` entry.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChecksumFailure {
    /// The listed path, relative to the folder that holds `SHA256SUMS`.
    pub(crate) path: PathBuf,
    pub(crate) reason: String,
}

/// Verifies every entry of `dir/SHA256SUMS`, if the file exists.
pub(crate) fn verify_checksums(dir: &Path) -> Vec<ChecksumFailure> {
    let sums = dir.join(CHECKSUM_FILE);
    let text = match fs::read_to_string(&sums) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(err) => {
            return vec![ChecksumFailure {
                path: PathBuf::from(CHECKSUM_FILE),
                reason: format!("cannot read {}: {err}", sums.display()),
            }];
        }
    };
    let mut failures = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((hex, name)) = parse_line(line) else {
            failures.push(ChecksumFailure {
                path: PathBuf::from(CHECKSUM_FILE),
                reason: format!(
                    "{}:{}: expected '<64 hex digits>  <file>' as sha256sum writes it",
                    sums.display(),
                    n + 1
                ),
            });
            continue;
        };
        let rel = PathBuf::from(name);
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            failures.push(ChecksumFailure {
                path: rel.clone(),
                reason: format!(
                    "{}:{}: '{name}' leaves the folder; list paths inside it",
                    sums.display(),
                    n + 1
                ),
            });
            continue;
        }
        match sha256_file(&dir.join(&rel)) {
            Ok(actual) if actual.eq_ignore_ascii_case(hex) => {}
            Ok(actual) => failures.push(ChecksumFailure {
                path: rel,
                reason: format!(
                    "checksum mismatch for {}: SHA256SUMS says {hex}, the file hashes to {actual}",
                    dir.join(name).display()
                ),
            }),
            Err(err) => failures.push(ChecksumFailure {
                path: rel,
                reason: format!(
                    "{} is listed in SHA256SUMS but cannot be read: {err}",
                    dir.join(name).display()
                ),
            }),
        }
    }
    failures
}

fn parse_line(line: &str) -> Option<(&str, &str)> {
    let (hex, rest) = line.split_at_checked(64)?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    // sha256sum writes two spaces (text mode) or a space and '*' (binary mode).
    let name = rest
        .strip_prefix("  ")
        .or_else(|| rest.strip_prefix(" *"))?;
    (!name.is_empty()).then_some((hex, name))
}

/// Hex SHA-256 of a file, streamed so that a large model is never held twice in memory.
pub(crate) fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_lines_are_sha256sum_format() {
        let hex = "a".repeat(64);
        assert_eq!(
            parse_line(&format!("{hex}  model.onnx")),
            Some((hex.as_str(), "model.onnx"))
        );
        assert_eq!(
            parse_line(&format!("{hex} *model.onnx")),
            Some((hex.as_str(), "model.onnx"))
        );
        assert_eq!(parse_line(&format!("{hex} model.onnx")), None);
        assert_eq!(parse_line("abc  model.onnx"), None);
        assert_eq!(parse_line(&format!("{}  x", "g".repeat(64))), None);
    }

    #[test]
    fn verifies_and_reports_mismatch_traversal_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("good"), b"hello").unwrap();
        fs::write(dir.path().join("bad"), b"tampered").unwrap();
        let good = sha256_file(&dir.path().join("good")).unwrap();
        let sums =
            format!("{good}  good\n{good}  bad\n{good}  ../escape\n{good}  missing\nnot a line\n");
        fs::write(dir.path().join(CHECKSUM_FILE), sums).unwrap();
        let failures = verify_checksums(dir.path());
        let reasons: Vec<&str> = failures.iter().map(|f| f.reason.as_str()).collect();
        assert_eq!(failures.len(), 4, "{reasons:#?}");
        assert!(reasons[0].contains("checksum mismatch") && reasons[0].contains("bad"));
        assert!(reasons[1].contains("leaves the folder"));
        assert!(reasons[2].contains("cannot be read"));
        assert!(reasons[3].contains(":5: expected"));
    }

    #[test]
    fn refuses_pickles_and_oversize_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("model.onnx"), vec![0u8; 100]).unwrap();
        fs::write(dir.path().join("weights.PKL"), b"x").unwrap();
        let problems = check_files(dir.path(), 50, false);
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("model.onnx") && p.contains("100 bytes is over the 50-byte"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("weights.PKL") && p.contains("pickle"))
        );
    }
}
