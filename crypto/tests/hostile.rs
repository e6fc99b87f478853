//! Crafted LUKS1/LUKS2 headers: each is refused quickly with an error naming what is
//! wrong, nothing large is allocated, and nothing is written. Built from real headers
//! (`format`) with one field changed; LUKS2 checksums are recomputed so the change is
//! what the parser judges.
//!
//! Every case runs under a deadline: on a header whose costs are unbounded the KDF
//! would run for tens of minutes (that is the failure these tests catch).

use ember_crypto::kdf::{sha256, Hash};
use ember_crypto::{add_key, change_key, format, open, remove_key, FormatParams, KdfParams};
use serde_json::Value;
use std::sync::mpsc;
use std::time::Duration;

const PW: &[u8] = b"pw";

fn pbkdf2() -> KdfParams {
    KdfParams::Pbkdf2 {
        hash: Hash::Sha256,
        iterations: 1000,
    }
}

/// A fresh volume of `version` with passphrase [`PW`] (and 1 MiB of data).
fn image(version: u8) -> Vec<u8> {
    let data_offset = if version == 1 { 2 << 20 } else { 16 << 20 };
    let mut disk = vec![0u8; data_offset + (1 << 20)];
    let p = FormatParams {
        version,
        key_bytes: 64,
        sector_size: 512,
        kdf: pbkdf2(),
        label: String::new(),
        uuid: None,
    };
    format(&mut disk, PW, &p).unwrap();
    disk
}

/// Run `f` on its own thread; fail if it takes longer than 60 s (unbounded work).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(v) => v,
        Err(_) => panic!("{what}: still running after 60 s (unbounded work on a crafted header)"),
    }
}

/// Open `img` with `pass` and the default limits; the error text, or "opened".
fn open_err(what: &str, img: &[u8], pass: &'static [u8]) -> String {
    let mut d = img.to_vec();
    within(what, move || {
        match open(&mut d, pass, &Default::default()) {
            Ok(_) => "opened".to_string(),
            Err(e) => e.to_string(),
        }
    })
}

fn luks2_json(img: &[u8]) -> Value {
    let area = &img[4096..16384];
    let end = area.iter().position(|&c| c == 0).unwrap();
    serde_json::from_slice(&area[..end]).unwrap()
}

/// Replace the JSON text of both LUKS2 copies (16 KiB headers) and fix the checksums.
fn put_luks2_text(img: &mut [u8], text: &[u8]) {
    assert!(text.len() < 12288);
    for at in [0usize, 16384] {
        let copy = &mut img[at..at + 16384];
        copy[4096..].fill(0);
        copy[4096..4096 + text.len()].copy_from_slice(text);
        copy[448..512].fill(0);
        let sum = sha256(&[copy]);
        copy[448..480].copy_from_slice(&sum);
    }
}

/// Edit the LUKS2 JSON of both copies.
fn edit_luks2(img: &mut [u8], f: impl FnOnce(&mut Value)) {
    let mut j = luks2_json(img);
    f(&mut j);
    put_luks2_text(img, &serde_json::to_vec(&j).unwrap());
}

fn be32(img: &mut [u8], at: usize, v: u32) {
    img[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// The LUKS1 keyslot field at `field` (0 state, 4 iterations, 40 key offset, 44 stripes).
fn slot1(i: usize, field: usize) -> usize {
    208 + 48 * i + field
}

fn assert_refused(what: &str, err: &str, needles: &[&str]) {
    assert!(err != "opened", "{what}: a crafted header opened");
    for n in needles {
        assert!(err.contains(n), "{what}: {err:?} does not mention {n:?}");
    }
}

#[test]
fn luks2_unbounded_kdf_and_digest_costs_are_refused_quickly() {
    let base = image(2);
    type Case = (&'static str, fn(&mut Value), &'static [&'static str]);
    let cases: [Case; 4] = [
        (
            "pbkdf2 iterations u32::MAX",
            |j| {
                j["keyslots"]["0"]["kdf"]["iterations"] = u32::MAX.into();
            },
            &["keyslot 0", "kdf.iterations", "--max-pbkdf2-iterations"],
        ),
        (
            "argon2 time u32::MAX",
            |j| {
                j["keyslots"]["0"]["kdf"] = serde_json::json!({
                    "type": "argon2id", "time": u32::MAX, "memory": 64, "cpus": 1,
                    "salt": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
                });
            },
            &["kdf.time", "--max-argon2-time"],
        ),
        (
            "digest iterations u32::MAX",
            |j| {
                j["digests"]["0"]["iterations"] = u32::MAX.into();
            },
            &["digest 0", "iterations", "--max-digest-iterations"],
        ),
        (
            "4 GiB area key",
            |j| {
                j["keyslots"]["0"]["area"]["key_size"] = u32::MAX.into();
            },
            &["keyslot 0", "4294967295-byte area key"],
        ),
    ];
    for (what, edit, needles) in cases {
        let mut img = base.clone();
        edit_luks2(&mut img, edit);
        let err = open_err(what, &img, PW);
        assert_refused(what, &err, needles);
    }
}

#[test]
fn luks1_unbounded_kdf_and_digest_costs_are_refused_quickly() {
    let base = image(1);
    let mut img = base.clone();
    be32(&mut img, slot1(0, 4), u32::MAX);
    let err = open_err("LUKS1 slot iterations", &img, PW);
    assert_refused(
        "LUKS1 slot iterations",
        &err,
        &["keyslot 0", "kdf.iterations", "--max-pbkdf2-iterations"],
    );
    let mut img = base.clone();
    be32(&mut img, 164, u32::MAX);
    let err = open_err("LUKS1 mk_iter", &img, PW);
    assert_refused(
        "LUKS1 mk_iter",
        &err,
        &["mk_digest_iter", "--max-digest-iterations"],
    );
}

#[test]
fn luks2_keyslot_areas_may_not_overlap_the_data_or_each_other() {
    // Slot 0's material moved into the data segment (a keyslots area claimed to reach it).
    let mut img = image(2);
    img.resize(img.len() + (1 << 20), 0);
    let mat: Vec<u8> = img[32768..32768 + 258048].to_vec();
    img[16 << 20..(16 << 20) + 258048].copy_from_slice(&mat);
    edit_luks2(&mut img, |j| {
        j["config"]["keyslots_size"] = "1073741824".into();
        j["keyslots"]["0"]["area"]["offset"] = (16u64 << 20).to_string().into();
    });
    let err = open_err("keyslot area in the data", &img, PW);
    assert_refused(
        "keyslot area in the data",
        &err,
        &["segment offset", "keyslots area"],
    );

    // Two keyslots sharing one area.
    let mut img = image(2);
    add_key(&mut img, PW, b"two", pbkdf2(), &Default::default()).unwrap();
    edit_luks2(&mut img, |j| {
        j["keyslots"]["1"]["area"]["offset"] = j["keyslots"]["0"]["area"]["offset"].clone();
    });
    let err = open_err("overlapping keyslots", &img, PW);
    assert_refused("overlapping keyslots", &err, &["overlapping"]);
    let before = img.clone();
    let mut d = img.clone();
    assert!(add_key(&mut d, PW, b"three", pbkdf2(), &Default::default()).is_err());
    assert!(d == before, "a refused add_key wrote to the volume");
}

#[test]
fn luks2_json_tricks_are_refused() {
    let base = image(2);
    let text = serde_json::to_string(&luks2_json(&base)).unwrap();

    // A duplicate key (here in digest 0): serde_json alone would keep the last one.
    let dup = text.replacen("\"keyslots\":", "\"keyslots\":{},\"keyslots\":", 1);
    assert_ne!(dup, text);
    let mut img = base.clone();
    put_luks2_text(&mut img, dup.as_bytes());
    let err = open_err("duplicate key", &img, PW);
    assert_refused("duplicate key", &err, &["duplicate key"]);

    // Keyslot ids that are not canonical numbers below 32 ("0" and "00" would be one id).
    for id in ["00", "32", "4294967296", "-1", "x"] {
        let mut img = base.clone();
        edit_luks2(&mut img, |j| {
            let slot = j["keyslots"]["0"].clone();
            j["keyslots"][id] = slot;
        });
        let err = open_err(id, &img, PW);
        assert_refused(id, &err, &["keyslots: id"]);
    }

    // A priority that does not fit a byte (`as u8` would wrap 258 to 2).
    let mut img = base.clone();
    edit_luks2(&mut img, |j| {
        j["keyslots"]["0"]["priority"] = 258.into();
    });
    let err = open_err("priority 258", &img, PW);
    assert_refused("priority 258", &err, &["priority 258"]);

    // Deep nesting: a clean error, not a stack overflow.
    let deep = format!("{}{}{}", "[".repeat(5000), "0", "]".repeat(5000));
    let nested = text.replacen("\"tokens\":{}", &format!("\"tokens\":{{\"0\":{deep}}}"), 1);
    assert_ne!(nested, text);
    let mut img = base.clone();
    put_luks2_text(&mut img, nested.as_bytes());
    let err = open_err("deep nesting", &img, PW);
    assert_refused("deep nesting", &err, &["JSON metadata"]);
}

#[test]
fn luks2_segment_must_fit_the_device() {
    let base = image(2);
    for (size, needle) in [
        ("1099511627776", "does not fit"),
        ("18446744073709551104", "past 2^64"),
        ("1000", "not a multiple"),
    ] {
        let mut img = base.clone();
        edit_luks2(&mut img, |j| {
            j["segments"]["0"]["size"] = size.into();
        });
        let err = open_err(size, &img, PW);
        assert_refused(size, &err, &[needle]);
    }
    // A fixed size that fits opens.
    let mut img = base.clone();
    edit_luks2(&mut img, |j| {
        j["segments"]["0"]["size"] = "1048576".into();
    });
    assert_eq!(open_err("fits", &img, PW), "opened");
}

#[test]
fn luks2_keyslot_of_another_volume_key_is_not_used() {
    // Volume B's keyslot and digest grafted into volume A, under a digest that covers no
    // segment (as during a reencryption): B's passphrase must not open A with B's key.
    let mut a = image(2);
    let b = image(2);
    let (ja, jb) = (luks2_json(&a), luks2_json(&b));
    let area = 32768 + 258048;
    a[area..area + 258048].copy_from_slice(&b[32768..32768 + 258048]);
    let mut j = ja.clone();
    let mut slot = jb["keyslots"]["0"].clone();
    slot["area"]["offset"] = area.to_string().into();
    j["keyslots"]["1"] = slot;
    let mut dig = jb["digests"]["0"].clone();
    dig["keyslots"] = serde_json::json!(["1"]);
    dig["segments"] = serde_json::json!([]);
    j["digests"]["1"] = dig;
    edit_luks2(&mut a, |x| *x = j);
    assert_eq!(open_err("A's own passphrase", &a, PW), "opened");
    let mut only_b = a.clone();
    edit_luks2(&mut only_b, |x| {
        x["keyslots"].as_object_mut().unwrap().remove("0");
        x["digests"]["0"]["keyslots"] = serde_json::json!([]);
    });
    let err = open_err("B's keyslot alone", &only_b, PW);
    assert_refused(
        "B's keyslot alone",
        &err,
        &["digest does not cover the data segment"],
    );
}

#[test]
fn luks1_keyslot_areas_stay_in_the_header_area() {
    let base = image(1);
    let data_at = 2 << 20;

    // The first free slot's area is in the payload: adding a key would write into the data.
    let mut img = base.clone();
    img[data_at..].fill(0x5a);
    be32(&mut img, slot1(1, 40), (data_at / 512) as u32);
    let mut d = img.clone();
    let r = within("add_key", move || {
        let r = add_key(&mut d, PW, b"new", pbkdf2(), &Default::default());
        (r.map_err(|e| e.to_string()), d)
    });
    assert!(
        r.1[data_at..].iter().all(|&b| b == 0x5a),
        "add_key wrote into the payload"
    );
    let err = r.0.expect_err("a free keyslot in the payload was accepted");
    assert!(
        err.contains("keyslot 1") && err.contains("outside"),
        "{err}"
    );

    // Payload offset 0: the data would overwrite the header.
    let mut img = base.clone();
    be32(&mut img, 104, 0);
    let err = open_err("payload 0", &img, PW);
    assert_refused("payload 0", &err, &["detached"]);

    // Two slots sharing an area.
    let mut img = base.clone();
    let s0 = u32::from_be_bytes(img[slot1(0, 40)..slot1(0, 44)].try_into().unwrap());
    be32(&mut img, slot1(1, 40), s0);
    let err = open_err("LUKS1 overlap", &img, PW);
    assert_refused("LUKS1 overlap", &err, &["overlap"]);
}

#[test]
fn refused_updates_write_nothing() {
    for v in [1u8, 2] {
        let mut img = image(v);
        if v == 1 {
            be32(&mut img, slot1(0, 4), u32::MAX);
        } else {
            edit_luks2(&mut img, |j| {
                j["keyslots"]["0"]["kdf"]["iterations"] = u32::MAX.into();
            });
        }
        let before = img.clone();
        let mut d = img.clone();
        let d = within("updates", move || {
            assert!(add_key(&mut d, PW, b"x", pbkdf2(), &Default::default()).is_err());
            assert!(change_key(&mut d, PW, b"x", pbkdf2(), &Default::default()).is_err());
            assert!(remove_key(&mut d, PW, &Default::default()).is_err());
            d
        });
        assert!(d == before, "LUKS{v}: a refused update wrote");
    }
}
