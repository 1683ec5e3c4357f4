//! Compiles the KServe v2 / Triton protos with `protox` (pure Rust), so building Switchyard
//! needs no system `protoc`; tonic-prost-build then generates the messages and service.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/grpc_service.proto", "proto/model_config.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // The encoded descriptors back prost-reflect, which parses `config.pbtxt` text format
    // and prints model configs as JSON.
    fs::write(out.join("file_descriptor_set.bin"), fds.encode_to_vec())?;

    let mut builder = tonic_prost_build::configure()
        // prost's codec behind a check of each message before it decodes: a
        // `ModelInferRequest` cannot make the decoder allocate more than its size allows.
        .codec_path("crate::codec::CheckedCodec")
        // RPCs a server does not implement answer UNIMPLEMENTED, as Triton's clients expect.
        .generate_default_stubs(true)
        // Tensor payloads are reference-counted, so forwarding, batching and caching
        // never copy a tensor.
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents");
    let pool = prost_reflect::DescriptorPool::from_file_descriptor_set(fds.clone())?;
    for message in pool.all_messages() {
        // Names without the leading dot match one message only; with the dot they match
        // as a prefix and nested messages would get the derive twice.
        let name = message.full_name();
        builder = builder
            .type_attribute(name, "#[derive(::prost_reflect::ReflectMessage)]")
            .type_attribute(name, format!(r#"#[prost_reflect(message_name = "{name}")]"#))
            .type_attribute(
                name,
                r#"#[prost_reflect(file_descriptor_set_bytes = "crate::FILE_DESCRIPTOR_SET_BYTES")]"#,
            );
    }
    // Every other top-level message takes its bytes as they come.
    let mut prescan = String::new();
    for message in pool.all_messages() {
        if message.parent_message().is_none() && message.name() != "ModelInferRequest" {
            prescan.push_str(&format!(
                "impl crate::codec::Prescan for {} {{}}\n",
                message.name()
            ));
        }
    }
    fs::write(out.join("prescan.rs"), prescan)?;
    builder.compile_fds(fds)?;
    Ok(())
}
