package queue

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// vmRSS returns this process's resident set size in bytes.
func vmRSS(t *testing.T) int64 { return rssField(t, "VmRSS:") }

func rssField(t *testing.T, field string) int64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, field); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatalf("no %s in /proc/self/status", field)
	return 0
}

func TestQueueOf100000MessagesStaysUnder150MBResident(t *testing.T) {
	if testing.Short() || raceEnabled {
		t.Skip("fills a queue of 100,000 messages; skipped in -short and under -race")
	}
	const messages, limit = 100_000, 150 << 20
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	open := func() (*Queue, func()) {
		db, err := OpenDB(path)
		if err != nil {
			t.Fatal(err)
		}
		q, err := New(db, Options{Deliverer: nopDeliverer{}, Hostname: "relay.test", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		return q, func() { q.Close(); db.Close() }
	}
	q, closeQ := open()
	var n atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range 32 {
		wg.Go(func() {
			for i := n.Add(1); i <= messages; i = n.Add(1) {
				e := env("alice@example.com", "bob@example.org", "carol@example.net")
				if _, err := q.Enqueue(context.Background(), e, bytes.NewReader(body4K)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	fill := time.Since(start)
	debug.FreeOSMemory()
	afterFill := vmRSS(t)
	closeQ()
	q = nil

	debug.FreeOSMemory()
	fileBefore := rssField(t, "RssFile:")
	start = time.Now()
	q, closeQ = open()
	defer closeQ()
	load := time.Since(start)
	debug.FreeOSMemory()
	afterLoad := vmRSS(t)
	if got := len(q.index); got != messages {
		t.Fatalf("reloaded %d messages, want %d", got, messages)
	}
	fi, _ := os.Stat(path)
	t.Logf("filled %d messages (3 recipients, 4 KiB) in %v; database %d MB; RSS after filling %d MB, after reopening %d MB (RssAnon %d MB, RssFile %d MB; load %v)",
		messages, fill.Round(time.Millisecond), fi.Size()>>20, afterFill>>20, afterLoad>>20,
		rssField(t, "RssAnon:")>>20, rssField(t, "RssFile:")>>20, load.Round(time.Millisecond))
	// The load reads every record through bbolt's mmap; the mapping is
	// released after it (releaseMapping), so the file's pages do not
	// count against the relay.
	if grew := rssField(t, "RssFile:") - fileBefore; grew > fi.Size()/4 {
		t.Errorf("the database stayed mapped after the load: file-backed RSS grew by %d MB, database %d MB", grew>>20, fi.Size()>>20)
	}
	if afterFill > limit || afterLoad > limit {
		t.Errorf("RSS %d MB after filling, %d MB after reopening; limit %d MB", afterFill>>20, afterLoad>>20, limit>>20)
	}
}
