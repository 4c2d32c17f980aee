"""TLS and mutual TLS with real clients: grpcurl (-cacert/-cert/-key) and
Python grpcio with ssl_channel_credentials, certificates made by openssl."""

import os
import shutil
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import BIN, free_port

OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")


def openssl(*args, cwd):
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d):
    ext = os.path.join(d, "san.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for ca in ("server-ca", "client-ca"):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN={ca}", cwd=d)
    for name, ca in (("server", "server-ca"), ("client", "client-ca")):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext, cwd=d)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("tls")
    d = str(tmp_path)
    make_pki(d)
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"""
grpc:
  addr: 127.0.0.1:{port}
  tlsCert: {d}/server.crt
  tlsKey: {d}/server.key
  tlsClientCA: {d}/client-ca.crt
connectorData:
  keys: [AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=]
connectors:
- type: bitbucket-cloud
  id: bitbucket-cloud
  config:
    clientID: id
    clientSecret: secret
    redirectURI: http://127.0.0.1:5556/dex/callback
"""
    )
    proc = subprocess.Popen([BIN, "serve", "-c", str(cfg)], stderr=subprocess.PIPE, text=True)
    addr = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = grpcurl_tls(d, addr, "list", client_cert=True)
        if r.returncode == 0:
            break
        time.sleep(0.1)
    yield d, addr
    proc.terminate()
    proc.wait(timeout=15)


def grpcurl_tls(d, addr, *args, client_cert=True, ca="server-ca.crt"):
    cmd = [shutil.which("grpcurl"), "-connect-timeout", "3", "-cacert", os.path.join(d, ca), "-servername", "localhost"]
    if client_cert:
        cmd += ["-cert", os.path.join(d, "client.crt"), "-key", os.path.join(d, "client.key")]
    return subprocess.run(cmd + [addr, *args], capture_output=True, text=True, timeout=20)


def test_grpcurl_over_mtls_lists_and_calls(tls_server):
    d, addr = tls_server
    r = grpcurl_tls(d, addr, "list")
    assert r.returncode == 0, r.stderr
    assert "connector.v1.ConnectorService" in r.stdout
    r = grpcurl_tls(d, addr, "grpc.health.v1.Health/Check")
    assert '"SERVING"' in r.stdout, r.stdout + r.stderr


def test_grpcurl_without_a_client_certificate_is_refused(tls_server):
    d, addr = tls_server
    r = grpcurl_tls(d, addr, "list", client_cert=False)
    assert r.returncode != 0


def test_grpcurl_refuses_a_server_it_does_not_trust(tls_server):
    d, addr = tls_server
    r = grpcurl_tls(d, addr, "list", ca="client-ca.crt")
    assert r.returncode != 0
    assert "certificate" in (r.stderr + r.stdout).lower()


def test_python_grpcio_over_mtls(tls_server):
    d, addr = tls_server

    def read(name):
        with open(os.path.join(d, name), "rb") as f:
            return f.read()

    creds = grpc.ssl_channel_credentials(
        root_certificates=read("server-ca.crt"),
        private_key=read("client.key"),
        certificate_chain=read("client.crt"),
    )
    with grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "localhost")]) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
