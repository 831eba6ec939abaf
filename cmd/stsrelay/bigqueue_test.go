package main

import (
	"context"
	"io"
	"log/slog"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/admin"
	"github.com/stsrelay/stsrelay/queue"
)

// parked is the Deliverer of a queue that is filled but never run.
type parked struct{}

func (parked) Deliver(_ context.Context, job *queue.Job) []queue.Status {
	out := make([]queue.Status, len(job.Recipients))
	for i := range out {
		out[i] = queue.Status{Code: 451, Enhanced: "4.3.0", Text: "not delivering"}
	}
	return out
}

func TestQueueListOf100000MessagesPagesThroughTheDaemon(t *testing.T) {
	if testing.Short() || raceEnabled {
		t.Skip("fills a queue of 100,000 messages; make test runs it without -race")
	}
	const messages = 100_000
	dir := t.TempDir()
	config := writeConfig(t, dir, configParts{tail: "[delivery]\nretry_schedule = [\"1h\"]\n"})
	stateDir := filepath.Join(dir, "state")

	// Fill the queue as a daemon would have, held so that none is
	// attempted when the daemon starts.
	db, err := queue.OpenDB(filepath.Join(stateDir, "stsrelay.db"))
	if err != nil {
		t.Fatal(err)
	}
	q, err := queue.New(db, queue.Options{Deliverer: parked{}, Hostname: "relay.test", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Int64
	var wg sync.WaitGroup
	body := "Subject: many\r\n\r\n" + strings.Repeat("x", 1000) + "\r\n"
	for range 32 {
		wg.Go(func() {
			for i := n.Add(1); i <= messages; i = n.Add(1) {
				env := queue.Envelope{From: "app@example.com", Recipients: []queue.RecipientParams{{Addr: "user@example.net"}}}
				if _, err := q.Enqueue(context.Background(), env, strings.NewReader(body)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if res, err := q.Select("hold", queue.Selector{All: true}, false); err != nil || res.Messages != messages {
		t.Fatalf("hold -all: %+v, %v", res, err)
	}
	q.Close()
	db.Close()

	d := startDaemon(t, config)
	addr := d.submissionAddr()
	// A submission while the listing runs is committed: pages are short
	// read transactions, which never hold up a commit for the whole list.
	submitted := make(chan struct{})
	go func() {
		defer close(submitted)
		submit(t, addr, "app@example.com", "other@example.org", "Subject: during\r\n\r\nduring\r\n")
	}()
	code, out, errOut := queueCmd(t, config, "list")
	<-submitted
	if code != 0 {
		t.Fatalf("queue list: exit %d: %s", code, errOut)
	}
	m := regexp.MustCompile(`(?m)^-- (\d+) message\(s\)`).FindStringSubmatch(out)
	if m == nil || (m[1] != "100000" && m[1] != "100001") {
		t.Fatalf("queue list of 100,000: last line %q", out[max(0, len(out)-200):])
	}
	// Each reply stays well within the control socket's cap: a page
	// asked for a million messages gets MaxPageSize and a next cursor.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var p queue.Page
	if err := admin.Dial(admin.SocketPath(stateDir)).Call(ctx, "GET", "/queue?limit=1000000", nil, &p); err != nil {
		t.Fatal(err)
	}
	if len(p.Messages) != queue.MaxPageSize || p.Next == "" {
		t.Fatalf("page of %d messages, next %q; want %d and a cursor", len(p.Messages), p.Next, queue.MaxPageSize)
	}
	code, out, _ = queueCmd(t, config, "summary")
	if code != 0 || !strings.Contains(out, "100,000 recipient(s) waiting") && !strings.Contains(out, "100,001 recipient(s) waiting") {
		t.Fatalf("summary of 100,000: exit %d\n%s", code, out)
	}
	d.stop(syscall.SIGTERM)
}
