//! The whole NBD option haggling, fed from bytes: `negotiate_with` runs on an in-memory
//! stream whose input is the client's side of a conversation (flags, then options), against
//! a registry of three exports, one of them an attachment's (only PSK identity `alice`
//! may see it). The first input byte decides which `NBD_OPT_GO`s are admitted (bits 0–5:
//! the k-th admission is refused) and the TLS mode (bits 6–7: off, on, require, off), with
//! a PSK server, so `STARTTLS` and OpenSSL's parsing of what follows it are covered too.
//!
//! Checked: no panic; the server's output is the greeting, then well-formed option
//! replies (magic, length ≤ 64 KiB, never cut short) up to a `STARTTLS` acknowledgement
//! (ciphertext follows), and only after a successful `NBD_OPT_EXPORT_NAME` the 10 or 134
//! bytes of its reply; in require mode nothing but `NBD_REP_ERR_TLS_REQD` and acks of
//! `ABORT`/`STARTTLS` before TLS; no plaintext reply ever names the attachment's export;
//! a successful negotiation names an export of the registry the client may use. Seeds: the client side of real handshakes (qemu-io,
//! nbdinfo, nbdinfo --list, nbdcopy, fio's nbd engine), captured through a proxy.
#![no_main]

use ember_blockdev::{open, BackendSpec, BlockDevice, OpenOptions};
use ember_daemon::nbd::gate::Refusal;
use ember_daemon::nbd::handshake::{negotiate_with, Policy};
use ember_daemon::nbd::proto;
use ember_daemon::nbd::{Access, ClientAuth, Export, PskTable, Registry, TlsMode, TlsServer};
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
        for (id, name, ro) in [(1, "", false), (2, "vol", true), (3, ATTACHED, false)] {
            let dev: Arc<dyn BlockDevice> =
                open(&BackendSpec::Null { size: 1 << 20 }, &OpenOptions::default())
                    .expect("null device");
            let access = if name == ATTACHED {
                Access::Attachment {
                    psk_identity: Some("alice".into()),
                    uid: None,
                    gid: None,
                }
            } else {
                Access::Any
            };
            r.insert(Export {
                id,
                name: name.into(),
                dev,
                read_only: ro,
                access,
            });
        }
        r
    })
}

/// The attachment's export: only a client with PSK identity `alice` may see it.
const ATTACHED: &str = "attached-export";

fn tls() -> &'static TlsServer {
    static T: OnceLock<TlsServer> = OnceLock::new();
    T.get_or_init(|| {
        let keys = PskTable::parse("fuzz", "alice:000102030405060708090a0b0c0d0e0f")
            .expect("psk table");
        TlsServer::new(Some(Arc::new(keys)), None).expect("TLS server")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&refuse, input)) = data.split_first() else {
        return;
    };
    let mut n = 0u32;
    let mut admit = |_: &Arc<Export>| {
        n += 1;
        if n <= 6 && refuse & (1 << (n - 1)) != 0 {
            Err(Refusal::Conns(1))
        } else {
            Ok(n)
        }
    };
    let named_it = input
        .windows(ATTACHED.len())
        .any(|w| w == ATTACHED.as_bytes());
    let mut m = Mem {
        input,
        out: Vec::new(),
    };
    let mode = match refuse >> 6 {
        1 => TlsMode::On,
        2 => TlsMode::Require,
        _ => TlsMode::Off,
    };
    let policy = Policy {
        mode,
        tls: Some(tls()),
        client: ClientAuth::default(),
    };
    let res = negotiate_with(&mut m, registry(), &policy, &mut admit);
    let out = m.out;
    assert_eq!(&out[..18], &proto::greeting());
    let mut pos = 18;
    while pos < out.len() {
        let rest = &out[pos..];
        if rest.len() >= 20 && rest[..8] == proto::OPT_REPLY_MAGIC.to_be_bytes() {
            let option = u32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]);
            let ty = u32::from_be_bytes([rest[12], rest[13], rest[14], rest[15]]);
            let l = u32::from_be_bytes([rest[16], rest[17], rest[18], rest[19]]) as usize;
            assert!(l <= 64 * 1024, "reply of {l} bytes");
            assert!(rest.len() >= 20 + l, "reply cut short");
            let body = &rest[20..20 + l];
            // A name the client sent may come back in an error ("no export named …",
            // the same words for an unknown and a hidden export); otherwise the
            // attachment's name never appears.
            assert!(
                named_it || !body.windows(ATTACHED.len()).any(|w| w == ATTACHED.as_bytes()),
                "the attachment's export shown to a client without its key"
            );
            if mode == TlsMode::Require {
                // Before TLS nothing is served: STARTTLS is accepted or refused as
                // invalid (data with it, or a second one), ABORT is acknowledged, and
                // every other option gets TLS_REQD, or TOO_BIG when its data is too long
                // to read before its kind is looked at.
                let allowed = ty == proto::rep::ERR_TOO_BIG
                    || match option {
                        proto::opt::STARTTLS => {
                            ty == proto::rep::ACK || ty == proto::rep::ERR_INVALID
                        }
                        proto::opt::ABORT => ty == proto::rep::ACK,
                        _ => ty == proto::rep::ERR_TLS_REQD,
                    };
                assert!(allowed, "option {option} answered {ty:#x} before TLS");
            }
            pos += 20 + l;
            if option == proto::opt::STARTTLS && ty == proto::rep::ACK {
                // TLS records follow.
                break;
            }
        } else {
            assert!(matches!(res, Ok(Some(_))), "stray bytes after a failed handshake");
            assert!(matches!(rest.len(), 10 | 134), "EXPORT_NAME reply of {}", rest.len());
            pos = out.len();
        }
    }
    if let Ok(Some(n)) = res {
        assert!(registry().get(&n.export.name).is_some());
        assert!(n.tls.is_some() || n.export.name != ATTACHED);
        assert!(mode != TlsMode::Require || n.tls.is_some());
    }
});
