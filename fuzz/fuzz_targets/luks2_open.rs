//! LUKS2 header (both copies) and keyslot parsing, unlocking and key changes: the input
//! is a disk image (seeds: cryptsetup headers, trimmed to the header area). Header
//! checksums are recomputed unless the input's last byte is odd, so mutations reach the
//! JSON and the checksum check is still exercised; see luks_common.
#![no_main]

#[path = "luks_common.rs"]
mod luks_common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.last().is_some_and(|b| b & 1 == 0) {
        let mut img = data.to_vec();
        luks_common::fix_luks2_checksums(&mut img);
        luks_common::run(&img);
    } else {
        luks_common::run(data);
    }
});
