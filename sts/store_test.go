package sts

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/stsrelay/stsrelay/resolve"
)

// TestConcurrentPolicyStoresShareTransactions: without Options.Update (the
// daemon passes the queue's group commit), at a cold start a relay
// fetches a policy for every domain it delivers to at once, and each
// write transaction holds the database's one writer (and the queue's
// commits behind it) for two fsyncs. Stores that arrive together are
// written together.
func TestConcurrentPolicyStoresShareTransactions(t *testing.T) {
	db, err := bbolt.Open(filepath.Join(t.TempDir(), "stsrelay.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	lastTx := func() (id int) {
		db.View(func(tx *bbolt.Tx) error { id = tx.ID(); return nil })
		return id
	}
	p, err := Parse([]byte("version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 604800\n"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	const n = 50
	before := lastTx()
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			cp := newCachedPolicy(fmt.Sprintf("d%d.example", i), "id1", p, now, now.Add(p.MaxAge))
			if err := storePolicy(db.Batch, cp, now); err != nil {
				t.Error(err)
			}
		})
	}
	close(start)
	wg.Wait()
	if txs := lastTx() - before; txs > n/5 {
		t.Errorf("%d policies stored at once took %d write transactions, want at most %d", n, txs, n/5)
	}
	entries, bad, err := loadAll(db)
	if err != nil || len(bad) > 0 || len(entries) != n {
		t.Fatalf("read back %d policies (bad %v, err %v), want %d", len(entries), bad, err, n)
	}
	if e := entries["d7.example"]; e == nil || e.policy.ID != "id1" || !e.policy.Expires.Equal(now.Add(p.MaxAge)) {
		t.Errorf("d7.example read back as %+v", e)
	}
}

// A stored policy that no longer reads is skipped and logged by Run, not
// by New: New runs while the daemon may still fail to start, and a failed
// start says one line and nothing before it.
func TestUnreadableStoredPolicyIsLoggedOnceRunning(t *testing.T) {
	db, err := bbolt.Open(filepath.Join(t.TempDir(), "stsrelay.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.Update(func(tx *bbolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketPolicies)
		if err != nil {
			return err
		}
		return b.Put([]byte("bad.example"), []byte("{not json"))
	})
	if err != nil {
		t.Fatal(err)
	}
	res, err := resolve.New(resolve.Config{Servers: []string{"127.0.0.1:1"}})
	if err != nil {
		t.Fatal(err)
	}
	var log bytes.Buffer
	m, err := New(Options{Resolver: res, DB: db, Logger: slog.New(slog.NewTextHandler(&log, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if log.Len() != 0 {
		t.Errorf("New logged:\n%s", log.String())
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	m.Run(ctx)
	if out := log.String(); !strings.Contains(out, "sts: skipping stored policy") || !strings.Contains(out, "bad.example") {
		t.Errorf("Run did not log the unreadable policy:\n%s", out)
	}
}
