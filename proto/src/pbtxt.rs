//! Parses Triton's `config.pbtxt` (protobuf text format) into the prost `ModelConfig` with
//! prost-reflect's text-format parser, reporting errors as `file:line:col: message`.
//!
//! One workaround: Triton's configs write repeated message fields as `input [ { .. } ]`,
//! without a colon. The text-format grammar allows that (`MessageField = FieldName, [":"],
//! (MessageValue | MessageList)`), but prost-reflect 0.16 insists on a colon before `[`.
//! [`insert_list_colons`] adds the colon outside strings and comments and remembers where,
//! so error positions still point into the file the user wrote.

use std::path::Path;

use crate::inference::ModelConfig;
use prost_reflect::{DynamicMessage, ReflectMessage};

/// Parses `text` (the contents of `path`) into a `ModelConfig`.
///
/// The error names the file, line and column, for example
/// `models/x/config.pbtxt:3:26: value 'TYPE_FP33' was not found for enum 'inference.DataType'`.
pub fn parse_model_config(path: &Path, text: &str) -> Result<ModelConfig, String> {
    let (fixed, inserted) = insert_list_colons(text);
    let descriptor = ModelConfig::default().descriptor();
    let message = DynamicMessage::parse_text_format(descriptor, &fixed).map_err(|err| {
        let offset = miette::Diagnostic::labels(&err)
            .and_then(|mut labels| labels.next())
            .map(|label| label.offset());
        let (line, col) = match offset {
            Some(o) => line_col(text, original_offset(o, &inserted)),
            // Errors without a span are those at the end of the input.
            None => line_col(text, text.len()),
        };
        format!("{}:{line}:{col}: {err}", path.display())
    })?;
    message
        .transcode_to::<ModelConfig>()
        .map_err(|err| format!("{}: {err}", path.display()))
}

/// Inserts `:` between a field name and a following `[`; returns the new text and the
/// offsets (in the new text) of the inserted colons, ascending.
fn insert_list_colons(text: &str) -> (String, Vec<usize>) {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 16);
    let mut inserted = Vec::new();
    let mut i = 0;
    // Byte offset in `text` just past the last identifier, if the last token was one.
    let mut after_ident: Option<usize> = None;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'#' => {
                let end = text[i..].find('\n').map_or(bytes.len(), |n| i + n);
                out.push_str(&text[i..end]);
                i = end;
                continue;
            }
            b'"' | b'\'' => {
                let mut j = i + 1;
                while j < bytes.len() && bytes[j] != c && bytes[j] != b'\n' {
                    j += if bytes[j] == b'\\' { 2 } else { 1 };
                }
                let end = (j + 1).min(bytes.len());
                out.push_str(&text[i..end]);
                i = end;
                after_ident = None;
                continue;
            }
            b'[' => {
                if after_ident.is_some() {
                    inserted.push(out.len());
                    out.push(':');
                }
                after_ident = None;
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
                    i += 1;
                }
                // An identifier directly after a digit or '.' is part of a number literal.
                let in_number =
                    start > 0 && (bytes[start - 1].is_ascii_digit() || bytes[start - 1] == b'.');
                out.push_str(&text[start..i]);
                after_ident = (!in_number).then_some(i);
                continue;
            }
            c if c.is_ascii_whitespace() => {}
            _ => after_ident = None,
        }
        // Push the whole UTF-8 character starting at i.
        let len = text[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&text[i..i + len]);
        i += len;
    }
    (out, inserted)
}

/// Maps an offset in the colon-inserted text back to the original text.
fn original_offset(offset: usize, inserted: &[usize]) -> usize {
    offset - inserted.iter().take_while(|&&at| at < offset).count()
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    (line, offset - line_start + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig, String> {
        parse_model_config(Path::new("m/config.pbtxt"), text)
    }

    #[test]
    fn parses_triton_style_lists_without_colons() {
        let cfg = parse(
            r#"
name: "m"  # comment with input [ brackets ]
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { specific { versions: [1, 3] } }
input [
  { name: "INPUT__0", data_type: TYPE_FP32, dims: [ 64 ] }
]
output [ { name: "out[0]" data_type: TYPE_FP32 dims: [ -1, 10 ] } ]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
instance_group [ { count: 2 kind: KIND_CPU } ]
"#,
        )
        .unwrap();
        assert_eq!(cfg.name, "m");
        assert_eq!(cfg.max_batch_size, 8);
        assert_eq!(cfg.input[0].dims, vec![64]);
        assert_eq!(cfg.output[0].name, "out[0]");
        assert_eq!(cfg.output[0].dims, vec![-1, 10]);
        assert_eq!(cfg.instance_group[0].count, 2);
    }

    #[test]
    fn errors_point_into_the_original_text() {
        let cases = [
            (
                "max_batch_sizee: 4",
                "m/config.pbtxt:1:1: field 'max_batch_sizee' not found",
            ),
            (
                "input [ { name: \"x\" }, { data_type: TYPE_FP33 } ]",
                "m/config.pbtxt:1:37: value 'TYPE_FP33' was not found",
            ),
            (
                "name: \"a\"\nmax_batch_size: \"sixty\"",
                "m/config.pbtxt:2:17: expected an integer",
            ),
            (
                "dynamic_batching {",
                "m/config.pbtxt:1:19: expected '}' or a field name",
            ),
        ];
        for (text, expected) in cases {
            let err = parse(text).unwrap_err();
            assert!(
                err.starts_with(expected),
                "{text:?}: got {err:?}, want prefix {expected:?}"
            );
        }
    }

    #[test]
    fn colon_insertion_leaves_values_and_strings_alone() {
        let (fixed, at) = insert_list_colons("a [1] b: [2] s: \"x [\" # c [\n1e5 [");
        assert_eq!(fixed, "a :[1] b: [2] s: \"x [\" # c [\n1e5 [");
        assert_eq!(at, vec![2]);
    }
}
