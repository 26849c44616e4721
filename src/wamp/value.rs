//! WAMP's value model, the same in every serializer: what JSON, MessagePack
//! and CBOR carry, with binary as binary. JSON has no binary type: WAMP
//! writes it as a string of a NUL character and base64 (WAMP §6.4.1), and
//! reads such a string back as binary.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine;
use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub type Dict = BTreeMap<String, Value>;

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    /// Past `i64` (WAMP ids stay below 2^53; a client may send more).
    UInt(u64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Dict(Dict),
}

impl Value {
    pub fn as_id(&self) -> Option<u64> {
        match *self {
            Value::Int(i) => u64::try_from(i).ok(),
            Value::UInt(u) => Some(u),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_dict(&self) -> Option<&Dict> {
        match self {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }
}

/// How binary is written: as bytes (MessagePack, CBOR) or as WAMP's JSON
/// string form.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BinaryAs {
    Bytes,
    JsonString,
}

/// A value with the serializer's way of writing binary.
pub struct Encoded<'a>(pub &'a Value, pub BinaryAs);

impl Serialize for Encoded<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Encoded(v, binary) = *self;
        match v {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::UInt(u) => s.serialize_u64(*u),
            Value::Float(f) => s.serialize_f64(*f),
            Value::Str(t) => s.serialize_str(t),
            Value::Bytes(b) => match binary {
                BinaryAs::Bytes => s.serialize_bytes(b),
                BinaryAs::JsonString => {
                    let text = format!("\0{}", base64::engine::general_purpose::STANDARD.encode(b));
                    s.serialize_str(&text)
                }
            },
            Value::List(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Encoded(item, binary))?;
                }
                seq.end()
            }
            Value::Dict(d) => {
                let mut map = s.serialize_map(Some(d.len()))?;
                for (k, item) in d {
                    map.serialize_entry(k, &Encoded(item, binary))?;
                }
                map.end()
            }
        }
    }
}

/// Nesting deeper than this is refused: a hostile message cannot exhaust
/// the stack.
pub const MAX_DEPTH: usize = 64;

/// Reads any serializer's value; a JSON string starting with NUL is
/// binary.
pub struct Decoded(pub Value);

struct ValueVisitor {
    depth: usize,
}

impl<'de> Deserialize<'de> for Decoded {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Decoded, D::Error> {
        d.deserialize_any(ValueVisitor { depth: 0 }).map(Decoded)
    }
}

struct Nested(Value);

struct NestedSeed {
    depth: usize,
}

impl<'de> de::DeserializeSeed<'de> for NestedSeed {
    type Value = Nested;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Nested, D::Error> {
        if self.depth > MAX_DEPTH {
            return Err(de::Error::custom("nested too deeply"));
        }
        d.deserialize_any(ValueVisitor { depth: self.depth })
            .map(Nested)
    }
}

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a WAMP value")
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Value, E> {
        Ok(Value::Bool(b))
    }
    fn visit_i64<E>(self, i: i64) -> Result<Value, E> {
        Ok(Value::Int(i))
    }
    fn visit_u64<E>(self, u: u64) -> Result<Value, E> {
        Ok(i64::try_from(u).map_or(Value::UInt(u), Value::Int))
    }
    fn visit_i128<E: de::Error>(self, i: i128) -> Result<Value, E> {
        i64::try_from(i)
            .map(Value::Int)
            .or_else(|_| u64::try_from(i).map(Value::UInt))
            .map_err(|_| E::custom("an integer out of range"))
    }
    fn visit_u128<E: de::Error>(self, u: u128) -> Result<Value, E> {
        u64::try_from(u)
            .map(|u| self.visit_u64::<E>(u).unwrap_or(Value::UInt(u)))
            .map_err(|_| E::custom("an integer out of range"))
    }
    fn visit_f64<E>(self, f: f64) -> Result<Value, E> {
        Ok(Value::Float(f))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        match s.strip_prefix('\0') {
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map(Value::Bytes)
                .map_err(|_| E::custom("a binary string that is not base64")),
            None => Ok(Value::Str(s.to_owned())),
        }
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        if s.starts_with('\0') {
            return self.visit_str(&s);
        }
        Ok(Value::Str(s))
    }
    fn visit_bytes<E>(self, b: &[u8]) -> Result<Value, E> {
        Ok(Value::Bytes(b.to_vec()))
    }
    fn visit_byte_buf<E>(self, b: Vec<u8>) -> Result<Value, E> {
        Ok(Value::Bytes(b))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(Nested(v)) = seq.next_element_seed(NestedSeed {
            depth: self.depth + 1,
        })? {
            items.push(v);
        }
        Ok(Value::List(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut d = Dict::new();
        while let Some(key) = map.next_key::<String>()? {
            let Nested(v) = map.next_value_seed(NestedSeed {
                depth: self.depth + 1,
            })?;
            d.insert(key, v);
        }
        Ok(Value::Dict(d))
    }
}
