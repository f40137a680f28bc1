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

/// Whether XML 1.0 can carry `c` at all, escaped or not (its `Char` production): not the C0
/// controls other than tab, newline and carriage return, nor U+FFFE and U+FFFF.
pub fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

impl Value {
    /// Where the first string or member name that XML 1.0 cannot carry is (`vdi_info.name_label`,
    /// `[2]`), and the string, skipping the top-level members named in `skip`. Such text,
    /// once stored, would make every XML-RPC answer that shows it unreadable.
    pub fn find_non_xml_text(&self, skip: &[&str]) -> Option<(String, String)> {
        fn walk(v: &Value, at: &mut Vec<String>, skip: &[&str]) -> Option<(String, String)> {
            let bad = |s: &str| !s.chars().all(is_xml_char);
            match v {
                Value::String(s) if bad(s) => Some((at.join("."), s.clone())),
                Value::Array(items) => items.iter().enumerate().find_map(|(i, x)| {
                    at.push(format!("[{i}]"));
                    let found = walk(x, at, &[]);
                    at.pop();
                    found
                }),
                Value::Struct(members) => members.iter().filter(|(k, _)| !skip.contains(&k.as_str())).find_map(|(k, x)| {
                    at.push(k.clone());
                    let found = if bad(k) { Some((at.join("."), k.clone())) } else { walk(x, at, &[]) };
                    at.pop();
                    found
                }),
                _ => None,
            }
        }
        walk(self, &mut Vec::new(), skip)
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_xml_cannot_carry_is_found_where_it_is() {
        let s = |x: &str| Value::String(x.to_owned());
        let v = Value::Struct(vec![
            ("dbg".into(), s("a\u{1}b")),
            ("vdi_info".into(), Value::Struct(vec![("name_label".into(), s("tab\tnewline\nok é ☺ 𝄞"))])),
        ]);
        assert_eq!(v.find_non_xml_text(&["dbg"]), None, "dbg is skipped; tab, newline and non-ASCII are fine");
        assert_eq!(v.find_non_xml_text(&[]), Some(("dbg".into(), "a\u{1}b".into())));
        let v = Value::Struct(vec![("l".into(), Value::Array(vec![s("x"), s("y\u{fffe}")]))]);
        assert_eq!(v.find_non_xml_text(&[]), Some(("l.[1]".into(), "y\u{fffe}".into())));
        let v = Value::Struct(vec![("k\u{1f}".into(), s("v"))]);
        assert_eq!(v.find_non_xml_text(&[]).map(|(at, _)| at), Some("k\u{1f}".into()));
    }
}
