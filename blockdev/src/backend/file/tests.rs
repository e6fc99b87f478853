use super::*;
use crate::backend::{open, BackendSpec};
use crate::sync::SyncDevice;

fn dev(size: u64, direct: Direct) -> (tempfile::NamedTempFile, Arc<dyn BlockDevice>) {
    let f = tempfile::NamedTempFile::new().expect("tempfile");
    f.as_file().set_len(size).expect("set_len");
    let opts = OpenOptions {
        read_only: false,
        direct,
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
