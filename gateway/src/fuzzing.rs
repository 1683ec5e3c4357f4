//! Fuzz oracles for what the gateway parses, shared by the `fuzz/` targets (cargo-fuzz,
//! nightly) and the corpus replay test (`tests/fuzz_corpus.rs`, stable): each takes
//! arbitrary bytes and panics only when a promise of the code is broken.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use prost::Message;
use switchyard_config::GatewayConfig;
use switchyard_proto::ElementType;

use crate::frontend::json::parse_request;
use crate::metrics::Metrics;
use crate::snapshot::{Kept, Snapshot};
use crate::upstream::Upstreams;

/// A REST infer body (Triton's binary-tensor extension included: unless the input starts
/// with `{`, its first two bytes give `Inference-Header-Content-Length`): parsing never
/// panics, a fixed-width tensor has exactly the bytes its shape holds, and what the
/// gateway forwards is a request the backend's decoder takes.
pub fn rest_json(data: &[u8]) {
    let (json_len, body) = match data {
        [a, b, rest @ ..] if *a != b'{' => (Some(usize::from(*a) << 8 | usize::from(*b)), rest),
        _ => (None, data),
    };
    let Ok((mut req, _)) = parse_request(&Bytes::copy_from_slice(body), json_len) else {
        return;
    };
    for (input, raw) in req.inputs.iter().zip(&req.raw_input_contents) {
        let element = ElementType::from_wire(&input.datatype).expect("a known datatype");
        if let Some(width) = element.byte_size() {
            let count = switchyard_proto::element_count(&input.shape).expect("a shape");
            assert_eq!(raw.len(), count * width, "input '{}'", input.name);
        }
    }
    req.model_name = "route".to_owned();
    let encoded = Bytes::from(req.encode_to_vec());
    match switchyard_proto::wire::split_infer_request(&encoded) {
        Ok(_) | Err(switchyard_proto::wire::WireError::TooLarge { .. }) => {}
        Err(e) => panic!("the gateway would forward what no backend decodes: {e}"),
    }
}

/// The gateway the policy target loads policies for: two pools, the sample's names.
const GATEWAY: &str = "listen: { http: 127.0.0.1:0, grpc: 127.0.0.1:0, admin: 127.0.0.1:0 }
policies: policies
backends:
  stable: { endpoints: [\"127.0.0.1:9\"] }
  canary: { endpoints: [\"127.0.0.1:9\"] }
";

/// A policy file: what `switchyard check` accepts (the same validation every reload
/// runs) compiles, and builds a snapshot, without a panic; nothing it refuses panics.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let gateway: GatewayConfig = switchyard_config::parse_yaml(Path::new("gateway.yaml"), GATEWAY)
        .expect("the fuzz gateway.yaml");
    let texts = vec![(PathBuf::from("policies/fuzz.yaml"), text.to_owned())];
    let Ok(set) = switchyard_config::load_policy_texts(texts, &gateway) else {
        return;
    };
    let table = crate::routing::compile(&set, &gateway)
        .unwrap_or_else(|e| panic!("`check` accepts what a reload refuses: {e}"));
    let metrics = Metrics::new();
    let upstreams = Upstreams::new(&gateway, metrics.clone());
    if let Err(e) = Snapshot::build(
        1,
        &table,
        &upstreams,
        &upstreams.pools(),
        &metrics,
        &Kept::default(),
    ) {
        panic!("`check` accepts what a reload refuses: {e}");
    }
}
