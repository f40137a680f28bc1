//! Typed values to and from the value tree, as ocaml-rpc's `Rpcmarshal` does it
//! (`../shared/research/xapi-sxm.md` §1.3):
//!
//! - integers accept a decimal string (xapi's XML-RPC sends them untyped);
//! - a record decodes its members by name, case-insensitively, ignores members it does not
//!   know and applies each field's default; an `option` field is omitted when `None` and sent
//!   bare when `Some`;
//! - an `option` that is not a record field is `[]` or `[x]`;
//! - a string-keyed map is a struct.
//!
//! Records are declared with [`record!`](crate::record), which writes the struct and both
//! directions; fields are encoded in declaration order, so declaring them in the order xapi
//! sends them makes a decoded message re-encode to the same bytes.

use indexmap::IndexMap;

use super::Value;

/// Why a value does not have the expected type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{what}", if path.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct DecodeError {
    /// Where in the value (`vdi_info.virtual_size`), empty at the top.
    pub path: String,
    /// What was expected and found.
    pub what: String,
}

impl DecodeError {
    /// An error at the current position.
    pub fn new(what: impl Into<String>) -> DecodeError {
        DecodeError { path: String::new(), what: what.into() }
    }

    /// The same error, one level deeper (inside `field`).
    pub fn within(mut self, field: &str) -> DecodeError {
        self.path = if self.path.is_empty() { field.to_owned() } else { format!("{field}.{}", self.path) };
        self
    }

    fn expected(what: &str, got: &Value) -> DecodeError {
        DecodeError::new(format!("expected {what}, found {}", kind(got)))
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nil",
        Value::Bool(_) => "a boolean",
        Value::Int(_) => "an integer",
        Value::Float(_) => "a float",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Struct(_) => "a struct",
    }
}

/// A type with a wire form.
pub trait Marshal: Sized {
    /// The value tree of `self`.
    fn to_value(&self) -> Value;
    /// Decodes a value tree.
    fn from_value(v: &Value) -> Result<Self, DecodeError>;
}

impl Marshal for String {
    fn to_value(&self) -> Value {
        Value::String(self.clone())
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        v.as_str().map(str::to_owned).ok_or_else(|| DecodeError::expected("a string", v))
    }
}

impl Marshal for bool {
    fn to_value(&self) -> Value {
        Value::Bool(*self)
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        v.as_bool().ok_or_else(|| DecodeError::expected("a boolean", v))
    }
}

impl Marshal for i64 {
    fn to_value(&self) -> Value {
        Value::Int(*self)
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        v.as_i64().ok_or_else(|| match v {
            Value::String(s) => DecodeError::new(format!("expected an integer, found {s:?}")),
            _ => DecodeError::expected("an integer", v),
        })
    }
}

impl Marshal for f64 {
    fn to_value(&self) -> Value {
        Value::Float(*self)
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        match v {
            Value::Float(f) => Ok(*f),
            Value::Int(i) => Ok(*i as f64),
            Value::String(s) => s.trim().parse().map_err(|_| DecodeError::new(format!("expected a float, found {s:?}"))),
            _ => Err(DecodeError::expected("a float", v)),
        }
    }
}

impl Marshal for () {
    fn to_value(&self) -> Value {
        Value::Null
    }
    fn from_value(_: &Value) -> Result<Self, DecodeError> {
        // ocaml-rpc ignores what a unit holds.
        Ok(())
    }
}

impl Marshal for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        Ok(v.clone())
    }
}

impl<T: Marshal> Marshal for Vec<T> {
    fn to_value(&self) -> Value {
        Value::Array(self.iter().map(Marshal::to_value).collect())
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        match v {
            Value::Array(a) => a.iter().enumerate().map(|(i, x)| T::from_value(x).map_err(|e| e.within(&i.to_string()))).collect(),
            _ => Err(DecodeError::expected("an array", v)),
        }
    }
}

/// An `option` outside a record: `[]` or `[x]`.
impl<T: Marshal> Marshal for Option<T> {
    fn to_value(&self) -> Value {
        Value::Array(self.iter().map(Marshal::to_value).collect())
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        match v {
            Value::Array(a) if a.is_empty() => Ok(None),
            Value::Array(a) if a.len() == 1 => T::from_value(&a[0]).map(Some),
            _ => Err(DecodeError::expected("an option ([] or [x])", v)),
        }
    }
}

/// A pair that is not a string-keyed map entry: `[a, b]`.
impl<A: Marshal, B: Marshal> Marshal for (A, B) {
    fn to_value(&self) -> Value {
        Value::Array(vec![self.0.to_value(), self.1.to_value()])
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        match v {
            Value::Array(a) if a.len() == 2 => {
                Ok((A::from_value(&a[0]).map_err(|e| e.within("0"))?, B::from_value(&a[1]).map_err(|e| e.within("1"))?))
            }
            _ => Err(DecodeError::expected("a pair", v)),
        }
    }
}

/// A string-keyed map (`(string * 'a) list` in xapi), a struct on the wire, in order.
pub type Map<V> = IndexMap<String, V>;

impl<V: Marshal> Marshal for IndexMap<String, V> {
    fn to_value(&self) -> Value {
        Value::Struct(self.iter().map(|(k, v)| (k.clone(), v.to_value())).collect())
    }
    fn from_value(v: &Value) -> Result<Self, DecodeError> {
        match v {
            Value::Struct(m) => m.iter().map(|(k, x)| Ok((k.clone(), V::from_value(x).map_err(|e| e.within(k))?))).collect(),
            _ => Err(DecodeError::expected("a struct (a map)", v)),
        }
    }
}

/// A variant's tag (lowercased: ocaml-rpc matches tags case-insensitively) and its payload:
/// `"Tag"`, `["Tag"]` or `["Tag", payload]`.
pub fn variant(v: &Value) -> Result<(String, Option<&Value>), DecodeError> {
    match v {
        Value::String(t) => Ok((t.to_ascii_lowercase(), None)),
        Value::Array(a) => match a.as_slice() {
            [Value::String(t)] => Ok((t.to_ascii_lowercase(), None)),
            [Value::String(t), p] => Ok((t.to_ascii_lowercase(), Some(p))),
            _ => Err(DecodeError::new("expected a variant [\"Tag\", payload]")),
        },
        _ => Err(DecodeError::expected("a variant", v)),
    }
}

/// A variant with a payload: `["Tag", payload]`.
pub fn tagged(tag: &str, payload: Value) -> Value {
    Value::Array(vec![Value::String(tag.to_owned()), payload])
}

/// The payload a variant must carry.
pub fn payload<'a>(tag: &str, p: Option<&'a Value>) -> Result<&'a Value, DecodeError> {
    p.ok_or_else(|| DecodeError::new(format!("{tag} needs a payload")))
}

/// Looks up a record member, case-insensitively (ocaml-rpc lowercases record keys).
pub fn member<'a>(members: &'a [(String, Value)], name: &str) -> Option<&'a Value> {
    members.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v)
}

/// The members of a record, or an error saying a record was expected.
pub fn members<'a>(v: &'a Value, what: &str) -> Result<&'a [(String, Value)], DecodeError> {
    match v {
        Value::Struct(m) => Ok(m),
        _ => Err(DecodeError::expected(&format!("a struct ({what})"), v)),
    }
}

/// Decodes a required record field.
pub fn required<T: Marshal>(members: &[(String, Value)], name: &str) -> Result<T, DecodeError> {
    match member(members, name) {
        Some(v) => T::from_value(v).map_err(|e| e.within(name)),
        None => Err(DecodeError::new(format!("missing {name}"))),
    }
}

/// Decodes a field that has a default.
pub fn defaulted<T: Marshal>(members: &[(String, Value)], name: &str, default: impl FnOnce() -> T) -> Result<T, DecodeError> {
    match member(members, name) {
        Some(v) => T::from_value(v).map_err(|e| e.within(name)),
        None => Ok(default()),
    }
}

/// Decodes an `option` record field: absent is `None`, present is the bare value.
pub fn optional<T: Marshal>(members: &[(String, Value)], name: &str) -> Result<Option<T>, DecodeError> {
    match member(members, name) {
        Some(v) => T::from_value(v).map(Some).map_err(|e| e.within(name)),
        None => Ok(None),
    }
}

/// Declares a record: the struct, and its [`Marshal`] impl. Each field is `name: Type [kind]`
/// where kind is `req` (must be present), `def = EXPR` (default when absent) or `opt` (an
/// `Option<T>` omitted when `None`). Fields encode in declaration order.
#[macro_export]
macro_rules! record {
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ty [ $kind:ident $(= $def:expr)? ] ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        impl $crate::rpc::marshal::Marshal for $name {
            // One push per field, written by the macro (an option field may push nothing).
            #[allow(clippy::vec_init_then_push)]
            fn to_value(&self) -> $crate::rpc::Value {
                #[allow(unused_mut)]
                let mut m: Vec<(String, $crate::rpc::Value)> = Vec::new();
                $( $crate::record!(@put $kind, m, stringify!($field), &self.$field); )*
                $crate::rpc::Value::Struct(m)
            }
            fn from_value(v: &$crate::rpc::Value) -> Result<Self, $crate::rpc::marshal::DecodeError> {
                #[allow(unused_variables)]
                let m = $crate::rpc::marshal::members(v, stringify!($name))?;
                Ok($name { $( $field: $crate::record!(@get $kind $(= $def)?, m, stringify!($field)), )* })
            }
        }
    };
    (@put opt, $m:ident, $name:expr, $v:expr) => {
        if let Some(x) = $v { $m.push(($name.to_owned(), $crate::rpc::marshal::Marshal::to_value(x))); }
    };
    (@put $kind:ident, $m:ident, $name:expr, $v:expr) => {
        $m.push(($name.to_owned(), $crate::rpc::marshal::Marshal::to_value($v)));
    };
    (@get req, $m:ident, $name:expr) => { $crate::rpc::marshal::required($m, $name)? };
    (@get opt, $m:ident, $name:expr) => { $crate::rpc::marshal::optional($m, $name)? };
    (@get def = $def:expr, $m:ident, $name:expr) => { $crate::rpc::marshal::defaulted($m, $name, || $def)? };
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::record! {
        /// A record for the tests.
        pub struct Sample {
            size: i64 [req],
            label: String [def = "none".to_owned()],
            uuid: Option<String> [opt],
            config: Map<String> [def = Map::new()],
        }
    }

    #[test]
    fn records_take_defaults_ignore_unknown_keys_and_match_case_insensitively() {
        let v = Value::Struct(vec![("SIZE".into(), Value::String("42".into())), ("extra".into(), Value::Null)]);
        let s = Sample::from_value(&v).expect("decodes");
        assert_eq!(s, Sample { size: 42, label: "none".into(), uuid: None, config: Map::new() });
        // None options are omitted, defaults are written out.
        assert_eq!(
            s.to_value(),
            Value::Struct(vec![
                ("size".into(), Value::Int(42)),
                ("label".into(), Value::String("none".into())),
                ("config".into(), Value::Struct(vec![])),
            ])
        );
    }

    #[test]
    fn errors_name_the_field_that_is_wrong() {
        let v = Value::Struct(vec![("size".into(), Value::String("big".into()))]);
        let e = Sample::from_value(&v).expect_err("not an integer");
        assert_eq!(e.to_string(), "size: expected an integer, found \"big\"");
        let e = Sample::from_value(&Value::Struct(vec![])).expect_err("missing");
        assert_eq!(e.to_string(), "missing size");
        let v = Value::Struct(vec![("size".into(), Value::Int(1)), ("config".into(), Value::Struct(vec![("k".into(), Value::Int(3))]))]);
        assert_eq!(Sample::from_value(&v).expect_err("map of strings").to_string(), "config.k: expected a string, found an integer");
    }

    #[test]
    fn options_outside_records_are_lists() {
        assert_eq!(Option::<i64>::from_value(&Value::Array(vec![])), Ok(None));
        assert_eq!(Option::<i64>::from_value(&Value::Array(vec![Value::Int(3)])), Ok(Some(3)));
        assert!(Option::<i64>::from_value(&Value::Int(3)).is_err());
        assert_eq!(Some(5i64).to_value(), Value::Array(vec![Value::Int(5)]));
    }
}
