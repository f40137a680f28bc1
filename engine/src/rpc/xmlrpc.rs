//! XML-RPC as xapi speaks it on `/services/SM`: untyped `<value>` strings (integers too),
//! `<boolean>`, `<double>`, `<nil/>`, `<array><data>`, `<struct><member>`. Responses are never
//! `<fault>`s but a struct `{Status, Value}` or `{Status, ErrorDescription}`.
//!
//! Encoding is xapi's byte for byte (no whitespace, untyped strings), so recorded messages
//! re-encode to themselves. Decoding also accepts what other clients send: whitespace between
//! elements, `<string>`, `<int>`/`<i4>`/`<i8>`, character references. Nesting is bounded, and
//! every error names the byte where it was found.

use super::{Value, WireError};

/// Deepest nesting of values accepted (a malicious document must not exhaust the stack).
const MAX_DEPTH: usize = 64;

/// A decoded `<methodCall>`.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// `methodName`.
    pub method: String,
    /// The parameters (xapi sends one struct of named arguments).
    pub params: Vec<Value>,
}

/// Parses a `<methodCall>`.
pub fn parse_call(text: &str) -> Result<Call, WireError> {
    let mut p = Parser { s: text.as_bytes(), at: 0 };
    p.prolog()?;
    p.open("methodCall")?;
    p.open("methodName")?;
    let method = p.text_until_close("methodName")?;
    let params = p.params()?;
    p.close("methodCall")?;
    p.end()?;
    Ok(Call { method, params })
}

/// Parses a `<methodResponse>` into its one value.
pub fn parse_response(text: &str) -> Result<Value, WireError> {
    let mut p = Parser { s: text.as_bytes(), at: 0 };
    p.prolog()?;
    p.open("methodResponse")?;
    let mut params = p.params()?;
    p.close("methodResponse")?;
    p.end()?;
    if params.len() != 1 {
        return Err(p.err(format!("a response carries one value, found {}", params.len())));
    }
    Ok(params.remove(0))
}

/// Encodes a `<methodCall>`.
pub fn encode_call(method: &str, params: &[Value]) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?><methodCall><methodName>");
    escape(method, &mut out);
    out.push_str("</methodName>");
    encode_params(params, &mut out);
    out.push_str("</methodCall>");
    out
}

/// Encodes a `<methodResponse>` carrying `value`.
pub fn encode_response(value: &Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?><methodResponse>");
    encode_params(std::slice::from_ref(value), &mut out);
    out.push_str("</methodResponse>");
    out
}

fn encode_params(params: &[Value], out: &mut String) {
    out.push_str("<params>");
    for p in params {
        out.push_str("<param>");
        encode_value(p, out);
        out.push_str("</param>");
    }
    out.push_str("</params>");
}

/// Encodes one `<value>`.
pub fn encode_value(v: &Value, out: &mut String) {
    out.push_str("<value>");
    match v {
        Value::Null => out.push_str("<nil/>"),
        Value::Bool(b) => out.push_str(if *b { "<boolean>1</boolean>" } else { "<boolean>0</boolean>" }),
        // Untyped, as xapi sends sizes: receivers accept a string for an integer.
        Value::Int(i) => out.push_str(&i.to_string()),
        Value::Float(f) => {
            out.push_str("<double>");
            out.push_str(&f.to_string());
            out.push_str("</double>");
        }
        Value::String(s) => escape(s, out),
        Value::Array(a) => {
            out.push_str("<array><data>");
            for x in a {
                encode_value(x, out);
            }
            out.push_str("</data></array>");
        }
        Value::Struct(m) => {
            out.push_str("<struct>");
            for (k, x) in m {
                out.push_str("<member><name>");
                escape(k, out);
                out.push_str("</name>");
                encode_value(x, out);
                out.push_str("</member>");
            }
            out.push_str("</struct>");
        }
    }
    out.push_str("</value>");
}

/// Writes `s` as XML character data. A character XML cannot carry even as a reference (a C0
/// control, U+FFFE) becomes U+FFFD: the calls refuse such text, but one that got stored anyway
/// (an error quoting a caller's bad id) must not make the whole answer unreadable.
fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            c if !super::value::is_xml_char(c) => out.push('\u{FFFD}'),
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn err(&self, what: impl Into<String>) -> WireError {
        WireError::Xml { at: self.at, what: what.into() }
    }

    fn skip_ws(&mut self) {
        while self.at < self.s.len() && self.s[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
    }

    fn prolog(&mut self) -> Result<(), WireError> {
        self.skip_ws();
        if self.s[self.at..].starts_with(b"<?xml") {
            let end = find(&self.s[self.at..], b"?>").ok_or_else(|| self.err("unterminated XML declaration"))?;
            self.at += end + 2;
        }
        Ok(())
    }

    fn end(&mut self) -> Result<(), WireError> {
        self.skip_ws();
        if self.at != self.s.len() { Err(self.err("trailing bytes after the document")) } else { Ok(()) }
    }

    /// The next tag, after whitespace: (name, closing, self-closing), without consuming it.
    fn peek_tag(&mut self) -> Result<(String, bool, bool, usize), WireError> {
        self.skip_ws();
        if self.s.get(self.at) != Some(&b'<') {
            return Err(self.err("expected a tag"));
        }
        let end = find(&self.s[self.at..], b">").ok_or_else(|| self.err("unterminated tag"))? + self.at;
        let inner = &self.s[self.at + 1..end];
        let closing = inner.first() == Some(&b'/');
        let self_closing = inner.last() == Some(&b'/');
        let name = &inner[usize::from(closing)..inner.len() - usize::from(self_closing && !closing)];
        let name = std::str::from_utf8(name).map_err(|_| self.err("tag is not UTF-8"))?.trim().to_owned();
        Ok((name, closing, self_closing, end + 1))
    }

    fn open(&mut self, name: &str) -> Result<(), WireError> {
        let (n, closing, self_closing, next) = self.peek_tag()?;
        if n != name || closing || self_closing {
            return Err(self.err(format!("expected <{name}>, found <{}{n}>", if closing { "/" } else { "" })));
        }
        self.at = next;
        Ok(())
    }

    fn close(&mut self, name: &str) -> Result<(), WireError> {
        let (n, closing, _, next) = self.peek_tag()?;
        if n != name || !closing {
            return Err(self.err(format!("expected </{name}>, found <{}{n}>", if closing { "/" } else { "" })));
        }
        self.at = next;
        Ok(())
    }

    /// Character data up to `</name>`, with references decoded; consumes the close tag.
    fn text_until_close(&mut self, name: &str) -> Result<String, WireError> {
        let start = self.at;
        let rel = find(&self.s[start..], b"<").ok_or_else(|| self.err("unterminated text"))?;
        self.at = start + rel;
        let text = self.decode_text(&self.s[start..start + rel])?;
        self.close(name)?;
        Ok(text)
    }

    fn decode_text(&self, raw: &[u8]) -> Result<String, WireError> {
        let raw = std::str::from_utf8(raw).map_err(|_| self.err("text is not UTF-8"))?;
        if !raw.contains('&') {
            return Ok(raw.to_owned());
        }
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw;
        while let Some(i) = rest.find('&') {
            out.push_str(&rest[..i]);
            let semi = rest[i..].find(';').ok_or_else(|| self.err("unterminated character reference"))? + i;
            let entity = &rest[i + 1..semi];
            let c = match entity {
                "amp" => '&',
                "lt" => '<',
                "gt" => '>',
                "quot" => '"',
                "apos" => '\'',
                e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16).ok().and_then(char::from_u32).ok_or_else(|| self.err(format!("bad reference &{e};")))?,
                e if e.starts_with('#') => e[1..].parse::<u32>().ok().and_then(char::from_u32).ok_or_else(|| self.err(format!("bad reference &{e};")))?,
                e => return Err(self.err(format!("unknown entity &{e};"))),
            };
            out.push(c);
            rest = &rest[semi + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn params(&mut self) -> Result<Vec<Value>, WireError> {
        let (n, closing, self_closing, next) = self.peek_tag()?;
        if n == "params" && self_closing {
            self.at = next;
            return Ok(Vec::new());
        }
        if n != "params" || closing {
            return Err(self.err("expected <params>"));
        }
        self.at = next;
        let mut out = Vec::new();
        loop {
            let (n, closing, _, _) = self.peek_tag()?;
            if n == "params" && closing {
                self.close("params")?;
                return Ok(out);
            }
            self.open("param")?;
            out.push(self.value(0)?);
            self.close("param")?;
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value, WireError> {
        if depth > MAX_DEPTH {
            return Err(self.err("values nested too deeply"));
        }
        let (n, closing, self_closing, next) = self.peek_tag()?;
        if n != "value" || closing {
            return Err(self.err("expected <value>"));
        }
        self.at = next;
        if self_closing {
            return Ok(Value::String(String::new()));
        }
        // Untyped: character data up to `</value>` is a string. Only whitespace before a typed
        // element is insignificant.
        let start = self.at;
        let rel = find(&self.s[start..], b"<").ok_or_else(|| self.err("unterminated value"))?;
        let (tag, closing, self_closing, next) = {
            self.at = start + rel;
            self.peek_tag()?
        };
        if tag == "value" && closing {
            let text = self.decode_text(&self.s[start..start + rel])?;
            self.at = next;
            return Ok(Value::String(text));
        }
        if !self.s[start..start + rel].iter().all(u8::is_ascii_whitespace) {
            return Err(self.err("text beside a typed value"));
        }
        let v = match (tag.as_str(), self_closing) {
            ("nil", true) => {
                self.at = next;
                Value::Null
            }
            ("string", true) => {
                self.at = next;
                Value::String(String::new())
            }
            ("string", false) => {
                self.at = next;
                Value::String(self.text_until_close("string")?)
            }
            ("boolean", false) => {
                self.at = next;
                match self.text_until_close("boolean")?.trim() {
                    "1" | "true" => Value::Bool(true),
                    "0" | "false" => Value::Bool(false),
                    other => return Err(self.err(format!("boolean {other:?}"))),
                }
            }
            ("int" | "i4" | "i8", false) => {
                self.at = next;
                let t = self.text_until_close(&tag)?;
                Value::Int(t.trim().parse().map_err(|_| self.err(format!("integer {t:?}")))?)
            }
            ("double", false) => {
                self.at = next;
                let t = self.text_until_close("double")?;
                Value::Float(t.trim().parse().map_err(|_| self.err(format!("double {t:?}")))?)
            }
            ("array", false) => {
                self.at = next;
                let (d, _, d_self_closing, d_next) = self.peek_tag()?;
                let mut items = Vec::new();
                if d == "data" && d_self_closing {
                    self.at = d_next;
                } else {
                    self.open("data")?;
                    loop {
                        let (n, closing, _, _) = self.peek_tag()?;
                        if n == "data" && closing {
                            self.close("data")?;
                            break;
                        }
                        items.push(self.value(depth + 1)?);
                    }
                }
                self.close("array")?;
                Value::Array(items)
            }
            ("struct", false) => {
                self.at = next;
                let mut members = Vec::new();
                loop {
                    let (n, closing, _, _) = self.peek_tag()?;
                    if n == "struct" && closing {
                        self.close("struct")?;
                        break;
                    }
                    self.open("member")?;
                    self.open("name")?;
                    let name = self.text_until_close("name")?;
                    let v = self.value(depth + 1)?;
                    self.close("member")?;
                    members.push((name, v));
                }
                Value::Struct(members)
            }
            (other, _) => return Err(self.err(format!("unknown value type <{other}>"))),
        };
        self.close("value")?;
        Ok(v)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_other_clients_styles() {
        let doc = "<?xml version=\"1.0\"?>\n<methodCall>\n  <methodName>SR.list</methodName>\n  <params>\n    <param>\n      <value><struct>\n        <member><name>dbg</name><value><string>a &amp; b &#x263A;</string></value></member>\n        <member><name>n</name><value><i4>-5</i4></value></member>\n        <member><name>l</name><value><array><data/></array></value></member>\n      </struct></value>\n    </param>\n  </params>\n</methodCall>\n";
        let call = parse_call(doc).expect("parse");
        assert_eq!(call.method, "SR.list");
        let p = &call.params[0];
        assert_eq!(p.get("dbg").and_then(Value::as_str), Some("a & b ☺"));
        assert_eq!(p.get("n").and_then(Value::as_i64), Some(-5));
        assert_eq!(p.get("l"), Some(&Value::Array(vec![])));
    }

    #[test]
    fn untyped_integers_are_strings_that_read_as_integers() {
        let v = parse_response("<methodResponse><params><param><value>21474836480</value></param></params></methodResponse>").expect("parse");
        assert_eq!(v, Value::String("21474836480".into()));
        assert_eq!(v.as_i64(), Some(21_474_836_480));
    }

    #[test]
    fn strings_with_markup_round_trip() {
        let v = Value::Struct(vec![("k<&>".into(), Value::String("a\"<b>&c".into())), ("e".into(), Value::String(String::new()))]);
        assert_eq!(parse_response(&encode_response(&v)).expect("parse"), v);
    }

    #[test]
    fn text_xml_cannot_carry_is_replaced_not_sent() {
        let v = Value::String("a\u{1}b\u{fffe}\tc".into());
        let doc = encode_response(&v);
        assert!(!doc.contains('\u{1}') && !doc.contains('\u{fffe}'), "{doc:?}");
        assert_eq!(parse_response(&doc).expect("parse"), Value::String("a\u{fffd}b\u{fffd}\tc".into()));
    }

    #[test]
    fn malformed_documents_are_errors_not_panics() {
        for bad in [
            "",
            "<methodCall>",
            "<methodCall><methodName>x</methodName><params><param><value><struct><member><name>a</name></member></struct></value></param></params></methodCall>",
            "<methodCall><methodName>x</methodName><params><param><value><boolean>2</boolean></value></param></params></methodCall>",
            "<methodCall><methodName>x</methodName><params><param><value>x<int>1</int></value></param></params></methodCall>",
            "<methodCall><methodName>x</methodName><params></params></methodCall>trailing",
            "<methodCall><methodName>&bogus;</methodName><params/></methodCall>",
            "<methodResponse><params><param><value>1</value></param><param><value>2</value></param></params></methodResponse>",
        ] {
            assert!(parse_call(bad).is_err() || parse_response(bad).is_err(), "{bad:?} parsed");
        }
        let deep = format!("<methodResponse><params><param>{}x{}</param></params></methodResponse>", "<value><array><data>".repeat(100), "</data></array></value>".repeat(100));
        assert!(matches!(parse_response(&deep), Err(WireError::Xml { .. })));
    }
}
