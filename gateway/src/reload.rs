//! Policy reload: parse, validate all files, build the whole snapshot, one atomic store.
//! Any error keeps the snapshot in force and is logged, counted and kept for the admin API.
//! Triggers: file changes in the policy folder or to gateway.yaml (debounced), SIGHUP (wired by the binary),
//! and `POST /admin/reload`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use std::time::SystemTime;

use notify_debouncer_full::notify::{EventKind, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, new_debouncer};
use switchyard_config::{Diagnostic, Diagnostics, load_policies};
use tracing::{info, warn};

use crate::Shared;
use crate::grpc::MODEL_METADATA;
use crate::routing::{self, Plan, RoutingTable, TargetId};
use crate::snapshot::{Kept, Snapshot};
use crate::upstream::{Pools, Upstreams};
use switchyard_proto::inference::model_metadata_response::TensorMetadata;

/// The longest a reload may take to read, validate and compile the policy folder.
const RELOAD_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// What a panicked reload task said.
fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => format!("panicked: {}", panic_text(&*p)),
        Err(e) => e.to_string(),
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_owned())
}

/// The outcome of the last reload attempt, for `GET /admin/policy`.
#[derive(Debug, Clone)]
pub(crate) struct ReloadStatus {
    pub(crate) at: SystemTime,
    pub(crate) trigger: String,
    /// The version now in force if the reload succeeded.
    pub(crate) version: Option<u64>,
    pub(crate) errors: Vec<String>,
}

/// What reloads keep between them.
#[derive(Debug)]
pub(crate) struct Reloads {
    /// The version the next successful reload gets (start-up loaded version 1).
    next_version: AtomicU64,
    /// One reload at a time (file events, SIGHUP and the admin API may race).
    lock: tokio::sync::Mutex<()>,
    /// The last attempt's outcome, for `GET /admin/policy`.
    pub(crate) last: ArcSwap<Option<ReloadStatus>>,
    /// What the file watcher watches, once it does (`GET /admin/policy`).
    pub(crate) watching: ArcSwap<Vec<String>>,
    /// Strategy state that outlives snapshots (caches, shadow bounds).
    kept: Kept,
}

impl Reloads {
    pub(crate) fn new(kept: Kept) -> Self {
        Self {
            next_version: AtomicU64::new(2),
            lock: tokio::sync::Mutex::new(()),
            last: ArcSwap::from_pointee(None),
            watching: ArcSwap::from_pointee(Vec::new()),
            kept,
        }
    }
}

impl Shared {
    /// Reloads the policy folder. On success the new snapshot serves every request that
    /// starts from now on; on failure nothing changes.
    pub(crate) async fn reload(self: &Arc<Self>, trigger: &str) -> Result<u64, Diagnostics> {
        let _one_at_a_time = self.reloads.lock.lock().await;
        let failed = |what: String| {
            Diagnostics(vec![switchyard_config::Diagnostic::file(
                &self.config.policies,
                what,
            )])
        };
        // gateway.yaml's `backends:` reload with the policies (the rest of the file takes
        // effect at a restart): its pools are resolved and built first, the policies are
        // compiled against them, and both go in force together or not at all.
        let (config, plan) = match self.config.file.as_deref() {
            Some(file) => {
                let file = file.to_path_buf();
                let read = tokio::task::spawn_blocking(move || {
                    switchyard_config::load_gateway_config(&file)
                })
                .await
                .map_err(|e| failed(format!("reading gateway.yaml failed: {}", panic_message(e))))
                .and_then(|r| r);
                match read {
                    Ok(fresh) => {
                        let plan = self.upstreams.plan(&fresh.backends).await;
                        let mut config = self.config.clone();
                        config.backends = fresh.backends;
                        (Arc::new(config), Some(plan))
                    }
                    Err(d) => return self.settle(trigger, Err(d)),
                }
            }
            None => (Arc::new(self.config.clone()), None),
        };
        let pools = plan
            .as_ref()
            .map_or_else(|| self.upstreams.pools(), |p| Arc::new(p.pools.clone()));
        // Reading, validating and compiling run on the blocking pool, bounded in time; a
        // panic there is a failed reload with its message, and the next reload still runs.
        let compiling = config.clone();
        let work = tokio::task::spawn_blocking(move || {
            let config = &compiling;
            load_policies(&config.policies, config).and_then(|policies| {
                routing::compile(&policies, config).map_err(|e| e.diagnostics())
            })
        });
        let compiled = match tokio::time::timeout(RELOAD_LIMIT, work).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(failed(format!("the reload failed: {}", panic_message(e)))),
            Err(_) => Err(failed(format!(
                "the reload took longer than {RELOAD_LIMIT:?} to read and compile the policies"
            ))),
        };
        // Ensemble members whose models' metadata disagree on an output, and pipeline or
        // switch mappings their models' metadata do not fit, are rejected now rather than
        // failing every request later.
        let checked = match compiled {
            Ok(table) => {
                let mut problems = check_ensemble_outputs(&self.upstreams, &pools, &table).await;
                problems.extend(check_pipelines(&self.upstreams, &pools, &table).await);
                if problems.is_empty() {
                    Ok(table)
                } else {
                    Err(Diagnostics(problems))
                }
            }
            Err(d) => Err(d),
        };
        let result = checked.and_then(|table| {
            let version = self.reloads.next_version.fetch_add(1, Ordering::AcqRel);
            let build = || {
                Snapshot::build(
                    version,
                    &table,
                    &self.upstreams,
                    &pools,
                    &self.metrics,
                    &self.reloads.kept,
                )
            };
            let snapshot = std::panic::catch_unwind(std::panic::AssertUnwindSafe(build))
                .map_err(|p| {
                    failed(format!(
                        "building the snapshot panicked: {}",
                        panic_text(&*p)
                    ))
                })?
                .map_err(|e| e.diagnostics())?;
            if let Some(plan) = plan {
                if !plan.is_empty() {
                    let (changed, removed) = plan.summary();
                    info!(trigger, ?changed, ?removed, "backend pools reloaded");
                }
                self.upstreams.commit(plan);
            }
            self.snapshot.store(Arc::new(snapshot));
            Ok(version)
        });
        self.settle(trigger, result)
    }

    /// Logs, counts and keeps a reload's outcome.
    fn settle(&self, trigger: &str, result: Result<u64, Diagnostics>) -> Result<u64, Diagnostics> {
        match &result {
            Ok(version) => {
                self.metrics.reload(true);
                self.metrics.policy_version.set(*version as i64);
                info!(trigger, version, "policies loaded");
            }
            Err(diagnostics) => {
                self.metrics.reload(false);
                let in_force = self.snapshot.load().version;
                for d in &diagnostics.0 {
                    warn!(trigger, in_force, "policy reload rejected: {d}");
                }
            }
        }
        self.reloads.last.store(Arc::new(Some(ReloadStatus {
            at: SystemTime::now(),
            trigger: trigger.to_owned(),
            version: result.as_ref().ok().copied(),
            errors: result
                .as_ref()
                .err()
                .map(|d| d.0.iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
        })));
        result
    }
}

/// Watches the policy folder and gateway.yaml, and reloads after each quiet period.
/// Handles editors that write in place, atomic renames, and Kubernetes ConfigMap volumes
/// (whose `..data` symlink is swapped in one rename): every event in the policy folder
/// counts, and so does one on gateway.yaml or a `..`-named entry beside it (the
/// ConfigMap's swap). A reload reads everything whole, so a half-written file can at
/// worst fail validation and leave the old snapshot in force until the write completes.
pub(crate) async fn watch(shared: Arc<Shared>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let policies = canonical(&shared.config.policies);
    // gateway.yaml's folder, watched for that one file (it often holds other things).
    let config_file = shared.config.file.as_deref().and_then(|f| {
        let name = f.file_name()?.to_owned();
        let dir = f.parent().filter(|d| !d.as_os_str().is_empty());
        Some((canonical(dir.unwrap_or(Path::new("."))), name))
    });
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let relevant = Watched {
        policies: policies.clone(),
        config_file: config_file.clone(),
    };
    let debouncer = new_debouncer(
        shared.config.reload.debounce.0,
        None,
        move |result: DebounceEventResult| {
            if let Ok(events) = &result
                && events
                    .iter()
                    // notify reports opens and reads too (inotify's IN_OPEN): a reload
                    // reading the files must not look like an edit, or it triggers the next.
                    .filter(|e| !matches!(e.kind, EventKind::Access(_)))
                    .flat_map(|e| e.paths.iter())
                    .any(|p| relevant.matters(p))
            {
                let _ = tx.send(());
            }
        },
    );
    let mut debouncer = match debouncer {
        Ok(d) => d,
        Err(e) => {
            warn!(dir = %policies.display(), "cannot watch the policy folder: {e}; reload with SIGHUP or POST /admin/reload");
            return;
        }
    };
    if let Err(e) = debouncer.watch(&policies, RecursiveMode::NonRecursive) {
        warn!(dir = %policies.display(), "cannot watch the policy folder: {e}; reload with SIGHUP or POST /admin/reload");
        return;
    }
    info!(dir = %policies.display(), "watching policies");
    let mut watching = vec![policies.display().to_string()];
    if let Some((dir, name)) = &config_file
        && *dir != policies
    {
        match debouncer.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                info!(file = %dir.join(name).display(), "watching the deployment file");
                watching.push(dir.join(name).display().to_string());
            }
            Err(e) => warn!(
                file = %dir.join(name).display(),
                "cannot watch the deployment file: {e}; its backends reload with SIGHUP, POST /admin/reload or a policy change"
            ),
        }
    }
    shared.reloads.watching.store(Arc::new(watching));
    loop {
        tokio::select! {
            event = rx.recv() => {
                if event.is_none() { return; }
                // Coalesce a burst of batches into one reload.
                while rx.try_recv().is_ok() {}
                let _ = shared.reload("file change").await;
            }
            _ = stop.changed() => return,
        }
    }
}

/// A folder as the watcher reports paths in it (symlinks resolved), or as written.
fn canonical(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// Which file events cause a reload.
struct Watched {
    policies: PathBuf,
    /// gateway.yaml's folder and file name.
    config_file: Option<(PathBuf, std::ffi::OsString)>,
}

impl Watched {
    fn matters(&self, path: &Path) -> bool {
        let Some(parent) = path.parent() else {
            return false;
        };
        if parent == self.policies {
            return true;
        }
        match (&self.config_file, path.file_name()) {
            (Some((dir, name)), Some(file)) if parent == dir => {
                file == name || file.as_encoded_bytes().starts_with(b"..")
            }
            _ => false,
        }
    }
}

/// How long a reload waits for a member's `ModelMetadata`.
const METADATA_BUDGET: std::time::Duration = std::time::Duration::from_secs(1);

/// Asks the backends for the metadata of every ensemble member that is a target and
/// reports outputs that members share by name but not by datatype or shape (a `-1`
/// dimension matches any). Members whose backend does not answer are not checked here;
/// combining their outputs fails at request time with the same description instead.
async fn check_ensemble_outputs(
    upstreams: &Upstreams,
    pools: &Pools,
    table: &RoutingTable,
) -> Vec<Diagnostic> {
    use switchyard_proto::inference::ModelMetadataResponse;
    let mut problems = Vec::new();
    for route in table.routes() {
        for (i, plan) in route.plans.iter().enumerate() {
            let Plan::Ensemble(e) = plan else { continue };
            let members: Vec<TargetId> = e
                .members
                .iter()
                .filter_map(|(m, _)| match route.plan(*m) {
                    Plan::Target(t) => Some(*t),
                    _ => None,
                })
                .collect();
            let fetches = members.iter().map(|&t| async move {
                target_metadata(upstreams, pools, route, t)
                    .await
                    .map(|m| (t, m))
            });
            let known: Vec<(TargetId, ModelMetadataResponse)> =
                futures_util::future::join_all(fetches)
                    .await
                    .into_iter()
                    .flatten()
                    .collect();
            let Some((first, reference)) = known.first() else {
                continue;
            };
            for (t, meta) in &known[1..] {
                for clash in output_clashes(&reference.outputs, &meta.outputs) {
                    problems.push(Diagnostic::file(
                        std::path::Path::new(&*route.file),
                        format!(
                            "route '{}': ensemble '{}' cannot combine {clash} ({} vs {}, from the models' metadata)",
                            route.name,
                            route.plan_name(routing::PlanId(i as u16)),
                            route.target(*first).name,
                            route.target(*t).name,
                        ),
                    ));
                }
            }
        }
    }
    problems
}

/// A target's `ModelMetadata`, or `None` when its backend does not answer in time.
async fn target_metadata(
    upstreams: &Upstreams,
    pools: &Pools,
    route: &routing::Route,
    t: TargetId,
) -> Option<switchyard_proto::inference::ModelMetadataResponse> {
    use switchyard_proto::inference::{ModelMetadataRequest, ModelMetadataResponse};
    let spec = route.target(t);
    let endpoint = pools.get(&*spec.backend)?.pick()?;
    let req = ModelMetadataRequest {
        name: spec.model.to_string(),
        version: spec.version.to_string(),
    };
    upstreams
        .control::<_, ModelMetadataResponse>(&endpoint, MODEL_METADATA, &req, METADATA_BUDGET)
        .await
        .ok()
}

/// Checks every pipeline's mappings and every switch's output against the models'
/// metadata: a step's inputs must be the inputs its model takes, each read from an output
/// the earlier step's model gives with the same datatype and a fitting shape, and the
/// client's outputs must exist. Steps that are not a single target, and targets whose
/// backend does not answer, are not checked here; at request time a missing tensor is
/// an error naming the step and the tensor.
async fn check_pipelines(
    upstreams: &Upstreams,
    pools: &Pools,
    table: &RoutingTable,
) -> Vec<Diagnostic> {
    let mut problems = Vec::new();
    for route in table.routes() {
        let file = std::path::Path::new(&*route.file);
        for (i, plan) in route.plans.iter().enumerate() {
            let plan_name = route.plan_name(routing::PlanId(i as u16));
            match plan {
                Plan::Pipeline(p) => {
                    let metas = futures_util::future::join_all(p.steps.iter().map(|st| async {
                        match route.plan(st.plan) {
                            Plan::Target(t) => target_metadata(upstreams, pools, route, *t)
                                .await
                                .map(|m| (route.target(*t).label.clone(), m)),
                            _ => None,
                        }
                    }))
                    .await;
                    for text in pipeline_problems(p, &metas) {
                        problems.push(Diagnostic::new(
                            file,
                            text.0,
                            text.1,
                            "",
                            format!(
                                "route '{}': pipeline '{plan_name}' {} (from the models' metadata)",
                                route.name, text.2
                            ),
                        ));
                    }
                }
                Plan::Switch(sw) => {
                    let (Some(output), Plan::Target(t)) = (&sw.output, route.plan(sw.on)) else {
                        continue;
                    };
                    let Some(meta) = target_metadata(upstreams, pools, route, *t).await else {
                        continue;
                    };
                    if !meta.outputs.iter().any(|o| *o.name == **output) {
                        problems.push(Diagnostic::new(
                            file,
                            sw.line,
                            sw.column,
                            "",
                            format!(
                                "route '{}': switch '{plan_name}' reads output '{output}' of {}, which has no such output; its outputs: {} (from the models' metadata)",
                                route.name,
                                route.target(*t).label,
                                names(&meta.outputs)
                            ),
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    problems
}

fn names(ts: &[TensorMetadata]) -> String {
    let n: Vec<&str> = ts.iter().map(|t| t.name.as_str()).collect();
    if n.is_empty() {
        "none".into()
    } else {
        n.join(", ")
    }
}

/// What does not fit in a pipeline, as (line, column, message), given each step's model
/// label and metadata where known.
fn pipeline_problems(
    p: &routing::Pipeline,
    metas: &[Option<(
        std::sync::Arc<str>,
        switchyard_proto::inference::ModelMetadataResponse,
    )>],
) -> Vec<(u64, u64, String)> {
    use routing::Source;
    let mut out = Vec::new();
    let fits = |a: &TensorMetadata, b: &TensorMetadata| {
        a.datatype == b.datatype
            && a.shape.len() == b.shape.len()
            && a.shape
                .iter()
                .zip(&b.shape)
                .all(|(x, y)| x == y || *x == -1 || *y == -1)
    };
    let producer = |j: usize, tensor: &str| -> Result<Option<TensorMetadata>, String> {
        let Some((label, meta)) = &metas[j] else {
            return Ok(None);
        };
        match meta.outputs.iter().find(|o| o.name == tensor) {
            Some(o) => Ok(Some(o.clone())),
            None => Err(format!(
                "step '{}' ({label}) has no output '{tensor}'; its outputs: {}",
                p.steps[j].name,
                names(&meta.outputs)
            )),
        }
    };
    for (i, step) in p.steps.iter().enumerate() {
        let (Some(maps), Some((label, meta))) = (&step.inputs, &metas[i]) else {
            continue;
        };
        for m in maps.iter() {
            let at = |msg: String| {
                (
                    m.line,
                    m.column,
                    format!("step '{}' input '{}': {msg}", step.name, m.name),
                )
            };
            let Some(input) = meta.inputs.iter().find(|x| *x.name == *m.name) else {
                out.push(at(format!(
                    "{label} has no input '{}'; its inputs: {}",
                    m.name,
                    names(&meta.inputs)
                )));
                continue;
            };
            if let Source::Step(j) = m.from {
                match producer(j, &m.tensor) {
                    Err(e) => out.push(at(e)),
                    Ok(Some(o)) if !fits(&o, input) => out.push(at(format!(
                        "{}.{} is {} {:?} but {label} takes {} {:?}",
                        p.steps[j].name, m.tensor, o.datatype, o.shape, input.datatype, input.shape
                    ))),
                    Ok(_) => {}
                }
            }
        }
        for input in &meta.inputs {
            if !maps.iter().any(|m| *m.name == *input.name) {
                out.push((
                    step.line,
                    0,
                    format!(
                        "step '{}': {label} takes input '{}' ({} {:?}), which its inputs do not map",
                        step.name, input.name, input.datatype, input.shape
                    ),
                ));
            }
        }
    }
    for m in p.outputs.iter() {
        if let Source::Step(j) = m.from
            && let Err(e) = producer(j, &m.tensor)
        {
            out.push((m.line, m.column, format!("output '{}': {e}", m.name)));
        }
    }
    out
}

/// Outputs two members share by name but not by datatype or shape (`-1` matches any size).
fn output_clashes(a: &[TensorMetadata], b: &[TensorMetadata]) -> Vec<String> {
    let mut clashes = Vec::new();
    for out in b {
        let Some(theirs) = a.iter().find(|o| o.name == out.name) else {
            continue;
        };
        let fits = theirs.datatype == out.datatype
            && theirs.shape.len() == out.shape.len()
            && theirs
                .shape
                .iter()
                .zip(&out.shape)
                .all(|(x, y)| x == y || *x == -1 || *y == -1);
        if !fits {
            clashes.push(format!(
                "output '{}': {} {:?} vs {} {:?}",
                out.name, theirs.datatype, theirs.shape, out.datatype, out.shape
            ));
        }
    }
    clashes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watcher_reloads_for_policies_gateway_yaml_and_configmap_swaps_only() {
        let w = Watched {
            policies: PathBuf::from("/etc/sy/policies"),
            config_file: Some((PathBuf::from("/etc/sy"), "gateway.yaml".into())),
        };
        assert!(w.matters(Path::new("/etc/sy/policies/digits.yaml")));
        assert!(w.matters(Path::new("/etc/sy/policies/.digits.yaml.swp")));
        assert!(w.matters(Path::new("/etc/sy/gateway.yaml")));
        assert!(w.matters(Path::new("/etc/sy/..data")));
        assert!(w.matters(Path::new("/etc/sy/..data_tmp")));
        assert!(!w.matters(Path::new("/etc/sy/notes.txt")));
        assert!(!w.matters(Path::new("/etc/sy/.switchyard/rollout-digits.json")));
        assert!(!w.matters(Path::new("/elsewhere/gateway.yaml")));
    }

    fn t(name: &str, datatype: &str, shape: &[i64]) -> TensorMetadata {
        TensorMetadata {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn pipeline_mappings_are_checked_against_each_steps_metadata() {
        use crate::routing::{Mapping, Pipeline, PlanId, Source, Step};
        use switchyard_proto::inference::ModelMetadataResponse;
        let meta =
            |inputs: Vec<TensorMetadata>, outputs: Vec<TensorMetadata>| ModelMetadataResponse {
                inputs,
                outputs,
                ..Default::default()
            };
        let map = |name: &str, from: Source, tensor: &str, line: u64| Mapping {
            name: name.into(),
            from,
            tensor: tensor.into(),
            line,
            column: 1,
        };
        let p = Pipeline {
            steps: vec![
                Step {
                    name: "a".into(),
                    plan: PlanId(0),
                    inputs: None,
                    line: 1,
                },
                Step {
                    name: "b".into(),
                    plan: PlanId(1),
                    inputs: Some(vec![map("X", Source::Step(0), "features", 5)].into()),
                    line: 4,
                },
            ]
            .into(),
            outputs: vec![map("p", Source::Step(1), "probabilities", 9)].into(),
        };
        let a = meta(
            vec![t("IN", "FP32", &[-1, 64])],
            vec![t("features", "FP32", &[-1, 16])],
        );
        let fits = meta(
            vec![t("X", "FP32", &[-1, 16])],
            vec![t("probabilities", "FP32", &[-1, 10])],
        );
        let known = |b: ModelMetadataResponse| {
            vec![Some(("a/1".into(), a.clone())), Some(("b/1".into(), b))]
        };
        assert!(pipeline_problems(&p, &known(fits)).is_empty());
        let fp64 = meta(
            vec![t("X", "FP64", &[-1, 16])],
            vec![t("probabilities", "FP32", &[-1, 10])],
        );
        assert_eq!(
            pipeline_problems(&p, &known(fp64)),
            [(
                5,
                1,
                "step 'b' input 'X': a.features is FP32 [-1, 16] but b/1 takes FP64 [-1, 16]"
                    .to_owned()
            )]
        );
        let other = meta(
            vec![t("X", "FP32", &[-1, 16]), t("Y", "FP32", &[-1, 2])],
            vec![t("logits", "FP32", &[-1, 10])],
        );
        let problems: Vec<String> = pipeline_problems(&p, &known(other))
            .into_iter()
            .map(|p| p.2)
            .collect();
        assert_eq!(
            problems,
            [
                "step 'b': b/1 takes input 'Y' (FP32 [-1, 2]), which its inputs do not map",
                "output 'p': step 'b' (b/1) has no output 'probabilities'; its outputs: logits",
            ]
        );
        assert!(
            pipeline_problems(&p, &[None, None]).is_empty(),
            "steps whose metadata is unknown are not checked"
        );
    }

    #[test]
    fn ensemble_outputs_clash_on_datatype_or_shape_only() {
        let mlp = [t("probabilities", "FP32", &[-1, 10])];
        assert!(
            output_clashes(&mlp, &[t("probabilities", "FP32", &[4, 10])]).is_empty(),
            "-1 matches"
        );
        assert!(
            output_clashes(&mlp, &[t("logits", "FP16", &[-1, 3])]).is_empty(),
            "other names are not combined"
        );
        assert_eq!(
            output_clashes(&mlp, &[t("probabilities", "FP32", &[-1, 5])]),
            ["output 'probabilities': FP32 [-1, 10] vs FP32 [-1, 5]"]
        );
        assert_eq!(
            output_clashes(&mlp, &[t("probabilities", "FP64", &[-1, 10])]),
            ["output 'probabilities': FP32 [-1, 10] vs FP64 [-1, 10]"]
        );
        assert_eq!(
            output_clashes(&mlp, &[t("probabilities", "FP32", &[10])]).len(),
            1,
            "rank differs"
        );
    }
}
