//! Reading preference triples (question, chosen answer, rejected answer, optional image) for
//! Phantom Optimization.
//!
//! Two file layouts are accepted, told apart by the first non-whitespace byte:
//!
//! * `[` — one JSON array of objects (the layout of the official Phantom triples);
//! * anything else — JSON Lines, one object per line, blank lines ignored.
//!
//! Each record must hold non-empty string fields for the question and both answers. The image
//! field is optional: absent or `null` makes a text-only triple. Relative image paths are
//! resolved against an image root (by default the data file's directory) and the file must
//! exist; images are not decoded here. Field names are configurable through [`FieldNames`].
//!
//! Bad records are either all reported at once ([`DataError::BadRecords`]) or skipped and
//! returned in [`Dataset::skipped`], so that one broken line in a large file does not hide the
//! others.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// How many bad records [`DataError::BadRecords`] carries and shows.
const SHOWN_BAD_RECORDS: usize = 10;

/// One preference triple, ready for training.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Triple {
    /// The user's question, without any image placeholder.
    pub question: String,
    /// The preferred answer.
    pub chosen: String,
    /// The answer the model should move away from.
    pub rejected: String,
    /// The image the question is about (resolved against the image root), or `None` for a
    /// text-only triple.
    pub image: Option<PathBuf>,
    /// Where the record sits in its file, for messages about it (`None` if built in code).
    pub location: Option<Location>,
}

/// Keys of the record fields, for data sets that name them differently.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct FieldNames {
    /// Key of the question (default `question`).
    pub question: String,
    /// Key of the preferred answer (default `chosen`).
    pub chosen: String,
    /// Key of the rejected answer (default `rejected`).
    pub rejected: String,
    /// Key of the optional image path (default `image`).
    pub image: String,
}

impl Default for FieldNames {
    fn default() -> Self {
        Self {
            question: "question".to_string(),
            chosen: "chosen".to_string(),
            rejected: "rejected".to_string(),
            image: "image".to_string(),
        }
    }
}

/// Where a record sits in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// 1-based line of a JSON Lines file (blank lines are counted).
    Line(usize),
    /// 0-based index of an element of a JSON array file.
    Index(usize),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Line(line) => write!(f, "line {line}"),
            Self::Index(index) => write!(f, "record {index}"),
        }
    }
}

/// A record that could not be turned into a [`Triple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// The data file.
    pub file: PathBuf,
    /// Where the record is in the file.
    pub location: Location,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.file.display(),
            self.location,
            self.reason
        )
    }
}

/// The usable triples of a file, and the records that were skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dataset {
    /// Triples in file order.
    pub triples: Vec<Triple>,
    /// Records left out because they were bad (only filled when skipping was asked for).
    pub skipped: Vec<BadRecord>,
}

/// Errors of [`read_triples`].
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The data file could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        /// The data file.
        path: PathBuf,
        /// Underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file starts with `[` but is not a JSON array as a whole.
    #[error("{} starts with `[` but is not a valid JSON array: {reason}", .path.display())]
    NotJson {
        /// The data file.
        path: PathBuf,
        /// Message of the JSON parser.
        reason: String,
    },
    /// Some records are bad and skipping was not asked for.
    #[error("{}", fmt_bad_records(.path, *.count, .shown))]
    BadRecords {
        /// The data file.
        path: PathBuf,
        /// Number of bad records in the file.
        count: usize,
        /// The first few of them, in file order.
        shown: Vec<BadRecord>,
    },
    /// The file holds no usable triple.
    #[error("{} holds no usable preference triple", .path.display())]
    Empty {
        /// The data file.
        path: PathBuf,
    },
}

fn fmt_bad_records(path: &Path, count: usize, shown: &[BadRecord]) -> String {
    let mut out = format!("{}: {count} bad record(s):", path.display());
    for bad in shown {
        out.push_str("\n  ");
        out.push_str(&bad.to_string());
    }
    if count > shown.len() {
        let more = count - shown.len();
        out.push_str("\n  … and ");
        out.push_str(&more.to_string());
        out.push_str(" more");
    }
    out.push_str("\nfix them, or pass --skip-bad to train on the remaining records");
    out
}

/// Reads the preference triples of `path` (a JSON array or JSON Lines file).
///
/// `image_root` is the directory relative image paths are resolved against; `None` uses the
/// data file's directory. With `skip_bad`, bad records are left out and listed in
/// [`Dataset::skipped`]; without it, any bad record fails the whole read with
/// [`DataError::BadRecords`], which reports all of them. A file without a single usable
/// triple is [`DataError::Empty`].
///
/// # Errors
///
/// [`DataError::Io`] when the file cannot be read, [`DataError::NotJson`] when an array file
/// does not parse as a whole, [`DataError::BadRecords`] and [`DataError::Empty`] as above.
pub fn read_triples(
    path: &Path,
    fields: &FieldNames,
    image_root: Option<&Path>,
    skip_bad: bool,
) -> Result<Dataset, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // Editors on some systems prefix UTF-8 files with a byte-order mark.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let image_root = match image_root {
        Some(root) => root.to_path_buf(),
        None => path.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let reader = RecordReader {
        file: path,
        fields,
        image_root: &image_root,
    };

    let records = if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        reader.array_records(bytes)?
    } else {
        reader.line_records(bytes)
    };

    let mut dataset = Dataset::default();
    for record in records {
        match record {
            Ok(triple) => dataset.triples.push(triple),
            Err(bad) => dataset.skipped.push(bad),
        }
    }
    if !skip_bad && !dataset.skipped.is_empty() {
        let count = dataset.skipped.len();
        dataset.skipped.truncate(SHOWN_BAD_RECORDS);
        return Err(DataError::BadRecords {
            path: path.to_path_buf(),
            count,
            shown: dataset.skipped,
        });
    }
    if dataset.triples.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(dataset)
}

/// Turns the records of one file into triples or bad-record reports.
struct RecordReader<'a> {
    file: &'a Path,
    fields: &'a FieldNames,
    image_root: &'a Path,
}

impl RecordReader<'_> {
    fn array_records(&self, bytes: &[u8]) -> Result<Vec<Result<Triple, BadRecord>>, DataError> {
        let values: Vec<Value> = serde_json::from_slice(bytes).map_err(|e| DataError::NotJson {
            path: self.file.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(values
            .iter()
            .enumerate()
            .map(|(index, value)| self.record(value, Location::Index(index)))
            .collect())
    }

    fn line_records(&self, bytes: &[u8]) -> Vec<Result<Triple, BadRecord>> {
        bytes
            .split(|&b| b == b'\n')
            .enumerate()
            .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
            .map(|(i, line)| {
                let location = Location::Line(i + 1);
                match serde_json::from_slice::<Value>(line) {
                    Ok(value) => self.record(&value, location),
                    Err(e) => Err(self.bad(location, invalid_json_reason(&e))),
                }
            })
            .collect()
    }

    fn record(&self, value: &Value, location: Location) -> Result<Triple, BadRecord> {
        self.triple(value)
            .map(|triple| Triple {
                location: Some(location),
                ..triple
            })
            .map_err(|reason| self.bad(location, reason))
    }

    fn bad(&self, location: Location, reason: String) -> BadRecord {
        BadRecord {
            file: self.file.to_path_buf(),
            location,
            reason,
        }
    }

    fn triple(&self, value: &Value) -> Result<Triple, String> {
        let Value::Object(object) = value else {
            return Err(format!("not a JSON object (found {})", kind_of(value)));
        };
        let question = required_text(object, &self.fields.question)?;
        let chosen = required_text(object, &self.fields.chosen)?;
        let rejected = required_text(object, &self.fields.rejected)?;
        let image = match object.get(&self.fields.image) {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => Some(self.image_path(&self.fields.image, text)?),
            Some(other) => {
                return Err(format!(
                    "field `{}` is not a string (found {})",
                    self.fields.image,
                    kind_of(other)
                ));
            }
        };
        Ok(Triple {
            question,
            chosen,
            rejected,
            image,
            location: None,
        })
    }

    fn image_path(&self, key: &str, text: &str) -> Result<PathBuf, String> {
        if text.trim().is_empty() {
            return Err(format!("field `{key}` is empty"));
        }
        // `join` keeps absolute paths as they are.
        let path = self.image_root.join(text);
        if !path.is_file() {
            return Err(format!("image file not found: {}", path.display()));
        }
        Ok(path)
    }
}

/// A string field that must be present and hold more than whitespace; its text is kept as is.
fn required_text(object: &Map<String, Value>, key: &str) -> Result<String, String> {
    match object.get(key) {
        None => Err(format!("missing field `{key}`")),
        Some(Value::String(text)) if text.trim().is_empty() => {
            Err(format!("field `{key}` is empty"))
        }
        Some(Value::String(text)) => Ok(text.clone()),
        Some(other) => Err(format!(
            "field `{key}` is not a string (found {})",
            kind_of(other)
        )),
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The parser's message with its position given as a column: the line number it reports is
/// always 1 for a single line, which would contradict the record's own location.
fn invalid_json_reason(error: &serde_json::Error) -> String {
    let message = error.to_string();
    let suffix = format!(" at line {} column {}", error.line(), error.column());
    let message = message.strip_suffix(&suffix).unwrap_or(&message);
    format!("invalid JSON: {message} (column {})", error.column())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "phantom-train-data-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn write(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.0.join(name);
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).unwrap();
            }
            fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn read(path: &Path, skip_bad: bool) -> Result<Dataset, DataError> {
        read_triples(path, &FieldNames::default(), None, skip_bad)
    }

    /// The reason of the only bad record of a JSONL file with a good line and then `line`.
    fn single_reason(line: &str) -> String {
        let dir = TempDir::new();
        let path = dir.write("data.jsonl", &format!("{GOOD}\n{line}\n"));
        match read(&path, false) {
            Err(DataError::BadRecords {
                count: 1, shown, ..
            }) => {
                assert_eq!(shown[0].location, Location::Line(2));
                shown[0].reason.clone()
            }
            other => panic!("expected one bad record, got {other:?}"),
        }
    }

    const GOOD: &str = r#"{"question": "q", "chosen": "c", "rejected": "r"}"#;

    #[test]
    fn jsonl_text_only_records() {
        let dir = TempDir::new();
        let path = dir.write(
            "data.jsonl",
            &format!(
                "{GOOD}\n{}\n",
                r#"{"question": " Why? ", "chosen": "Yes.", "rejected": "No.", "image": null}"#
            ),
        );
        let data = read(&path, false).unwrap();
        assert_eq!(data.triples.len(), 2);
        assert!(data.skipped.is_empty());
        assert_eq!(
            data.triples[1],
            Triple {
                question: " Why? ".into(),
                chosen: "Yes.".into(),
                rejected: "No.".into(),
                image: None,
                location: Some(Location::Line(2)),
            }
        );
    }

    #[test]
    fn jsonl_crlf_bom_and_blank_lines() {
        let dir = TempDir::new();
        let path = dir.write(
            "data.jsonl",
            &format!("\u{FEFF}\r\n{GOOD}\r\n  \r\n{GOOD}\r\n"),
        );
        assert_eq!(read(&path, false).unwrap().triples.len(), 2);
    }

    #[test]
    fn line_numbers_count_blank_lines() {
        let dir = TempDir::new();
        let path = dir.write(
            "data.jsonl",
            &format!("{GOOD}\n\n\n{{\"question\": 1}}\n\n{GOOD}\nnot json\n"),
        );
        let Err(DataError::BadRecords { count, shown, .. }) = read(&path, false) else {
            panic!("expected bad records");
        };
        assert_eq!(count, 2);
        assert_eq!(shown[0].location, Location::Line(4));
        assert_eq!(shown[1].location, Location::Line(7));
        assert!(
            shown[1].reason.starts_with("invalid JSON"),
            "{}",
            shown[1].reason
        );
    }

    #[test]
    fn invalid_json_line_reports_column_not_line() {
        let reason = single_reason(r#"{"question": "q", "chosen": }"#);
        assert!(reason.starts_with("invalid JSON: "), "{reason}");
        assert!(reason.contains("(column "), "{reason}");
        assert!(!reason.contains("line 1"), "{reason}");
    }

    #[test]
    fn not_an_object() {
        assert_eq!(
            single_reason(r#"["q", "c", "r"]"#),
            "not a JSON object (found an array)"
        );
        assert_eq!(single_reason("42"), "not a JSON object (found a number)");
    }

    #[test]
    fn missing_field() {
        assert_eq!(
            single_reason(r#"{"question": "q", "chosen": "c"}"#),
            "missing field `rejected`"
        );
    }

    #[test]
    fn field_not_a_string() {
        assert_eq!(
            single_reason(r#"{"question": ["q"], "chosen": "c", "rejected": "r"}"#),
            "field `question` is not a string (found an array)"
        );
        assert_eq!(
            single_reason(r#"{"question": "q", "chosen": null, "rejected": "r"}"#),
            "field `chosen` is not a string (found null)"
        );
    }

    #[test]
    fn empty_field() {
        assert_eq!(
            single_reason(r#"{"question": "q", "chosen": "c", "rejected": ""}"#),
            "field `rejected` is empty"
        );
        assert_eq!(
            single_reason(r#"{"question": " \n\t", "chosen": "c", "rejected": "r"}"#),
            "field `question` is empty"
        );
    }

    #[test]
    fn image_must_be_a_non_empty_string() {
        assert_eq!(
            single_reason(r#"{"question": "q", "chosen": "c", "rejected": "r", "image": 3}"#),
            "field `image` is not a string (found a number)"
        );
        assert_eq!(
            single_reason(r#"{"question": "q", "chosen": "c", "rejected": "r", "image": " "}"#),
            "field `image` is empty"
        );
    }

    #[test]
    fn missing_image_file() {
        let dir = TempDir::new();
        let path = dir.write(
            "data.jsonl",
            r#"{"question": "q", "chosen": "c", "rejected": "r", "image": "img/nope.png"}"#,
        );
        let Err(DataError::BadRecords { shown, .. }) = read(&path, false) else {
            panic!("expected bad records");
        };
        let expected = dir.0.join("img/nope.png");
        assert_eq!(
            shown[0].reason,
            format!("image file not found: {}", expected.display())
        );
    }

    #[test]
    fn image_resolved_against_data_dir_by_default() {
        let dir = TempDir::new();
        let image = dir.write("sub/img/a.png", "not decoded");
        let path = dir.write(
            "sub/data.jsonl",
            r#"{"question": "q", "chosen": "c", "rejected": "r", "image": "img/a.png"}"#,
        );
        let data = read(&path, false).unwrap();
        assert_eq!(data.triples[0].image.as_deref(), Some(image.as_path()));
    }

    #[test]
    fn image_resolved_against_given_root() {
        let dir = TempDir::new();
        let image = dir.write("images/a.png", "");
        let path = dir.write(
            "meta/data.jsonl",
            r#"{"question": "q", "chosen": "c", "rejected": "r", "image": "a.png"}"#,
        );
        let root = dir.0.join("images");
        let data = read_triples(&path, &FieldNames::default(), Some(&root), false).unwrap();
        assert_eq!(data.triples[0].image.as_deref(), Some(image.as_path()));
    }

    #[test]
    fn absolute_image_path_kept() {
        let dir = TempDir::new();
        let image = dir.write("a.png", "");
        let record = serde_json::json!({
            "question": "q", "chosen": "c", "rejected": "r", "image": image,
        });
        let path = dir.write("meta/data.jsonl", &record.to_string());
        let elsewhere = dir.0.join("elsewhere");
        let data = read_triples(&path, &FieldNames::default(), Some(&elsewhere), false).unwrap();
        assert_eq!(data.triples[0].image.as_deref(), Some(image.as_path()));
    }

    #[test]
    fn json_array_with_custom_field_names() {
        let dir = TempDir::new();
        let image = dir.write("images/cat.jpg", "");
        let path = dir.write(
            "triples.json",
            r#"
            [
              {"id": 1, "image": "images/cat.jpg", "question": "What is it?",
               "answer": "A cat.", "negative": "A dog."},
              {"id": 2, "question": "Say hi.", "answer": "Hi.", "negative": "No."}
            ]"#,
        );
        let fields = FieldNames {
            chosen: "answer".into(),
            rejected: "negative".into(),
            ..FieldNames::default()
        };
        let data = read_triples(&path, &fields, None, false).unwrap();
        assert_eq!(
            data.triples,
            vec![
                Triple {
                    question: "What is it?".into(),
                    chosen: "A cat.".into(),
                    rejected: "A dog.".into(),
                    image: Some(image),
                    location: Some(Location::Index(0)),
                },
                Triple {
                    question: "Say hi.".into(),
                    chosen: "Hi.".into(),
                    rejected: "No.".into(),
                    image: None,
                    location: Some(Location::Index(1)),
                },
            ]
        );
    }

    #[test]
    fn custom_field_names_in_messages() {
        let dir = TempDir::new();
        let path = dir.write(
            "data.jsonl",
            r#"{"prompt": "q", "good": "c", "bad": "r", "img": 1}"#,
        );
        let fields = FieldNames {
            question: "prompt".into(),
            chosen: "good".into(),
            rejected: "bad".into(),
            image: "img".into(),
        };
        let Err(DataError::BadRecords { shown, .. }) = read_triples(&path, &fields, None, false)
        else {
            panic!("expected bad records");
        };
        assert_eq!(
            shown[0].reason,
            "field `img` is not a string (found a number)"
        );
    }

    #[test]
    fn field_names_deserialize_with_defaults() {
        let fields: FieldNames = serde_json::from_str(r#"{"chosen": "answer"}"#).unwrap();
        assert_eq!(fields.chosen, "answer");
        assert_eq!(fields.question, "question");
        assert_eq!(fields.image, "image");
    }

    #[test]
    fn array_records_are_indexed_from_zero() {
        let dir = TempDir::new();
        let path = dir.write(
            "data.json",
            &format!("  \n[{GOOD}, 7, {GOOD}, {{\"question\": \"q\"}}]"),
        );
        let Err(DataError::BadRecords { count, shown, .. }) = read(&path, false) else {
            panic!("expected bad records");
        };
        assert_eq!(count, 2);
        assert_eq!(shown[0].location, Location::Index(1));
        assert_eq!(shown[0].reason, "not a JSON object (found a number)");
        assert_eq!(shown[1].location, Location::Index(3));
        assert_eq!(shown[1].reason, "missing field `chosen`");
    }

    #[test]
    fn broken_array_file_is_not_json() {
        let dir = TempDir::new();
        let path = dir.write("data.json", &format!("[{GOOD},"));
        assert!(matches!(read(&path, true), Err(DataError::NotJson { .. })));
    }

    #[test]
    fn missing_file_is_io_error() {
        let dir = TempDir::new();
        let err = read(&dir.0.join("absent.jsonl"), false).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }));
    }

    #[test]
    fn skip_bad_counts_and_keeps_order() {
        let dir = TempDir::new();
        let mut contents = String::new();
        for i in 0..30 {
            if i % 3 == 0 {
                contents.push_str("{}\n");
            } else {
                contents.push_str(&format!(
                    "{{\"question\": \"q{i}\", \"chosen\": \"c\", \"rejected\": \"r\"}}\n"
                ));
            }
        }
        let path = dir.write("data.jsonl", &contents);
        let data = read(&path, true).unwrap();
        assert_eq!(data.triples.len(), 20);
        assert_eq!(data.skipped.len(), 10);
        assert_eq!(data.triples[0].question, "q1");
        assert_eq!(data.skipped[9].location, Location::Line(28));
    }

    #[test]
    fn bad_records_error_shows_first_ten() {
        let dir = TempDir::new();
        let path = dir.write("data.jsonl", &format!("{GOOD}\n{}", "{}\n".repeat(12)));
        let err = read(&path, false).unwrap_err();
        let message = err.to_string();
        let DataError::BadRecords { count, shown, .. } = err else {
            panic!("expected bad records");
        };
        assert_eq!(count, 12);
        assert_eq!(shown.len(), 10);
        assert_eq!(shown[0].location, Location::Line(2));
        assert!(message.contains("12 bad record(s)"), "{message}");
        assert!(
            message.contains("line 2: missing field `question`"),
            "{message}"
        );
        assert!(message.contains("and 2 more"), "{message}");
        assert!(message.contains("--skip-bad"), "{message}");
    }

    #[test]
    fn empty_files() {
        let dir = TempDir::new();
        for (name, contents) in [("a.jsonl", ""), ("b.jsonl", "\n  \n"), ("c.json", "[]")] {
            let path = dir.write(name, contents);
            assert!(
                matches!(read(&path, false), Err(DataError::Empty { .. })),
                "{name}"
            );
        }
    }

    #[test]
    fn all_bad_with_skip_is_empty() {
        let dir = TempDir::new();
        let path = dir.write("data.jsonl", "{}\n[]\n");
        assert!(matches!(read(&path, true), Err(DataError::Empty { .. })));
    }

    #[test]
    fn display_formats() {
        assert_eq!(Location::Line(12).to_string(), "line 12");
        assert_eq!(Location::Index(7).to_string(), "record 7");
        let bad = BadRecord {
            file: PathBuf::from("d/x.jsonl"),
            location: Location::Line(3),
            reason: "missing field `chosen`".into(),
        };
        assert_eq!(bad.to_string(), "d/x.jsonl: line 3: missing field `chosen`");
    }
}
