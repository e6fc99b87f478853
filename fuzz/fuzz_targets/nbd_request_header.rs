//! The NBD transmission request header decoder: any 28 bytes decode or give an error, and
//! a decoded header encodes back to the same bytes.
#![no_main]

use ember_daemon::nbd::proto::RequestHeader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = RequestHeader::decode(data) {
        let again = h.encode();
        assert_eq!(&again[..], &data[..again.len()]);
    }
});
