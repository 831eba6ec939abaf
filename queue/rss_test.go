package queue

import (
	"bytes"
	"context"
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
func vmRSS(t *testing.T) int64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skipf("no /proc: %v", err)
	}
	for _, l := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			t.Log(strings.Join(strings.Fields(strings.ReplaceAll(string(data), "\n", " ")), " "))
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmRSS in /proc/self/status")
	return 0
}

func TestQueueOf100000MessagesStaysUnder150MBResident(t *testing.T) {
	if testing.Short() {
		t.Skip("fills a queue of 100,000 messages; skipped in -short")
	}
	const messages, limit = 100_000, 150 << 20
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	tq := openTestQueue(t, path, newScripted(all(ok250)), Options{})
	var n atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for range 32 {
		wg.Go(func() {
			for i := n.Add(1); i <= messages; i = n.Add(1) {
				e := env("alice@example.com", "bob@example.org", "carol@example.net")
				if _, err := tq.Enqueue(context.Background(), e, bytes.NewReader(body4K)); err != nil {
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
	tq.Close()
	tq.db.Close()

	debug.FreeOSMemory()
	start = time.Now()
	tq = openTestQueue(t, path, newScripted(all(ok250)), Options{})
	load := time.Since(start)
	debug.FreeOSMemory()
	afterLoad := vmRSS(t)
	if got := len(tq.index); got != messages {
		t.Fatalf("reloaded %d messages, want %d", got, messages)
	}
	fi, _ := os.Stat(path)
	t.Logf("filled %d messages in %v; database %d MB; RSS after filling %d MB, after reopening %d MB (load %v)",
		messages, fill.Round(time.Millisecond), fi.Size()>>20, afterFill>>20, afterLoad>>20, load.Round(time.Millisecond))
	if afterFill > limit || afterLoad > limit {
		t.Errorf("RSS %d MB after filling, %d MB after reopening; limit %d MB", afterFill>>20, afterLoad>>20, limit>>20)
	}
}
