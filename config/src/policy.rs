//! Policy files (`policies/*.yaml`, schema version 1): one route each. The wire types here
//! are what ML teams write; `validate` checks them and `switchyard-gateway` compiles them.
//!
//! ```yaml
//! version: 1
//! route: digits
//! targets:
//!   mlp-v1: { backend: stable, model: digits_mlp, version: 1, release: v1.0.0 }
//!   mlp-v2: { backend: canary, model: digits_mlp, version: 2, release: v1.1.0 }
//! rules:
//!   - match: { headers: { x-model-version: v1.1.0 } }
//!     plan: mlp-v2
//! default:
//!   split: { sticky: header:x-user-id, salt: digits-ab-1, weights: { mlp-v1: 90, mlp-v2: 10 } }
//! fallback: [mlp-v1]
//! deadline: 250ms
//! ```

use std::borrow::Cow;
use std::fmt;

use indexmap::IndexMap;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::units::{At, HumanDuration};

/// One policy file: one route.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Schema version of this file; must be 1.
    pub version: At<u32>,
    /// The name clients call (`model_name` in gRPC, the path segment in REST).
    pub route: At<String>,
    /// The model versions this route may send traffic to, by name.
    pub targets: IndexMap<String, At<TargetConfig>>,
    /// Header rules, tried in order; the first match picks the plan.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// The plan for requests no rule matches.
    pub default: At<PlanConfig>,
    /// Targets tried in order when the chosen one is unavailable (breaker open, connect
    /// failure, or a retryable failure on an idempotent route).
    #[serde(default)]
    pub fallback: Vec<At<String>>,
    /// Time budget for a request, upstream calls and retries included. The client's
    /// `grpc-timeout` wins when shorter. Default: `limits.default_deadline` of gateway.yaml.
    #[serde(default)]
    pub deadline: Option<At<HumanDuration>>,
    /// Retries after the request reached a backend.
    #[serde(default)]
    pub retry: Option<At<RetryConfig>>,
    /// Whether a request's `model_version` may pin a target by its `release` or Triton
    /// version. Default true.
    #[serde(default = "yes")]
    pub version_pinning: bool,
    /// Named plans, usable wherever a target name is (split weights, cascade stages,
    /// ensemble members, pipeline steps, switch cases, rules, the default).
    #[serde(default)]
    pub plans: IndexMap<String, At<PlanConfig>>,
    /// A copy of sampled requests goes to this plan; its answer is compared with the
    /// primary's and never returned.
    #[serde(default)]
    pub shadow: Option<At<ShadowConfig>>,
    /// Cache successful responses (opt-in).
    #[serde(default)]
    pub cache: Option<At<CacheConfig>>,
    /// A canary rollout: the candidate takes a growing share of the baseline's traffic,
    /// step by step, while gates compare it with the baseline; a failed gate rolls it back.
    #[serde(default)]
    pub rollout: Option<At<RolloutConfig>>,
    /// Priority classes read from a request header: when a target's pool is full and it
    /// has no overflow (or that is full too), the lowest class is refused first.
    #[serde(default)]
    pub priority: Option<At<PriorityConfig>>,
}

/// Priority classes of a route's requests.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PriorityConfig {
    /// The request header naming the class (`x-priority`).
    pub header: String,
    /// The classes, lowest first (`[batch, standard, interactive]`); 1 to 8. Class `i`
    /// of `n` may fill an endpoint to `max_in_flight × (1 + i/n)` of its pool, so when
    /// everything is full the lowest is refused first (429 / RESOURCE_EXHAUSTED with
    /// `Retry-After`), the highest last.
    pub classes: Vec<String>,
    /// The class of a request without the header (or with a value not in `classes`).
    /// Default: the lowest.
    #[serde(default)]
    pub default: Option<String>,
}

/// A canary rollout of one route: ramp `candidate` through `steps` of `baseline`'s
/// traffic, judging the gates over each step.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// The target (or named plan) being rolled out.
    pub candidate: At<String>,
    /// The target (or named plan) whose requests the candidate takes a share of.
    pub baseline: At<String>,
    /// Percent of the baseline's requests the candidate takes at each step, increasing,
    /// each above 0 and at most 100.
    pub steps: At<Vec<f64>>,
    /// Time at each step before the gates are judged for the next.
    pub interval: At<HumanDuration>,
    /// Candidate requests (for `shadow_agreement`: comparisons) a gate needs in a step
    /// before it is judged. Default 200.
    #[serde(default = "two_hundred")]
    pub min_requests: u64,
    /// What the candidate must hold, compared with the baseline over each step.
    #[serde(default)]
    pub gates: GatesConfig,
    /// What a failed gate does. Default `rollback`.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// Candidate errors in a row that roll back at once, whatever the gates say.
    /// Default 5.
    #[serde(default = "five")]
    pub max_consecutive_errors: u32,
    /// `header:NAME`: requests with the same value keep their side of the rollout, and
    /// raising a step only adds keys to the candidate. Default: the route's first sticky
    /// split's header; without one, a random draw per request.
    #[serde(default)]
    pub sticky: Option<At<String>>,
}

/// The gates of a rollout; every gate given must hold.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GatesConfig {
    /// The candidate's error rate may exceed the baseline's by at most this much.
    #[serde(default)]
    pub error_rate: Option<At<ErrorRateGate>>,
    /// The candidate's p99 latency over the baseline's, at most.
    #[serde(default)]
    pub latency_p99: Option<At<LatencyGate>>,
    /// Top-1 agreement of the candidate's shadow answers with the baseline's, at least.
    /// Needs the route's `shadow` to be the candidate.
    #[serde(default)]
    pub shadow_agreement: Option<At<AgreementGate>>,
}

/// `error_rate: { max_increase: 0.01 }`.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorRateGate {
    /// Candidate error rate minus the baseline's, at most (0 to 1).
    pub max_increase: f64,
}

/// `latency_p99: { max_ratio: 1.5 }`.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LatencyGate {
    /// Candidate p99 over baseline p99, at most (1 to 100).
    pub max_ratio: f64,
}

/// `shadow_agreement: { min: 0.95 }`.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgreementGate {
    /// Share of compared requests whose top-1 class agrees, at least (above 0, at most 1).
    pub min: f64,
}

/// What a failed gate does to a rollout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The candidate gets nothing from the next request on.
    #[default]
    Rollback,
    /// The rollout holds its current step until resumed, promoted or aborted.
    Pause,
}

fn two_hundred() -> u64 {
    200
}

fn five() -> u32 {
    5
}

/// Shadow traffic: `target` or `plan`, a sampling percent and a concurrency bound.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// A target (or named plan) to shadow to.
    #[serde(default)]
    pub target: Option<String>,
    /// A plan to shadow to, instead of `target`.
    #[serde(default)]
    pub plan: Option<PlanConfig>,
    /// Share of requests copied, in percent (0 < percent <= 100). Default 100.
    #[serde(default = "hundred")]
    pub percent: f64,
    /// Shadow requests in flight at most; beyond it new copies are dropped and counted.
    /// Default 64.
    #[serde(default = "sixty_four")]
    pub max_in_flight: u32,
}

fn hundred() -> f64 {
    100.0
}

fn sixty_four() -> u32 {
    64
}

/// The response cache of a route.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// How long an entry serves. Default 60s.
    #[serde(default = "sixty_seconds")]
    pub ttl: HumanDuration,
    /// Memory for entries (keys and response bytes). Default 64MiB.
    #[serde(default = "sixty_four_mib")]
    pub max_bytes: crate::units::ByteSize,
}

fn sixty_seconds() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(60))
}

fn sixty_four_mib() -> crate::units::ByteSize {
    crate::units::ByteSize(64 << 20)
}

fn yes() -> bool {
    true
}

/// A leaf: one model version on one backend pool.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// A backend pool of gateway.yaml.
    pub backend: String,
    /// The model name on that backend.
    pub model: String,
    /// The Triton model version; absent: the backend's newest ready version.
    #[serde(default)]
    pub version: Option<u64>,
    /// A release label (`v1.2.3`) that clients may name in `model_version`.
    #[serde(default)]
    pub release: Option<String>,
    /// A target or plan that takes this target's requests when its pool is full: the
    /// backend answered RESOURCE_EXHAUSTED (or UNAVAILABLE from a full queue, as Triton
    /// says it), or every endpoint is at its pool's `max_in_flight`.
    #[serde(default)]
    pub overflow: Option<At<String>>,
}

/// A header rule.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// What a request must carry; every condition must hold.
    #[serde(rename = "match")]
    pub when: At<MatchConfig>,
    /// The plan for matching requests.
    pub plan: At<PlanConfig>,
}

/// Conditions of a rule.
#[derive(Debug, Clone, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// Header name to condition; all must hold.
    #[serde(default)]
    pub headers: IndexMap<String, HeaderMatchConfig>,
}

/// A condition on one header: a string means `exact`.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderMatchConfig {
    /// The value equals this string.
    Exact(String),
    /// The value starts with this string.
    Prefix(String),
    /// The value matches this regular expression (whole value, RE2 syntax).
    Regex(String),
    /// The header is present (`true`) or absent (`false`).
    Present(bool),
}

/// How a request picks a target, or combines several.
#[derive(Debug, Clone, PartialEq)]
pub enum PlanConfig {
    /// One target or named plan, by name (`plan: mlp-v2` or `{ target: mlp-v2 }`).
    Target(String),
    /// A weighted split across targets or named plans.
    Split(SplitConfig),
    /// Stages in order; a stage whose answer passes its acceptance test answers.
    Cascade(Vec<StageConfig>),
    /// Members in parallel; their outputs are combined.
    Ensemble(EnsembleConfig),
    /// Another route's plan (`{ route: digits }`): what that route would do.
    Route(String),
    /// Steps in order, each fed the request's tensors or earlier steps' outputs.
    Pipeline(PipelineConfig),
    /// One plan's answer picks the plan that answers.
    Switch(SwitchConfig),
}

/// A pipeline: steps run in order; a step's inputs are tensors of the client's request
/// (`request.NAME`) or outputs of earlier steps (`STEP.NAME`).
///
/// ```yaml
/// pipeline:
///   steps:
///     - name: features
///       plan: pca
///       inputs: { INPUT__0: request.INPUT__0 }
///     - name: classify
///       plan: pca-mlp
///       inputs: { FEATURES: features.features }
///   outputs: { probabilities: classify.probabilities }
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// The steps, in the order they run.
    pub steps: Vec<At<PipelineStepConfig>>,
    /// What the client gets: output name to `STEP.NAME`. Default: the last step's answer as
    /// it is.
    #[serde(default)]
    pub outputs: IndexMap<String, At<String>>,
}

/// One step of a pipeline.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineStepConfig {
    /// The step's name, which later steps and `outputs` read from (letters, digits, `_`
    /// and `-`; not `request`).
    pub name: At<String>,
    /// What runs: a target or plan name, or an inline plan.
    pub plan: At<PlanConfig>,
    /// The step's request: input name to `request.NAME` or `STEP.NAME` of an earlier step.
    /// Default (first step only): the client's request as it is.
    #[serde(default)]
    pub inputs: Option<IndexMap<String, At<String>>>,
}

/// A switch: `on` runs first; the first case whose condition its answer meets picks the
/// plan that answers, else `default` (by default, `on`'s answer, already computed).
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchConfig {
    /// The plan whose answer the cases look at.
    pub on: At<SwitchOnConfig>,
    /// Tried in order; the first that holds picks the plan.
    pub cases: Vec<At<CaseConfig>>,
    /// The plan when no case holds. Default: `on`'s plan, whose answer is returned as it is.
    #[serde(default)]
    pub default: Option<Box<At<PlanConfig>>>,
}

/// The answer a switch looks at.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SwitchOnConfig {
    /// A target or plan name; it runs on the client's request.
    #[serde(alias = "step")]
    pub plan: At<String>,
    /// The output tensor the conditions read. Default: the answer's first output.
    #[serde(default)]
    pub output: Option<String>,
}

/// One case of a switch.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaseConfig {
    /// The condition; every row of the output must meet it.
    pub when: At<WhenConfig>,
    /// The plan that answers when it holds; it runs on the client's request.
    pub plan: At<PlanConfig>,
}

/// A case's condition on each row of the output; every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WhenConfig {
    /// The row's highest value is at one of these (0-based) indices.
    #[serde(default)]
    pub argmax: Option<Vec<i64>>,
    /// The row's highest value is below this (0 < x <= 1).
    #[serde(default)]
    pub max_probability_below: Option<f64>,
    /// The highest value minus the second highest is below this (0 < x <= 1).
    #[serde(default)]
    pub margin_below: Option<f64>,
}

/// One cascade stage.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// What runs in this stage: a target or plan name, or an inline plan.
    pub plan: At<PlanConfig>,
    /// The test its answer must pass to be returned; every stage but the last has one.
    #[serde(default)]
    pub accept: Option<At<AcceptConfig>>,
}

/// A confidence test on one output tensor (per row; every row must pass).
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AcceptConfig {
    /// The highest value of the row is at least this (0 < x <= 1).
    #[serde(default)]
    pub max_probability: Option<f64>,
    /// The highest value minus the second highest is at least this (0 < x <= 1).
    #[serde(default)]
    pub margin: Option<f64>,
    /// The output tensor to test. Default: the response's first output.
    #[serde(default)]
    pub output: Option<String>,
}

/// How an ensemble combines its members' outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// Elementwise mean.
    Mean,
    /// Elementwise mean weighted by `weights`.
    WeightedMean,
    /// Per row, the class most members rank first (ties: the highest summed probability);
    /// the row becomes the mean of the members that voted for it.
    MajorityVote,
    /// Elementwise maximum.
    Max,
}

impl Combine {
    /// The name a policy file writes it with.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mean => "mean",
            Self::WeightedMean => "weighted_mean",
            Self::MajorityVote => "majority_vote",
            Self::Max => "max",
        }
    }
}

/// Members run in parallel; their outputs are combined.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnsembleConfig {
    /// The members: target or plan names, or inline plans.
    pub members: Vec<At<PlanConfig>>,
    /// How outputs are combined.
    pub combine: Combine,
    /// Weights of `weighted_mean`, one per member, each > 0.
    #[serde(default)]
    pub weights: Vec<f64>,
    /// Members that must answer; the answer combines the first that many. Default: all.
    #[serde(default)]
    pub quorum: Option<usize>,
    /// Time a member may take. Default: the route's deadline.
    #[serde(default)]
    pub member_timeout: Option<HumanDuration>,
}

/// A weighted split. Weights are relative (a draw in `[0, Σw)`), in file order.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// Target or plan name to weight (> 0), in order: with `sticky`, each member owns a fixed
    /// slice of the hash space in this order, so raising the weight of the last target
    /// only moves keys onto it.
    pub weights: IndexMap<String, At<i64>>,
    /// `header:NAME`: requests with the same value of header NAME always get the same
    /// target (nginx `split_clients`). Without it, or without the header, a random draw.
    #[serde(default)]
    pub sticky: Option<At<String>>,
    /// Mixed into the sticky hash, so that two experiments do not pick the same users.
    #[serde(default)]
    pub salt: String,
}

/// Retries after the request reached a backend.
#[derive(Debug, Clone, PartialEq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts after the first, 0 to 5. Default 1.
    #[serde(default = "one")]
    pub attempts: u32,
    /// Whether the models may safely run a request twice (inference usually can). A
    /// request that reached a backend is retried only when this is true. Default false.
    #[serde(default)]
    pub idempotent: bool,
}

fn one() -> u32 {
    1
}

// === impl PlanConfig ===

const PLAN_KINDS: &[&str] = &[
    "target", "split", "cascade", "ensemble", "route", "pipeline", "switch",
];

impl<'de> Deserialize<'de> for PlanConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PlanVisitor;
        impl<'de> Visitor<'de> for PlanVisitor {
            type Value = PlanConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a target or plan name, or a map with one key: target, split, cascade, ensemble, route, pipeline or switch")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PlanConfig, E> {
                Ok(PlanConfig::Target(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PlanConfig, A::Error> {
                let Some(kind) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        "an empty plan: write a target name, or { target: .. } or { split: .. }",
                    ));
                };
                let plan = match kind.as_str() {
                    "target" => PlanConfig::Target(map.next_value()?),
                    "split" => PlanConfig::Split(map.next_value()?),
                    "cascade" => PlanConfig::Cascade(map.next_value()?),
                    "ensemble" => PlanConfig::Ensemble(map.next_value()?),
                    "route" => PlanConfig::Route(map.next_value()?),
                    "pipeline" => PlanConfig::Pipeline(map.next_value()?),
                    "switch" => PlanConfig::Switch(map.next_value()?),
                    other => return Err(de::Error::unknown_variant(other, PLAN_KINDS)),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "a plan has exactly one kind, but this one also has '{extra}'; nest plans instead"
                    )));
                }
                Ok(plan)
            }
        }
        d.deserialize_any(PlanVisitor)
    }
}

impl JsonSchema for PlanConfig {
    fn schema_name() -> Cow<'static, str> {
        "Plan".into()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let split = generator.subschema_for::<SplitConfig>();
        let stages = generator.subschema_for::<Vec<StageConfig>>();
        let ensemble = generator.subschema_for::<EnsembleConfig>();
        let pipeline = generator.subschema_for::<PipelineConfig>();
        let switch = generator.subschema_for::<SwitchConfig>();
        let one = |key: &str, schema: Schema| json_schema!({ "type": "object", "properties": { key: schema }, "required": [key], "additionalProperties": false });
        json_schema!({
            "description": "How a request picks a target: a target or plan name, or one of { target }, { split }, { cascade }, { ensemble }, { route }, { pipeline }, { switch }",
            "oneOf": [
                { "type": "string", "description": "A target or plan name" },
                one("target", json_schema!({ "type": "string" })),
                one("split", split),
                one("cascade", stages),
                one("ensemble", ensemble),
                one("route", json_schema!({ "type": "string", "description": "Another route, whose plan this one uses" })),
                one("pipeline", pipeline),
                one("switch", switch)
            ]
        })
    }
}

// === impl HeaderMatchConfig ===

const HEADER_MATCH_KINDS: &[&str] = &["exact", "prefix", "regex", "present"];

impl<'de> Deserialize<'de> for HeaderMatchConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MatchVisitor;
        impl<'de> Visitor<'de> for MatchVisitor {
            type Value = HeaderMatchConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a header value, or a map with one key: exact, prefix, regex or present",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(HeaderMatchConfig::Exact(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Err(E::custom(format!(
                    "write {{ present: {v} }} to test for the header, or quote \"{v}\" to match the value"
                )))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(HeaderMatchConfig::Exact(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(HeaderMatchConfig::Exact(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let Some(kind) = map.next_key::<String>()? else {
                    return Err(de::Error::custom(
                        "an empty header condition: use exact, prefix, regex or present",
                    ));
                };
                let m = match kind.as_str() {
                    "exact" => HeaderMatchConfig::Exact(map.next_value()?),
                    "prefix" => HeaderMatchConfig::Prefix(map.next_value()?),
                    "regex" => HeaderMatchConfig::Regex(map.next_value()?),
                    "present" => HeaderMatchConfig::Present(map.next_value()?),
                    other => return Err(de::Error::unknown_variant(other, HEADER_MATCH_KINDS)),
                };
                if let Some(extra) = map.next_key::<String>()? {
                    return Err(de::Error::custom(format!(
                        "a header condition has one kind, but this one also has '{extra}'; add a second rule instead"
                    )));
                }
                Ok(m)
            }
        }
        d.deserialize_any(MatchVisitor)
    }
}

impl JsonSchema for HeaderMatchConfig {
    fn schema_name() -> Cow<'static, str> {
        "HeaderMatch".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        let one = |key: &str, ty: &str| json_schema!({ "type": "object", "properties": { key: { "type": ty } }, "required": [key], "additionalProperties": false });
        json_schema!({
            "description": "A header condition: a string (exact value), or one of exact, prefix, regex (whole value), present",
            "oneOf": [
                { "type": "string" },
                one("exact", "string"),
                one("prefix", "string"),
                one("regex", "string"),
                one("present", "boolean")
            ]
        })
    }
}
