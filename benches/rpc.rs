//! The RPC path of one host, without the network: decoding a call (XML-RPC and JSON-RPC),
//! dispatching it through the mux to the real `ext` backend, and encoding the answer.
//! `benches/rpc-load.py` measures the same path end to end, under concurrent clients.

use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sxm_engine::http::Dispatch;
use sxm_engine::model::{Call, VdiInfo};
use sxm_engine::mux::Mux;
use sxm_engine::rpc::marshal::Marshal;
use sxm_engine::rpc::{Value, xmlrpc};

fn s(x: &str) -> Value {
    Value::String(x.to_owned())
}

fn named(args: Vec<(&str, Value)>) -> Value {
    Value::Struct(args.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let tapmirror = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/tapmirror");
    let mux: Arc<Mux> = rt
        .block_on(Mux::builder().backend("ext", Arc::new(sxm_smapiv1::ExtBackend::new(tapmirror))).open(dir.path()))
        .expect("open host");
    let call = |method: &str, args: Value| rt.block_on(mux.dispatch(method.to_owned(), vec![args])).expect(method);
    call("SR.create", named(vec![("sr", s("sr")), ("device_config", named(vec![("type", s("ext"))]))]));
    call("SR.attach", named(vec![("sr", s("sr"))]));
    let mut vdis = Vec::new();
    for i in 0..100 {
        let mut info = VdiInfo::new("", format!("disk{i}"));
        info.virtual_size = 1 << 20;
        let made = call("VDI.create", named(vec![("sr", s("sr")), ("vdi_info", info.to_value())]));
        vdis.push(VdiInfo::from_value(&made).expect("vdi").vdi);
    }

    let mut g = c.benchmark_group("rpc");
    g.throughput(Throughput::Elements(1));

    let stat_xml = xmlrpc::encode_call("VDI.stat", &[named(vec![("vdi", s(&vdis[7])), ("sr", s("sr")), ("dbg", s("bench"))])]);
    g.bench_function("xmlrpc VDI.stat: decode + typed call", |b| {
        b.iter(|| {
            let raw = xmlrpc::parse_call(&stat_xml).expect("parse");
            Call::decode(&raw.method, &raw.params).expect("decode")
        })
    });

    let stat_json = serde_json::json!({"jsonrpc": "2.0", "method": "VDI.stat", "params": [{"vdi": vdis[7], "sr": "sr", "dbg": "bench"}], "id": 1}).to_string();
    g.bench_function("jsonrpc VDI.stat: decode + typed call", |b| {
        b.iter(|| {
            let j: serde_json::Value = serde_json::from_str(&stat_json).expect("json");
            let params: Vec<Value> = j["params"].as_array().expect("params").iter().map(Value::from).collect();
            Call::decode(j["method"].as_str().expect("method"), &params).expect("decode")
        })
    });

    g.bench_function("VDI.stat: XML-RPC in, dispatch to ext, XML-RPC out", |b| {
        b.to_async(&rt).iter(|| async {
            let raw = xmlrpc::parse_call(&stat_xml).expect("parse");
            let v = mux.dispatch(raw.method, raw.params).await.expect("stat");
            xmlrpc::encode_response(&named(vec![("Status", s("Success")), ("Value", v)]))
        })
    });

    let scan = named(vec![("sr", s("sr")), ("dbg", s("bench"))]);
    g.bench_function("SR.scan of 100 VDIs: dispatch to ext, JSON out", |b| {
        b.to_async(&rt).iter(|| async {
            let v = mux.dispatch("SR.scan".to_owned(), vec![scan.clone()]).await.expect("scan");
            serde_json::to_string(&serde_json::Value::from(&v)).expect("json")
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
