package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"reflect"
	"sort"
	"strings"
	"time"

	"github.com/dexidp/dex/server"
	"github.com/dexidp/dex/storage"
	"github.com/dexidp/dex/storage/memory"
	"github.com/dexidp/dex/storage/sql"
	"github.com/ghodss/yaml"
)

// Config is the subset of dex's config file (cmd/dex/config.go) that
// dex-bitbucket serves. The keys are dex's; a key dex has and this build does
// not is reported as unknown rather than silently ignored.
type Config struct {
	Issuer        string           `json:"issuer"`
	Storage       Storage          `json:"storage"`
	Web           Web              `json:"web"`
	Telemetry     Telemetry        `json:"telemetry"`
	OAuth2        OAuth2           `json:"oauth2"`
	Expiry        Expiry           `json:"expiry"`
	Logger        Logger           `json:"logger"`
	Frontend      Frontend         `json:"frontend"`
	StaticClients []storage.Client `json:"staticClients"`
	Connectors    []Connector      `json:"connectors"`
}

type Storage struct {
	Type   string          `json:"type"`
	Config json.RawMessage `json:"config"`
}

type Web struct {
	HTTP           string   `json:"http"`
	HTTPS          string   `json:"https"`
	TLSCert        string   `json:"tlsCert"`
	TLSKey         string   `json:"tlsKey"`
	AllowedOrigins []string `json:"allowedOrigins"`
	AllowedHeaders []string `json:"allowedHeaders"`
}

type Telemetry struct {
	HTTP string `json:"http"`
}

type OAuth2 struct {
	GrantTypes            []string `json:"grantTypes"`
	ResponseTypes         []string `json:"responseTypes"`
	SkipApprovalScreen    bool     `json:"skipApprovalScreen"`
	AlwaysShowLoginScreen bool     `json:"alwaysShowLoginScreen"`
	PKCE                  PKCE     `json:"pkce"`
}

type PKCE struct {
	Enforce                       bool     `json:"enforce"`
	CodeChallengeMethodsSupported []string `json:"codeChallengeMethodsSupported"`
}

type Expiry struct {
	SigningKeys    string        `json:"signingKeys"`
	IDTokens       string        `json:"idTokens"`
	AuthRequests   string        `json:"authRequests"`
	DeviceRequests string        `json:"deviceRequests"`
	RefreshTokens  RefreshTokens `json:"refreshTokens"`
}

type RefreshTokens struct {
	DisableRotation   bool   `json:"disableRotation"`
	ReuseInterval     string `json:"reuseInterval"`
	AbsoluteLifetime  string `json:"absoluteLifetime"`
	ValidIfNotUsedFor string `json:"validIfNotUsedFor"`
}

type Logger struct {
	Level  string `json:"level"`
	Format string `json:"format"`
}

type Frontend struct {
	Dir     string            `json:"dir"`
	LogoURL string            `json:"logoURL"`
	Issuer  string            `json:"issuer"`
	Theme   string            `json:"theme"`
	Extra   map[string]string `json:"extra"`
}

// Connector is a `connectors` entry, dex's shape: its config is decoded by
// the connector type registered under Type.
type Connector struct {
	Type       string          `json:"type"`
	ID         string          `json:"id"`
	Name       string          `json:"name"`
	Config     json.RawMessage `json:"config"`
	GrantTypes []string        `json:"grantTypes"`
}

// storages are the storage types this build offers, by dex's names.
var storages = map[string]func() any{
	"memory":  func() any { return new(memory.Config) },
	"sqlite3": func() any { return new(sql.SQLite3) },
}

// Problems is every problem found in a config file, one `path: reason` each.
type Problems []string

func (p Problems) Error() string { return strings.Join(p, "\n") }

// loadConfig reads, expands and validates a config file, reporting every
// problem at once.
func loadConfig(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return parseConfig(data, os.LookupEnv)
}

func parseConfig(data []byte, lookup func(string) (string, bool)) (*Config, error) {
	raw, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, fmt.Errorf("not YAML: %w", err)
	}
	var tree any
	if err := json.Unmarshal(raw, &tree); err != nil {
		return nil, fmt.Errorf("not YAML: %w", err)
	}
	if _, ok := tree.(map[string]any); !ok {
		return nil, errors.New("the config file must be a mapping of keys (issuer, storage, web, ...)")
	}
	var probs Problems
	unknownKeys("", tree, reflect.TypeOf(Config{}), &probs)

	var c Config
	if err := json.Unmarshal(raw, &c); err != nil {
		probs = append(probs, fmt.Sprintf("%s: %s", jsonPath(err), jsonReason(err)))
		return nil, probs
	}
	c.validate(tree, lookup, &probs)
	if len(probs) > 0 {
		return nil, probs
	}
	return &c, nil
}

func (c *Config) validate(tree any, lookup func(string) (string, bool), probs *Problems) {
	add := func(path, format string, args ...any) {
		*probs = append(*probs, path+": "+fmt.Sprintf(format, args...))
	}
	if c.Issuer == "" {
		add("issuer", "required (the URL clients see, e.g. http://127.0.0.1:5556/dex)")
	}
	if c.Web.HTTP == "" && c.Web.HTTPS == "" {
		add("web", "http or https is required (the address to listen on)")
	}
	if c.Web.HTTPS != "" && (c.Web.TLSCert == "" || c.Web.TLSKey == "") {
		add("web.https", "needs web.tlsCert and web.tlsKey")
	}
	for _, d := range []struct{ path, value string }{
		{"expiry.signingKeys", c.Expiry.SigningKeys},
		{"expiry.idTokens", c.Expiry.IDTokens},
		{"expiry.authRequests", c.Expiry.AuthRequests},
		{"expiry.deviceRequests", c.Expiry.DeviceRequests},
		{"expiry.refreshTokens.reuseInterval", c.Expiry.RefreshTokens.ReuseInterval},
		{"expiry.refreshTokens.absoluteLifetime", c.Expiry.RefreshTokens.AbsoluteLifetime},
		{"expiry.refreshTokens.validIfNotUsedFor", c.Expiry.RefreshTokens.ValidIfNotUsedFor},
	} {
		if d.value == "" {
			continue
		}
		if v, err := time.ParseDuration(d.value); err != nil || v <= 0 {
			add(d.path, "%q is not a positive duration such as 10m or 24h", d.value)
		}
	}
	switch c.Logger.Level {
	case "", "debug", "info", "warn", "error":
	default:
		add("logger.level", "%q: one of debug, info, warn, error", c.Logger.Level)
	}
	switch c.Logger.Format {
	case "", "text", "json":
	default:
		add("logger.format", "%q: text or json", c.Logger.Format)
	}

	newStorage, ok := storages[c.Storage.Type]
	switch {
	case c.Storage.Type == "":
		add("storage.type", "required: memory or sqlite3")
	case !ok:
		add("storage.type", "%q: this build has memory and sqlite3", c.Storage.Type)
	default:
		expanded := expand("storage.config", c.Storage.Config, lookup, probs)
		c.Storage.Config = expanded
		if len(expanded) > 0 {
			var sub any
			_ = json.Unmarshal(expanded, &sub)
			unknownKeys("storage.config", sub, reflect.TypeOf(newStorage()).Elem(), probs)
		}
		if c.Storage.Type == "sqlite3" {
			var s sql.SQLite3
			_ = json.Unmarshal(expanded, &s)
			if v := reflect.ValueOf(s).FieldByName("File"); v.IsValid() && v.String() == "" {
				add("storage.config.file", "required for sqlite3 (the database file)")
			}
		}
	}

	for i := range c.StaticClients {
		cl := &c.StaticClients[i]
		path := fmt.Sprintf("staticClients[%d]", i)
		if cl.IDEnv != "" {
			if v, ok := lookup(cl.IDEnv); ok {
				cl.ID = v
			} else {
				add(path+".idEnv", "environment variable %s is not set", cl.IDEnv)
			}
		}
		if cl.SecretEnv != "" {
			if v, ok := lookup(cl.SecretEnv); ok {
				cl.Secret = v
			} else {
				add(path+".secretEnv", "environment variable %s is not set", cl.SecretEnv)
			}
		}
		if cl.ID == "" && cl.IDEnv == "" {
			add(path+".id", "required")
		}
		if cl.Name == "" {
			add(path+".name", "required")
		}
		if cl.Secret == "" && cl.SecretEnv == "" && !cl.Public {
			add(path+".secret", "required unless the client is public")
		}
		if err := storage.ValidateRefreshTokenLifetime(cl.RefreshTokenLifetime); err != nil {
			add(path+".refreshTokenLifetime", "%v", err)
		}
	}

	ids := map[string]bool{}
	entries, _ := tree.(map[string]any)["connectors"].([]any)
	for i := range c.Connectors {
		conn := &c.Connectors[i]
		path := fmt.Sprintf("connectors[%d]", i)
		if conn.ID == "" {
			add(path+".id", "required")
		} else if ids[conn.ID] {
			add(path+".id", "%q is used by another connector", conn.ID)
		}
		ids[conn.ID] = true
		if conn.Name == "" {
			add(path+".name", "required")
		}
		newConfig, ok := server.ConnectorsConfig[conn.Type]
		if !ok {
			add(path+".type", "unknown connector type %q (one of %s)", conn.Type, strings.Join(connectorTypes(), ", "))
			continue
		}
		conn.Config = expand(path+".config", conn.Config, lookup, probs)
		if len(conn.Config) == 0 {
			add(path+".config", "required")
			continue
		}
		cfg := newConfig()
		var sub any
		if i < len(entries) {
			if e, ok := entries[i].(map[string]any); ok {
				sub = e["config"]
			}
		}
		unknownKeys(path+".config", sub, reflect.TypeOf(cfg), probs)
		if err := json.Unmarshal(conn.Config, cfg); err != nil {
			add(path+".config", "%v", err)
		}
	}
}

func connectorTypes() []string {
	names := make([]string, 0, len(server.ConnectorsConfig))
	for name := range server.ConnectorsConfig {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// expand applies dex's `$VAR` / `${VAR}` expansion to every string of a raw
// JSON value. Unlike dex, an unset variable is a problem that names it: an
// empty secret or token is never served.
func expand(path string, raw json.RawMessage, lookup func(string) (string, bool), probs *Problems) json.RawMessage {
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return nil
	}
	var v any
	if err := json.Unmarshal(raw, &v); err != nil {
		return raw
	}
	missing := map[string]bool{}
	var walk func(any) any
	walk = func(v any) any {
		switch t := v.(type) {
		case string:
			return os.Expand(t, func(name string) string {
				if name == "$" {
					return "$"
				}
				val, ok := lookup(name)
				if !ok {
					missing[name] = true
				}
				return val
			})
		case map[string]any:
			for k, e := range t {
				t[k] = walk(e)
			}
		case []any:
			for i, e := range t {
				t[i] = walk(e)
			}
		}
		return v
	}
	v = walk(v)
	names := make([]string, 0, len(missing))
	for n := range missing {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		*probs = append(*probs, fmt.Sprintf("%s: environment variable %s is not set", path, n))
	}
	out, err := json.Marshal(v)
	if err != nil {
		return raw
	}
	return out
}

var rawMessage = reflect.TypeOf(json.RawMessage(nil))
var unmarshaler = reflect.TypeOf((*json.Unmarshaler)(nil)).Elem()

// unknownKeys reports every key of v (a decoded JSON tree) that no field of
// t takes, with its path. Matching is case-insensitive, as encoding/json's.
func unknownKeys(path string, v any, t reflect.Type, probs *Problems) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == rawMessage || reflect.PointerTo(t).Implements(unmarshaler) {
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			return
		}
		fields := map[string]reflect.Type{}
		collectFields(t, fields)
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			ft, ok := fields[strings.ToLower(k)]
			if !ok {
				*probs = append(*probs, fmt.Sprintf("%s: unknown key", join(path, k)))
				continue
			}
			unknownKeys(join(path, k), m[k], ft, probs)
		}
	case reflect.Slice, reflect.Array:
		s, ok := v.([]any)
		if !ok {
			return
		}
		for i, e := range s {
			unknownKeys(fmt.Sprintf("%s[%d]", path, i), e, t.Elem(), probs)
		}
	case reflect.Map:
		m, ok := v.(map[string]any)
		if !ok {
			return
		}
		for k, e := range m {
			unknownKeys(join(path, k), e, t.Elem(), probs)
		}
	}
}

func collectFields(t reflect.Type, fields map[string]reflect.Type) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := f.Tag.Get("json")
		name, _, _ := strings.Cut(tag, ",")
		if name == "-" {
			continue
		}
		if f.Anonymous && name == "" {
			ft := f.Type
			if ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if ft.Kind() == reflect.Struct {
				collectFields(ft, fields)
				continue
			}
		}
		if !f.IsExported() {
			continue
		}
		if name == "" {
			name = f.Name
		}
		fields[strings.ToLower(name)] = f.Type
	}
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func jsonPath(err error) string {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) && te.Field != "" {
		return te.Field
	}
	return "config"
}

func jsonReason(err error) string {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Sprintf("expected %s, got a %s", te.Type, te.Value)
	}
	return err.Error()
}
