//! Region hashes for online verify and checksum resync: one SHA-256 per region, computed
//! from the backing file the same way on both nodes.

use std::fs::File;
use std::os::unix::fs::FileExt;

use metroblk_protocol::HASH_LEN;
use sha2::{Digest, Sha256};

/// Appends the hash of each region of `[offset, offset + len)` to `out`; `buf` is scratch
/// space of at least one region (`region_size`). The last region may be short (volume end).
pub fn hash_regions(
    file: &File,
    offset: u64,
    len: u64,
    region_size: u64,
    buf: &mut [u8],
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    assert!(offset % region_size == 0 && buf.len() as u64 >= region_size.min(len));
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(region_size) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        out.extend_from_slice(&Sha256::digest(&buf[..n]));
        at += n as u64;
    }
    debug_assert_eq!(out.len() % HASH_LEN, 0);
    Ok(())
}
