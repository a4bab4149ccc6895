//! TensorBoard event files (`logging.tensorboard = true`): the scalars of `metrics.jsonl` under
//! the tags transformers' `TensorBoardCallback` writes (`train/loss`, `train/learning_rate`,
//! `eval/loss`, ...), so `tensorboard --logdir runs/` shows trainer's runs beside theirs.
//!
//! The format is small and written here directly: a file of TFRecords (length, masked CRC-32C
//! of the length, data, masked CRC-32C of the data), each holding one `Event` protobuf
//! (`wall_time`, `step`, and a `file_version` or a `Summary` of `{tag, simple_value}`).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub struct EventWriter {
    path: PathBuf,
    file: File,
}

impl EventWriter {
    /// A new event file in `dir` (`events.out.tfevents.{seconds}.{host}`, TensorBoard's name
    /// pattern; a resumed run adds a file beside the earlier one, as torch's writer does).
    pub fn create(dir: &Path) -> Result<Self> {
        let now = wall_time();
        let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_default();
        let host = if host.is_empty() { "localhost".to_string() } else { host };
        let path = dir.join(format!("events.out.tfevents.{}.{host}.{}", now as u64, std::process::id()));
        let file = File::create(&path).map_err(|e| Error::file(&path, format!("cannot create the TensorBoard event file: {e}")))?;
        let mut w = EventWriter { path, file };
        let mut event = Vec::new();
        put_double(&mut event, 1, now);
        put_bytes(&mut event, 3, b"brain.Event:2");
        w.write_record(&event)?;
        Ok(w)
    }

    /// One event at `step` with a scalar for each of `values` (`(tag, value)`), flushed.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            put_bytes(&mut value, 1, tag.as_bytes());
            put_key(&mut value, 2, 5);
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            put_bytes(&mut summary, 1, &value);
        }
        let mut event = Vec::new();
        put_double(&mut event, 1, wall_time());
        put_key(&mut event, 2, 0);
        put_varint(&mut event, step);
        put_bytes(&mut event, 5, &summary);
        self.write_record(&event)
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc(&len).to_le_bytes());
        record.extend_from_slice(data);
        record.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&record).and_then(|_| self.file.flush()).map_err(|e| Error::file(&self.path, format!("cannot write: {e}")))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A protobuf field key: field number and wire type (0 varint, 1 64-bit, 2 bytes, 5 32-bit).
fn put_key(out: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(out, field << 3 | wire);
}

fn put_double(out: &mut Vec<u8>, field: u64, v: f64) {
    put_key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// TFRecord's masked CRC-32C (Castagnoli): rotated right by 15 and offset, so that a CRC of
/// data that holds CRCs is not degenerate.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    (crc.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0x82f6_3b78 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |c, &b| TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8))
}

/// The events of a file as `(step, [(tag, value)])`, each record's CRCs checked; the first
/// (the file version) comes as step 0 with no values. For tests and `trainer runs`-style tools.
pub fn read_events(path: &Path) -> Result<Vec<(u64, Vec<(String, f32)>)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let bad = |what: &str| Error::file(path, format!("not a TensorBoard event file: {what}"));
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let head = bytes.get(at..at + 12).ok_or_else(|| bad("a record cut short"))?;
        let len = u64::from_le_bytes(head[..8].try_into().unwrap_or_default()) as usize;
        if masked_crc(&head[..8]).to_le_bytes() != head[8..12] {
            return Err(bad("a length's CRC does not match"));
        }
        let data = bytes.get(at + 12..at + 12 + len).ok_or_else(|| bad("a record cut short"))?;
        let crc = bytes.get(at + 12 + len..at + 16 + len).ok_or_else(|| bad("a record cut short"))?;
        if masked_crc(data).to_le_bytes() != crc {
            return Err(bad("a record's CRC does not match"));
        }
        out.push(decode_event(data).ok_or_else(|| bad("an event that does not decode"))?);
        at += 16 + len;
    }
    Ok(out)
}

/// `(field, wire type, value bytes or varint)` of each field of a protobuf message.
fn fields(mut m: &[u8]) -> Option<Vec<(u64, u64, &[u8], u64)>> {
    fn varint(m: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = m.split_first()?;
            *m = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !m.is_empty() {
        let key = varint(&mut m)?;
        let (field, wire) = (key >> 3, key & 7);
        let (bytes, n): (&[u8], u64) = match wire {
            0 => (&[], varint(&mut m)?),
            1 | 5 => {
                let w = if wire == 1 { 8 } else { 4 };
                let (b, rest) = (m.get(..w)?, m.get(w..)?);
                m = rest;
                (b, 0)
            }
            2 => {
                let len = varint(&mut m)? as usize;
                let (b, rest) = (m.get(..len)?, m.get(len..)?);
                m = rest;
                (b, 0)
            }
            _ => return None,
        };
        out.push((field, wire, bytes, n));
    }
    Some(out)
}

fn decode_event(data: &[u8]) -> Option<(u64, Vec<(String, f32)>)> {
    let mut step = 0;
    let mut values = Vec::new();
    for (field, _, bytes, n) in fields(data)? {
        match field {
            2 => step = n,
            5 => {
                for (_, _, value, _) in fields(bytes)?.into_iter().filter(|f| f.0 == 1) {
                    let (mut tag, mut v) = (String::new(), f32::NAN);
                    for (f, _, b, _) in fields(value)? {
                        match f {
                            1 => tag = String::from_utf8(b.to_vec()).ok()?,
                            2 => v = f32::from_le_bytes(b.try_into().ok()?),
                            _ => {}
                        }
                    }
                    values.push((tag, v));
                }
            }
            _ => {}
        }
    }
    Some((step, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_of_the_standard_check_string() {
        // The CRC-32C check value (RFC 3720's Castagnoli polynomial).
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn scalars_read_back_with_their_steps_and_tags() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(1, &[("train/loss", 2.5), ("train/learning_rate", 1e-4)]).unwrap();
        w.scalars(300, &[("eval/loss", 1.25)]).unwrap();
        let file = std::fs::read_dir(dir.path()).unwrap().flatten().next().unwrap().path();
        assert!(file.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."));
        let events = read_events(&file).unwrap();
        assert_eq!(events.len(), 3, "the file version, then two events");
        assert_eq!(events[1], (1, vec![("train/loss".to_string(), 2.5), ("train/learning_rate".to_string(), 1e-4)]));
        assert_eq!(events[2], (300, vec![("eval/loss".to_string(), 1.25)]));
        // A flipped byte is caught by the CRC.
        let mut bytes = std::fs::read(&file).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 1;
        std::fs::write(&file, bytes).unwrap();
        assert!(read_events(&file).unwrap_err().to_string().contains("CRC"));
    }
}
