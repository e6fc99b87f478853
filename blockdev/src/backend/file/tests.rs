use super::*;
use crate::backend::{open, BackendSpec};
use crate::sync::SyncDevice;

fn dev(size: u64, direct: Direct) -> (tempfile::NamedTempFile, Arc<dyn BlockDevice>) {
    let f = tempfile::NamedTempFile::new().expect("tempfile");
    f.as_file().set_len(size).expect("set_len");
    let opts = OpenOptions {
        read_only: false,
        direct,
        ..OpenOptions::default()
    };
    let d = open(
        &BackendSpec::File {
            path: f.path().to_path_buf(),
        },
        &opts,
    )
    .expect("open");
    (f, d)
}

#[test]
fn write_read_flush_roundtrip() {
    for direct in [Direct::Auto, Direct::Off] {
        let (_f, d) = dev(1 << 20, direct);
        let mut s = SyncDevice::new(d).expect("ring");
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        s.write_at(4096, &data).expect("write");
        s.op(Op::Flush, 0, 0).expect("flush");
        let back = s.read_at(4096, 8192).expect("read");
        assert_eq!(back.as_slice(), &data[..]);
    }
}

#[test]
fn out_of_range_and_misaligned_are_einval() {
    let (_f, d) = dev(1 << 20, Direct::Auto);
    let mut s = SyncDevice::new(d).expect("ring");
    let reqs = vec![
        Request {
            op: Op::Read,
            offset: 1 << 20,
            len: 512,
            buf: Buffer::Owned(IoBuf::new(512)),
            tag: 1,
        },
        Request {
            op: Op::Read,
            offset: 3,
            len: 512,
            buf: Buffer::Owned(IoBuf::new(512)),
            tag: 2,
        },
        Request {
            op: Op::Discard,
            offset: u64::MAX - 511,
            len: 512,
            buf: Buffer::None,
            tag: 3,
        },
    ];
    let c = s.run(reqs).expect("run");
    assert_eq!(c.len(), 3);
    assert!(c.iter().all(|c| c.result == Err(libc::EINVAL)));
}

#[test]
fn discard_punches_a_hole_and_block_status_sees_it() {
    let (_f, d) = dev(1 << 20, Direct::Off);
    let mut s = SyncDevice::new(d.clone()).expect("ring");
    s.write_at(0, &vec![0xaa; 1 << 20]).expect("fill");
    s.op(Op::Discard, 256 << 10, 256 << 10).expect("discard");
    let back = s.read_at(256 << 10, 4096).expect("read");
    assert!(back.as_slice().iter().all(|&b| b == 0));
    let ext = d.block_status(0, 1 << 20).expect("status");
    assert!(ext.iter().any(|e| e.hole), "{ext:?}");
    assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 1 << 20);
}

#[test]
fn write_zeroes_without_unmap_reads_zero() {
    let (_f, d) = dev(1 << 20, Direct::Off);
    let mut s = SyncDevice::new(d).expect("ring");
    s.write_at(0, &vec![0x55; 1 << 20]).expect("fill");
    s.op(Op::WriteZeroes { unmap: false }, 4096, 3 << 17)
        .expect("zero");
    let back = s.read_at(0, 1 << 20).expect("read");
    assert!(back.as_slice()[4096..4096 + (3 << 17)]
        .iter()
        .all(|&b| b == 0));
    assert!(back.as_slice()[..4096].iter().all(|&b| b == 0x55));
}

#[test]
fn borrowed_misaligned_iovecs_roundtrip() {
    let (_f, d) = dev(1 << 20, Direct::Auto);
    let mut s = SyncDevice::new(d).expect("ring");
    let mut mem = vec![0u8; 4096 + 1];
    for (i, b) in mem.iter_mut().enumerate() {
        *b = (i % 13) as u8;
    }
    let iov = vec![libc::iovec {
        iov_base: mem[1..].as_mut_ptr().cast(),
        iov_len: 4096,
    }];
    // SAFETY: `mem` outlives the request and is not touched until it completes.
    let v = unsafe { crate::buf::IoVecs::new(iov) };
    let c = s
        .run(vec![Request {
            op: Op::Write { fua: true },
            offset: 0,
            len: 4096,
            buf: Buffer::Borrowed(v),
            tag: 9,
        }])
        .expect("run");
    assert_eq!(c[0].result, Ok(()));
    drop(c);
    let back = s.read_at(0, 4096).expect("read");
    assert_eq!(back.as_slice(), &mem[1..]);
}

#[test]
fn read_only_refuses_writes() {
    let f = tempfile::NamedTempFile::new().expect("tempfile");
    f.as_file().set_len(1 << 20).expect("set_len");
    let opts = OpenOptions {
        read_only: true,
        direct: Direct::Auto,
        ..OpenOptions::default()
    };
    let d = open(
        &BackendSpec::File {
            path: f.path().to_path_buf(),
        },
        &opts,
    )
    .expect("open");
    let mut s = SyncDevice::new(d).expect("ring");
    assert!(s.write_at(0, &[1u8; 512]).is_err());
    assert!(s.read_at(0, 512).is_ok());
}

#[test]
fn resize_grows_the_device() {
    let (_f, d) = dev(1 << 20, Direct::Off);
    d.resize(2 << 20).expect("resize");
    assert_eq!(d.info().size, 2 << 20);
    let mut s = SyncDevice::new(d).expect("ring");
    s.write_at((2 << 20) - 512, &[7u8; 512])
        .expect("write at the new end");
}

#[test]
fn tmpfs_small_io_is_inline_and_large_io_goes_through_the_ring() {
    let shm = std::path::Path::new("/dev/shm");
    assert!(shm.is_dir(), "/dev/shm (tmpfs) is needed for this test");
    let f = tempfile::NamedTempFile::new_in(shm).expect("tempfile in /dev/shm");
    f.as_file().set_len(4 << 20).expect("set_len");
    let fd = FileDevice::open(f.path(), &OpenOptions::default()).expect("open");
    assert!(
        fd.inline_io && !fd.is_direct(),
        "tmpfs should use buffered inline I/O"
    );
    let mut s = SyncDevice::new(Arc::new(fd)).expect("ring");
    for len in [4096usize, 1 << 20] {
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        s.write_at(8192, &data).expect("write");
        assert_eq!(s.read_at(8192, len).expect("read").as_slice(), &data[..]);
    }
    // Borrowed iovecs (vhost-user style) through the inline path.
    let mut a = vec![0u8; 1000];
    let mut b = vec![0u8; 3096];
    let iovs = vec![
        libc::iovec {
            iov_base: a.as_mut_ptr().cast(),
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        },
    ];
    // SAFETY: a and b outlive the request and are not touched until it completes.
    let v = unsafe { crate::buf::IoVecs::new(iovs) };
    let c = s
        .run(vec![Request {
            op: Op::Read,
            offset: 8192,
            len: 4096,
            buf: Buffer::Borrowed(v),
            tag: 1,
        }])
        .expect("run");
    assert_eq!(c[0].result, Ok(()));
    drop(c);
    assert_eq!(a[999], (999 % 253) as u8);
    assert_eq!(b[0], (1000 % 253) as u8);
}

/// A loop device over a sparse temp file, detached on drop. Loop devices behave like
/// the LUNs a host sees (a block device with its own block sizes, discard, zeroout).
struct LoopDev {
    dev: std::path::PathBuf,
    backing: tempfile::NamedTempFile,
}

impl LoopDev {
    fn new(size: u64, sector_size: u32) -> LoopDev {
        let backing = tempfile::NamedTempFile::new().expect("tempfile");
        backing.as_file().set_len(size).expect("set_len");
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--sector-size"])
            .arg(sector_size.to_string())
            .arg(backing.path())
            .output()
            .expect("losetup is needed (util-linux)");
        assert!(
            out.status.success(),
            "losetup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        LoopDev { dev, backing }
    }

    fn open(&self, direct: Direct) -> Arc<FileDevice> {
        let opts = OpenOptions {
            direct,
            ..OpenOptions::default()
        };
        Arc::new(FileDevice::open(&self.dev, &opts).expect("open the loop device"))
    }

    /// Allocated bytes of the backing file.
    fn backing_allocated(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.backing.as_file().metadata().expect("stat").blocks() * 512
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.dev)
            .status();
    }
}

#[test]
fn loop_device_geometry_and_direct_io() {
    let l = LoopDev::new(8 << 20, 512);
    let d = l.open(Direct::On);
    assert!(d.is_direct() && d.is_block_device());
    let info = d.info();
    assert_eq!(info.size, 8 << 20);
    assert_eq!(info.logical_block_size, 512);
    assert!(info.physical_block_size >= 512);
    assert!(!info.block_status, "block devices report no allocation map");
    // A loop device has no SCSI VPD pages: no identity, and no error for it.
    assert_eq!(d.identity(), None);
    let mut s = SyncDevice::new(d).expect("ring");
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    s.write_at(512, &data)
        .expect("write at a 512-byte boundary");
    s.op(Op::Flush, 0, 0).expect("flush");
    assert_eq!(
        s.read_at(512, data.len()).expect("read").as_slice(),
        &data[..]
    );
    // What reached the device is in the backing file.
    let mut back = vec![0u8; data.len()];
    std::os::unix::fs::FileExt::read_exact_at(l.backing.as_file(), &mut back, 512)
        .expect("read backing");
    assert_eq!(back, data);
}

#[test]
fn loop_device_4k_sectors_refuse_misaligned_requests() {
    let l = LoopDev::new(8 << 20, 4096);
    let d = l.open(Direct::On);
    assert_eq!(d.info().logical_block_size, 4096);
    assert!(d.info().physical_block_size >= 4096);
    let mut s = SyncDevice::new(d).expect("ring");
    let c = s
        .run(vec![
            Request {
                op: Op::Read,
                offset: 512,
                len: 4096,
                buf: Buffer::Owned(IoBuf::new(4096)),
                tag: 1,
            },
            Request {
                op: Op::Write { fua: false },
                offset: 4096,
                len: 512,
                buf: Buffer::Owned(IoBuf::new(512)),
                tag: 2,
            },
            Request {
                op: Op::Discard,
                offset: 0,
                len: 1024,
                buf: Buffer::None,
                tag: 3,
            },
        ])
        .expect("run");
    assert_eq!(c.len(), 3);
    assert!(c.iter().all(|c| c.result == Err(libc::EINVAL)), "{c:?}");
    s.write_at(4096, &[0x5a; 8192]).expect("aligned write");
    assert!(s
        .read_at(4096, 8192)
        .expect("read")
        .as_slice()
        .iter()
        .all(|&b| b == 0x5a));
}

#[test]
fn loop_device_discard_and_write_zeroes_reach_the_backing_file() {
    let l = LoopDev::new(16 << 20, 512);
    let d = l.open(Direct::On);
    assert!(d.info().discard, "loop devices offer discard");
    let mut s = SyncDevice::new(d).expect("ring");
    s.write_at(0, &vec![0xa5; 16 << 20]).expect("fill");
    s.op(Op::Flush, 0, 0).expect("flush");
    let full = l.backing_allocated();
    assert!(full >= 16 << 20, "filled backing file allocates: {full}");
    // Discard punches a hole in the loop device's backing file.
    s.op(Op::Discard, 4 << 20, 4 << 20).expect("discard");
    // Write-zeroes with unmapping allowed may deallocate too; without, it must not.
    s.op(Op::WriteZeroes { unmap: true }, 8 << 20, 2 << 20)
        .expect("write zeroes, unmap");
    s.op(Op::WriteZeroes { unmap: false }, 12 << 20, 1 << 20)
        .expect("write zeroes");
    s.op(Op::Flush, 0, 0).expect("flush");
    let after = l.backing_allocated();
    assert!(
        after <= full - (4 << 20),
        "discard left the backing file allocated: {full} -> {after}"
    );
    let back = s.read_at(0, 16 << 20).expect("read");
    let b = back.as_slice();
    assert!(b[..4 << 20].iter().all(|&x| x == 0xa5));
    assert!(b[4 << 20..10 << 20].iter().all(|&x| x == 0));
    assert!(b[10 << 20..12 << 20].iter().all(|&x| x == 0xa5));
    assert!(b[12 << 20..13 << 20].iter().all(|&x| x == 0));
    assert!(b[13 << 20..].iter().all(|&x| x == 0xa5));
}

#[test]
fn a_late_device_path_is_waited_for_and_a_missing_one_fails_in_time() {
    let l = LoopDev::new(1 << 20, 512);
    let dir = tempfile::tempdir().expect("tempdir");
    let link = dir.path().join("wwn-late");
    let (target, link2) = (l.dev.clone(), link.clone());
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(400));
        std::os::unix::fs::symlink(target, link2).expect("symlink");
    });
    let mut opts = OpenOptions::default();
    let spec =
        BackendSpec::parse(&format!("file://{}?wait=20", link.display()), &mut opts).expect("spec");
    assert_eq!(opts.wait, Some(std::time::Duration::from_secs(20)));
    let d = open(&spec, &opts).expect("the path appears while we wait");
    assert_eq!(d.info().size, 1 << 20);
    t.join().expect("thread");

    let missing = dir.path().join("never");
    let opts = OpenOptions {
        wait: Some(std::time::Duration::from_millis(300)),
        ..OpenOptions::default()
    };
    let t0 = std::time::Instant::now();
    let e = FileDevice::open(&missing, &opts).expect_err("never appears");
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    let msg = format!("{e}: {:?}", std::error::Error::source(&e));
    assert!(msg.contains("did not appear"), "{msg}");
}
