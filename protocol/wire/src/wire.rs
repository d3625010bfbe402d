//! Field codecs: how each kind of field is laid out, bounded and checked.
//!
//! A frame body is a sequence of fields; each field's type and limit is named once in
//! `frame.rs` through one of these codecs, so the decoder, the encoder, the length
//! computation and the encode-side checks cannot disagree.

use bytes::{Buf, BufMut, Bytes};

use crate::error::{DecodeError, EncodeError};
use crate::limits::{ID_BYTES_MAX, MESSAGE_BYTES_MAX, SKILLS_MAX, TOKEN_BYTES_MAX};
use crate::text::Text;

/// Reads fields out of one frame body. Every read checks the bytes are there first.
pub(crate) struct Reader {
    body: Bytes,
}

impl Reader {
    pub(crate) fn new(body: Bytes) -> Reader {
        Reader { body }
    }

    fn need(&self, len: usize, field: &'static str) -> Result<(), DecodeError> {
        if self.body.remaining() < len {
            return Err(DecodeError::Truncated { field });
        }
        Ok(())
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.body.len() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { count }),
        }
    }

    fn take(&mut self, len: usize, field: &'static str) -> Result<Bytes, DecodeError> {
        self.need(len, field)?;
        Ok(self.body.split_to(len))
    }
}

/// Reads fields out of one frame body borrowed as a slice: what [`Reader`] does, with the
/// same checks and the same errors, but the fields borrow the body (no reference counts).
pub(crate) struct SliceReader<'a> {
    body: &'a [u8],
}

impl<'a> SliceReader<'a> {
    pub(crate) fn new(body: &'a [u8]) -> SliceReader<'a> {
        SliceReader { body }
    }

    fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.body.len() < len {
            return Err(DecodeError::Truncated { field });
        }
        let (taken, rest) = self.body.split_at(len);
        self.body = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(N, field)?;
        let mut out = [0; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.array(field).map(u64::from_le_bytes)
    }

    pub(crate) fn u128(&mut self, field: &'static str) -> Result<u128, DecodeError> {
        self.array(field).map(u128::from_le_bytes)
    }

    /// An [`Id`]: u8 length, then UTF-8, at most [`ID_BYTES_MAX`] bytes.
    pub(crate) fn id(&mut self, field: &'static str) -> Result<&'a str, DecodeError> {
        let [len] = self.array::<1>(field)?;
        let len = usize::from(len);
        if len > ID_BYTES_MAX {
            return Err(DecodeError::FieldTooLong { field, len, max: ID_BYTES_MAX });
        }
        std::str::from_utf8(self.take(len, field)?).map_err(|_| DecodeError::InvalidUtf8 { field })
    }

    /// A [`Payload`]: u32 length, then the bytes.
    pub(crate) fn payload(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = u32::from_le_bytes(self.array(field)?) as usize;
        self.take(len, field)
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.body.len() {
            0 => Ok(()),
            count => Err(DecodeError::TrailingBytes { count }),
        }
    }
}

/// One field layout.
pub(crate) trait Codec<T> {
    fn len(value: &T) -> usize;
    fn check(value: &T, field: &'static str) -> Result<(), EncodeError>;
    fn put(value: &T, dst: &mut impl BufMut);
    fn get(src: &mut Reader, field: &'static str) -> Result<T, DecodeError>;
}

macro_rules! int_codec {
    ($codec:ident, $ty:ty, $bytes:literal, $put:ident, $get:ident) => {
        pub(crate) struct $codec;
        impl Codec<$ty> for $codec {
            fn len(_: &$ty) -> usize {
                $bytes
            }
            fn check(_: &$ty, _: &'static str) -> Result<(), EncodeError> {
                Ok(())
            }
            fn put(value: &$ty, dst: &mut impl BufMut) {
                dst.$put(*value);
            }
            fn get(src: &mut Reader, field: &'static str) -> Result<$ty, DecodeError> {
                src.need($bytes, field)?;
                Ok(src.body.$get())
            }
        }
    };
}

int_codec!(U8, u8, 1, put_u8, get_u8);
int_codec!(U16, u16, 2, put_u16_le, get_u16_le);
int_codec!(U32, u32, 4, put_u32_le, get_u32_le);
int_codec!(U64, u64, 8, put_u64_le, get_u64_le);
int_codec!(U128, u128, 16, put_u128_le, get_u128_le);

/// A boolean as one byte, 0 or 1; anything else is invalid.
pub(crate) struct Bool;
impl Codec<bool> for Bool {
    fn len(_: &bool) -> usize {
        1
    }
    fn check(_: &bool, _: &'static str) -> Result<(), EncodeError> {
        Ok(())
    }
    fn put(value: &bool, dst: &mut impl BufMut) {
        dst.put_u8(u8::from(*value));
    }
    fn get(src: &mut Reader, field: &'static str) -> Result<bool, DecodeError> {
        match U8::get(src, field)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::InvalidValue { field, value: u64::from(other) }),
        }
    }
}

pub(crate) fn check_len(len: usize, max: usize, field: &'static str) -> Result<(), EncodeError> {
    if len > max {
        return Err(EncodeError { field, len, max });
    }
    Ok(())
}

fn get_text(src: &mut Reader, len: usize, max: usize, field: &'static str) -> Result<Text, DecodeError> {
    if len > max {
        return Err(DecodeError::FieldTooLong { field, len, max });
    }
    let bytes = src.take(len, field)?;
    Text::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 { field })
}

/// An identifier: u8 length, then UTF-8, at most [`ID_BYTES_MAX`] bytes.
pub(crate) struct Id;
impl Codec<Text> for Id {
    fn len(value: &Text) -> usize {
        1 + value.len()
    }
    fn check(value: &Text, field: &'static str) -> Result<(), EncodeError> {
        check_len(value.len(), ID_BYTES_MAX, field)
    }
    fn put(value: &Text, dst: &mut impl BufMut) {
        dst.put_u8(value.len() as u8);
        dst.put_slice(value.as_bytes());
    }
    fn get(src: &mut Reader, field: &'static str) -> Result<Text, DecodeError> {
        let len = usize::from(U8::get(src, field)?);
        get_text(src, len, ID_BYTES_MAX, field)
    }
}

macro_rules! text16_codec {
    ($codec:ident, $max:expr) => {
        /// Text with a u16 length prefix, bounded.
        pub(crate) struct $codec;
        impl Codec<Text> for $codec {
            fn len(value: &Text) -> usize {
                2 + value.len()
            }
            fn check(value: &Text, field: &'static str) -> Result<(), EncodeError> {
                check_len(value.len(), $max, field)
            }
            fn put(value: &Text, dst: &mut impl BufMut) {
                dst.put_u16_le(value.len() as u16);
                dst.put_slice(value.as_bytes());
            }
            fn get(src: &mut Reader, field: &'static str) -> Result<Text, DecodeError> {
                let len = usize::from(U16::get(src, field)?);
                get_text(src, len, $max, field)
            }
        }
    };
}

text16_codec!(Message, MESSAGE_BYTES_MAX);
text16_codec!(Token, TOKEN_BYTES_MAX);

/// Opaque bytes with a u32 length prefix; bounded by the frame body it sits in.
pub(crate) struct Payload;
impl Codec<Bytes> for Payload {
    fn len(value: &Bytes) -> usize {
        4 + value.len()
    }
    fn check(value: &Bytes, field: &'static str) -> Result<(), EncodeError> {
        check_len(value.len(), crate::limits::FRAME_BODY_BYTES_MAX as usize, field)
    }
    fn put(value: &Bytes, dst: &mut impl BufMut) {
        dst.put_u32_le(value.len() as u32);
        dst.put_slice(value);
    }
    fn get(src: &mut Reader, field: &'static str) -> Result<Bytes, DecodeError> {
        let len = U32::get(src, field)? as usize;
        src.take(len, field)
    }
}

/// A list of identifiers: u8 count (at most [`SKILLS_MAX`]), then each as [`Id`].
pub(crate) struct Skills;
impl Codec<Vec<Text>> for Skills {
    fn len(value: &Vec<Text>) -> usize {
        1 + value.iter().map(Id::len).sum::<usize>()
    }
    fn check(value: &Vec<Text>, field: &'static str) -> Result<(), EncodeError> {
        check_len(value.len(), SKILLS_MAX, field)?;
        value.iter().try_for_each(|skill| Id::check(skill, field))
    }
    fn put(value: &Vec<Text>, dst: &mut impl BufMut) {
        dst.put_u8(value.len() as u8);
        for skill in value {
            Id::put(skill, dst);
        }
    }
    fn get(src: &mut Reader, field: &'static str) -> Result<Vec<Text>, DecodeError> {
        let count = usize::from(U8::get(src, field)?);
        if count > SKILLS_MAX {
            return Err(DecodeError::FieldTooLong { field, len: count, max: SKILLS_MAX });
        }
        (0..count).map(|_| Id::get(src, field)).collect()
    }
}

/// A one-byte enumeration.
pub(crate) trait WireEnum: Sized + Copy {
    fn to_u8(self) -> u8;
    fn from_u8(value: u8) -> Option<Self>;
}

/// Codec for any [`WireEnum`].
pub(crate) struct Enum;
impl<T: WireEnum> Codec<T> for Enum {
    fn len(_: &T) -> usize {
        1
    }
    fn check(_: &T, _: &'static str) -> Result<(), EncodeError> {
        Ok(())
    }
    fn put(value: &T, dst: &mut impl BufMut) {
        dst.put_u8(value.to_u8());
    }
    fn get(src: &mut Reader, field: &'static str) -> Result<T, DecodeError> {
        let raw = U8::get(src, field)?;
        T::from_u8(raw).ok_or(DecodeError::InvalidValue { field, value: u64::from(raw) })
    }
}

/// Codec for a nested struct whose fields are laid out in order.
pub(crate) struct Nested;
impl<T: NestedFields> Codec<T> for Nested {
    fn len(value: &T) -> usize {
        value.fields_len()
    }
    fn check(value: &T, _: &'static str) -> Result<(), EncodeError> {
        value.fields_check()
    }
    fn put(value: &T, dst: &mut impl BufMut) {
        value.fields_put(dst);
    }
    fn get(src: &mut Reader, _: &'static str) -> Result<T, DecodeError> {
        T::fields_get(src)
    }
}

/// A struct whose fields are laid out one after the other (frame bodies and nested parts).
pub(crate) trait NestedFields: Sized {
    fn fields_len(&self) -> usize;
    fn fields_check(&self) -> Result<(), EncodeError>;
    fn fields_put(&self, dst: &mut impl BufMut);
    fn fields_get(src: &mut Reader) -> Result<Self, DecodeError>;
}
