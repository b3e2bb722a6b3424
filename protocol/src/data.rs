//! A message's `data` as it travels between nodes and into frames: compact
//! JSON text, made once where the message is published and never parsed
//! again on the way to a JSON client.
//!
//! The form is serde_json's compact output of a [`Value`]: no whitespace,
//! object keys sorted, numbers as serde_json prints them. It is the form
//! every node (of this version and the earlier ones, which re-encoded the
//! data on every hop) stores in the replay store and puts in the backbone
//! envelope, so a message's frames are byte-identical whichever node and
//! version made them.

use std::fmt;

use bytes::Bytes;
use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::DecodeError;

/// Compact JSON text of one value (module docs). Cloning shares the bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct JsonData(Bytes);

impl JsonData {
    /// The normal form of `value`: what a publish's data becomes, once, on
    /// the node that accepts it.
    pub fn from_value(value: &Value) -> Self {
        // A `Value` always serializes (its map keys are strings).
        Self(
            serde_json::to_vec(value)
                .expect("a JSON value always encodes")
                .into(),
        )
    }

    /// Data read back from the replay store or a backbone envelope, where
    /// a node wrote it in the normal form: checked to be one well-formed
    /// JSON value in UTF-8 (a scan, no tree built), then kept as it is.
    /// Malformed bytes are refused, as before this type, when they were
    /// parsed: the message is then read as missing and repaired by
    /// sequence.
    pub fn from_stored(bytes: impl Into<Bytes>) -> Result<Self, DecodeError> {
        let bytes = bytes.into();
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| DecodeError::Malformed(format!("data is not UTF-8: {e}")))?;
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map_err(|e| DecodeError::Malformed(format!("data is not JSON: {e}")))?;
        Ok(Self(bytes))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        // Checked (or produced) as UTF-8 by both constructors.
        std::str::from_utf8(&self.0).expect("JsonData holds UTF-8")
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Parses it back into a tree (for encoders other than JSON, and for
    /// answers that carry owned messages).
    pub fn to_value(&self) -> Value {
        // Well-formed by construction; `Null` cannot happen.
        serde_json::from_slice(&self.0).unwrap_or(Value::Null)
    }
}

impl From<&Value> for JsonData {
    fn from(value: &Value) -> Self {
        Self::from_value(value)
    }
}

impl From<Value> for JsonData {
    fn from(value: Value) -> Self {
        Self::from_value(&value)
    }
}

impl fmt::Debug for JsonData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonData({})", self.as_str())
    }
}

/// As the value it holds, in any format (parsed first). The JSON `message`
/// frame does not come here: [`crate::Codec::encode_message`] copies the
/// text in.
impl Serialize for JsonData {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_value().serialize(serializer)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_normal_form_is_compact_with_sorted_keys() {
        let v: Value = serde_json::from_str(
            r#" { "b" : 1.50, "a" : [ 1e2, -0, "\u00e9\n" ], "c": 1, "c": 2 } "#,
        )
        .unwrap();
        let d = JsonData::from_value(&v);
        // What docs/PROTOCOL.md promises: no whitespace, keys sorted, a key
        // given twice keeps its last value, numbers printed back.
        assert_eq!(d.as_str(), r#"{"a":[100.0,-0.0,"é\n"],"b":1.5,"c":2}"#);
        assert_eq!(d.to_value(), v);
        // What a node stored is taken as it is, shared, not re-encoded.
        let again = JsonData::from_stored(Bytes::copy_from_slice(d.as_bytes())).unwrap();
        assert_eq!(again, d);
    }

    #[test]
    fn stored_data_must_be_one_json_value() {
        for bad in [&b""[..], b"{", b"1 2", b"nul", b"\"\xff\"", b"[1,]"] {
            assert!(
                JsonData::from_stored(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
        for good in [&b"null"[..], b"\"x\"", b"[]", b"{\"k\":[1,{}]}", b" 7 "] {
            assert!(JsonData::from_stored(Bytes::copy_from_slice(good)).is_ok());
        }
    }

    #[test]
    fn serializes_as_its_value_in_any_format() {
        let v = json!({"k": [1, -2, 2.5, "s", null, true]});
        let d = JsonData::from_value(&v);
        assert_eq!(
            rmp_serde::to_vec_named(&d).unwrap(),
            rmp_serde::to_vec_named(&v).unwrap()
        );
        assert_eq!(serde_json::to_string(&d).unwrap(), d.as_str());
    }
}
