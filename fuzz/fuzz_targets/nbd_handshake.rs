//! The whole NBD option haggling, fed from bytes: `negotiate` runs on an in-memory stream
//! whose input is the client's side of a conversation (flags, then options), against a
//! registry of two exports. The first input byte decides which `NBD_OPT_GO`s are admitted
//! (bit k: the k-th admission is refused), so refusals are covered too.
//!
//! Checked: no panic; the server's output is the greeting, then well-formed option
//! replies (magic, length ≤ 64 KiB, never cut short), and only after a successful
//! `NBD_OPT_EXPORT_NAME` the 10 or 134 bytes of its reply; a successful negotiation names
//! an export of the registry. Seeds: the client side of real handshakes (qemu-io,
//! nbdinfo, nbdinfo --list, nbdcopy, fio's nbd engine), captured through a proxy.
#![no_main]

use ember_blockdev::{open, BackendSpec, BlockDevice, OpenOptions};
use ember_daemon::nbd::gate::Refusal;
use ember_daemon::nbd::handshake::negotiate;
use ember_daemon::nbd::proto;
use ember_daemon::nbd::{Export, Registry};
use libfuzzer_sys::fuzz_target;
use std::io::{self, Read, Write};
use std::sync::{Arc, OnceLock};

struct Mem<'a> {
    input: &'a [u8],
    out: Vec<u8>,
}

impl Read for Mem<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Mem<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| {
        let r = Registry::default();
        for (id, name, ro) in [(1, "", false), (2, "vol", true)] {
            let dev: Arc<dyn BlockDevice> =
                open(&BackendSpec::Null { size: 1 << 20 }, &OpenOptions::default())
                    .expect("null device");
            r.insert(Export {
                id,
                name: name.into(),
                dev,
                read_only: ro,
            });
        }
        r
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&refuse, input)) = data.split_first() else {
        return;
    };
    let mut n = 0u32;
    let mut admit = |_: &Arc<Export>| {
        n += 1;
        if n <= 8 && refuse & (1 << (n - 1)) != 0 {
            Err(Refusal::Conns(1))
        } else {
            Ok(n)
        }
    };
    let mut m = Mem {
        input,
        out: Vec::new(),
    };
    let res = negotiate(&mut m, registry(), &mut admit);
    let out = m.out;
    assert_eq!(&out[..18], &proto::greeting());
    let mut pos = 18;
    while pos < out.len() {
        let rest = &out[pos..];
        if rest.len() >= 20 && rest[..8] == proto::OPT_REPLY_MAGIC.to_be_bytes() {
            let l = u32::from_be_bytes([rest[16], rest[17], rest[18], rest[19]]) as usize;
            assert!(l <= 64 * 1024, "reply of {l} bytes");
            assert!(rest.len() >= 20 + l, "reply cut short");
            pos += 20 + l;
        } else {
            assert!(matches!(res, Ok(Some(_))), "stray bytes after a failed handshake");
            assert!(matches!(rest.len(), 10 | 134), "EXPORT_NAME reply of {}", rest.len());
            pos = out.len();
        }
    }
    if let Ok(Some(n)) = res {
        assert!(registry().get(&n.export.name).is_some());
    }
});
