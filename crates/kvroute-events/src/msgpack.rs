//! A pull reader over msgpack bytes: just what vLLM's event payloads use (nil, booleans,
//! integers, floats, strings, binaries, arrays, maps; extensions are skipped), bounds-checked
//! at every read, never allocating more than the input can back.

/// Why bytes are not the msgpack expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgpackError {
    /// The input ends inside a value.
    #[error("truncated at byte {0}")]
    Truncated(usize),
    /// A value of another type than expected.
    #[error("expected {expected} at byte {at}, found marker 0x{marker:02x}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// Where.
        at: usize,
        /// The marker byte found.
        marker: u8,
    },
    /// Containers nested deeper than any event needs.
    #[error("nesting deeper than {MAX_DEPTH} at byte {0}")]
    TooDeep(usize),
    /// A string that is not UTF-8.
    #[error("invalid UTF-8 string at byte {0}")]
    Utf8(usize),
}

/// Deepest nesting skipped values may have (events nest 4 deep; extra keys a little more).
const MAX_DEPTH: usize = 32;

/// What the next value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Nil,
    Bool,
    Int,
    Float,
    Str,
    Bin,
    Array,
    Map,
    Ext,
}

/// A cursor over one msgpack document.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn is_at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn byte(&mut self) -> Result<u8, MsgpackError> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(MsgpackError::Truncated(self.pos))?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MsgpackError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or(MsgpackError::Truncated(self.buf.len()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn be(&mut self, n: usize) -> Result<u64, MsgpackError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn unexpected(&self, expected: &'static str) -> MsgpackError {
        MsgpackError::Unexpected {
            expected,
            at: self.pos,
            marker: self.buf.get(self.pos).copied().unwrap_or(0),
        }
    }

    /// The kind of the next value, without consuming it.
    pub(crate) fn peek(&self) -> Result<Kind, MsgpackError> {
        let m = *self
            .buf
            .get(self.pos)
            .ok_or(MsgpackError::Truncated(self.pos))?;
        Ok(match m {
            0x00..=0x7f | 0xe0..=0xff | 0xcc..=0xd3 => Kind::Int,
            0x80..=0x8f | 0xde | 0xdf => Kind::Map,
            0x90..=0x9f | 0xdc | 0xdd => Kind::Array,
            0xa0..=0xbf | 0xd9..=0xdb => Kind::Str,
            0xc0 => Kind::Nil,
            0xc2 | 0xc3 => Kind::Bool,
            0xc4..=0xc6 => Kind::Bin,
            0xca | 0xcb => Kind::Float,
            // 0xc1 is never used; read as an extension it fails when skipped.
            0xc1 | 0xc7..=0xc9 | 0xd4..=0xd8 => Kind::Ext,
        })
    }

    /// Consumes a nil if one is next.
    pub(crate) fn nil(&mut self) -> Result<bool, MsgpackError> {
        if self.peek()? == Kind::Nil {
            self.pos += 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// An integer as its 64 bits: negative values keep their two's-complement bits (old
    /// engines sent signed hashes; their bits are the hash).
    pub(crate) fn int_bits(&mut self) -> Result<u64, MsgpackError> {
        let at = self.pos;
        let m = self.byte()?;
        Ok(match m {
            0x00..=0x7f => u64::from(m),
            0xe0..=0xff => i64::from(m as i8) as u64,
            0xcc => self.be(1)?,
            0xcd => self.be(2)?,
            0xce => self.be(4)?,
            0xcf => self.be(8)?,
            0xd0 => i64::from(self.be(1)? as u8 as i8) as u64,
            0xd1 => i64::from(self.be(2)? as u16 as i16) as u64,
            0xd2 => i64::from(self.be(4)? as u32 as i32) as u64,
            0xd3 => self.be(8)?,
            _ => {
                self.pos = at;
                return Err(self.unexpected("an integer"));
            }
        })
    }

    /// A non-negative integer.
    pub(crate) fn uint(&mut self) -> Result<u64, MsgpackError> {
        let at = self.pos;
        let m = *self.buf.get(at).ok_or(MsgpackError::Truncated(at))?;
        let v = self.int_bits()?;
        let negative = matches!(m, 0xe0..=0xff | 0xd0..=0xd3) && (v as i64) < 0;
        if negative {
            self.pos = at;
            return Err(self.unexpected("a non-negative integer"));
        }
        Ok(v)
    }

    /// A number (float, or an integer read as one).
    pub(crate) fn number(&mut self) -> Result<f64, MsgpackError> {
        match self.peek()? {
            Kind::Float => {
                let m = self.byte()?;
                Ok(if m == 0xca {
                    f64::from(f32::from_bits(self.be(4)? as u32))
                } else {
                    f64::from_bits(self.be(8)?)
                })
            }
            Kind::Int => Ok(self.int_bits()? as i64 as f64),
            _ => Err(self.unexpected("a number")),
        }
    }

    /// The length that follows a string, array or map marker.
    fn len_of(&mut self, what: Kind) -> Result<usize, MsgpackError> {
        let m = self.byte()?;
        let n = match (what, m) {
            (Kind::Str, 0xa0..=0xbf) => u64::from(m & 0x1f),
            (Kind::Str, 0xd9) => self.be(1)?,
            (Kind::Str, 0xda) | (Kind::Array, 0xdc) | (Kind::Map, 0xde) => self.be(2)?,
            (Kind::Str, 0xdb) | (Kind::Array, 0xdd) | (Kind::Map, 0xdf) => self.be(4)?,
            (Kind::Array, 0x90..=0x9f) | (Kind::Map, 0x80..=0x8f) => u64::from(m & 0x0f),
            _ => {
                self.pos -= 1;
                return Err(self.unexpected("a length"));
            }
        };
        usize::try_from(n).map_err(|_| MsgpackError::Truncated(self.buf.len()))
    }

    /// The next string.
    pub(crate) fn str(&mut self) -> Result<&'a str, MsgpackError> {
        if self.peek()? != Kind::Str {
            return Err(self.unexpected("a string"));
        }
        let at = self.pos;
        let n = self.len_of(Kind::Str)?;
        std::str::from_utf8(self.take(n)?).map_err(|_| MsgpackError::Utf8(at))
    }

    /// The next binary.
    pub(crate) fn bin(&mut self) -> Result<&'a [u8], MsgpackError> {
        let n = match self.byte()? {
            0xc4 => self.be(1)?,
            0xc5 => self.be(2)?,
            0xc6 => self.be(4)?,
            _ => {
                self.pos -= 1;
                return Err(self.unexpected("a binary"));
            }
        };
        self.take(n as usize)
    }

    /// The next array's length. Each element takes at least one byte, so a length the rest
    /// of the input cannot hold is refused before anyone allocates for it.
    pub(crate) fn array(&mut self) -> Result<usize, MsgpackError> {
        if self.peek()? != Kind::Array {
            return Err(self.unexpected("an array"));
        }
        let n = self.len_of(Kind::Array)?;
        self.bounded(n)
    }

    /// The next map's length (pairs).
    pub(crate) fn map(&mut self) -> Result<usize, MsgpackError> {
        if self.peek()? != Kind::Map {
            return Err(self.unexpected("a map"));
        }
        let n = self.len_of(Kind::Map)?;
        self.bounded(n.saturating_mul(2)).map(|_| n)
    }

    fn bounded(&self, items: usize) -> Result<usize, MsgpackError> {
        if items > self.buf.len() - self.pos {
            return Err(MsgpackError::Truncated(self.buf.len()));
        }
        Ok(items)
    }

    /// Skips one value of any kind.
    pub(crate) fn skip(&mut self) -> Result<(), MsgpackError> {
        self.skip_at(0)
    }

    fn skip_at(&mut self, depth: usize) -> Result<(), MsgpackError> {
        if depth > MAX_DEPTH {
            return Err(MsgpackError::TooDeep(self.pos));
        }
        match self.peek()? {
            Kind::Nil | Kind::Bool => {
                self.pos += 1;
            }
            Kind::Int => {
                self.int_bits()?;
            }
            Kind::Float => {
                self.number()?;
            }
            Kind::Str => {
                let n = self.len_of(Kind::Str)?;
                self.take(n)?;
            }
            Kind::Bin => {
                self.bin()?;
            }
            Kind::Array => {
                for _ in 0..self.array()? {
                    self.skip_at(depth + 1)?;
                }
            }
            Kind::Map => {
                for _ in 0..self.map()? * 2 {
                    self.skip_at(depth + 1)?;
                }
            }
            Kind::Ext => {
                let m = self.byte()?;
                let n = match m {
                    0xd4 => 1,
                    0xd5 => 2,
                    0xd6 => 4,
                    0xd7 => 8,
                    0xd8 => 16,
                    0xc7 => self.be(1)? as usize,
                    0xc8 => self.be(2)? as usize,
                    0xc9 => self.be(4)? as usize,
                    _ => {
                        self.pos -= 1;
                        return Err(self.unexpected("a value"));
                    }
                };
                // The type byte, then the data.
                self.take(n + 1)?;
            }
        }
        Ok(())
    }
}
