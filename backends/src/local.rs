//! In-process inference on one model version, through the same config parsing, checks
//! and runtime as the server but without the gRPC hop or the scheduler: the ceiling a
//! server can approach, measured by `benches/loadgen.rs`.

use std::path::Path;

use bytes::Bytes;

use crate::repository::{RepositoryOptions, Runtimes, build};
use crate::runtime::{InputBatch, Instance};
use crate::spec::ModelSpec;

/// One instance of one model version, run on the caller's thread.
pub struct LocalModel {
    spec: ModelSpec,
    instance: Box<dyn Instance>,
}

impl std::fmt::Debug for LocalModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalModel")
            .field("model", &self.spec.name)
            .finish_non_exhaustive()
    }
}

impl LocalModel {
    /// Opens `<repository>/<model>/<version>` with the model's `config.pbtxt`.
    pub fn open(
        repository: &Path,
        model: &str,
        version: u64,
        options: &RepositoryOptions,
    ) -> Result<Self, String> {
        let dir = repository.join(model);
        let config_path = dir.join("config.pbtxt");
        let text = std::fs::read_to_string(&config_path).unwrap_or_default();
        let config = switchyard_proto::pbtxt::parse_model_config(&config_path, &text)?;
        let spec = ModelSpec::from_config(model, config, options.default_runtime)?;
        let path = dir.join(version.to_string()).join(&spec.model_filename);
        let bytes =
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let runtimes = Runtimes::new(options);
        let (spec, loaded) = build(&spec, &bytes, &path, runtimes.get(spec.runtime)?)?;
        let instance = loaded.instance()?;
        Ok(Self { spec, instance })
    }

    /// Runs one batch. `inputs` are raw little-endian tensors in the config's input order,
    /// each `rows` rows of the declared dims (which must be fixed); returns the outputs'
    /// raw bytes in the config's output order.
    pub fn infer(&mut self, inputs: &[&[u8]], rows: usize) -> Result<Vec<Bytes>, String> {
        if inputs.len() != self.spec.inputs.len() {
            return Err(format!(
                "expected {} inputs, got {}",
                self.spec.inputs.len(),
                inputs.len()
            ));
        }
        let batched = self.spec.max_batch_size > 0;
        let shapes: Vec<Vec<usize>> = self
            .spec
            .inputs
            .iter()
            .map(|t| {
                let dims = t.dims.iter().map(|&d| {
                    usize::try_from(d)
                        .map_err(|_| format!("input '{}' has a variable dimension", t.name))
                });
                batched
                    .then_some(Ok(rows))
                    .into_iter()
                    .chain(dims)
                    .collect()
            })
            .collect::<Result<_, _>>()?;
        let chunks: Vec<[&[u8]; 1]> = inputs.iter().map(|i| [*i]).collect();
        let batch: Vec<InputBatch<'_>> = self
            .spec
            .inputs
            .iter()
            .zip(&shapes)
            .zip(&chunks)
            .map(|((t, shape), chunk)| InputBatch {
                element: t.element,
                shape,
                chunks: chunk,
            })
            .collect();
        for (t, (shape, input)) in self.spec.inputs.iter().zip(shapes.iter().zip(inputs)) {
            let want = shape.iter().product::<usize>() * t.element.byte_size().unwrap_or(0);
            if input.len() != want {
                return Err(format!(
                    "input '{}': expected {want} bytes, got {}",
                    t.name,
                    input.len()
                ));
            }
        }
        Ok(self
            .instance
            .run(&batch)?
            .into_iter()
            .map(|o| o.data)
            .collect())
    }

    /// The model's largest batch (0: no batching).
    pub fn max_batch_size(&self) -> usize {
        self.spec.max_batch_size
    }
}
