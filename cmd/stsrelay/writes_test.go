package main

import (
	"context"
	"path/filepath"
	"testing"

	"go.etcd.io/bbolt"

	"github.com/stsrelay/stsrelay/queue"
)

type noDeliveries struct{}

func (noDeliveries) Deliver(context.Context, *queue.Job) []queue.Status { return nil }

// TestSharedWritesOutliveTheQueue: the MTA-STS cache and TLSRPT write
// through the queue's group commit, and still write once the queue has
// closed at shutdown (TLSRPT's last flush, a fetch that ends late).
func TestSharedWritesOutliveTheQueue(t *testing.T) {
	db, err := queue.OpenDB(filepath.Join(t.TempDir(), "stsrelay.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	w := &sharedWrites{db: db}
	put := func(key string) error {
		return w.update(func(tx *bbolt.Tx) error {
			b, err := tx.CreateBucketIfNotExists([]byte("other.part"))
			if err != nil {
				return err
			}
			return b.Put([]byte(key), []byte("v"))
		})
	}
	if err := put("before"); err != nil {
		t.Fatalf("before the queue is up: %v", err)
	}
	q, err := queue.New(db, queue.Options{Deliverer: noDeliveries{}})
	if err != nil {
		t.Fatal(err)
	}
	w.q.Store(q)
	if err := put("during"); err != nil {
		t.Fatalf("through the queue: %v", err)
	}
	q.Close()
	if err := put("after"); err != nil {
		t.Fatalf("after the queue closed: %v", err)
	}
	db.View(func(tx *bbolt.Tx) error {
		for _, k := range []string{"before", "during", "after"} {
			if tx.Bucket([]byte("other.part")).Get([]byte(k)) == nil {
				t.Errorf("the write %q is not in the database", k)
			}
		}
		return nil
	})
}
