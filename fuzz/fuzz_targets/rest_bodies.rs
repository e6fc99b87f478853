//! The REST bodies of volumes, snapshots, types, secrets, orders, locks and projects
//! through the strict JSON extractor and each body's own checks
//! (`ember_control::openapi::check_body`): any bytes parse, or give the 400/413 the route
//! answers — never a panic, never another status. The first byte selects the body kind;
//! the seeds are request bodies the end-to-end tests send.
#![no_main]

use ember_control::openapi::{check_body, BodyKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&k, body)) = data.split_first() else {
        return;
    };
    let kind = BodyKind::ALL[usize::from(k) % BodyKind::ALL.len()];
    if let Err(e) = check_body(kind, body) {
        assert!(
            matches!(e.status.as_u16(), 400 | 413),
            "{kind:?}: {} {}",
            e.status,
            e.message
        );
        assert!(!e.message.is_empty());
    }
});
