#!/usr/bin/env python3
"""A host identity server's side of a Bitbucket login, in Python.

Generates client stubs from proto/connector/v1/connector.proto with
grpcio-tools, then runs LoginURL -> (the browser at Bitbucket) ->
HandleCallback -> Refresh against a running `bitbucket-connector demo`.
The "browser" step asks the demo's fake Bitbucket for its redirect, which a
real host would receive on its callback URL.

    python3 -m venv .venv && .venv/bin/pip install -r examples/requirements.txt
    bitbucket-connector demo &            # or: cargo run -- demo &
    .venv/bin/python examples/python_host.py --addr 127.0.0.1:5557

Exits 0 when the whole login and refresh worked.
"""

import argparse
import importlib
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO_DIR = os.path.join(ROOT, "proto")
REDIRECT_URI = "http://127.0.0.1:5556/dex/callback"


def load_stubs(out_dir):
    """Compiles the proto into out_dir and imports the generated modules."""
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            os.path.join(PROTO_DIR, "connector", "v1", "connector.proto"),
        ]
    )
    if rc != 0:
        raise SystemExit(f"protoc failed with {rc}")
    sys.path.insert(0, out_dir)
    pb = importlib.import_module("connector.v1.connector_pb2")
    rpc = importlib.import_module("connector.v1.connector_pb2_grpc")
    return pb, rpc


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def browser_login(authorize_url, user):
    """What the user's browser does at Bitbucket: returns the callback URL."""
    url = authorize_url + "&" + urllib.parse.urlencode({"login_as": user})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(url, timeout=10)
    except urllib.error.HTTPError as e:
        if e.code in (301, 302, 303, 307):
            return e.headers["Location"]
        raise
    raise RuntimeError("the authorize page did not redirect")


def error_reason(err):
    """The google.rpc.ErrorInfo reason of a gRPC error: what a host branches on."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--addr", default="127.0.0.1:5557")
    ap.add_argument("--user", default="alice")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as out:
        pb, rpc = load_stubs(out)
        with grpc.insecure_channel(args.addr) as channel:
            stub = rpc.ConnectorServiceStub(channel)
            state = "host-state-42"

            login = stub.LoginURL(
                pb.LoginURLRequest(callback_url=REDIRECT_URI, state=state), timeout=10
            )
            print("1. LoginURL ->", login.url)

            callback = browser_login(login.url, args.user)
            print("2. Bitbucket redirected the browser to", callback)
            query = urllib.parse.urlsplit(callback).query
            got_state = urllib.parse.parse_qs(query)["state"][0]
            if got_state != state:
                raise SystemExit(f"state changed on the way: {got_state!r}")

            scopes = pb.Scopes(offline_access=True, groups=True)
            resp = stub.HandleCallback(
                pb.HandleCallbackRequest(scopes=scopes, raw_query=query), timeout=30
            )
            ident = resp.identity
            print(
                f"3. HandleCallback -> user_id={ident.user_id} username={ident.username} "
                f"email={ident.email} groups={list(ident.groups)} "
                f"connector_data={len(ident.connector_data)} bytes"
            )
            if not ident.connector_data.startswith(b"v1."):
                raise SystemExit("expected sealed connector data")

            refreshed = stub.Refresh(
                pb.RefreshRequest(scopes=scopes, identity=ident), timeout=30
            ).identity
            print(
                f"4. Refresh -> user_id={refreshed.user_id} groups={list(refreshed.groups)} "
                f"connector_data {'unchanged' if refreshed.connector_data == ident.connector_data else 'rotated'}"
            )
            if refreshed.user_id != ident.user_id:
                raise SystemExit("refresh returned another user")

            try:
                stub.HandleCallback(
                    pb.HandleCallbackRequest(raw_query="error=access_denied"), timeout=10
                )
                raise SystemExit("expected an error for error=access_denied")
            except grpc.RpcError as err:
                reason = error_reason(err)
                print(f"5. A denied login -> {err.code().name} ({reason}): {err.details()}")
                if err.code() != grpc.StatusCode.UNAUTHENTICATED or reason != "CALLBACK_ERROR":
                    raise SystemExit("expected UNAUTHENTICATED / CALLBACK_ERROR")
    print("OK")


if __name__ == "__main__":
    main()
