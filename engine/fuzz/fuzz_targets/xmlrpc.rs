//! Arbitrary bytes as an XML-RPC call and response: parsing never panics, and whatever parses
//! re-encodes to a document that parses back to the same encoding (compared as text, since a
//! parsed NaN never equals itself), and maps to JSON and back without a panic. A call that
//! decodes into a typed storage call re-encodes to one that decodes to the same typed call.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sxm_engine::model::Call;
use sxm_engine::rpc::{Value, xmlrpc};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(call) = xmlrpc::parse_call(text) {
        let once = xmlrpc::encode_call(&call.method, &call.params);
        let again = xmlrpc::parse_call(&once).expect("our encoding parses");
        assert_eq!(xmlrpc::encode_call(&again.method, &again.params), once);
        if let Ok(typed) = Call::decode(&call.method, &call.params) {
            let params = typed.params();
            assert_eq!(Call::decode(typed.method(), &params).as_ref(), Ok(&typed));
        }
    }
    if let Ok(v) = xmlrpc::parse_response(text) {
        let once = xmlrpc::encode_response(&v);
        let again = xmlrpc::parse_response(&once).expect("our encoding parses");
        assert_eq!(xmlrpc::encode_response(&again), once);
        let j: serde_json::Value = (&v).into();
        let _back: Value = (&j).into();
    }
});
