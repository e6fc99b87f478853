//! LUKS1 header and keyslot parsing, unlocking and key changes: the input is a disk image
//! (seeds: cryptsetup and qemu-img headers, trimmed to the header area); see luks_common.
#![no_main]

#[path = "luks_common.rs"]
mod luks_common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    luks_common::run(data);
});
