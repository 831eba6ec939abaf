package logwriter

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
)

// gate is a destination whose writes each wait for a release, so a test
// knows which lines gathered while a write was in flight.
type gate struct {
	mu      sync.Mutex
	writes  [][]byte
	entered chan struct{}
	release chan struct{}
}

func newGate() *gate {
	return &gate{entered: make(chan struct{}, 100), release: make(chan struct{}, 100)}
}

func (g *gate) Write(p []byte) (int, error) {
	g.entered <- struct{}{}
	<-g.release
	g.mu.Lock()
	g.writes = append(g.writes, bytes.Clone(p))
	g.mu.Unlock()
	return len(p), nil
}

func (g *gate) got() (n int, all string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.writes), string(bytes.Join(g.writes, nil))
}

// TestLinesArriveWholeAndInOrder: many goroutines log through a pipe, as
// the daemon's stderr is one; every line arrives once, whole, and each
// goroutine's lines in the order it wrote them.
func TestLinesArriveWholeAndInOrder(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	read := make(chan []string)
	go func() {
		var lines []string
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			lines = append(lines, sc.Text())
		}
		read <- lines
	}()
	lw := New(w, 4096) // small, so writers also wait for room
	const writers, each = 8, 2000
	pad := strings.Repeat("x", 150)
	var wg sync.WaitGroup
	for g := range writers {
		wg.Go(func() {
			for n := range each {
				fmt.Fprintf(lw, "g=%d n=%d %s\n", g, n, pad)
			}
		})
	}
	wg.Wait()
	if err := lw.Close(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	lines := <-read
	if len(lines) != writers*each {
		t.Fatalf("%d lines arrived, want %d", len(lines), writers*each)
	}
	next := make([]int, writers)
	for _, l := range lines {
		var g, n int
		var rest string
		if _, err := fmt.Sscanf(l, "g=%d n=%d %s", &g, &n, &rest); err != nil || rest != pad || g < 0 || g >= writers {
			t.Fatalf("mangled line %q", l)
		}
		if n != next[g] {
			t.Fatalf("writer %d: line %d arrived where %d was due", g, n, next[g])
		}
		next[g]++
	}
}

// TestLinesGatherWhileAWriteIsInFlight: the lines logged during one
// write(2) go out together in the next.
func TestLinesGatherWhileAWriteIsInFlight(t *testing.T) {
	g := newGate()
	lw := New(g, 0)
	io.WriteString(lw, "first\n")
	<-g.entered // the writer holds "first" and waits
	var want strings.Builder
	want.WriteString("first\n")
	for i := range 100 {
		fmt.Fprintf(lw, "line %d\n", i)
		fmt.Fprintf(&want, "line %d\n", i)
	}
	g.release <- struct{}{}
	g.release <- struct{}{}
	if err := lw.Close(); err != nil {
		t.Fatal(err)
	}
	n, all := g.got()
	if n != 2 {
		t.Errorf("%d writes for 101 lines, want 2 (one in flight, then the rest)", n)
	}
	if all != want.String() {
		t.Errorf("wrote %q, want %q", all, want.String())
	}
}

// TestReadyLoggersShareAWrite: the lines of goroutines ready to run when
// the writer wakes join its write. On one P the writer would otherwise
// run right after the first of them (a woken goroutine runs next) and
// write its line alone, then the next one's, and so on.
func TestReadyLoggersShareAWrite(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
	var mu sync.Mutex
	var writes []string
	lw := New(writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		writes = append(writes, string(p))
		mu.Unlock()
		return len(p), nil
	}), 0)
	const loggers = 50
	var wg sync.WaitGroup
	for i := range loggers {
		wg.Go(func() { fmt.Fprintf(lw, "logger %d\n", i) })
	}
	wg.Wait()
	if err := lw.Close(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	if n := strings.Count(strings.Join(writes, ""), "\n"); n != loggers {
		t.Fatalf("%d lines written, want %d", n, loggers)
	}
	if len(writes) > 3 {
		t.Errorf("%d goroutines ready at once took %d writes, want at most 3", loggers, len(writes))
	}
}

// TestFullBufferMakesWritersWait: with limit bytes waiting, Write waits
// until they are written, as it would on a full pipe; nothing is dropped.
func TestFullBufferMakesWritersWait(t *testing.T) {
	g := newGate()
	lw := New(g, 100)
	io.WriteString(lw, "in flight\n")
	<-g.entered
	ninety := strings.Repeat("a", 89) + "\n"
	io.WriteString(lw, ninety) // fits: 90 of 100 bytes
	returned := make(chan struct{})
	go func() {
		io.WriteString(lw, strings.Repeat("b", 19)+"\n") // 110: must wait
		close(returned)
	}()
	select {
	case <-returned:
		t.Fatal("Write returned with the buffer full")
	case <-time.After(100 * time.Millisecond):
	}
	g.release <- struct{}{} // "in flight" is written; the 90 bytes go next
	<-g.entered
	<-returned // room again: the 20 bytes are in the buffer
	g.release <- struct{}{}
	g.release <- struct{}{}
	if err := lw.Close(); err != nil {
		t.Fatal(err)
	}
	_, all := g.got()
	if want := "in flight\n" + ninety + strings.Repeat("b", 19) + "\n"; all != want {
		t.Errorf("wrote %q, want %q", all, want)
	}
}

// TestCloseWritesTheRest: Close returns once every line is written; a line
// logged after it (the daemon's last words) is written at once.
func TestCloseWritesTheRest(t *testing.T) {
	var mu sync.Mutex
	var dst bytes.Buffer
	lw := New(writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return dst.Write(p)
	}), 0)
	for i := range 1000 {
		fmt.Fprintf(lw, "%d\n", i)
	}
	if err := lw.Close(); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	if n := strings.Count(dst.String(), "\n"); n != 1000 {
		t.Errorf("%d lines written by Close, want 1000", n)
	}
	mu.Unlock()
	io.WriteString(lw, "after\n")
	mu.Lock()
	defer mu.Unlock()
	if !strings.HasSuffix(dst.String(), "999\nafter\n") {
		t.Errorf("a line after Close was not written at once: %q", dst.String()[max(0, dst.Len()-20):])
	}
	if err := lw.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

// TestCloseReportsAWriteError: a failed write loses its lines, as a direct
// write would, and Close says so.
func TestCloseReportsAWriteError(t *testing.T) {
	broken := errors.New("pipe closed")
	lw := New(writerFunc(func([]byte) (int, error) { return 0, broken }), 0)
	io.WriteString(lw, "lost\n")
	if err := lw.Close(); !errors.Is(err, broken) {
		t.Errorf("Close = %v, want %v", err, broken)
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

// BenchmarkLogLines logs the daemon's "accepted" line from 20 goroutines
// to a file, directly and through a Writer. Compare the two in one run:
//
//	go test -run '^$' -bench LogLines -count 5 ./internal/logwriter/
func BenchmarkLogLines(b *testing.B) {
	for _, via := range []string{"direct", "logwriter"} {
		b.Run(via, func(b *testing.B) {
			f, err := os.Create(filepath.Join(b.TempDir(), "log"))
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			var w io.Writer = f
			var lw *Writer
			if via == "logwriter" {
				lw = New(f, 0)
				w = lw
			}
			log := slog.New(slog.NewTextHandler(w, nil))
			b.SetParallelism(10) // 20 goroutines on 2 cores
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					log.Info("smtpin: accepted", "client", "127.0.0.1", "id", "33n9g8nb69rmj5rl22eg",
						"message_id", "<2.4k-enforce.stsrelay.2@bench.example>", "from", "app@bench.example",
						"rcpts", 1, "size", 4230, "duration", 6*time.Millisecond)
				}
			})
			if lw != nil {
				lw.Close()
			}
		})
	}
}
