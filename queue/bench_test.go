package queue

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// nopDeliverer never runs: the benchmarks do not start Run.
type nopDeliverer struct{}

func (nopDeliverer) Deliver(context.Context, *Job) []Status { return nil }

var body4K = bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n"), 64)

// BenchmarkEnqueue measures durable enqueues of 4 KiB messages with 1 and
// 32 concurrent writers. fsyncs/s counts three per group commit: the
// spool segment with the bodies and bbolt's two fdatasyncs (data pages,
// then the meta page); the directory sync of a new segment is left out.
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
			b.ReportMetric(3*float64(q.commit.commits.Load()-commits0)/secs, "fsyncs/s")
		})
	}
}

// drainDeliverer reads each body and accepts every recipient.
type drainDeliverer struct{ done chan struct{} }

func (d drainDeliverer) Deliver(_ context.Context, job *Job) []Status {
	if rc, err := job.Open(); err == nil {
		io.Copy(io.Discard, rc)
		rc.Close()
	}
	d.done <- struct{}{}
	return slices.Repeat([]Status{{Code: 250, Enhanced: "2.0.0", Text: "ok"}}, len(job.Recipients))
}

// BenchmarkEnqueueAndFirstDelivery measures 4 KiB messages from Enqueue
// (32 writers) to the end of their first delivery attempt, with the first
// attempt taking the message from memory (as stsrelay runs) and, for
// comparison, reading it from the database and spool.
//
//	go test -run '^$' -bench EnqueueAndFirst -benchmem -count 5 ./queue/
func BenchmarkEnqueueAndFirstDelivery(b *testing.B) {
	for _, from := range []string{"memory", "disk"} {
		b.Run("first="+from, func(b *testing.B) {
			db, err := OpenDB(filepath.Join(b.TempDir(), "stsrelay.db"))
			if err != nil {
				b.Fatal(err)
			}
			defer db.Close()
			d := drainDeliverer{done: make(chan struct{}, 1024)}
			q, err := New(db, Options{Deliverer: d, Hostname: "relay.test", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				b.Fatal(err)
			}
			defer q.Close()
			if from == "disk" {
				q.firstMaxCount = 0
			}
			ctx, cancel := context.WithCancel(context.Background())
			ran := make(chan error)
			go func() { ran <- q.Run(ctx) }()
			defer func() { cancel(); <-ran }()
			e := env("alice@example.com", "bob@example.org")
			var n atomic.Int64
			b.SetBytes(int64(len(body4K)))
			b.ReportAllocs()
			b.ResetTimer()
			start, cpu0 := time.Now(), cpuTime()
			var wg sync.WaitGroup
			for range 32 {
				wg.Go(func() {
					for n.Add(1) <= int64(b.N) {
						if _, err := q.Enqueue(context.Background(), e, bytes.NewReader(body4K)); err != nil {
							b.Error(err)
							return
						}
					}
				})
			}
			for range b.N {
				<-d.done
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
			b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/float64(b.N), "cpu-µs/msg")
		})
	}
}

// cpuTime is the CPU time (user and system) the process has used.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
