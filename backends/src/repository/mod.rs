//! The model repository: scans a Triton-style folder (`<model>/config.pbtxt`,
//! `<model>/<version>/model.onnx`), loads the versions each model's policy selects, and
//! keeps the catalog the request path reads.
//!
//! # Invariants
//! * The request path reads the catalog through one `ArcSwap` load: no lock.
//! * Load, reload and unload are serialised by one async mutex and build a whole new
//!   catalog, stored in one swap. A version being replaced keeps serving until the swap,
//!   and requests that already hold it finish on it.
//! * A refused model or version is recorded with its reason (logged and shown by
//!   RepositoryIndex); a failed reload keeps whatever version was serving.
//! * Loading runs on tokio's blocking pool and survives a panicking runtime.

mod safety;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::error::BackendError;
use crate::runtime::{LoadSpec, LoadedModel, Runtime, RuntimeKind, onnx_signature};
use crate::scheduler::{QueuedBytes, Scheduler};
use crate::spec::{ModelSpec, VersionPolicy};
use crate::stats::{Metrics, VersionStats};

/// How the repository loads models.
#[derive(Debug, Clone)]
pub struct RepositoryOptions {
    /// Files larger than this (bytes) are refused. Default 10 GiB.
    pub max_model_size: u64,
    /// The runtime for models whose config does not pick one.
    pub default_runtime: RuntimeKind,
    /// Path of `libonnxruntime.so` for the onnxruntime runtime (else `ORT_DYLIB_PATH`).
    pub onnxruntime_lib: Option<PathBuf>,
    /// Input bytes the requests of every model may hold, queued or running; one more is
    /// refused at once with RESOURCE_EXHAUSTED. Default 1 GiB.
    pub max_queue_bytes: u64,
}

impl Default for RepositoryOptions {
    fn default() -> Self {
        Self {
            max_model_size: 10 << 30,
            default_runtime: RuntimeKind::Tract,
            onnxruntime_lib: None,
            max_queue_bytes: 1 << 30,
        }
    }
}

/// One loaded, serving model version.
#[derive(Debug)]
pub(crate) struct ServingVersion {
    pub(crate) spec: Arc<ModelSpec>,
    pub(crate) version: u64,
    pub(crate) scheduler: Scheduler,
    pub(crate) stats: Arc<VersionStats>,
    /// SHA-256 over config text and model bytes: an unchanged version is not rebuilt.
    fingerprint: [u8; 32],
}

/// The state of one version folder.
#[derive(Debug, Clone)]
pub(crate) struct VersionSlot {
    pub(crate) serving: Option<Arc<ServingVersion>>,
    /// Why the last load of this version failed, if it did.
    pub(crate) error: Option<String>,
}

/// The state of one model folder.
#[derive(Debug, Clone)]
pub(crate) enum ModelState {
    Loaded {
        versions: BTreeMap<u64, VersionSlot>,
    },
    /// The model as a whole was refused (config or model-level files).
    Failed {
        reason: String,
    },
    Unloaded,
}

/// Everything the request path can see: model name to state.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    pub(crate) models: HashMap<String, ModelState>,
}

/// One row of RepositoryIndex.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct IndexEntry {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) state: &'static str,
    pub(crate) reason: String,
}

/// The model repository and its catalog.
#[derive(Debug)]
pub(crate) struct Repository {
    root: PathBuf,
    options: RepositoryOptions,
    runtimes: Runtimes,
    metrics: Metrics,
    catalog: ArcSwap<Catalog>,
    /// Serialises load and unload; never taken on the request path.
    admin: tokio::sync::Mutex<()>,
    /// Input bytes every version's jobs hold (`max_queue_bytes`).
    queued: Arc<QueuedBytes>,
}

impl Repository {
    pub(crate) fn new(root: PathBuf, options: RepositoryOptions, metrics: Metrics) -> Self {
        let runtimes = Runtimes::new(&options);
        let queued =
            QueuedBytes::new(usize::try_from(options.max_queue_bytes).unwrap_or(usize::MAX));
        Self {
            root,
            queued,
            options,
            runtimes,
            metrics,
            catalog: ArcSwap::default(),
            admin: tokio::sync::Mutex::new(()),
        }
    }

    /// Loads every model folder in the repository; returns how many versions serve.
    pub(crate) async fn load_all(self: &Arc<Self>) -> std::io::Result<usize> {
        let _admin = self.admin.lock().await;
        let mut names: Vec<String> = Vec::new();
        let mut models = HashMap::new();
        for entry in fs::read_dir(&self.root)?.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with('.') {
                continue;
            }
            // Follows a symlink; an entry that cannot be read (a dangling link, no
            // permission) is that model's refusal, not the repository's.
            match fs::metadata(entry.path()) {
                Ok(meta) if meta.is_dir() => names.push(name),
                Ok(_) => {}
                Err(e) => {
                    let reason = format!("{} cannot be read: {e}", entry.path().display());
                    tracing::warn!(model = %name, %reason, "model refused");
                    models.insert(name, ModelState::Failed { reason });
                }
            }
        }
        names.sort();
        let mut serving = 0;
        for name in names {
            let this = self.clone();
            let n = name.clone();
            let state = tokio::task::spawn_blocking(move || this.load_model(&n, None))
                .await
                .map_err(std::io::Error::other)?
                .0;
            if let ModelState::Loaded { versions, .. } = &state {
                serving += versions.values().filter(|v| v.serving.is_some()).count();
            }
            models.insert(name, state);
        }
        self.catalog.store(Arc::new(Catalog { models }));
        Ok(serving)
    }

    /// The catalog as of now.
    pub(crate) fn catalog(&self) -> arc_swap::Guard<Arc<Catalog>> {
        self.catalog.load()
    }

    /// The version a request for `model` / `version` (empty: the newest ready) should use.
    pub(crate) fn resolve(
        &self,
        model: &str,
        version: &str,
    ) -> Result<Arc<ServingVersion>, BackendError> {
        let catalog = self.catalog.load();
        let not_found = || BackendError::ModelNotFound {
            model: model.to_owned(),
        };
        match catalog.models.get(model) {
            None | Some(ModelState::Unloaded) => Err(not_found()),
            Some(ModelState::Failed { reason }) => Err(BackendError::ModelNotReady {
                model: model.to_owned(),
                reason: reason.clone(),
            }),
            Some(ModelState::Loaded { versions, .. }) if version.is_empty() => versions
                .values()
                .rev()
                .find_map(|slot| slot.serving.clone())
                .ok_or_else(|| BackendError::ModelNotReady {
                    model: model.to_owned(),
                    reason: failures(versions),
                }),
            Some(ModelState::Loaded { versions, .. }) => {
                let slot = version
                    .parse::<u64>()
                    .ok()
                    .and_then(|v| versions.get(&v))
                    .ok_or_else(|| BackendError::VersionNotFound {
                        model: model.to_owned(),
                        version: version.to_owned(),
                    })?;
                slot.serving
                    .clone()
                    .ok_or_else(|| BackendError::ModelNotReady {
                        model: model.to_owned(),
                        reason: format!(
                            "version {version}: {}",
                            slot.error.as_deref().unwrap_or("not loaded")
                        ),
                    })
            }
        }
    }

    /// Loads or reloads one model (RepositoryModelLoad). Unchanged versions keep serving
    /// untouched; changed ones are rebuilt beside the old and swapped in; on any failure
    /// the old version stays.
    pub(crate) async fn load(self: &Arc<Self>, model: &str) -> Result<(), BackendError> {
        if model.is_empty() || model.contains(['/', '\\']) || model.starts_with('.') {
            return Err(BackendError::Repository(format!(
                "'{model}' is not a model folder name"
            )));
        }
        let _admin = self.admin.lock().await;
        if !self.root.join(model).is_dir() {
            return Err(BackendError::Repository(format!(
                "failed to load '{model}': no folder {} in the model repository",
                self.root.join(model).display()
            )));
        }
        let previous = self.catalog.load().models.get(model).cloned();
        let this = self.clone();
        let name = model.to_owned();
        let (state, problems) =
            tokio::task::spawn_blocking(move || this.load_model(&name, previous.as_ref()))
                .await
                .map_err(|e| BackendError::Repository(format!("failed to load '{model}': {e}")))?;
        let mut models = self.catalog.load().models.clone();
        models.insert(model.to_owned(), state);
        self.catalog.store(Arc::new(Catalog { models }));
        if problems.is_empty() {
            Ok(())
        } else {
            Err(BackendError::Repository(format!(
                "failed to load '{model}': {}",
                problems.join("; ")
            )))
        }
    }

    /// Unloads a model (RepositoryModelUnload): new requests get NOT_FOUND at once; those
    /// already running finish on the versions they hold.
    pub(crate) async fn unload(&self, model: &str) -> Result<(), BackendError> {
        let _admin = self.admin.lock().await;
        let mut models = self.catalog.load().models.clone();
        match models.get_mut(model) {
            None => Err(BackendError::Repository(format!(
                "failed to unload '{model}': no such model"
            ))),
            Some(state) => {
                *state = ModelState::Unloaded;
                self.catalog.store(Arc::new(Catalog { models }));
                info!(model, "unloaded");
                Ok(())
            }
        }
    }

    /// RepositoryIndex rows, sorted by model then version.
    pub(crate) fn index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let catalog = self.catalog.load();
        let mut names: Vec<&String> = catalog.models.keys().collect();
        names.sort();
        let mut rows = Vec::new();
        for name in names {
            let row = |version: String, state: &'static str, reason: String| IndexEntry {
                name: name.clone(),
                version,
                state,
                reason,
            };
            match &catalog.models[name] {
                ModelState::Failed { reason } => {
                    rows.push(row(String::new(), "UNAVAILABLE", reason.clone()))
                }
                ModelState::Unloaded => {
                    rows.push(row(String::new(), "UNAVAILABLE", "unloaded".to_owned()))
                }
                ModelState::Loaded { versions, .. } => {
                    for (v, slot) in versions {
                        let (state, reason) = match (&slot.serving, &slot.error) {
                            (Some(_), None) => ("READY", String::new()),
                            (Some(_), Some(e)) => {
                                ("READY", format!("reload failed, previous model kept: {e}"))
                            }
                            (None, e) => ("UNAVAILABLE", e.clone().unwrap_or_default()),
                        };
                        rows.push(row(v.to_string(), state, reason));
                    }
                }
            }
        }
        if ready_only {
            rows.retain(|r| r.state == "READY");
        }
        rows
    }

    /// Loads one model folder. Blocking. Returns the new state and every problem found.
    fn load_model(&self, name: &str, previous: Option<&ModelState>) -> (ModelState, Vec<String>) {
        let dir = self.root.join(name);
        match self.load_model_inner(name, &dir, previous) {
            Ok((state, problems)) => {
                for p in &problems {
                    warn!(model = name, "{p}");
                }
                (state, problems)
            }
            Err(reason) => {
                warn!(model = name, "model refused: {reason}");
                match previous {
                    // A broken reload leaves the serving model alone.
                    Some(prev @ ModelState::Loaded { .. }) => (prev.clone(), vec![reason]),
                    _ => (
                        ModelState::Failed {
                            reason: reason.clone(),
                        },
                        vec![reason],
                    ),
                }
            }
        }
    }

    fn load_model_inner(
        &self,
        name: &str,
        dir: &Path,
        previous: Option<&ModelState>,
    ) -> Result<(ModelState, Vec<String>), String> {
        let model_level = safety::check_files(dir, self.options.max_model_size, false);
        if !model_level.is_empty() {
            return Err(model_level.join("; "));
        }
        // Checksums listed at model level are attributed to the version folder they name.
        let mut version_failures: HashMap<u64, Vec<String>> = HashMap::new();
        for failure in safety::verify_checksums(dir) {
            let version = failure
                .path
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str()?.parse::<u64>().ok());
            match version {
                Some(v) if failure.path.components().count() > 1 => {
                    version_failures.entry(v).or_default().push(failure.reason);
                }
                _ => return Err(failure.reason),
            }
        }
        let config_path = dir.join("config.pbtxt");
        let config_text = match fs::read_to_string(&config_path) {
            Ok(text) => text,
            // Without a config, everything is completed from the graph (Triton's auto-complete).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", config_path.display())),
        };
        let spec = switchyard_proto::pbtxt::parse_model_config(&config_path, &config_text)
            .and_then(|config| {
                ModelSpec::from_config(name, config, self.options.default_runtime)
                    .map_err(|e| format!("{}: {e}", config_path.display()))
            });
        let spec = match spec {
            Ok(spec) => spec,
            // A model that cannot load at all still names any pickle it carries: that is
            // usually the real problem (a PyTorch model dropped into an ONNX repository).
            Err(e) => {
                let mut problems = safety::find_pickles(dir);
                problems.push(e);
                return Err(problems.join("; "));
            }
        };
        let runtime = self.runtimes.get(spec.runtime)?;

        let available = version_folders(dir);
        let wanted: Vec<u64> = match &spec.version_policy {
            VersionPolicy::All => available,
            VersionPolicy::Latest(n) => available.iter().rev().take(*n).rev().copied().collect(),
            VersionPolicy::Specific(v) => {
                let mut v = v.clone();
                v.sort_unstable();
                v.dedup();
                v
            }
        };
        if wanted.is_empty() {
            return Err(format!(
                "{} has no version folders (numbered folders holding {})",
                dir.display(),
                spec.model_filename
            ));
        }
        let config_hash: [u8; 32] = Sha256::digest(config_text.as_bytes()).into();
        let old_versions = match previous {
            Some(ModelState::Loaded { versions, .. }) => Some(versions),
            _ => None,
        };
        let mut versions = BTreeMap::new();
        let mut problems = Vec::new();
        for v in wanted {
            let old = old_versions
                .and_then(|o| o.get(&v))
                .and_then(|s| s.serving.clone());
            let result = match version_failures.remove(&v) {
                Some(reasons) => Err(reasons.join("; ")),
                None => self.load_version(&spec, dir, v, &config_hash, old.as_ref(), runtime),
            };
            let slot = match result {
                Ok(serving) => VersionSlot {
                    serving: Some(serving),
                    error: None,
                },
                Err(reason) => {
                    problems.push(format!("version {v}: {reason}"));
                    VersionSlot {
                        serving: old,
                        error: Some(reason),
                    }
                }
            };
            versions.insert(v, slot);
        }
        let ready = versions.values().filter(|s| s.serving.is_some()).count();
        info!(model = name, ready, refused = problems.len(), runtime = %spec.runtime, "model loaded");
        Ok((ModelState::Loaded { versions }, problems))
    }

    /// Loads one version folder, or returns the serving one when nothing changed.
    fn load_version(
        &self,
        spec: &ModelSpec,
        dir: &Path,
        version: u64,
        config_hash: &[u8; 32],
        old: Option<&Arc<ServingVersion>>,
        runtime: &dyn Runtime,
    ) -> Result<Arc<ServingVersion>, String> {
        let vdir = dir.join(version.to_string());
        if !vdir.is_dir() {
            return Err(format!("version folder {} not found", vdir.display()));
        }
        let problems = safety::check_files(&vdir, self.options.max_model_size, true);
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        if let Some(failure) = safety::verify_checksums(&vdir).into_iter().next() {
            return Err(failure.reason);
        }
        let path = vdir.join(&spec.model_filename);
        let bytes = fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut hasher = Sha256::new();
        hasher.update(config_hash);
        hasher.update(&bytes);
        let fingerprint: [u8; 32] = hasher.finalize().into();
        if let Some(old) = old.filter(|o| o.fingerprint == fingerprint) {
            return Ok(old.clone());
        }
        let (spec, model) = build(spec, &bytes, &path, runtime)?;
        let instances = (0..spec.instances)
            .map(|_| model.instance())
            .collect::<Result<Vec<_>, _>>()?;
        let spec = Arc::new(spec);
        let stats = match old {
            // Statistics are per version and outlive a reload of the same version.
            Some(o) if o.stats.max_batch() == spec.max_batch_size.max(1) => o.stats.clone(),
            _ => Arc::new(VersionStats::new(
                &self.metrics,
                &spec.name,
                version,
                spec.max_batch_size,
            )),
        };
        let scheduler = Scheduler::start(
            spec.clone(),
            version,
            instances,
            stats.clone(),
            self.queued.clone(),
        )
        .map_err(|e| format!("cannot start the model's threads: {e}"))?;
        info!(model = %spec.name, version, instances = spec.instances, "version ready");
        Ok(Arc::new(ServingVersion {
            spec,
            version,
            scheduler,
            stats,
            fingerprint,
        }))
    }
}

/// Checks the graph against the spec (completing it) and builds the model, surviving a
/// panicking runtime. Blocking.
pub(crate) fn build(
    spec: &ModelSpec,
    bytes: &[u8],
    path: &Path,
    runtime: &dyn Runtime,
) -> Result<(ModelSpec, Box<dyn LoadedModel>), String> {
    let file = path.display().to_string();
    catch_unwind(AssertUnwindSafe(|| {
        let signature = onnx_signature(bytes).map_err(|e| format!("{file}: {e}"))?;
        let mut spec = spec.clone();
        spec.complete_and_check(&signature, &file)?;
        let inputs: Vec<(&str, _)> = spec
            .inputs
            .iter()
            .map(|t| (t.name.as_str(), t.element))
            .collect();
        let outputs: Vec<&str> = spec.outputs.iter().map(|t| t.name.as_str()).collect();
        let model = runtime
            .load(
                bytes,
                &LoadSpec {
                    inputs: &inputs,
                    outputs: &outputs,
                    device: spec.device,
                },
            )
            .map_err(|e| format!("{file}: {e}"))?;
        Ok((spec, model))
    }))
    .map_err(|_| format!("{file}: the runtime panicked while loading the model"))?
}

/// Numbered version folders, ascending.
fn version_folders(dir: &Path) -> Vec<u64> {
    let mut versions: Vec<u64> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
        .filter(|&v| v > 0)
        .collect();
    versions.sort_unstable();
    versions
}

fn failures(versions: &BTreeMap<u64, VersionSlot>) -> String {
    let reasons: Vec<String> = versions
        .iter()
        .filter_map(|(v, s)| s.error.as_ref().map(|e| format!("version {v}: {e}")))
        .collect();
    if reasons.is_empty() {
        "no version is loaded".to_owned()
    } else {
        reasons.join("; ")
    }
}

/// The runtimes this build has.
#[derive(Debug)]
pub(crate) struct Runtimes {
    tract: crate::runtime::tract::TractRuntime,
    #[cfg(feature = "onnxruntime")]
    ort: Result<crate::runtime::ort::OrtRuntime, String>,
}

impl Runtimes {
    pub(crate) fn new(options: &RepositoryOptions) -> Self {
        #[cfg(not(feature = "onnxruntime"))]
        let _ = options;
        Self {
            tract: crate::runtime::tract::TractRuntime,
            #[cfg(feature = "onnxruntime")]
            ort: crate::runtime::ort::OrtRuntime::new(options.onnxruntime_lib.as_deref()),
        }
    }

    pub(crate) fn get(&self, kind: RuntimeKind) -> Result<&dyn Runtime, String> {
        match kind {
            RuntimeKind::Tract => Ok(&self.tract),
            #[cfg(feature = "onnxruntime")]
            RuntimeKind::OnnxRuntime => match &self.ort {
                Ok(ort) => Ok(ort),
                Err(e) => Err(format!("the onnxruntime runtime is unavailable: {e}")),
            },
            #[cfg(not(feature = "onnxruntime"))]
            RuntimeKind::OnnxRuntime => Err(
                "this build has no onnxruntime runtime; rebuild with `--features onnxruntime` or use \"tract\"".to_owned(),
            ),
        }
    }
}
