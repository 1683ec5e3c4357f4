"""The official `tritonclient.grpc` client against `switchyard backend`."""

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from conftest import CONTROL_TOKEN


@pytest.fixture(scope="module")
def client(backend):
    return grpcclient.InferenceServerClient(backend.addrs["grpc"])


def infer(client, model, rows, version=""):
    inp = grpcclient.InferInput("INPUT__0", list(rows.shape), "FP32")
    inp.set_data_from_numpy(rows.astype(np.float32))
    out = grpcclient.InferRequestedOutput("probabilities")
    return client.infer(model, [inp], model_version=version, outputs=[out])


def test_health(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits_mlp")
    assert client.is_model_ready("digits_mlp", "1")
    assert not client.is_model_ready("no_such_model")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "switchyard"
    assert "model_repository" in meta["extensions"]


def test_metadata_and_config(client):
    meta = client.get_model_metadata("digits_mlp", as_json=True)
    assert meta["name"] == "digits_mlp"
    assert meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "INPUT__0", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "10"]}]
    config = client.get_model_config("digits_mlp", as_json=True)["config"]
    assert config["max_batch_size"] == 64
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["dynamic_batching"]["preferred_batch_size"] == [16, 32]
    assert "all" in config["version_policy"]


@pytest.mark.parametrize("model,version", [("digits_linear", "1"), ("digits_mlp", "1"), ("digits_mlp", "2")])
@pytest.mark.parametrize("batch", [1, 64])
def test_infer_matches_reference(client, holdout, model, version, batch):
    features = np.array(holdout["features"], dtype=np.float32)
    reference = np.array(holdout["models"][f"{model}/{version}"]["probabilities"], dtype=np.float32)
    labels = np.array(holdout["labels"])
    predictions = []
    for start in range(0, len(features), batch):
        rows = features[start : start + batch]
        result = infer(client, model, rows, version)
        probs = result.as_numpy("probabilities")
        assert probs.shape == (len(rows), 10)
        np.testing.assert_allclose(probs, reference[start : start + batch], atol=1e-5)
        predictions.append(probs.argmax(axis=1))
        if batch == 1 and start >= 40:
            break  # batch 1 over a prefix keeps the suite quick; batch 64 covers it all
    predictions = np.concatenate(predictions)
    if batch == 64:
        accuracy = float((predictions == labels).mean())
        assert accuracy == pytest.approx(holdout["models"][f"{model}/{version}"]["accuracy"], abs=1e-12)
    response = result.get_response(as_json=True)
    assert response["model_name"] == model
    assert response["model_version"] == version


def status_of(excinfo):
    return excinfo.value.status()


def test_unknown_model(client, holdout):
    with pytest.raises(InferenceServerException) as e:
        infer(client, "no_such_model", np.zeros((1, 64)))
    assert status_of(e) == "StatusCode.NOT_FOUND"
    assert "no_such_model" in e.value.message()


def test_unknown_version(client):
    with pytest.raises(InferenceServerException) as e:
        infer(client, "digits_mlp", np.zeros((1, 64)), version="9")
    assert status_of(e) == "StatusCode.NOT_FOUND"


def test_wrong_shape(client):
    with pytest.raises(InferenceServerException) as e:
        infer(client, "digits_mlp", np.zeros((2, 32)))
    assert status_of(e) == "StatusCode.INVALID_ARGUMENT"
    assert "Expected [-1,64], got [2,32]" in e.value.message()


def test_wrong_datatype(client):
    inp = grpcclient.InferInput("INPUT__0", [1, 64], "FP64")
    inp.set_data_from_numpy(np.zeros((1, 64), dtype=np.float64))
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits_mlp", [inp])
    assert status_of(e) == "StatusCode.INVALID_ARGUMENT"
    assert "expects 'FP32'" in e.value.message()


def test_batch_above_max(client):
    with pytest.raises(InferenceServerException) as e:
        infer(client, "digits_mlp", np.zeros((65, 64)))
    assert status_of(e) == "StatusCode.INVALID_ARGUMENT"
    assert "batch-size must be between 1 and 64" in e.value.message()


def test_statistics_and_repository(client):
    infer(client, "digits_linear", np.zeros((3, 64)))
    stats = client.get_inference_statistics("digits_linear", as_json=True)["model_stats"][0]
    assert stats["name"] == "digits_linear"
    assert int(stats["inference_count"]) >= 3
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m.get("version"), m["state"]) for m in index} >= {
        ("digits_linear", "1", "READY"),
        ("digits_mlp", "1", "READY"),
        ("digits_mlp", "2", "READY"),
    }
    # Model control needs the backend's token; without it the model stays loaded.
    with pytest.raises(InferenceServerException) as e:
        client.unload_model("digits_linear")
    assert status_of(e) == "StatusCode.UNAUTHENTICATED"
    assert client.is_model_ready("digits_linear")
    auth = {"authorization": f"Bearer {CONTROL_TOKEN}"}
    client.unload_model("digits_linear", headers=auth)
    assert not client.is_model_ready("digits_linear")
    client.load_model("digits_linear", headers=auth)
    assert client.is_model_ready("digits_linear")
