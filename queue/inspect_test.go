package queue

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestListPagesCoverTheQueueOnceInOrder(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(defer451)), Options{})
	var want []string
	for i := range 25 {
		want = append(want, tq.enqueue(t, env("alice@example.com", fmt.Sprintf("r%d@example.org", i))))
		tq.clock.Advance(time.Millisecond)
	}
	var got []string
	after, pages := "", 0
	for {
		p, err := tq.List(after, 10)
		if err != nil {
			t.Fatal(err)
		}
		pages++
		if len(p.Messages) > 10 {
			t.Fatalf("page of %d messages, limit 10", len(p.Messages))
		}
		for _, m := range p.Messages {
			got = append(got, m.ID)
		}
		if p.Next == "" {
			break
		}
		after = p.Next
	}
	if pages != 3 || strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("%d pages listed %v, want 3 pages of %v", pages, got, want)
	}
	// A page that ends exactly at the end says so: no empty page after it.
	if p, _ := tq.List(want[14], 10); p.Next != "" || len(p.Messages) != 10 {
		t.Errorf("last full page: next %q, %d messages", p.Next, len(p.Messages))
	}
}

// A page ends early once its messages hold maxPageRecipients: a stuck
// bulk mailing of 1,000 recipients a message would otherwise make a page
// of 1,000 messages larger than the control socket takes.
func TestListPagesEndAtARecipientBound(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(defer451)), Options{})
	per := maxPageRecipients / 4
	var ids []string
	for i := range 6 {
		e := env("alice@example.com")
		for j := range per {
			e.Recipients = append(e.Recipients, RecipientParams{Addr: fmt.Sprintf("r%d.%d@example.org", i, j)})
		}
		ids = append(ids, tq.enqueue(t, e))
		tq.clock.Advance(time.Millisecond)
	}
	p, err := tq.List("", DefaultPageSize)
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Messages) != 4 || p.Next != ids[3] {
		t.Fatalf("first page: %d messages, next %q; want 4 and %s", len(p.Messages), p.Next, ids[3])
	}
	if p, _ = tq.List(p.Next, DefaultPageSize); len(p.Messages) != 2 || p.Next != "" {
		t.Errorf("second page: %d messages, next %q; want the last 2", len(p.Messages), p.Next)
	}
}

func TestReaderReadsTheDatabaseOfAStoppedDaemon(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	if _, err := OpenReadOnly(path); !errors.Is(err, ErrNoDatabase) {
		t.Fatalf("no database: %v", err)
	}
	tq := openTestQueue(t, path, newScripted(all(defer451)), Options{})
	e := env("alice@example.com", "bob@example.org")
	e.MessageID = "<1@example.com>"
	id := tq.enqueue(t, e)
	// While the daemon holds the file, a reader is refused, not served a
	// file that changes under it.
	if _, err := OpenReadOnly(path); !errors.Is(err, ErrLocked) {
		t.Fatalf("open while the daemon runs: %v", err)
	}
	tq.Close()
	tq.db.Close()

	db, err := OpenReadOnly(path)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	// The daemon waits for readers rather than change the file under them.
	if _, err := OpenDB(path); err == nil || !strings.Contains(err.Error(), "another stsrelay process holds") {
		t.Fatalf("daemon start while a reader holds the file: %v", err)
	}
	r := NewReader(db, "")
	p, err := r.List("", 0)
	if err != nil || len(p.Messages) != 1 || p.Messages[0].ID != id || p.Messages[0].MessageID != "<1@example.com>" {
		t.Fatalf("List = %+v, %v", p, err)
	}
	mi, err := r.Show(id)
	if err != nil || !strings.Contains(mi.Headers, "Subject: lunch") {
		t.Fatalf("Show = %+v, %v", mi, err)
	}
	rc, err := r.Message(id)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(rc)
	rc.Close()
	if string(body) != testBody {
		t.Fatalf("Message = %q", body)
	}
	if _, err := r.Show("nosuchid"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Show(nosuchid) = %v", err)
	}
}

// stateOf returns the recipients' states of id, "gone" when it left.
func (tq *testQueue) stateOf(t *testing.T, id string) string {
	t.Helper()
	mi, err := tq.Show(id)
	if errors.Is(err, ErrNotFound) {
		return "gone"
	}
	if err != nil {
		t.Fatal(err)
	}
	var s []string
	for _, r := range mi.Recipients {
		s = append(s, string(r.State))
	}
	return strings.Join(s, ",")
}

func TestSelectCombinesFiltersAndCountsWhatItTouched(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(defer451)), Options{})
	a := tq.enqueue(t, env("alice@example.com", "x@gmail.test", "y@other.test"))
	b := tq.enqueue(t, env("bob@example.com", "z@gmail.test"))
	c := tq.enqueue(t, env("alice@example.com", "w@other.test"))

	res, err := tq.Select("hold", Selector{Domain: "GMAIL.test"}, false)
	if err != nil || res != (BulkResult{Messages: 2, Recipients: 2}) {
		t.Fatalf("hold -domain: %+v, %v", res, err)
	}
	if s := tq.stateOf(t, a) + " " + tq.stateOf(t, b) + " " + tq.stateOf(t, c); s != "held,queued held queued" {
		t.Fatalf("after hold -domain gmail.test: %s", s)
	}
	// Sender and status together: only alice's held recipients.
	res, err = tq.Select("release", Selector{Sender: "alice@example.com", Status: StatusHeld}, false)
	if err != nil || res != (BulkResult{Messages: 1, Recipients: 1}) {
		t.Fatalf("release -sender -status: %+v, %v", res, err)
	}
	if s := tq.stateOf(t, a) + " " + tq.stateOf(t, b); s != "queued,queued held" {
		t.Fatalf("after release: %s", s)
	}

	// Deleting more than one message needs a confirmation, and changes
	// nothing without it.
	_, err = tq.Select("delete", Selector{Sender: "alice@example.com"}, false)
	var ce *ConfirmError
	if !errors.As(err, &ce) || ce.Messages != 2 || !strings.Contains(err.Error(), "-yes") {
		t.Fatalf("delete of 2 without confirmation: %v", err)
	}
	if tq.stateOf(t, a) == "gone" || tq.stateOf(t, c) == "gone" {
		t.Fatal("an unconfirmed delete deleted")
	}
	// A domain deletes those recipients only; a message goes with its
	// last one, and its text is off the disk when the command returns,
	// even with a slow fallocate.
	cLoc := locOf(tq.stored(t, c))
	tq.spool.mu.Lock()
	tq.spool.punch = func(f *os.File, off, n int64) error {
		time.Sleep(100 * time.Millisecond)
		return punchHole(f, off, n)
	}
	tq.spool.mu.Unlock()
	res, err = tq.Select("delete", Selector{Domain: "other.test"}, true)
	if err != nil || res != (BulkResult{Messages: 2, Recipients: 2}) {
		t.Fatalf("delete -domain -yes: %+v, %v", res, err)
	}
	if s := tq.stateOf(t, a) + " " + tq.stateOf(t, c); s != "queued,failed gone" {
		t.Fatalf("after delete -domain other.test: %s", s)
	}
	if b, err := tq.spool.read(cLoc, -1); err == nil && len(bytes.Trim(b, "\x00")) > 0 {
		t.Error("deleted message's body is still in the spool")
	}
	if n := len(tq.dsnsTo(t, "alice@example.com")); n != 0 {
		t.Errorf("delete sent %d DSNs", n)
	}
	// One message needs no confirmation; a bounce tells the sender.
	res, err = tq.Select("bounce", Selector{Sender: "<bob@example.com>"}, false)
	if err != nil || res.Messages != 1 {
		t.Fatalf("bounce -sender: %+v, %v", res, err)
	}
	if n := len(tq.dsnsTo(t, "bob@example.com")); n != 1 {
		t.Errorf("bounce sent %d DSNs, want 1", n)
	}
	for _, bad := range []Selector{{}, {Status: "frozen"}, {Domain: "not a domain"}} {
		if _, err := tq.Select("hold", bad, false); err == nil {
			t.Errorf("selector %+v accepted", bad)
		}
	}
	if _, err := tq.Select("frobnicate", Selector{All: true}, false); err == nil {
		t.Error("unknown action accepted")
	}
}

func TestAFailedManualRetryDoesNotAdvanceTheSchedule(t *testing.T) {
	sched := []time.Duration{time.Hour, 2 * time.Hour, 4 * time.Hour}
	tq := newTestQueue(t, newScripted(all(defer451)), Options{RetrySchedule: sched})
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	planned := tq.stored(t, id).Recipients[0].NextAttempt
	if d := planned.Sub(tq.clock.Now()); d < time.Hour || d > 66*time.Minute {
		t.Fatalf("first retry in %v, want 1h plus jitter", d)
	}

	tq.clock.Advance(10 * time.Minute)
	if n, err := tq.Retry(id); err != nil || n != 1 {
		t.Fatalf("retry: %d, %v", n, err)
	}
	tq.waitJobs(t, 1)
	tq.settle(t)
	r := tq.stored(t, id).Recipients[0]
	if !r.NextAttempt.Equal(planned) || r.Attempts != 2 {
		t.Fatalf("after a failed manual retry: next %v (want the planned %v), attempts %d", r.NextAttempt, planned, r.Attempts)
	}

	// The planned attempt fails too: the wait is the schedule's second
	// step, as if the manual retry had not happened.
	tq.clock.Advance(planned.Sub(tq.clock.Now()))
	tq.wake()
	tq.waitJobs(t, 1)
	tq.settle(t)
	r = tq.stored(t, id).Recipients[0]
	if d := r.NextAttempt.Sub(tq.clock.Now()); d < 2*time.Hour || d > 132*time.Minute {
		t.Fatalf("after the planned attempt, next retry in %v, want 2h plus jitter", d)
	}
}

func TestSummaryCountsByDomainAgeAndReason(t *testing.T) {
	tq := newTestQueue(t, newScripted(func(job *Job) []Status {
		if job.Domain == "slow.test" {
			return all(Status{Code: 451, Enhanced: "4.4.8", Text: "MX hosts of 'slow.test' failed MTA-STS validation"})(job)
		}
		return all(defer451)(job)
	}), Options{RetrySchedule: []time.Duration{time.Hour}})
	tq.enqueue(t, env("alice@example.com", "a@slow.test", "b@slow.test", "c@example.org"))
	tq.clock.Advance(30 * time.Minute)
	held := tq.enqueue(t, env("alice@example.com", "d@slow.test"))
	if _, err := tq.Hold(held); err != nil {
		t.Fatal(err)
	}
	tq.run(t)
	tq.waitJobs(t, 2)
	tq.settle(t)

	s, err := tq.Summary()
	if err != nil {
		t.Fatal(err)
	}
	if s.Messages != 2 || s.Total.Total != 4 || s.Total.Deferred != 3 || s.Total.Held != 1 {
		t.Fatalf("totals %+v (messages %d)", s.Total, s.Messages)
	}
	if len(s.Domains) != 2 || s.Domains[0].Domain != "slow.test" || s.Domains[0].Total != 3 || s.Domains[0].Held != 1 {
		t.Fatalf("domains %+v", s.Domains)
	}
	// 30 minutes old: the 20-40 minute column; just arrived: the first.
	if got := s.Domains[0].Ages; got[3] != 2 || got[0] != 1 {
		t.Errorf("slow.test ages %v", got)
	}
	if len(s.Reasons) != 2 || s.Reasons[0].Count != 2 || s.Reasons[0].Domain != "slow.test" ||
		!strings.HasPrefix(s.Reasons[0].Status, "451 4.4.8 MX hosts of 'slow.test'") {
		t.Errorf("reasons %+v", s.Reasons)
	}
}

func TestGaugesFollowEveryCommit(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(defer451)), Options{})
	tq.updateGauges()
	if got := value(t, metricOldest); got != 0 {
		t.Fatalf("oldest message age on an empty queue: %v", got)
	}
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org", "carol@example.org"))
	// No tick, no Run: the commit itself moved the gauges.
	if got := value(t, metricMessages); got != 1 {
		t.Errorf("messages gauge %v after a submission, want 1", got)
	}
	if got := value(t, metricRecipients.WithLabelValues("queued")); got != 2 {
		t.Errorf("queued recipients gauge %v, want 2", got)
	}
	tq.Hold(id)
	if got := value(t, metricRecipients.WithLabelValues("held")); got != 2 {
		t.Errorf("held recipients gauge %v, want 2", got)
	}
	tq.clock.Advance(time.Minute)
	tq.updateGauges()
	if got := value(t, metricOldest); got != 60 {
		t.Errorf("oldest message age %v, want 60", got)
	}
	if err := tq.Delete(id); err != nil {
		t.Fatal(err)
	}
	if m, o := value(t, metricMessages), value(t, metricOldest); m != 0 || o != 0 {
		t.Errorf("after the last message left: messages %v, oldest age %v; want 0, 0", m, o)
	}
}
