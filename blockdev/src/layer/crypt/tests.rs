//! Crypt layer against the real file backend (io_uring), driven by [`SyncDevice`].

use super::*;
use crate::backend::{BackendSpec, OpenOptions as BackendOpts};
use crate::buf::IoVecs;
use crate::sync::SyncDevice;
use ember_crypto::kdf::Hash;
use ember_crypto::{FormatParams, KdfParams};
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
    let c = CryptDevice::open(inner, b"pw", &OpenOptions::default()).unwrap();
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
    let e = CryptDevice::open(inner, b"wrong", &OpenOptions::default()).unwrap_err();
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
