package main

import (
	"context"
	"errors"

	"github.com/dexidp/dex/storage"
)

// errRefreshRace answers the loser of two refreshes of the same token that
// ran at the same time; its client retries with the token the winner got.
var errRefreshRace = errors.New("refresh token was updated concurrently")

// refreshOutsideTx works around a deadlock in the pinned dex commit: its
// refresh grant reads the user's offline session from inside the updater of
// UpdateRefreshToken (grants.refreshConnectorData, called from
// tokens.RefreshStore.Rotate), while the memory storage holds its lock and
// the sqlite3 storage its only connection for that update, so every second
// refresh of a session hangs. Here the updater runs before the update, and
// the update only stores its result if the token is still as it was read
// (compare and swap).
type refreshOutsideTx struct {
	storage.Storage
}

func (s refreshOutsideTx) UpdateRefreshToken(ctx context.Context, id string, updater func(storage.RefreshToken) (storage.RefreshToken, error)) error {
	old, err := s.Storage.GetRefresh(ctx, id)
	if err != nil {
		return err
	}
	updated, err := updater(old)
	if err != nil {
		return err
	}
	return s.Storage.UpdateRefreshToken(ctx, id, func(cur storage.RefreshToken) (storage.RefreshToken, error) {
		if cur.Token != old.Token || cur.ObsoleteToken != old.ObsoleteToken || !cur.LastUsed.Equal(old.LastUsed) {
			return cur, errRefreshRace
		}
		return updated, nil
	})
}
