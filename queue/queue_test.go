package queue

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/iotest"
	"time"

	"go.etcd.io/bbolt"
)

func TestEnqueuedMessageSurvivesReopen(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	d := newScripted(all(ok250))
	tq := openTestQueue(t, path, d, Options{})
	big := testBody + strings.Repeat("0123456789abcdef", 20000) // larger than any buffer on the way
	e := env("alice@example.com", "bob@example.org", "carol@Example.NET")
	e.Ret, e.EnvID, e.RequireTLS = "HDRS", "env-1", true
	e.NoTLSPolicy, e.TLSReport, e.OwnDSN = true, true, true
	e.Recipients[0].Notify = []string{"SUCCESS", "FAILURE"}
	id, err := tq.Enqueue(context.Background(), e, strings.NewReader(big))
	if err != nil {
		t.Fatal(err)
	}
	tq.Close()
	tq.db.Close()

	tq = openTestQueue(t, path, d, Options{})
	var m *message
	tq.db.View(func(tx *bbolt.Tx) error { m, err = getMessage(tx, id); return err })
	if m == nil {
		t.Fatalf("message %s is gone after reopening", id)
	}
	if got := string(tq.body(t, m)); got != big {
		t.Fatalf("body changed: %d bytes back, %d stored", len(got), len(big))
	}
	if m.Envelope.EnvID != "env-1" || m.Envelope.Ret != "HDRS" || !m.Envelope.RequireTLS || m.Envelope.User != "app" ||
		!m.Envelope.NoTLSPolicy || !m.Envelope.TLSReport || !m.Envelope.OwnDSN {
		t.Errorf("envelope changed: %+v", m.Envelope)
	}
	if !slices.Equal(m.Recipients[0].Notify, []string{"SUCCESS", "FAILURE"}) || m.Recipients[1].Domain != "example.net" {
		t.Errorf("recipients changed: %+v", m.Recipients)
	}
	for _, r := range m.Recipients {
		if r.State != StateQueued {
			t.Errorf("%s: state %s, want queued", r.Addr, r.State)
		}
	}
}

// eightBitBody is a body that reports, as smtpin's does, whether it held
// 8-bit octets.
type eightBitBody struct {
	*strings.Reader
	has bool
}

func (b eightBitBody) Body8Bit() bool { return b.has }

// A body that reports 8-bit octets is stored with Body8Bit set, whatever
// the envelope said (RFC 6152 §3), in the record on disk and for the first
// attempt, which starts from memory; a body that reports none, or cannot
// tell, leaves the flag as declared.
func TestEnqueueMarksA8BitBodyFromItsReport(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	d := newScripted(all(defer451))
	tq := openTestQueue(t, path, d, Options{})
	large := testBody + strings.Repeat("0123456789abcdef", 20000) // spooled in a file of its own
	cases := []struct {
		name     string
		declared bool
		body     io.Reader
		want     bool
	}{
		{"inline", false, eightBitBody{strings.NewReader(testBody), true}, true},
		{"spooled", false, eightBitBody{strings.NewReader(large), true}, true},
		{"7-bit", false, eightBitBody{strings.NewReader(testBody), false}, false},
		{"declared", true, eightBitBody{strings.NewReader(testBody), false}, true},
		{"no report", false, strings.NewReader(testBody), false},
	}
	ids := map[string]string{}
	for _, c := range cases {
		e := env("alice@example.com", c.name+"@example.org")
		e.Body8Bit = c.declared
		id, err := tq.Enqueue(context.Background(), e, c.body)
		if err != nil {
			t.Fatal(err)
		}
		ids[c.name] = id
	}
	tq.run(t)
	for _, j := range tq.waitJobs(t, len(cases)) {
		for _, c := range cases {
			if j.ID == ids[c.name] && j.Envelope.Body8Bit != c.want {
				t.Errorf("%s: first attempt has Body8Bit=%v, want %v", c.name, j.Envelope.Body8Bit, c.want)
			}
		}
	}
	tq.settle(t)
	tq.Close()
	tq.db.Close()

	tq = openTestQueue(t, path, d, Options{})
	for _, c := range cases {
		if m := tq.stored(t, ids[c.name]); m.Envelope.Body8Bit != c.want {
			t.Errorf("%s: stored with Body8Bit=%v, want %v", c.name, m.Envelope.Body8Bit, c.want)
		}
	}
}

func TestEnqueueRefusesAndStoresNothing(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(ok250)), Options{MaxMessageSize: 100})
	cases := map[string]struct {
		env  Envelope
		body string
		want string
	}{
		"no recipients": {env("a@example.com"), "x", "no recipients"},
		"no domain":     {env("a@example.com", "bob"), "x", "has no domain"},
		"too big":       {env("a@example.com", "b@example.org"), strings.Repeat("x", 101), "size limit"},
	}
	for name, c := range cases {
		_, err := tq.Enqueue(context.Background(), c.env, strings.NewReader(c.body))
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.HasPrefix(err.Error(), "message not queued") {
			t.Errorf("%s: err = %v, want 'message not queued: …%s…'", name, err, c.want)
		}
	}
	_, err := tq.Enqueue(context.Background(), env("a@example.com", "b@example.org"), iotest.ErrReader(errors.New("connection reset")))
	if err == nil || !strings.Contains(err.Error(), "connection reset") {
		t.Errorf("reader error: err = %v", err)
	}
	if p, _ := tq.List("", 0); len(p.Messages) != 0 {
		t.Errorf("queue holds %d messages after refused enqueues", len(p.Messages))
	}
}

func TestEnqueueFailsClearlyWhenTheDatabaseCannotCommit(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(ok250)), Options{})
	tq.db.Close() // every commit now fails
	_, err := tq.Enqueue(context.Background(), env("a@example.com", "b@example.org"), strings.NewReader(testBody))
	if err == nil || !strings.HasPrefix(err.Error(), "message not queued") {
		t.Fatalf("err = %v, want a 'message not queued' error", err)
	}
	tq.spool.waitPunched() // the space of a refused body is given back off the committer
	if n := spoolBodyBytes(t, tq.spool.dir); n != 0 {
		t.Errorf("refused message left %d bytes in the spool", n)
	}
}

func TestRecipientsAtOneDomainShareOneDelivery(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(ok250)), Options{})
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org", "carol@other.test", "dave@EXAMPLE.org"))
	tq.run(t)
	jobs := tq.waitJobs(t, 2)
	tq.settle(t)
	byDomain := map[string][]string{}
	for _, j := range jobs {
		if j.ID != id || j.Attempt != 1 {
			t.Errorf("job %s attempt %d, want %s attempt 1", j.ID, j.Attempt, id)
		}
		for _, r := range j.Recipients {
			byDomain[j.Domain] = append(byDomain[j.Domain], r.Addr)
		}
	}
	if got := byDomain["example.org"]; !slices.Equal(got, []string{"bob@example.org", "dave@EXAMPLE.org"}) {
		t.Errorf("example.org job carried %v", got)
	}
	if got := byDomain["other.test"]; !slices.Equal(got, []string{"carol@other.test"}) {
		t.Errorf("other.test job carried %v", got)
	}
	for _, b := range tq.d.bodies {
		if b != testBody {
			t.Errorf("deliverer read %q, want the stored body", b)
		}
	}
	if _, err := tq.Show(id); !errors.Is(err, ErrNotFound) {
		t.Errorf("delivered message still in the queue: %v", err)
	}
	tq.spool.waitPunched()
	if n := spoolBodyBytes(t, tq.spool.dir); n != 0 {
		t.Errorf("spool holds %d bytes of bodies after delivery", n)
	}
}

func TestDeferralOfOneRecipientDoesNotBlockAnother(t *testing.T) {
	d := newScripted(func(job *Job) []Status {
		if job.Domain == "slow.test" {
			return []Status{defer451}
		}
		return []Status{ok250}
	})
	tq := newTestQueue(t, d, Options{RetrySchedule: []time.Duration{10 * time.Minute, time.Hour}})
	id := tq.enqueue(t, env("alice@example.com", "bob@slow.test", "carol@fast.test"))
	start := tq.clock.Now()
	tq.run(t)
	tq.waitJobs(t, 2)
	tq.settle(t)

	mi := tq.show(t, id)
	bob, carol := mi.Recipients[0], mi.Recipients[1]
	if carol.State != StateDelivered {
		t.Errorf("carol: %s, want delivered", carol.State)
	}
	if bob.State != StateDeferred || bob.Attempts != 1 || bob.LastCode != 451 || bob.LastEnhanced != "4.4.1" || bob.LastMX != "mx.example.org" {
		t.Errorf("bob: %+v, want deferred after 1 attempt with the 451 recorded", bob)
	}
	if min, max := start.Add(10*time.Minute), start.Add(11*time.Minute); bob.NextAttempt == nil || bob.NextAttempt.Before(min) || bob.NextAttempt.After(max) {
		t.Errorf("bob's next attempt %v, want within [%v, %v]", bob.NextAttempt, min, max)
	}

	// Not due yet: nothing happens. Due: the second attempt carries only bob.
	tq.wake()
	time.Sleep(50 * time.Millisecond)
	if n := len(tq.d.seen); n != 0 {
		t.Fatalf("%d deliveries before the retry was due", n)
	}
	tq.clock.Advance(11 * time.Minute)
	tq.wake()
	j := tq.waitJobs(t, 1)[0]
	if j.Attempt != 2 || len(j.Recipients) != 1 || j.Recipients[0].Addr != "bob@slow.test" {
		t.Errorf("retry job: attempt %d, recipients %v", j.Attempt, j.Recipients)
	}
}

func TestBackoffFollowsScheduleWithJitterAndRepeatsLast(t *testing.T) {
	sched := []time.Duration{5 * time.Minute, 10 * time.Minute, 30 * time.Minute, time.Hour}
	q := &Queue{opts: Options{RetrySchedule: sched}}
	for attempts := 1; attempts <= 8; attempts++ {
		want := sched[min(attempts, len(sched))-1]
		for range 50 {
			got := q.backoff(attempts)
			if got < want || got >= want+want/10 {
				t.Fatalf("backoff(%d) = %v, want in [%v, %v)", attempts, got, want, want+want/10)
			}
		}
	}
	seen := map[time.Duration]bool{}
	for range 50 {
		seen[q.backoff(1)] = true
	}
	if len(seen) < 2 {
		t.Error("backoff has no jitter")
	}
}

func TestPermanentFailureFailsRecipientAndBouncesToSender(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(fail550)), Options{})
	e := env("alice@example.com", "bob@example.org")
	e.EnvID = "QQ+1" // smtpin hands it over xtext-decoded
	e.Recipients[0].ORcpt = "rfc822;bob@example.org"
	id := tq.enqueue(t, e)
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	if _, err := tq.Show(id); !errors.Is(err, ErrNotFound) {
		t.Errorf("failed message still queued: %v", err)
	}
	dsns := tq.dsnsTo(t, "alice@example.com")
	if len(dsns) != 1 {
		t.Fatalf("%d DSNs to the sender, want 1", len(dsns))
	}
	rep := parseDSN(t, tq.body(t, dsns[0]))
	if got := rep.header.Get("From"); got != "Mail Delivery System <postmaster@relay.test>" {
		t.Errorf("From: %q", got)
	}
	if got := rep.perMessage.Get("Reporting-MTA"); got != "dns; relay.test" {
		t.Errorf("Reporting-MTA: %q", got)
	}
	if got := rep.perMessage.Get("Original-Envelope-Id"); got != "QQ+1" {
		t.Errorf("Original-Envelope-Id: %q, want the ENVID", got)
	}
	if len(rep.recipients) != 1 {
		t.Fatalf("%d recipient blocks, want 1", len(rep.recipients))
	}
	r := rep.recipients[0]
	want := map[string]string{
		"Final-Recipient":    "rfc822; bob@example.org",
		"Original-Recipient": "rfc822;bob@example.org",
		"Action":             "failed",
		"Status":             "5.1.1",
		"Remote-MTA":         "dns; mx.example.org",
		"Diagnostic-Code":    "smtp; 550 5.1.1 <bob@example.org>: user unknown", // the reply as received (RFC 3464 §2.3.6)
	}
	for k, v := range want {
		if got := r.Get(k); got != v {
			t.Errorf("%s: %q, want %q", k, got, v)
		}
	}
	if _, err := time.Parse(rfc5322Date, r.Get("Last-Attempt-Date")); err != nil {
		t.Errorf("Last-Attempt-Date %q: %v", r.Get("Last-Attempt-Date"), err)
	}
	if r.Get("Will-Retry-Until") != "" {
		t.Error("a failure DSN carries Will-Retry-Until")
	}
	// No RET: headers only.
	if rep.contentType != "text/rfc822-headers" || !strings.Contains(rep.content, "Subject: lunch") || strings.Contains(rep.content, "See you at noon") {
		t.Errorf("returned content %q (%s), want the original headers only", rep.content, rep.contentType)
	}
	if !strings.Contains(rep.text, "<bob@example.org>: failed") {
		t.Errorf("human part does not name the recipient: %q", rep.text)
	}
	// The bounce goes out from the null sender, through this queue.
	if dsns[0].Envelope.From != "" || !dsns[0].Recipients[0].pending() {
		t.Errorf("DSN envelope %+v", dsns[0].Envelope)
	}
}

func TestBounceWithRetFullReturnsWholeMessage(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(fail550)), Options{})
	e := env("alice@example.com", "bob@example.org")
	e.Ret = "FULL"
	tq.enqueue(t, e)
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	dsns := tq.dsnsTo(t, "alice@example.com")
	if len(dsns) != 1 {
		t.Fatalf("%d DSNs, want 1", len(dsns))
	}
	rep := parseDSN(t, tq.body(t, dsns[0]))
	if rep.contentType != "message/rfc822" || rep.content != testBody {
		t.Errorf("returned %s %q, want message/rfc822 with the whole message", rep.contentType, rep.content)
	}
}

// A message above BounceSizeLimit comes back as its header section even
// with RET=FULL: a notice the sender's MX refuses for its size would be
// lost. The human-readable part says why.
func TestBounceWithRetFullAboveTheLimitReturnsHeaders(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(fail550)), Options{BounceSizeLimit: int64(len(testBody)) - 1})
	e := env("alice@example.com", "bob@example.org")
	e.Ret = "FULL"
	tq.enqueue(t, e)
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	dsns := tq.dsnsTo(t, "alice@example.com")
	if len(dsns) != 1 {
		t.Fatalf("%d DSNs, want 1", len(dsns))
	}
	rep := parseDSN(t, tq.body(t, dsns[0]))
	if rep.contentType != "text/rfc822-headers" || strings.Contains(rep.content, "See you at noon") {
		t.Errorf("returned %s %q, want the header section only", rep.contentType, rep.content)
	}
	if want := fmt.Sprintf("larger than %d bytes, so only its header section is attached", len(testBody)-1); !strings.Contains(rep.text, want) {
		t.Errorf("human part %q does not say %q", rep.text, want)
	}
}

func TestRequireTLSBounceCarriesFlagAndHeadersOnly(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(fail550)), Options{})
	e := env("alice@example.com", "bob@example.org")
	e.Ret, e.RequireTLS = "FULL", true
	tq.enqueue(t, e)
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	dsns := tq.dsnsTo(t, "alice@example.com")
	if len(dsns) != 1 || !dsns[0].Envelope.RequireTLS {
		t.Fatalf("want one DSN with REQUIRETLS, got %d", len(dsns))
	}
	if rep := parseDSN(t, tq.body(t, dsns[0])); rep.contentType != "text/rfc822-headers" {
		t.Errorf("REQUIRETLS bounce returns %s, want headers only (RFC 8689)", rep.contentType)
	}
}

func TestNullSenderNeverGetsABounce(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(fail550)), Options{})
	id := tq.enqueue(t, env("", "bob@example.org"))
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	if _, err := tq.Show(id); !errors.Is(err, ErrNotFound) {
		t.Errorf("failed bounce still queued: %v", err)
	}
	if p, _ := tq.List("", 0); len(p.Messages) != 0 {
		t.Errorf("a failed message from <> produced %d messages", len(p.Messages))
	}
}

func TestNotifyNeverAndSuccessOnlySuppressFailureDSN(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(fail550)), Options{})
	e := env("alice@example.com", "bob@example.org", "carol@example.org")
	e.Recipients[0].Notify = []string{"NEVER"}
	e.Recipients[1].Notify = []string{"SUCCESS"}
	tq.enqueue(t, e)
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	if n := len(tq.dsnsTo(t, "alice@example.com")); n != 0 {
		t.Errorf("%d DSNs despite NOTIFY=NEVER / NOTIFY=SUCCESS", n)
	}
}

// RFC 3461 §5.2.1, §5.2.2: a next hop that got NOTIFY sends the success
// notice; stsrelay sends "relayed" only when NOTIFY could not go further.
func TestNotifySuccessGetsRelayedDSNOnlyWhenNotPassedOn(t *testing.T) {
	relayed := ok250
	relayed.Relayed = true
	d := newScripted(func(job *Job) []Status { return []Status{ok250, relayed, ok250} })
	tq := newTestQueue(t, d, Options{})
	e := env("alice@example.com", "bob@example.org", "carol@example.org", "dave@example.org")
	e.Recipients[0].Notify = []string{"SUCCESS"}
	e.Recipients[1].Notify = []string{"SUCCESS", "FAILURE"}
	tq.enqueue(t, e)
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	dsns := tq.dsnsTo(t, "alice@example.com")
	if len(dsns) != 1 {
		t.Fatalf("%d DSNs, want 1", len(dsns))
	}
	rep := parseDSN(t, tq.body(t, dsns[0]))
	if len(rep.recipients) != 1 {
		t.Fatalf("%d recipient blocks, want carol's only (bob's next hop got NOTIFY and reports itself)", len(rep.recipients))
	}
	r := rep.recipients[0]
	if r.Get("Final-Recipient") != "rfc822; carol@example.org" || r.Get("Action") != "relayed" || r.Get("Status") != "2.0.0" {
		t.Errorf("recipient block %v, want carol relayed 2.0.0", r)
	}
	if got := rep.header.Get("Subject"); got != "Successful Mail Delivery Report" {
		t.Errorf("Subject %q", got)
	}
}

func TestExpiryFailsWith547AndNamesLastError(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(defer451)), Options{MaxQueueTime: 120 * time.Hour, RetrySchedule: []time.Duration{48 * time.Hour}, DelayNoticeAfter: 4 * time.Hour})
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	arrived := tq.clock.Now()
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	for range 2 {
		tq.clock.Advance(53 * time.Hour) // past each (jittered) 48h wait
		tq.wake()
		tq.waitJobs(t, 1)
		tq.settle(t)
	}
	// Third retry would be after the deadline, so it is moved onto it.
	mi := tq.show(t, id)
	if got, want := mi.Recipients[0].NextAttempt, arrived.Add(120*time.Hour); got == nil || !got.Equal(want) {
		t.Fatalf("last retry at %v, want the deadline %v", got, want)
	}
	tq.clock.Advance(20 * time.Hour)
	tq.wake()
	tq.waitJobs(t, 1)
	tq.settle(t)
	if _, err := tq.Show(id); !errors.Is(err, ErrNotFound) {
		t.Fatalf("expired message still queued: %v", err)
	}
	dsns := tq.dsnsTo(t, "alice@example.com")
	if len(dsns) != 2 { // a delay notice after 4h, then the bounce
		t.Fatalf("%d DSNs, want a delay notice and a bounce", len(dsns))
	}
	var bounce *report
	for _, m := range dsns {
		if r := parseDSN(t, tq.body(t, m)); r.recipients[0].Get("Action") == "failed" {
			bounce = r
		}
	}
	if bounce == nil {
		t.Fatal("no failure DSN")
	}
	r := bounce.recipients[0]
	if r.Get("Status") != "5.4.7" {
		t.Errorf("Status %q, want 5.4.7", r.Get("Status"))
	}
	// Expiry is our own decision: no remote reply, no Remote-MTA
	// (RFC 3464 §2.3.5, §2.3.6); the last error is in the text.
	wantDiag := "X-stsrelay; 554 5.4.7 delivery time expired after 5d; last error: 451 4.4.1 mx.example.org[192.0.2.1]: connection refused"
	if got := r.Get("Diagnostic-Code"); got != wantDiag {
		t.Errorf("Diagnostic-Code %q, want %q", got, wantDiag)
	}
	if got := r.Get("Remote-MTA"); got != "" {
		t.Errorf("Remote-MTA %q for a status of our own", got)
	}
}

func TestDelayNoticeIsSentOnceAfterDelayNoticeAfter(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(defer451)), Options{DelayNoticeAfter: time.Hour, RetrySchedule: []time.Duration{40 * time.Minute}})
	e := env("alice@example.com", "bob@example.org", "carol@example.org")
	e.Recipients[1].Notify = []string{"FAILURE"} // carol asked for no delay notice
	id := tq.enqueue(t, e)
	tq.run(t)
	for i := range 4 { // attempts at 0, ~45m, ~90m, ~135m
		if i > 0 {
			tq.clock.Advance(45 * time.Minute)
			tq.wake()
		}
		tq.waitJobs(t, 1)
		tq.settle(t)
		want := 0
		if i >= 2 {
			want = 1
		}
		if got := len(tq.dsnsTo(t, "alice@example.com")); got != want {
			t.Fatalf("after attempt %d: %d delay DSNs, want %d", i+1, got, want)
		}
	}
	rep := parseDSN(t, tq.body(t, tq.dsnsTo(t, "alice@example.com")[0]))
	if len(rep.recipients) != 1 || rep.recipients[0].Get("Final-Recipient") != "rfc822; bob@example.org" {
		t.Fatalf("delay DSN recipients %v, want bob only", rep.recipients)
	}
	r := rep.recipients[0]
	if r.Get("Action") != "delayed" || r.Get("Status") != "4.4.1" {
		t.Errorf("Action %q Status %q", r.Get("Action"), r.Get("Status"))
	}
	until, err := time.Parse(rfc5322Date, r.Get("Will-Retry-Until"))
	if want := tq.show(t, id).Created.Add(120 * time.Hour); err != nil || !until.Equal(want) {
		t.Errorf("Will-Retry-Until %q, want %v", r.Get("Will-Retry-Until"), want)
	}
	if rep.contentType != "text/rfc822-headers" {
		t.Errorf("delay notice returns %s", rep.contentType)
	}
}

func TestBusyDomainDoesNotHoldUpOthers(t *testing.T) {
	release := make(chan struct{})
	started := make(chan string, 10)
	d := newScripted(func(job *Job) []Status {
		started <- job.Domain
		if job.Domain == "slow.test" {
			<-release
		}
		return []Status{ok250}
	})
	tq := newTestQueue(t, d, Options{Workers: 3, MaxConnsPerDomain: 1})
	defer close(release)
	tq.enqueue(t, env("a@example.com", "x@slow.test"))
	tq.enqueue(t, env("a@example.com", "y@slow.test"))
	tq.enqueue(t, env("a@example.com", "z@fast.test"))
	tq.run(t)
	got := map[string]int{}
	for range 2 {
		select {
		case dom := <-started:
			got[dom]++
		case <-time.After(5 * time.Second):
			t.Fatalf("deliveries started: %v; fast.test waits behind slow.test", got)
		}
	}
	select {
	case dom := <-started:
		t.Fatalf("a third delivery (%s) started while slow.test is at its connection limit", dom)
	case <-time.After(100 * time.Millisecond):
	}
	if got["slow.test"] != 1 || got["fast.test"] != 1 {
		t.Errorf("started %v, want one each", got)
	}
}

func TestWorkersLimitDeliveriesInFlight(t *testing.T) {
	release := make(chan struct{})
	started := make(chan string, 10)
	d := newScripted(func(job *Job) []Status {
		started <- job.Domain
		<-release
		return []Status{ok250}
	})
	tq := newTestQueue(t, d, Options{Workers: 2, MaxConnsPerDomain: 5})
	for _, dom := range []string{"a.test", "b.test", "c.test"} {
		tq.enqueue(t, env("a@example.com", "x@"+dom))
	}
	tq.run(t)
	<-started
	<-started
	select {
	case dom := <-started:
		t.Fatalf("third delivery (%s) started with Workers=2", dom)
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	<-started
}

func TestDeliveryInterruptedByShutdownIsDueAtNextStart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	block := make(chan struct{})
	d := newScripted(func(job *Job) []Status { <-block; return []Status{defer451} })
	tq := openTestQueue(t, path, d, Options{ShutdownGrace: 10 * time.Millisecond})
	id := tq.enqueue(t, env("a@example.com", "b@example.org"))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- tq.Run(ctx) }()
	for {
		tq.mu.Lock()
		n := tq.sched.running
		tq.mu.Unlock()
		if n == 1 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	// The scripted deliverer ignores ctx; let it return once Run cancelled.
	time.Sleep(50 * time.Millisecond)
	close(block)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	tq.Close()
	tq.db.Close()

	d2 := newScripted(all(ok250))
	tq2 := openTestQueue(t, path, d2, Options{})
	if r := tq2.stored(t, id).Recipients[0]; r.State != StateQueued || r.Attempts != 0 || r.NextAttempt.After(tq2.clock.Now()) {
		t.Errorf("after the stop: %s, %d attempts, next attempt %v; want queued, no attempt counted, due now", r.State, r.Attempts, r.NextAttempt)
	}
	tq2.run(t)
	if j := tq2.waitJobs(t, 1)[0]; j.ID != id {
		t.Errorf("delivered %s, want %s", j.ID, id)
	}
}

// cutOff answers bob at once and holds carol's transfer until the stop
// cancels it, as delivery reports an interrupted attempt, with the cause.
type cutOff struct {
	started chan struct{}
	cause   chan error
}

func (c cutOff) Deliver(ctx context.Context, job *Job) []Status {
	close(c.started)
	<-ctx.Done()
	c.cause <- context.Cause(ctx)
	return []Status{ok250, {Code: 451, Enhanced: "4.4.2", Text: "mx.example.org[192.0.2.1]: delivery interrupted after DATA (" + context.Cause(ctx).Error() + ")"}}
}

// A deferral that a stop caused says nothing about the destination: the
// recipient is due at the next start, with no attempt counted, no step
// of the schedule, no delay notice and no expiry. What the attempt did
// settle is recorded.
func TestDeliveryCutOffByAStopIsDueAtTheNextStart(t *testing.T) {
	c := cutOff{started: make(chan struct{}), cause: make(chan error, 1)}
	tq := newTestQueue(t, nil, Options{ShutdownGrace: 10 * time.Millisecond, RetrySchedule: []time.Duration{4 * time.Hour},
		MaxQueueTime: time.Hour, DelayNoticeAfter: time.Minute})
	tq.Queue.opts.Deliverer = c
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org", "carol@example.org"))
	tq.clock.Advance(2 * time.Hour) // past the delay notice and the expiry
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- tq.Run(ctx) }()
	<-c.started
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// The delivery's log line says why it was cut off.
	if cause := <-c.cause; !errors.Is(cause, ErrStopping) {
		t.Errorf("the cut-off delivery's cause: %v, want ErrStopping", cause)
	}
	m := tq.stored(t, id)
	if r := m.Recipients[0]; r.State != StateDelivered {
		t.Errorf("bob, delivered before the stop: %s", r.State)
	}
	if r := m.Recipients[1]; r.State != StateQueued || r.Attempts != 0 || r.NextAttempt.After(tq.clock.Now()) {
		t.Errorf("carol, cut off by the stop: %s, %d attempts, next attempt in %v; want queued, no attempt counted, due at the next start",
			r.State, r.Attempts, r.NextAttempt.Sub(tq.clock.Now()).Round(time.Minute))
	}
	if n := len(tq.dsnsTo(t, "alice@example.com")); n != 0 {
		t.Errorf("%d DSNs for a delivery the stop cut off", n)
	}
}

func TestOpenDBExplainsLockedCorruptAndUnwritable(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "stsrelay.db")
	db, err := OpenDB(path)
	if err != nil {
		t.Fatal(err)
	}
	_, err = OpenDB(path)
	db.Close()
	if err == nil || err.Error() != "another stsrelay process holds "+path {
		t.Errorf("second open: %v", err)
	}

	junk := filepath.Join(dir, "junk.db")
	os.WriteFile(junk, []byte(strings.Repeat("this is not bbolt\n", 2000)), 0o600)
	if _, err := OpenDB(junk); err == nil || !strings.Contains(err.Error(), junk+" is not a stsrelay database") {
		t.Errorf("foreign file: %v", err)
	}

	if os.Geteuid() != 0 { // root ignores permissions
		ro := filepath.Join(dir, "ro")
		os.Mkdir(ro, 0o500)
		if _, err := OpenDB(filepath.Join(ro, "stsrelay.db")); err == nil || !strings.Contains(err.Error(), "permission denied") {
			t.Errorf("unwritable directory: %v", err)
		}
	}
}

func TestMixedOutcomesInOneTransactionAreRecordedPerRecipient(t *testing.T) {
	d := newScripted(func(job *Job) []Status {
		if job.Attempt == 1 {
			return []Status{ok250, defer451, fail550}
		}
		return all(ok250)(job)
	})
	tq := newTestQueue(t, d, Options{RetrySchedule: []time.Duration{time.Minute}})
	id := tq.enqueue(t, env("alice@example.com", "a@example.org", "b@example.org", "c@example.org"))
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	mi := tq.show(t, id)
	want := []State{StateDelivered, StateDeferred, StateFailed}
	for i, r := range mi.Recipients {
		if r.State != want[i] {
			t.Errorf("%s: %s, want %s", r.Address, r.State, want[i])
		}
	}
	if n := len(tq.dsnsTo(t, "alice@example.com")); n != 1 {
		t.Errorf("%d DSNs, want one bounce for c", n)
	}
	tq.clock.Advance(2 * time.Minute)
	tq.wake()
	j := tq.waitJobs(t, 1)[0]
	if len(j.Recipients) != 1 || j.Recipients[0].Addr != "b@example.org" || j.Attempt != 2 {
		t.Errorf("retry carried %v (attempt %d), want only b, attempt 2", j.Recipients, j.Attempt)
	}
	tq.settle(t)
	if _, err := tq.Show(id); !errors.Is(err, ErrNotFound) {
		t.Errorf("message still queued after its last recipient was delivered: %v", err)
	}
	// Only the bounce for c is left in the spool.
	dsns := tq.dsnsTo(t, "alice@example.com")
	if len(dsns) != 1 {
		t.Fatalf("%d bounces queued, want 1", len(dsns))
	}
	tq.spool.waitPunched()
	if n := spoolBodyBytes(t, tq.spool.dir); n != dsns[0].Size {
		t.Errorf("spool holds %d bytes of bodies, want only the bounce's %d", n, dsns[0].Size)
	}
}

func TestThrottleHoldsBackTheDomainsOtherMessages(t *testing.T) {
	var mu sync.Mutex
	inflight, most := map[string]int{}, map[string]int{}
	release := make(chan struct{})
	started := make(chan string, 20)
	d := newScripted(func(job *Job) []Status {
		mu.Lock()
		inflight[job.Domain]++
		most[job.Domain] = max(most[job.Domain], inflight[job.Domain])
		first := len(started) == 0 && job.Domain == "busy.test" && most["busy.test"] == 1
		mu.Unlock()
		if first {
			// The destination said "too many connections".
			job.Throttle(1, time.Hour)
		}
		started <- job.Domain
		<-release
		mu.Lock()
		inflight[job.Domain]--
		mu.Unlock()
		return all(ok250)(job)
	})
	tq := newTestQueue(t, d, Options{Workers: 10, MaxConnsPerDomain: 5})
	tq.enqueue(t, env("a@example.com", "x@busy.test"))
	tq.run(t)
	if dom := <-started; dom != "busy.test" {
		t.Fatalf("started %s", dom)
	}
	tq.enqueue(t, env("a@example.com", "y@busy.test"))
	tq.enqueue(t, env("a@example.com", "z@busy.test"))
	tq.enqueue(t, env("a@example.com", "w@other.test"))
	// other.test is not held back; busy.test's next waits for the first.
	select {
	case dom := <-started:
		if dom != "other.test" {
			t.Fatalf("%s started while busy.test is throttled to one delivery", dom)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("other.test did not start")
	}
	select {
	case dom := <-started:
		t.Fatalf("%s started while busy.test is throttled to one delivery", dom)
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	tq.waitJobs(t, 4)
	tq.settle(t)
	mu.Lock()
	defer mu.Unlock()
	if most["busy.test"] != 1 {
		t.Errorf("busy.test had %d deliveries at once after its throttle, want 1", most["busy.test"])
	}
}

func TestThrottleEnds(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(ok250)), Options{MaxConnsPerDomain: 5})
	tq.throttle("busy.test", 1, time.Hour)
	tq.mu.Lock()
	limited := tq.limitLocked("busy.test", tq.clock.Now())
	tq.mu.Unlock()
	tq.clock.Advance(time.Hour)
	tq.mu.Lock()
	after := tq.limitLocked("busy.test", tq.clock.Now())
	tq.mu.Unlock()
	if limited != 1 || after != 5 {
		t.Errorf("limit %d while throttled, %d after; want 1 and 5", limited, after)
	}
}

// The Deliverer computes its throttle signals in order but may hand them
// over out of it (each after its own lock), so a signal that raises the
// limit can arrive after one that lowered it further. The lower limit
// holds until its own expiry; the raised one then holds until its own.
func TestThrottleKeepsTheLowerOfSignalsArrivingOutOfOrder(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(ok250)), Options{MaxConnsPerDomain: 5})
	// limits is domain's limit now and at each of the next two hours.
	limits := func(domain string) []int {
		var got []int
		for range 3 {
			tq.mu.Lock()
			got = append(got, tq.limitLocked(domain, tq.clock.Now()))
			tq.mu.Unlock()
			tq.clock.Advance(time.Hour)
		}
		return got
	}
	tq.throttle("busy.test", 1, time.Hour)   // computed last, arrives first
	tq.throttle("busy.test", 2, 2*time.Hour) // computed first, arrives last
	tq.throttle("busy.test", 3, time.Hour)   // covered by both: changes nothing
	if got := limits("busy.test"); !slices.Equal(got, []int{1, 2, 5}) {
		t.Errorf("limits %v over three hours, want [1 2 5]: the lower until its expiry, then the longer", got)
	}

	// A lower limit for a shorter while, arriving last, does not cut short
	// the higher one already in force.
	tq.throttle("other.test", 3, 2*time.Hour)
	tq.throttle("other.test", 1, time.Hour)
	if got := limits("other.test"); !slices.Equal(got, []int{1, 3, 5}) {
		t.Errorf("limits %v over three hours, want [1 3 5]", got)
	}
}

// lockedBuffer is a log destination that tests read while the queue writes.
// A damaged record is named in the log when the queue runs, not while it
// is opened: a start that fails after opening the queue (a port in use)
// must end in one line (docs/DESIGN.md, "Start-up").
func TestDamagedRecordIsLoggedWhenTheQueueRuns(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	tq := openTestQueue(t, path, nil, Options{})
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	if err := tq.db.Update(func(tx *bbolt.Tx) error {
		return tx.Bucket(bucketMessages).Put([]byte(id), []byte("{not a record"))
	}); err != nil {
		t.Fatal(err)
	}
	tq.Close()
	tq.db.Close()

	var logs lockedBuffer
	tq = openTestQueue(t, path, nil, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if l := logs.String(); l != "" {
		t.Fatalf("opening the queue logged before it ran:\n%s", l)
	}
	tq.run(t)
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(logs.String(), "queue loaded") && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	l := logs.String()
	if !strings.Contains(l, "damaged message record, not scheduled") || !strings.Contains(l, "id="+id) || !strings.Contains(l, "damaged=1") {
		t.Errorf("Run's log does not name the damaged record %s:\n%s", id, l)
	}
}

// A record the queue cannot read (damaged, or written by a newer
// version) may share its segment with others: the start keeps every
// segment while one is there, so that the mended record finds its body.
// Before, the segment was swept away as an orphan, body and all.
func TestDamagedRecordKeepsItsSegment(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	tq := openTestQueue(t, path, nil, Options{})
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	var good []byte
	setRecord := func(v func([]byte) []byte) {
		t.Helper()
		if err := tq.db.Update(func(tx *bbolt.Tx) error {
			b := tx.Bucket(bucketMessages)
			if good == nil {
				good = slices.Clone(b.Get([]byte(id)))
			}
			return b.Put([]byte(id), v(good))
		}); err != nil {
			t.Fatal(err)
		}
	}
	setRecord(func(r []byte) []byte {
		v2 := bytes.Replace(r, []byte(`"v":1`), []byte(`"v":2`), 1)
		if bytes.Equal(v2, r) {
			t.Fatalf("record %s does not say its version as expected: %s", id, r)
		}
		return v2
	})
	tq.Close()
	tq.db.Close()

	tq = openTestQueue(t, path, nil, Options{})
	if tq.entryLocked(id) != nil {
		t.Fatal("a record of another version was indexed")
	}
	setRecord(func(r []byte) []byte { return r })
	tq.Close()
	tq.db.Close()

	tq = openTestQueue(t, path, nil, Options{})
	if got, err := tq.readBody(id, -1); err != nil || len(got) == 0 {
		t.Fatalf("the mended record's body: %d bytes, %v", len(got), err)
	}
}

// The index is keyed by queue ids: a record that is not under one, or not
// under its own, is reported as damaged and left for an operator rather
// than scheduled under a wrong name.
func TestRecordUnderNoQueueIDIsReportedDamaged(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	tq := openTestQueue(t, path, nil, Options{})
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	if err := tq.db.Update(func(tx *bbolt.Tx) error {
		b := tx.Bucket(bucketMessages)
		v := b.Get([]byte(id))
		short := bytes.Replace(v, []byte(`"id":"`+id+`"`), []byte(`"id":"short"`), 1)
		if bytes.Equal(short, v) {
			t.Fatalf("record %s does not hold its id as expected: %s", id, v)
		}
		if err := b.Put([]byte("short"), short); err != nil {
			return err
		}
		return b.Put([]byte(strings.Repeat("0", idLen)), slices.Clone(v))
	}); err != nil {
		t.Fatal(err)
	}
	tq.Close()
	tq.db.Close()

	var logs lockedBuffer
	d := newScripted(all(ok250))
	tq = openTestQueue(t, path, d, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	tq.run(t)
	if job := <-d.seen; job.ID != id {
		t.Errorf("delivered %s, want the one message indexed, %s", job.ID, id)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(logs.String(), "queue loaded") && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	l := logs.String()
	for _, want := range []string{"damaged=2", "messages=1", "id=short", "id=" + strings.Repeat("0", idLen), "not a queue id", "holds the id"} {
		if !strings.Contains(l, want) {
			t.Errorf("the log lacks %q:\n%s", want, l)
		}
	}
}

type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}
func (l *lockedBuffer) String() string { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

// The per-recipient lines are debug, except giving up, which is logged
// whatever the level.
func TestOutcomeLinesFollowTheLogLevel(t *testing.T) {
	for _, level := range []slog.Level{slog.LevelDebug, slog.LevelInfo} {
		var logs lockedBuffer
		tq := newTestQueue(t, newScripted(all(defer451)), Options{MaxQueueTime: 50 * time.Hour, RetrySchedule: []time.Duration{48 * time.Hour},
			Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: level}))})
		tq.enqueue(t, env("alice@example.com", "bob@example.org"))
		tq.run(t)
		tq.waitJobs(t, 1)
		tq.settle(t)
		tq.clock.Advance(53 * time.Hour)
		tq.wake()
		tq.waitJobs(t, 1)
		tq.settle(t)
		got := logs.String()
		if want := level == slog.LevelDebug; strings.Contains(got, `msg="recipients updated"`) != want ||
			want && !strings.Contains(got, "recipients=bob@example.org outcome=deferred") {
			t.Errorf("level %v: recipients updated lines %v, want %v:\n%s", level, !want, want, got)
		}
		if !strings.Contains(got, `msg="gave up: delivery time expired"`) || !strings.Contains(got, "recipients=bob@example.org outcome=expired") {
			t.Errorf("level %v: no gave up line for bob:\n%s", level, got)
		}
	}
}

// TestUpdateSharesTheGroupCommit: the other buckets of the database (the
// MTA-STS cache, TLSRPT) write through the queue's group commit, so a
// burst of them shares fsyncs instead of holding bbolt's writer in turn.
func TestUpdateSharesTheGroupCommit(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(ok250)), Options{})
	bucket := []byte("other.part")
	const n = 50
	lastTx := func() (id int) {
		tq.db.View(func(tx *bbolt.Tx) error { id = tx.ID(); return nil })
		return id
	}
	before := lastTx()
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			err := tq.Update(func(tx *bbolt.Tx) error {
				b, err := tx.CreateBucketIfNotExists(bucket)
				if err != nil {
					return err
				}
				return b.Put(fmt.Appendf(nil, "k%02d", i), []byte("v"))
			})
			if err != nil {
				t.Error(err)
			}
		})
	}
	close(start)
	wg.Wait()
	if txs := lastTx() - before; txs > n/5 {
		t.Errorf("%d concurrent writes took %d write transactions, want at most %d", n, txs, n/5)
	}
	tq.db.View(func(tx *bbolt.Tx) error {
		if b := tx.Bucket(bucket); b == nil || b.Stats().KeyN != n {
			t.Errorf("the bucket has not got the %d keys written", n)
		}
		return nil
	})

	// A write that fails is its own: nothing of it is kept, and the queue
	// goes on.
	errRefused := errors.New("refused")
	err := tq.Update(func(tx *bbolt.Tx) error {
		if err := tx.Bucket(bucket).Put([]byte("half"), []byte("v")); err != nil {
			return err
		}
		return errRefused
	})
	if !errors.Is(err, errRefused) {
		t.Fatalf("Update = %v, want its function's error", err)
	}
	tq.db.View(func(tx *bbolt.Tx) error {
		if tx.Bucket(bucket).Get([]byte("half")) != nil {
			t.Error("a failed Update left its write behind")
		}
		return nil
	})
	if _, err := tq.Enqueue(context.Background(), env("alice@example.com", "bob@example.org"), strings.NewReader(testBody)); err != nil {
		t.Fatalf("Enqueue after a failed Update: %v", err)
	}
	tq.Close()
	if err := tq.Update(func(*bbolt.Tx) error { return nil }); !errors.Is(err, ErrClosed) {
		t.Errorf("Update after Close = %v, want ErrClosed", err)
	}
}

// A body cut short on disk (something outside the queue truncated its
// segment) fails its reader: delivery defers instead of sending what is
// left as the whole message, and the message stays queued.
func TestBodyCutShortOnDiskIsNeverReadAsWhole(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	tq := openTestQueue(t, path, nil, Options{})
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	m := tq.stored(t, id)
	if m.BodyFile == "" {
		t.Fatal("the test body went to a file of its own, not a segment")
	}
	seg := tq.spool.path(m.BodyFile)
	tq.Close()
	tq.db.Close()
	if err := os.Truncate(seg, m.BodyOff+m.Size/2); err != nil {
		t.Fatal(err)
	}

	var readErr error
	d := newScripted(func(job *Job) []Status {
		rc, err := job.Open()
		if err == nil {
			_, err = io.ReadAll(rc)
			rc.Close()
		}
		readErr = err
		if err != nil {
			return all(Status{Code: 451, Enhanced: "4.3.0", Text: "reading the queued message: " + err.Error()})(job)
		}
		return all(ok250)(job)
	})
	tq = openTestQueue(t, path, d, Options{})
	tq.run(t)
	<-d.seen
	tq.settle(t)
	if readErr == nil || !strings.Contains(readErr.Error(), "bytes missing") {
		t.Errorf("reading the cut body: %v, want it to fail", readErr)
	}
	if tq.stored(t, id).Recipients[0].State == StateDelivered {
		t.Error("the cut message was recorded delivered")
	}
}

// A body cut short on disk still gets its sender a DSN when delivery
// fails for good: the notice returns what is left of the message, rather
// than stay owed for ever for want of the whole.
func TestBodyCutShortStillGetsItsDSN(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	tq := openTestQueue(t, path, nil, Options{})
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	m := tq.stored(t, id)
	seg := tq.spool.path(m.BodyFile)
	tq.Close()
	tq.db.Close()
	if err := os.Truncate(seg, m.BodyOff+m.Size/2); err != nil {
		t.Fatal(err)
	}
	tq = openTestQueue(t, path, newScripted(all(fail550)), Options{})
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	if dsns := tq.dsnsTo(t, "alice@example.com"); len(dsns) != 1 {
		t.Fatalf("%d DSNs, want 1", len(dsns))
	}
}

// A recipient's domain is the one IDNA lookups name (UTS #46 folds case
// itself): lower-casing first made "STRAẞE.de" straße.de, a domain of
// its own, where every other reader of the name finds strasse.de.
func TestRecipientDomainFoldsCaseAsIDNADoes(t *testing.T) {
	for in, want := range map[string]string{
		"a@Example.COM.":       "example.com",
		"a@Bücher.example":     "xn--bcher-kva.example",
		"a@STRAẞE.de":          "strasse.de",
		"a@straße.de":          "xn--strae-oqa.de",
		"a@[IPv6:2001:DB8::1]": "[ipv6:2001:db8::1]",
	} {
		if got, err := RecipientDomain(in); err != nil || got != want {
			t.Errorf("RecipientDomain(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}
