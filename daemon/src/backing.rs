//! The backing file (or block device) that holds this node's copy of a volume.
//!
//! Opened by every role and by `metroblk attach`, through this one function, so the same
//! refusals apply everywhere: a file of another size is never resized (it may be another
//! volume's data), and a block device is claimed exclusively.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};

use crate::config::{IoMode, VolumeConfig};

/// Why a backing file cannot be used, in one line naming the volume and the path.
#[derive(Debug, thiserror::Error)]
#[error("volume {volume}: backing file {path}: {message}")]
pub struct BackingError {
    pub volume: String,
    pub path: String,
    pub message: String,
}

/// Opens (creating if missing) the backing file and checks its size against the volume's.
pub fn open(cfg: &VolumeConfig) -> Result<File, BackingError> {
    let err = |message: String| BackingError {
        volume: cfg.name.clone(),
        path: cfg.backing_file.display().to_string(),
        message,
    };
    let mut opts = OpenOptions::new();
    // Created private: the volume's data is nobody else's business.
    opts.read(true).write(true).mode(0o600);
    let mut flags = 0;
    if cfg.io_mode == IoMode::Direct {
        flags |= libc::O_DIRECT;
    }
    // A block device is opened exclusively (O_EXCL without O_CREAT: the kernel refuses it with
    // EBUSY while the device is mounted or claimed by another exclusive opener, such as a
    // second node or md), so two writers cannot share the disk.
    if std::fs::metadata(&cfg.backing_file).is_ok_and(|m| m.file_type().is_block_device()) {
        flags |= libc::O_EXCL;
    }
    opts.custom_flags(flags);
    let file = match opts.open(&cfg.backing_file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let f = opts.create_new(true).open(&cfg.backing_file).map_err(|e| err(format!("cannot create: {e}")))?;
            f.set_len(cfg.size).map_err(|e| err(format!("cannot size to {} bytes: {e}", cfg.size)))?;
            tracing::info!(volume = %cfg.name, path = %cfg.backing_file.display(), size = cfg.size, "created backing file");
            f
        }
        Err(e) => return Err(err(format!("cannot open: {e}"))),
    };
    let meta = file.metadata().map_err(|e| err(format!("cannot stat: {e}")))?;
    if meta.is_file() && meta.len() != cfg.size {
        return Err(err(format!(
            "is {} bytes but the volume is {} bytes (refusing to resize existing data)",
            meta.len(),
            cfg.size
        )));
    }
    Ok(file)
}
