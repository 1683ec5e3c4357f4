//! Replays every input under `fuzz/corpus/TARGET/` (seeds, what the fuzzers kept, and the
//! crashes they found, minimised) through the oracles the cargo-fuzz targets call, on
//! stable: a crash a fuzzer once found stays fixed.

use std::path::PathBuf;

type Oracle = fn(&[u8]);

const TARGETS: &[(&str, Oracle)] = &[
    ("infer_wire", switchyard_proto::fuzzing::infer_wire),
    ("model_config", switchyard_proto::fuzzing::model_config),
    ("rest_json", switchyard_gateway::fuzzing::rest_json),
    ("policy", switchyard_gateway::fuzzing::policy),
];

#[test]
fn every_corpus_input_keeps_every_promise() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, oracle) in TARGETS {
        let dir = root.join(target);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{}: no corpus", dir.display());
        for input in &inputs {
            let data = std::fs::read(input).unwrap();
            let result = std::panic::catch_unwind(|| oracle(&data));
            assert!(
                result.is_ok(),
                "{target}: {} breaks a promise",
                input.display()
            );
        }
        eprintln!("{target}: {} inputs", inputs.len());
    }
}
