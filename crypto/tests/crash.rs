//! Power safety of keyslot changes: every add/change/remove of a key is recorded through
//! a [`Recorder`] disk, then every state a power cut could leave (every cut at a flush,
//! every subset of the writes since the last flush, torn writes; see
//! `ember_crypto::crash`) is rebuilt and opened. In each one the old or the new
//! passphrase must open the volume, with the original volume key; the finished update
//! must leave exactly the expected passphrases.

use ember_crypto::crash::{for_each_crash_state, CrashOptions, CrashSummary, Recorder};
use ember_crypto::kdf::Hash;
use ember_crypto::{
    add_key, change_key, format, open, remove_key, Disk, FormatParams, KdfParams, UnlockLimits,
};

fn pbkdf2() -> KdfParams {
    KdfParams::Pbkdf2 {
        hash: Hash::Sha256,
        iterations: 1000,
    }
}

/// A fresh volume with passphrase `pass`: LUKS`version`, a little data after the header.
fn image(version: u8, sector_size: u32, pass: &[u8]) -> Vec<u8> {
    let data_offset = if version == 1 { 2 << 20 } else { 16 << 20 };
    let mut disk = vec![0u8; data_offset + (64 << 10)];
    let p = FormatParams {
        version,
        key_bytes: 64,
        sector_size,
        kdf: pbkdf2(),
        label: String::new(),
        uuid: None,
    };
    format(&mut disk, pass, &p).unwrap();
    disk
}

/// A read-only view of a crash image (opening never writes; no copy of the image).
struct View<'a>(&'a [u8]);

impl Disk for View<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::UnexpectedEof)?;
        let src = self
            .0
            .get(start..start + buf.len())
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&mut self, _: u64, _: &[u8]) -> std::io::Result<()> {
        Err(std::io::ErrorKind::PermissionDenied.into())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn size(&mut self) -> std::io::Result<u64> {
        Ok(self.0.len() as u64)
    }
}

/// What the volume key does to one sector of zeros (tells two volume keys apart).
fn fingerprint(img: &[u8], pass: &[u8]) -> Option<Vec<u8>> {
    let u = open(&mut View(img), pass, &UnlockLimits::default()).ok()?;
    let mut s = vec![0u8; u.cipher.sector_size()];
    u.cipher.encrypt(&mut s, 0).ok()?;
    Some(s)
}

type Update = fn(&mut dyn Disk) -> ember_crypto::Result<usize>;

/// Record `update` over `initial`, then check every crash state: one of `passes` opens
/// it with the original volume key. Returns the finished image and the replay summary.
fn check(name: &str, initial: &[u8], update: Update, passes: &[&[u8]]) -> (Vec<u8>, CrashSummary) {
    let key = passes
        .iter()
        .find_map(|p| fingerprint(initial, p))
        .expect("the initial image opens");
    let mut rec = Recorder::new(initial.to_vec());
    update(&mut rec).unwrap_or_else(|e| panic!("{name}: {e}"));
    let ops = rec.ops().to_vec();
    let summary = for_each_crash_state(initial, &ops, &CrashOptions::default(), |st, img| {
        if passes
            .iter()
            .any(|p| fingerprint(img, p).as_ref() == Some(&key))
        {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .unwrap_or_else(|st| panic!("{name}: no passphrase opens the volume after a crash at {st}"));
    eprintln!("{name}: {summary:?}");
    assert_eq!(summary.sampled_gaps, 0, "{name}: every subset replayed");
    (rec.image().to_vec(), summary)
}

fn opens(img: &[u8], pass: &[u8]) -> bool {
    fingerprint(img, pass).is_some()
}

fn lifecycle(version: u8, sector_size: u32) {
    let v = format!("LUKS{version}/{sector_size}");
    let one = image(version, sector_size, b"old");

    let (two, _) = check(
        &format!("{v} add"),
        &one,
        |d| add_key(d, b"old", b"new", pbkdf2(), &UnlockLimits::default()),
        &[b"old", b"new"],
    );
    assert!(opens(&two, b"old") && opens(&two, b"new"));

    let (removed, _) = check(
        &format!("{v} remove"),
        &two,
        |d| remove_key(d, b"new", &UnlockLimits::default()),
        &[b"old"],
    );
    assert!(opens(&removed, b"old") && !opens(&removed, b"new"));

    let (changed, s) = check(
        &format!("{v} change"),
        &one,
        |d| change_key(d, b"old", b"new", pbkdf2(), &UnlockLimits::default()),
        &[b"old", b"new"],
    );
    assert!(!opens(&changed, b"old") && opens(&changed, b"new"));
    assert!(s.states > 10, "{v} change: {s:?}");

    // The data area is never written.
    let at = if version == 1 { 2 << 20 } else { 16 << 20 };
    assert!(changed[at..] == one[at..] && removed[at..] == one[at..]);
}

#[test]
fn luks1_keyslot_changes_survive_a_power_cut_anywhere() {
    lifecycle(1, 512);
}

#[test]
fn luks2_keyslot_changes_survive_a_power_cut_anywhere() {
    lifecycle(2, 512);
    lifecycle(2, 4096);
}

/// A LUKS2 volume whose secondary copy is older than the primary (a crash between the
/// two copies of an earlier update): the primary has keyslots for "x" and "old", the
/// secondary only "x". Changing "old" must first bring the secondary up to date, or a
/// torn primary would fall back to a header without "old" (and without "new").
#[test]
fn luks2_stale_secondary_is_repaired_before_an_update() {
    let a = image(2, 512, b"x");
    let mut b = a.clone();
    add_key(&mut b, b"x", b"old", pbkdf2(), &UnlockLimits::default()).unwrap();
    let mut stale = b.clone();
    stale[16384..32768].copy_from_slice(&a[16384..32768]);
    assert!(opens(&stale, b"old"));
    let (done, _) = check(
        "LUKS2 stale secondary change",
        &stale,
        |d| change_key(d, b"old", b"new", pbkdf2(), &UnlockLimits::default()),
        &[b"old", b"new"],
    );
    assert!(opens(&done, b"new") && opens(&done, b"x") && !opens(&done, b"old"));
    // Both copies agree afterwards: the secondary alone opens with "new" too.
    let mut only_secondary = done.clone();
    only_secondary[..16384].fill(0);
    assert!(opens(&only_secondary, b"new"));
}
