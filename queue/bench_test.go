package queue

import (
	"bytes"
	"container/heap"
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"runtime/pprof"
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
			measureFirstDeliveries(b, q, d.done)
		})
	}
}

// measureFirstDeliveries runs q, enqueues b.N messages of 4 KiB into it
// from 32 writers and waits for the end of their first attempts (done).
// It reports messages per second, and the CPU and the garbage
// collector's CPU per message.
func measureFirstDeliveries(b *testing.B, q *Queue, done <-chan struct{}) {
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error)
	go func() { ran <- q.Run(ctx) }()
	defer func() { cancel(); <-ran }()
	runtime.GC() // what came before (a backlog's load) is not this run's
	e := env("alice@example.com", "bob@example.org")
	var n atomic.Int64
	b.SetBytes(int64(len(body4K)))
	b.ReportAllocs()
	b.ResetTimer()
	start, cpu0, gc0 := time.Now(), cpuTime(), gcCPU()
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
		<-done
	}
	wg.Wait()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "msgs/s")
	b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/float64(b.N), "cpu-µs/msg")
	b.ReportMetric(float64((gcCPU()-gc0).Microseconds())/float64(b.N), "gc-cpu-µs/msg")
}

// cpuTime is the CPU time (user and system) the process has used.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// deferringDeliverer defers every recipient at deferred.example, as a
// dead MX would, and delivers the rest like drainDeliverer.
type deferringDeliverer struct{ drainDeliverer }

func (d deferringDeliverer) Deliver(ctx context.Context, job *Job) []Status {
	if job.Domain == "deferred.example" {
		d.done <- struct{}{}
		return slices.Repeat([]Status{{Code: 451, Enhanced: "4.4.1", Text: "mx.deferred.example[192.0.2.25]: connection refused"}}, len(job.Recipients))
	}
	return d.drainDeliverer.Deliver(ctx, job)
}

// BenchmarkEnqueueAndFirstDeliveryBehindBacklog is
// BenchmarkEnqueueAndFirstDelivery with 100,000 deferred messages in the
// queue, and without them for comparison: what a backlog costs each new
// message, in the index, the garbage collector's marking and bbolt's
// deeper tree. The backlog is built once (about 20 s) and copied for
// each run.
//
//	go test -run '^$' -bench BehindBacklog -count 5 ./queue/
func BenchmarkEnqueueAndFirstDeliveryBehindBacklog(b *testing.B) {
	const backlog = 100_000
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	outer, template := b, ""
	for _, deferred := range []int{0, backlog} {
		b.Run(fmt.Sprintf("deferred=%d", deferred), func(b *testing.B) {
			dir := b.TempDir()
			if deferred > 0 {
				if template == "" {
					template = outer.TempDir() // kept for every run
					pprof.Do(context.Background(), pprof.Labels("phase", "fill"), func(context.Context) {
						fillBacklog(b, template, backlog, logger)
					})
				}
				if err := os.CopyFS(dir, os.DirFS(template)); err != nil {
					b.Fatal(err)
				}
			}
			d := deferringDeliverer{drainDeliverer{done: make(chan struct{}, 1024)}}
			q := openBacklog(b, dir, deferred, d, logger)
			measureFirstDeliveries(b, q, d.done)
		})
	}
}

// BenchmarkScheduleBehindBacklog times what the scheduler does for a new
// message, due at once, from push to the ready list and out of it, with
// the timers of 100,000 deferred messages in the heap and without; "heap"
// is the way every push went before due slots skipped the heap.
//
//	go test -run '^$' -bench ScheduleBehind ./queue/
func BenchmarkScheduleBehindBacklog(b *testing.B) {
	for _, backlog := range []int{0, 100_000} {
		for _, path := range []string{"heap", "due"} {
			b.Run(fmt.Sprintf("deferred=%d/%s", backlog, path), func(b *testing.B) {
				q := &Queue{opts: Options{Now: time.Now, MaxConnsPerDomain: 1}, sched: newScheduler()}
				later := time.Now().Add(time.Hour).UnixNano()
				for i := range backlog {
					s := &slot{e: &entry{}, domain: "deferred.example", due: later + int64(i)}
					q.sched.timers = append(q.sched.timers, timed{due: s.due, s: s})
				}
				s := &slot{e: &entry{}, domain: "example.org"}
				b.ReportAllocs()
				for b.Loop() {
					s.due = time.Now().UnixNano()
					if path == "heap" {
						heap.Push(&q.sched.timers, timed{due: s.due, s: s})
					} else {
						q.pushLocked(s)
					}
					q.collectDueLocked(q.opts.Now())
					if q.nextReadyLocked() != s {
						b.Fatal("the new message is not the one ready")
					}
				}
				if len(q.sched.timers) != backlog {
					b.Fatalf("%d timers, want the backlog's %d", len(q.sched.timers), backlog)
				}
			})
		}
	}
}

// BenchmarkGCCycleWithBacklog times one garbage collection with the index
// of an empty queue and of a queue of 100,000 deferred messages: what the
// index adds to every cycle, the part of a full queue's cost that grows
// with the queue and not with the load. The backlog is built for each run
// (about 20 s). Run it on one core: with a second one idle, the runtime's
// idle mark worker inflates the figure by as much as it varies.
//
//	go test -run '^$' -bench GCCycle -benchtime 100x -cpu 1 ./queue/
func BenchmarkGCCycleWithBacklog(b *testing.B) {
	logger := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, deferred := range []int{0, 100_000} {
		b.Run(fmt.Sprintf("deferred=%d", deferred), func(b *testing.B) {
			dir := b.TempDir()
			if deferred > 0 {
				fillBacklog(b, dir, deferred, logger)
			}
			q := openBacklog(b, dir, deferred, drainDeliverer{done: make(chan struct{}, 1)}, logger)
			runtime.GC()
			b.ResetTimer()
			gc0 := gcCPU()
			for b.Loop() {
				runtime.GC()
			}
			b.ReportMetric(float64((gcCPU()-gc0).Microseconds())/float64(b.N), "gc-cpu-µs/cycle")
			runtime.KeepAlive(q)
		})
	}
}

// openBacklog opens the queue in dir, closed when b ends, and checks that
// it holds the deferred messages a fill left there.
func openBacklog(b *testing.B, dir string, deferred int, d Deliverer, logger *slog.Logger) *Queue {
	db, err := OpenDB(filepath.Join(dir, "stsrelay.db"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { db.Close() })
	q, err := New(db, Options{Deliverer: d, Hostname: "relay.test", Logger: logger})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { q.Close() })
	if got := len(q.index); got != deferred {
		b.Fatalf("the queue holds %d messages, want %d", got, deferred)
	}
	return q
}

// gcCPU is the CPU time the garbage collector has used, as the runtime
// estimates it.
func gcCPU() time.Duration {
	s := []metrics.Sample{{Name: "/cpu/classes/gc/total:cpu-seconds"}}
	metrics.Read(s)
	return time.Duration(s[0].Value.Float64() * float64(time.Second))
}

// fillBacklog leaves in dir a queue of n messages of 4 KiB, each deferred
// once and due again in five minutes.
func fillBacklog(b *testing.B, dir string, n int, logger *slog.Logger) {
	db, err := OpenDB(filepath.Join(dir, "stsrelay.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	d := deferringDeliverer{drainDeliverer{done: make(chan struct{}, n)}}
	q, err := New(db, Options{Deliverer: d, Hostname: "relay.test", Logger: logger})
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error)
	go func() { ran <- q.Run(ctx) }()
	var next atomic.Int64
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for i := next.Add(1); i <= int64(n); i = next.Add(1) {
				e := env("app@example.com", fmt.Sprintf("user%d@deferred.example", i))
				if _, err := q.Enqueue(context.Background(), e, bytes.NewReader(body4K)); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	for range n {
		<-d.done
	}
	// The last outcomes are committed once their attempts are over: Run
	// waits for them when it stops.
	cancel()
	if err := <-ran; err != nil {
		b.Fatal(err)
	}
	q.mu.Lock()
	deferredN := q.totals[1]
	q.mu.Unlock()
	if deferredN != n {
		b.Fatalf("%d recipients deferred, want %d", deferredN, n)
	}
}
