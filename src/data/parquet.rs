//! Reading a `.parquet` source: each row becomes the JSON object it would be in a `.jsonl`
//! file (nested lists and structs become arrays and objects), so the three row shapes and
//! their errors are [`source::parse_row`](super::source::parse_row)'s.
//!
//! The `parquet` crate is built without arrow and with snappy only: Hugging Face `datasets`
//! and pyarrow write snappy by default. A file with another codec (zstd, gzip, ...) is refused
//! up front with the codec named. Measured build cost (dev profile, dependencies at
//! opt-level 2, 2 cores, clean): about 125 s of compile units that the repo did not build
//! before, 85 s of it the `parquet` crate itself.

use std::path::Path;

use ::parquet::basic::Compression;
use ::parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::Value;

use crate::error::{Error, Result};

/// Codecs this build decompresses.
const READABLE: &str = "uncompressed or snappy";

/// The rows of a Parquet file as JSON objects, each with its place (`row N`, 0-based over the
/// whole file) for error messages. A row the reader cannot decode is an error naming its index.
pub fn rows(path: &Path) -> Result<Vec<(String, std::result::Result<Value, String>)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| Error::file(path, format!("is not a readable Parquet file: {e}")))?;
    let meta = reader.metadata();
    for (g, group) in meta.row_groups().iter().enumerate() {
        for column in group.columns() {
            let codec = column.compression();
            if !matches!(codec, Compression::UNCOMPRESSED | Compression::SNAPPY) {
                return Err(Error::file(
                    path,
                    format!(
                        "row group {g}, column `{}` is compressed with {}; this build reads {READABLE} \
                         Parquet (rewrite it with compression=\"snappy\", or convert it to .jsonl)",
                        column.column_path().string(),
                        codec_name(codec)
                    ),
                ));
            }
        }
    }
    let expected = usize::try_from(meta.file_metadata().num_rows()).unwrap_or(0);
    let iter = reader.get_row_iter(None).map_err(|e| Error::file(path, format!("cannot read rows: {e}")))?;
    let mut out = Vec::with_capacity(expected);
    for (i, row) in iter.enumerate() {
        let row = row.map_err(|e| Error::file(path, format!("row {i}: cannot decode: {e}")))?;
        out.push((format!("row {i}"), Ok(row.to_json_value())));
    }
    Ok(out)
}

fn codec_name(codec: Compression) -> &'static str {
    match codec {
        Compression::UNCOMPRESSED => "no compression",
        Compression::SNAPPY => "snappy",
        Compression::GZIP(_) => "gzip",
        Compression::LZO => "lzo",
        Compression::BROTLI(_) => "brotli",
        Compression::LZ4 | Compression::LZ4_RAW => "lz4",
        Compression::ZSTD(_) => "zstd",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::{load, Conversation, Role};

    fn fixture(name: &str) -> String {
        format!("{}/tests/fixtures/data/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    fn conv(system: Option<&str>, turns: &[(Role, &str)]) -> Conversation {
        Conversation::new(system, turns)
    }

    #[test]
    fn the_three_row_shapes_read_as_from_jsonl() {
        use Role::{Assistant as A, User as U};
        let alpaca = load(&fixture("alpaca.parquet"), false).unwrap();
        assert_eq!(alpaca.skipped, 0);
        assert_eq!(
            alpaca.rows,
            [
                conv(None, &[(U, "Say hi."), (A, "Hi!")]),
                conv(Some("You add."), &[(U, "Add the numbers.\n2 and 3"), (A, "5")]),
                conv(None, &[(U, "Translate to French.\ncat"), (A, "chat")]),
            ]
        );
        let messages = load(&fixture("messages.parquet"), false).unwrap().rows;
        assert_eq!(
            messages,
            [
                conv(Some("Be brief."), &[(U, "Capital of France?"), (A, "Paris.")]),
                conv(None, &[(U, "你是谁？"), (A, "我是{{NAME}}。"), (U, "Who made you?"), (A, "{{AUTHOR}}.")]),
            ]
        );
        let sharegpt = load(&fixture("sharegpt.parquet"), false).unwrap().rows;
        assert_eq!(sharegpt, [conv(Some("You name things."), &[(U, "Name a colour."), (A, "Blue.")])]);
    }

    #[test]
    fn a_bad_row_names_the_file_and_row_index() {
        let path = fixture("bad_row.parquet");
        let err = load(&path, false).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{path}:row 2: `output` is null, not a string; expected an alpaca row")), "{err}");
        let loaded = load(&path, true).unwrap();
        assert_eq!((loaded.rows.len(), loaded.skipped), (2, 1));
    }

    #[test]
    fn other_codecs_are_refused_by_name() {
        let path = fixture("zstd.parquet");
        let err = rows(Path::new(&path)).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{path}: row group 0, column `instruction` is compressed with zstd")), "{err}");
        assert!(err.contains("reads uncompressed or snappy Parquet"), "{err}");
    }

    #[test]
    fn non_parquet_bytes_are_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.parquet");
        std::fs::write(&path, "PAR1 but not really").unwrap();
        let err = rows(&path).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}: is not a readable Parquet file", path.display())), "{err}");
        let err = rows(&dir.path().join("missing.parquet")).unwrap_err().to_string();
        assert!(err.contains("missing.parquet"), "{err}");
    }
}
