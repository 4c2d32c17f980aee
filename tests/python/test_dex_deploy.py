"""The dex host's deployment files: the Kubernetes manifests under
deploy/kubernetes/dex validate against Kubernetes' schemas, the configs they
and examples/dex carry pass both programs' check-config, and dex/Dockerfile's
build stage builds (no container engine here: its COPY and RUN are replayed)."""

import glob
import os
import re
import shutil
import subprocess
import sys

import yaml

from conftest import BIN, ROOT
from dexenv import DEX_BIN

DEX_K8S = os.path.join(ROOT, "deploy", "kubernetes", "dex")
ENV = dict(os.environ, CONNECTOR_AUTH_TOKEN="t", EXAMPLE_APP_SECRET="s",
           CONNECTOR_DATA_KEY="AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
           BITBUCKET_CLIENT_ID="id", BITBUCKET_CLIENT_SECRET="secret")


def test_the_dex_manifests_validate_strictly():
    manifests = sorted(p for p in glob.glob(os.path.join(DEX_K8S, "*.yaml")) if not p.endswith("kustomization.yaml"))
    assert len(manifests) == 4
    r = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.30.0", *manifests],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_dex_configmaps_config_passes_check_config(tmp_path):
    with open(os.path.join(DEX_K8S, "configmap.yaml")) as f:
        text = yaml.safe_load(f)["data"]["config.yaml"]
    cfg = tmp_path / "dex.yaml"
    cfg.write_text(text)
    r = subprocess.run([DEX_BIN, "check-config", str(cfg)], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    with open(os.path.join(DEX_K8S, "deployment.yaml")) as f:
        env = yaml.safe_load(f)["spec"]["template"]["spec"]["containers"][0]["env"]
    for var in set(re.findall(r"\$\{?([A-Z_][A-Z0-9_]*)", text)) | {"EXAMPLE_APP_SECRET"}:
        assert var in [e["name"] for e in env], var


def test_the_example_pair_passes_check_config():
    r = subprocess.run([DEX_BIN, "check-config", os.path.join(ROOT, "examples", "dex", "dex.yaml")],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([BIN, "check-config", "-c", os.path.join(ROOT, "examples", "dex", "service.yaml")],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    # The service's redirectURI is dex's issuer + /callback.
    with open(os.path.join(ROOT, "examples", "dex", "dex.yaml")) as f:
        issuer = yaml.safe_load(f)["issuer"]
    with open(os.path.join(ROOT, "examples", "dex", "service.yaml")) as f:
        svc = yaml.safe_load(f)
    assert svc["connectors"][0]["config"]["redirectURI"] == issuer + "/callback"


def test_the_dex_dockerfiles_build_stage_builds(tmp_path):
    with open(os.path.join(ROOT, "dex", "Dockerfile")) as f:
        stage = f.read().split("\nFROM ", 2)[1]
    copies = re.findall(r"^COPY (\S+) (\S+)$", stage, re.M)
    assert copies == [("dex/", "./")], copies
    run = re.search(r"^RUN (.+)$", stage, re.M).group(1)
    src = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "dex"), src)
    out = tmp_path / "out"
    r = subprocess.run(["sh", "-c", run.replace("/out/", f"{out}/")], cwd=src, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    v = subprocess.run([str(out / "dex-bitbucket"), "version"], capture_output=True, text=True)
    assert v.returncode == 0 and "dex v0.0.0-" in v.stdout, v.stdout + v.stderr
