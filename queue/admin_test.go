package queue

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/admin"
)

// serveAdmin serves the queue's admin routes on a real control socket and
// returns a client for it.
func serveAdmin(t *testing.T, q *Queue) *admin.Client {
	t.Helper()
	mux := http.NewServeMux()
	q.RegisterAdmin(mux)
	path := filepath.Join(t.TempDir(), admin.SocketName)
	srv, err := admin.Listen(path, mux, nil)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	t.Cleanup(func() { srv.Close() })
	return admin.Dial(path)
}

func call(t *testing.T, c *admin.Client, method, path string, out any) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return c.Call(ctx, method, path, nil, out)
}

func TestAdminHoldReleaseRetryOverControlSocket(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(defer451)), Options{})
	c := serveAdmin(t, tq.Queue)
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org", "carol@example.net"))
	tq.run(t)
	tq.waitJobs(t, 2)
	tq.settle(t)

	var page Page
	if err := call(t, c, "GET", "/queue", &page); err != nil {
		t.Fatal(err)
	}
	list := page.Messages
	if len(list) != 1 || list[0].ID != id || list[0].From != "alice@example.com" || len(list[0].Recipients) != 2 {
		t.Fatalf("list = %+v", list)
	}
	r := list[0].Recipients[0]
	if r.State != StateDeferred || r.Attempts != 1 || r.LastCode != 451 || r.LastEnhanced != "4.4.1" || r.LastMX != "mx.example.org" || r.NextAttempt == nil {
		t.Errorf("recipient = %+v", r)
	}

	var res ActionResult
	if err := call(t, c, "POST", "/queue/"+id+"/hold", &res); err != nil || res.Changed != 2 {
		t.Fatalf("hold: %v, %+v", err, res)
	}
	var mi MessageInfo
	call(t, c, "GET", "/queue/"+id, &mi)
	for _, r := range mi.Recipients {
		if r.State != StateHeld || r.NextAttempt != nil {
			t.Errorf("after hold: %+v", r)
		}
	}
	if !strings.Contains(mi.Headers, "Subject: lunch") || strings.Contains(mi.Headers, "See you") {
		t.Errorf("show headers = %q", mi.Headers)
	}
	// A held message is not delivered even when its retry comes due.
	tq.clock.Advance(time.Hour)
	tq.wake()
	time.Sleep(50 * time.Millisecond)
	if n := len(tq.d.seen); n != 0 {
		t.Fatalf("%d deliveries of a held message", n)
	}
	if err := call(t, c, "POST", "/queue/"+id+"/release", &res); err != nil || res.Changed != 2 {
		t.Fatalf("release: %v, %+v", err, res)
	}
	tq.waitJobs(t, 2)
	tq.settle(t)

	// Retry makes a deferred recipient due before its time.
	if err := call(t, c, "POST", "/queue/"+id+"/retry", &res); err != nil || res.Changed != 2 {
		t.Fatalf("retry: %v, %+v", err, res)
	}
	tq.waitJobs(t, 2)
	tq.settle(t)
	var bulk BulkResult
	if err := c.Call(context.Background(), "POST", "/queue/retry", BulkRequest{Selector: Selector{All: true}}, &bulk); err != nil || bulk.Messages != 1 || bulk.Recipients != 2 {
		t.Fatalf("retry -all: %v, %+v", err, bulk)
	}
	tq.waitJobs(t, 2)
	tq.settle(t)
	call(t, c, "GET", "/queue/"+id, &mi)
	if mi.Recipients[0].Attempts != 4 {
		t.Errorf("attempts after release, retry and retry-all = %d, want 4", mi.Recipients[0].Attempts)
	}
}

func TestAdminDeleteAndBounce(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(defer451)), Options{})
	c := serveAdmin(t, tq.Queue)
	kept := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	gone := tq.enqueue(t, env("alice@example.com", "carol@example.org"))

	for _, path := range []string{"/queue/nosuchid", "/queue/nosuchid/bounce", "/queue/nosuchid/hold"} {
		method := "POST"
		if !strings.HasSuffix(path, "bounce") && !strings.HasSuffix(path, "hold") {
			method = "DELETE"
		}
		err := call(t, c, method, path, nil)
		if err == nil || err.Error() != "nosuchid: no such message in the queue" {
			t.Errorf("%s %s: %v", method, path, err)
		}
	}

	goneLoc := locOf(tq.stored(t, gone))
	// A slow fallocate, as on a loaded disk: DELETE still returns only
	// once the text is gone.
	tq.spool.mu.Lock()
	tq.spool.punch = func(f *os.File, off, n int64) error {
		time.Sleep(100 * time.Millisecond)
		return punchHole(f, off, n)
	}
	tq.spool.mu.Unlock()
	if err := call(t, c, "DELETE", "/queue/"+gone, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := tq.Show(gone); !errors.Is(err, ErrNotFound) {
		t.Errorf("deleted message still there: %v", err)
	}
	if b, err := tq.spool.read(goneLoc, -1); err == nil && len(bytes.Trim(b, "\x00")) > 0 {
		t.Error("deleted message's body is still in the spool")
	}
	if n := len(tq.dsnsTo(t, "alice@example.com")); n != 0 {
		t.Errorf("delete sent %d DSNs", n)
	}

	var res ActionResult
	if err := call(t, c, "POST", "/queue/"+kept+"/bounce", &res); err != nil || res.Changed != 1 {
		t.Fatalf("bounce: %v %+v", err, res)
	}
	if _, err := tq.Show(kept); !errors.Is(err, ErrNotFound) {
		t.Errorf("bounced message still there: %v", err)
	}
	dsns := tq.dsnsTo(t, "alice@example.com")
	if len(dsns) != 1 {
		t.Fatalf("%d DSNs after bounce, want 1", len(dsns))
	}
	rep := parseDSN(t, tq.body(t, dsns[0]))
	if got := rep.recipients[0].Get("Diagnostic-Code"); got != "X-stsrelay; 554 5.0.0 bounced by the mail system administrator" {
		t.Errorf("Diagnostic-Code %q", got)
	}
	if rep.recipients[0].Get("Remote-MTA") != "" {
		t.Error("Remote-MTA on a bounce no remote was involved in")
	}
}

func TestOrphanBodyFromACrashIsRemovedAtStart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	tq := openTestQueue(t, path, newScripted(all(ok250)), Options{})
	kept := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	// Bodies written just before a crash, their records never committed.
	orphan, _, err := tq.spool.write(time.Now(), strings.NewReader(testBody), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	bf := tq.spool.path(batchPrefix + newID(time.Now()))
	if err := os.WriteFile(bf, []byte(testBody), 0o600); err != nil {
		t.Fatal(err)
	}
	tq.Close()
	tq.db.Close()
	tq = openTestQueue(t, path, newScripted(all(ok250)), Options{})
	if _, err := tq.spool.read(bodyLoc{id: orphan}, 10); err == nil {
		t.Error("orphan body file survived the restart")
	}
	if _, err := os.Stat(bf); err == nil {
		t.Error("orphan segment survived the restart")
	}
	if b, err := tq.spool.read(locOf(tq.stored(t, kept)), -1); err != nil || string(b) != testBody {
		t.Errorf("queued message's body: %v", err)
	}
}

// slowRemote defers a message's first attempt, so that the retry reads
// the spool, and holds the retry's transfer half-way until goOn.
type slowRemote struct {
	attempts      int
	started, goOn chan struct{}
	got           chan string
	reopen        chan error // the error of a second Open after goOn, as dkimsign opens twice
}

func newSlowRemote() *slowRemote {
	return &slowRemote{started: make(chan struct{}), goOn: make(chan struct{}), got: make(chan string, 1), reopen: make(chan error, 1)}
}

func (s *slowRemote) Deliver(ctx context.Context, job *Job) []Status {
	if job.Domain == senderDomain { // a bounce's DSN
		return all(defer451)(job)
	}
	if s.attempts++; s.attempts == 1 {
		return all(defer451)(job)
	}
	rc, err := job.Open()
	if err != nil {
		s.got <- "open: " + err.Error()
		return all(defer451)(job)
	}
	head := make([]byte, 16)
	io.ReadFull(rc, head)
	close(s.started)
	<-s.goOn
	rest, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		s.got <- "read: " + err.Error()
	} else {
		s.got <- string(head) + string(rest)
	}
	rc2, err := job.Open()
	if err == nil {
		b, _ := io.ReadAll(rc2)
		rc2.Close()
		err = fmt.Errorf("reopened and read %q", b)
	}
	s.reopen <- err
	return all(ok250)(job)
}

// retryUnderSlowRemote queues a message whose retry, read from the spool,
// is half sent when it returns.
func retryUnderSlowRemote(t *testing.T) (*testQueue, *slowRemote, string) {
	t.Helper()
	s := newSlowRemote()
	tq := newTestQueue(t, nil, Options{RetrySchedule: []time.Duration{time.Minute}})
	tq.Queue.opts.Deliverer = s
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	tq.run(t)
	for tq.stored(t, id).Recipients[0].Attempts == 0 {
		time.Sleep(5 * time.Millisecond)
	}
	tq.clock.Advance(2 * time.Minute)
	tq.wake()
	select {
	case <-s.started:
	case <-time.After(10 * time.Second):
		t.Fatal("the retry did not start")
	}
	return tq, s, id
}

// queue show reads a message as a delivery does: a delete meanwhile does
// not punch its text out under the read, and a later read says it left.
func TestMessageBeingShownSurvivesADelete(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(defer451)), Options{})
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	loc := locOf(tq.stored(t, id))
	rc, err := tq.Message(id)
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	head := make([]byte, 16)
	if _, err := io.ReadFull(rc, head); err != nil {
		t.Fatal(err)
	}
	if err := tq.Delete(id); err != nil {
		t.Fatal(err)
	}
	tq.spool.flush(loc.file)
	tq.spool.waitPunched()
	rest, err := io.ReadAll(rc)
	if got := string(head) + string(rest); err != nil || got != testBody {
		t.Errorf("read %q, %v across a delete; want the message as queued", got, err)
	}
	if _, err := tq.Message(id); !errors.Is(err, ErrNotFound) {
		t.Errorf("Message after the delete: %v, want ErrNotFound", err)
	}
	if _, err := tq.Show(id); !errors.Is(err, ErrNotFound) {
		t.Errorf("Show after the delete: %v, want ErrNotFound", err)
	}
}

// A delivery that is reading a message when an operator deletes or
// bounces it sends the message whole, as one reading a body file of its
// own or the first attempt's copy in memory does; a later Open fails.
// The space is given back once the reader is done.
func TestDeleteOrBounceDuringDeliverySendsTheIntactMessage(t *testing.T) {
	for _, action := range []string{"delete", "bounce"} {
		t.Run(action, func(t *testing.T) {
			tq, s, id := retryUnderSlowRemote(t)
			loc := locOf(tq.stored(t, id))
			done := make(chan error, 1)
			go func() {
				if action == "delete" {
					done <- tq.Delete(id)
				} else {
					_, err := tq.Bounce(id)
					done <- err
				}
			}()
			select {
			case err := <-done:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("%s waited for the delivery reading the message", action)
			}
			close(s.goOn)
			if sent := <-s.got; sent != testBody {
				t.Errorf("the remote got %q, want the message as queued", sent)
			}
			if err := <-s.reopen; err == nil || !strings.Contains(err.Error(), "no longer in the queue") {
				t.Errorf("opening the message again after the %s: %v; want an error", action, err)
			}
			tq.settle(t)
			tq.spool.flush(loc.file)
			tq.spool.waitPunched()
			if b, err := tq.spool.read(loc, -1); err == nil && len(bytes.Trim(b, "\x00")) > 0 {
				t.Errorf("the %sd message's text is still in the spool once the delivery is done", action)
			}
		})
	}
}
