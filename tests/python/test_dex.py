"""dex logs people in through the service: `dex-bitbucket` (dex's own server
with the `bitbucket-connector` type), the service and the fake Bitbucket as
real processes on loopback, and an OIDC relying party that is not ours
(requests + PyJWT) going through dex's real HTTP endpoints."""

import os
import sqlite3
import time

import pytest
import requests

from dexenv import ALICE_UUID, DEX_BIN, BitbucketProxy, LoginFailed, Stack, decode_sub, make_ca, make_cert

if not os.path.exists(DEX_BIN):
    raise RuntimeError(f"{DEX_BIN} is not built: scripts/test builds it "
                       "(cd dex && go build -o ../target/dex-bitbucket ./cmd/dex-bitbucket)")

ALICE_GROUPS = [
    "wonderland", "looking-glass", "tea-party",
    "wonderland/developers", "wonderland/administrators", "looking-glass/readers",
    "wonderland:owner", "looking-glass:member", "tea-party:collaborator",
]


@pytest.fixture
def stack(tmp_path):
    stacks = []

    def make(**kw):
        d = tmp_path / f"stack{len(stacks)}"
        d.mkdir()
        s = Stack(d, **kw)
        stacks.append(s)
        return s

    yield make
    for s in stacks:
        s.down()


def test_a_login_through_dex_carries_the_users_claims_and_groups(stack):
    s = stack()
    s.start_dex()
    rp = s.rp()

    tokens = rp.login("alice")
    claims = rp.claims(tokens["id_token"])

    assert claims["email"] == "alice@example.com"
    assert claims["email_verified"] is True
    assert claims["name"] == "alice"
    assert claims["preferred_username"] == "alice"
    assert claims["groups"] == ALICE_GROUPS
    assert decode_sub(claims["sub"]) == (ALICE_UUID, "bitbucket-cloud")
    assert "refresh_token" in tokens


def test_refreshes_at_dex_rotate_the_bitbucket_refresh_token_and_keep_working(stack):
    s = stack()
    # Every access token is expired for the service (less than its 30 s
    # margin), so each dex refresh redeems the Bitbucket refresh token.
    s.fake.settings(access_token_ttl_secs=1, refresh_grace_secs=2)
    s.start_dex()
    rp = s.rp()
    tokens = rp.login("alice")
    sub = rp.claims(tokens["id_token"])["sub"]

    refresh_token = tokens["refresh_token"]
    for _ in range(2):
        r = rp.refresh(refresh_token)
        assert r.status_code == 200, r.text
        refresh_token = r.json()["refresh_token"]
        claims = rp.claims(r.json()["id_token"])
        assert claims["sub"] == sub
        assert claims["groups"] == ALICE_GROUPS

    issued = [t for t in s.fake.refresh_tokens() if t["username"] == "alice"]
    assert len(issued) == 3, issued  # the login's, then one per refresh
    assert [t["used"] for t in issued] == [True, True, False]

    time.sleep(2.5)  # the fake's grace window for rotated refresh tokens
    dead = s.fake.redeem(issued[0]["token"])
    assert dead.status_code == 400 and "invalid_grant" in dead.text, dead.text

    r = rp.refresh(refresh_token)
    assert r.status_code == 200, r.text
    assert rp.claims(r.json()["id_token"])["sub"] == sub


def test_a_user_outside_teams_gets_dexs_403_and_the_service_logs_the_reason(stack):
    s = stack(teams=["looking-glass"])
    s.start_dex()
    rp = s.rp()

    with pytest.raises(LoginFailed) as e:
        rp.login("bob")  # bob is only in wonderland

    assert e.value.response.status_code == 403
    def denied(line):
        return line.get("rpc") == "HandleCallback" and line.get("code") == "PERMISSION_DENIED"

    refused = [line for line in s.service.wait_log(denied) if denied(line)]
    assert [line.get("reason") for line in refused] == ["NOT_IN_REQUIRED_TEAMS"], s.service.logs()
    # alice is in looking-glass: her login works, with that workspace only.
    claims = rp.claims(rp.login("alice")["id_token"])
    assert claims["groups"] == ["looking-glass", "looking-glass/readers", "looking-glass:member"]


def test_the_service_stopped_fails_the_login_quickly_and_dex_recovers_when_it_is_back(stack):
    s = stack()
    s.start_dex()  # the connector's timeout is 5 s
    rp = s.rp()
    rp.login("alice")

    s.service.stop()
    started = time.monotonic()
    with pytest.raises(LoginFailed) as e:
        rp.login("alice", timeout=20)
    assert e.value.response.status_code >= 500
    assert time.monotonic() - started < 20

    s.start_service()
    claims = rp.claims(rp.login("alice")["id_token"])
    assert claims["email"] == "alice@example.com"
    assert s.dex.p.proc.poll() is None


@pytest.fixture
def pki(tmp_path):
    d = str(tmp_path / "pki")
    os.mkdir(d)
    make_ca(d, "server-ca")
    make_ca(d, "client-ca")
    make_cert(d, "server", "server-ca", ["DNS:localhost", "IP:127.0.0.1"])
    make_cert(d, "client", "client-ca", ["DNS:dex"])
    return d


def test_dex_and_the_service_over_mtls_with_a_bearer_token(stack, pki):
    s = stack(service_tls=pki, auth_token="tok-123")
    tls = f"rootCA: {pki}/server-ca.crt\nclientCert: {pki}/client.crt\nclientKey: {pki}/client.key\nserverName: localhost\n"
    s.start_dex(connector_config=s.our_connector(tls + "authToken: $BBC_TOKEN"), env={"BBC_TOKEN": "tok-123"})
    rp = s.rp()
    assert rp.claims(rp.login("alice")["id_token"])["groups"] == ALICE_GROUPS
    s.dex.stop()

    s.start_dex(connector_config=s.our_connector(tls + "authToken: wrong"))
    with pytest.raises(LoginFailed):
        s.rp().login("alice")
    assert any(line.get("code") == "UNAUTHENTICATED"
               for line in s.service.wait_log(lambda line: line.get("code") == "UNAUTHENTICATED")), s.service.logs()
    s.dex.stop()

    no_cert = f"rootCA: {pki}/server-ca.crt\nserverName: localhost\nauthToken: tok-123\n"
    s.start_dex(connector_config=s.our_connector(no_cert))
    with pytest.raises(LoginFailed):
        s.rp().login("alice")
    def handshake_refused(line):
        return line.get("message") == "TLS handshake refused"

    assert any(handshake_refused(line) for line in s.service.wait_log(handshake_refused)), s.service.logs()


def connector_data(db):
    with sqlite3.connect(db) as c:
        rows = c.execute("select connector_data from refresh_token").fetchall()
        rows += c.execute("select connector_data from offline_session").fetchall()
    return [bytes(r[0]) for r in rows if r[0]]


def test_migration_from_dexs_built_in_connector_keeps_sessions(stack):
    s = stack(accept_dex_plaintext=True, groups=False)
    s.start_builtin_dex()
    rp = s.rp()
    tokens = rp.login("alice", scope="openid email profile offline_access")
    before = rp.claims(tokens["id_token"])
    assert s.proxy.tunnels > 0 and not s.proxy.refused
    assert all(d.startswith(b"{") for d in connector_data(s.db)), "dex's own plaintext JSON"
    s.dex.stop()

    s.start_dex()  # same database, same connector id, now type bitbucket-connector
    r = rp.refresh(tokens["refresh_token"])
    assert r.status_code == 200, r.text
    after = rp.claims(r.json()["id_token"])
    assert after["sub"] == before["sub"]
    assert after["email"] == before["email"] == "alice@example.com"
    assert decode_sub(after["sub"]) == (ALICE_UUID, "bitbucket-cloud")
    data = connector_data(s.db)
    assert data and all(d.startswith(b"v1.") for d in data), data
    assert b"accessToken" not in b"".join(data)


def test_parity_with_dexs_built_in_connector(stack):
    s = stack(groups=True)  # getWorkspacePermissions, as the built-in offers it
    s.start_builtin_dex("getWorkspacePermissions: true\n")
    rp = s.rp()
    builtin = rp.claims(rp.login("alice")["id_token"])
    assert s.proxy.tunnels > 0 and not s.proxy.refused
    s.dex.stop()
    os.remove(s.db)

    s.start_dex()
    rp = s.rp()
    ours = rp.claims(rp.login("alice")["id_token"])

    for claim in ("sub", "email", "email_verified", "name"):
        assert ours[claim] == builtin[claim], claim
    assert builtin["groups"] == [
        "wonderland", "looking-glass", "tea-party",
        "wonderland:owner", "looking-glass:member", "tea-party:collaborator",
    ]
    assert ours["groups"] == builtin["groups"]


def test_the_proxy_refuses_every_host_but_bitbuckets(stack):
    s = stack(start_service=False)
    s.proxy = BitbucketProxy(s.tmp, s.fake.port)
    with pytest.raises(requests.exceptions.ProxyError):
        requests.get("https://example.com/", proxies={"https": s.proxy.url}, verify=s.proxy.ca, timeout=5)
    assert [r.rsplit(" ", 1)[0] for r in s.proxy.refused] == ["CONNECT example.com:443"]
