package sts

import (
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.etcd.io/bbolt"
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
