package queue

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// nopDeliverer never runs: the benchmarks do not start Run.
type nopDeliverer struct{}

func (nopDeliverer) Deliver(context.Context, *Job) []Status { return nil }

var body4K = bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n"), 64)

// BenchmarkEnqueue measures durable enqueues of 4 KiB messages with 1 and
// 32 concurrent writers. fsyncs/s counts four per group commit: the batch
// file with the bodies, the spool directory, and bbolt's two fdatasyncs
// (data pages, then the meta page).
//
//	go test -run '^$' -bench Enqueue -benchtime 3s ./queue/
func BenchmarkEnqueue(b *testing.B) {
	for _, writers := range []int{1, 32} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			db, err := OpenDB(filepath.Join(b.TempDir(), "stsrelay.db"))
			if err != nil {
				b.Fatal(err)
			}
			defer db.Close()
			q, err := New(db, Options{Deliverer: nopDeliverer{}, Hostname: "relay.test", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				b.Fatal(err)
			}
			defer q.Close()
			e := env("alice@example.com", "bob@example.org")
			var n atomic.Int64
			b.SetBytes(int64(len(body4K)))
			b.ResetTimer()
			start, commits0 := time.Now(), q.commit.commits.Load()
			var wg sync.WaitGroup
			for range writers {
				wg.Go(func() {
					for n.Add(1) <= int64(b.N) {
						if _, err := q.Enqueue(context.Background(), e, bytes.NewReader(body4K)); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			wg.Wait()
			secs := time.Since(start).Seconds()
			b.ReportMetric(float64(b.N)/secs, "msgs/s")
			b.ReportMetric(4*float64(q.commit.commits.Load()-commits0)/secs, "fsyncs/s")
		})
	}
}
