//! The NBD wire format, pure: bytes in, values out, and values in, bytes out.
//!
//! Covers the fixed-newstyle handshake (greeting, option haggling, option replies, the
//! `NBD_OPT_EXPORT_NAME` reply), the transmission request header, simple replies and
//! structured reply chunks (`OFFSET_DATA`, `NONE`, `ERROR`, `BLOCK_STATUS`). Numbers
//! follow the NBD protocol document (doc/proto.md of the reference implementation).
//! Every integer on the wire is big-endian. Nothing here does I/O.

// The full vocabulary is kept even where the server does not use a value yet.
#![allow(dead_code)]

/// `"NBDMAGIC"`: first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`: newstyle magic, and the prefix of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Server handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the 124 zero bytes after `EXPORT_NAME` may be omitted.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

/// Options (client → server).
pub mod opt {
    /// Select an export, old style (no reply header, no error path).
    pub const EXPORT_NAME: u32 = 1;
    /// End the handshake.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe and select an export.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
}

/// Option reply types (server → client).
pub mod rep {
    /// Done.
    pub const ACK: u32 = 1;
    /// One export of a `LIST`.
    pub const SERVER: u32 = 2;
    /// One piece of information of `INFO`/`GO`.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// Option not supported.
    pub const ERR_UNSUP: u32 = ERR + 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR + 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR + 3;
    /// Unsupported on this platform.
    pub const ERR_PLATFORM: u32 = ERR + 4;
    /// TLS required.
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
    /// Option data too big.
    pub const ERR_TOO_BIG: u32 = ERR + 9;
}

/// `NBD_INFO_*` types inside `NBD_REP_INFO`.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block size.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tx {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Writes are refused.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is useful.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is honoured.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is honoured.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see each other's writes and flushes.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Commands.
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows the header).
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query metadata contexts.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cmd_flag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Write-zeroes must not deallocate.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Read must be one chunk.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Write-zeroes must be fast or fail with `ENOTSUP`.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Every flag this server knows.
    pub const KNOWN: u16 = FUA | NO_HOLE | DF | REQ_ONE | FAST_ZERO;
}

/// NBD error values (they equal Linux errnos, but are a protocol of their own).
pub mod err {
    /// Operation not permitted.
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space.
    pub const ENOSPC: u32 = 28;
    /// Request too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Structured reply chunk types.
pub mod reply_type {
    /// No payload (final chunk of a reply with nothing more to say).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A hole (reads as zeros) at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// Structured reply flag: last chunk of this reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// `base:allocation` state: unallocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state: reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context this server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Size of an option header (magic, option, length).
pub const OPTION_HEADER_BYTES: usize = 16;
/// Size of a request header.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Size of a structured chunk header.
pub const CHUNK_HEADER_BYTES: usize = 20;
/// Size of an `OFFSET_DATA` chunk header plus its offset field.
pub const READ_CHUNK_HEADER_BYTES: usize = CHUNK_HEADER_BYTES + 8;

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtoError {
    /// A magic number did not match.
    BadMagic(u64),
    /// A length field does not match the data.
    BadLength,
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtoError::BadMagic(m) => write!(f, "bad magic {m:#x}"),
            ProtoError::BadLength => write!(f, "length field does not match the data"),
        }
    }
}

impl std::error::Error for ProtoError {}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The server's first message: magic, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut g = [0u8; 18];
    g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// Decode an option header into `(option, data length)`.
pub fn decode_option_header(b: &[u8; OPTION_HEADER_BYTES]) -> Result<(u32, u32), ProtoError> {
    let magic = be64(b, 0);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    Ok((be32(b, 8), be32(b, 12)))
}

/// Append an option reply.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Payload of `NBD_INFO_EXPORT`.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&info::EXPORT.to_be_bytes());
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

/// Payload of `NBD_INFO_BLOCK_SIZE`.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(14);
    v.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    v.extend_from_slice(&min.to_be_bytes());
    v.extend_from_slice(&preferred.to_be_bytes());
    v.extend_from_slice(&max.to_be_bytes());
    v
}

/// Payload of `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` (`kind`).
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + s.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(s.as_bytes());
    v
}

/// Payload of `NBD_REP_SERVER`: a name.
pub fn rep_server(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// Payload of `NBD_REP_META_CONTEXT`: an id and a name.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zeros unless `no_zeroes`.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut v = Vec::with_capacity(134);
    v.extend_from_slice(&size.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        v.extend_from_slice(&[0u8; 124]);
    }
    v
}

/// Take a `u32`-length-prefixed string from `b` at `*pos`.
fn take_string(b: &[u8], pos: &mut usize) -> Result<String, ProtoError> {
    let len_end = pos.checked_add(4).ok_or(ProtoError::BadLength)?;
    if b.len() < len_end {
        return Err(ProtoError::BadLength);
    }
    let len = be32(b, *pos) as usize;
    let end = len_end.checked_add(len).ok_or(ProtoError::BadLength)?;
    if b.len() < end {
        return Err(ProtoError::BadLength);
    }
    let s = String::from_utf8(b[len_end..end].to_vec()).map_err(|_| ProtoError::BadLength)?;
    *pos = end;
    Ok(s)
}

/// Decode the data of `NBD_OPT_INFO`/`NBD_OPT_GO`: export name and requested info types.
pub fn decode_info_request(b: &[u8]) -> Result<(String, Vec<u16>), ProtoError> {
    let mut pos = 0;
    let name = take_string(b, &mut pos)?;
    if b.len() < pos + 2 {
        return Err(ProtoError::BadLength);
    }
    let n = usize::from(be16(b, pos));
    pos += 2;
    if b.len() != pos + 2 * n {
        return Err(ProtoError::BadLength);
    }
    let infos = (0..n).map(|i| be16(b, pos + 2 * i)).collect();
    Ok((name, infos))
}

/// Decode the data of `NBD_OPT_{LIST,SET}_META_CONTEXT`: export name and queries.
pub fn decode_meta_request(b: &[u8]) -> Result<(String, Vec<String>), ProtoError> {
    let mut pos = 0;
    let name = take_string(b, &mut pos)?;
    if b.len() < pos + 4 {
        return Err(ProtoError::BadLength);
    }
    let n = be32(b, pos);
    pos += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(take_string(b, &mut pos)?);
    }
    if pos != b.len() {
        return Err(ProtoError::BadLength);
    }
    Ok((name, queries))
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// `NBD_CMD_FLAG_*`.
    pub flags: u16,
    /// `NBD_CMD_*`.
    pub cmd: u16,
    /// The client's cookie, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (payload length for writes).
    pub len: u32,
}

impl RequestHeader {
    /// Decode from the first [`REQUEST_HEADER_BYTES`] bytes of `b`.
    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        if b.len() < REQUEST_HEADER_BYTES {
            return Err(ProtoError::BadLength);
        }
        let magic = be32(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic(u64::from(magic)));
        }
        Ok(RequestHeader {
            flags: be16(b, 4),
            cmd: be16(b, 6),
            handle: be64(b, 8),
            offset: be64(b, 16),
            len: be32(b, 24),
        })
    }

    /// Encode (the client side; used by tests).
    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut b = [0u8; REQUEST_HEADER_BYTES];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.cmd.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// Append a simple reply header (any data follows separately).
pub fn encode_simple_reply(handle: u64, error: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
}

/// Append a structured chunk header whose payload is `len` bytes.
pub fn encode_chunk_header(flags: u16, ty: u16, handle: u64, len: u32, out: &mut Vec<u8>) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Append the header of a final `OFFSET_DATA` chunk carrying `len` data bytes at
/// `offset`; the data follows separately.
pub fn encode_read_chunk_header(handle: u64, offset: u64, len: u32, out: &mut Vec<u8>) {
    encode_chunk_header(
        REPLY_FLAG_DONE,
        reply_type::OFFSET_DATA,
        handle,
        len.saturating_add(8),
        out,
    );
    out.extend_from_slice(&offset.to_be_bytes());
}

/// Append a final `ERROR` chunk with an empty message.
pub fn encode_error_chunk(handle: u64, error: u32, out: &mut Vec<u8>) {
    encode_chunk_header(REPLY_FLAG_DONE, reply_type::ERROR, handle, 6, out);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
}

/// Append a final `BLOCK_STATUS` chunk: context id and `(length, flags)` descriptors.
pub fn encode_block_status(handle: u64, context: u32, extents: &[(u32, u32)], out: &mut Vec<u8>) {
    let len = 4 + 8 * extents.len() as u32;
    encode_chunk_header(REPLY_FLAG_DONE, reply_type::BLOCK_STATUS, handle, len, out);
    out.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

/// Append a final `NONE` chunk.
pub fn encode_none_chunk(handle: u64, out: &mut Vec<u8>) {
    encode_chunk_header(REPLY_FLAG_DONE, reply_type::NONE, handle, 0, out);
}

/// Map an errno from the block layer to an NBD error.
pub fn nbd_error(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS | libc::EACCES => err::EPERM,
        libc::EIO => err::EIO,
        libc::ENOMEM => err::ENOMEM,
        libc::EINVAL => err::EINVAL,
        libc::ENOSPC | libc::EDQUOT => err::ENOSPC,
        libc::EOVERFLOW | libc::EFBIG => err::EOVERFLOW,
        libc::EOPNOTSUPP => err::ENOTSUP,
        libc::ESHUTDOWN => err::ESHUTDOWN,
        _ => err::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_bytes() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn option_header_round_trip() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(b"IHAVEOPT");
        b[8..12].copy_from_slice(&opt::GO.to_be_bytes());
        b[12..].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(decode_option_header(&b), Ok((opt::GO, 9)));
        b[0] = b'X';
        assert!(matches!(
            decode_option_header(&b),
            Err(ProtoError::BadMagic(_))
        ));
    }

    #[test]
    fn option_reply_bytes() {
        let mut out = Vec::new();
        encode_option_reply(opt::GO, rep::ERR_UNKNOWN, b"no", &mut out);
        assert_eq!(
            out,
            [
                0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0x80, 0, 0, 6, 0, 0, 0, 2,
                b'n', b'o'
            ]
        );
    }

    #[test]
    fn info_request_parsing() {
        let mut b = Vec::new();
        b.extend_from_slice(&3u32.to_be_bytes());
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&2u16.to_be_bytes());
        b.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        b.extend_from_slice(&info::NAME.to_be_bytes());
        assert_eq!(
            decode_info_request(&b),
            Ok(("abc".into(), vec![info::BLOCK_SIZE, info::NAME]))
        );
        // Truncated, trailing garbage, name length past the end.
        assert!(decode_info_request(&b[..b.len() - 1]).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(decode_info_request(&long).is_err());
        assert!(decode_info_request(&[0, 0, 1, 0, b'x']).is_err());
    }

    #[test]
    fn meta_request_parsing() {
        let mut b = Vec::new();
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&15u32.to_be_bytes());
        b.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(
            decode_meta_request(&b),
            Ok((String::new(), vec![BASE_ALLOCATION.to_string()]))
        );
        assert!(decode_meta_request(&b[..b.len() - 2]).is_err());
        // A query count far beyond the data fails without allocating it.
        let huge = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(decode_meta_request(&huge).is_err());
    }

    #[test]
    fn request_header_round_trip() {
        let h = RequestHeader {
            flags: cmd_flag::FUA,
            cmd: cmd::WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 4096,
            len: 512,
        };
        let b = h.encode();
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(RequestHeader::decode(&b), Ok(h));
        let mut bad = b;
        bad[0] = 0;
        assert!(matches!(
            RequestHeader::decode(&bad),
            Err(ProtoError::BadMagic(_))
        ));
        assert_eq!(RequestHeader::decode(&b[..27]), Err(ProtoError::BadLength));
    }

    #[test]
    fn reply_encodings() {
        let mut out = Vec::new();
        encode_simple_reply(7, err::EINVAL, &mut out);
        assert_eq!(
            out,
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );

        out.clear();
        encode_read_chunk_header(1, 512, 4096, &mut out);
        assert_eq!(out.len(), READ_CHUNK_HEADER_BYTES);
        assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..8], &[0, 1, 0, 1]); // DONE, OFFSET_DATA
        assert_eq!(&out[16..20], &(4096u32 + 8).to_be_bytes());
        assert_eq!(&out[20..28], &512u64.to_be_bytes());

        out.clear();
        encode_error_chunk(2, err::EIO, &mut out);
        assert_eq!(&out[4..8], &[0, 1, 0x80, 1]);
        assert_eq!(&out[16..], &[0, 0, 0, 6, 0, 0, 0, 5, 0, 0]);

        out.clear();
        encode_block_status(3, 1, &[(4096, STATE_HOLE | STATE_ZERO), (512, 0)], &mut out);
        assert_eq!(&out[6..8], &[0, 5]);
        assert_eq!(&out[16..20], &20u32.to_be_bytes());
        assert_eq!(&out[20..24], &1u32.to_be_bytes());
        assert_eq!(&out[24..32], &[0, 0, 0x10, 0, 0, 0, 0, 3]);

        out.clear();
        encode_none_chunk(4, &mut out);
        assert_eq!(out.len(), CHUNK_HEADER_BYTES);
    }

    #[test]
    fn export_name_reply_zeroes() {
        assert_eq!(export_name_reply(1, 2, false).len(), 134);
        assert_eq!(
            export_name_reply(1, 2, true),
            [0, 0, 0, 0, 0, 0, 0, 1, 0, 2]
        );
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(nbd_error(libc::EPERM), err::EPERM);
        assert_eq!(nbd_error(libc::EIO), err::EIO);
        assert_eq!(nbd_error(libc::ENOMEM), err::ENOMEM);
        assert_eq!(nbd_error(libc::EINVAL), err::EINVAL);
        assert_eq!(nbd_error(libc::ENOSPC), err::ENOSPC);
        assert_eq!(nbd_error(libc::EOVERFLOW), err::EOVERFLOW);
        assert_eq!(nbd_error(libc::EOPNOTSUPP), err::ENOTSUP);
        assert_eq!(nbd_error(libc::ESHUTDOWN), err::ESHUTDOWN);
        assert_eq!(nbd_error(libc::EBADF), err::EIO);
    }
}
