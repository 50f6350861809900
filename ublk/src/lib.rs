//! The ublk frontend (issue 3).
