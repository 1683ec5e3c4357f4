"""The official `tritonclient.grpc` and `tritonclient.http` against the gateway, which
serves the shipped policies in front of two bundled backends."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def grpc(gateway):
    return grpcclient.InferenceServerClient(gateway.addrs["grpc"])


@pytest.fixture(scope="module")
def http(gateway):
    return httpclient.InferenceServerClient(gateway.addrs["http"])


def rows(holdout, n, start=0):
    return np.array(holdout["features"][start : start + n], dtype=np.float32)


def test_health_and_metadata(grpc, http):
    assert grpc.is_server_live() and grpc.is_server_ready()
    assert http.is_server_live() and http.is_server_ready()
    assert grpc.is_model_ready("digits") and http.is_model_ready("digits")
    assert not grpc.is_model_ready("no_such_route")
    meta = grpc.get_model_metadata("digits", as_json=True)
    assert meta["name"] == "digits"
    assert meta["inputs"] == [{"name": "INPUT__0", "datatype": "FP32", "shape": ["-1", "64"]}]
    hmeta = http.get_model_metadata("digits")
    assert hmeta["name"] == "digits" and hmeta["inputs"][0]["shape"] == [-1, 64]
    assert http.get_model_config("digits")["max_batch_size"] == 64
    assert grpc.get_model_config("digits", as_json=True)["config"]["name"] == "digits"


@pytest.mark.parametrize("batch", [1, 64])
def test_grpc_infer_follows_the_policy(grpc, holdout, batch):
    x = rows(holdout, batch)
    inp = grpcclient.InferInput("INPUT__0", [batch, 64], "FP32")
    inp.set_data_from_numpy(x)
    # The sample policy sends x-canary traffic to digits_mlp v2.
    result = grpc.infer("digits", [inp], headers={"x-canary": "1"})
    np.testing.assert_allclose(result.as_numpy("probabilities"), np.array(holdout["models"]["digits_mlp/2"]["probabilities"][:batch]), atol=1e-5)
    assert result.get_response(as_json=True)["model_version"] == "2"
    # Pinning a release through model_version.
    result = grpc.infer("digits", [inp], model_version="v0.1.0")
    np.testing.assert_allclose(result.as_numpy("probabilities"), np.array(holdout["models"]["digits_linear/1"]["probabilities"][:batch]), atol=1e-5)


@pytest.mark.parametrize("binary", [True, False])
def test_http_infer_json_and_binary(http, holdout, binary):
    x = rows(holdout, 8)
    inp = httpclient.InferInput("INPUT__0", [8, 64], "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
    result = http.infer("digits", [inp], outputs=[out], headers={"x-user-id": "qa-3"})
    np.testing.assert_allclose(result.as_numpy("probabilities"), np.array(holdout["models"]["digits_mlp/2"]["probabilities"][:8]), atol=1e-5)


def test_sticky_users_get_one_version(grpc, holdout):
    inp = grpcclient.InferInput("INPUT__0", [1, 64], "FP32")
    inp.set_data_from_numpy(rows(holdout, 1))
    for user in ["alice", "bob", "carol"]:
        versions = {grpc.infer("digits", [inp], headers={"x-user-id": user}).get_response(as_json=True)["model_version"] for _ in range(5)}
        assert len(versions) == 1, f"{user} saw {versions}"


def test_errors(grpc, http, holdout):
    inp = grpcclient.InferInput("INPUT__0", [1, 64], "FP32")
    inp.set_data_from_numpy(rows(holdout, 1))
    with pytest.raises(InferenceServerException) as e:
        grpc.infer("no_such_route", [inp])
    assert e.value.status() == "StatusCode.NOT_FOUND"
    assert "unknown route 'no_such_route'" in e.value.message()
    bad = grpcclient.InferInput("INPUT__0", [1, 32], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 32), dtype=np.float32))
    with pytest.raises(InferenceServerException) as e:
        grpc.infer("digits", [bad])
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "Expected [-1,64], got [1,32]" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        grpc.infer("digits", [inp], model_version="v9.9.9")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    hbad = httpclient.InferInput("INPUT__0", [1, 32], "FP32")
    hbad.set_data_from_numpy(np.zeros((1, 32), dtype=np.float32))
    with pytest.raises(InferenceServerException) as e:
        http.infer("digits", [hbad])
    assert e.value.status() == "400"
    with pytest.raises(InferenceServerException) as e:
        http.infer("no_such_route", [hbad])
    assert e.value.status() == "404"


def test_statistics(grpc, holdout):
    inp = grpcclient.InferInput("INPUT__0", [1, 64], "FP32")
    inp.set_data_from_numpy(rows(holdout, 1))
    grpc.infer("digits-linear", [inp])
    stats = grpc.get_inference_statistics("digits-linear", as_json=True)["model_stats"]
    assert stats[0]["name"] == "digits-linear"
    assert int(stats[0]["inference_count"]) >= 1


def test_strategy_routes_with_tritonclient(grpc, http, holdout):
    """The sample cascade, ensemble and cached routes answer the official clients, batch 8,
    over gRPC and over REST with JSON and binary tensors."""
    x = rows(holdout, 8, start=40)
    ref = {k: np.array(v["probabilities"][40:48]) for k, v in holdout["models"].items()}
    mean = (ref["digits_mlp/1"] + ref["digits_mlp/2"] + ref["digits_linear/1"]) / 3
    ginp = grpcclient.InferInput("INPUT__0", [8, 64], "FP32")
    ginp.set_data_from_numpy(x)
    np.testing.assert_allclose(grpc.infer("digits-ensemble", [ginp]).as_numpy("probabilities"), mean, atol=1e-5)
    for binary in (True, False):
        hinp = httpclient.InferInput("INPUT__0", [8, 64], "FP32")
        hinp.set_data_from_numpy(x, binary_data=binary)
        out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
        np.testing.assert_allclose(http.infer("digits-ensemble", [hinp], outputs=[out]).as_numpy("probabilities"), mean, atol=1e-5)
    # The cascade answers a batch from one stage: the linear model only when every row
    # passes its margin test.
    top2 = np.sort(ref["digits_linear/1"], axis=1)[:, -2:]
    expected = ref["digits_linear/1"] if (top2[:, 1] - top2[:, 0] >= 0.2).all() else ref["digits_mlp/2"]
    np.testing.assert_allclose(grpc.infer("digits-cascade", [ginp]).as_numpy("probabilities"), expected, atol=1e-5)
    first = grpc.infer("digits-cached", [ginp]).as_numpy("probabilities")
    again = grpc.infer("digits-cached", [ginp]).as_numpy("probabilities")
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(first, ref["digits_mlp/1"], atol=1e-5)


def test_pipeline_and_switch_routes_match_the_offline_composition(grpc, http, holdout):
    """Every held-out row through the sample pipeline and switch routes with the official
    clients equals the composition computed offline with ONNX Runtime on the same model
    files (backends/sample_data/digits_holdout.json): the pipeline in batches over gRPC,
    the switch (which routes a request as a whole) row by row, and both over REST."""
    x = np.array(holdout["features"], dtype=np.float32)
    pipeline = np.array(holdout["routes"]["digits-pipeline"]["probabilities"])
    switch = np.array(holdout["routes"]["digits-switch"]["probabilities"])
    calls = holdout["routes"]["digits-switch"]["model_calls"]
    for start in range(0, len(x), 40):
        batch = x[start : start + 40]
        inp = grpcclient.InferInput("INPUT__0", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        got = grpc.infer("digits-pipeline", [inp]).as_numpy("probabilities")
        np.testing.assert_allclose(got, pipeline[start : start + 40], atol=1e-5)
    for i, row in enumerate(x):
        inp = grpcclient.InferInput("INPUT__0", [1, 64], "FP32")
        inp.set_data_from_numpy(row[None, :])
        result = grpc.infer("digits-switch", [inp])
        np.testing.assert_allclose(result.as_numpy("probabilities")[0], switch[i], atol=1e-5)
    for binary in (True, False):
        hinp = httpclient.InferInput("INPUT__0", [8, 64], "FP32")
        hinp.set_data_from_numpy(x[:8], binary_data=binary)
        out = httpclient.InferRequestedOutput("probabilities", binary_data=binary)
        got = http.infer("digits-pipeline", [hinp], outputs=[out]).as_numpy("probabilities")
        np.testing.assert_allclose(got, pipeline[:8], atol=1e-5)
        one = httpclient.InferInput("INPUT__0", [1, 64], "FP32")
        # A row the switch sends to the specialist.
        k = calls.index(2)
        one.set_data_from_numpy(x[k : k + 1], binary_data=binary)
        result = http.infer("digits-switch", [one], outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("probabilities")[0], switch[k], atol=1e-5)
    meta = grpc.get_model_metadata("digits-pipeline", as_json=True)
    assert meta["inputs"] == [{"name": "INPUT__0", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]}]
