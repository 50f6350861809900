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
