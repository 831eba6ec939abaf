package queue

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"mime/multipart"
	"net/mail"
	"net/textproto"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/bbolt"
)

// clock is a settable test clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)} }

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// scripted is a Deliverer whose answers come from a function; it records
// every job and the body it read.
type scripted struct {
	mu     sync.Mutex
	answer func(job *Job) []Status
	jobs   []*Job
	bodies []string
	seen   chan *Job
}

func newScripted(answer func(job *Job) []Status) *scripted {
	return &scripted{answer: answer, seen: make(chan *Job, 1000)}
}

// senderDomain is where the test senders live: deliveries there are the
// queue's own DSNs, which stay deferred so that tests can read them.
const senderDomain = "example.com"

func (s *scripted) Deliver(ctx context.Context, job *Job) []Status {
	if job.Domain == senderDomain {
		return all(defer451)(job)
	}
	rc, err := job.Open()
	var body []byte
	if err == nil {
		body, _ = io.ReadAll(rc)
		rc.Close()
	}
	s.mu.Lock()
	s.jobs = append(s.jobs, job)
	s.bodies = append(s.bodies, string(body))
	s.mu.Unlock()
	st := s.answer(job)
	s.seen <- job
	return st
}

// all answers every recipient with st.
func all(st Status) func(*Job) []Status {
	return func(job *Job) []Status {
		out := make([]Status, len(job.Recipients))
		for i := range out {
			out[i] = st
		}
		return out
	}
}

var (
	ok250    = Status{Code: 250, Enhanced: "2.0.0", Text: "mx.example.org: ok queued as 123", RemoteMTA: "mx.example.org"}
	defer451 = Status{Code: 451, Enhanced: "4.4.1", Text: "mx.example.org[192.0.2.1]: connection refused", RemoteMTA: "mx.example.org"}
	fail550  = Status{Code: 550, Enhanced: "5.1.1", Text: "mx.example.org[192.0.2.1]: 550 5.1.1 <bob@example.org>: user unknown", RemoteMTA: "mx.example.org",
		Reply: "550 5.1.1 <bob@example.org>: user unknown"}
)

const testBody = "From: alice@example.com\r\nTo: bob@example.org\r\nSubject: lunch\r\nMessage-ID: <1@example.com>\r\n\r\nSee you at noon.\r\n"

type testQueue struct {
	*Queue
	db    *bbolt.DB
	clock *clock
	d     *scripted
	path  string
}

func openTestQueue(t *testing.T, path string, d *scripted, opts Options) *testQueue {
	t.Helper()
	db, err := OpenDB(path)
	if err != nil {
		t.Fatal(err)
	}
	c := newClock()
	if opts.Now == nil {
		opts.Now = c.Now
	}
	opts.Deliverer = d
	if opts.Hostname == "" {
		opts.Hostname = "relay.test"
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	q, err := New(db, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close(); db.Close() })
	return &testQueue{Queue: q, db: db, clock: c, d: d, path: path}
}

func newTestQueue(t *testing.T, d *scripted, opts Options) *testQueue {
	return openTestQueue(t, filepath.Join(t.TempDir(), "stsrelay.db"), d, opts)
}

func env(from string, rcpts ...string) Envelope {
	e := Envelope{From: from, User: "app", ClientAddr: "192.0.2.9"}
	for _, r := range rcpts {
		e.Recipients = append(e.Recipients, RecipientParams{Addr: r})
	}
	return e
}

func (tq *testQueue) enqueue(t *testing.T, e Envelope) string {
	t.Helper()
	id, err := tq.Enqueue(context.Background(), e, strings.NewReader(testBody))
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// run starts Run and stops it at the end of the test.
func (tq *testQueue) run(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- tq.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

// waitJobs waits for n deliveries to have been attempted.
func (tq *testQueue) waitJobs(t *testing.T, n int) []*Job {
	t.Helper()
	var jobs []*Job
	for len(jobs) < n {
		select {
		case j := <-tq.d.seen:
			jobs = append(jobs, j)
		case <-time.After(10 * time.Second):
			t.Fatalf("waited for %d deliveries, got %d", n, len(jobs))
		}
	}
	return jobs
}

// settle waits until no delivery is running and every outcome is recorded.
func (tq *testQueue) settle(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		tq.mu.Lock()
		idle := tq.sched.running == 0
		tq.mu.Unlock()
		if idle {
			return
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatal("deliveries still running after 10s")
}

func (tq *testQueue) show(t *testing.T, id string) *MessageInfo {
	t.Helper()
	mi, err := tq.Show(id)
	if err != nil {
		t.Fatal(err)
	}
	return mi
}

// dsnTo returns the DSNs queued for addr.
func (tq *testQueue) dsnsTo(t *testing.T, addr string) []*message {
	t.Helper()
	var out []*message
	tq.db.View(func(tx *bbolt.Tx) error {
		return tx.Bucket(bucketMessages).ForEach(func(k, v []byte) error {
			m, err := getMessage(tx, string(k))
			if err != nil {
				t.Fatal(err)
			}
			if m.Envelope.From == "" && len(m.Recipients) == 1 && m.Recipients[0].Addr == addr {
				out = append(out, m)
			}
			return nil
		})
	})
	return out
}

// stored returns the record of id.
func (tq *testQueue) stored(t *testing.T, id string) *message {
	t.Helper()
	var m *message
	err := tq.db.View(func(tx *bbolt.Tx) error {
		var err error
		m, err = getMessage(tx, id)
		return err
	})
	if err != nil || m == nil {
		t.Fatalf("message %s: %v, %v", id, m, err)
	}
	return m
}

func (tq *testQueue) body(t *testing.T, m *message) []byte {
	t.Helper()
	b, err := tq.spool.read(locOf(m), -1)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// report is a DSN parsed back: its header, per-message fields,
// per-recipient fields and the returned content.
type report struct {
	header      mail.Header
	text        string
	perMessage  textproto.MIMEHeader
	recipients  []textproto.MIMEHeader
	contentType string
	content     string
	// statusType is the second part's Content-Type: message/delivery-status
	// or message/global-delivery-status (RFC 6533).
	statusType string
}

func parseDSN(t *testing.T, raw []byte) *report {
	t.Helper()
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("DSN is not a message: %v", err)
	}
	mt, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/report" || params["report-type"] != "delivery-status" {
		t.Fatalf("DSN Content-Type = %q, want multipart/report; report-type=delivery-status", msg.Header.Get("Content-Type"))
	}
	rep := &report{header: msg.Header}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	for i := 0; ; i++ {
		p, err := mr.NextPart()
		if err == io.EOF {
			if i != 3 {
				t.Fatalf("DSN has %d parts, want 3", i)
			}
			return rep
		}
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(p)
		ct := p.Header.Get("Content-Type")
		switch i {
		case 0:
			if !strings.HasPrefix(ct, "text/plain") {
				t.Fatalf("DSN part 1 is %q, want text/plain", ct)
			}
			rep.text = string(data)
		case 1:
			if ct != "message/delivery-status" && ct != "message/global-delivery-status" {
				t.Fatalf("DSN part 2 is %q, want message/delivery-status", ct)
			}
			rep.statusType = ct
			tr := textproto.NewReader(bufio.NewReader(bytes.NewReader(data)))
			rep.perMessage, err = tr.ReadMIMEHeader()
			if err != nil {
				t.Fatalf("per-message fields: %v", err)
			}
			for {
				h, err := tr.ReadMIMEHeader()
				if len(h) > 0 {
					rep.recipients = append(rep.recipients, h)
				}
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatalf("per-recipient fields: %v", err)
				}
			}
		case 2:
			rep.contentType = ct
			rep.content = string(data)
		}
	}
}

// spoolBodyBytes counts the bytes of message bodies the spool still holds:
// every byte of a body's own file, and the nonzero bytes of segments, whose
// freed stretches read as zeros (test bodies hold no NUL bytes).
func spoolBodyBytes(t *testing.T, dir string) int64 {
	t.Helper()
	names, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, e := range names {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(e.Name(), batchPrefix) {
			n += int64(len(b))
			continue
		}
		n += int64(len(b) - bytes.Count(b, []byte{0}))
	}
	return n
}

// mountTmpfs mounts a tmpfs of size bytes on a new directory and returns
// its path. It needs root: CI runs the tests as root, so there a test
// that cannot mount fails; a developer who is not root skips it.
func mountTmpfs(t *testing.T, size int) string {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("this test needs root to mount a tmpfs and must run as root in CI")
		}
		t.Skip("needs root to mount a tmpfs; CI runs it as root")
	}
	dir := filepath.Join(t.TempDir(), "tmpfs")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", dir, "tmpfs", 0, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(dir, syscall.MNT_DETACH) })
	return dir
}

// fillUp fills the file system of dir and returns what frees it again.
func fillUp(t *testing.T, dir string) (free func()) {
	t.Helper()
	name := filepath.Join(dir, "filler")
	f, err := os.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	for {
		if _, err := f.Write(buf); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			break
		}
	}
	return func() {
		if err := os.Remove(name); err != nil {
			t.Fatal(err)
		}
	}
}
