//! Receiving small frames (acks, pongs, errors) on a peer socket through io_uring.
//!
//! One RECV is in flight per socket into a fixed buffer; complete frames are decoded in place
//! and the unused tail is moved to the front before the next RECV. Frames larger than the
//! buffer (WRITE payloads) never travel in this direction; the replica reads those with
//! `replica` straight into its write buffers.

use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types};
use metroblk_protocol::{decode_header, verify_payload, Frame, FrameError, Geometry, HEADER_LEN};

pub const RECV_BUFFER: usize = 64 << 10;

pub struct FrameReceiver {
    buf: Box<[u8]>,
    /// Bytes `[head..tail]` are received and not yet consumed.
    head: usize,
    tail: usize,
    in_flight: bool,
    pub bytes_received: u64,
}

impl Default for FrameReceiver {
    fn default() -> Self {
        FrameReceiver {
            buf: vec![0u8; RECV_BUFFER].into_boxed_slice(),
            head: 0,
            tail: 0,
            in_flight: false,
            bytes_received: 0,
        }
    }
}

impl FrameReceiver {
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    pub fn reset(&mut self) {
        assert!(!self.in_flight);
        self.head = 0;
        self.tail = 0;
    }

    pub fn next_sqe(&mut self, fd: RawFd, user_data: u64) -> Option<squeue::Entry> {
        if self.in_flight {
            return None;
        }
        if self.head > 0 {
            self.buf.copy_within(self.head..self.tail, 0);
            self.tail -= self.head;
            self.head = 0;
        }
        let room = self.buf.len() - self.tail;
        assert!(room > 0, "a frame larger than the receive buffer was accepted");
        self.in_flight = true;
        // SAFETY: `tail < len`, so the pointer stays inside the boxed buffer, which lives as
        // long as the receiver and is not touched until the completion.
        let ptr = unsafe { self.buf.as_mut_ptr().add(self.tail) };
        Some(opcode::Recv::new(types::Fd(fd), ptr, room as u32).build().user_data(user_data))
    }

    /// Accounts a RECV completion; `Err(errno)` means the link is broken (0 bytes = closed).
    pub fn complete(&mut self, res: i32) -> Result<(), i32> {
        assert!(self.in_flight);
        self.in_flight = false;
        if res < 0 {
            return Err(-res);
        }
        if res == 0 {
            return Err(libc::ECONNRESET);
        }
        self.tail += res as usize;
        self.bytes_received += res as u64;
        Ok(())
    }

    /// The next complete frame and its payload, or None when more bytes are needed.
    pub fn next_frame(&mut self, geo: &Geometry) -> Option<Result<(Frame, &[u8]), FrameError>> {
        let avail = &self.buf[self.head..self.tail];
        let header: &[u8; HEADER_LEN] = avail.get(..HEADER_LEN)?.try_into().ok()?;
        let frame = match decode_header(header, geo) {
            Ok(f) => f,
            Err(e) => return Some(Err(e)),
        };
        let total = HEADER_LEN + frame.payload_len();
        if total > self.buf.len() {
            return Some(Err(FrameError::TooLong {
                kind: frame.kind,
                length: frame.length,
                max: (self.buf.len() - HEADER_LEN) as u32,
            }));
        }
        if avail.len() < total {
            return None;
        }
        let start = self.head;
        self.head += total;
        let payload = &self.buf[start + HEADER_LEN..start + total];
        Some(verify_payload(&frame, payload).map(|()| (frame, payload)))
    }
}
