//! Zero ranges in a resync: a piece of a copy that reads as zeros (a hole left by `mkfs`'s
//! discard, a never-written part of a thin volume, zeros written by the application) goes to
//! the secondary as a WRITE_ZEROES range, not as payload, and the secondary punches a hole
//! there, as it does for the application's own WRITE_ZEROES (`volume/local_io.rs`).
//!
//! Why: a resync right after `mkfs` (which discards the whole device), or the full resync of a
//! new or replaced disk, would otherwise push every byte of a mostly empty volume over the
//! link and allocate it on the secondary. DRBD 9 does the same (`rs-discard-granularity`).
//!
//! The source first asks the file system (`SEEK_DATA`, as `cp` and `qemu-img` do) whether
//! a piece holds any data: a hole is not even read, which is what makes the resync after a
//! whole-device discard quick (512 GiB of holes read as zeros take minutes). A piece that holds
//! data is read and then checked byte by byte, so written zeros go as a range too.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Whether the file system reports any data in `len > 0` bytes at `offset` (false: all of it
/// is a hole, and reads as zeros). Where it cannot tell (`SEEK_DATA` unsupported: a block
/// device, an old file system), everything counts as data.
pub fn holds_data(file: &File, offset: u64, len: u64) -> std::io::Result<bool> {
    assert!(len > 0);
    let Ok(off) = i64::try_from(offset) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: lseek reads no memory of ours. It moves the file offset, which nothing here
    // uses: every read and write of the backing file is positioned (pread/pwrite, io_uring).
    let at = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if at >= 0 {
        return Ok((at as u64) < offset + len);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENXIO) => Ok(false), // no data from `offset` to the end of the file
        Some(libc::EINVAL) => Ok(true), // SEEK_DATA not supported here
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Whether every byte of `buf` is zero. Folds 64 bytes at a time with no early exit inside a
/// block, which the compiler turns into vector ORs.
pub fn is_zero(buf: &[u8]) -> bool {
    let mut blocks = buf.chunks_exact(64);
    let whole = blocks.by_ref().all(|b| b.iter().fold(0u8, |acc, &x| acc | x) == 0);
    whole && blocks.remainder().iter().all(|&x| x == 0)
}

/// Makes `len` bytes at `offset` of the backing file read as zeros: a punched hole (size
/// kept), or, where the file system or device cannot punch (`EOPNOTSUPP`), zeros written from
/// `scratch` (an aligned buffer, so an O_DIRECT file takes them too). `scratch` is zeroed
/// as far as it is used.
pub fn zero_range(file: &File, offset: u64, len: u64, scratch: &mut [u8]) -> std::io::Result<()> {
    assert!(!scratch.is_empty());
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let (off, n) = (i64::try_from(offset), i64::try_from(len));
    let (Ok(off), Ok(n)) = (off, n) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    // SAFETY: fallocate reads no memory of ours; the fd is open for as long as `file` lives.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    let chunk = (scratch.len() as u64).min(len) as usize;
    scratch[..chunk].fill(0);
    let mut done = 0u64;
    while done < len {
        let k = (len - done).min(chunk as u64) as usize;
        file.write_all_at(&scratch[..k], offset + done)?;
        done += k as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_set_byte_anywhere_is_not_zero() {
        for len in [0usize, 1, 63, 64, 65, 127, 128, 4096, 4096 + 17] {
            let mut buf = vec![0u8; len];
            assert!(is_zero(&buf), "len {len}");
            for i in 0..len {
                buf[i] = 1 << (i % 8);
                assert!(!is_zero(&buf), "len {len}, byte {i}");
                buf[i] = 0;
            }
        }
    }

    #[test]
    fn holes_hold_no_data_and_written_zeros_do() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(8 << 20).unwrap();
        assert!(!holds_data(&f, 0, 8 << 20).unwrap(), "a new sparse file is one hole");
        f.write_all_at(&[0u8; 4096], 4 << 20).unwrap();
        assert!(holds_data(&f, 0, 8 << 20).unwrap());
        assert!(holds_data(&f, (4 << 20) + 4095, 1).unwrap());
        assert!(!holds_data(&f, 0, 1 << 20).unwrap());
        assert!(!holds_data(&f, (4 << 20) + 4096, 1 << 20).unwrap(), "past the last data: ENXIO");
    }

    #[test]
    fn a_zeroed_range_reads_as_zeros_and_leaves_the_rest() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&[0xabu8; 256 << 10], 0).unwrap();
        let mut scratch = vec![0x55u8; 64 << 10];
        zero_range(&f, 64 << 10, 128 << 10, &mut scratch).unwrap();
        let mut back = vec![0u8; 256 << 10];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(back[..64 << 10].iter().all(|&b| b == 0xab));
        assert!(is_zero(&back[64 << 10..192 << 10]));
        assert!(back[192 << 10..].iter().all(|&b| b == 0xab));
        assert_eq!(f.metadata().unwrap().len(), 256 << 10, "the size is kept");
    }
}
