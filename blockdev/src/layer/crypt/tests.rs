//! Crypt layer against the real file backend (io_uring), driven by [`SyncDevice`].

use super::*;
use crate::backend::{BackendSpec, OpenOptions as BackendOpts};
use crate::buf::IoVecs;
use crate::sync::SyncDevice;
use ember_crypto::kdf::Hash;
use ember_crypto::{Disk, FormatParams, KdfParams};
use std::io::Write as _;

const PLAIN: u64 = 4 << 20;

struct Vol {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    data_offset: u64,
}

/// A LUKS volume with `PLAIN` bytes of plaintext in a temp file.
fn volume(version: u8, sector_size: u32, key_bytes: usize) -> Vol {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol.img");
    let off = ember_crypto::default_data_offset(version);
    let mut disk = vec![0u8; (off + PLAIN) as usize];
    let p = FormatParams {
        version,
        key_bytes,
        sector_size,
        kdf: KdfParams::Pbkdf2 {
            hash: Hash::Sha256,
            iterations: 1000,
        },
        label: String::new(),
        uuid: None,
    };
    let u = ember_crypto::format(&mut disk, b"pw", &p).unwrap();
    std::fs::File::create(&path)
        .unwrap()
        .write_all(&disk)
        .unwrap();
    Vol {
        _dir: dir,
        path,
        data_offset: u.data_offset,
    }
}

fn open(v: &Vol) -> SyncDevice {
    let inner = crate::open(
        &BackendSpec::File {
            path: v.path.clone(),
        },
        &BackendOpts::default(),
    )
    .unwrap();
    let c = CryptDevice::open(inner, b"pw", &UnlockLimits::default()).unwrap();
    SyncDevice::new(Arc::new(c)).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

#[test]
fn roundtrip_and_ciphertext_on_disk() {
    for (version, ss, kb) in [(1u8, 512u32, 32usize), (2, 512, 64), (2, 4096, 64)] {
        let v = volume(version, ss, kb);
        let mut d = open(&v);
        let info = d.device().info();
        assert_eq!(info.size, PLAIN);
        assert_eq!(info.logical_block_size, ss.max(512));
        assert!(!info.block_status && !info.write_zeroes);
        let data = pattern(256 << 10, version);
        d.write_at(64 << 10, &data).unwrap();
        assert_eq!(
            d.read_at(64 << 10, data.len()).unwrap().as_slice(),
            &data[..]
        );
        drop(d);

        // On disk: ciphertext, equal to an independent encryption of the plaintext.
        let raw = std::fs::read(&v.path).unwrap();
        let at = (v.data_offset + (64 << 10)) as usize;
        let on_disk = &raw[at..at + data.len()];
        assert!(!on_disk
            .windows(64)
            .any(|w| data.windows(64).next() == Some(w)));
        let mut disk = raw.clone();
        let u = ember_crypto::open(&mut disk, b"pw", &Default::default()).unwrap();
        let mut expect = data.clone();
        u.cipher.encrypt(&mut expect, 64 << 10).unwrap();
        assert_eq!(on_disk, &expect[..], "v{version} ss{ss}");
    }
}

#[test]
fn write_zeroes_reads_back_zeros_and_block_status_is_data() {
    let v = volume(2, 4096, 64);
    let mut d = open(&v);
    let len = ZERO_CHUNK as u64 * 2 + 8192;
    d.write_at(0, &pattern(len as usize, 9)).unwrap();
    d.op(Op::WriteZeroes { unmap: true }, 4096, len - 4096)
        .unwrap();
    let r = d.read_at(0, len as usize).unwrap();
    assert_ne!(&r.as_slice()[..4096], &[0u8; 4096][..]);
    assert!(r.as_slice()[4096..].iter().all(|&b| b == 0));
    // Ciphertext of zeros is not zeros.
    let raw = std::fs::read(&v.path).unwrap();
    let at = (v.data_offset + 4096) as usize;
    assert!(raw[at..at + 4096].iter().any(|&b| b != 0));
    let st = d.device().block_status(0, PLAIN).unwrap();
    assert_eq!(
        st,
        vec![Extent {
            len: PLAIN,
            hole: false,
            zero: false
        }]
    );
    d.op(Op::Discard, 0, 4096).unwrap();
    d.op(Op::Flush, 0, 0).unwrap();
}

#[test]
fn client_write_buffer_is_untouched() {
    let v = volume(2, 512, 64);
    let mut d = open(&v);
    let data = pattern(65536, 3);
    let c = d
        .run(vec![Request {
            op: Op::Write { fua: true },
            offset: 8192,
            len: data.len() as u64,
            buf: Buffer::Owned(IoBuf::from_slice(&data)),
            tag: 77,
        }])
        .unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].tag, 77);
    assert_eq!(c[0].result, Ok(()));
    match &c[0].buf {
        Buffer::Owned(b) => assert_eq!(b.as_slice(), &data[..]),
        other => panic!("unexpected buffer {other:?}"),
    }
    // Borrowed source memory too.
    let mut src = pattern(8192, 4);
    let keep = src.clone();
    let iov = vec![
        libc::iovec {
            iov_base: src.as_mut_ptr().cast(),
            iov_len: 1000,
        },
        libc::iovec {
            // SAFETY: within `src` (8192 bytes).
            iov_base: unsafe { src.as_mut_ptr().add(1000) }.cast(),
            iov_len: 7192,
        },
    ];
    // SAFETY: `src` outlives the request and is not touched until it completes.
    let vecs = unsafe { IoVecs::new(iov) };
    let c = d
        .run(vec![Request {
            op: Op::Write { fua: false },
            offset: 0,
            len: 8192,
            buf: Buffer::Borrowed(vecs),
            tag: 1,
        }])
        .unwrap();
    assert_eq!(c[0].result, Ok(()));
    drop(c);
    assert_eq!(src, keep);
    assert_eq!(d.read_at(0, 8192).unwrap().as_slice(), &keep[..]);
}

#[test]
fn borrowed_reads_with_sectors_straddling_iovecs() {
    for ss in [512u32, 4096] {
        let v = volume(2, ss, 64);
        let mut d = open(&v);
        let data = pattern(3 * 4096 * 4, 5);
        d.write_at(4096, &data).unwrap();
        // Odd iovec sizes: sectors straddle two or more iovecs.
        let sizes = [100usize, 1000, 3000, 7, 4089, 9000, 1, 11963, 8000, 11992];
        assert_eq!(sizes.iter().sum::<usize>(), data.len());
        let mut mem = vec![0u8; data.len()];
        let mut iov = Vec::new();
        let mut at = 0;
        for s in sizes {
            iov.push(libc::iovec {
                // SAFETY: `at + s <= mem.len()` by the sum above.
                iov_base: unsafe { mem.as_mut_ptr().add(at) }.cast(),
                iov_len: s,
            });
            at += s;
        }
        // SAFETY: `mem` outlives the request and is not accessed until it completes.
        let vecs = unsafe { IoVecs::new(iov) };
        let c = d
            .run(vec![Request {
                op: Op::Read,
                offset: 4096,
                len: data.len() as u64,
                buf: Buffer::Borrowed(vecs),
                tag: 5,
            }])
            .unwrap();
        assert_eq!(c[0].result, Ok(()));
        drop(c);
        assert!(mem == data, "sector size {ss}");
    }
}

#[test]
fn bad_requests_and_wrong_passphrase() {
    let v = volume(2, 4096, 64);
    let mut d = open(&v);
    // Misaligned for a 4096-byte encryption sector, past the end.
    assert!(d.read_at(512, 512).is_err());
    assert!(d.write_at(PLAIN, &[0u8; 4096]).is_err());
    assert!(d.read_at(PLAIN - 4096, 4096).is_ok());
    let inner = crate::open(
        &BackendSpec::File {
            path: v.path.clone(),
        },
        &BackendOpts::default(),
    )
    .unwrap();
    let e = CryptDevice::open(inner, b"wrong", &UnlockLimits::default()).unwrap_err();
    let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(msg.contains("wrong passphrase"), "{msg}");
}

#[test]
fn many_requests_in_one_batch() {
    let v = volume(1, 512, 32);
    let mut d = open(&v);
    let reqs: Vec<Request> = (0..64u64)
        .map(|i| Request {
            op: Op::Write { fua: false },
            offset: i * 8192,
            len: 8192,
            buf: Buffer::Owned(IoBuf::from_slice(&pattern(8192, i as u8))),
            tag: i,
        })
        .collect();
    let c = d.run(reqs).unwrap();
    assert_eq!(c.len(), 64);
    assert!(c.iter().all(|c| c.result.is_ok()));
    for i in 0..64u64 {
        assert_eq!(
            d.read_at(i * 8192, 8192).unwrap().as_slice(),
            &pattern(8192, i as u8)[..]
        );
    }
}

/// Replace `from` by `to` in the JSON of both LUKS2 header copies (16 KiB each) of the
/// volume file and fix their checksums: a crafted header, as a guest could write one.
fn craft_luks2(v: &Vol, from: &str, to: &str) {
    let mut raw = std::fs::read(&v.path).unwrap();
    for at in [0usize, 16384] {
        let copy = &mut raw[at..at + 16384];
        let end = 4096 + copy[4096..].iter().position(|&c| c == 0).unwrap();
        let text = std::str::from_utf8(&copy[4096..end]).unwrap().to_string();
        assert!(text.contains(from), "{text}");
        let text = text.replacen(from, to, 1);
        copy[4096..].fill(0);
        copy[4096..4096 + text.len()].copy_from_slice(text.as_bytes());
        copy[448..512].fill(0);
        let sum = ember_crypto::kdf::sha256(&[copy]);
        copy[448..480].copy_from_slice(&sum);
    }
    std::fs::write(&v.path, &raw).unwrap();
}

fn open_err(v: &Vol) -> String {
    let inner = crate::open(
        &BackendSpec::File {
            path: v.path.clone(),
        },
        &BackendOpts::default(),
    )
    .unwrap();
    match CryptDevice::open(inner, b"pw", &UnlockLimits::default()) {
        Ok(c) => {
            // Would it have served? Read a sector past the first one.
            let mut d = SyncDevice::new(Arc::new(c)).unwrap();
            format!("opened (read: {:?})", d.read_at(4096, 4096).map(|_| ()))
        }
        Err(e) => match std::error::Error::source(&e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        },
    }
}

#[test]
fn crafted_iv_tweak_and_segment_size_are_refused() {
    // iv_tweak × 512 = 2^64 - 512: any offset past the first sector would overflow.
    let v = volume(2, 512, 64);
    craft_luks2(
        &v,
        "\"iv_tweak\":\"0\"",
        "\"iv_tweak\":\"36028797018963967\"",
    );
    let e = open_err(&v);
    assert!(e.contains("IV offset") && e.contains("overflows"), "{e}");

    // A fixed segment larger than the device.
    let v = volume(2, 512, 64);
    craft_luks2(&v, "\"size\":\"dynamic\"", "\"size\":\"1099511627776\"");
    let e = open_err(&v);
    assert!(e.contains("does not fit"), "{e}");

    // A fixed segment that fits is served at that size.
    let v = volume(2, 512, 64);
    craft_luks2(&v, "\"size\":\"dynamic\"", "\"size\":\"1048576\"");
    assert_eq!(open(&v).device().info().size, 1 << 20);
}

#[test]
fn header_reads_near_the_end_of_a_huge_device_do_not_overflow() {
    let dev = crate::open(
        &BackendSpec::Null { size: u64::MAX },
        &BackendOpts::default(),
    )
    .unwrap();
    let mut disk = DeviceDisk::new(dev).unwrap();
    let mut buf = [0u8; 10];
    // The result may be an error (the range is not a whole block); it must not panic.
    let _ = disk.read_at(u64::MAX - 100, &mut buf);
    assert!(disk.read_at(u64::MAX - 5, &mut buf).is_err());
    assert!(disk.read_at(0, &mut buf).is_ok());
}
