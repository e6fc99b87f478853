//! The data plane against real files, a real NBD server and the real LUKS code.

use super::*;
use ember_control::dataplane::{Passphrase, QosLimits as VolumeQos, RateLimits};
use ember_crypto::kdf::Argon2Type;
use ember_crypto::Zeroizing;
use std::time::Instant;

const MIB: u64 = 1 << 20;

struct Fx {
    dir: tempfile::TempDir,
    dp: EmberDataPlane,
    sock: PathBuf,
    rt: tokio::runtime::Runtime,
}

fn start() -> Fx {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    std::fs::create_dir(dir.path().join("vhost")).unwrap();
    let (dp, bound) = EmberDataPlane::start(
        vec![("default".into(), dir.path().join("pool"))],
        Vec::new(),
        &[ListenAddr::Unix(sock.clone())],
        crate::nbd::NbdLimits::default(),
        crate::nbd::TlsMode::Off,
        dir.path().join("vhost"),
        ember_crypto::UnlockLimits::default(),
    )
    .unwrap();
    assert_eq!(bound, vec![format!("unix:{}", sock.display())]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    Fx { dir, dp, sock, rt }
}

fn pass(b: &[u8]) -> Passphrase {
    Passphrase::new(Zeroizing::new(b.to_vec()))
}

fn vol(id: &str) -> ObjectRef {
    ObjectRef::volume("default", id)
}

fn att(volume: &str, id: &str, p: Option<&[u8]>, read_only: bool) -> AttachVolume {
    AttachVolume {
        volume: vol(volume),
        attachment_id: id.into(),
        protocol: Protocol::Nbd,
        read_only,
        passphrase: p.map(pass),
        qos: VolumeQos {
            iops: RateLimits {
                total: Some(1000),
                ..Default::default()
            },
            ..Default::default()
        },
        nbd_psk: None,
        unix_peer: None,
    }
}

fn names(dp: &EmberDataPlane) -> Vec<String> {
    lock(&dp.inner.nbd).as_ref().unwrap().export_names()
}

fn create(fx: &Fx, id: &str, luks: Option<&[u8]>) {
    fx.rt
        .block_on(fx.dp.create(CreateVolume {
            volume: vol(id),
            size: 32 * MIB,
            luks: luks.map(|p| LuksFormat {
                version: LuksVersion::Luks2,
                key_bits: 512,
                passphrase: pass(p),
            }),
        }))
        .unwrap();
}

#[test]
fn attachments_luks_copies_grow_and_shutdown() {
    let fx = start();
    let (dp, rt) = (&fx.dp, &fx.rt);
    create(&fx, "v1", Some(b"old"));
    let bad = rt.block_on(dp.create(CreateVolume {
        volume: vol("bad"),
        size: 32 * MIB,
        luks: Some(LuksFormat {
            version: LuksVersion::Luks2,
            key_bits: 100,
            passphrase: pass(b"p"),
        }),
    }));
    assert!(matches!(bad, Err(DataPlaneError::Invalid(_))), "{bad:?}");
    let dup = rt.block_on(dp.create(CreateVolume {
        volume: vol("v1"),
        size: 32 * MIB,
        luks: None,
    }));
    assert!(
        matches!(dup, Err(DataPlaneError::AlreadyExists(_))),
        "{dup:?}"
    );
    let big = rt.block_on(dp.create(CreateVolume {
        volume: vol("huge"),
        size: 1 << 60,
        luks: None,
    }));
    assert!(
        matches!(big, Err(DataPlaneError::NoSpace { .. })),
        "{big:?}"
    );

    // A clone with its own key, grown; the old key no longer opens it.
    rt.block_on(dp.clone_volume(CloneVolume {
        source: vol("v1"),
        volume: vol("v2"),
        size: 64 * MIB,
        rekey: Some(Rekey {
            old: pass(b"old"),
            new: pass(b"new"),
        }),
    }))
    .unwrap();
    let wrong = rt.block_on(dp.clone_volume(CloneVolume {
        source: vol("v1"),
        volume: vol("v3"),
        size: 32 * MIB,
        rekey: Some(Rekey {
            old: pass(b"nope"),
            new: pass(b"x"),
        }),
    }));
    assert!(
        matches!(wrong, Err(DataPlaneError::Unlock { .. })),
        "{wrong:?}"
    );
    rt.block_on(dp.delete(vol("v3"))).unwrap();
    rt.block_on(dp.snapshot(SnapshotVolume {
        volume: vol("v2"),
        snapshot: ObjectRef::snapshot("default", "s1"),
    }))
    .unwrap();
    let inv = rt.block_on(dp.inventory("default".into())).unwrap();
    let mut seen: Vec<(ObjectKind, String, u64)> = inv
        .iter()
        .map(|o| (o.object.kind, o.object.id.clone(), o.size))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (ObjectKind::Volume, "v1".into(), 32 * MIB),
            (ObjectKind::Volume, "v2".into(), 64 * MIB),
            (ObjectKind::Snapshot, "s1".into(), 64 * MIB),
        ]
    );
    assert!(matches!(
        rt.block_on(dp.inventory("nowhere".into())),
        Err(DataPlaneError::NoPool(_))
    ));
    let stats = rt.block_on(dp.stats()).unwrap();
    assert_eq!(stats[0].name, "default");
    assert_eq!(stats[0].provisioned_bytes, 160 * MIB);

    // Each NBD attachment is its own export with its own access mode; all share the
    // volume's one device stack.
    let e = rt.block_on(dp.attach(att("v2", "a0", Some(b"old"), false)));
    assert!(matches!(e, Err(DataPlaneError::Unlock { .. })), "{e:?}");
    assert!(
        lock(&dp.inner.volumes).attached.is_empty(),
        "a failed attach leaves nothing"
    );
    let ep = rt
        .block_on(dp.attach(att("v2", "a1", Some(b"new"), false)))
        .unwrap();
    match ep {
        Endpoint::Nbd {
            export,
            uris,
            credentials,
        } => {
            assert_eq!(export, "v2-a1");
            assert_eq!(
                uris,
                vec![format!("nbd+unix:///v2-a1?socket={}", fx.sock.display())]
            );
            assert!(credentials.is_none());
        }
        e => panic!("{e:?}"),
    }
    let again = rt.block_on(dp.attach(att("v2", "a1", Some(b"new"), false)));
    assert!(matches!(again, Err(DataPlaneError::AlreadyExists(_))));
    rt.block_on(dp.attach(att("v2", "a2", Some(b"new"), true)))
        .unwrap();
    assert_eq!(names(dp), vec!["v2-a1".to_string(), "v2-a2".to_string()]);
    assert_eq!(lock(&dp.inner.volumes).attached["v2"].attachments.len(), 2);

    // A copy of the attached volume pauses its gate, and leaves it open after.
    rt.block_on(dp.snapshot(SnapshotVolume {
        volume: vol("v2"),
        snapshot: ObjectRef::snapshot("default", "s2"),
    }))
    .unwrap();

    // Grow: the file and the live device.
    rt.block_on(dp.grow(vol("v2"), 96 * MIB)).unwrap();
    let base = lock(&dp.inner.volumes).attached["v2"].stack.base.clone();
    assert_eq!(base.info().size, 96 * MIB);

    rt.block_on(dp.detach(vol("v2"), "a1".into())).unwrap();
    assert_eq!(names(dp), vec!["v2-a2".to_string()]);
    rt.block_on(dp.detach(vol("v2"), "a2".into())).unwrap();
    rt.block_on(dp.detach(vol("v2"), "a2".into())).unwrap();
    assert!(names(dp).is_empty());
    {
        let vols = lock(&dp.inner.volumes);
        assert!(vols.attached.is_empty());
        assert!(vols.gates.is_empty(), "gates go with their last user");
    }

    // A vhost-user attachment is stopped by shutdown: its socket goes.
    let vep = rt
        .block_on(dp.attach(AttachVolume {
            protocol: Protocol::VhostUser,
            ..att("v2", "a3", Some(b"new"), false)
        }))
        .unwrap();
    let Endpoint::VhostUser { socket, queues } = vep else {
        panic!("{vep:?}")
    };
    assert_eq!(queues, VHOST_QUEUES);
    assert!(socket.exists());
    dp.shutdown();
    assert!(!fx.sock.exists(), "the socket is removed at shutdown");
    assert!(
        !socket.exists(),
        "vhost-user exports are stopped at shutdown"
    );
    assert!(lock(&dp.inner.volumes).attached.is_empty());
    let late = rt.block_on(dp.attach(att("v1", "z", Some(b"old"), false)));
    assert!(
        matches!(late, Err(DataPlaneError::ShuttingDown)),
        "{late:?}"
    );
    drop(fx.dir);
}

/// Issue 11 (6): an unlock's key derivation runs with no data-plane lock held. While
/// one volume's first attach is deriving a deliberately slow argon2id key, another
/// volume attaches and detaches, and the daemon shuts down; the slow attach then fails
/// cleanly. (With the unlock under the volumes lock, every one of those waited for it.)
#[test]
fn a_slow_unlock_holds_up_no_other_volume() {
    let fx = start();
    create(&fx, "plain", None);
    create(&fx, "slow", None);
    // A header whose keyslot costs seconds to open (argon2id, 64 MiB, many passes:
    // within what cryptsetup may write with a long --iter-time).
    let path = fx.dir.path().join("pool").join("slow.img");
    let mut disk = stack::header_disk(&BackendSpec::File { path: path.clone() }, false).unwrap();
    let kdf = KdfParams::Argon2 {
        kind: Argon2Type::Id,
        time: 60,
        memory_kib: 64 * 1024,
        lanes: 1,
    };
    let params = FormatParams {
        version: 2,
        key_bytes: 64,
        sector_size: 512,
        kdf,
        label: String::new(),
        uuid: None,
    };
    ember_crypto::format(&mut disk, b"slow", &params).unwrap();
    disk.flush().unwrap();
    drop(disk);

    let dp = fx.dp.clone();
    let t0 = Instant::now();
    let slow = fx
        .rt
        .spawn(async move { dp.attach(att("slow", "s", Some(b"slow"), false)).await });
    // Wait until the slow attach is past its registration and unlocking.
    while !lock(&fx.dp.inner.volumes).gates.contains_key("slow") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the attach never started"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let dp = &fx.dp;
    fx.rt
        .block_on(dp.attach(att("plain", "p", None, false)))
        .unwrap();
    fx.rt.block_on(dp.detach(vol("plain"), "p".into())).unwrap();
    assert!(
        !slow.is_finished(),
        "another volume's attach and detach waited for the slow unlock ({:?})",
        t0.elapsed()
    );
    dp.shutdown();
    assert!(
        !slow.is_finished(),
        "shutdown waited for the slow unlock ({:?})",
        t0.elapsed()
    );
    let r = fx.rt.block_on(slow).unwrap();
    assert!(matches!(r, Err(DataPlaneError::ShuttingDown)), "{r:?}");
    assert!(lock(&dp.inner.volumes).attached.is_empty());
}
