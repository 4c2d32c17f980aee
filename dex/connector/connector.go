// Package connector is the dex connector type `bitbucket-connector`: a
// CallbackConnector and RefreshConnector that logs users in through Bitbucket
// Cloud by calling the bitbucket-connector service
// (connector.v1.ConnectorService) over gRPC.
//
// Register it in a dex build with one line before server.NewServer:
//
//	connector.Register(server.ConnectorsConfig)
package connector

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	dexconnector "github.com/dexidp/dex/connector"
	"github.com/dexidp/dex/server/connectors"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "github.com/bitbucket-connector/bitbucket-connector/dex/internal/connectorpb"
)

// Type is the connector type name used in dex's `connectors[].type`.
const Type = "bitbucket-connector"

// DefaultTimeout is the deadline of each RPC when `timeout` is not set.
const DefaultTimeout = 30 * time.Second

// reconnectWait bounds the second attempt of a call that found the service
// unreachable: long enough to connect to a service that has just come back,
// short enough that a login against a service that is down fails promptly.
const reconnectWait = 2 * time.Second

// Register adds this connector type to dex's connector registry (in dex,
// server.ConnectorsConfig). Call it before server.NewServer.
func Register(registry map[string]func() connectors.ConnectorConfig) {
	registry[Type] = func() connectors.ConnectorConfig { return new(Config) }
}

// Config is the `config` of a `bitbucket-connector` entry in dex's config.
type Config struct {
	// Addr is the service's address: host:port, or unix:/path/to.sock.
	Addr string `json:"addr"`
	// ConnectorID selects the service's connector (its `connectors[].id`);
	// default: this dex connector's id.
	ConnectorID string `json:"connectorID,omitempty"`
	// AuthToken is sent on every call as `authorization: Bearer <token>`.
	AuthToken string `json:"authToken,omitempty"`
	// RootCA is a PEM file of the CA that signed the service's certificate.
	// Setting RootCA, ClientCert or ServerName makes the connection TLS
	// (without RootCA: the system roots); none of them: plaintext, for a
	// service on loopback or a unix socket.
	RootCA string `json:"rootCA,omitempty"`
	// ClientCert and ClientKey are PEM files presented to the service (mTLS).
	// They are read again at every TLS handshake, so rotated files are used
	// from the next connection on.
	ClientCert string `json:"clientCert,omitempty"`
	ClientKey  string `json:"clientKey,omitempty"`
	// ServerName is the name the service's certificate must carry; default:
	// the host of Addr.
	ServerName string `json:"serverName,omitempty"`
	// Timeout is the deadline of each RPC, in Go's duration syntax; default 30s.
	Timeout string `json:"timeout,omitempty"`
}

// Open validates the config and returns the connector. The gRPC connection
// is made lazily and reused by every login and refresh.
func (c *Config) Open(id string, logger *slog.Logger) (dexconnector.Connector, error) {
	if logger == nil {
		logger = slog.Default()
	}
	if c.Addr == "" {
		return nil, errors.New("bitbucket-connector: addr is required")
	}
	timeout := DefaultTimeout
	if c.Timeout != "" {
		d, err := time.ParseDuration(c.Timeout)
		if err != nil || d <= 0 {
			return nil, fmt.Errorf("bitbucket-connector: timeout %q: not a positive duration such as 10s", c.Timeout)
		}
		timeout = d
	}
	creds, err := c.transportCredentials()
	if err != nil {
		return nil, err
	}
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		// A service that was down is found again within seconds, not
		// after grpc-go's default backoff of up to two minutes.
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 5 * time.Second},
			MinConnectTimeout: 5 * time.Second,
		}),
		grpc.WithUserAgent("dex-bitbucket-connector"),
	}
	if c.AuthToken != "" {
		if creds.Info().SecurityProtocol == "insecure" && !isLocal(c.Addr) {
			logger.Warn("bitbucket-connector: authToken is sent over a plaintext connection to a non-loopback address; set rootCA for TLS", "addr", c.Addr)
		}
		opts = append(opts, grpc.WithPerRPCCredentials(bearer(c.AuthToken)))
	}
	conn, err := grpc.NewClient(c.Addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("bitbucket-connector: addr %q: %w", c.Addr, err)
	}
	serviceID := c.ConnectorID
	if serviceID == "" {
		serviceID = id
	}
	return &bitbucketConnector{
		conn:      conn,
		client:    pb.NewConnectorServiceClient(conn),
		serviceID: serviceID,
		timeout:   timeout,
		logger:    logger.With(slog.Group("connector", "type", Type, "id", id)),
	}, nil
}

func (c *Config) transportCredentials() (credentials.TransportCredentials, error) {
	if c.RootCA == "" && c.ClientCert == "" && c.ClientKey == "" && c.ServerName == "" {
		return insecure.NewCredentials(), nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: c.ServerName}
	if c.RootCA != "" {
		pem, err := os.ReadFile(c.RootCA)
		if err != nil {
			return nil, fmt.Errorf("bitbucket-connector: rootCA: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("bitbucket-connector: rootCA %q: no PEM certificate in it", c.RootCA)
		}
		cfg.RootCAs = pool
	}
	if (c.ClientCert == "") != (c.ClientKey == "") {
		return nil, errors.New("bitbucket-connector: clientCert and clientKey go together")
	}
	if c.ClientCert != "" {
		if _, err := tls.LoadX509KeyPair(c.ClientCert, c.ClientKey); err != nil {
			return nil, fmt.Errorf("bitbucket-connector: clientCert/clientKey: %w", err)
		}
		certFile, keyFile := c.ClientCert, c.ClientKey
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			pair, err := tls.LoadX509KeyPair(certFile, keyFile)
			if err != nil {
				return nil, fmt.Errorf("bitbucket-connector: clientCert/clientKey: %w", err)
			}
			return &pair, nil
		}
	}
	return credentials.NewTLS(cfg), nil
}

func isLocal(addr string) bool {
	if strings.HasPrefix(addr, "unix:") {
		return true
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// bearer sends the service's auth token; the service runs on loopback or a
// unix socket as often as behind TLS, so plaintext is allowed.
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return false }

var (
	_ dexconnector.CallbackConnector = (*bitbucketConnector)(nil)
	_ dexconnector.RefreshConnector  = (*bitbucketConnector)(nil)
)

type bitbucketConnector struct {
	conn      *grpc.ClientConn
	client    pb.ConnectorServiceClient
	serviceID string
	timeout   time.Duration
	logger    *slog.Logger
}

// Close closes the gRPC connection.
func (b *bitbucketConnector) Close() error { return b.conn.Close() }

func (b *bitbucketConnector) LoginURL(s dexconnector.Scopes, callbackURL, state string) (string, []byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), b.timeout)
	defer cancel()
	req := &pb.LoginURLRequest{
		Scopes:      scopes(s),
		CallbackUrl: callbackURL,
		State:       state,
		ConnectorId: b.serviceID,
	}
	var resp *pb.LoginURLResponse
	err := b.call(ctx, func(ctx context.Context, opts ...grpc.CallOption) (err error) {
		resp, err = b.client.LoginURL(ctx, req, opts...)
		return err
	})
	if err != nil {
		return "", nil, fromRPC("LoginURL", err)
	}
	return resp.GetUrl(), resp.GetConnectorData(), nil
}

func (b *bitbucketConnector) HandleCallback(s dexconnector.Scopes, connData []byte, r *http.Request) (dexconnector.Identity, error) {
	ctx, cancel := context.WithTimeout(r.Context(), b.timeout)
	defer cancel()
	req := &pb.HandleCallbackRequest{
		Scopes:        scopes(s),
		RawQuery:      r.URL.RawQuery,
		ConnectorData: connData,
		ConnectorId:   b.serviceID,
	}
	var resp *pb.HandleCallbackResponse
	err := b.call(ctx, func(ctx context.Context, opts ...grpc.CallOption) (err error) {
		resp, err = b.client.HandleCallback(ctx, req, opts...)
		return err
	})
	if err != nil {
		return dexconnector.Identity{}, fromRPC("HandleCallback", err)
	}
	if resp.GetIdentity() == nil {
		return dexconnector.Identity{}, errors.New("bitbucket-connector: HandleCallback answered no identity")
	}
	return identity(resp.GetIdentity()), nil
}

func (b *bitbucketConnector) Refresh(ctx context.Context, s dexconnector.Scopes, id dexconnector.Identity) (dexconnector.Identity, error) {
	ctx, cancel := context.WithTimeout(ctx, b.timeout)
	defer cancel()
	req := &pb.RefreshRequest{
		Scopes:      scopes(s),
		Identity:    identityPB(id),
		ConnectorId: b.serviceID,
	}
	var resp *pb.RefreshResponse
	err := b.call(ctx, func(ctx context.Context, opts ...grpc.CallOption) (err error) {
		resp, err = b.client.Refresh(ctx, req, opts...)
		return err
	})
	if err != nil {
		return id, fromRPC("Refresh", err)
	}
	if resp.GetIdentity() == nil {
		return id, errors.New("bitbucket-connector: Refresh answered no identity")
	}
	return identity(resp.GetIdentity()), nil
}

// call makes an RPC. When the service could not be reached (UNAVAILABLE from
// the transport, not from the service), it may have just come back while the
// connection waits out its backoff: reconnect at once and try once more,
// waiting for the connection at most reconnectWait.
func (b *bitbucketConnector) call(ctx context.Context, rpc func(context.Context, ...grpc.CallOption) error) error {
	err := rpc(ctx)
	if !unreachable(err) {
		return err
	}
	b.conn.ResetConnectBackoff()
	retry, cancel := context.WithTimeout(ctx, reconnectWait)
	defer cancel()
	if err2 := rpc(retry, grpc.WaitForReady(true)); status.Code(err2) != codes.DeadlineExceeded {
		return err2
	}
	return err
}

func scopes(s dexconnector.Scopes) *pb.Scopes {
	return &pb.Scopes{OfflineAccess: s.OfflineAccess, Groups: s.Groups}
}

func identity(i *pb.Identity) dexconnector.Identity {
	return dexconnector.Identity{
		UserID:            i.GetUserId(),
		Username:          i.GetUsername(),
		PreferredUsername: i.GetPreferredUsername(),
		Email:             i.GetEmail(),
		EmailVerified:     i.GetEmailVerified(),
		Groups:            i.GetGroups(),
		ConnectorData:     i.GetConnectorData(),
	}
}

func identityPB(i dexconnector.Identity) *pb.Identity {
	return &pb.Identity{
		UserId:            i.UserID,
		Username:          i.Username,
		PreferredUsername: i.PreferredUsername,
		Email:             i.Email,
		EmailVerified:     i.EmailVerified,
		Groups:            i.Groups,
		ConnectorData:     i.ConnectorData,
	}
}
