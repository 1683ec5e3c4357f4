//! Fuzz target `model_config`: arbitrary bytes into `switchyard_proto::fuzzing::model_config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard_proto::fuzzing::model_config(data));
