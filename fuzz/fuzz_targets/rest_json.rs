//! Fuzz target `rest_json`: arbitrary bytes into `switchyard_gateway::fuzzing::rest_json`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard_gateway::fuzzing::rest_json(data));
