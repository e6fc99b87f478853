//! LUKS2 JSON metadata: the input is the JSON text, placed in both copies of a real
//! cryptsetup header (16 KiB, 4096-byte sectors, two keyslots, from the luks2_open corpus)
//! with valid checksums, then parsed, opened and changed as in luks_common. Seeds: the
//! JSON of cryptsetup-made headers.
#![no_main]

#[path = "luks_common.rs"]
mod luks_common;

use libfuzzer_sys::fuzz_target;

static BASE: &[u8] = include_bytes!("../corpus/luks2_open/cs-pbkdf2-4k-k256-2slots");

fuzz_target!(|data: &[u8]| {
    const HDR: usize = 16384;
    if data.len() >= HDR - 4096 {
        return;
    }
    let mut img = BASE.to_vec();
    for at in [0, HDR] {
        let area = &mut img[at + 4096..at + HDR];
        area.fill(0);
        area[..data.len()].copy_from_slice(data);
    }
    luks_common::fix_luks2_checksums(&mut img);
    luks_common::run(&img);
});
