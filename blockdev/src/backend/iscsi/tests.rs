use super::*;

#[test]
fn uris() {
    let c = IscsiConfig::parse_uri("iscsi://127.0.0.1/iqn.2026-01.test:t1/1").unwrap();
    assert_eq!(c.portal, "127.0.0.1:3260");
    assert_eq!(c.target, "iqn.2026-01.test:t1");
    assert_eq!(c.lun, 1);
    assert!(!c.header_digest && !c.data_digest);
    let c = IscsiConfig::parse_uri(
        "iscsi://ember@[::1]:3261/iqn.x:y/3?header_digest=crc32c&data_digest=CRC32C&timeout=2.5&ro=1",
    )
    .unwrap();
    assert_eq!(c.portal, "[::1]:3261");
    assert_eq!(c.uri_user.as_deref(), Some("ember"));
    assert!(c.header_digest && c.data_digest && c.read_only);
    assert_eq!(c.timeouts.cmd_timeout, Duration::from_millis(2500));
    for bad in [
        "iscsi://u%secret@h/iqn.x:y/1",
        "iscsi://h/iqn.x:y",
        "iscsi://h/iqn.x:y/70000",
        "iscsi://h/iqn.x:y/1?bogus=1",
        "iscsi://h/iqn.x:y/1?header_digest=md5",
        "iscsi://h/iqn.x:y/1?timeout=0",
        "nbd://h/x",
    ] {
        let e = IscsiConfig::parse_uri(bad).expect_err(bad);
        assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{bad}");
    }
    let e = IscsiConfig::parse_uri("iscsi://u%secret@h/iqn.x:y/1").unwrap_err();
    assert!(!e.to_string().contains("secret@"), "{e}");
}

#[test]
fn geometry_defaults_and_limits() {
    let mut i = LunInfo::default();
    let g = Geometry::from_info(&i);
    assert_eq!((g.lbs, g.max_transfer), (512, MAX_TRANSFER_BYTES));
    i.capacity = Some(Capacity {
        blocks: 1000,
        block_len: 4096,
        phys_exp: 0,
        lbpme: true,
        lbprz: true,
    });
    i.limits.max_transfer = 64;
    i.limits.max_unmap_descriptors = 1000;
    let g = Geometry::from_info(&i);
    assert_eq!(g.lbs, 4096);
    assert_eq!(g.max_transfer, 64 * 4096);
    assert_eq!(g.max_unmap_descriptors, 64);
}

#[test]
fn scratch_tgtd() {
    let Ok(uri) = std::env::var("EMBER_SCRATCH_ISCSI") else {
        return;
    };
    let _ = tracing_subscriber_init();
    let cfg = IscsiConfig::parse_uri(&uri).unwrap();
    let d = IscsiDevice::open(cfg).unwrap();
    eprintln!("{:?}\n{:?}", d.lun_info(), d.info());
    let mut s = crate::SyncDevice::new(Arc::new(d)).unwrap();
    let data: Vec<u8> = (0..1048576u32).map(|i| (i % 251) as u8).collect();
    s.write_at(4096, &data).unwrap();
    s.op(crate::Op::Flush, 0, 0).unwrap();
    let b = s.read_at(4096, data.len()).unwrap();
    assert_eq!(b.as_slice(), &data[..]);
    s.op(crate::Op::WriteZeroes { unmap: false }, 0, 1 << 20)
        .unwrap();
    let b = s.read_at(4096, 4096).unwrap();
    assert!(b.as_slice().iter().all(|&x| x == 0));
}

fn tracing_subscriber_init() {}
