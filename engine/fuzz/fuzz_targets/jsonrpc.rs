//! Arbitrary bytes as a JSON-RPC request body (what `/jsonrpc` reads) and as a reply (what the
//! client reads): neither parser panics, every rejected request has an error reply to send, and
//! a call that decodes into a typed storage call re-encodes to one that decodes the same.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sxm_engine::http::envelope::{JsonBody, parse_json_body, parse_json_reply};
use sxm_engine::model::Call;

fuzz_target!(|data: &[u8]| {
    let calls = match parse_json_body(data) {
        JsonBody::Single(c) => vec![c],
        JsonBody::Batch(cs) => cs,
    };
    for c in calls {
        match c {
            Ok(call) => {
                if let Ok(typed) = Call::decode(&call.method, &call.params) {
                    let params = typed.params();
                    assert_eq!(Call::decode(typed.method(), &params).as_ref(), Ok(&typed));
                }
            }
            Err(rejected) => {
                let reply = rejected.reply();
                assert!(reply.get("error").is_some_and(|e| !e.is_null()), "{reply}");
            }
        }
    }
    let _ = parse_json_reply(data, 1);
});
