"""Real processes for the dex end-to-end tests: the fake Bitbucket
(`bitbucket-connector fake-bitbucket`), the service (`bitbucket-connector
serve`), `dex-bitbucket serve`, and an HTTPS proxy that lets dex's built-in
connector (Bitbucket's URLs compiled in) reach the fake. Everything listens on
127.0.0.1; the proxy refuses every host but Bitbucket's two, which it sends to
the fake.

The OIDC relying party is `requests` + PyJWT, not our code: `login()` runs the
authorization-code flow with PKCE through dex's real endpoints, following
redirects as a browser would.
"""

import base64
import hashlib
import json
import os
import secrets
import select
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse

import jwt
import requests

from conftest import BIN, ROOT, free_port

DEX_BIN = os.environ.get("DEX_BITBUCKET_BIN", os.path.join(ROOT, "target", "dex-bitbucket"))
CLIENT_ID = "e2e-consumer"
CLIENT_SECRET = "e2e-consumer-secret"
RP_ID = "example-app"
RP_SECRET = "example-app-secret"
RP_REDIRECT = "http://127.0.0.1:5555/callback"
DATA_KEY = base64.b64encode(bytes(range(32))).decode()
ADMIN_USER = "admin@example.com"
ADMIN_PASSWORD = "demo-admin-api-token"
ALICE_UUID = "{8c7e2f4a-3b1d-4e6f-9a0b-a11ce0000001}"
BITBUCKET_HOSTS = ("bitbucket.org", "api.bitbucket.org")


def wait_for(predicate, what, proc=None, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}")
        if predicate():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready within {timeout}s")


def port_open(addr):
    host, port = addr.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


class Proc:
    """A child process whose stderr goes to a file the test can read."""

    def __init__(self, name, args, tmp, env=None):
        self.name = name
        self.log_path = os.path.join(tmp, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=tmp
        )

    def logs(self):
        with open(self.log_path) as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


class Fake:
    def __init__(self, tmp, redirect_uri, wide_user=0):
        args = [BIN, "fake-bitbucket", "--addr", "127.0.0.1:0",
                "--client-id", CLIENT_ID, "--client-secret", CLIENT_SECRET,
                "--redirect-uri", redirect_uri]
        if wide_user:
            args += ["--wide-user", str(wide_user)]
        self.p = Proc("fake", args, tmp)
        line = self.p.proc.stdout.readline().strip()
        prefix = "fake-bitbucket listening on "
        if not line.startswith(prefix):
            raise RuntimeError(f"fake-bitbucket printed {line!r}: {self.p.logs()}")
        self.url = line[len(prefix):]
        self.port = int(self.url.rsplit(":", 1)[1])

    def hits(self):
        return requests.get(self.url + "/_fake/hits", timeout=5).json()

    def reset_hits(self):
        requests.post(self.url + "/_fake/hits/reset", timeout=5).raise_for_status()

    def settings(self, **kw):
        requests.post(self.url + "/_fake/settings", json=kw, timeout=5).raise_for_status()

    def refresh_tokens(self):
        return requests.get(self.url + "/_fake/refresh-tokens", timeout=5).json()

    def redeem(self, refresh_token):
        return requests.post(
            self.url + "/site/oauth2/access_token",
            data={"grant_type": "refresh_token", "refresh_token": refresh_token},
            auth=(CLIENT_ID, CLIENT_SECRET), timeout=5,
        )

    def stop(self):
        self.p.stop()


def service_config(fake, grpc_addr, redirect_uri, *, teams=None, groups=True,
                   accept_dex_plaintext=False, tls=None, auth_token=None, extra=""):
    lines = [
        "grpc:",
        f"  addr: {grpc_addr}",
    ]
    if tls:
        lines += [f"  tlsCert: {tls}/server.crt", f"  tlsKey: {tls}/server.key",
                  f"  tlsClientCA: {tls}/client-ca.crt"]
    if auth_token:
        lines += [f"  authTokens: [{auth_token}]"]
    lines += [
        "logger:", "  level: info", "  format: json",
        "connectorData:", f"  keys: [{DATA_KEY}]",
        f"  acceptDexPlaintext: {'true' if accept_dex_plaintext else 'false'}",
        "connectors:",
        "- type: bitbucket-cloud",
        "  id: bitbucket-cloud",
        "  name: Bitbucket Cloud",
        "  config:",
        f"    clientID: {CLIENT_ID}",
        f"    clientSecret: {CLIENT_SECRET}",
        f"    redirectURI: {redirect_uri}",
        f"    getWorkspacePermissions: {'true' if groups else 'false'}",
    ]
    if groups == "all":
        lines += [
            "    includeTeamGroups: true",
            "    teamGroupsAuth:",
            f"      username: {ADMIN_USER}",
            f"      password: {ADMIN_PASSWORD}",
        ]
    if teams:
        lines += [f"    teams: [{', '.join(teams)}]"]
    lines += [
        f"    authURL: {fake.url}/site/oauth2/authorize",
        f"    tokenURL: {fake.url}/site/oauth2/access_token",
        f"    apiURL: {fake.url}/2.0",
        f"    legacyAPIURL: {fake.url}/1.0",
    ]
    return "\n".join(lines) + "\n" + extra


class Service:
    def __init__(self, tmp, config_text, addr, name="service"):
        self.addr = addr
        path = os.path.join(tmp, f"{name}.yaml")
        with open(path, "w") as f:
            f.write(config_text)
        self.p = Proc(name, [BIN, "serve", "--config", path], tmp)
        wait_for(lambda: port_open(addr), f"{name} on {addr}", self.p.proc)

    def logs(self):
        return self.p.logs()

    def wait_log(self, predicate, timeout=10.0):
        """The log lines once one satisfies `predicate`: the service writes
        its log from a thread of its own, a moment after it answered."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log_lines()
            if any(predicate(line) for line in lines) or time.monotonic() > deadline:
                return lines
            time.sleep(0.05)

    def log_lines(self):
        out = []
        for line in self.logs().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def stop(self):
        return self.p.stop()


def dex_config(issuer, web_addr, db, connector_type, connector_config, connector_id="bitbucket-cloud"):
    cfg = "\n".join(f"    {line}" for line in connector_config.strip().splitlines())
    return f"""issuer: {issuer}
storage:
  type: sqlite3
  config:
    file: {db}
web:
  http: {web_addr}
oauth2:
  skipApprovalScreen: true
logger:
  level: debug
staticClients:
- id: {RP_ID}
  name: Example App
  secret: {RP_SECRET}
  redirectURIs: [{RP_REDIRECT}]
connectors:
- type: {connector_type}
  id: {connector_id}
  name: Bitbucket Cloud
  config:
{cfg}
"""


class Dex:
    def __init__(self, tmp, config_text, web_addr, env=None, name="dex"):
        self.web_addr = web_addr
        path = os.path.join(tmp, f"{name}.yaml")
        with open(path, "w") as f:
            f.write(config_text)
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.p = Proc(name, [DEX_BIN, "serve", path], tmp, env=full_env)
        wait_for(lambda: port_open(web_addr), f"{name} on {web_addr}", self.p.proc, timeout=60)

    def logs(self):
        return self.p.logs()

    def stop(self):
        return self.p.stop()


class LoginFailed(Exception):
    def __init__(self, response):
        super().__init__(f"HTTP {response.status_code} at {response.url}: {response.text[:300]}")
        self.response = response


class RelyingParty:
    """An OIDC client of dex, written against the specs with requests + PyJWT."""

    def __init__(self, issuer, proxies=None, verify=True):
        self.issuer = issuer
        self.browser = requests.Session()
        self.browser.proxies = proxies or {}
        # Passed on every request: REQUESTS_CA_BUNDLE in the environment
        # would otherwise win over a session's `verify`.
        self.verify = verify
        self.disc = requests.get(issuer + "/.well-known/openid-configuration", timeout=10).json()
        self.jwks = jwt.PyJWKClient(self.disc["jwks_uri"])

    def login(self, username, scope="openid email profile groups offline_access", timeout=30):
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        state = secrets.token_urlsafe(12)
        url = self.disc["authorization_endpoint"] + "?" + urllib.parse.urlencode({
            "client_id": RP_ID, "redirect_uri": RP_REDIRECT, "response_type": "code",
            "scope": scope, "state": state, "code_challenge": challenge,
            "code_challenge_method": "S256",
        })
        for _ in range(12):
            r = self.browser.get(url, allow_redirects=False, timeout=timeout, verify=self.verify)
            if r.status_code not in (301, 302, 303, 307):
                raise LoginFailed(r)
            url = urllib.parse.urljoin(r.url, r.headers["Location"])
            if url.startswith(RP_REDIRECT):
                break
            if "/site/oauth2/authorize" in url:
                # The user picks their account at (fake) Bitbucket.
                url += "&login_as=" + urllib.parse.quote(username)
        else:
            raise RuntimeError("too many redirects")
        q = urllib.parse.parse_qs(urllib.parse.urlparse(url).query)
        assert q["state"] == [state], q
        tok = requests.post(self.disc["token_endpoint"], data={
            "grant_type": "authorization_code", "code": q["code"][0],
            "redirect_uri": RP_REDIRECT, "code_verifier": verifier,
        }, auth=(RP_ID, RP_SECRET), timeout=timeout)
        tok.raise_for_status()
        return tok.json()

    def refresh(self, refresh_token):
        r = requests.post(self.disc["token_endpoint"], data={
            "grant_type": "refresh_token", "refresh_token": refresh_token,
        }, auth=(RP_ID, RP_SECRET), timeout=30)
        return r

    def claims(self, id_token):
        key = self.jwks.get_signing_key_from_jwt(id_token)
        return jwt.decode(id_token, key.key, algorithms=["RS256", "ES256"],
                          audience=RP_ID, issuer=self.issuer)


def decode_sub(sub):
    """dex's `sub`: base64url of the protobuf IDTokenSubject{user_id = 1; conn_id = 2}."""
    raw = base64.urlsafe_b64decode(sub + "=" * (-len(sub) % 4))
    fields, i = {}, 0
    while i < len(raw):
        key = raw[i]
        i += 1
        assert key & 7 == 2, "length-delimited fields only"
        n, shift = 0, 0
        while True:
            b = raw[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        fields[key >> 3] = raw[i:i + n].decode()
        i += n
    return fields.get(1), fields.get(2)


def openssl(*args, cwd):
    subprocess.run([shutil.which("openssl"), *args], cwd=cwd, check=True, capture_output=True)


def make_cert(d, name, ca, sans):
    ext = os.path.join(d, f"{name}.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=" + ",".join(sans) + "\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", ext, cwd=d)


def make_ca(d, name):
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2", "-subj", f"/CN={name}", cwd=d)


class BitbucketProxy:
    """An HTTPS proxy on loopback for programs with Bitbucket's URLs compiled
    in: CONNECT to bitbucket.org:443 or api.bitbucket.org:443 is answered with
    TLS under a test CA's certificate for those names and forwarded, bytes as
    they are, to the fake; CONNECT anywhere else is refused. No name is ever
    resolved and nothing leaves loopback."""

    def __init__(self, d, fake_port):
        make_ca(d, "proxy-ca")
        make_cert(d, "bitbucket", "proxy-ca", [f"DNS:{h}" for h in BITBUCKET_HOSTS])
        self.ca = os.path.join(d, "proxy-ca.crt")
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(os.path.join(d, "bitbucket.crt"), os.path.join(d, "bitbucket.key"))
        self.fake_port = fake_port
        self.refused = []
        self.tunnels = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c):
        try:
            c.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 16384:
                chunk = c.recv(4096)
                if not chunk:
                    return
                head += chunk
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            host = parts[1].rsplit(":", 1)[0] if len(parts) == 3 and parts[0] == "CONNECT" else None
            if host not in BITBUCKET_HOSTS or not parts[1].endswith(":443"):
                self.refused.append(line)
                c.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            c.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            tls = self.ctx.wrap_socket(c, server_side=True)
            self.tunnels += 1
            up = socket.create_connection(("127.0.0.1", self.fake_port), timeout=10)
            self._pipe(tls, up)
        except (OSError, ssl.SSLError):
            pass
        finally:
            c.close()

    @staticmethod
    def _pipe(a, b):
        a.settimeout(None)
        b.settimeout(None)
        try:
            while True:
                ready = [a] if a.pending() else []
                if not ready:
                    ready, _, _ = select.select([a, b], [], [], 30)
                    if not ready:
                        return
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        finally:
            b.close()

    def env(self):
        return {"HTTPS_PROXY": self.url, "https_proxy": self.url, "SSL_CERT_FILE": self.ca,
                "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}

    def stop(self):
        self.stopped = True
        self.sock.close()


class Stack:
    """fake + service + dex for one test; `down()` stops what is running."""

    def __init__(self, tmp, *, teams=None, groups="all", service_tls=None, auth_token=None,
                 wide_user=0, start_service=True, accept_dex_plaintext=False):
        self.tmp = str(tmp)
        self.dex_port = free_port()
        self.issuer = f"http://127.0.0.1:{self.dex_port}/dex"
        self.redirect = self.issuer + "/callback"
        self.db = os.path.join(self.tmp, "dex.db")
        self.fake = Fake(self.tmp, self.redirect, wide_user=wide_user)
        self.svc_addr = f"127.0.0.1:{free_port()}"
        self.svc_kw = dict(teams=teams, groups=groups, tls=service_tls, auth_token=auth_token,
                           accept_dex_plaintext=accept_dex_plaintext)
        self.service = None
        self.dex = None
        self.proxy = None
        if start_service:
            self.start_service()

    def start_service(self, **overrides):
        kw = dict(self.svc_kw, **overrides)
        self.service = Service(self.tmp, service_config(self.fake, self.svc_addr, self.redirect, **kw),
                               self.svc_addr)
        return self.service

    def our_connector(self, extra=""):
        return f"addr: {self.svc_addr}\ntimeout: 5s\n{extra}"

    def start_dex(self, connector_type="bitbucket-connector", connector_config=None, env=None):
        if connector_config is None:
            connector_config = self.our_connector()
        self.dex = Dex(self.tmp, dex_config(self.issuer, f"127.0.0.1:{self.dex_port}", self.db,
                                            connector_type, connector_config), f"127.0.0.1:{self.dex_port}",
                       env=env)
        return self.dex

    def start_builtin_dex(self, extra=""):
        """dex with its built-in bitbucket-cloud connector, through the proxy."""
        if self.proxy is None:
            self.proxy = BitbucketProxy(self.tmp, self.fake.port)
        cfg = f"clientID: {CLIENT_ID}\nclientSecret: {CLIENT_SECRET}\nredirectURI: {self.redirect}\n{extra}"
        return self.start_dex("bitbucket-cloud", cfg, env=self.proxy.env())

    def rp(self):
        if self.proxy is not None:
            return RelyingParty(self.issuer, proxies={"https": self.proxy.url}, verify=self.proxy.ca)
        return RelyingParty(self.issuer)

    def down(self):
        for p in (self.dex, self.service):
            if p is not None:
                p.stop()
        self.fake.stop()
        if self.proxy is not None:
            self.proxy.stop()
