package main

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/dexidp/dex/storage"
	"github.com/dexidp/dex/storage/memory"
	"github.com/dexidp/dex/storage/sql"
)

// The updater reads the offline session, as dex's refresh grant does.
func refreshLikeDex(t *testing.T, s storage.Storage) error {
	ctx := context.Background()
	now := time.Now().UTC().Round(time.Millisecond)
	if err := s.CreateRefresh(ctx, storage.RefreshToken{
		ID: "rt1", Token: "t1", ClientID: "app", ConnectorID: "bb", CreatedAt: now, LastUsed: now,
		Claims: storage.Claims{UserID: "u1"}, Nonce: "n",
	}); err != nil {
		t.Fatal(err)
	}
	if err := s.CreateOfflineSessions(ctx, storage.OfflineSessions{
		UserID: "u1", ConnID: "bb", Refresh: map[string]*storage.RefreshTokenRef{"app": {ID: "rt1", ClientID: "app"}},
		ConnectorData: []byte("v1.data"),
	}); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		done <- s.UpdateRefreshToken(ctx, "rt1", func(old storage.RefreshToken) (storage.RefreshToken, error) {
			sess, err := s.GetOfflineSessions(ctx, "u1", "bb")
			if err != nil {
				return old, err
			}
			if string(sess.ConnectorData) != "v1.data" {
				t.Errorf("connector data %q", sess.ConnectorData)
			}
			old.Token = "t2"
			return old, nil
		})
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("UpdateRefreshToken deadlocked")
		return nil
	}
}

func TestARefreshThatReadsTheOfflineSessionDoesNotDeadlock(t *testing.T) {
	logger := slog.New(slog.DiscardHandler)
	lite, err := (&sql.SQLite3{File: filepath.Join(t.TempDir(), "dex.db")}).Open(logger)
	if err != nil {
		t.Fatal(err)
	}
	defer lite.Close()
	for name, s := range map[string]storage.Storage{"memory": memory.New(logger), "sqlite3": lite} {
		t.Run(name, func(t *testing.T) {
			wrapped := refreshOutsideTx{s}
			if err := refreshLikeDex(t, wrapped); err != nil {
				t.Fatal(err)
			}
			got, err := s.GetRefresh(context.Background(), "rt1")
			if err != nil || got.Token != "t2" {
				t.Fatalf("stored %q, %v", got.Token, err)
			}
		})
	}
}

func TestTheLoserOfTwoConcurrentRefreshesFails(t *testing.T) {
	s := refreshOutsideTx{memory.New(slog.New(slog.DiscardHandler))}
	ctx := context.Background()
	if err := s.CreateRefresh(ctx, storage.RefreshToken{ID: "rt1", Token: "t1", Claims: storage.Claims{UserID: "u1"}}); err != nil {
		t.Fatal(err)
	}
	err := s.UpdateRefreshToken(ctx, "rt1", func(old storage.RefreshToken) (storage.RefreshToken, error) {
		// Another refresh wins while this one is asking the connector.
		if err := s.Storage.UpdateRefreshToken(ctx, "rt1", func(o storage.RefreshToken) (storage.RefreshToken, error) {
			o.Token = "winner"
			return o, nil
		}); err != nil {
			t.Fatal(err)
		}
		old.Token = "loser"
		return old, nil
	})
	if !errors.Is(err, errRefreshRace) {
		t.Fatalf("got %v", err)
	}
	got, _ := s.GetRefresh(ctx, "rt1")
	if got.Token != "winner" {
		t.Fatalf("stored %q", got.Token)
	}
}
