"""deploy/kubernetes: valid against Kubernetes' schemas, and its embedded
config passes our own check-config."""

import glob
import os
import subprocess
import re
import sys

import yaml

from conftest import BIN, ROOT

MANIFESTS = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "deploy", "kubernetes", "*.yaml"))
    if not p.endswith("kustomization.yaml")
)


def test_manifests_validate_strictly_against_kubernetes_schemas():
    assert len(MANIFESTS) >= 4
    r = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.30.0", *MANIFESTS],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


DEPLOY = os.path.join(ROOT, "deploy", "kubernetes")
KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


def variables(text):
    """The $VARs of a YAML document's values (comments left out)."""
    return set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", yaml.safe_dump(yaml.safe_load(text))))


def kustomization():
    with open(os.path.join(DEPLOY, "kustomization.yaml")) as f:
        text = f.read()
    return text, yaml.safe_load(text)


def configmap_config():
    with open(os.path.join(DEPLOY, "configmap.yaml")) as f:
        return yaml.safe_load(f)["data"]["config.yaml"]


def check_config(path, names, **extra):
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update({n: "x" for n in names}, CONNECTOR_DATA_KEY=KEY, **extra)
    return subprocess.run([BIN, "check-config", "-c", str(path)], capture_output=True, text=True, env=env)


def test_the_configmaps_config_passes_check_config_with_the_secrets_variables(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(configmap_config())
    text, _ = kustomization()
    r = check_config(cfg, re.findall(r"--from-literal=([A-Z_][A-Z0-9_]*)=", text))
    assert r.returncode == 0, r.stderr
    assert "bitbucket-cloud" in r.stdout


def test_kustomize_applies_no_secret_and_every_variable_is_in_the_create_secret_command():
    text, k = kustomization()
    assert "secretGenerator" not in k
    for res in k["resources"]:
        with open(os.path.join(DEPLOY, res)) as f:
            for doc in yaml.safe_load_all(f):
                assert doc["kind"] != "Secret", f"{res} would apply a placeholder Secret"
    literals = set(re.findall(r"--from-literal=([A-Z_][A-Z0-9_]*)=", text))
    assert variables(configmap_config()) <= literals, variables(configmap_config()) - literals
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for name in literals:
        assert f"--from-literal={name}=" in readme, f"the README's kubectl create secret lacks {name}"


def test_the_kustomization_sets_the_image_the_deployment_names():
    _, k = kustomization()
    with open(os.path.join(DEPLOY, "deployment.yaml")) as f:
        dep = yaml.safe_load(f)
    images = {c["image"] for c in dep["spec"]["template"]["spec"]["containers"]}
    assert images == {k["images"][0]["name"]}, (images, k["images"])
    assert k["images"][0]["newName"] and k["images"][0]["newTag"]
    assert all(os.path.exists(os.path.join(DEPLOY, r)) for r in k["resources"])


def test_the_container_config_binds_all_interfaces_and_the_docker_run_passes_its_variables(tmp_path):
    path = os.path.join(ROOT, "examples", "config-container.yaml")
    with open(path) as f:
        text = f.read()
    cfg = yaml.safe_load(text)
    assert cfg["grpc"]["addr"] == "0.0.0.0:5557"
    assert cfg["telemetry"]["http"] == "0.0.0.0:5558"
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        dockerfile = f.read()
    run = dockerfile[dockerfile.index("docker run") : dockerfile.index("\nFROM")]
    passed = set(re.findall(r"-e ([A-Z_][A-Z0-9_]*)", run))
    assert passed == variables(text), (passed, variables(text))
    assert "examples/config-container.yaml:/etc/bitbucket-connector/config.yaml" in run
    assert "-p 5557:5557" in run and "EXPOSE 5557 5558" in dockerfile
    r = check_config(path, passed, BITBUCKET_REDIRECT_URI="https://dex.example.com/dex/callback")
    assert r.returncode == 0, r.stderr
    # Each variable is needed: without it, check-config names it.
    for name in passed:
        env = {k: v for k, v in os.environ.items() if k not in passed}
        env.update({n: "x" for n in passed})
        env.update(CONNECTOR_DATA_KEY=KEY, BITBUCKET_REDIRECT_URI="https://dex.example.com/dex/callback")
        del env[name]
        r = subprocess.run([BIN, "check-config", "-c", path], capture_output=True, text=True, env=env)
        assert r.returncode == 1 and f"${name} is not set" in r.stderr, (name, r.stderr)
