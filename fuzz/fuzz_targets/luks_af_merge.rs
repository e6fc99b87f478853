//! The anti-forensic merge: [key length, stripes (2 bytes), hash, material...] merges or
//! fails cleanly; a merged key split again (random stripes) merges back to itself.
#![no_main]

use ember_crypto::kdf::{af_merge, af_split, Hash};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [k, s0, s1, h, material @ ..] = data else {
        return;
    };
    let key_len = usize::from(*k);
    let stripes = u32::from(u16::from_le_bytes([*s0, *s1])) % 4097;
    let hash = [Hash::Sha1, Hash::Sha256, Hash::Sha512][usize::from(*h) % 3];
    let Ok(key) = af_merge(material, key_len, stripes, hash) else {
        return;
    };
    assert_eq!(key.len(), key_len);
    let split = af_split(&key, stripes, hash).expect("split of a merged key");
    let again = af_merge(&split, key_len, stripes, hash).expect("merge of a split");
    assert_eq!(&again[..], &key[..]);
});
