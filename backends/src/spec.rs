//! A model's validated serving spec, built from its `config.pbtxt` (`ModelConfig`) and
//! checked against the ONNX graph: what the request path and the scheduler rely on.
//!
//! `ModelConfig` stays the wire form (what the ModelConfig RPC returns, completed from the
//! graph where the file left inputs or outputs out, as Triton's auto-complete does);
//! [`ModelSpec`] is the checked domain form with plain Rust types.

use std::time::Duration;

use switchyard_proto::ElementType;
use switchyard_proto::inference::{
    ModelConfig, ModelInput, ModelOutput, model_config::SchedulingChoice,
    model_instance_group::Kind, model_version_policy::PolicyChoice,
};

use crate::runtime::{Device, GraphTensor, RuntimeKind, Signature};

/// The platform string Triton uses for ONNX models.
pub(crate) const ONNX_PLATFORM: &str = "onnxruntime_onnx";
/// The backend name Triton uses for ONNX models.
pub(crate) const ONNX_BACKEND: &str = "onnxruntime";
/// The `config.pbtxt` parameter that picks a runtime for one model.
pub(crate) const RUNTIME_PARAMETER: &str = "switchyard.runtime";

/// One input or output as the model config declares it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorSpec {
    pub(crate) name: String,
    pub(crate) element: ElementType,
    /// Without the batch dimension when the model batches; `-1` is variable.
    pub(crate) dims: Vec<i64>,
}

/// Dynamic batching settings (`dynamic_batching { .. }`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct BatchingSpec {
    pub(crate) max_queue_delay: Duration,
    /// Ascending, each within `1..=max_batch_size`.
    pub(crate) preferred_batch_sizes: Vec<usize>,
    /// 0: unbounded.
    pub(crate) max_queue_size: usize,
}

/// Which versions of a model to serve.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum VersionPolicy {
    Latest(usize),
    All,
    Specific(Vec<u64>),
}

/// The validated model: everything the request path and scheduler read.
#[derive(Debug, Clone)]
pub(crate) struct ModelSpec {
    pub(crate) name: String,
    /// The completed config, as the ModelConfig RPC returns it.
    pub(crate) config: ModelConfig,
    /// 0: the model takes no batch dimension.
    pub(crate) max_batch_size: usize,
    pub(crate) inputs: Vec<TensorSpec>,
    pub(crate) outputs: Vec<TensorSpec>,
    /// `None`: every request runs alone.
    pub(crate) batching: Option<BatchingSpec>,
    pub(crate) instances: usize,
    pub(crate) device: Device,
    pub(crate) runtime: RuntimeKind,
    pub(crate) version_policy: VersionPolicy,
    pub(crate) model_filename: String,
}

impl ModelSpec {
    /// Checks a parsed config (before the graph is known). `dir_name` is the model folder.
    pub(crate) fn from_config(
        dir_name: &str,
        mut config: ModelConfig,
        default_runtime: RuntimeKind,
    ) -> Result<Self, String> {
        if config.name.is_empty() {
            config.name = dir_name.to_owned();
        } else if config.name != dir_name {
            return Err(format!(
                "name '{}' does not match the model folder '{dir_name}'",
                config.name
            ));
        }
        match (config.platform.as_str(), config.backend.as_str()) {
            ("" | ONNX_PLATFORM, "" | ONNX_BACKEND) => {
                config.platform = ONNX_PLATFORM.to_owned();
                config.backend = ONNX_BACKEND.to_owned();
            }
            (platform, backend) => {
                let what = if platform.is_empty() {
                    format!("backend '{backend}'")
                } else {
                    format!("platform '{platform}'")
                };
                return Err(format!(
                    "{what} is not supported: switchyard serves ONNX models (platform \"{ONNX_PLATFORM}\" or backend \"{ONNX_BACKEND}\")"
                ));
            }
        }
        let max_batch_size = usize::try_from(config.max_batch_size)
            .map_err(|_| format!("max_batch_size must be >= 0, got {}", config.max_batch_size))?;
        for unsupported in [
            (!config.batch_input.is_empty(), "batch_input"),
            (!config.batch_output.is_empty(), "batch_output"),
            (
                matches!(
                    config.scheduling_choice,
                    Some(SchedulingChoice::SequenceBatching(_))
                ),
                "sequence_batching",
            ),
            (
                matches!(
                    config.scheduling_choice,
                    Some(SchedulingChoice::EnsembleScheduling(_))
                ),
                "ensemble_scheduling",
            ),
            (
                config
                    .model_transaction_policy
                    .as_ref()
                    .is_some_and(|p| p.decoupled),
                "model_transaction_policy.decoupled",
            ),
        ] {
            if unsupported.0 {
                return Err(format!(
                    "{} is not supported by switchyard's backend",
                    unsupported.1
                ));
            }
        }
        let batching = match &config.scheduling_choice {
            Some(SchedulingChoice::DynamicBatching(db)) if max_batch_size > 0 => {
                let mut preferred = Vec::with_capacity(db.preferred_batch_size.len());
                for &size in &db.preferred_batch_size {
                    match usize::try_from(size) {
                        Ok(s) if (1..=max_batch_size).contains(&s) => preferred.push(s),
                        _ => {
                            return Err(format!(
                                "dynamic_batching.preferred_batch_size {size} must be between 1 and max_batch_size {max_batch_size}"
                            ));
                        }
                    }
                }
                preferred.sort_unstable();
                preferred.dedup();
                let max_queue_size = db
                    .default_queue_policy
                    .as_ref()
                    .map_or(0, |p| p.max_queue_size as usize);
                Some(BatchingSpec {
                    max_queue_delay: Duration::from_micros(db.max_queue_delay_microseconds),
                    preferred_batch_sizes: preferred,
                    max_queue_size,
                })
            }
            Some(SchedulingChoice::DynamicBatching(_)) => {
                return Err("dynamic_batching needs max_batch_size > 0".to_owned());
            }
            _ => None,
        };
        let version_policy = match config
            .version_policy
            .as_ref()
            .and_then(|p| p.policy_choice.as_ref())
        {
            None => VersionPolicy::Latest(1),
            Some(PolicyChoice::Latest(l)) if l.num_versions == 0 => {
                return Err("version_policy.latest.num_versions must be >= 1".to_owned());
            }
            Some(PolicyChoice::Latest(l)) => VersionPolicy::Latest(l.num_versions as usize),
            Some(PolicyChoice::All(_)) => VersionPolicy::All,
            Some(PolicyChoice::Specific(s)) => {
                let mut versions = Vec::with_capacity(s.versions.len());
                for &v in &s.versions {
                    match u64::try_from(v) {
                        Ok(v) if v > 0 => versions.push(v),
                        _ => {
                            return Err(format!(
                                "version_policy.specific.versions: {v} is not a version (versions are >= 1)"
                            ));
                        }
                    }
                }
                VersionPolicy::Specific(versions)
            }
        };
        let mut instances = 0usize;
        let mut device = Device::Cpu;
        for (i, group) in config.instance_group.iter().enumerate() {
            let count = usize::try_from(group.count)
                .map_err(|_| format!("instance_group[{i}].count must be >= 0"))?;
            instances += count.max(1);
            if group.kind() == Kind::Gpu {
                device = Device::Gpu(group.gpus.first().copied().unwrap_or(0));
            }
        }
        let instances = instances.max(1);
        let runtime = match config.parameters.get(RUNTIME_PARAMETER) {
            Some(p) => RuntimeKind::from_name(&p.string_value).ok_or_else(|| {
                format!(
                    "parameters[\"{RUNTIME_PARAMETER}\"] = \"{}\": expected \"tract\" or \"onnxruntime\"",
                    p.string_value
                )
            })?,
            // A GPU instance needs ONNX Runtime's CUDA execution provider.
            None if device != Device::Cpu => RuntimeKind::OnnxRuntime,
            None => default_runtime,
        };
        let model_filename = if config.default_model_filename.is_empty() {
            "model.onnx".to_owned()
        } else {
            config.default_model_filename.clone()
        };
        let inputs = config
            .input
            .iter()
            .map(input_spec)
            .collect::<Result<_, _>>()?;
        let outputs = config
            .output
            .iter()
            .map(output_spec)
            .collect::<Result<_, _>>()?;
        Ok(Self {
            name: config.name.clone(),
            config,
            max_batch_size,
            inputs,
            outputs,
            batching,
            instances,
            device,
            runtime,
            version_policy,
            model_filename,
        })
    }

    /// Completes missing inputs or outputs from the graph (Triton's auto-complete), then
    /// checks that the config and the graph agree on names, element types and ranks.
    pub(crate) fn complete_and_check(
        &mut self,
        graph: &Signature,
        file: &str,
    ) -> Result<(), String> {
        let batch_dims = usize::from(self.max_batch_size > 0);
        if self.inputs.is_empty() {
            self.inputs = complete(&graph.inputs, batch_dims, file, "input")?;
            self.config.input = self
                .inputs
                .iter()
                .map(|t| ModelInput {
                    name: t.name.clone(),
                    data_type: t.element.to_config() as i32,
                    dims: t.dims.clone(),
                    ..Default::default()
                })
                .collect();
        }
        if self.outputs.is_empty() {
            self.outputs = complete(&graph.outputs, batch_dims, file, "output")?;
            self.config.output = self
                .outputs
                .iter()
                .map(|t| ModelOutput {
                    name: t.name.clone(),
                    data_type: t.element.to_config() as i32,
                    dims: t.dims.clone(),
                    ..Default::default()
                })
                .collect();
        }
        let mut problems = Vec::new();
        for (kind, declared, actual) in [
            ("input", &self.inputs, &graph.inputs),
            ("output", &self.outputs, &graph.outputs),
        ] {
            for spec in declared {
                match actual.iter().find(|g| g.name == spec.name) {
                    None => problems.push(format!(
                        "config {kind} '{}' is not in {file}, whose {kind}s are {}",
                        spec.name,
                        describe(actual)
                    )),
                    Some(g) => check_tensor(kind, spec, g, batch_dims, file, &mut problems),
                }
            }
        }
        for g in &graph.inputs {
            if !self.inputs.iter().any(|s| s.name == g.name) {
                problems.push(format!(
                    "{file} needs input '{}', which config.pbtxt does not declare",
                    g.name
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }
}

fn input_spec(input: &ModelInput) -> Result<TensorSpec, String> {
    if input.reshape.is_some() {
        return Err(format!(
            "input '{}': reshape is not supported by switchyard's backend",
            input.name
        ));
    }
    if input.is_shape_tensor {
        return Err(format!(
            "input '{}': shape tensors are not supported",
            input.name
        ));
    }
    tensor_spec("input", &input.name, input.data_type, &input.dims)
}

fn output_spec(output: &ModelOutput) -> Result<TensorSpec, String> {
    if output.reshape.is_some() {
        return Err(format!(
            "output '{}': reshape is not supported by switchyard's backend",
            output.name
        ));
    }
    tensor_spec("output", &output.name, output.data_type, &output.dims)
}

fn tensor_spec(kind: &str, name: &str, data_type: i32, dims: &[i64]) -> Result<TensorSpec, String> {
    if name.is_empty() {
        return Err(format!("an {kind} has no name"));
    }
    let element = ElementType::from_config(data_type).ok_or_else(|| {
        format!("{kind} '{name}': data_type must be set (TYPE_FP32, TYPE_INT64, ...)")
    })?;
    if let Some(d) = dims.iter().find(|&&d| d == 0 || d < -1) {
        return Err(format!(
            "{kind} '{name}': dims may hold positive sizes or -1, not {d}"
        ));
    }
    Ok(TensorSpec {
        name: name.to_owned(),
        element,
        dims: dims.to_vec(),
    })
}

fn complete(
    graph: &[GraphTensor],
    batch_dims: usize,
    file: &str,
    kind: &str,
) -> Result<Vec<TensorSpec>, String> {
    graph
        .iter()
        .map(|g| {
            let element = g.element.clone().map_err(|t| {
                format!(
                    "{file} {kind} '{}' has type {t}, which KServe cannot carry",
                    g.name
                )
            })?;
            let dims = g.dims.clone().ok_or_else(|| {
                format!(
                    "{file} {kind} '{}' declares no shape, so config.pbtxt must list its dims",
                    g.name
                )
            })?;
            if dims.len() < batch_dims {
                return Err(format!(
                    "{file} {kind} '{}' has rank 0 but max_batch_size > 0 needs a batch dimension",
                    g.name
                ));
            }
            Ok(TensorSpec {
                name: g.name.clone(),
                element,
                dims: dims[batch_dims..].to_vec(),
            })
        })
        .collect()
}

fn check_tensor(
    kind: &str,
    spec: &TensorSpec,
    g: &GraphTensor,
    batch_dims: usize,
    file: &str,
    problems: &mut Vec<String>,
) {
    match &g.element {
        Ok(e) if *e == spec.element => {}
        Ok(e) => problems.push(format!(
            "{kind} '{}': config.pbtxt says {}, {file} says {}",
            spec.name,
            spec.element.to_config().as_str_name(),
            e.to_config().as_str_name()
        )),
        Err(t) => problems.push(format!(
            "{kind} '{}': {file} has type {t}, which KServe cannot carry",
            spec.name
        )),
    }
    let Some(dims) = &g.dims else { return };
    let rank = spec.dims.len() + batch_dims;
    if dims.len() != rank {
        let batch_note = if batch_dims == 1 {
            " (its dims plus the batch dimension, since max_batch_size > 0)"
        } else {
            ""
        };
        problems.push(format!(
            "{kind} '{}': config.pbtxt gives rank {rank}{batch_note}, {file} has rank {} with shape {dims:?}",
            spec.name,
            dims.len()
        ));
        return;
    }
    if batch_dims == 1 && dims[0] != -1 {
        problems.push(format!(
            "{kind} '{}': {file} fixes the first dimension at {}, so it cannot be batched; set max_batch_size: 0",
            spec.name, dims[0]
        ));
    }
    for (i, (&c, &m)) in spec.dims.iter().zip(&dims[batch_dims..]).enumerate() {
        if c != -1 && m != -1 && c != m {
            problems.push(format!(
                "{kind} '{}': dims[{i}] is {c} in config.pbtxt but {m} in {file}",
                spec.name
            ));
        }
    }
}

fn describe(tensors: &[GraphTensor]) -> String {
    let names: Vec<String> = tensors.iter().map(|t| format!("'{}'", t.name)).collect();
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}
