//! Decoding of go-cty's msgpack encoding, which is how Nomad hands a plugin its HCL
//! configuration (the agent `plugin` block and each task's `config {}` block). An object type
//! arrives as a msgpack map holding *every* attribute of the schema (sorted by name), with nil
//! for an absent attribute; numbers are compact integers when integral and float64 otherwise
//! (or a decimal string when neither is exact); an unknown value is a msgpack extension; a
//! dynamic (`any`) value is a two-element array `[type JSON, value]`.

use std::collections::BTreeMap;

use rmpv::Value;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CtyError {
    #[error("configuration is not valid msgpack: {0}")]
    Msgpack(String),
    #[error("configuration must be an object (a msgpack map), got {0}")]
    NotObject(&'static str),
    #[error("attribute {name:?}: expected {expected}, got {got}")]
    Type {
        name: String,
        expected: &'static str,
        got: &'static str,
    },
    #[error("attribute {0:?} is not known yet (unknown cty value); interpolate it before use")]
    Unknown(String),
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Nil => "null",
        Value::Boolean(_) => "bool",
        Value::Integer(_) => "integer",
        Value::F32(_) | Value::F64(_) => "float",
        Value::String(_) => "string",
        Value::Binary(_) => "binary",
        Value::Array(_) => "list",
        Value::Map(_) => "map",
        Value::Ext(..) => "unknown value",
    }
}

/// A decoded cty object: attribute name to value, with absent (nil) attributes left out.
#[derive(Debug, Default, Clone)]
pub struct Object {
    attrs: BTreeMap<String, Value>,
}

impl Object {
    /// Decodes a msgpack-encoded cty object. Empty input means "no block at all", which
    /// Nomad sends when the operator wrote no plugin block: every attribute is absent.
    pub fn decode(bytes: &[u8]) -> Result<Self, CtyError> {
        if bytes.is_empty() {
            return Ok(Self::default());
        }
        let mut rd = bytes;
        let value =
            rmpv::decode::read_value(&mut rd).map_err(|e| CtyError::Msgpack(e.to_string()))?;
        let entries = match value {
            Value::Map(m) => m,
            Value::Nil => return Ok(Self::default()),
            other => return Err(CtyError::NotObject(kind(&other))),
        };
        let mut attrs = BTreeMap::new();
        for (k, v) in entries {
            let Value::String(k) = k else {
                return Err(CtyError::NotObject("map with non-string keys"));
            };
            let Some(k) = k.into_str() else {
                return Err(CtyError::Msgpack("attribute name is not UTF-8".into()));
            };
            if let Value::Ext(..) = v {
                return Err(CtyError::Unknown(k));
            }
            if !v.is_nil() {
                attrs.insert(k, v);
            }
        }
        Ok(Self { attrs })
    }

    pub fn string(&self, name: &str) -> Result<Option<String>, CtyError> {
        match self.attrs.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => match s.as_str() {
                Some(s) => Ok(Some(s.to_owned())),
                None => Err(CtyError::Msgpack(format!(
                    "attribute {name:?} is not UTF-8"
                ))),
            },
            Some(v) => Err(type_err(name, "string", v)),
        }
    }

    /// A cty number that must be a whole number (e.g. `slots`).
    pub fn integer(&self, name: &str) -> Result<Option<i64>, CtyError> {
        match self.attrs.get(name) {
            None => Ok(None),
            Some(Value::Integer(i)) => i
                .as_i64()
                .map(Some)
                .ok_or_else(|| type_err(name, "a whole number within int64", &Value::Nil)),
            Some(Value::F64(f)) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(*f as i64)),
            // cty encodes numbers that are exact in neither int64 nor float64 as strings.
            Some(Value::String(s)) => s
                .as_str()
                .and_then(|s| s.parse::<i64>().ok())
                .map(Some)
                .ok_or_else(|| type_err(name, "a whole number", &Value::Nil)),
            Some(v) => Err(type_err(name, "a whole number", v)),
        }
    }

    pub fn bool(&self, name: &str) -> Result<Option<bool>, CtyError> {
        match self.attrs.get(name) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(*b)),
            Some(v) => Err(type_err(name, "bool", v)),
        }
    }

    /// A `list(string)`; a nil element is refused because an argv cannot hold one.
    pub fn string_list(&self, name: &str) -> Result<Option<Vec<String>>, CtyError> {
        match self.attrs.get(name) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => s
                        .as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| type_err(name, "UTF-8 strings", v)),
                    other => Err(type_err(name, "a list of strings", other)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(type_err(name, "a list of strings", v)),
        }
    }

    /// Attribute names present (non-null), for rejecting unexpected keys in tests.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.attrs.keys().map(String::as_str)
    }
}

fn type_err(name: &str, expected: &'static str, got: &Value) -> CtyError {
    CtyError::Type {
        name: name.to_owned(),
        expected,
        got: kind(got),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(pairs: &[(&str, Value)]) -> Vec<u8> {
        let map = Value::Map(
            pairs
                .iter()
                .map(|(k, v)| (Value::from(*k), v.clone()))
                .collect(),
        );
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &map).expect("encode");
        out
    }

    #[test]
    fn decodes_strings_numbers_lists_and_nil() {
        let bytes = encode(&[
            ("args", Value::Array(vec![Value::from("-v")])),
            ("missing", Value::Nil),
            ("name", Value::from("x")),
            ("ratio", Value::F64(2.0)),
            ("slots", Value::from(3u8)),
        ]);
        let o = Object::decode(&bytes).expect("decode");
        assert_eq!(o.string("name").expect("ok"), Some("x".into()));
        assert_eq!(o.string("missing").expect("ok"), None);
        assert_eq!(o.integer("slots").expect("ok"), Some(3));
        assert_eq!(o.integer("ratio").expect("ok"), Some(2));
        assert_eq!(o.string_list("args").expect("ok"), Some(vec!["-v".into()]));
        assert_eq!(
            o.names().collect::<Vec<_>>(),
            vec!["args", "name", "ratio", "slots"]
        );
    }

    #[test]
    fn rejects_wrong_types_and_unknowns() {
        let bytes = encode(&[("slots", Value::from("many"))]);
        let o = Object::decode(&bytes).expect("decode");
        assert!(matches!(o.integer("slots"), Err(CtyError::Type { .. })));
        let bytes = encode(&[("x", Value::Ext(0, vec![0]))]);
        assert_eq!(
            Object::decode(&bytes).err(),
            Some(CtyError::Unknown("x".into()))
        );
        assert!(matches!(
            Object::decode(&[0x93, 1, 2, 3]),
            Err(CtyError::NotObject("list"))
        ));
        assert!(
            Object::decode(&[0x82, 0xa1, b'a']).is_err(),
            "truncated map"
        );
    }

    #[test]
    fn empty_bytes_mean_no_block() {
        let o = Object::decode(&[]).expect("decode");
        assert_eq!(o.names().count(), 0);
    }
}
