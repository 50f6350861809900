//! The witness's state file: its decisions, kept across restarts.
//!
//! The rule: **a state file is either exactly what [`save`] last wrote completely, or it is
//! refused.** A witness that started from a torn or corrupt file could forget that it promoted
//! a node (and grant the old primary again: split brain), so [`load`] refuses anything it cannot
//! verify and the server does not start: the operator decides (restore it, or remove it and let
//! the primaries register again).
//!
//! Layout: one JSON object `{"format": "metroblk-witness-state", "version": 1, "crc32c":
//! "<8 lowercase hex digits>", "body": {...}}` followed by a newline. The crc32c covers the
//! body's bytes exactly as they stand in the file; the final newline marks a complete write.
//! [`save`] writes `FILE.tmp`, fsyncs it, renames it over `FILE` and fsyncs the directory, so a
//! crash leaves the old file or the new one, never a mix.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::registry::State;

/// What the file's `format` field says.
pub const STATE_FORMAT: &str = "metroblk-witness-state";
/// The layout version this code writes and reads.
pub const STATE_VERSION: u32 = 1;
/// Largest state file accepted (a witness with thousands of volumes stays far below).
const STATE_BYTES_MAX: u64 = 64 << 20;

/// Why a state file was refused. One line, naming the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("witness state file {}: {problem}", .file.display())]
pub struct StateError {
    pub file: PathBuf,
    pub problem: String,
}

#[derive(Serialize)]
struct FileOut<'a> {
    format: &'a str,
    version: u32,
    crc32c: String,
    body: &'a RawValue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIn<'a> {
    format: String,
    version: u32,
    crc32c: String,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// The file's bytes for `state`.
pub fn encode(state: &State) -> Vec<u8> {
    // State is plain data (strings, numbers, maps with string keys): it always serializes.
    let body = serde_json::to_string(state).unwrap_or_else(|_| "{}".to_owned());
    let crc = crc32c::crc32c(body.as_bytes());
    let raw =
        RawValue::from_string(body).unwrap_or_else(|_| RawValue::from_string("{}".to_owned()).unwrap_or_default());
    let out = FileOut { format: STATE_FORMAT, version: STATE_VERSION, crc32c: format!("{crc:08x}"), body: &raw };
    let mut text = serde_json::to_vec(&out).unwrap_or_default();
    text.push(b'\n');
    text
}

/// Checks and decodes a state file's bytes; the error text is the problem (without the file).
pub fn decode(bytes: &[u8]) -> Result<State, String> {
    if bytes.last() != Some(&b'\n') {
        return Err("torn: it does not end with the newline a complete write leaves".into());
    }
    let file: FileIn<'_> = serde_json::from_slice(bytes).map_err(|e| format!("not a witness state file: {e}"))?;
    if file.format != STATE_FORMAT {
        return Err(format!(
            "format is {:?}, not {STATE_FORMAT:?}",
            metroblk_protocol::printable(file.format.as_bytes())
        ));
    }
    if file.version != STATE_VERSION {
        return Err(format!("layout version {} (this witness reads version {STATE_VERSION})", file.version));
    }
    let body = file.body.get();
    let crc = crc32c::crc32c(body.as_bytes());
    if file.crc32c != format!("{crc:08x}") {
        return Err(format!(
            "checksum mismatch (recorded {:?}, computed {crc:08x}): the file is corrupt",
            metroblk_protocol::printable(file.crc32c.as_bytes())
        ));
    }
    serde_json::from_str(body).map_err(|e| format!("checksum matches but the body does not parse: {e}"))
}

/// Reads the state file: `None` when there is none (a fresh witness), an error for anything
/// else it cannot verify.
pub fn load(path: &Path) -> Result<Option<State>, StateError> {
    let err = |problem: String| StateError { file: path.to_path_buf(), problem };
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(format!("cannot open: {e}"))),
    };
    let len = file.metadata().map_err(|e| err(format!("cannot stat: {e}")))?.len();
    if len > STATE_BYTES_MAX {
        return Err(err(format!("{len} bytes is over the limit of {STATE_BYTES_MAX}")));
    }
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    decode(&bytes).map(Some).map_err(err)
}

/// Writes the state durably: `FILE.tmp`, fsync, rename over `FILE`, fsync the directory.
pub fn save(path: &Path, state: &State) -> Result<(), StateError> {
    let err = |problem: String| StateError { file: path.to_path_buf(), problem };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| err(format!("cannot create {}: {e}", tmp.display())))?;
    f.write_all(&encode(state)).map_err(|e| err(format!("cannot write {}: {e}", tmp.display())))?;
    f.sync_all().map_err(|e| err(format!("cannot fsync {}: {e}", tmp.display())))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| err(format!("cannot rename {} over it: {e}", tmp.display())))?;
    // The rename is durable only once the directory is.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err(format!("cannot fsync the directory {}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use metroblk_protocol::witness::{Request, VolumeId};

    fn sample() -> State {
        let mut r = Registry::new();
        let volume = VolumeId::new("vol0", "6d657472-6f62-6c6b-0000-000000000001", "alpha", "beta");
        r.handle(0, "alpha", &Request::Outdate { volume, epoch: 3, lease_ms: 5000, drift_ppm: 10_000 });
        let volume = VolumeId::new("vol1", "u1", "alpha", "gamma");
        r.handle(0, "gamma", &Request::Lease { volume, epoch: 1, lease_ms: 5000, drift_ppm: 10_000 });
        r.to_state()
    }

    #[test]
    fn round_trip_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        assert_eq!(load(&path).unwrap(), None);
        save(&path, &sample()).unwrap();
        assert_eq!(load(&path).unwrap(), Some(sample()));
        assert!(!dir.path().join("state.json.tmp").exists());
        save(&path, &State::default()).unwrap();
        assert_eq!(load(&path).unwrap(), Some(State::default()));
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encode(&sample());
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "a {cut}-byte prefix was accepted");
        }
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let bytes = encode(&sample());
        for i in 0..bytes.len() {
            for mask in [0x01u8, 0x20, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= mask;
                assert!(decode(&b).is_err(), "flip {mask:#x} at {i} accepted: {}", String::from_utf8_lossy(&b));
            }
        }
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        save(&path, &sample()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.starts_with(&format!("witness state file {}: torn", path.display())), "{e}");
        assert!(!e.contains('\n'));
        std::fs::write(&path, b"").unwrap();
        assert!(load(&path).is_err());
    }
}
