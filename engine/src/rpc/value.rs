//! The value tree both encodings carry (ocaml-rpc's `Rpc.t`).

/// One value. Structs keep their members' order, so an encoded message decodes and re-encodes
/// to the same bytes.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `unit` (`<nil/>`, JSON `null`).
    Null,
    /// A boolean.
    Bool(bool),
    /// An integer. XML-RPC as xapi sends it has no integer type: sizes travel as untyped
    /// strings, and receivers accept a string where an integer is due (`as_i64`).
    Int(i64),
    /// A float.
    Float(f64),
    /// A string (an untyped XML-RPC value).
    String(String),
    /// An array (lists, options, variants with payloads).
    Array(Vec<Value>),
    /// A struct (records, string-keyed maps), in member order.
    Struct(Vec<(String, Value)>),
}

impl Value {
    /// A struct member by exact name.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Struct(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, accepting a decimal string as xapi's untyped XML-RPC integers are.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// The boolean.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
}
