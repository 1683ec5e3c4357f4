//! The `pipeline` scenario: what the gateway adds per pipeline step.
//!
//! Two backends and `switchyard gateway` with the sample `digits-pipeline` route (digits_pca
//! on one backend, digits_pca_mlp on the other) and a single-target route to digits_pca.
//! Interleaved closed-loop points over the held-out rows, per concurrency and rep: each
//! step's model called directly on its backend (the second with the features the first
//! computes for the same rows), the pipeline through the gateway, and the single-target
//! route through the gateway. Per step overhead = (pipeline latency − the sum of the two
//! direct latencies) / 2, at the median and at the mean, beside the gateway's overhead on
//! a single target (its latency − digits_pca's direct latency). With `--callgrind N`, the
//! gateway's instructions per request of both routes under callgrind.

use std::path::Path;

use switchyard_proto::inference::{ModelInferRequest, model_infer_request::InferInputTensor};

use super::{
    Args, Report, Server, callgrind, client, closed_loop, holdout_requests, two_pool_config,
};

/// The held-out rows as requests to one model version on a backend.
fn direct(model: &str) -> Vec<ModelInferRequest> {
    holdout_requests(model)
        .into_iter()
        .map(|mut r| {
            r.model_version = "1".to_owned();
            r
        })
        .collect()
}

pub(super) fn run(args: &Args, repo: &Path, runtime: &tokio::runtime::Runtime) {
    let (stable, canary) = (Server::backend(repo), Server::backend(repo));
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    std::fs::copy(
        samples.join("digits-pipeline.yaml"),
        policies.join("digits-pipeline.yaml"),
    )
    .unwrap();
    std::fs::write(
        policies.join("pca.yaml"),
        "version: 1\nroute: pca\ntargets:\n  pca: { backend: stable, model: digits_pca, version: 1 }\ndefault: pca\ndeadline: 250ms\n",
    )
    .unwrap();
    let config = two_pool_config(dir.path(), &stable, &canary);
    let gateway = Server::start(&["gateway", "--config", &config]);
    let grpc = gateway.addr("grpc");

    // The second step's direct requests: the features digits_pca gives for each row.
    let pca = direct("digits_pca");
    let features: Vec<ModelInferRequest> = runtime.block_on(async {
        let mut c = client(stable.addr("grpc")).await;
        let mut out = Vec::with_capacity(pca.len());
        for r in &pca {
            let resp = c.model_infer(r.clone()).await.unwrap().into_inner();
            out.push(ModelInferRequest {
                model_name: "digits_pca_mlp".to_owned(),
                model_version: "1".to_owned(),
                inputs: vec![InferInputTensor {
                    name: "FEATURES".to_owned(),
                    datatype: "FP32".to_owned(),
                    shape: resp.outputs[0].shape.clone(),
                    ..Default::default()
                }],
                raw_input_contents: vec![resp.raw_output_contents[0].clone()],
                ..Default::default()
            });
        }
        out
    });

    println!(
        "\npipeline: digits-pipeline (digits_pca on one backend, then digits_pca_mlp on the other) through `switchyard gateway`, held-out rows"
    );
    println!(
        "\n| point | concurrency | req/s | p50 µs | p90 µs | p99 µs | errors |\n| --- | --- | --- | --- | --- | --- | --- |"
    );
    let point = |label: &str, addr, c: usize, requests: Vec<ModelInferRequest>| -> Report {
        let r = runtime.block_on(closed_loop(addr, c, args.warmup, args.duration, requests));
        println!("{}", r.row(label, c));
        r
    };
    let mut rows = Vec::new();
    for &c in &args.concurrency {
        for rep in 0..args.reps {
            let first = point("digits_pca direct", stable.addr("grpc"), c, pca.clone());
            let second = point(
                "digits_pca_mlp direct",
                canary.addr("grpc"),
                c,
                features.clone(),
            );
            let pipeline = point(
                "digits-pipeline via gateway",
                grpc,
                c,
                holdout_requests("digits-pipeline"),
            );
            let single = point("pca via gateway", grpc, c, holdout_requests("pca"));
            let p50 = |r: &Report| r.latency_us.value_at_quantile(0.5) as f64;
            let mean = |r: &Report| r.latency_us.mean();
            let per_step =
                |f: &dyn Fn(&Report) -> f64| (f(&pipeline) - f(&first) - f(&second)) / 2.0;
            rows.push(format!(
                "| {c} | {} | {:.0} + {:.0} | {:.0} | **{:.0}** | {:.0} | {:.0} | {} |",
                rep + 1,
                p50(&first),
                p50(&second),
                p50(&pipeline),
                per_step(&p50),
                per_step(&mean),
                p50(&single) - p50(&first),
                pipeline.errors + first.errors + second.errors + single.errors,
            ));
        }
    }
    println!(
        "\n| concurrency | rep | direct p50 µs (pca + pca_mlp) | pipeline p50 µs | overhead per step, p50 µs | per step, mean µs | single-target gateway overhead, p50 µs | errors |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    );
    for r in rows {
        println!("{r}");
    }
    drop(gateway);
    if args.callgrind > 0
        && let Some(counts) = callgrind::per_route(
            args.callgrind,
            runtime,
            dir.path(),
            &config,
            &["pca", "digits-pipeline"],
            "pipeline",
            "a single-target route and the two-step pipeline",
        )
    {
        println!(
            "\ngateway instructions per pipeline step: {:.0} ({:.2} of the single-target route's {:.0} per request)",
            counts[1] / 2.0,
            counts[1] / 2.0 / counts[0],
            counts[0]
        );
    }
}
