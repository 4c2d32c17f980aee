package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"github.com/dexidp/dex/server"
	"github.com/dexidp/dex/server/authflow"
	"github.com/dexidp/dex/server/signer"
	"github.com/dexidp/dex/server/tokens"
	"github.com/dexidp/dex/storage"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// shutdownTimeout bounds the drain of open HTTP requests on SIGTERM.
const shutdownTimeout = 10 * time.Second

// defaultGrantTypes are dex's defaults (cmd/dex), less the password grant:
// this build has no password database.
var defaultGrantTypes = []string{
	"authorization_code",
	"implicit",
	"refresh_token",
	"urn:ietf:params:oauth:grant-type:device_code",
	"urn:ietf:params:oauth:grant-type:token-exchange",
}

// readiness answers 200 while the last storage check (run now, then every
// `every`, as dex's own health checker does) passed, else 503 with its error.
func readiness(ctx context.Context, check func(context.Context) (any, error), every time.Duration) http.Handler {
	var mu sync.Mutex
	var last error
	run := func() {
		_, err := check(ctx)
		mu.Lock()
		last = err
		mu.Unlock()
	}
	run()
	go func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				run()
			}
		}
	}()
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		mu.Lock()
		err := last
		mu.Unlock()
		if err != nil {
			http.Error(w, "storage: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok"))
	})
}

func newLogger(c Logger) *slog.Logger {
	level := slog.LevelInfo
	_ = level.UnmarshalText([]byte(c.Level))
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		return slog.New(slog.NewJSONHandler(os.Stderr, opts))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, opts))
}

func openStorage(c Storage, logger *slog.Logger) (storage.Storage, error) {
	cfg := storages[c.Type]()
	if len(c.Config) > 0 {
		if err := json.Unmarshal(c.Config, cfg); err != nil {
			return nil, fmt.Errorf("storage.config: %v", err)
		}
	}
	opener, ok := cfg.(interface {
		Open(*slog.Logger) (storage.Storage, error)
	})
	if !ok {
		return nil, fmt.Errorf("storage %q cannot be opened", c.Type)
	}
	return opener.Open(logger)
}

func duration(s string, def time.Duration) time.Duration {
	if s == "" {
		return def
	}
	d, _ := time.ParseDuration(s) // validated by loadConfig
	return d
}

func serve(c *Config) error {
	logger := newLogger(c.Logger)
	logger.Info("dex-bitbucket starting", "version", version, "dex", dexVersion(), "issuer", c.Issuer)

	store, err := openStorage(c.Storage, logger)
	if err != nil {
		return fmt.Errorf("storage %s: %v", c.Storage.Type, err)
	}
	defer store.Close()

	if len(c.StaticClients) > 0 {
		store = storage.WithStaticClients(store, c.StaticClients)
	}
	conns := make([]storage.Connector, len(c.Connectors))
	for i, conn := range c.Connectors {
		conns[i] = storage.Connector{
			ID:         conn.ID,
			Type:       conn.Type,
			Name:       conn.Name,
			Config:     conn.Config,
			GrantTypes: conn.GrantTypes,
		}
	}
	store = storage.WithStaticConnectors(store, conns)
	store = refreshOutsideTx{store}

	now := func() time.Time { return time.Now().UTC() }
	idTokensValidFor := duration(c.Expiry.IDTokens, 24*time.Hour)
	local := signer.LocalConfig{KeysRotationPeriod: c.Expiry.SigningKeys}
	if local.KeysRotationPeriod == "" {
		local.KeysRotationPeriod = "6h"
	}
	sign, err := local.Open(context.Background(), store, idTokensValidFor, now, logger)
	if err != nil {
		return fmt.Errorf("signer: %v", err)
	}

	policy, err := tokens.NewRefreshTokenPolicy(logger,
		c.Expiry.RefreshTokens.DisableRotation,
		c.Expiry.RefreshTokens.ValidIfNotUsedFor,
		c.Expiry.RefreshTokens.AbsoluteLifetime,
		c.Expiry.RefreshTokens.ReuseInterval)
	if err != nil {
		return fmt.Errorf("expiry.refreshTokens: %v", err)
	}

	registry := prometheus.NewRegistry()
	registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	grantTypes := c.OAuth2.GrantTypes
	if len(grantTypes) == 0 {
		grantTypes = defaultGrantTypes
	}
	cfg := server.Config{
		Issuer:                 c.Issuer,
		Storage:                store,
		AllowedGrantTypes:      grantTypes,
		SupportedResponseTypes: c.OAuth2.ResponseTypes,
		SkipApprovalScreen:     c.OAuth2.SkipApprovalScreen,
		AlwaysShowLoginScreen:  c.OAuth2.AlwaysShowLoginScreen,
		PKCE: authflow.PKCEConfig{
			Enforce:                       c.OAuth2.PKCE.Enforce,
			CodeChallengeMethodsSupported: c.OAuth2.PKCE.CodeChallengeMethodsSupported,
		},
		AllowedOrigins:         c.Web.AllowedOrigins,
		AllowedHeaders:         c.Web.AllowedHeaders,
		IDTokensValidFor:       idTokensValidFor,
		AuthRequestsValidFor:   duration(c.Expiry.AuthRequests, 0),
		DeviceRequestsValidFor: duration(c.Expiry.DeviceRequests, 0),
		RefreshTokenPolicy:     policy,
		Web: server.WebConfig{
			Dir:     c.Frontend.Dir,
			LogoURL: c.Frontend.LogoURL,
			Issuer:  c.Frontend.Issuer,
			Theme:   c.Frontend.Theme,
			Extra:   c.Frontend.Extra,
		},
		Logger:             logger,
		Now:                now,
		Signer:             sign,
		PrometheusRegistry: registry,
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	srv, err := server.NewServer(ctx, cfg)
	if err != nil {
		return fmt.Errorf("dex: %v", err)
	}

	var servers []*http.Server
	errs := make(chan error, 3)
	listen := func(name, addr string, h http.Handler, tlsCfg *tls.Config) error {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("%s: listen on %s: %v", name, addr, err)
		}
		hs := &http.Server{Handler: h, TLSConfig: tlsCfg, ReadHeaderTimeout: 10 * time.Second}
		servers = append(servers, hs)
		logger.Info("listening", "server", name, "address", l.Addr().String())
		go func() {
			var err error
			if tlsCfg != nil {
				err = hs.ServeTLS(l, "", "")
			} else {
				err = hs.Serve(l)
			}
			if !errors.Is(err, http.ErrServerClosed) {
				errs <- fmt.Errorf("%s on %s: %v", name, addr, err)
			}
		}()
		return nil
	}
	if c.Web.HTTP != "" {
		if err := listen("web.http", c.Web.HTTP, srv, nil); err != nil {
			return err
		}
	}
	if c.Web.HTTPS != "" {
		pair, err := tls.LoadX509KeyPair(c.Web.TLSCert, c.Web.TLSKey)
		if err != nil {
			return fmt.Errorf("web.tlsCert/web.tlsKey: %v", err)
		}
		tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{pair}}
		if err := listen("web.https", c.Web.HTTPS, srv, tlsCfg); err != nil {
			return err
		}
	}
	if c.Telemetry.HTTP != "" {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(registry, promhttp.HandlerOpts{}))
		mux.HandleFunc("/healthz/live", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
		mux.Handle("/healthz/ready", readiness(ctx, storage.NewCustomHealthCheckFunc(store, now), 15*time.Second))
		if err := listen("telemetry.http", c.Telemetry.HTTP, mux, nil); err != nil {
			return err
		}
	}

	select {
	case <-ctx.Done():
		logger.Info("shutting down", "reason", "signal")
	case err := <-errs:
		return err
	}
	drain, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	for _, hs := range servers {
		if err := hs.Shutdown(drain); err != nil {
			logger.Warn("shutdown", "err", err)
		}
	}
	return nil
}
