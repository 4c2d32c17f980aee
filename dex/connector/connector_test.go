package connector

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	dexconnector "github.com/dexidp/dex/connector"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "github.com/bitbucket-connector/bitbucket-connector/dex/internal/connectorpb"
)

// service is a ConnectorService on a real loopback port that records what it
// was sent and answers what the test says.
type service struct {
	pb.UnimplementedConnectorServiceServer
	mu       sync.Mutex
	login    *pb.LoginURLRequest
	callback *pb.HandleCallbackRequest
	refresh  *pb.RefreshRequest
	auth     []string
	err      error
	block    chan struct{}
}

func (s *service) record(ctx context.Context) error {
	s.mu.Lock()
	md, _ := metadata.FromIncomingContext(ctx)
	s.auth = md.Get("authorization")
	err, block := s.err, s.block
	s.mu.Unlock()
	if block != nil {
		select {
		case <-block:
		case <-ctx.Done():
		}
	}
	return err
}

func (s *service) LoginURL(ctx context.Context, r *pb.LoginURLRequest) (*pb.LoginURLResponse, error) {
	s.mu.Lock()
	s.login = r
	s.mu.Unlock()
	if err := s.record(ctx); err != nil {
		return nil, err
	}
	return &pb.LoginURLResponse{Url: "https://bitbucket.example/authorize?state=" + r.GetState(), ConnectorData: []byte("login-data")}, nil
}

func (s *service) HandleCallback(ctx context.Context, r *pb.HandleCallbackRequest) (*pb.HandleCallbackResponse, error) {
	s.mu.Lock()
	s.callback = r
	s.mu.Unlock()
	if err := s.record(ctx); err != nil {
		return nil, err
	}
	return &pb.HandleCallbackResponse{Identity: &pb.Identity{
		UserId: "{uuid-1}", Username: "alice", PreferredUsername: "alice-nick",
		Email: "alice@example.com", EmailVerified: true,
		Groups: []string{"wonderland", "wonderland/developers", "wonderland:owner"}, ConnectorData: []byte("v1.sealed"),
	}}, nil
}

func (s *service) Refresh(ctx context.Context, r *pb.RefreshRequest) (*pb.RefreshResponse, error) {
	s.mu.Lock()
	s.refresh = r
	s.mu.Unlock()
	if err := s.record(ctx); err != nil {
		return nil, err
	}
	id := r.GetIdentity()
	return &pb.RefreshResponse{Identity: &pb.Identity{
		UserId: id.GetUserId(), Username: "alice", Email: "alice@example.com", EmailVerified: true,
		Groups: []string{"wonderland"}, ConnectorData: []byte("v1.resealed"),
	}}, nil
}

func (s *service) set(err error, block chan struct{}) {
	s.mu.Lock()
	s.err, s.block = err, block
	s.mu.Unlock()
}

func startService(t *testing.T, addr string) (*service, string, func()) {
	t.Helper()
	return serveOn(t, "tcp", addr)
}

func serveOn(t *testing.T, network, addr string) (*service, string, func()) {
	t.Helper()
	l, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	svc := &service{}
	gs := grpc.NewServer()
	pb.RegisterConnectorServiceServer(gs, svc)
	go func() { _ = gs.Serve(l) }()
	return svc, l.Addr().String(), gs.Stop
}

func open(t *testing.T, c Config) *bitbucketConnector {
	t.Helper()
	conn, err := c.Open("bitbucket-cloud", slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	b := conn.(*bitbucketConnector)
	t.Cleanup(func() { _ = b.Close() })
	return b
}

func statusWithReason(code codes.Code, msg, reason string, md map[string]string) error {
	st, err := status.New(code, msg).WithDetails(&errdetails.ErrorInfo{Reason: reason, Domain: ErrorDomain, Metadata: md})
	if err != nil {
		panic(err)
	}
	return st.Err()
}

func TestLoginURLPassesScopesCallbackStateAndConnectorID(t *testing.T) {
	svc, addr, stop := startService(t, "127.0.0.1:0")
	defer stop()
	b := open(t, Config{Addr: addr, ConnectorID: "bb-service"})

	url, data, err := b.LoginURL(dexconnector.Scopes{OfflineAccess: true, Groups: true}, "http://dex/callback", "st a&b")
	if err != nil {
		t.Fatal(err)
	}
	if url != "https://bitbucket.example/authorize?state=st a&b" || string(data) != "login-data" {
		t.Fatalf("url %q data %q", url, data)
	}
	r := svc.login
	if !r.GetScopes().GetOfflineAccess() || !r.GetScopes().GetGroups() || r.GetCallbackUrl() != "http://dex/callback" ||
		r.GetState() != "st a&b" || r.GetConnectorId() != "bb-service" {
		t.Fatalf("request %v", r)
	}
}

func TestConnectorIDDefaultsToTheDexConnectorsID(t *testing.T) {
	svc, addr, stop := startService(t, "127.0.0.1:0")
	defer stop()
	b := open(t, Config{Addr: addr})
	if _, _, err := b.LoginURL(dexconnector.Scopes{}, "cb", "s"); err != nil {
		t.Fatal(err)
	}
	if got := svc.login.GetConnectorId(); got != "bitbucket-cloud" {
		t.Fatalf("connector_id %q", got)
	}
}

func TestHandleCallbackSendsRawQueryAndConnectorDataAndMapsTheIdentity(t *testing.T) {
	svc, addr, stop := startService(t, "127.0.0.1:0")
	defer stop()
	b := open(t, Config{Addr: addr})

	req := httptest.NewRequest("GET", "http://dex/callback?code=abc%20d&state=xyz", nil)
	id, err := b.HandleCallback(dexconnector.Scopes{Groups: true}, []byte("from-login"), req)
	if err != nil {
		t.Fatal(err)
	}
	if got := svc.callback.GetRawQuery(); got != "code=abc%20d&state=xyz" {
		t.Fatalf("raw_query %q", got)
	}
	if string(svc.callback.GetConnectorData()) != "from-login" || !svc.callback.GetScopes().GetGroups() {
		t.Fatalf("request %v", svc.callback)
	}
	want := dexconnector.Identity{
		UserID: "{uuid-1}", Username: "alice", PreferredUsername: "alice-nick", Email: "alice@example.com",
		EmailVerified: true, Groups: []string{"wonderland", "wonderland/developers", "wonderland:owner"},
		ConnectorData: []byte("v1.sealed"),
	}
	if id.UserID != want.UserID || id.Username != want.Username || id.PreferredUsername != want.PreferredUsername ||
		id.Email != want.Email || !id.EmailVerified || strings.Join(id.Groups, ",") != strings.Join(want.Groups, ",") ||
		string(id.ConnectorData) != string(want.ConnectorData) {
		t.Fatalf("identity %+v", id)
	}
}

func TestRefreshSendsTheStoredIdentityAndReturnsTheNewConnectorData(t *testing.T) {
	svc, addr, stop := startService(t, "127.0.0.1:0")
	defer stop()
	b := open(t, Config{Addr: addr})

	in := dexconnector.Identity{UserID: "{uuid-1}", Username: "old", Email: "old@example.com", Groups: []string{"x"}, ConnectorData: []byte("v1.old")}
	out, err := b.Refresh(context.Background(), dexconnector.Scopes{Groups: true}, in)
	if err != nil {
		t.Fatal(err)
	}
	got := svc.refresh.GetIdentity()
	if got.GetUserId() != "{uuid-1}" || got.GetUsername() != "old" || string(got.GetConnectorData()) != "v1.old" {
		t.Fatalf("sent %v", got)
	}
	if string(out.ConnectorData) != "v1.resealed" || out.Username != "alice" {
		t.Fatalf("got %+v", out)
	}
}

func TestBearerTokenIsSentOnEveryCall(t *testing.T) {
	svc, addr, stop := startService(t, "127.0.0.1:0")
	defer stop()
	b := open(t, Config{Addr: addr, AuthToken: "s3cret"})
	if _, _, err := b.LoginURL(dexconnector.Scopes{}, "cb", "s"); err != nil {
		t.Fatal(err)
	}
	if len(svc.auth) != 1 || svc.auth[0] != "Bearer s3cret" {
		t.Fatalf("authorization %v", svc.auth)
	}
}

func TestErrorsAreMappedForDex(t *testing.T) {
	for _, tc := range []struct {
		name       string
		err        error
		notInTeams bool
		code       codes.Code
		reason     string
	}{
		{"not in required teams is dex's 403 error",
			statusWithReason(codes.PermissionDenied, `bitbucket: user "bob" is not in any of the required teams`, "NOT_IN_REQUIRED_TEAMS", map[string]string{"username": "bob"}),
			true, codes.PermissionDenied, "NOT_IN_REQUIRED_TEAMS"},
		{"a changed user is another permission error",
			statusWithReason(codes.PermissionDenied, "bitbucket: user changed", "USER_CHANGED", nil),
			false, codes.PermissionDenied, "USER_CHANGED"},
		{"upstream unavailable keeps its reason",
			statusWithReason(codes.Unavailable, "bitbucket: 503 after 3 attempts", "UPSTREAM_UNAVAILABLE", nil),
			false, codes.Unavailable, "UPSTREAM_UNAVAILABLE"},
		{"a revoked grant",
			statusWithReason(codes.Unauthenticated, "bitbucket: refresh token rejected", "TOKEN_REVOKED", nil),
			false, codes.Unauthenticated, "TOKEN_REVOKED"},
		{"a status without ErrorInfo",
			status.Error(codes.Internal, "boom"),
			false, codes.Internal, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			svc, addr, stop := startService(t, "127.0.0.1:0")
			defer stop()
			b := open(t, Config{Addr: addr})
			svc.set(tc.err, nil)

			_, err := b.HandleCallback(dexconnector.Scopes{}, nil, httptest.NewRequest("GET", "http://dex/callback?code=x", nil))
			if err == nil {
				t.Fatal("no error")
			}
			var groups *dexconnector.UserNotInRequiredGroupsError
			if errors.As(err, &groups) != tc.notInTeams {
				t.Fatalf("UserNotInRequiredGroupsError: %v, want %v (%v)", !tc.notInTeams, tc.notInTeams, err)
			}
			if tc.notInTeams && groups.UserID != "bob" {
				t.Fatalf("UserID %q", groups.UserID)
			}
			var se *ServiceError
			if !errors.As(err, &se) || se.Code != tc.code || se.Reason != tc.reason || se.Method != "HandleCallback" {
				t.Fatalf("ServiceError %+v from %v", se, err)
			}
			if msg := status.Convert(tc.err).Message(); !strings.Contains(err.Error(), msg) {
				t.Fatalf("%q does not carry the service's message %q", err, msg)
			}
		})
	}
}

func TestACallPastTheTimeoutIsDeadlineExceeded(t *testing.T) {
	svc, addr, stop := startService(t, "127.0.0.1:0")
	defer stop()
	b := open(t, Config{Addr: addr, Timeout: "200ms"})
	block := make(chan struct{})
	defer close(block)
	svc.set(nil, block)

	_, _, err := b.LoginURL(dexconnector.Scopes{}, "cb", "s")
	var se *ServiceError
	if !errors.As(err, &se) || se.Code != codes.DeadlineExceeded {
		t.Fatalf("got %v", err)
	}
}

func TestAServiceThatIsDownFailsTheCallAndIsUsedAgainOnceBack(t *testing.T) {
	_, addr, stop := startService(t, "127.0.0.1:0")
	b := open(t, Config{Addr: addr, Timeout: "5s"})
	if _, _, err := b.LoginURL(dexconnector.Scopes{}, "cb", "s"); err != nil {
		t.Fatal(err)
	}
	stop()

	_, _, err := b.LoginURL(dexconnector.Scopes{}, "cb", "s")
	var se *ServiceError
	if !errors.As(err, &se) || se.Code != codes.Unavailable {
		t.Fatalf("service down: got %v", err)
	}

	_, _, stop = startService(t, addr)
	defer stop()
	if _, _, err := b.LoginURL(dexconnector.Scopes{}, "cb", "s"); err != nil {
		t.Fatalf("service back: the next call failed: %v", err)
	}
}

func TestTheServiceErrorUnavailableIsNotRetried(t *testing.T) {
	svc, addr, stop := startService(t, "127.0.0.1:0")
	defer stop()
	b := open(t, Config{Addr: addr})
	svc.set(statusWithReason(codes.Unavailable, "bitbucket: 503", "UPSTREAM_UNAVAILABLE", nil), nil)
	calls := 0
	err := b.call(context.Background(), func(ctx context.Context, opts ...grpc.CallOption) error {
		calls++
		_, err := b.client.LoginURL(ctx, &pb.LoginURLRequest{}, opts...)
		return err
	})
	if calls != 1 || status.Code(err) != codes.Unavailable {
		t.Fatalf("%d calls, %v", calls, err)
	}
}

func TestOpenRejectsBadConfigs(t *testing.T) {
	for _, tc := range []struct {
		name string
		c    Config
		want string
	}{
		{"no address", Config{}, "addr is required"},
		{"a timeout that is not a duration", Config{Addr: "127.0.0.1:1", Timeout: "soon"}, `timeout "soon"`},
		{"a negative timeout", Config{Addr: "127.0.0.1:1", Timeout: "-1s"}, `timeout "-1s"`},
		{"a client certificate without its key", Config{Addr: "127.0.0.1:1", ClientCert: "c.pem"}, "clientCert and clientKey go together"},
		{"a root CA file that does not exist", Config{Addr: "127.0.0.1:1", RootCA: "/nonexistent/ca.pem"}, "rootCA"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.c.Open("id", slog.New(slog.DiscardHandler))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
		})
	}
}

func TestAServiceOnAUnixSocketIsReached(t *testing.T) {
	sock := t.TempDir() + "/svc.sock"
	_, _, stop := serveOn(t, "unix", sock)
	defer stop()

	b := open(t, Config{Addr: "unix:" + sock})
	if _, _, err := b.LoginURL(dexconnector.Scopes{}, "cb", "s"); err != nil {
		t.Fatal(err)
	}
}
