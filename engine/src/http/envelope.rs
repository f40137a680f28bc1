//! The call and reply envelopes around the value tree, shared by the server and the client:
//! xapi's XML-RPC `{Status, Value}` / `{Status, ErrorDescription}` struct, and JSON-RPC 1.0
//! and 2.0 requests and responses as ocaml-rpc and xapi write them.
//!
//! JSON-RPC 2.0 failures. ocaml-rpc's `Jsonrpc.json_of_response` (mirage/ocaml-rpc
//! `src/lib/jsonrpc.ml`) writes `{"jsonrpc":"2.0","error":<contents>,"id":…}` with the contents
//! untouched, and its own 2.0 reader insists on `error` being an object with an integer `code`
//! and a string `message`. The error object comes from xapi: `Api_server.callback1`
//! (xapi-project/xen-api `ocaml/xapi/api_server.ml`) rewrites a failed 2.0 response whose
//! contents are `[String s; rest…]` into `{"code":1,"message":s,"data":[rest…]}`, and anything
//! else into `{"code":1,"message":"","data":contents}`. The code is always 1 ("the API does not
//! use error.code … non-zero because some clients consider 0 as no error"). So a storage error
//! `["Does_not_exist",["mirror","x"]]` travels as
//! `{"code":1,"message":"Does_not_exist","data":[["mirror","x"]]}`, and a reader gets the
//! error back by putting `message` in front of `data` again ([`error_from_v2_object`]).
//!
//! Envelope errors of our own (unparseable or ill-formed requests) keep that shape, so every
//! reader decodes them as `Internal_error`, but carry the JSON-RPC 2.0 codes -32700 (parse
//! error) and -32600 (invalid request) that the 2.0 specification assigns.

use crate::model::StorageError;
use crate::rpc::Value;

/// The `code` xapi puts in every JSON-RPC 2.0 error object.
pub const XAPI_ERROR_CODE: i64 = 1;
/// JSON-RPC 2.0: the body is not JSON.
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC 2.0: the JSON is not a request.
pub const INVALID_REQUEST: i64 = -32600;

/// Which JSON-RPC a message is. A request without a `jsonrpc` member is 1.0 (what xapi sends
/// its storage plugins); `"jsonrpc":"2.0"` is 2.0. A reply is always in its request's version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonVersion {
    /// JSON-RPC 1.0: replies carry both `result` and `error`, one of them `null`.
    V1,
    /// JSON-RPC 2.0: replies carry `"jsonrpc":"2.0"` and either `result` or an `error` object.
    V2,
}

/// One decoded JSON-RPC request.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonCall {
    /// The version it came in, and so the one to answer in.
    pub version: JsonVersion,
    /// The id to echo; `None` for a notification (no `id`, or `"id":null` as ocaml-rpc reads it),
    /// which gets no reply.
    pub id: Option<serde_json::Value>,
    /// The method name.
    pub method: String,
    /// The parameters: a JSON array's items, or a bare object as a one-element list.
    pub params: Vec<Value>,
}

/// A request that could not be decoded, with what is known of it to answer with.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    /// The version, when the request showed it; unknown ones are answered in 2.0.
    pub version: JsonVersion,
    /// The id to answer with (`null` when it could not be read).
    pub id: serde_json::Value,
    /// [`PARSE_ERROR`] or [`INVALID_REQUEST`].
    pub code: i64,
    /// What was wrong, for the `Internal_error`.
    pub message: String,
}

impl Rejected {
    fn invalid(version: JsonVersion, id: serde_json::Value, message: impl Into<String>) -> Rejected {
        Rejected { version, id, code: INVALID_REQUEST, message: message.into() }
    }

    /// The error reply.
    pub fn reply(&self) -> serde_json::Value {
        let err = StorageError::InternalError(self.message.clone());
        match self.version {
            JsonVersion::V1 => json_reply(JsonVersion::V1, self.id.clone(), Err(&err)),
            JsonVersion::V2 => v2_error_reply(self.id.clone(), self.code, &err),
        }
    }
}

/// A JSON-RPC body: one request, or a 2.0 batch of them.
#[derive(Clone, Debug, PartialEq)]
pub enum JsonBody {
    /// One request.
    Single(Result<JsonCall, Rejected>),
    /// A batch (a JSON array), each member decoded on its own.
    Batch(Vec<Result<JsonCall, Rejected>>),
}

/// Decodes a JSON-RPC body. Never fails: what cannot be decoded is a [`Rejected`] to answer.
pub fn parse_json_body(body: &[u8]) -> JsonBody {
    let doc: serde_json::Value = match serde_json::from_slice(body) {
        Ok(d) => d,
        Err(e) => {
            return JsonBody::Single(Err(Rejected {
                version: JsonVersion::V2,
                id: serde_json::Value::Null,
                code: PARSE_ERROR,
                message: format!("malformed JSON-RPC request: not JSON: {e}"),
            }));
        }
    };
    match doc {
        serde_json::Value::Array(items) if items.is_empty() => {
            // JSON-RPC 2.0 §6: an empty batch is answered by one Invalid Request error.
            JsonBody::Single(Err(Rejected::invalid(JsonVersion::V2, serde_json::Value::Null, "malformed JSON-RPC request: empty batch")))
        }
        serde_json::Value::Array(items) => JsonBody::Batch(items.into_iter().map(parse_request).collect()),
        other => JsonBody::Single(parse_request(other)),
    }
}

fn parse_request(doc: serde_json::Value) -> Result<JsonCall, Rejected> {
    let serde_json::Value::Object(mut obj) = doc else {
        let kind = json_kind(&doc);
        return Err(Rejected::invalid(JsonVersion::V2, serde_json::Value::Null, format!("malformed JSON-RPC request: expected an object, found {kind}")));
    };
    // The version first, so the rejection of a bad member is answered in the caller's version.
    let version = match obj.get("jsonrpc") {
        None => JsonVersion::V1,
        Some(serde_json::Value::String(v)) if v == "2.0" => JsonVersion::V2,
        Some(other) => return Err(Rejected::invalid(JsonVersion::V2, serde_json::Value::Null, format!("malformed JSON-RPC request: \"jsonrpc\" must be \"2.0\", found {other}"))),
    };
    let id = match obj.remove("id") {
        None | Some(serde_json::Value::Null) => None,
        Some(id @ (serde_json::Value::Number(_) | serde_json::Value::String(_))) => Some(id),
        Some(other) => return Err(Rejected::invalid(version, serde_json::Value::Null, format!("malformed JSON-RPC request: \"id\" must be a number or a string, found {}", json_kind(&other)))),
    };
    let reply_id = id.clone().unwrap_or(serde_json::Value::Null);
    let method = match obj.get("method") {
        Some(serde_json::Value::String(m)) => m.clone(),
        Some(other) => return Err(Rejected::invalid(version, reply_id, format!("malformed JSON-RPC request: \"method\" must be a string, found {}", json_kind(other)))),
        None => return Err(Rejected::invalid(version, reply_id, "malformed JSON-RPC request: no \"method\"")),
    };
    // ocaml-rpc requires an array in 1.0; a bare object is accepted in both versions (it is
    // what ocaml-rpc's own 2.0 client sends for one named-argument struct).
    let params = match obj.get("params") {
        None | Some(serde_json::Value::Null) => Vec::new(),
        Some(serde_json::Value::Array(a)) => a.iter().map(Value::from).collect(),
        Some(o @ serde_json::Value::Object(_)) => vec![Value::from(o)],
        Some(other) => return Err(Rejected::invalid(version, reply_id, format!("malformed JSON-RPC request: \"params\" must be an array or an object, found {}", json_kind(other)))),
    };
    Ok(JsonCall { version, id, method, params })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The reply to a call, in `version`.
pub fn json_reply(version: JsonVersion, id: serde_json::Value, outcome: Result<&Value, &StorageError>) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    match (version, outcome) {
        (JsonVersion::V1, Ok(v)) => {
            m.insert("result".into(), v.into());
            m.insert("error".into(), serde_json::Value::Null);
            m.insert("id".into(), id);
        }
        (JsonVersion::V1, Err(e)) => {
            m.insert("result".into(), serde_json::Value::Null);
            m.insert("error".into(), (&e.to_value()).into());
            m.insert("id".into(), id);
        }
        (JsonVersion::V2, Ok(v)) => {
            m.insert("jsonrpc".into(), "2.0".into());
            m.insert("result".into(), v.into());
            m.insert("id".into(), id);
        }
        (JsonVersion::V2, Err(e)) => return v2_error_reply(id, XAPI_ERROR_CODE, e),
    }
    serde_json::Value::Object(m)
}

fn v2_error_reply(id: serde_json::Value, code: i64, e: &StorageError) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("jsonrpc".into(), "2.0".into());
    m.insert("error".into(), v2_error_object(code, e));
    m.insert("id".into(), id);
    serde_json::Value::Object(m)
}

/// A storage error as xapi's JSON-RPC 2.0 error object (see the module doc).
pub fn v2_error_object(code: i64, e: &StorageError) -> serde_json::Value {
    let value = e.to_value();
    let (message, data) = match &value {
        Value::Array(items) => match items.split_first() {
            Some((Value::String(tag), rest)) => (tag.clone(), Value::Array(rest.to_vec())),
            _ => (String::new(), value.clone()),
        },
        _ => (String::new(), value.clone()),
    };
    let mut m = serde_json::Map::new();
    m.insert("code".into(), code.into());
    m.insert("message".into(), message.into());
    m.insert("data".into(), (&data).into());
    serde_json::Value::Object(m)
}

/// The storage error's value tree back from a 2.0 error object: `message` in front of `data`
/// when `message` is not empty, else `data` alone (the inverse of xapi's rewrite). `None` when
/// it is not such an object.
pub fn error_from_v2_object(obj: &serde_json::Value) -> Option<Value> {
    let message = obj.get("message")?.as_str()?;
    let data = obj.get("data").map(Value::from).unwrap_or(Value::Null);
    if message.is_empty() {
        return Some(data);
    }
    let mut items = vec![Value::String(message.to_owned())];
    match data {
        Value::Array(rest) => items.extend(rest),
        Value::Null => {}
        other => items.push(other),
    }
    Some(Value::Array(items))
}

/// A JSON-RPC request for `method` with one named-argument struct, as ocaml-rpc's
/// `Jsonrpc.string_of_call` writes it: 1.0 sends `params` as a one-element array, 2.0 sends the
/// struct bare.
pub fn json_request(version: JsonVersion, id: u64, method: &str, params: &Value) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    if version == JsonVersion::V2 {
        m.insert("jsonrpc".into(), "2.0".into());
    }
    m.insert("method".into(), method.into());
    let p: serde_json::Value = params.into();
    m.insert(
        "params".into(),
        match (version, p) {
            (JsonVersion::V2, p @ serde_json::Value::Object(_)) => p,
            (_, p) => serde_json::Value::Array(vec![p]),
        },
    );
    m.insert("id".into(), id.into());
    serde_json::Value::Object(m)
}

/// Why a reply is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadReply(pub String);

/// Reads a JSON-RPC reply in either version (told apart by its `jsonrpc` member, not by what was
/// asked: a server answers an unreadable request in 2.0). `Ok(Err(v))` is a failure carrying
/// the storage error's value tree.
pub fn parse_json_reply(body: &[u8], want_id: u64) -> Result<Result<Value, Value>, BadReply> {
    let doc: serde_json::Value = serde_json::from_slice(body).map_err(|e| BadReply(format!("reply is not JSON: {e}")))?;
    let serde_json::Value::Object(obj) = doc else {
        return Err(BadReply(format!("reply is {}, not an object", json_kind(&doc))));
    };
    let error = obj.get("error").filter(|e| !e.is_null());
    // A failure may carry a null id (a request the server could not read); a success must
    // answer our id.
    match obj.get("id") {
        Some(serde_json::Value::Number(n)) if n.as_u64() == Some(want_id) => {}
        Some(serde_json::Value::Null) | None if error.is_some() => {}
        other => return Err(BadReply(format!("reply id {} does not match request id {want_id}", other.map_or_else(|| "(none)".to_owned(), ToString::to_string)))),
    }
    match obj.get("jsonrpc") {
        None => match (obj.get("result"), error) {
            (_, Some(e)) => Ok(Err(Value::from(e))),
            (Some(r), None) => Ok(Ok(Value::from(r))),
            (None, None) => Err(BadReply("1.0 reply has neither result nor error".into())),
        },
        Some(serde_json::Value::String(v)) if v == "2.0" => match (obj.get("result"), error) {
            (Some(_), Some(_)) => Err(BadReply("2.0 reply has both result and error".into())),
            (Some(r), None) => Ok(Ok(Value::from(r))),
            (None, Some(e)) => match error_from_v2_object(e) {
                Some(v) => Ok(Err(v)),
                // Not xapi's object: perhaps a server that sends the variant as-is.
                None => Ok(Err(Value::from(e))),
            },
            (None, None) => Err(BadReply("2.0 reply has neither result nor error".into())),
        },
        Some(other) => Err(BadReply(format!("reply has \"jsonrpc\":{other}"))),
    }
}

/// xapi's XML-RPC reply struct: `{Status:"Success", Value}` or
/// `{Status:"Failure", ErrorDescription}`.
pub fn xml_reply(outcome: Result<&Value, &StorageError>) -> Value {
    match outcome {
        Ok(v) => Value::Struct(vec![("Status".into(), Value::String("Success".into())), ("Value".into(), v.clone())]),
        Err(e) => Value::Struct(vec![("Status".into(), Value::String("Failure".into())), ("ErrorDescription".into(), e.to_value())]),
    }
}

/// Reads xapi's XML-RPC reply struct. `Ok(Err(v))` is a failure carrying the error's value tree.
pub fn parse_xml_reply(reply: Value) -> Result<Result<Value, Value>, BadReply> {
    let status = reply.get("Status").and_then(Value::as_str).map(str::to_owned);
    let Value::Struct(members) = reply else {
        return Err(BadReply(format!("reply is not a struct: {reply:?}")));
    };
    let take = |name: &str| members.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    match status.as_deref() {
        Some("Success") => take("Value").map(Ok).ok_or_else(|| BadReply("Success without a Value".into())),
        Some("Failure") => take("ErrorDescription").map(Err).ok_or_else(|| BadReply("Failure without an ErrorDescription".into())),
        other => Err(BadReply(format!("reply Status is {other:?}, not Success or Failure"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn single(body: &str) -> Result<JsonCall, Rejected> {
        match parse_json_body(body.as_bytes()) {
            JsonBody::Single(r) => r,
            JsonBody::Batch(_) => panic!("{body} parsed as a batch"),
        }
    }

    #[test]
    fn xapi_v1_request_decodes_with_its_named_argument_struct() {
        let c = single(r#"{"method":"DATA.MIRROR.stat","params":[{"id":"sr/vdi","dbg":"x"}],"id":7}"#).expect("request");
        assert_eq!(c.version, JsonVersion::V1);
        assert_eq!(c.id, Some(json!(7)));
        assert_eq!(c.method, "DATA.MIRROR.stat");
        assert_eq!(c.params.len(), 1);
        assert_eq!(c.params[0].get("id").and_then(Value::as_str), Some("sr/vdi"));
    }

    #[test]
    fn bare_object_params_and_missing_ids_are_accepted() {
        let c = single(r#"{"jsonrpc":"2.0","method":"m","params":{"a":1}}"#).expect("request");
        assert_eq!((c.version, c.id, c.params.len()), (JsonVersion::V2, None, 1));
        let c = single(r#"{"method":"m","params":[],"id":null}"#).expect("request");
        assert_eq!(c.id, None, "ocaml-rpc reads a null id as a notification");
    }

    #[test]
    fn ill_formed_requests_are_rejected_in_their_own_version() {
        let r = single(r#"{"method":3,"params":[],"id":"a"}"#).expect_err("method is a number");
        assert_eq!((r.version, r.id.clone(), r.code), (JsonVersion::V1, json!("a"), INVALID_REQUEST));
        assert_eq!(r.reply(), json!({"result":null,"error":["Internal_error","malformed JSON-RPC request: \"method\" must be a string, found a number"],"id":"a"}));
        let r = single(r#"{"jsonrpc":"2.0","method":"m","params":5,"id":1}"#).expect_err("params is a number");
        assert_eq!(r.reply()["error"]["code"], json!(INVALID_REQUEST));
        assert_eq!(r.reply()["error"]["message"], json!("Internal_error"));
        let r = single("{nope").expect_err("not JSON");
        assert_eq!((r.code, r.id.clone()), (PARSE_ERROR, serde_json::Value::Null));
        assert!(matches!(single("42"), Err(Rejected { code: INVALID_REQUEST, .. })));
        assert!(matches!(parse_json_body(b"[]"), JsonBody::Single(Err(Rejected { code: INVALID_REQUEST, .. }))));
    }

    #[test]
    fn v2_failures_are_xapis_error_object_and_read_back_to_the_same_error() {
        let e = StorageError::DoesNotExist("mirror".into(), "sr/vdi".into());
        let reply = json_reply(JsonVersion::V2, json!(3), Err(&e));
        assert_eq!(reply, json!({"jsonrpc":"2.0","error":{"code":1,"message":"Does_not_exist","data":[["mirror","sr/vdi"]]},"id":3}));
        let back = parse_json_reply(reply.to_string().as_bytes(), 3).expect("reply").expect_err("failure");
        assert_eq!(StorageError::from_value(&back), Ok(e));
        // A variant without payload is a bare string: xapi sends message "" and the whole value.
        let reply = json_reply(JsonVersion::V2, json!(4), Err(&StorageError::UnknownError));
        assert_eq!(reply["error"], json!({"code":1,"message":"","data":"Unknown_error"}));
        let back = parse_json_reply(reply.to_string().as_bytes(), 4).expect("reply").expect_err("failure");
        assert_eq!(StorageError::from_value(&back), Ok(StorageError::UnknownError));
    }

    #[test]
    fn v1_replies_carry_both_members() {
        let ok = json_reply(JsonVersion::V1, json!(1), Ok(&Value::Bool(true)));
        assert_eq!(ok, json!({"result":true,"error":null,"id":1}));
        let bad = json_reply(JsonVersion::V1, json!(1), Err(&StorageError::Cancelled("t".into())));
        assert_eq!(bad, json!({"result":null,"error":["Cancelled","t"],"id":1}));
    }

    #[test]
    fn replies_with_the_wrong_id_are_refused() {
        assert!(parse_json_reply(br#"{"result":1,"error":null,"id":2}"#, 1).is_err());
        assert!(parse_json_reply(br#"{"jsonrpc":"2.0","result":1,"error":{"code":1,"message":"x"},"id":1}"#, 1).is_err());
    }

    #[test]
    fn requests_are_written_as_ocaml_rpc_writes_them() {
        let p = Value::Struct(vec![("dbg".into(), Value::String("d".into()))]);
        assert_eq!(json_request(JsonVersion::V1, 5, "SR.list", &p), json!({"method":"SR.list","params":[{"dbg":"d"}],"id":5}));
        assert_eq!(json_request(JsonVersion::V2, 5, "SR.list", &p), json!({"jsonrpc":"2.0","method":"SR.list","params":{"dbg":"d"},"id":5}));
    }

    #[test]
    fn xml_replies_round_trip() {
        let e = StorageError::InternalError("x".into());
        assert_eq!(parse_xml_reply(xml_reply(Err(&e))), Ok(Err(e.to_value())));
        assert_eq!(parse_xml_reply(xml_reply(Ok(&Value::Int(3)))), Ok(Ok(Value::Int(3))));
        assert!(parse_xml_reply(Value::String("Success".into())).is_err());
    }
}
