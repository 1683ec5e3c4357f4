//! Fuzz target `infer_wire`: arbitrary bytes into `switchyard_proto::fuzzing::infer_wire`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard_proto::fuzzing::infer_wire(data));
