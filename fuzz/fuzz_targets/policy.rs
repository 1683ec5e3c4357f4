//! Fuzz target `policy`: arbitrary bytes into `switchyard_gateway::fuzzing::policy`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| switchyard_gateway::fuzzing::policy(data));
