//! [`Text`]: a UTF-8 string that shares the buffer it was decoded from.

use std::fmt;

use bytes::Bytes;

/// A validated UTF-8 string backed by [`Bytes`].
///
/// Decoded text is a slice of the frame's buffer (no copy, no allocation). Built from a
/// `&'static str` it borrows; built from a `String` it takes the allocation over.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Text(Bytes);

impl Text {
    /// The empty string.
    pub const fn new() -> Text {
        Text(Bytes::new())
    }

    /// Text from a static string, without copying.
    pub const fn from_static(value: &'static str) -> Text {
        Text(Bytes::from_static(value.as_bytes()))
    }

    /// Checks `bytes` are UTF-8 and wraps them.
    pub fn from_utf8(bytes: Bytes) -> Result<Text, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Text(bytes))
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor checks (or is given) valid UTF-8 and the bytes never change.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    /// The bytes, shared.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for Text {
    fn from(value: &str) -> Text {
        Text(Bytes::copy_from_slice(value.as_bytes()))
    }
}

impl From<String> for Text {
    fn from(value: String) -> Text {
        Text(Bytes::from(value))
    }
}

impl std::ops::Deref for Text {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Text {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
