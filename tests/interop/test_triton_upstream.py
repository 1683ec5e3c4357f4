"""A real Triton Inference Server as the gateway's upstream: the gateway cannot tell it
apart from the bundled backend. Triton serves digits_mlp through its python backend."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import start_gateway

POLICY = """\
version: 1
route: digits-on-triton
targets:
  v1: { backend: triton, model: digits_mlp, version: 1, release: v1.0.0 }
  v2: { backend: triton, model: digits_mlp, version: 2, release: v1.1.0 }
rules:
  - match: { headers: { x-canary: { present: true } } }
    plan: v2
default: v1
deadline: 2s
"""


@pytest.fixture(scope="module")
def gateway_to_triton(triton, tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("gw-triton"), {"triton": [triton.addrs["grpc"]]}, {"digits.yaml": POLICY})
    yield gw
    gw.stop()


def test_triton_itself_answers(triton, holdout):
    c = grpcclient.InferenceServerClient(triton.addrs["grpc"])
    assert c.is_model_ready("digits_mlp", "2")
    assert c.get_model_metadata("digits_mlp", as_json=True)["platform"] == "python"


@pytest.mark.parametrize("version,headers", [("1", {}), ("2", {"x-canary": "1"})])
@pytest.mark.parametrize("batch", [1, 64])
def test_inference_through_the_gateway_matches_the_reference(gateway_to_triton, holdout, version, headers, batch):
    x = np.array(holdout["features"][:batch], dtype=np.float32)
    reference = np.array(holdout["models"][f"digits_mlp/{version}"]["probabilities"][:batch])
    g = grpcclient.InferenceServerClient(gateway_to_triton.addrs["grpc"])
    inp = grpcclient.InferInput("INPUT__0", [batch, 64], "FP32")
    inp.set_data_from_numpy(x)
    result = g.infer("digits-on-triton", [inp], headers=dict(headers))
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference, atol=1e-5)
    assert result.get_response(as_json=True)["model_version"] == version
    h = httpclient.InferenceServerClient(gateway_to_triton.addrs["http"])
    hin = httpclient.InferInput("INPUT__0", [batch, 64], "FP32")
    hin.set_data_from_numpy(x)
    # tritonclient.http adds its own entries to the dict it is given: pass a copy.
    hres = h.infer("digits-on-triton", [hin], headers=dict(headers))
    np.testing.assert_allclose(hres.as_numpy("probabilities"), reference, atol=1e-5)


def test_metadata_health_and_errors_through_the_gateway(gateway_to_triton):
    g = grpcclient.InferenceServerClient(gateway_to_triton.addrs["grpc"])
    assert g.is_model_ready("digits-on-triton")
    meta = g.get_model_metadata("digits-on-triton", as_json=True)
    assert meta["name"] == "digits-on-triton" and meta["platform"] == "python"
    assert g.get_model_config("digits-on-triton", as_json=True)["config"]["backend"] == "python"
    bad = grpcclient.InferInput("INPUT__0", [1, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 63), dtype=np.float32))
    with pytest.raises(InferenceServerException) as e:
        g.infer("digits-on-triton", [bad])
    # Triton's own validation, passed through by the gateway.
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unexpected shape for input 'INPUT__0'" in e.value.message()


def batch_job(tmp_path, model, url, *extra):
    """`switchyard batch` over the held-out rows (a .npy), its JSON summary and output rows."""
    import json
    import os
    import subprocess

    from conftest import ROOT

    x = np.array(holdout_rows(), dtype=np.float32)
    np.save(tmp_path / "rows.npy", x)
    out = tmp_path / "out.jsonl"
    binary = os.environ.get("SWITCHYARD_BIN", str(ROOT / "target/debug/switchyard"))
    run = subprocess.run(
        [binary, "batch", "-i", str(tmp_path / "rows.npy"), "-o", str(out), "-m", model, "-u", url, "--json", *extra],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return json.loads(run.stdout), rows


def holdout_rows():
    import json

    from conftest import ROOT

    with open(ROOT / "backends/sample_data/digits_holdout.json") as f:
        return json.load(f)["features"]


@pytest.mark.parametrize("version", ["1", "2"])
def test_switchyard_batch_straight_to_triton(triton, holdout, tmp_path, version):
    """`switchyard batch` with a model name scores against Triton itself: its config gives
    the batch size, its answers name the model and version."""
    summary, rows = batch_job(tmp_path, "digits_mlp", triton.addrs["grpc"], "--model-version", version)
    n = len(holdout["features"])
    assert summary["rows_ok"] == n and summary["rows_failed"] == 0
    assert summary["chunk_rows"] == 64
    assert summary["targets"] == {f"digits_mlp/{version}": {"rows": n, "requests": -(-n // 64)}}
    reference = np.array(holdout["models"][f"digits_mlp/{version}"]["probabilities"])
    assert [r["row"] for r in rows] == list(range(n))
    np.testing.assert_allclose(np.array([r["probabilities"] for r in rows]), reference, atol=1e-5)


def test_switchyard_batch_through_the_gateway_to_triton(gateway_to_triton, holdout, tmp_path):
    summary, rows = batch_job(tmp_path, "digits-on-triton", gateway_to_triton.addrs["grpc"], "-H", "x-canary:1")
    assert summary["rows_ok"] == len(holdout["features"])
    assert all(r["target"] == "digits_mlp/2" and r["policy"] for r in rows)
    reference = np.array(holdout["models"]["digits_mlp/2"]["probabilities"])
    np.testing.assert_allclose(np.array([r["probabilities"] for r in rows]), reference, atol=1e-5)
