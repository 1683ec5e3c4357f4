"""Checks what the Kubernetes schemas cannot: that the rendered manifests fit together and
fit the gateway.

For one rendering (`kubectl kustomize` output) it
  1. lays out the gateway pod's view of its ConfigMap volumes under OUT (the files each
     mount would show), and runs `switchyard check --config` on the gateway.yaml there, as
     the container's own arguments name it: the policies are found through gateway.yaml's
     `policies:` path inside the mounts, as in the pod;
  2. checks that the policies ConfigMap holds exactly the repository's policy files, byte
     for byte (policies/Kustomization lists them by hand);
  3. checks that gateway.yaml's listeners are the container's ports, that every Service
     selects the pods of one Deployment and targets ports they have, that state_dir is a
     writable volume, and that every pool endpoint names a headless Service of the
     rendering with its gRPC and metrics ports.

Usage: check_rendered.py RENDERED.yaml OUT_DIR SWITCHYARD_BINARY REPO_ROOT
Run by validate.sh with the venv's Python (PyYAML comes with kubernetes-validate).
"""

import pathlib
import subprocess
import sys

import yaml

POLICY_SUFFIXES = (".yaml", ".yml")


def fail(message: str) -> None:
    sys.exit(f"check_rendered: {message}")


def one(docs: list[dict], kind: str, name: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    if len(found) != 1:
        fail(f"expected one {kind} {name}, found {len(found)}")
    return found[0]


def port_of(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])


def main(rendered: str, out: str, switchyard: str, repo: str) -> None:
    docs = [d for d in yaml.safe_load_all(pathlib.Path(rendered).read_text()) if d]
    out_dir = pathlib.Path(out)
    repo_root = pathlib.Path(repo)
    deployment = one(docs, "Deployment", "switchyard-gateway")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "gateway"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}

    # 1. The pod's view of its ConfigMap volumes, then `switchyard check` on it.
    writable = []
    for mount in container["volumeMounts"]:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            writable.append(pathlib.PurePosixPath(mount["mountPath"]))
            continue
        source = config_maps.get(volume.get("configMap", {}).get("name"))
        if source is None:
            fail(f"volume {mount['name']}: no ConfigMap of that name in the rendering")
        target = out_dir / mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        for key, text in source.get("data", {}).items():
            (target / key).write_text(text)
    args = container["args"]
    if args[:2] != ["gateway", "--config"]:
        fail(f"the gateway container runs {args}, not `gateway --config FILE`")
    config_path = out_dir / args[2].lstrip("/")
    if subprocess.run([switchyard, "check", "--config", str(config_path)]).returncode != 0:
        fail(f"`switchyard check` refuses the gateway.yaml and policies of {rendered}")
    gateway = yaml.safe_load(config_path.read_text())

    # 2. The policies ConfigMap is the policy folder.
    policies_dir = (config_path.parent / gateway["policies"]).resolve()
    mounted = {p.name: p.read_text() for p in policies_dir.iterdir()}
    repository = {
        p.name: p.read_text()
        for p in sorted((repo_root / "policies").iterdir())
        if p.name.endswith(POLICY_SUFFIXES) and not p.name.startswith(".")
    }
    if mounted.keys() != repository.keys():
        only_mounted = sorted(mounted.keys() - repository.keys())
        only_repository = sorted(repository.keys() - mounted.keys())
        fail(
            "the policies ConfigMap and policies/ hold different files: list them in "
            f"policies/Kustomization (only in the ConfigMap: {only_mounted}, "
            f"only in policies/: {only_repository})"
        )
    changed = [name for name in repository if mounted[name] != repository[name]]
    if changed:
        fail(f"the policies ConfigMap differs from policies/ in {changed}")

    # 3. Listeners, ports, state_dir and pools agree with the manifests.
    container_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for listener, port_name in [("http", "http"), ("grpc", "grpc"), ("admin", "admin")]:
        address = gateway["listen"][listener]
        if port_of(address) != container_ports.get(port_name):
            fail(f"listen.{listener} {address} is not containerPort {port_name}")
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    for svc in (d for d in docs if d["kind"] == "Service"):
        name, selector = svc["metadata"]["name"], svc["spec"]["selector"]
        selected = [
            d for d in deployments
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        if len(selected) != 1:
            fail(f"Service {name} selects the pods of {len(selected)} Deployments, not one")
        containers = selected[0]["spec"]["template"]["spec"]["containers"]
        names = {p["name"] for c in containers for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            if port["targetPort"] not in names:
                fail(f"Service {name} port {port['name']}: no container port {port['targetPort']}")
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        if container[probe]["httpGet"]["port"] not in container_ports:
            fail(f"the gateway's {probe} names no container port")
    state_dir = gateway.get("state_dir")
    if state_dir and container["securityContext"].get("readOnlyRootFilesystem"):
        if not any(pathlib.PurePosixPath(state_dir).is_relative_to(w) for w in writable):
            fail(f"state_dir {state_dir} is on the read-only root file system, not a volume")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for pool, backend in gateway["backends"].items():
        for endpoint in backend["endpoints"]:
            address = endpoint if isinstance(endpoint, str) else endpoint["address"]
            host = address.rsplit(":", 1)[0]
            svc = services.get(host)
            if svc is None:
                fail(f"pool {pool}: {address} names no Service of the rendering")
            if svc["spec"].get("clusterIP") != "None":
                fail(f"pool {pool}: Service {host} is not headless (clusterIP: None)")
            ports = {p["port"] for p in svc["spec"]["ports"]}
            wanted = [port_of(address)]
            if isinstance(endpoint, dict) and endpoint.get("metrics"):
                wanted.append(port_of(endpoint["metrics"]))
            if not set(wanted) <= ports:
                fail(f"pool {pool}: Service {host} serves ports {sorted(ports)}, not {wanted}")
    print(
        f"{pathlib.Path(rendered).name}: {len(docs)} resources fit together; "
        f"{len(mounted)} policy files identical to policies/; "
        f"pools {', '.join(gateway['backends'])} on headless Services"
    )


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:])
