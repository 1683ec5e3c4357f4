#!/usr/bin/env python3
"""Train the sample digit classifiers and write them as a Triton-style model repository.

Data: the handwritten-digits set that ships inside scikit-learn (8x8 images, 1797 samples).
Every model takes `INPUT__0` FP32 [-1, 64] with raw pixel values 0..16 (the scaling to 0..1
is inside the graph) and returns `probabilities` FP32 [-1, 10] (a softmax).

Models:
  digits_linear v1    multinomial logistic regression
  digits_mlp v1       MLP (32), few epochs, strong regularisation (a quick baseline)
  digits_mlp v2       MLP (128, 64) trained to convergence (the candidate)
  digits_shuffled v1  a canary-rollout demo that is confidently wrong on purpose: an MLP
                      (128, 64) like mlp v2, trained on the same split but with every label y
                      replaced by SHUFFLE[y] = (y + 3) % 10 (a derangement: no digit keeps its
                      label, so "0" is answered as 3, "7" as 0, ...). Its answers are confident
                      and almost never agree with digits_mlp v1, so a gateway that compares a
                      canary's answers with the current model's rolls it back. Never route real
                      traffic to it. Its holdout "accuracy" is against the true labels (near 0).
  digits_pca v1       a PCA feature extractor: INPUT__0 [-1, 64] -> `features` FP32 [-1, 16]
                      (x/16, minus the training mean, times the first 16 principal axes)
  digits_pca_mlp v1   an MLP (64) on those 16 features: `FEATURES` FP32 [-1, 16] ->
                      `probabilities` [-1, 10]; the pipeline route `digits-pipeline` chains the two
  digits_specialist v1  an MLP (64) trained only on the training rows of the CONFUSABLE digits
                      (the digits in most of digits_linear's errors on the training split,
                      measured below): its softmax over those classes is laid out on the 10
                      columns (0 elsewhere), behind the switch route `digits-switch`

Routes: the held-out file also carries the reference answers of the sample routes
`digits-pipeline` (digits_pca_mlp(digits_pca(x))) and `digits-switch` (digits_specialist where
digits_linear's top class is a confusable digit, else digits_linear), composed here with ONNX
Runtime on the committed model files, with their accuracy and model calls per request.

The ONNX graphs are written by hand from the trained weights with standard ai.onnx operators
only (Mul, Sub, MatMul, Add, Relu, Softmax), so any ONNX runtime (tract, ONNX Runtime, Triton)
loads them; skl2onnx would emit ai.onnx.ml operators that tract does not implement.

Writes, relative to the repository root:
  backends/model_repository/<model>/config.pbtxt, <model>/<version>/model.onnx, SHA256SUMS
  backends/sample_data/digits_holdout.json  (held-out features, labels, reference outputs)
  backends/sample_data/request.json         (one held-out digit as a REST request, for curl)

Run: backends/train/train.sh   (creates a venv from requirements.txt and runs this script)

Reproducibility: the pinned wheels bundle OpenBLAS, which picks its kernels by CPU at load time
and splits work across threads; both change float rounding, so the same code trains bitwise
different weights on an AVX-512 machine or with more threads. The script therefore pins the
OpenBLAS kernels to Haswell (AVX2; these reproduce the committed models bit for bit) on x86-64
CPUs that have AVX2 and FMA, unless OPENBLAS_CORETYPE is already set, and runs single-threaded.
"""

import hashlib
import json
import os
import pathlib
import platform
import warnings


def _pin_blas():
    """Fix OpenBLAS's kernel choice and thread count; must run before numpy is imported."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = "1"
    if platform.machine().lower() not in ("x86_64", "amd64") or "OPENBLAS_CORETYPE" in os.environ:
        return
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return  # cannot tell whether forcing AVX2 kernels is safe here; leave OpenBLAS's choice
    if "avx2" in flags and "fma" in flags:
        os.environ["OPENBLAS_CORETYPE"] = "Haswell"


_pin_blas()
# The imports below load OpenBLAS, so they must come after _pin_blas().

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

ROOT = pathlib.Path(__file__).resolve().parents[2]
REPO = ROOT / "backends" / "model_repository"
DATA = ROOT / "backends" / "sample_data"
SEED = 20261126
OPSET = 13
IR_VERSION = 8  # tract and ONNX Runtime both read IR 8; newer onnx defaults may be ahead of them
# digits_shuffled's label map: digit d is trained (and so answered) as SHUFFLE[d] = (d + 3) % 10.
SHUFFLE = np.array([(d + 3) % 10 for d in range(10)], dtype=np.int64)
assert (SHUFFLE != np.arange(10)).all() and sorted(SHUFFLE) == list(range(10)), "SHUFFLE: derangement"


def finish_graph(name, nodes, inits, inputs, outputs):
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", w]) for n, w in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", w]) for n, w in outputs],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="switchyard-train")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def graph_from_layers(name, layers, input_name="INPUT__0", rescale=True, spread=None):
    """An ONNX graph: x/16 (when `rescale`), then (MatMul, Add, Relu)* and a final MatMul, Add,
    Softmax; `spread` (classes x 10, 0/1) lays a softmax over fewer classes on the 10 columns."""
    nodes, inits = [], []
    current = input_name
    if rescale:
        nodes.append(helper.make_node("Mul", [input_name, "scale"], ["h0"], name="rescale"))
        inits.append(numpy_helper.from_array(np.array([1.0 / 16.0], dtype=np.float32), "scale"))
        current = "h0"
    for i, (w, b) in enumerate(layers):
        last = i == len(layers) - 1
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"W{i}"))
        inits.append(numpy_helper.from_array(b.astype(np.float32), f"B{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [f"mm{i}"], name=f"matmul{i}"))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"B{i}"], [f"z{i}"], name=f"add{i}"))
        if last and spread is None:
            nodes.append(helper.make_node("Softmax", [f"z{i}"], ["probabilities"], axis=1, name="softmax"))
        elif last:
            nodes.append(helper.make_node("Softmax", [f"z{i}"], ["p_classes"], axis=1, name="softmax"))
            inits.append(numpy_helper.from_array(spread.astype(np.float32), "columns"))
            nodes.append(helper.make_node("MatMul", ["p_classes", "columns"], ["probabilities"], name="spread"))
        else:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [f"a{i}"], name=f"relu{i}"))
            current = f"a{i}"
    width = layers[0][0].shape[0]
    return finish_graph(name, nodes, inits, [(input_name, width)], [("probabilities", 10)])


def pca_graph(name, pca):
    """x/16 - mean, times the principal axes: `features` [-1, k]."""
    k = pca.components_.shape[0]
    nodes = [
        helper.make_node("Mul", ["INPUT__0", "scale"], ["h0"], name="rescale"),
        helper.make_node("Sub", ["h0", "mean"], ["centred"], name="centre"),
        helper.make_node("MatMul", ["centred", "axes"], ["features"], name="project"),
    ]
    inits = [
        numpy_helper.from_array(np.array([1.0 / 16.0], dtype=np.float32), "scale"),
        numpy_helper.from_array(pca.mean_.astype(np.float32), "mean"),
        numpy_helper.from_array(pca.components_.T.astype(np.float32), "axes"),
    ]
    return finish_graph(name, nodes, inits, [("INPUT__0", 64)], [("features", k)])


DEFAULT_COMMENT = "digit classifier trained by backends/train/train_digits.py."


def config_pbtxt(name, version_policy, comment=DEFAULT_COMMENT, io=(("INPUT__0", 64), ("probabilities", 10))):
    (input_name, input_width), (output_name, output_width) = io
    return f"""# {name}: {comment}
name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 64
{version_policy}input [
  {{
    name: "{input_name}"
    data_type: TYPE_FP32
    dims: [ {input_width} ]
  }}
]
output [
  {{
    name: "{output_name}"
    data_type: TYPE_FP32
    dims: [ {output_width} ]
  }}
]
dynamic_batching {{
  preferred_batch_size: [ 16, 32 ]
  max_queue_delay_microseconds: 100
  default_queue_policy {{
    max_queue_size: 1024
  }}
}}
instance_group [
  {{
    count: 1
    kind: KIND_CPU
  }}
]
"""


def write_version(model_dir, version, model):
    vdir = model_dir / str(version)
    vdir.mkdir(parents=True, exist_ok=True)
    path = vdir / "model.onnx"
    path.write_bytes(model.SerializeToString())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    # sha256sum's own format, so `sha256sum -c SHA256SUMS` checks it too.
    (vdir / "SHA256SUMS").write_text(f"{digest}  model.onnx\n")
    return path


def run_onnx(path, x, io=("INPUT__0", "probabilities")):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run([io[1]], {io[0]: x})[0]


def confusable_digits(model, x, y, count=3):
    """The `count` digits in most of `model`'s errors on (x, y), as true or as answered class."""
    predicted = model.predict(x)
    involved = np.zeros(10, dtype=np.int64)
    for t, p in zip(y, predicted):
        if t != p:
            involved[t] += 1
            involved[p] += 1
    order = sorted(range(10), key=lambda d: (-involved[d], d))
    return sorted(order[:count]), involved


def main():
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=SEED, stratify=y)
    s_train = x_train / 16.0

    linear = LogisticRegression(C=0.05, max_iter=2000)
    linear.fit(s_train, y_train)
    # v1: one small hidden layer, few epochs, strong regularisation (a quick baseline).
    mlp1 = MLPClassifier(hidden_layer_sizes=(32,), alpha=1e-2, max_iter=60, random_state=SEED)
    mlp1.fit(s_train, y_train)
    # v2: two wider layers trained to convergence (the candidate).
    mlp2 = MLPClassifier(hidden_layer_sizes=(128, 64), alpha=1e-4, max_iter=400, random_state=SEED + 1)
    mlp2.fit(s_train, y_train)
    # digits_shuffled v1: like v2 but on permuted labels, so it is confidently wrong (a rollout demo).
    shuffled = MLPClassifier(hidden_layer_sizes=(128, 64), alpha=1e-4, max_iter=400, random_state=SEED + 2)
    shuffled.fit(s_train, SHUFFLE[y_train])
    # Output column i must be class i (every class occurs in the training split).
    assert (shuffled.classes_ == np.arange(10)).all()

    def mlp_layers(m):
        return list(zip(m.coefs_, m.intercepts_))

    models = {
        ("digits_linear", 1): graph_from_layers("digits_linear", [(linear.coef_.T, linear.intercept_)]),
        ("digits_mlp", 1): graph_from_layers("digits_mlp_v1", mlp_layers(mlp1)),
        ("digits_mlp", 2): graph_from_layers("digits_mlp_v2", mlp_layers(mlp2)),
        ("digits_shuffled", 1): graph_from_layers("digits_shuffled", mlp_layers(shuffled)),
    }
    trained = {("digits_linear", 1): linear, ("digits_mlp", 1): mlp1, ("digits_mlp", 2): mlp2, ("digits_shuffled", 1): shuffled}
    policies = {"digits_linear": "", "digits_mlp": "version_policy: { all {} }\n", "digits_shuffled": ""}
    comments = {
        "digits_shuffled": "canary-rollout demo trained by backends/train/train_digits.py on permuted labels "
        "((y + 3) mod 10): confidently wrong on purpose, never route real traffic to it.",
    }

    holdout = {
        "description": "Held-out split of sklearn load_digits (20%, stratified, seed "
        f"{SEED}); reference probabilities from ONNX Runtime on the committed models",
        "features": [[float(v) for v in row] for row in x_test],
        "labels": [int(v) for v in y_test],
        "models": {},
    }
    for name, policy in policies.items():
        (REPO / name).mkdir(parents=True, exist_ok=True)
        (REPO / name / "config.pbtxt").write_text(config_pbtxt(name, policy, comments.get(name, DEFAULT_COMMENT)))
    onnx_probs = {}
    for (name, version), model in models.items():
        path = write_version(REPO / name, version, model)
        probs = run_onnx(path, x_test)
        # The sklearn model and the hand-built graph must agree, or the export is wrong.
        sk_probs = trained[(name, version)].predict_proba(x_test / 16.0)
        assert np.abs(sk_probs - probs).max() < 1e-4, f"{name} v{version}: ONNX export disagrees with sklearn"
        accuracy = float((probs.argmax(axis=1) == y_test).mean())
        holdout["models"][f"{name}/{version}"] = {
            "accuracy": accuracy,
            "probabilities": [[float(v) for v in row] for row in probs],
        }
        print(f"{name} v{version}: held-out accuracy {accuracy:.4f} ({int(round(accuracy * len(y_test)))}/{len(y_test)})")
        onnx_probs[(name, version)] = probs

    # The rollout demo must be confident and disagree with the current model (digits_mlp v1).
    wrong, current = onnx_probs[("digits_shuffled", 1)], onnx_probs[("digits_mlp", 1)]
    agreement = float((wrong.argmax(axis=1) == current.argmax(axis=1)).mean())
    permuted = float((wrong.argmax(axis=1) == SHUFFLE[y_test]).mean())
    confidence = float(wrong.max(axis=1).mean())
    print(
        f"digits_shuffled v1: top-1 agreement with digits_mlp v1 {agreement:.4f}, "
        f"accuracy on permuted labels {permuted:.4f}, mean max-probability {confidence:.4f}"
    )
    assert agreement < 0.05 and confidence > 0.9, "digits_shuffled is not confidently wrong"

    # The pipeline: a PCA feature extractor, then a classifier on its 16 features.
    pca = PCA(n_components=16, svd_solver="full", random_state=SEED)
    f_train = pca.fit_transform(s_train)
    pca_mlp = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=500, random_state=SEED + 3)
    pca_mlp.fit(f_train, y_train)
    # The switch: the digits linear confuses most on the training split, and a specialist for them.
    confusable, involved = confusable_digits(linear, s_train, y_train)
    print(f"digits_linear on the training split: errors involving each digit {involved.tolist()}; confusable: {confusable}")
    mask = np.isin(y_train, confusable)
    specialist = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=500, random_state=SEED + 4)
    specialist.fit(s_train[mask], y_train[mask])
    assert list(specialist.classes_) == confusable
    spread = np.zeros((len(confusable), 10))
    for i, d in enumerate(confusable):
        spread[i, d] = 1.0
    staged = {
        "digits_pca": (pca_graph("digits_pca", pca), ("INPUT__0", "features"),
                       "PCA feature extractor (64 pixels -> 16 features) trained by backends/train/train_digits.py."),
        "digits_pca_mlp": (graph_from_layers("digits_pca_mlp", mlp_layers(pca_mlp), input_name="FEATURES", rescale=False),
                           ("FEATURES", "probabilities"),
                           "digit classifier on digits_pca's 16 features, trained by backends/train/train_digits.py."),
        "digits_specialist": (graph_from_layers("digits_specialist", mlp_layers(specialist), spread=spread),
                              ("INPUT__0", "probabilities"),
                              f"specialist for the digits {confusable} that digits_linear confuses most, trained by "
                              "backends/train/train_digits.py on those digits only (0 on the other columns)."),
    }
    widths = {"INPUT__0": 64, "features": 16, "FEATURES": 16, "probabilities": 10}
    paths = {}
    for name, (model, io, comment) in staged.items():
        (REPO / name).mkdir(parents=True, exist_ok=True)
        (REPO / name / "config.pbtxt").write_text(
            config_pbtxt(name, "", comment, io=((io[0], widths[io[0]]), (io[1], widths[io[1]])))
        )
        paths[name] = (write_version(REPO / name, 1, model), io)
    def run_staged(name, x):
        path, io = paths[name]
        return run_onnx(path, x, io)

    features = run_staged("digits_pca", x_test)
    assert np.abs(features - pca.transform(x_test / 16.0)).max() < 1e-4, "digits_pca: ONNX export disagrees with sklearn"
    pipeline = run_staged("digits_pca_mlp", features)
    assert np.abs(pipeline - pca_mlp.predict_proba(pca.transform(x_test / 16.0))).max() < 1e-4, "digits_pca_mlp: export"
    special = run_staged("digits_specialist", x_test)
    assert np.abs(special[:, confusable] - specialist.predict_proba(x_test / 16.0)).max() < 1e-4, "digits_specialist: export"
    for name, probs in (("digits_pca_mlp", pipeline), ("digits_specialist", special)):
        accuracy = float((probs.argmax(axis=1) == y_test).mean())
        holdout["models"][f"{name}/1"] = {"accuracy": accuracy, "probabilities": [[float(v) for v in row] for row in probs]}
        print(f"{name} v1: held-out accuracy {accuracy:.4f}")
    linear_probs = onnx_probs[("digits_linear", 1)]
    to_specialist = np.isin(linear_probs.argmax(axis=1), confusable)
    switched = np.where(to_specialist[:, None], special, linear_probs)
    holdout["confusable_digits"] = confusable
    holdout["routes"] = {}
    for route, probs, calls in (
        ("digits-pipeline", pipeline, np.full(len(y_test), 2)),
        ("digits-switch", switched, 1 + to_specialist.astype(np.int64)),
    ):
        accuracy = float((probs.argmax(axis=1) == y_test).mean())
        holdout["routes"][route] = {
            "accuracy": accuracy,
            "model_calls": [int(c) for c in calls],
            "probabilities": [[float(v) for v in row] for row in probs],
        }
        print(f"route {route}: held-out accuracy {accuracy:.4f}, model calls per request {calls.mean():.3f}")

    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "digits_holdout.json").write_text(json.dumps(holdout, separators=(",", ":")) + "\n")
    # One held-out digit as a KServe v2 REST request, for curl.
    request = {"inputs": [{"name": "INPUT__0", "shape": [1, 64], "datatype": "FP32", "data": holdout["features"][0]}]}
    (DATA / "request.json").write_text(json.dumps(request) + "\n")


if __name__ == "__main__":
    main()
