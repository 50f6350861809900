//! The local backing-file I/O of one request, shared by the primary's queues and the
//! secondary's links: the io_uring entry for it (resuming a short transfer where it stopped)
//! and the text of an errno.

use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};

/// What a request does to the backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalOp {
    Read,
    /// FUA: durable before it completes (RWF_DSYNC).
    Write {
        fua: bool,
    },
    /// fdatasync.
    Flush,
    /// DISCARD and WRITE_ZEROES both punch a hole (keeping the size): a punched range reads as
    /// zeros, which is what WRITE_ZEROES promises for a file-backed device.
    PunchHole,
}

/// The entry for `op` on `len` bytes at `offset`, of which `done` are already transferred (a
/// short read or write is resumed by issuing the rest). `buf` must hold `len` bytes and stay
/// valid until the completion; it is not used by Flush and PunchHole.
pub fn sqe(fd: RawFd, op: LocalOp, offset: u64, len: u32, buf: *mut u8, done: u32) -> squeue::Entry {
    assert!(done <= len);
    let fd = types::Fd(fd);
    match op {
        LocalOp::Read => {
            // Address arithmetic only (nothing is dereferenced here): `done <= len` keeps it
            // inside the caller's buffer, which the kernel then fills.
            let p = buf.wrapping_add(done as usize);
            opcode::Read::new(fd, p, len - done).offset(offset + done as u64).build()
        }
        LocalOp::Write { fua } => {
            let p = buf.wrapping_add(done as usize);
            let flags = if fua { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(fd, p, len - done).offset(offset + done as u64).rw_flags(flags).build()
        }
        LocalOp::Flush => opcode::Fsync::new(fd).flags(types::FsyncFlags::DATASYNC).build(),
        LocalOp::PunchHole => opcode::Fallocate::new(fd, len as u64)
            .offset(offset)
            .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
            .build(),
    }
}

/// [`sqe`] for a READ or WRITE whose data is the ring's fixed buffer `buf_index` (zero copy:
/// the request's own pages, which ublk registered in the queue's ring; addresses in such a
/// buffer count from 0, so the resumed part starts at `done`). Other ops as [`sqe`].
pub fn sqe_fixed(fd: RawFd, op: LocalOp, offset: u64, len: u32, buf_index: u16, done: u32) -> squeue::Entry {
    assert!(done <= len);
    // An address inside the registered buffer, not a pointer to our memory.
    let at = std::ptr::null_mut::<u8>().wrapping_add(done as usize);
    let pos = offset + done as u64;
    match op {
        LocalOp::Read => opcode::ReadFixed::new(types::Fd(fd), at, len - done, buf_index).offset(pos).build(),
        LocalOp::Write { fua } => {
            let flags = if fua { libc::RWF_DSYNC } else { 0 };
            opcode::WriteFixed::new(types::Fd(fd), at, len - done, buf_index).offset(pos).rw_flags(flags).build()
        }
        LocalOp::Flush | LocalOp::PunchHole => sqe(fd, op, offset, len, std::ptr::null_mut(), done),
    }
}

/// What writing a buffer on the calling thread came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InlineWrite {
    /// All of it written (the byte count), or the negative errno of the failure.
    Done(i32),
    /// The file system would have blocked (writeback throttling, a contended lock) after
    /// `written` bytes: the rest goes to the ring, where an io_uring worker blocks instead of
    /// the thread that serves the link.
    WouldBlock { written: u32 },
}

/// Buffered writes on the calling thread (a queue thread, a secondary's link thread),
/// without blocking it where the file system can tell.
///
/// Why inline: a buffered write is a copy into the page cache. io_uring makes that copy
/// inline on file systems that take non-blocking buffered writes (XFS, ext4) and hands it to
/// a worker thread on the others (tmpfs): two thread switches a write, and the worker
/// serialises the writes to one file anyway. Here the copy costs the same and the switches
/// go. `RWF_NOWAIT` keeps what would block (dirty-page throttling) off this thread; a file
/// system without it (tmpfs: no writeback to throttle on) gets a plain `pwrite`.
#[derive(Debug)]
pub struct InlineWriter {
    /// Cleared once the file system refused RWF_NOWAIT (EOPNOTSUPP).
    nowait: bool,
}

impl Default for InlineWriter {
    fn default() -> InlineWriter {
        InlineWriter { nowait: true }
    }
}

impl InlineWriter {
    /// Writes `data` at `offset` of `fd`, resuming short writes.
    pub fn write(&mut self, fd: RawFd, data: &[u8], offset: u64) -> InlineWrite {
        assert!(data.len() <= i32::MAX as usize);
        let mut written = 0usize;
        while written < data.len() {
            let rest = &data[written..];
            let iov = libc::iovec { iov_base: rest.as_ptr() as *mut libc::c_void, iov_len: rest.len() };
            let flags = if self.nowait { libc::RWF_NOWAIT } else { 0 };
            let at = (offset + written as u64) as libc::off_t;
            // SAFETY: `iov` describes `rest`, which is borrowed for the call; the kernel only
            // reads from it.
            let n = unsafe { libc::pwritev2(fd, &iov, 1, at, flags) };
            if n > 0 {
                written += n as usize;
                continue;
            }
            if n == 0 {
                return InlineWrite::Done(-libc::EIO); // a write of nothing: no progress possible
            }
            match std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) {
                libc::EINTR => {}
                libc::EOPNOTSUPP if self.nowait => self.nowait = false,
                libc::EAGAIN if self.nowait => return InlineWrite::WouldBlock { written: written as u32 },
                errno => return InlineWrite::Done(-errno),
            }
        }
        InlineWrite::Done(written as i32)
    }
}

/// "Input/output error (os error 5)" for 5: what an operator reads in logs and status.
pub fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

/// A 4 KiB-aligned buffer (O_DIRECT needs it).
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).expect("valid layout");
        // SAFETY: non-zero size; the result is checked.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is a live allocation of `len` bytes owned by self (zeroed or written
        // before any read by the callers: they read only what they filled).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

// SAFETY: the buffer is plain memory owned by this value; moving it between threads is fine.
unsafe impl Send for AlignedBuf {}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).expect("valid layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn inline_write_writes_everything_and_reports_errors_as_errno() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("backing");
        let file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        let data: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 + i / 4096) as u8).collect();
        let mut w = InlineWriter::default();
        assert_eq!(w.write(file.as_raw_fd(), &data, 8192), InlineWrite::Done(data.len() as i32));
        // A second write goes the way the first one settled on (RWF_NOWAIT or not).
        assert_eq!(w.write(file.as_raw_fd(), &data[..4096], 0), InlineWrite::Done(4096));
        let back = std::fs::read(&path).unwrap();
        assert_eq!(&back[8192..], &data[..]);
        assert_eq!(&back[..4096], &data[..4096]);

        let read_only = std::fs::File::open(&path).unwrap();
        assert_eq!(w.write(read_only.as_raw_fd(), &data[..4096], 0), InlineWrite::Done(-libc::EBADF));
        assert_eq!(std::fs::read(&path).unwrap(), back, "a failed write changed nothing");
    }
}
