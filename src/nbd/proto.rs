//! NBD wire codec: constants, and encoding/decoding of every message this server exchanges.
//! Pure functions over byte slices and [`BufMut`]; no I/O, no async, no allocation beyond the
//! decoded values themselves.
//!
//! Invariants:
//! - Decoders never panic on any input: every length is checked before it is used, and all
//!   arithmetic on lengths read from the wire is checked.
//! - Every encoder has a decoder (even for messages only a client decodes), so proptests can
//!   check round trips and the test clients do not need a second codec.
//! - Values are big-endian (network order), as the spec requires.
//!
//! Numbers come from the protocol document (`doc/proto.md` in NetworkBlockDevice/nbd),
//! including its extended headers (`NBD_OPT_EXTENDED_HEADERS`): 32-byte requests with 64-bit
//! lengths and 32-byte reply chunks that echo the request's offset, and
//! `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`. Reply encoders take a [`ReplyTo`], which says which of
//! the two chunk headers a connection uses.

use bytes::{Buf, BufMut};

// ---- magics -------------------------------------------------------------------------------

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second greeting magic, and the prefix of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Request magic once extended headers are negotiated (32-byte header, 64-bit length).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Reply chunk magic once extended headers are negotiated (32-byte header).
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---- handshake flags ----------------------------------------------------------------------

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Client flags this server understands; any other bit means the connection is dropped.
pub const CLIENT_FLAGS_KNOWN: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
/// Zero padding after an `NBD_OPT_EXPORT_NAME` reply unless NO_ZEROES was negotiated.
pub const EXPORT_NAME_PADDING_BYTES: usize = 124;

// ---- transmission flags -------------------------------------------------------------------

pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;
/// BLOCK_STATUS may carry a payload naming which negotiated contexts to answer for
/// (extended headers only).
pub const TFLAG_BLOCK_STAT_PAYLOAD: u16 = 1 << 12;

// ---- options ------------------------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---- option replies -----------------------------------------------------------------------

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

/// True for option reply types that are errors (bit 31 set).
pub fn is_reply_error(reply_type: u32) -> bool {
    reply_type & REP_ERR != 0
}

// ---- info types (NBD_OPT_INFO / NBD_OPT_GO) ---------------------------------------------------

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---- commands -----------------------------------------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers only: the length field is the payload's length (WRITE always has one;
/// BLOCK_STATUS only where `NBD_FLAG_BLOCK_STAT_PAYLOAD` was advertised).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// The commands this server implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
}

impl Command {
    pub fn from_u16(value: u16) -> Option<Self> {
        Some(match value {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            _ => return None,
        })
    }

    pub fn to_u16(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
        }
    }

    /// Command flags the spec documents for this command. FUA is valid on every command
    /// once SEND_FUA is advertised (clients are known to set it everywhere).
    pub fn flags_allowed(self) -> u16 {
        match self {
            Command::Read => CMD_FLAG_FUA | CMD_FLAG_DF,
            Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Command::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            Command::Write | Command::Disc | Command::Flush | Command::Trim | Command::Cache => {
                CMD_FLAG_FUA
            }
        }
    }
}

// ---- block status payloads ----------------------------------------------------------------

/// A BLOCK_STATUS payload (`NBD_CMD_FLAG_PAYLOAD_LEN`, offered through
/// `NBD_FLAG_BLOCK_STAT_PAYLOAD`): the request's length field is the payload's, and the
/// payload carries the length the query covers and the contexts to answer for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockStatusFilter {
    /// Bytes from the request's offset the query covers (the "effect length").
    pub effect_length: u64,
    /// Context ids to answer for: each one negotiated, none twice, at least one.
    pub ids: Vec<u32>,
}

/// Longest BLOCK_STATUS payload a client can legally send with `negotiated` contexts
/// selected (each id at most once). A longer one is refused unread, so a client cannot
/// make the server buffer more than this.
pub fn block_status_payload_max(negotiated: usize) -> u64 {
    8 + 4 * negotiated as u64
}

/// Decode a BLOCK_STATUS payload: a 64-bit effect length, then one or more 32-bit context
/// ids, all big-endian. Every id must be one of `negotiated` and appear once; the error
/// is the reason to send back with `NBD_EINVAL`.
pub fn decode_block_status_payload(
    payload: &[u8],
    negotiated: &[u32],
) -> Result<BlockStatusFilter, &'static str> {
    if payload.len() < 12 || !(payload.len() - 8).is_multiple_of(4) {
        return Err("block status payload must be an 8-byte length and 4-byte context ids");
    }
    if payload.len() as u64 > block_status_payload_max(negotiated.len()) {
        return Err("block status payload names more contexts than were negotiated");
    }
    let (length, rest) = payload.split_at(8);
    let mut be = [0u8; 8];
    be.copy_from_slice(length);
    let effect_length = u64::from_be_bytes(be);
    let mut ids = Vec::with_capacity(rest.len() / 4);
    for raw in rest.chunks_exact(4) {
        let id = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        if !negotiated.contains(&id) {
            return Err("block status payload names a context that was not negotiated");
        }
        if ids.contains(&id) {
            return Err("block status payload names a context twice");
        }
        ids.push(id);
    }
    Ok(BlockStatusFilter { effect_length, ids })
}

// ---- structured replies -------------------------------------------------------------------

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// BLOCK_STATUS with 64-bit lengths and flags: the only form allowed with extended headers.
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// True for structured reply types in the error category (bit 15 set).
pub fn is_error_chunk(reply_type: u16) -> bool {
    reply_type & (1 << 15) != 0
}

// ---- sizes ----------------------------------------------------------------------------------

/// Bytes in the server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_BYTES: usize = 18;
/// Bytes in an option request header: IHAVEOPT, option, length.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Bytes in an option reply header: magic, option, reply type, length.
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Bytes in a (compact) transmission request header.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Bytes in an extended transmission request header.
pub const EXTENDED_REQUEST_HEADER_BYTES: usize = 32;
pub const SIMPLE_REPLY_BYTES: usize = 16;
pub const CHUNK_HEADER_BYTES: usize = 20;
/// Bytes in an extended reply chunk header.
pub const EXTENDED_CHUNK_HEADER_BYTES: usize = 32;
/// The spec's limit on any string (export names, error messages, context names).
pub const STRING_BYTES_MAX: usize = 4096;
/// Context id this server assigns to `base:allocation` in NBD_OPT_SET_META_CONTEXT.
pub const BASE_ALLOCATION_ID: u32 = 1;
pub const BASE_ALLOCATION: &str = "base:allocation";

/// A malformed message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad magic: expected {expected:#x}, got {got:#x}")]
    BadMagic { expected: u64, got: u64 },
    #[error("truncated {what}: need {needed} bytes, have {got}")]
    Truncated {
        what: &'static str,
        needed: usize,
        got: usize,
    },
    #[error("{what} has {extra} trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("string of {len} bytes exceeds the {max}-byte limit")]
    StringTooLong { len: usize, max: usize },
    #[error("string is not valid utf-8")]
    InvalidUtf8,
    #[error("string contains a nul byte")]
    ContainsNul,
    #[error("{what}: {detail}")]
    Invalid {
        what: &'static str,
        detail: &'static str,
    },
}

/// A cursor over a byte slice whose reads fail instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Self { bytes, what }
    }
    fn need(&self, n: usize) -> Result<(), ProtocolError> {
        if self.bytes.len() < n {
            return Err(ProtocolError::Truncated {
                what: self.what,
                needed: n,
                got: self.bytes.len(),
            });
        }
        Ok(())
    }
    fn u16(&mut self) -> Result<u16, ProtocolError> {
        self.need(2)?;
        Ok(self.bytes.get_u16())
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        self.need(4)?;
        Ok(self.bytes.get_u32())
    }
    fn u64(&mut self) -> Result<u64, ProtocolError> {
        self.need(8)?;
        Ok(self.bytes.get_u64())
    }
    /// A 32-bit magic that must be `expected`.
    fn magic_u32(&mut self, expected: u32) -> Result<(), ProtocolError> {
        let got = self.u32()?;
        if got != expected {
            return Err(ProtocolError::BadMagic {
                expected: expected.into(),
                got: got.into(),
            });
        }
        Ok(())
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        self.need(n)?;
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }
    /// A string whose length is a u32 prefix.
    fn string_u32(&mut self) -> Result<String, ProtocolError> {
        let len = self.u32()? as usize;
        if len > STRING_BYTES_MAX {
            return Err(ProtocolError::StringTooLong {
                len,
                max: STRING_BYTES_MAX,
            });
        }
        parse_string(self.take(len)?)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
    fn finish(self) -> Result<(), ProtocolError> {
        if !self.bytes.is_empty() {
            return Err(ProtocolError::TrailingBytes {
                what: self.what,
                extra: self.bytes.len(),
            });
        }
        Ok(())
    }
}

/// Validate a protocol string: UTF-8, no NUL, at most [`STRING_BYTES_MAX`] bytes.
pub fn parse_string(bytes: &[u8]) -> Result<String, ProtocolError> {
    if bytes.len() > STRING_BYTES_MAX {
        return Err(ProtocolError::StringTooLong {
            len: bytes.len(),
            max: STRING_BYTES_MAX,
        });
    }
    if bytes.contains(&0) {
        return Err(ProtocolError::ContainsNul);
    }
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| ProtocolError::InvalidUtf8)
}

/// Clip a message to the spec's string limit on a character boundary.
pub fn clip_message(message: &str) -> &str {
    if message.len() <= STRING_BYTES_MAX {
        return message;
    }
    let mut end = STRING_BYTES_MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

// ---- handshake ------------------------------------------------------------------------------

pub fn encode_greeting(buf: &mut impl BufMut, handshake_flags: u16) {
    buf.put_u64(NBD_MAGIC);
    buf.put_u64(IHAVEOPT);
    buf.put_u16(handshake_flags);
}

/// Returns the handshake flags.
pub fn decode_greeting(bytes: &[u8]) -> Result<u16, ProtocolError> {
    let mut r = Reader::new(bytes, "greeting");
    expect_magic(r.u64()?, NBD_MAGIC)?;
    expect_magic(r.u64()?, IHAVEOPT)?;
    let flags = r.u16()?;
    r.finish()?;
    Ok(flags)
}

fn expect_magic(got: u64, expected: u64) -> Result<(), ProtocolError> {
    if got != expected {
        return Err(ProtocolError::BadMagic { expected, got });
    }
    Ok(())
}

/// An option request header; `length` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u64(IHAVEOPT);
        buf.put_u32(self.option);
        buf.put_u32(self.length);
    }

    pub fn decode(bytes: &[u8; OPTION_HEADER_BYTES]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(bytes, "option header");
        expect_magic(r.u64()?, IHAVEOPT)?;
        Ok(Self {
            option: r.u32()?,
            length: r.u32()?,
        })
    }
}

/// An option reply header; `length` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

impl OptionReplyHeader {
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u64(OPTION_REPLY_MAGIC);
        buf.put_u32(self.option);
        buf.put_u32(self.reply_type);
        buf.put_u32(self.length);
    }

    pub fn decode(bytes: &[u8; OPTION_REPLY_HEADER_BYTES]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(bytes, "option reply header");
        expect_magic(r.u64()?, OPTION_REPLY_MAGIC)?;
        Ok(Self {
            option: r.u32()?,
            reply_type: r.u32()?,
            length: r.u32()?,
        })
    }
}

/// Encode a whole option reply (header and data).
pub fn encode_option_reply(buf: &mut impl BufMut, option: u32, reply_type: u32, data: &[u8]) {
    OptionReplyHeader {
        option,
        reply_type,
        // Option replies we build are small (names ≤ 4096 bytes); saturate rather than wrap.
        length: u32::try_from(data.len()).unwrap_or(u32::MAX),
    }
    .encode(buf);
    buf.put_slice(data);
}

/// `NBD_REP_SERVER` data: u32 name length, name, then an optional description.
pub fn encode_rep_server(buf: &mut impl BufMut, name: &str, description: &str) {
    buf.put_u32(name.len() as u32);
    buf.put_slice(name.as_bytes());
    buf.put_slice(description.as_bytes());
}

/// Returns `(name, description)`.
pub fn decode_rep_server(data: &[u8]) -> Result<(String, String), ProtocolError> {
    let mut r = Reader::new(data, "NBD_REP_SERVER");
    let name = r.string_u32()?;
    let description = parse_string(r.rest())?;
    Ok((name, description))
}

/// `NBD_REP_META_CONTEXT` data: u32 context id, name.
pub fn encode_rep_meta_context(buf: &mut impl BufMut, id: u32, name: &str) {
    buf.put_u32(id);
    buf.put_slice(name.as_bytes());
}

pub fn decode_rep_meta_context(data: &[u8]) -> Result<(u32, String), ProtocolError> {
    let mut r = Reader::new(data, "NBD_REP_META_CONTEXT");
    let id = r.u32()?;
    Ok((id, parse_string(r.rest())?))
}

/// The data of an `NBD_OPT_INFO` / `NBD_OPT_GO` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub info_types: Vec<u16>,
}

impl InfoRequest {
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u32(self.name.len() as u32);
        buf.put_slice(self.name.as_bytes());
        buf.put_u16(self.info_types.len() as u16);
        for t in &self.info_types {
            buf.put_u16(*t);
        }
    }

    pub fn decode(data: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(data, "NBD_OPT_INFO/GO data");
        let name = r.string_u32()?;
        let count = r.u16()? as usize;
        let mut info_types = Vec::with_capacity(count.min(64));
        for _ in 0..count {
            info_types.push(r.u16()?);
        }
        r.finish()?;
        Ok(Self { name, info_types })
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u32(self.export.len() as u32);
        buf.put_slice(self.export.as_bytes());
        buf.put_u32(self.queries.len() as u32);
        for q in &self.queries {
            buf.put_u32(q.len() as u32);
            buf.put_slice(q.as_bytes());
        }
    }

    pub fn decode(data: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(data, "meta context request");
        let export = r.string_u32()?;
        let count = r.u32()?;
        // Each query needs at least its 4-byte length, so a count the data cannot hold is
        // rejected before anything is allocated for it.
        if (count as usize).saturating_mul(4) > r.bytes.len() {
            return Err(ProtocolError::Invalid {
                what: "meta context request",
                detail: "query count exceeds the option data",
            });
        }
        let mut queries = Vec::with_capacity(count as usize);
        for _ in 0..count {
            queries.push(r.string_u32()?);
        }
        r.finish()?;
        Ok(Self { export, queries })
    }
}

/// `NBD_REP_INFO` payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size_bytes: u64,
        transmission_flags: u16,
    },
    Name(String),
    Description(String),
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    /// An info type this codec does not know (clients must ignore these).
    Unknown {
        info_type: u16,
        data: Vec<u8>,
    },
}

impl Info {
    pub fn encode(&self, buf: &mut impl BufMut) {
        match self {
            Info::Export {
                size_bytes,
                transmission_flags,
            } => {
                buf.put_u16(INFO_EXPORT);
                buf.put_u64(*size_bytes);
                buf.put_u16(*transmission_flags);
            }
            Info::Name(name) => {
                buf.put_u16(INFO_NAME);
                buf.put_slice(name.as_bytes());
            }
            Info::Description(text) => {
                buf.put_u16(INFO_DESCRIPTION);
                buf.put_slice(text.as_bytes());
            }
            Info::BlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                buf.put_u16(INFO_BLOCK_SIZE);
                buf.put_u32(*minimum);
                buf.put_u32(*preferred);
                buf.put_u32(*maximum);
            }
            Info::Unknown { info_type, data } => {
                buf.put_u16(*info_type);
                buf.put_slice(data);
            }
        }
    }

    pub fn decode(data: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(data, "NBD_REP_INFO");
        let info_type = r.u16()?;
        let info = match info_type {
            INFO_EXPORT => Info::Export {
                size_bytes: r.u64()?,
                transmission_flags: r.u16()?,
            },
            INFO_NAME => Info::Name(parse_string(r.rest())?),
            INFO_DESCRIPTION => Info::Description(parse_string(r.rest())?),
            INFO_BLOCK_SIZE => Info::BlockSize {
                minimum: r.u32()?,
                preferred: r.u32()?,
                maximum: r.u32()?,
            },
            _ => Info::Unknown {
                info_type,
                data: r.rest().to_vec(),
            },
        };
        r.finish()?;
        Ok(info)
    }
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless NO_ZEROES.
pub fn encode_export_name_reply(
    buf: &mut impl BufMut,
    size_bytes: u64,
    transmission_flags: u16,
    no_zeroes: bool,
) {
    buf.put_u64(size_bytes);
    buf.put_u16(transmission_flags);
    if !no_zeroes {
        buf.put_bytes(0, EXPORT_NAME_PADDING_BYTES);
    }
}

// ---- transmission -------------------------------------------------------------------------

/// A request header, compact (28 bytes, 32-bit length) or extended (32 bytes, 64-bit
/// length). `command` is kept raw so unknown commands can be answered with EINVAL instead
/// of failing the decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl RequestHeader {
    /// The compact form; `length` must fit in 32 bits (it is truncated otherwise).
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u32(REQUEST_MAGIC);
        buf.put_u16(self.flags);
        buf.put_u16(self.command);
        buf.put_u64(self.cookie);
        buf.put_u64(self.offset);
        buf.put_u32(self.length as u32);
    }

    pub fn encode_extended(&self, buf: &mut impl BufMut) {
        buf.put_u32(EXTENDED_REQUEST_MAGIC);
        buf.put_u16(self.flags);
        buf.put_u16(self.command);
        buf.put_u64(self.cookie);
        buf.put_u64(self.offset);
        buf.put_u64(self.length);
    }

    pub fn decode(bytes: &[u8; REQUEST_HEADER_BYTES]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(bytes, "request header");
        r.magic_u32(REQUEST_MAGIC)?;
        Ok(Self {
            flags: r.u16()?,
            command: r.u16()?,
            cookie: r.u64()?,
            offset: r.u64()?,
            length: r.u32()?.into(),
        })
    }

    /// Once extended headers are negotiated every request must be in this form: a compact
    /// magic is a bad magic (the stream cannot be resynchronised).
    pub fn decode_extended(
        bytes: &[u8; EXTENDED_REQUEST_HEADER_BYTES],
    ) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(bytes, "extended request header");
        r.magic_u32(EXTENDED_REQUEST_MAGIC)?;
        Ok(Self {
            flags: r.u16()?,
            command: r.u16()?,
            cookie: r.u64()?,
            offset: r.u64()?,
            length: r.u64()?,
        })
    }
}

/// A simple reply header (`error` 0 = success); READ data may follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub cookie: u64,
}

impl SimpleReply {
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u32(SIMPLE_REPLY_MAGIC);
        buf.put_u32(self.error);
        buf.put_u64(self.cookie);
    }

    pub fn decode(bytes: &[u8; SIMPLE_REPLY_BYTES]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(bytes, "simple reply");
        r.magic_u32(SIMPLE_REPLY_MAGIC)?;
        Ok(Self {
            error: r.u32()?,
            cookie: r.u64()?,
        })
    }
}

/// A structured reply chunk header; `length` payload bytes follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub reply_type: u16,
    pub cookie: u64,
    pub length: u32,
}

impl ChunkHeader {
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u32(STRUCTURED_REPLY_MAGIC);
        buf.put_u16(self.flags);
        buf.put_u16(self.reply_type);
        buf.put_u64(self.cookie);
        buf.put_u32(self.length);
    }

    pub fn decode(bytes: &[u8; CHUNK_HEADER_BYTES]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(bytes, "structured reply header");
        r.magic_u32(STRUCTURED_REPLY_MAGIC)?;
        Ok(Self {
            flags: r.u16()?,
            reply_type: r.u16()?,
            cookie: r.u64()?,
            length: r.u32()?,
        })
    }
}

/// An extended reply chunk header; `length` payload bytes follow it. `offset` echoes the
/// request's offset whatever the chunk's type (its payload says which bytes it is about).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtendedChunkHeader {
    pub flags: u16,
    pub reply_type: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

impl ExtendedChunkHeader {
    pub fn encode(&self, buf: &mut impl BufMut) {
        buf.put_u32(EXTENDED_REPLY_MAGIC);
        buf.put_u16(self.flags);
        buf.put_u16(self.reply_type);
        buf.put_u64(self.cookie);
        buf.put_u64(self.offset);
        buf.put_u64(self.length);
    }

    pub fn decode(bytes: &[u8; EXTENDED_CHUNK_HEADER_BYTES]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(bytes, "extended reply header");
        r.magic_u32(EXTENDED_REPLY_MAGIC)?;
        Ok(Self {
            flags: r.u16()?,
            reply_type: r.u16()?,
            cookie: r.u64()?,
            offset: r.u64()?,
            length: r.u64()?,
        })
    }
}

/// Which request a reply answers, and in which chunk header: compact (structured replies)
/// or extended (which also carries the request's offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    pub cookie: u64,
    /// The request's offset, echoed in extended headers.
    pub offset: u64,
    pub extended: bool,
}

impl ReplyTo {
    pub fn compact(cookie: u64) -> Self {
        Self {
            cookie,
            offset: 0,
            extended: false,
        }
    }

    pub fn extended(cookie: u64, offset: u64) -> Self {
        Self {
            cookie,
            offset,
            extended: true,
        }
    }
}

fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// A chunk header of the connection's form. Compact headers have a 32-bit length; every
/// chunk this server builds is far below that (reads are capped at 32 MiB), and it
/// saturates rather than wraps.
fn put_chunk_header(buf: &mut impl BufMut, to: ReplyTo, flags: u16, reply_type: u16, length: u64) {
    if to.extended {
        ExtendedChunkHeader {
            flags,
            reply_type,
            cookie: to.cookie,
            offset: to.offset,
            length,
        }
        .encode(buf);
    } else {
        ChunkHeader {
            flags,
            reply_type,
            cookie: to.cookie,
            length: u32::try_from(length).unwrap_or(u32::MAX),
        }
        .encode(buf);
    }
}

/// Header and offset of an OFFSET_DATA chunk; the caller writes `data_len` data bytes next.
/// `data_len` must be at least 1 and at most `u32::MAX - 8`.
pub fn encode_offset_data_header(
    buf: &mut impl BufMut,
    to: ReplyTo,
    offset: u64,
    data_len: u32,
    done: bool,
) {
    debug_assert!((1..=u32::MAX - 8).contains(&data_len));
    put_chunk_header(
        buf,
        to,
        done_flag(done),
        REPLY_TYPE_OFFSET_DATA,
        u64::from(data_len) + 8,
    );
    buf.put_u64(offset);
}

/// A complete OFFSET_HOLE chunk; `hole_len` must be nonzero. (Its length stays 32 bits
/// with extended headers too: a read is never longer than the maximum payload.)
pub fn encode_offset_hole(
    buf: &mut impl BufMut,
    to: ReplyTo,
    offset: u64,
    hole_len: u32,
    done: bool,
) {
    debug_assert!(hole_len != 0);
    put_chunk_header(buf, to, done_flag(done), REPLY_TYPE_OFFSET_HOLE, 12);
    buf.put_u64(offset);
    buf.put_u32(hole_len);
}

/// A complete block status chunk for one context; `extents` (length, flags) must be
/// nonempty. With extended headers it is a BLOCK_STATUS_EXT chunk (64-bit descriptors and
/// a descriptor count), the only form the spec allows there.
pub fn encode_block_status(
    buf: &mut impl BufMut,
    to: ReplyTo,
    context_id: u32,
    extents: &[(u32, u32)],
    done: bool,
) {
    debug_assert!(!extents.is_empty());
    let n = extents.len() as u64;
    if to.extended {
        put_chunk_header(
            buf,
            to,
            done_flag(done),
            REPLY_TYPE_BLOCK_STATUS_EXT,
            8 + 16 * n,
        );
        buf.put_u32(context_id);
        buf.put_u32(u32::try_from(extents.len()).unwrap_or(u32::MAX));
        for (len, flags) in extents {
            buf.put_u64(u64::from(*len));
            buf.put_u64(u64::from(*flags));
        }
    } else {
        put_chunk_header(buf, to, done_flag(done), REPLY_TYPE_BLOCK_STATUS, 4 + 8 * n);
        buf.put_u32(context_id);
        for (len, flags) in extents {
            buf.put_u32(*len);
            buf.put_u32(*flags);
        }
    }
}

/// A complete ERROR chunk (always final here: this server sends one error per reply).
/// The message is clipped to the spec's 4096-byte limit.
pub fn encode_error_chunk(buf: &mut impl BufMut, to: ReplyTo, error: u32, message: &str) {
    debug_assert!(error != 0);
    let message = clip_message(message);
    put_chunk_header(
        buf,
        to,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + message.len() as u64,
    );
    buf.put_u32(error);
    buf.put_u16(message.len() as u16);
    buf.put_slice(message.as_bytes());
}

/// A NONE chunk, which always carries DONE.
pub fn encode_none_chunk(buf: &mut impl BufMut, to: ReplyTo) {
    put_chunk_header(buf, to, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
}

/// A decoded structured reply chunk payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkPayload {
    None,
    OffsetData {
        offset: u64,
        data: Vec<u8>,
    },
    OffsetHole {
        offset: u64,
        length: u32,
    },
    BlockStatus {
        context_id: u32,
        extents: Vec<(u32, u32)>,
    },
    BlockStatusExt {
        context_id: u32,
        extents: Vec<(u64, u64)>,
    },
    Error {
        error: u32,
        message: String,
    },
    ErrorOffset {
        error: u32,
        message: String,
        offset: u64,
    },
}

impl ChunkPayload {
    /// Decode the payload of a chunk of `reply_type`, checking the spec's length rules.
    pub fn decode(reply_type: u16, payload: &[u8]) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(payload, "structured reply payload");
        let decoded = match reply_type {
            REPLY_TYPE_NONE => ChunkPayload::None,
            REPLY_TYPE_OFFSET_DATA => {
                let offset = r.u64()?;
                let data = r.rest();
                if data.is_empty() {
                    return Err(ProtocolError::Invalid {
                        what: "OFFSET_DATA",
                        detail: "no data bytes",
                    });
                }
                ChunkPayload::OffsetData {
                    offset,
                    data: data.to_vec(),
                }
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let offset = r.u64()?;
                let length = r.u32()?;
                if length == 0 {
                    return Err(ProtocolError::Invalid {
                        what: "OFFSET_HOLE",
                        detail: "zero-length hole",
                    });
                }
                ChunkPayload::OffsetHole { offset, length }
            }
            REPLY_TYPE_BLOCK_STATUS => {
                let context_id = r.u32()?;
                if r.bytes.is_empty() || !r.bytes.len().is_multiple_of(8) {
                    return Err(ProtocolError::Invalid {
                        what: "BLOCK_STATUS",
                        detail: "descriptor bytes not a positive multiple of 8",
                    });
                }
                let mut extents = Vec::with_capacity(r.bytes.len() / 8);
                while !r.bytes.is_empty() {
                    extents.push((r.u32()?, r.u32()?));
                }
                ChunkPayload::BlockStatus {
                    context_id,
                    extents,
                }
            }
            REPLY_TYPE_BLOCK_STATUS_EXT => {
                let context_id = r.u32()?;
                let count = r.u32()? as usize;
                if count == 0 || r.bytes.len() != count.saturating_mul(16) {
                    return Err(ProtocolError::Invalid {
                        what: "BLOCK_STATUS_EXT",
                        detail: "descriptor count zero or not matching the length",
                    });
                }
                let mut extents = Vec::with_capacity(count);
                while !r.bytes.is_empty() {
                    extents.push((r.u64()?, r.u64()?));
                }
                ChunkPayload::BlockStatusExt {
                    context_id,
                    extents,
                }
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                let error = r.u32()?;
                let message_len = r.u16()? as usize;
                let message = parse_string(r.take(message_len)?)?;
                if reply_type == REPLY_TYPE_ERROR {
                    ChunkPayload::Error { error, message }
                } else {
                    ChunkPayload::ErrorOffset {
                        error,
                        message,
                        offset: r.u64()?,
                    }
                }
            }
            _ => {
                return Err(ProtocolError::Invalid {
                    what: "structured reply",
                    detail: "unknown reply type",
                })
            }
        };
        r.finish()?;
        Ok(decoded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn golden_request_header() {
        let header = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 512,
        };
        let mut buf = Vec::new();
        header.encode(&mut buf);
        assert_eq!(
            buf,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 2, 0
            ]
        );
    }

    #[test]
    fn block_status_payloads_name_negotiated_contexts_once() {
        let payload = |length: u64, ids: &[u32]| {
            let mut p = length.to_be_bytes().to_vec();
            for id in ids {
                p.extend_from_slice(&id.to_be_bytes());
            }
            p
        };
        let ours = [BASE_ALLOCATION_ID];
        assert_eq!(
            decode_block_status_payload(&payload(1 << 20, &[1]), &ours),
            Ok(BlockStatusFilter {
                effect_length: 1 << 20,
                ids: vec![1]
            })
        );
        // Golden bytes: effect length 0x0102030405060708, context 1.
        assert_eq!(
            decode_block_status_payload(&[1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 1], &ours)
                .map(|f| f.effect_length),
            Ok(0x0102_0304_0506_0708)
        );
        // A zero effect length decodes; the request is then refused like any zero-length
        // block status.
        assert!(decode_block_status_payload(&payload(0, &[1]), &ours).is_ok());
        assert_eq!(
            decode_block_status_payload(&payload(4096, &[3, 1]), &[1, 3]).map(|f| f.ids),
            Ok(vec![3, 1])
        );
        for bad in [
            payload(4096, &[]),                      // no context
            payload(4096, &[1])[..11].to_vec(),      // a torn id
            [payload(4096, &[1]), vec![0]].concat(), // a stray byte
            payload(4096, &[2]),                     // never negotiated
            payload(4096, &[0]),                     // 0 is never an id
            payload(4096, &[1, 1]),                  // more than negotiated
            vec![],
        ] {
            assert!(decode_block_status_payload(&bad, &ours).is_err(), "{bad:?}");
        }
        assert_eq!(
            decode_block_status_payload(&payload(4096, &[3, 3]), &[1, 3]),
            Err("block status payload names a context twice")
        );
        assert_eq!(block_status_payload_max(1), 12);
    }

    #[test]
    fn golden_extended_request_header_and_reply_chunk() {
        let header = RequestHeader {
            flags: CMD_FLAG_FUA,
            command: CMD_TRIM,
            cookie: 0x0102_0304_0506_0708,
            offset: 4096,
            length: 5 << 30,
        };
        let mut buf = Vec::new();
        header.encode_extended(&mut buf);
        assert_eq!(
            buf,
            [
                0x21, 0xe4, 0x1c, 0x71, 0, 1, 0, 4, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 0, 1, 0x40, 0, 0, 0
            ]
        );
        assert_eq!(
            RequestHeader::decode_extended(buf[..].try_into().unwrap()).unwrap(),
            header
        );
        // A compact request where an extended one is due cannot be parsed.
        let mut compact = Vec::new();
        RequestHeader {
            length: 512,
            ..header
        }
        .encode(&mut compact);
        compact.extend_from_slice(&[0; 4]);
        assert!(RequestHeader::decode_extended(compact[..].try_into().unwrap()).is_err());
        let mut buf = Vec::new();
        encode_none_chunk(&mut buf, ReplyTo::extended(9, 4096));
        assert_eq!(
            buf,
            [
                0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 0, 0, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn golden_greeting_and_export_name_reply() {
        let mut buf = Vec::new();
        encode_greeting(&mut buf, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&buf[..8], b"NBDMAGIC");
        assert_eq!(&buf[8..16], b"IHAVEOPT");
        assert_eq!(&buf[16..], [0, 3]);
        let mut reply = Vec::new();
        encode_export_name_reply(&mut reply, 1 << 20, TFLAG_HAS_FLAGS, false);
        assert_eq!(reply.len(), 8 + 2 + 124);
        let mut reply = Vec::new();
        encode_export_name_reply(&mut reply, 1 << 20, TFLAG_HAS_FLAGS, true);
        assert_eq!(reply.len(), 10);
    }

    #[test]
    fn error_message_is_clipped_on_char_boundary() {
        let long = "é".repeat(3000); // 6000 bytes
        let clipped = clip_message(&long);
        assert!(clipped.len() <= STRING_BYTES_MAX);
        assert!(clipped.len() >= STRING_BYTES_MAX - 1);
        let mut buf = Vec::new();
        encode_error_chunk(&mut buf, ReplyTo::compact(1), 22, &long);
        let header = ChunkHeader::decode(buf[..20].try_into().unwrap()).unwrap();
        assert_eq!(header.length as usize, buf.len() - 20);
        let payload = ChunkPayload::decode(header.reply_type, &buf[20..]).unwrap();
        assert!(matches!(payload, ChunkPayload::Error { error: 22, .. }));
    }

    #[test]
    fn meta_context_count_larger_than_data_is_rejected() {
        let mut buf = Vec::new();
        buf.put_u32(0);
        buf.put_u32(u32::MAX);
        assert!(MetaContextRequest::decode(&buf).is_err());
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9:/._ é-]{0,40}"
    }

    proptest! {
        #[test]
        fn request_header_round_trip(flags: u16, command: u16, cookie: u64, offset: u64, length: u32, long: u64) {
            let h = RequestHeader { flags, command, cookie, offset, length: length.into() };
            let mut buf = Vec::new();
            h.encode(&mut buf);
            prop_assert_eq!(buf.len(), REQUEST_HEADER_BYTES);
            prop_assert_eq!(RequestHeader::decode(buf[..].try_into().unwrap()).unwrap(), h);
            let h = RequestHeader { length: long, ..h };
            let mut buf = Vec::new();
            h.encode_extended(&mut buf);
            prop_assert_eq!(buf.len(), EXTENDED_REQUEST_HEADER_BYTES);
            prop_assert_eq!(RequestHeader::decode_extended(buf[..].try_into().unwrap()).unwrap(), h);
        }

        #[test]
        fn option_headers_round_trip(option: u32, reply_type: u32, length: u32) {
            let h = OptionHeader { option, length };
            let mut buf = Vec::new();
            h.encode(&mut buf);
            prop_assert_eq!(OptionHeader::decode(buf[..].try_into().unwrap()).unwrap(), h);
            let r = OptionReplyHeader { option, reply_type, length };
            let mut buf = Vec::new();
            r.encode(&mut buf);
            prop_assert_eq!(OptionReplyHeader::decode(buf[..].try_into().unwrap()).unwrap(), r);
        }

        #[test]
        fn simple_reply_round_trip(error: u32, cookie: u64) {
            let s = SimpleReply { error, cookie };
            let mut buf = Vec::new();
            s.encode(&mut buf);
            prop_assert_eq!(SimpleReply::decode(buf[..].try_into().unwrap()).unwrap(), s);
        }

        #[test]
        fn info_request_round_trip(name in name(), info_types in proptest::collection::vec(any::<u16>(), 0..8)) {
            let req = InfoRequest { name, info_types };
            let mut buf = Vec::new();
            req.encode(&mut buf);
            prop_assert_eq!(InfoRequest::decode(&buf).unwrap(), req);
        }

        #[test]
        fn meta_context_request_round_trip(export in name(), queries in proptest::collection::vec(name(), 0..6)) {
            let req = MetaContextRequest { export, queries };
            let mut buf = Vec::new();
            req.encode(&mut buf);
            prop_assert_eq!(MetaContextRequest::decode(&buf).unwrap(), req);
        }

        #[test]
        fn info_round_trip(size: u64, tflags: u16, text in name(), min: u32, pref: u32, max: u32) {
            for info in [
                Info::Export { size_bytes: size, transmission_flags: tflags },
                Info::Name(text.clone()),
                Info::Description(text.clone()),
                Info::BlockSize { minimum: min, preferred: pref, maximum: max },
                Info::Unknown { info_type: 99, data: text.as_bytes().to_vec() },
            ] {
                let mut buf = Vec::new();
                info.encode(&mut buf);
                prop_assert_eq!(Info::decode(&buf).unwrap(), info);
            }
        }

        #[test]
        fn rep_server_and_meta_context_round_trip(n in name(), d in name(), id: u32) {
            let mut buf = Vec::new();
            encode_rep_server(&mut buf, &n, &d);
            prop_assert_eq!(decode_rep_server(&buf).unwrap(), (n.clone(), d));
            let mut buf = Vec::new();
            encode_rep_meta_context(&mut buf, id, &n);
            prop_assert_eq!(decode_rep_meta_context(&buf).unwrap(), (id, n));
        }

        #[test]
        fn chunks_round_trip(
            cookie: u64,
            offset: u64,
            data in proptest::collection::vec(any::<u8>(), 1..64),
            hole in 1u32..,
            extents in proptest::collection::vec((1u32.., any::<u32>()), 1..8),
            error in 1u32..,
            message in name(),
            done: bool,
        ) {
            for extended in [false, true] {
                let to = ReplyTo { cookie, offset: offset ^ 1, extended };
                let decode = |buf: &[u8]| {
                    let (flags, reply_type, body) = if extended {
                        let n = EXTENDED_CHUNK_HEADER_BYTES;
                        let h = ExtendedChunkHeader::decode(buf[..n].try_into().unwrap()).unwrap();
                        assert_eq!(h.length as usize, buf.len() - n);
                        assert_eq!((h.cookie, h.offset), (cookie, offset ^ 1));
                        (h.flags, h.reply_type, &buf[n..])
                    } else {
                        let n = CHUNK_HEADER_BYTES;
                        let h = ChunkHeader::decode(buf[..n].try_into().unwrap()).unwrap();
                        assert_eq!(h.length as usize, buf.len() - n);
                        assert_eq!(h.cookie, cookie);
                        (h.flags, h.reply_type, &buf[n..])
                    };
                    (flags, ChunkPayload::decode(reply_type, body).unwrap())
                };
                let mut buf = Vec::new();
                encode_offset_data_header(&mut buf, to, offset, data.len() as u32, done);
                buf.extend_from_slice(&data);
                prop_assert_eq!(decode(&buf), (done_flag(done), ChunkPayload::OffsetData { offset, data: data.clone() }));
                let mut buf = Vec::new();
                encode_offset_hole(&mut buf, to, offset, hole, done);
                prop_assert_eq!(decode(&buf), (done_flag(done), ChunkPayload::OffsetHole { offset, length: hole }));
                let mut buf = Vec::new();
                encode_block_status(&mut buf, to, 7, &extents, done);
                let status = if extended {
                    let wide = extents.iter().map(|&(l, f)| (u64::from(l), u64::from(f))).collect();
                    ChunkPayload::BlockStatusExt { context_id: 7, extents: wide }
                } else {
                    ChunkPayload::BlockStatus { context_id: 7, extents: extents.clone() }
                };
                prop_assert_eq!(decode(&buf), (done_flag(done), status));
                let mut buf = Vec::new();
                encode_error_chunk(&mut buf, to, error, &message);
                prop_assert_eq!(decode(&buf), (REPLY_FLAG_DONE, ChunkPayload::Error { error, message: message.clone() }));
                let mut buf = Vec::new();
                encode_none_chunk(&mut buf, to);
                prop_assert_eq!(decode(&buf), (REPLY_FLAG_DONE, ChunkPayload::None));
            }
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), t: u16) {
            let _ = InfoRequest::decode(&bytes);
            let _ = MetaContextRequest::decode(&bytes);
            let _ = Info::decode(&bytes);
            let _ = decode_rep_server(&bytes);
            let _ = decode_rep_meta_context(&bytes);
            let _ = decode_greeting(&bytes);
            let _ = parse_string(&bytes);
            let _ = ChunkPayload::decode(t, &bytes);
            let _ = decode_block_status_payload(&bytes, &[BASE_ALLOCATION_ID, 2, 3]);
            for reply_type in [REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE,
                               REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_BLOCK_STATUS_EXT, REPLY_TYPE_ERROR,
                               REPLY_TYPE_ERROR_OFFSET] {
                let _ = ChunkPayload::decode(reply_type, &bytes);
            }
            let mut fixed = [0u8; 32];
            let n = bytes.len().min(32);
            fixed[..n].copy_from_slice(&bytes[..n]);
            let _ = RequestHeader::decode_extended(&fixed);
            let _ = ExtendedChunkHeader::decode(&fixed);
            let _ = RequestHeader::decode(fixed[..28].try_into().unwrap());
            let _ = OptionHeader::decode(fixed[..16].try_into().unwrap());
            let _ = OptionReplyHeader::decode(fixed[..20].try_into().unwrap());
            let _ = SimpleReply::decode(fixed[..16].try_into().unwrap());
            let _ = ChunkHeader::decode(fixed[..20].try_into().unwrap());
        }

        #[test]
        fn valid_magic_prefixed_bytes_decode_without_panic(rest in proptest::collection::vec(any::<u8>(), 24)) {
            let mut fixed = [0u8; 28];
            fixed[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            fixed[4..].copy_from_slice(&rest);
            prop_assert!(RequestHeader::decode(&fixed).is_ok());
            let mut wide = [0u8; 32];
            wide[..4].copy_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
            wide[4..28].copy_from_slice(&rest);
            prop_assert!(RequestHeader::decode_extended(&wide).is_ok());
        }
    }
}
