package queue

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The crash test runs the queue in a child process (this test binary,
// re-executed), SIGKILLs it at random moments while it enqueues and
// delivers, restarts it, and finally lets it drain. Every message whose
// Enqueue returned must then have been delivered to every recipient, with
// its body intact.

const (
	envCrashDir  = "STSRELAY_QUEUE_CRASH_DIR"
	envCrashMode = "STSRELAY_QUEUE_CRASH_MODE" // "load" or "drain"
)

func TestCrashLosesNoAcknowledgedMessage(t *testing.T) {
	if dir := os.Getenv(envCrashDir); dir != "" {
		crashChild(t, dir, os.Getenv(envCrashMode))
		return
	}
	if testing.Short() {
		t.Skip("crash test re-executes the binary; skipped in -short")
	}
	dir := t.TempDir()
	child := func(mode string) *exec.Cmd {
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashLosesNoAcknowledgedMessage$", "-test.count=1")
		cmd.Env = append(os.Environ(), envCrashDir+"="+dir, envCrashMode+"="+mode)
		var stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stderr, &stderr
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("child (%s) output:\n%s", mode, stderr.String())
			}
		})
		return cmd
	}
	for round := range 8 {
		before := countLines(filepath.Join(dir, "acked"))
		cmd := child("load")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Kill it at a random moment once it is under load, however slowly
		// a busy machine starts it.
		for deadline := time.Now().Add(20 * time.Second); countLines(filepath.Join(dir, "acked")) < before+10 && time.Now().Before(deadline); {
			time.Sleep(10 * time.Millisecond)
		}
		time.Sleep(time.Duration(rand.IntN(400)) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		err := cmd.Wait()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() {
			t.Fatalf("round %d: child exited before it was killed: %v", round, err)
		}
	}
	cmd := child("drain")
	cmd.WaitDelay = time.Minute
	if err := cmd.Run(); err != nil {
		t.Fatalf("drain: %v", err)
	}

	acked := readLines(t, filepath.Join(dir, "acked"))
	delivered := map[string]bool{}
	for _, l := range readLines(t, filepath.Join(dir, "delivered")) {
		if strings.HasPrefix(l, "CORRUPT") {
			t.Errorf("delivered a damaged body: %s", l)
		}
		delivered[l] = true
	}
	if len(acked) < 50 {
		t.Fatalf("only %d messages acknowledged in all rounds; the test proves little", len(acked))
	}
	missing := 0
	for _, l := range acked {
		id, rcpts, _ := strings.Cut(l, " ")
		for _, r := range strings.Split(rcpts, ",") {
			if !delivered[id+" "+r] {
				missing++
				t.Errorf("acknowledged message %s to %s was never delivered", id, r)
			}
		}
	}
	t.Logf("%d messages acknowledged across 8 kills, %d deliveries logged, %d missing", len(acked), len(delivered), missing)
}

// readLines returns the complete lines of path.
// countLines counts the complete lines in the file at path, 0 when it
// does not exist yet.
func countLines(path string) int {
	data, _ := os.ReadFile(path)
	return bytes.Count(data, []byte("\n"))
}

func readLines(t *testing.T, path string) []string {
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for len(data) > 0 {
		i := bytes.IndexByte(data, '\n')
		if i < 0 {
			break // a line cut off by the kill
		}
		out = append(out, string(data[:i]))
		data = data[i+1:]
	}
	return out
}

// appender writes whole lines to a file shared by goroutines.
type appender struct {
	mu sync.Mutex
	f  *os.File
}

func (a *appender) line(s string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.f.WriteString(s + "\n") // one write(2): a SIGKILL leaves it whole or absent
}

func openAppender(t *testing.T, path string) *appender {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	return &appender{f: f}
}

// crashDeliverer checks each body against its X-Check header, logs every
// accepted recipient before it answers, and defers one attempt in five.
type crashDeliverer struct{ log *appender }

func (d *crashDeliverer) Deliver(ctx context.Context, job *Job) []Status {
	out := make([]Status, len(job.Recipients))
	rc, err := job.Open()
	if err != nil {
		return all(defer451)(job)
	}
	body, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		return all(defer451)(job)
	}
	if !checkBody(body) {
		d.log.line("CORRUPT " + job.ID)
	}
	for i, r := range job.Recipients {
		if rand.IntN(5) == 0 {
			out[i] = defer451
			continue
		}
		d.log.line(job.ID + " " + r.Addr)
		out[i] = ok250
	}
	return out
}

func makeBody(n int) []byte {
	lines := 1 + rand.IntN(300)
	if n%20 == 0 {
		lines = 12000 // over inlineMax: a spool file of its own
	}
	payload := strings.Repeat(fmt.Sprintf("line %d of a test message\r\n", n), lines)
	return fmt.Appendf(nil, "Subject: %d\r\nX-Check: %x\r\n\r\n%s", n, sha256.Sum256([]byte(payload)), payload)
}

func checkBody(b []byte) bool {
	h, payload, ok := bytes.Cut(b, []byte("\r\n\r\n"))
	if !ok {
		return false
	}
	return bytes.Contains(h, fmt.Appendf(nil, "X-Check: %x", sha256.Sum256(payload)))
}

func crashChild(t *testing.T, dir, mode string) {
	bdb, err := OpenDB(filepath.Join(dir, "stsrelay.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer bdb.Close()
	delivered := openAppender(t, filepath.Join(dir, "delivered"))
	q, err := New(bdb, Options{
		Deliverer:     &crashDeliverer{log: delivered},
		Workers:       8,
		RetrySchedule: []time.Duration{5 * time.Millisecond},
		Hostname:      "relay.test",
		Logger:        slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	runDone := make(chan error)
	go func() { runDone <- q.Run(ctx) }()

	if mode == "drain" {
		deadline := time.Now().Add(45 * time.Second)
		for {
			q.mu.Lock()
			n := len(q.index)
			q.mu.Unlock()
			if n == 0 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%d messages still queued after 45s", n)
			}
			time.Sleep(10 * time.Millisecond)
		}
		cancel()
		<-runDone
		q.Close()
		if p, _ := q.List("", 0); len(p.Messages) != 0 {
			t.Fatalf("index empty but %d messages stored", len(p.Messages))
		}
		// Batch files go with their last message; orphans from the kills
		// were swept at start.
		if left, _ := os.ReadDir(q.spool.dir); len(left) != 0 {
			t.Fatalf("queue drained but %d spool files left", len(left))
		}
		return
	}

	acked := openAppender(t, filepath.Join(dir, "acked"))
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for n := w; ; n += 8 {
				var rcpts []string
				for i := range 1 + rand.IntN(3) {
					rcpts = append(rcpts, fmt.Sprintf("r%d-%d@d%d.test", n, i, rand.IntN(5)))
				}
				id, err := q.Enqueue(ctx, env("a@sender.test", rcpts...), bytes.NewReader(makeBody(n)))
				if err != nil {
					t.Errorf("enqueue: %v", err)
					return
				}
				acked.line(id + " " + strings.Join(rcpts, ","))
			}
		})
	}
	wg.Wait() // until SIGKILL
}
