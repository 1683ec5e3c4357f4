//! The response cache of a route: successful answers keyed by a 128-bit hash of what
//! decides them, bounded in bytes, with a TTL, `Cache-Control` handling, and concurrent
//! identical misses sharing one upstream call (moka's `or_try_insert_with`).
//!
//! The key is structural, as Triton's is: the route's plan fingerprint and the chosen plan,
//! then each input's name, datatype, shape and bytes (in name order), the requested
//! outputs, and the parameters that can change an answer. JSON and binary REST bodies and
//! raw or typed gRPC tensors of the same values hash alike... as long as they encode the
//! same bytes: raw and typed contents of one tensor are different keys.

use bytes::{Bytes, BytesMut};
use moka::future::Cache;
use xxhash_rust::xxh3::{Xxh3, xxh3_128};

use super::Answer;
use crate::error::GatewayError;
use crate::grpc::infer::{InferMessage, entry_key, fields};
use crate::metrics::CacheMetrics;

/// Parameters that change when or how an answer comes, never what it is.
const NOT_IN_KEY: [&str; 6] = [
    "timeout",
    "priority",
    "binary_data_output",
    "sequence_id",
    "sequence_start",
    "sequence_end",
];

/// What a request's `Cache-Control` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// Look up, store on a miss.
    Normal,
    /// Skip the lookup, store the answer.
    NoCache,
    /// Neither look up nor store.
    NoStore,
}

impl Control {
    pub(crate) fn from_header(value: Option<&[u8]>) -> Self {
        let Some(v) = value.and_then(|v| std::str::from_utf8(v).ok()) else {
            return Self::Normal;
        };
        let directives: Vec<String> = v
            .split(',')
            .map(|d| d.trim().to_ascii_lowercase())
            .collect();
        if directives.iter().any(|d| d == "no-store") {
            Self::NoStore
        } else if directives.iter().any(|d| d == "no-cache") {
            Self::NoCache
        } else {
            Self::Normal
        }
    }
}

/// How the cache served a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    Hit,
    Miss,
    /// Another request's upstream call answered this one too.
    Coalesced,
    Bypass,
}

impl Served {
    /// The `x-switchyard-cache` value: a coalesced wait caused no upstream call of its own.
    pub(crate) fn header(self) -> &'static str {
        match self {
            Self::Hit | Self::Coalesced => "hit",
            Self::Miss => "miss",
            Self::Bypass => "bypass",
        }
    }
}

/// One route's cache.
#[derive(Clone)]
pub(crate) struct RouteCache {
    entries: Cache<u128, Answer>,
    metrics: CacheMetrics,
}

impl std::fmt::Debug for RouteCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteCache")
            .field("entries", &self.entries.entry_count())
            .finish_non_exhaustive()
    }
}

impl RouteCache {
    /// Its counters.
    pub(crate) fn metrics(&self) -> &CacheMetrics {
        &self.metrics
    }

    pub(crate) fn new(ttl: std::time::Duration, max_bytes: u64, metrics: CacheMetrics) -> Self {
        // A route's new cache (its plans changed) replaces the old one in the gauge too.
        metrics.bytes.set(0);
        let evictions = metrics.evictions.clone();
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &u128, v: &Answer| {
                u32::try_from(16 + v.response.len() + v.label.len()).unwrap_or(u32::MAX)
            })
            .time_to_live(ttl)
            .eviction_listener(move |_k, _v, cause| {
                if cause.was_evicted() {
                    evictions.inc();
                }
            })
            .build();
        Self { entries, metrics }
    }

    /// Serves from the cache or runs `upstream` (once for concurrent identical misses).
    /// Only full answers are stored: a failure or a degraded answer (a fallback target, a
    /// cascade's best so far, an ensemble short of a member) goes to this caller and to
    /// the callers waiting on the same call, and the next request runs afresh.
    pub(crate) async fn serve<F>(
        &self,
        key: u128,
        control: Control,
        upstream: F,
    ) -> Result<(Answer, Served), GatewayError>
    where
        F: std::future::Future<Output = Result<Answer, GatewayError>>,
    {
        let m = &self.metrics;
        let result = match control {
            Control::NoStore => {
                m.bypass.inc();
                return upstream.await.map(|a| (a, Served::Bypass));
            }
            Control::NoCache => {
                m.bypass.inc();
                let answer = upstream.await?;
                if answer.degraded {
                    return Ok((answer, Served::Miss));
                }
                self.entries.insert(key, answer.clone()).await;
                (answer, Served::Miss)
            }
            Control::Normal => {
                if let Some(hit) = self.entries.get(&key).await {
                    m.hits.inc();
                    return Ok((hit, Served::Hit));
                }
                // Whether this caller's own call ran (a miss), or it waited on another's.
                let ran = std::sync::atomic::AtomicBool::new(false);
                let call = async {
                    ran.store(true, std::sync::atomic::Ordering::Relaxed);
                    match upstream.await {
                        Ok(answer) if !answer.degraded => Ok(answer),
                        Ok(answer) => Err(NotStored::Degraded(answer)),
                        Err(e) => Err(NotStored::Failed(e)),
                    }
                };
                let got = self.entries.entry(key).or_try_insert_with(call).await;
                let outcome = if ran.load(std::sync::atomic::Ordering::Relaxed) {
                    m.misses.inc();
                    Served::Miss
                } else {
                    m.coalesced.inc();
                    Served::Coalesced
                };
                match got {
                    Ok(entry) => (entry.into_value(), outcome),
                    Err(not_stored) => {
                        return match &*not_stored {
                            NotStored::Degraded(answer) => Ok((answer.clone(), outcome)),
                            NotStored::Failed(e) => Err(e.clone()),
                        };
                    }
                }
            }
        };
        if result.1 == Served::Miss {
            // moka applies writes lazily; settle them so the size (and evictions) are
            // current. Only stores pay for it, never hits.
            self.entries.run_pending_tasks().await;
            m.bytes
                .set(i64::try_from(self.entries.weighted_size()).unwrap_or(i64::MAX));
        }
        Ok(result)
    }
}

/// Why an upstream call's result was not stored.
#[derive(Debug)]
enum NotStored {
    Degraded(Answer),
    Failed(GatewayError),
}

/// A stored `ModelInferResponse` answering another caller: its `id` (field 3) becomes
/// this caller's. Protobuf lets the last occurrence of a scalar field win, so appending
/// the field replaces the first caller's id without touching the tensors.
pub(crate) fn with_id(response: &Bytes, id: &str) -> Bytes {
    let mut out = BytesMut::with_capacity(response.len() + id.len() + 11);
    out.extend_from_slice(response);
    out.extend_from_slice(&[0x1a]);
    prost::encoding::encode_varint(id.len() as u64, &mut out);
    out.extend_from_slice(id.as_bytes());
    out.freeze()
}

/// The cache key of a request to `route` that will run the plan whose meaning `plan_key`
/// hashes, and the request's `id` (which a stored answer takes on for this caller).
///
/// The key is computed from the message's fields as they arrived (`split_infer_request`
/// checked them), without decoding it: memory stays constant whatever the request holds.
/// Inputs, requested outputs and raw contents count in their order (raw contents pair
/// with inputs by position); parameters count whatever their order (a map has none), all
/// but those that change when or how an answer comes (`NOT_IN_KEY`); the `id` does not.
pub(crate) fn key(route: &str, plan_key: u64, message: &InferMessage) -> (u128, String) {
    let mut h = Xxh3::new();
    let mut put = |bytes: &[u8]| {
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    put(route.as_bytes());
    put(&plan_key.to_le_bytes());
    let mut id = String::new();
    let mut parameters = 0u128;
    for chunk in &message.rest {
        for (field, value) in fields(chunk) {
            match field {
                ID => id = String::from_utf8_lossy(value).into_owned(),
                PARAMETERS => {
                    if entry_key(value).is_some_and(|k| NOT_IN_KEY.contains(&k)) {
                        continue;
                    }
                    parameters = parameters.wrapping_add(xxh3_128(value));
                }
                other => {
                    put(&other.to_le_bytes());
                    put(value);
                }
            }
        }
    }
    for tensor in &message.tensors {
        put(&RAW_INPUT_CONTENTS.to_le_bytes());
        put(tensor);
    }
    put(&parameters.to_le_bytes());
    (h.digest128(), id)
}

/// `ModelInferRequest.id`.
const ID: u32 = 3;
/// `ModelInferRequest.parameters`.
const PARAMETERS: u32 = 4;
/// `ModelInferRequest.raw_input_contents`.
const RAW_INPUT_CONTENTS: u32 = 7;

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::grpc::infer::split_infer_request;
    use prometheus::{IntCounter, IntGauge};
    use prost::Message;
    use switchyard_proto::inference::model_infer_request::InferInputTensor;
    use switchyard_proto::inference::{ModelInferRequest, ModelInferResponse};

    fn metrics() -> CacheMetrics {
        let c = |n: &str| IntCounter::new(format!("c_{n}"), "t").unwrap();
        CacheMetrics {
            hits: c("h"),
            misses: c("m"),
            coalesced: c("c"),
            bypass: c("b"),
            evictions: c("e"),
            bytes: IntGauge::new("g", "t").unwrap(),
        }
    }

    fn message(values: [u8; 4], timeout: Option<i64>) -> InferMessage {
        let mut r = ModelInferRequest {
            model_name: "route".into(),
            id: "any".into(),
            inputs: vec![InferInputTensor {
                name: "x".into(),
                datatype: "UINT8".into(),
                shape: vec![1, 4],
                ..Default::default()
            }],
            raw_input_contents: vec![Bytes::copy_from_slice(&values)],
            ..Default::default()
        };
        if let Some(t) = timeout {
            r.parameters.insert(
                "timeout".into(),
                switchyard_proto::inference::InferParameter {
                    parameter_choice: Some(
                        switchyard_proto::inference::infer_parameter::ParameterChoice::Int64Param(
                            t,
                        ),
                    ),
                },
            );
        }
        split_infer_request(&Bytes::from(r.encode_to_vec())).unwrap()
    }

    fn answer(n: usize) -> Answer {
        Answer {
            response: Bytes::from(vec![n as u8; 8]),
            by: super::super::AnsweredBy::Target(crate::routing::TargetId(0)),
            label: "m/1".into(),
            cascade: None,
            degraded: false,
            pipeline: None,
            switch: None,
            overflow: None,
        }
    }

    #[test]
    fn keys_depend_on_what_decides_the_answer_only() {
        let k = |m: &InferMessage, plan: u64| key("r", plan, m).0;
        let base = k(&message([1, 2, 3, 4], None), 7);
        assert_eq!(
            base,
            k(&message([1, 2, 3, 4], Some(5000)), 7),
            "timeouts and ids do not matter"
        );
        assert_ne!(base, k(&message([1, 2, 3, 5], None), 7), "tensor bytes do");
        assert_ne!(
            base,
            k(&message([1, 2, 3, 4], None), 8),
            "the plan that runs does"
        );
    }

    #[tokio::test]
    async fn hits_bypasses_and_control_headers() {
        let cache = RouteCache::new(Duration::from_secs(60), 1 << 20, metrics());
        let calls = AtomicUsize::new(0);
        let run = || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            Ok(answer(n))
        };
        let (a, o) = cache.serve(1, Control::Normal, run()).await.unwrap();
        assert_eq!((o, a.response[0]), (Served::Miss, 0));
        let (a, o) = cache.serve(1, Control::Normal, run()).await.unwrap();
        assert_eq!(
            (o, a.response[0]),
            (Served::Hit, 0),
            "served from the cache"
        );
        let (a, o) = cache.serve(1, Control::NoCache, run()).await.unwrap();
        assert_eq!(
            (o, a.response[0]),
            (Served::Miss, 1),
            "no-cache skips the lookup"
        );
        let (a, _) = cache.serve(1, Control::Normal, run()).await.unwrap();
        assert_eq!(a.response[0], 1, "and stores the fresh answer");
        let (a, o) = cache.serve(2, Control::NoStore, run()).await.unwrap();
        assert_eq!((o, a.response[0]), (Served::Bypass, 2));
        let (_, o) = cache.serve(2, Control::Normal, run()).await.unwrap();
        assert_eq!(o, Served::Miss, "no-store stored nothing");
        let failed = cache
            .serve(3, Control::Normal, async {
                Err(GatewayError::BadRequest("no".into()))
            })
            .await;
        assert!(failed.is_err());
        let (_, o) = cache.serve(3, Control::Normal, run()).await.unwrap();
        assert_eq!(o, Served::Miss, "errors are never stored");
        assert_eq!(
            Control::from_header(Some(b"max-age=0, No-Store")),
            Control::NoStore
        );
        assert_eq!(Control::from_header(Some(b"no-cache")), Control::NoCache);
    }

    #[tokio::test]
    async fn concurrent_identical_misses_share_one_upstream_call() {
        let cache = RouteCache::new(Duration::from_secs(60), 1 << 20, metrics());
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move {
                    cache
                        .serve(9, Control::Normal, async {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok(answer(5))
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            let (a, o) = t.await.unwrap();
            assert_eq!(a.response[0], 5);
            outcomes.push(o);
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one upstream call for sixteen requests"
        );
        assert_eq!(outcomes.iter().filter(|o| **o == Served::Miss).count(), 1);
        assert_eq!(cache.metrics.coalesced.get() + cache.metrics.hits.get(), 15);
    }

    #[tokio::test]
    async fn entries_expire_after_the_ttl() {
        // moka keeps its own clock, so this waits for real: 150 ms.
        let cache = RouteCache::new(Duration::from_millis(100), 1 << 20, metrics());
        cache
            .serve(1, Control::Normal, async { Ok(answer(1)) })
            .await
            .unwrap();
        assert_eq!(
            cache
                .serve(1, Control::Normal, async { Ok(answer(2)) })
                .await
                .unwrap()
                .1,
            Served::Hit
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        let (a, o) = cache
            .serve(1, Control::Normal, async { Ok(answer(3)) })
            .await
            .unwrap();
        assert_eq!((o, a.response[0]), (Served::Miss, 3));
    }

    fn degraded(n: usize) -> Answer {
        Answer {
            degraded: true,
            pipeline: None,
            switch: None,
            overflow: None,
            ..answer(n)
        }
    }

    #[tokio::test]
    async fn a_degraded_answer_is_returned_but_never_stored() {
        let cache = RouteCache::new(Duration::from_secs(60), 1 << 20, metrics());
        let (a, o) = cache
            .serve(1, Control::Normal, async { Ok(degraded(1)) })
            .await
            .unwrap();
        assert_eq!((o, a.response[0]), (Served::Miss, 1));
        let (a, o) = cache
            .serve(1, Control::NoCache, async { Ok(degraded(2)) })
            .await
            .unwrap();
        assert_eq!((o, a.response[0]), (Served::Miss, 2));
        let (a, o) = cache
            .serve(1, Control::Normal, async { Ok(answer(3)) })
            .await
            .unwrap();
        assert_eq!(
            (o, a.response[0]),
            (Served::Miss, 3),
            "the degraded answers were not stored"
        );
        let (_, o) = cache
            .serve(1, Control::Normal, async { Ok(answer(4)) })
            .await
            .unwrap();
        assert_eq!(o, Served::Hit, "a full answer is");
    }

    #[tokio::test]
    async fn waiters_share_a_failed_call_once_and_the_next_request_runs_afresh() {
        let cache = RouteCache::new(Duration::from_secs(60), 1 << 20, metrics());
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move {
                    cache
                        .serve(5, Control::Normal, async {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Err(GatewayError::BadRequest("boom".into()))
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap().is_err());
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one call for the eight");
        let (_, o) = cache
            .serve(5, Control::Normal, async { Ok(answer(1)) })
            .await
            .unwrap();
        assert_eq!(o, Served::Miss, "the failure was not cached");
    }

    #[test]
    fn a_stored_answer_takes_on_the_callers_id() {
        let stored = ModelInferResponse {
            model_name: "m".into(),
            id: "first-caller".into(),
            ..Default::default()
        }
        .encode_to_vec();
        let mine = ModelInferResponse::decode(with_id(&Bytes::from(stored.clone()), "me")).unwrap();
        assert_eq!((mine.id.as_str(), mine.model_name.as_str()), ("me", "m"));
        let none = ModelInferResponse::decode(with_id(&Bytes::from(stored), "")).unwrap();
        assert_eq!(none.id, "", "a caller without an id gets none");
    }

    /// A request's bytes from its head and extra parameter entries, in the given order.
    fn with_parameters(order: &[(&str, i64)]) -> InferMessage {
        let mut bytes = ModelInferRequest {
            model_name: "route".into(),
            id: "caller-7".into(),
            ..Default::default()
        }
        .encode_to_vec();
        for (k, v) in order {
            let mut one = ModelInferRequest::default();
            one.parameters.insert(
                (*k).to_owned(),
                switchyard_proto::inference::InferParameter {
                    parameter_choice: Some(
                        switchyard_proto::inference::infer_parameter::ParameterChoice::Int64Param(
                            *v,
                        ),
                    ),
                },
            );
            bytes.extend(one.encode_to_vec());
        }
        split_infer_request(&Bytes::from(bytes)).unwrap()
    }

    #[test]
    fn parameters_count_whatever_their_order_and_the_id_comes_back() {
        let a = key(
            "r",
            1,
            &with_parameters(&[("top_k", 3), ("temperature", 1)]),
        );
        let b = key(
            "r",
            1,
            &with_parameters(&[("temperature", 1), ("top_k", 3)]),
        );
        assert_eq!(a, b);
        assert_eq!(a.1, "caller-7");
        let c = key(
            "r",
            1,
            &with_parameters(&[("temperature", 1), ("top_k", 4)]),
        );
        assert_ne!(a.0, c.0, "a parameter's value is part of the key");
        let d = key(
            "r",
            1,
            &with_parameters(&[("top_k", 3), ("temperature", 1), ("priority", 9)]),
        );
        assert_eq!(a.0, d.0, "priority changes when, not what");
    }

    #[test]
    fn a_key_over_many_empty_inputs_decodes_nothing() {
        // 2 bytes on the wire per input; decoded, each would be a few hundred bytes. (Many
        // more are refused before the cache sees them: `wire::decoded_limit`.)
        let mut bytes = ModelInferRequest {
            model_name: "route".into(),
            ..Default::default()
        }
        .encode_to_vec();
        bytes.extend(std::iter::repeat_n([0x2a, 0x00], 2_000).flatten());
        let message = split_infer_request(&Bytes::from(bytes)).unwrap();
        let (k, id) = key("r", 1, &message);
        assert_eq!(id, "");
        assert_ne!(k, key("r", 1, &message_of_inputs(1_999)).0);
    }

    fn message_of_inputs(n: usize) -> InferMessage {
        let mut bytes = ModelInferRequest {
            model_name: "route".into(),
            ..Default::default()
        }
        .encode_to_vec();
        bytes.extend(std::iter::repeat_n([0x2a, 0x00], n).flatten());
        split_infer_request(&Bytes::from(bytes)).unwrap()
    }
}
