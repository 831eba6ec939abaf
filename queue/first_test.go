package queue

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// overwriteSpool replaces every stored body with X's of the same length,
// so that a delivery shows whether it read the disk or memory.
func overwriteSpool(t *testing.T, tq *testQueue) {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(tq.opts.Dir, "*"))
	if err != nil || len(names) == 0 {
		t.Fatalf("no spool files: %v", err)
	}
	for _, n := range names {
		fi, err := os.Stat(n)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(n, bytes.Repeat([]byte("X"), int(fi.Size())), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

var fromDisk = strings.Repeat("X", len(testBody))

func (tq *testQueue) firstCopies() (n int, size int64) {
	tq.mu.Lock()
	defer tq.mu.Unlock()
	return tq.Queue.firstCount, tq.firstBytes
}

func TestFirstAttemptTakesTheMessageFromMemoryAndRetriesReadTheDisk(t *testing.T) {
	attempt := 0
	d := newScripted(func(job *Job) []Status {
		attempt++
		if attempt == 1 {
			return all(defer451)(job)
		}
		return all(ok250)(job)
	})
	tq := newTestQueue(t, d, Options{})
	tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	if n, size := tq.firstCopies(); n != 1 || size != int64(len(testBody)) {
		t.Fatalf("after Enqueue: %d first copies, %d bytes; want 1, %d", n, size, len(testBody))
	}
	overwriteSpool(t, tq)
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	tq.clock.Advance(10 * time.Minute)
	tq.wake()
	tq.waitJobs(t, 1)
	tq.settle(t)
	d.mu.Lock()
	bodies := append([]string(nil), d.bodies...)
	d.mu.Unlock()
	if len(bodies) != 2 || bodies[0] != testBody || bodies[1] != fromDisk {
		t.Errorf("bodies delivered = %q; want the committed body from memory, then the spool's (X's) for the retry", bodies)
	}
	if n, size := tq.firstCopies(); n != 0 || size != 0 {
		t.Errorf("after delivery: %d first copies, %d bytes left in memory", n, size)
	}
}

func TestHeldAndDeletedMessagesAreNotTakenFromMemory(t *testing.T) {
	d := newScripted(all(ok250))
	tq := newTestQueue(t, d, Options{})
	held := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	deleted := tq.enqueue(t, env("alice@example.com", "carol@example.net"))
	if _, err := tq.Hold(held); err != nil {
		t.Fatal(err)
	}
	if err := tq.Delete(deleted); err != nil {
		t.Fatal(err)
	}
	if n, _ := tq.firstCopies(); n != 0 {
		t.Fatalf("%d first copies kept after hold and delete; want 0", n)
	}
	overwriteSpool(t, tq)
	tq.run(t)
	tq.settle(t)
	d.mu.Lock()
	jobs := len(d.jobs)
	d.mu.Unlock()
	if jobs != 0 {
		t.Fatalf("%d deliveries of a held or deleted message", jobs)
	}
	if _, err := tq.Release(held); err != nil {
		t.Fatal(err)
	}
	tq.waitJobs(t, 1)
	tq.settle(t)
	d.mu.Lock()
	defer d.mu.Unlock()
	if len(d.jobs) != 1 || d.jobs[0].ID != held || d.bodies[0] != fromDisk {
		t.Errorf("after release: %d jobs, bodies %q; want the held message, read from the spool", len(d.jobs), d.bodies)
	}
}

func TestFirstCopiesOverTheBudgetReadTheDisk(t *testing.T) {
	d := newScripted(all(ok250))
	tq := newTestQueue(t, d, Options{})
	tq.mu.Lock()
	tq.firstMaxCount = 1
	tq.mu.Unlock()
	first := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	second := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	big := bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\r\n"), inlineMax/64+1)
	if _, err := tq.Enqueue(context.Background(), env("alice@example.com", "dave@example.org"), bytes.NewReader(big)); err != nil {
		t.Fatal(err)
	}
	if n, _ := tq.firstCopies(); n != 1 {
		t.Fatalf("%d first copies; want 1 (the count bound)", n)
	}
	overwriteSpool(t, tq)
	tq.run(t)
	tq.waitJobs(t, 3)
	tq.settle(t)
	d.mu.Lock()
	defer d.mu.Unlock()
	for i, j := range d.jobs {
		want := fromDisk
		switch j.ID {
		case first:
			want = testBody
		case second:
		default:
			want = strings.Repeat("X", len(big))
		}
		if d.bodies[i] != want {
			t.Errorf("message %s: body of %d bytes starting %.20q; want %.20q", j.ID, len(d.bodies[i]), d.bodies[i], want)
		}
	}
}
