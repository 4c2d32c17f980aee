"""deploy/kubernetes: valid against Kubernetes' schemas, and its embedded
config passes our own check-config."""

import glob
import os
import subprocess
import sys

import yaml

from conftest import BIN, ROOT

MANIFESTS = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "deploy", "kubernetes", "*.yaml"))
    if not p.endswith("kustomization.yaml")
)


def test_manifests_validate_strictly_against_kubernetes_schemas():
    assert len(MANIFESTS) >= 5
    r = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.30.0", *MANIFESTS],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_configmaps_config_passes_check_config(tmp_path):
    with open(os.path.join(ROOT, "deploy", "kubernetes", "configmap.yaml")) as f:
        cm = yaml.safe_load(f)
    cfg = tmp_path / "config.yaml"
    cfg.write_text(cm["data"]["config.yaml"])
    env = dict(os.environ)
    with open(os.path.join(ROOT, "deploy", "kubernetes", "secret.yaml")) as f:
        secret = next(yaml.safe_load_all(f))
    for k in secret["stringData"]:
        env[k] = "x"
    env["CONNECTOR_DATA_KEY"] = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    r = subprocess.run([BIN, "check-config", "-c", str(cfg)], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "bitbucket-cloud" in r.stdout


def test_every_secret_the_config_needs_is_in_the_secret():
    with open(os.path.join(ROOT, "deploy", "kubernetes", "configmap.yaml")) as f:
        text = yaml.safe_load(f)["data"]["config.yaml"]
    with open(os.path.join(ROOT, "deploy", "kubernetes", "secret.yaml")) as f:
        secret = next(yaml.safe_load_all(f))
    import re

    for var in set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", text)):
        assert var in secret["stringData"], var
