//! Metadata file tests: round trips, refusals with one clear line, and crash safety by cutting
//! every update short at every byte.

use super::*;
use proptest::prelude::*;

/// An in-memory file whose writes can be cut short: after `budget` more bytes every write
/// stops (a crash mid-write), leaving a prefix written, like a torn write.
#[derive(Clone, Default)]
struct MemIo {
    data: Vec<u8>,
    budget: Option<usize>,
    syncs: usize,
}

impl MetaIo for MemIo {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let o = offset as usize;
        let src = self.data.get(o..o + buf.len()).ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let n = match self.budget {
            Some(b) => b.min(buf.len()),
            None => buf.len(),
        };
        let o = offset as usize;
        if self.data.len() < o + n {
            self.data.resize(o + n, 0);
        }
        self.data[o..o + n].copy_from_slice(&buf[..n]);
        if let Some(b) = &mut self.budget {
            *b -= n;
            if n < buf.len() {
                return Err(io::Error::other("cut short (simulated crash)"));
            }
        }
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        self.syncs += 1;
        Ok(())
    }
    fn file_len(&mut self) -> io::Result<u64> {
        Ok(self.data.len() as u64)
    }
}

const SIZE: u64 = 5 << 30; // 5 GiB at 64 KiB: 81920 regions, 3 bitmap blocks
const REGION: u64 = 64 << 10;

fn uuid_a() -> Uuid {
    Uuid::from_u128(0x1234_0000_0000_0000_0000_0000_0000_0001)
}

fn expected() -> Expected<'static> {
    Expected {
        volume_name: "vol0",
        volume_uuid: uuid_a(),
        node_name: "alpha",
        size: SIZE,
        region_size: REGION,
        config: Path::new("/etc/metroblk/alpha.toml"),
    }
}

fn path() -> &'static Path {
    Path::new("/var/lib/metroblk/vol0.meta")
}

fn sb() -> Superblock {
    Superblock::new(uuid_a(), "alpha", SIZE, REGION)
}

fn formatted() -> MemIo {
    MetadataFile::format(MemIo::default(), path(), &sb()).unwrap().into_io()
}

fn open(io: MemIo) -> Result<Opened<MemIo>, MetadataError> {
    MetadataFile::open(io, path(), &expected())
}

fn open_err(io: MemIo) -> String {
    let e = open(io).unwrap_err().to_string();
    assert!(!e.contains('\n'), "one line: {e}");
    assert!(e.starts_with("/var/lib/metroblk/vol0.meta: "), "names the file: {e}");
    e
}

#[test]
fn format_then_open_round_trips() {
    let io = formatted();
    assert_eq!(io.data.len() as u64, BITMAP_OFFSET + 3 * BLOCK_BYTES as u64);
    let (f, got, bits) = open(io).unwrap();
    assert_eq!(got, sb());
    assert_eq!(bits.len(), 81920);
    assert!(bits.not_any());
    assert_eq!(f.bitmap_blocks(), 3);
    assert_eq!(got.generation, initial_generation(uuid_a()), "both nodes start in the same generation");
}

#[test]
fn every_field_survives_an_update() {
    let (mut f, mut s, _) = open(formatted()).unwrap();
    s.epoch = 77;
    for i in 0..(HISTORY_MAX as u128 + 3) {
        s.new_generation(Uuid::from_u128(0xA000 + i));
    }
    assert_eq!(s.history.len(), HISTORY_MAX, "history is bounded");
    assert_eq!(s.history[0], Uuid::from_u128(0xA000 + HISTORY_MAX as u128 + 1), "newest first");
    s.disk_state = DiskState::Inconsistent;
    s.peer_disk_state = Some(DiskState::Outdated);
    s.clean_shutdown = false;
    s.full_resync = true;
    s.role = Some(crate::config::Role::Secondary);
    s.discard_local = true;
    f.write_superblock(&s).unwrap();
    let mut block = [0u8; BLOCK_BYTES];
    block[0] = 0b1000_0001;
    block[BLOCK_BYTES - 1] = 0x80;
    f.write_bitmap_block(1, &block).unwrap();
    f.sync().unwrap();
    let (_, got, bits) = open(f.into_io()).unwrap();
    assert_eq!(got, s);
    let ones: Vec<usize> = bits.iter_ones().collect();
    assert_eq!(ones, vec![32768, 32768 + 7, 65535]);
}

#[test]
fn the_newest_valid_slot_wins_and_slots_alternate() {
    let (mut f, mut s, _) = open(formatted()).unwrap();
    for epoch in 1..=5 {
        s.epoch = epoch;
        f.write_superblock(&s).unwrap();
        let io = f.into_io();
        // The two slots now hold the last two states.
        let (g, got, _) = open(io).unwrap();
        assert_eq!(got.epoch, epoch);
        f = g;
    }
}

#[test]
fn missing_foreign_and_corrupt_files_are_refused_with_one_line() {
    // Missing (through the real file API).
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("vol0.meta");
    let e = open_file(&p, &expected()).unwrap_err().to_string();
    assert_eq!(
        e,
        format!("{}: missing; create it with metroblk create-md --config /etc/metroblk/alpha.toml vol0", p.display())
    );

    // Foreign: another volume, size, region size, node.
    let other = Uuid::from_u128(0x5678);
    let cases: [(Superblock, &str); 4] = [
        (Superblock::new(other, "alpha", SIZE, REGION), "belongs to volume 00000000-0000-0000-0000-000000005678 (this volume, vol0, is 12340000-0000-0000-0000-000000000001)"),
        (Superblock::new(uuid_a(), "alpha", SIZE * 2, REGION), "is for a volume of 10737418240 bytes (this volume is 5368709120 bytes)"),
        (Superblock::new(uuid_a(), "alpha", SIZE, REGION * 2), "has region size 131072 (the config says 65536)"),
        (Superblock::new(uuid_a(), "beta", SIZE, REGION), "belongs to node beta (this node is alpha)"),
    ];
    for (s, want) in cases {
        let io = MetadataFile::format(MemIo::default(), path(), &s).unwrap().into_io();
        let e = open_err(io);
        assert!(e.contains(want), "{e:?} should contain {want:?}");
    }

    // Corrupt: both slots damaged.
    let mut io = formatted();
    io.data[100] ^= 1;
    io.data[BLOCK_BYTES + 100] ^= 1;
    assert_eq!(
        open_err(io),
        "/var/lib/metroblk/vol0.meta: corrupt superblock (checksum mismatch in both copies); restore it or run \
         metroblk create-md --force"
    );
    // One damaged slot is survived.
    let mut io = formatted();
    io.data[100] ^= 1;
    assert!(open(io).is_ok());
    // Not a metadata file at all, empty, truncated, a future version.
    let e = open_err(MemIo { data: vec![7u8; 3 * BLOCK_BYTES], ..Default::default() });
    assert!(e.contains("not a metroblk metadata file"), "{e}");
    let e = open_err(MemIo::default());
    assert!(e.contains("empty file"), "{e}");
    let mut io = formatted();
    io.data.truncate(BITMAP_OFFSET as usize + BLOCK_BYTES);
    let e = open_err(io);
    assert!(e.contains("truncated: 12288 bytes, the bitmap needs 20480"), "{e}");
    let mut io = formatted();
    for slot in 0..2 {
        let o = slot * BLOCK_BYTES;
        io.data[o + 8..o + 12].copy_from_slice(&9u32.to_le_bytes());
        let crc = crc32c::crc32c(&io.data[o..o + SB_LEN - 4]);
        io.data[o + SB_LEN - 4..o + SB_LEN].copy_from_slice(&crc.to_le_bytes());
    }
    let e = open_err(io);
    assert!(e.contains("format version 9; this metroblk reads version 1"), "{e}");
}

/// The superblock update cut short after every possible number of bytes: the file always
/// reopens, to the old state or the new, never to garbage or an error.
#[test]
fn a_superblock_update_cut_at_every_byte_leaves_old_or_new() {
    let (f, old, _) = open(formatted()).unwrap();
    let base = f.into_io();
    // Do it from both slots: the next write goes to slot 1, the one after to slot 0.
    for extra_updates in 0..2 {
        let mut io = base.clone();
        let mut old = old.clone();
        for i in 0..extra_updates {
            let (mut f, mut s, _) = open(io).unwrap();
            s.epoch = 100 + i;
            f.write_superblock(&s).unwrap();
            old = s;
            io = f.into_io();
        }
        let mut new = old.clone();
        new.epoch = 999;
        new.new_generation(Uuid::from_u128(42));
        new.clean_shutdown = false;
        let (mut saw_old, mut saw_new) = (false, false);
        for cut in 0..=BLOCK_BYTES {
            let mut torn = io.clone();
            torn.budget = Some(cut);
            let (mut f, _, _) = open(torn).unwrap();
            let r = f.write_superblock(&new);
            assert_eq!(r.is_ok(), cut == BLOCK_BYTES);
            let mut after = f.into_io();
            after.budget = None;
            let (_, got, _) = open(after).unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            if got == old {
                saw_old = true;
            } else {
                assert_eq!(got, new, "cut at {cut}: neither old nor new");
                saw_new = true;
            }
        }
        assert!(saw_old && saw_new);
    }
}

/// Checks a torn bitmap block against the rule of the module doc: every bit set in both the old
/// and the new image is set; every bit set in neither is clear. Byte-wise: all eight bits at once.
fn check_torn(old: &[u8], new: &[u8], got: &[u8], what: &str) {
    for (i, ((o, n), g)) in old.iter().zip(new).zip(got).enumerate() {
        assert_eq!(o & n & !g, 0, "{what}: byte {i}: a bit durable before and after was lost");
        assert_eq!(g & !(o | n), 0, "{what}: byte {i}: a bit appeared from nowhere");
    }
}

/// A bitmap block write that sets some bits and clears others, cut at every byte: no bit that
/// was set before and after is lost, and the file still opens.
#[test]
fn a_bitmap_write_cut_at_every_byte_never_loses_a_durable_bit() {
    let (mut f, _, _) = open(formatted()).unwrap();
    let mut old = [0u8; BLOCK_BYTES];
    for (i, b) in old.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37) | 0x11;
    }
    f.write_bitmap_block(2, &old).unwrap();
    f.sync().unwrap();
    let base = f.into_io();
    // New image: some old bits cleared (cold regions both nodes have), some new bits set.
    let mut new = old;
    for (i, b) in new.iter_mut().enumerate() {
        *b = (*b & !(1 << (i % 8))) | (1 << ((i + 3) % 8));
    }
    for cut in 0..=BLOCK_BYTES {
        let mut torn = base.clone();
        torn.budget = Some(cut);
        let (mut f, _, _) = open(torn).unwrap();
        let _ = f.write_bitmap_block(2, &new);
        let mut after = f.into_io();
        after.budget = None;
        let (_, _, bits) = open(after).unwrap();
        check_torn(&old, &new, &bits.as_raw_slice()[2 * BLOCK_BYTES..], &format!("cut at {cut}"));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Disks may land the sectors of one write in any order: any mix of old and new bytes (not
    /// only a prefix) keeps every durable bit.
    #[test]
    fn any_mix_of_old_and_new_bitmap_bytes_keeps_durable_bits(
        old in proptest::collection::vec(any::<u8>(), BLOCK_BYTES),
        set in proptest::collection::vec(any::<u8>(), BLOCK_BYTES),
        clear in proptest::collection::vec(any::<u8>(), BLOCK_BYTES),
        mix in proptest::collection::vec(any::<bool>(), BLOCK_BYTES / 512),
    ) {
        let new: Vec<u8> = old.iter().zip(&set).zip(&clear).map(|((o, s), c)| (o | s) & !c).collect();
        let torn: Vec<u8> = (0..BLOCK_BYTES).map(|i| if mix[i / 512] { new[i] } else { old[i] }).collect();
        check_torn(&old, &new, &torn, "mixed sectors");
    }

    /// Whatever bytes a metadata file holds, opening it returns a value or an error line; it
    /// never panics.
    #[test]
    fn opening_arbitrary_bytes_never_panics(
        flips in proptest::collection::vec((0usize..2 * BLOCK_BYTES, any::<u8>()), 0..16),
        len in 0usize..(BITMAP_OFFSET as usize + 4 * BLOCK_BYTES),
        fix_crc in any::<bool>(),
    ) {
        let mut io = formatted();
        for (at, v) in flips {
            io.data[at] = v;
        }
        if fix_crc {
            // Re-checksum so the decoder's field checks, not just the crc, see the damage.
            for slot in 0..2 {
                let o = slot * BLOCK_BYTES;
                let crc = crc32c::crc32c(&io.data[o..o + SB_LEN - 4]);
                io.data[o + SB_LEN - 4..o + SB_LEN].copy_from_slice(&crc.to_le_bytes());
            }
        }
        io.data.resize(len, 0);
        if let Err(e) = open(io) {
            prop_assert!(!e.to_string().contains('\n'));
        }
    }
}

#[test]
fn create_file_refuses_to_overwrite_without_force_and_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("vol0.meta");
    create_file(&p, &sb(), false).unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    let exp = expected();
    let (mut f, mut s, _) = open_file(&p, &exp).unwrap();
    s.epoch = 5;
    f.write_superblock(&s).unwrap();
    drop(f);
    let e = create_file(&p, &sb(), false).unwrap_err().to_string();
    assert!(e.contains("exists; refusing to overwrite it"), "{e}");
    assert_eq!(open_file(&p, &exp).unwrap().1.epoch, 5, "the refused create changed nothing");
    create_file(&p, &sb(), true).unwrap();
    assert_eq!(open_file(&p, &exp).unwrap().1.epoch, 0, "--force replaced it");
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn too_large_a_bitmap_is_refused_naming_the_fix() {
    let e = check_geometry(1 << 50, 4096).unwrap_err();
    assert!(e.contains("use a larger region_size"), "{e}");
    assert!(check_geometry(1 << 40, 64 << 10).is_ok());
}
