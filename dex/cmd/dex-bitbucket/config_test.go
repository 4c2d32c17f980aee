package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dexidp/dex/server"

	bbconnector "github.com/bitbucket-connector/bitbucket-connector/dex/connector"
)

func init() { bbconnector.Register(server.ConnectorsConfig) }

const good = `
issuer: http://127.0.0.1:5556/dex
storage:
  type: sqlite3
  config:
    file: $DB_DIR/dex.db
web:
  http: 127.0.0.1:5556
oauth2:
  skipApprovalScreen: true
expiry:
  idTokens: 1h
  refreshTokens:
    validIfNotUsedFor: 720h
logger:
  level: debug
  format: json
staticClients:
- id: example-app
  name: Example App
  secretEnv: EXAMPLE_SECRET
  redirectURIs: [http://127.0.0.1:5555/callback]
connectors:
- type: bitbucket-connector
  id: bitbucket-cloud
  name: Bitbucket Cloud
  config:
    addr: 127.0.0.1:5557
    authToken: $CONNECTOR_AUTH_TOKEN
    timeout: 10s
- type: bitbucket-cloud
  id: builtin
  name: Bitbucket (built-in)
  config:
    clientID: id
    clientSecret: ${BB_SECRET}
    redirectURI: http://127.0.0.1:5556/dex/callback
`

func env(vars map[string]string) func(string) (string, bool) {
	return func(k string) (string, bool) { v, ok := vars[k]; return v, ok }
}

var goodEnv = env(map[string]string{"DB_DIR": "/tmp", "EXAMPLE_SECRET": "s", "CONNECTOR_AUTH_TOKEN": "tok", "BB_SECRET": "bb"})

func TestAGoodConfigLoadsWithVariablesExpanded(t *testing.T) {
	c, err := parseConfig([]byte(good), goodEnv)
	if err != nil {
		t.Fatal(err)
	}
	if c.StaticClients[0].Secret != "s" {
		t.Fatalf("secretEnv not applied: %+v", c.StaticClients[0])
	}
	if !strings.Contains(string(c.Connectors[0].Config), `"authToken":"tok"`) || !strings.Contains(string(c.Connectors[1].Config), `"clientSecret":"bb"`) {
		t.Fatalf("not expanded: %s / %s", c.Connectors[0].Config, c.Connectors[1].Config)
	}
	if !strings.Contains(string(c.Storage.Config), `"/tmp/dex.db"`) {
		t.Fatalf("storage config %s", c.Storage.Config)
	}
}

func TestEveryProblemIsReportedAtOnceWithItsPath(t *testing.T) {
	bad := strings.NewReplacer(
		"skipApprovalScreen: true", "skipAprovalScreen: true",
		"    timeout: 10s", "    timeout: 10s\n    adress: 127.0.0.1:1",
		"  level: debug", "  level: loud",
		"type: sqlite3", "type: etcd",
		"type: bitbucket-cloud", "type: bitbucket-clod",
	).Replace(good)
	_, err := parseConfig([]byte(bad), env(map[string]string{}))
	probs, ok := err.(Problems)
	if !ok {
		t.Fatalf("got %v", err)
	}
	want := []string{
		"oauth2.skipAprovalScreen: unknown key",
		"connectors[0].config.adress: unknown key",
		"logger.level: \"loud\"",
		"storage.type: \"etcd\"",
		"connectors[1].type: unknown connector type \"bitbucket-clod\"",
		"staticClients[0].secretEnv: environment variable EXAMPLE_SECRET is not set",
		"connectors[0].config: environment variable CONNECTOR_AUTH_TOKEN is not set",
	}
	for _, w := range want {
		found := false
		for _, p := range probs {
			if strings.HasPrefix(p, w) {
				found = true
			}
		}
		if !found {
			t.Errorf("missing %q in:\n%s", w, probs)
		}
	}
}

func TestBuiltInConnectorConfigsAreCheckedToo(t *testing.T) {
	bad := strings.Replace(good, "    clientID: id", "    clientId: id\n    tems: [x]", 1)
	_, err := parseConfig([]byte(bad), goodEnv)
	if err == nil || !strings.Contains(err.Error(), "connectors[1].config.tems: unknown key") {
		t.Fatalf("got %v", err)
	}
	if strings.Contains(err.Error(), "clientId") {
		t.Fatalf("keys match case-insensitively, as in dex: %v", err)
	}
}

func TestAConfigWithoutItsRequiredKeysNamesEachOne(t *testing.T) {
	_, err := parseConfig([]byte("logger: {level: info}\n"), goodEnv)
	for _, w := range []string{"issuer: required", "web: http or https is required", "storage.type: required"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("missing %q in %v", w, err)
		}
	}
}

func TestCheckConfigSaysOkOrPrintsTheProblemAndExits1(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "dex.yaml")
	cfg := strings.NewReplacer("$DB_DIR", dir, "secretEnv: EXAMPLE_SECRET", "secret: s",
		"$CONNECTOR_AUTH_TOKEN", "tok", "${BB_SECRET}", "bb").Replace(good)
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	var out, errOut bytes.Buffer
	if code := run([]string{"check-config", path}, &out, &errOut); code != 0 {
		t.Fatalf("exit %d: %s", code, errOut.String())
	}
	if !strings.Contains(out.String(), "ok (issuer http://127.0.0.1:5556/dex, 2 connector(s), storage sqlite3)") {
		t.Fatalf("stdout %q", out.String())
	}

	if err := os.WriteFile(path, []byte(cfg+"\nunknownTop: 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	out.Reset()
	errOut.Reset()
	if code := run([]string{"check-config", path}, &out, &errOut); code != 1 {
		t.Fatalf("exit %d", code)
	}
	if got := errOut.String(); got != path+": unknownTop: unknown key\n" {
		t.Fatalf("stderr %q", got)
	}
}

func TestVersionNamesTheDexItEmbeds(t *testing.T) {
	var out bytes.Buffer
	if code := run([]string{"version"}, &out, &out); code != 0 || !strings.HasPrefix(out.String(), "dex-bitbucket ") {
		t.Fatalf("exit %d: %q", code, out.String())
	}
}
