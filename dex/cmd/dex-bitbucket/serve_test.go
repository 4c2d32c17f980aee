package main

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestReadinessFollowsTheStorageCheck(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var failing atomic.Bool
	check := func(context.Context) (any, error) {
		if failing.Load() {
			return nil, errors.New("database is locked")
		}
		return nil, nil
	}
	h := readiness(ctx, check, 10*time.Millisecond)
	get := func() *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", "/healthz/ready", nil))
		return rec
	}
	if rec := get(); rec.Code != http.StatusOK {
		t.Fatalf("healthy storage: %d", rec.Code)
	}
	failing.Store(true)
	deadline := time.Now().Add(5 * time.Second)
	for {
		rec := get()
		if rec.Code == http.StatusServiceUnavailable {
			if !strings.Contains(rec.Body.String(), "database is locked") {
				t.Fatalf("body %q", rec.Body.String())
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("a failing storage never made readiness 503")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
