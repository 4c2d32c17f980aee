"""Starts `bitbucket-connector demo` (service + built-in fake Bitbucket) for
the real-client tests, and generates Python stubs from our proto."""

import importlib
import os
import signal
import socket
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get(
    "BITBUCKET_CONNECTOR_BIN", os.path.join(ROOT, "target", "debug", "bitbucket-connector")
)
REDIRECT_URI = "http://127.0.0.1:5556/dex/callback"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(addr, proc, timeout=15.0):
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with {proc.returncode}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise RuntimeError("the service did not become SERVING")


class Demo:
    def __init__(self, telemetry=False):
        self.addr = f"127.0.0.1:{free_port()}"
        args = [BIN, "demo", "--addr", self.addr]
        self.telemetry = None
        if telemetry:
            self.telemetry = f"127.0.0.1:{free_port()}"
            args += ["--telemetry", self.telemetry]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_serving(self.addr, self.proc)

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def demo():
    d = Demo()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def stubs(tmp_path_factory):
    """(connector_pb2, connector_pb2_grpc) generated from proto/ by grpcio-tools."""
    out = str(tmp_path_factory.mktemp("stubs"))
    proto_dir = os.path.join(ROOT, "proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{proto_dir}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            os.path.join(proto_dir, "connector", "v1", "connector.proto"),
        ]
    )
    assert rc == 0, "protoc failed"
    sys.path.insert(0, out)
    return (
        importlib.import_module("connector.v1.connector_pb2"),
        importlib.import_module("connector.v1.connector_pb2_grpc"),
    )


@pytest.fixture
def demo_with_metrics():
    d = Demo(telemetry=True)
    yield d
    d.stop()
