//! A node's disk state (design vocabulary), one type for every place it travels: the peer
//! link's sync hello, the witness link, the metadata superblock and status.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A node's copy of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskState {
    UpToDate,
    Outdated,
    Inconsistent,
    Failed,
}

impl DiskState {
    /// The state's name as it appears on the wire and in status.
    pub fn name(self) -> &'static str {
        match self {
            DiskState::UpToDate => "up-to-date",
            DiskState::Outdated => "outdated",
            DiskState::Inconsistent => "inconsistent",
            DiskState::Failed => "failed",
        }
    }

    /// The one-byte code of the sync hello and the superblock (a stable format: never renumber).
    pub const fn code(self) -> u8 {
        match self {
            DiskState::UpToDate => 0,
            DiskState::Outdated => 1,
            DiskState::Inconsistent => 2,
            DiskState::Failed => 3,
        }
    }

    /// The state of a code; `None` for a byte no version wrote.
    pub const fn from_code(code: u8) -> Option<DiskState> {
        Some(match code {
            0 => DiskState::UpToDate,
            1 => DiskState::Outdated,
            2 => DiskState::Inconsistent,
            3 => DiskState::Failed,
            _ => return None,
        })
    }
}

impl fmt::Display for DiskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_and_no_other_byte_decodes() {
        for s in [DiskState::UpToDate, DiskState::Outdated, DiskState::Inconsistent, DiskState::Failed] {
            assert_eq!(DiskState::from_code(s.code()), Some(s));
        }
        assert!((4..=u8::MAX).all(|b| DiskState::from_code(b).is_none()));
    }
}
