package queue

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"go.etcd.io/bbolt"
)

// RFC 3464 §2.3.5: Remote-MTA names the host that gave the reported
// status. A host that answered an earlier attempt is not it when the last
// status is our own decision (a null MX found later, say).
func TestRemoteMTAOnlyForTheAttemptThatGaveTheStatus(t *testing.T) {
	var calls atomic.Int32
	grey := Status{Code: 451, Enhanced: "4.7.1", Text: "mx.example.org[192.0.2.1]: 451 4.7.1 greylisted",
		RemoteMTA: "mx.example.org", Reply: "451 4.7.1 greylisted"}
	nullMX := Status{Code: 550, Enhanced: "5.1.10", Text: "example.org does not accept mail (null MX)"}
	d := newScripted(func(job *Job) []Status {
		if calls.Add(1) == 1 {
			return all(grey)(job)
		}
		return all(nullMX)(job)
	})
	tq := newTestQueue(t, d, Options{RetrySchedule: []time.Duration{time.Hour}})
	tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	tq.clock.Advance(2 * time.Hour)
	tq.wake()
	tq.waitJobs(t, 1)
	tq.settle(t)
	dsns := tq.dsnsTo(t, "alice@example.com")
	if len(dsns) != 1 {
		t.Fatalf("%d DSNs, want 1", len(dsns))
	}
	r := parseDSN(t, tq.body(t, dsns[0])).recipients[0]
	if got := r.Get("Remote-MTA"); got != "" {
		t.Errorf("Remote-MTA %q next to a status of our own", got)
	}
	if got, want := r.Get("Diagnostic-Code"), "X-stsrelay; 550 5.1.10 example.org does not accept mail (null MX)"; got != want {
		t.Errorf("Diagnostic-Code %q, want %q (not disguised as an smtp reply)", got, want)
	}
}

// RFC 6533: a DSN about an SMTPUTF8 message uses the global types and
// utf-8 address types, and says its body is 8-bit (RFC 6152).
func TestDSNForUTF8MessageUsesGlobalTypes(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(fail550)), Options{})
	e := env("alice@example.com", "jöran@example.org")
	e.SMTPUTF8 = true
	e.Recipients[0].ORcpt = "utf-8;jöran+x@example.org"
	tq.enqueue(t, e)
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	dsns := tq.dsnsTo(t, "alice@example.com")
	if len(dsns) != 1 {
		t.Fatalf("%d DSNs, want 1", len(dsns))
	}
	if dsns[0].Envelope.SMTPUTF8 || !dsns[0].Envelope.Body8Bit {
		t.Errorf("DSN envelope %+v, want BODY=8BITMIME and no SMTPUTF8 (its envelope is ASCII)", dsns[0].Envelope)
	}
	rep := parseDSN(t, tq.body(t, dsns[0]))
	if rep.statusType != "message/global-delivery-status" || rep.contentType != "message/global-headers" {
		t.Errorf("parts %q and %q, want message/global-delivery-status and message/global-headers", rep.statusType, rep.contentType)
	}
	r := rep.recipients[0]
	if got, want := r.Get("Final-Recipient"), "utf-8; jöran@example.org"; got != want {
		t.Errorf("Final-Recipient %q, want %q", got, want)
	}
	if got, want := r.Get("Original-Recipient"), `utf-8; jöran\x{2B}x@example.org`; got != want {
		t.Errorf("Original-Recipient %q, want %q (RFC 6533 utf-8-addr-unitext)", got, want)
	}

	// An ASCII message keeps the classic types.
	tq2 := newTestQueue(t, newScripted(all(fail550)), Options{})
	tq2.enqueue(t, env("alice@example.com", "bob@example.org"))
	tq2.run(t)
	tq2.waitJobs(t, 1)
	tq2.settle(t)
	rep = parseDSN(t, tq2.body(t, tq2.dsnsTo(t, "alice@example.com")[0]))
	if rep.statusType != "message/delivery-status" || rep.contentType != "text/rfc822-headers" {
		t.Errorf("ASCII DSN parts %q and %q", rep.statusType, rep.contentType)
	}
}

// A DSN to a UTF-8 sender needs SMTPUTF8 for its own envelope (RFC 6531).
func TestDSNToAUTF8SenderIsSMTPUTF8(t *testing.T) {
	e := env("jöran@example.com", "bob@example.org")
	e.SMTPUTF8 = true
	if dsn, _ := onlyDSN(t, fail550, e); !dsn.Envelope.SMTPUTF8 {
		t.Fatalf("DSN %+v, want it with SMTPUTF8", dsn)
	}
}

// onlyDSN queues a message of e whose delivery gets st, and returns the
// one DSN its sender gets, with its body.
func onlyDSN(t *testing.T, st Status, e Envelope) (*message, []byte) {
	t.Helper()
	return onlyDSNAbout(t, st, e, testBody)
}

// onlyDSNAbout is onlyDSN for a message of its own.
func onlyDSNAbout(t *testing.T, st Status, e Envelope, body string) (*message, []byte) {
	t.Helper()
	tq := newTestQueue(t, newScripted(all(st)), Options{})
	tq.enqueueBody(t, e, body)
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	dsns := tq.dsnsTo(t, e.From)
	if len(dsns) != 1 {
		t.Fatalf("%d DSNs, want 1", len(dsns))
	}
	return dsns[0], tq.body(t, dsns[0])
}

// A remote's long ASCII reply, cut short, leaves an ASCII report ASCII:
// the classic types, no 8-bit content (before, the cut's "…" made it a
// UTF-8 report that a sender's MX without 8BITMIME refused).
func TestLongASCIIReplyKeepsTheDSNSevenBit(t *testing.T) {
	long := fail550
	long.Reply = "550 5.7.1 " + strings.Repeat("policy text ", 120)
	long.Text = "mx.example.org[192.0.2.1]: " + long.Reply
	dsn, body := onlyDSN(t, long, env("alice@example.com", "bob@example.org"))
	rep := parseDSN(t, body)
	if !isASCII(string(body)) || dsn.Envelope.Body8Bit || rep.statusType != "message/delivery-status" || rep.header["Content-Transfer-Encoding"] != nil {
		t.Errorf("8-bit %v, BODY=8BITMIME %v, part 2 %q; want a 7-bit report of the classic types",
			!isASCII(string(body)), dsn.Envelope.Body8Bit, rep.statusType)
	}
	if d := rep.recipients[0].Get("Diagnostic-Code"); !strings.HasSuffix(d, "...") {
		t.Errorf("Diagnostic-Code %q, want it cut with an ASCII ellipsis", d)
	}
}

// A remote's UTF-8 text is cut at a character boundary, and makes the
// report a global one.
func TestDSNTruncationNeverCutsAUTF8Character(t *testing.T) {
	long := fail550
	long.Reply = "550 5.1.1 x" + strings.Repeat("é", 600) // an odd number of ASCII bytes before
	long.Text = "mx.example.org[192.0.2.1]: " + long.Reply
	_, body := onlyDSN(t, long, env("alice@example.com", "bob@example.org"))
	if !utf8.Valid(body) {
		t.Error("DSN is not valid UTF-8: a character was cut in half")
	}
	rep := parseDSN(t, body)
	if rep.statusType != "message/global-delivery-status" {
		t.Errorf("part 2 is %q, want message/global-delivery-status for UTF-8 diagnostic text", rep.statusType)
	}
	if d := rep.recipients[0].Get("Diagnostic-Code"); !strings.HasSuffix(d, "é...") {
		t.Errorf("Diagnostic-Code %q, want it cut after a whole character", d)
	}
}

func TestStatusStringIsCodeEnhancedAndText(t *testing.T) {
	for _, tc := range []struct {
		st   Status
		want string
	}{
		{Status{Code: 250, Enhanced: "2.0.0", Text: "mx[192.0.2.1]: 250 2.0.0 OK"}, "250 2.0.0 mx[192.0.2.1]: 250 2.0.0 OK"},
		{Status{Code: 451, Text: "no enhanced code"}, "451 no enhanced code"},
		{Status{}, "0 "},
		{Status{Code: -1, Enhanced: "4.4.2"}, "-1 4.4.2 "},
	} {
		if got := tc.st.String(); got != tc.want {
			t.Errorf("%+v.String() = %q, want %q", tc.st, got, tc.want)
		}
	}
}

// bobOKCarolFails accepts bob and refuses carol for good.
func bobOKCarolFails(job *Job) []Status {
	out := make([]Status, len(job.Recipients))
	for i, r := range job.Recipients {
		out[i] = ok250
		if strings.HasPrefix(r.Addr, "carol@") {
			out[i] = fail550
		}
	}
	return out
}

// fullSpool is a queue whose spool is a small tmpfs, full once a message
// to bob and carol is queued; its database lives elsewhere and commits.
// It needs root (mountTmpfs).
func fullSpool(t *testing.T, logs *lockedBuffer) (tq *testQueue, id string, free func()) {
	t.Helper()
	spool := mountTmpfs(t, 256<<10)
	tq = openTestQueue(t, filepath.Join(t.TempDir(), "stsrelay.db"), newScripted(bobOKCarolFails),
		Options{Dir: spool, RetrySchedule: []time.Duration{time.Minute}, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	id = tq.enqueue(t, env("alice@example.com", "bob@example.org", "carol@example.org"))
	free = fillUp(t, spool)
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	return tq, id, free
}

// ROOT ONLY: mounts a tmpfs. A DSN that cannot be written (the spool's
// file system is full) leaves the notice owed on the record: the
// outcome stands, and bob, who has the message, does not get it again.
func TestDSNThatCannotBeWrittenNeverResendsToDeliveredRecipients(t *testing.T) {
	var logs lockedBuffer
	tq, id, _ := fullSpool(t, &logs)
	for range 3 {
		tq.clock.Advance(2 * time.Minute)
		tq.wake()
		time.Sleep(50 * time.Millisecond)
		tq.settle(t)
	}
	if n := len(tq.d.seen); n != 0 {
		t.Errorf("the message went out %d more times", n)
	}
	m := tq.stored(t, id)
	if bob, carol := m.Recipients[0], m.Recipients[1]; bob.State != StateDelivered || carol.State != StateFailed || carol.NoticeOwed != "failed" {
		t.Errorf("bob %s, carol %s with notice owed %q; want delivered, and failed with a failure notice owed", bob.State, carol.State, carol.NoticeOwed)
	}
	if n := len(tq.dsnsTo(t, "alice@example.com")); n != 0 {
		t.Errorf("%d DSNs queued on a full disk", n)
	}
	if n := strings.Count(logs.String(), "cannot write a DSN"); n != 1 {
		t.Errorf("%d log lines about the DSN over three passes, want 1:\n%s", n, logs.String())
	}
}

// ROOT ONLY: mounts a tmpfs. Once space returns, the owed DSN is queued,
// the original leaves the queue, and no file is left behind.
func TestOwedDSNIsQueuedOnceSpaceReturns(t *testing.T) {
	var logs lockedBuffer
	tq, id, free := fullSpool(t, &logs)
	free()
	tq.clock.Advance(2 * time.Minute)
	tq.wake()
	deadline := time.Now().Add(10 * time.Second)
	var dsns []*message
	for len(dsns) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
		dsns = tq.dsnsTo(t, "alice@example.com")
	}
	if len(dsns) != 1 {
		t.Fatalf("%d DSNs once space returned, want 1:\n%s", len(dsns), logs.String())
	}
	rep := parseDSN(t, tq.body(t, dsns[0]))
	if len(rep.recipients) != 1 || rep.recipients[0].Get("Final-Recipient") != "rfc822; carol@example.org" || rep.recipients[0].Get("Action") != "failed" {
		t.Errorf("DSN recipients %v, want carol failed", rep.recipients)
	}
	if _, err := tq.Show(id); !errors.Is(err, ErrNotFound) {
		t.Errorf("the original is still queued once its DSN is: %v", err)
	}
	tq.settle(t)
	if n := len(tq.d.seen); n != 0 {
		t.Errorf("the message went out %d more times", n)
	}
	names, _ := os.ReadDir(tq.spool.dir)
	for _, e := range names {
		if !strings.HasPrefix(e.Name(), batchPrefix) && e.Name() != dsns[0].ID {
			t.Errorf("spool file %s left behind", e.Name())
		}
	}
}

// ROOT ONLY: mounts a tmpfs. An operator's bounce on a full disk stands:
// the recipients fail and the DSN is owed, and queued at the next start
// once there is space again.
func TestBounceOnAFullDiskStandsAndItsDSNFollowsAfterARestart(t *testing.T) {
	spool := mountTmpfs(t, 256<<10)
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	tq := openTestQueue(t, path, newScripted(all(defer451)), Options{Dir: spool})
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org", "carol@example.org"))
	free := fillUp(t, spool)
	if n, err := tq.Bounce(id); n != 2 || err != nil {
		t.Fatalf("bounce on a full disk: %d recipients, %v; want 2, no error", n, err)
	}
	for _, r := range tq.stored(t, id).Recipients {
		if r.State != StateFailed || r.NoticeOwed != "failed" {
			t.Errorf("%s after the bounce: %s, notice owed %q; want failed, with its notice owed", r.Addr, r.State, r.NoticeOwed)
		}
	}
	tq.Close()
	tq.db.Close()
	free()

	tq = openTestQueue(t, path, newScripted(all(defer451)), Options{Dir: spool})
	tq.run(t)
	deadline := time.Now().Add(10 * time.Second)
	for len(tq.dsnsTo(t, "alice@example.com")) == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	dsns := tq.dsnsTo(t, "alice@example.com")
	if len(dsns) != 1 {
		t.Fatalf("%d DSNs after the restart, want 1", len(dsns))
	}
	if rep := parseDSN(t, tq.body(t, dsns[0])); len(rep.recipients) != 2 {
		t.Errorf("the DSN names %d recipients, want bob and carol", len(rep.recipients))
	}
	if _, err := tq.Show(id); !errors.Is(err, ErrNotFound) {
		t.Errorf("the bounced message is still queued once its DSN is: %v", err)
	}
}

// A stop does not wait for every DSN owed: after a long full disk there
// may be thousands, and writing them all would run far past the grace.
// The ones not written when the grace ends stay owed, on disk, and the
// next start queues them.
func TestDSNsStillOwedWhenAStopsGraceEndsAreQueuedAtTheNextStart(t *testing.T) {
	const n = 50
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	tq := openTestQueue(t, path, newScripted(all(defer451)), Options{ShutdownGrace: 50 * time.Millisecond})
	var ids []string
	for range n {
		ids = append(ids, tq.enqueue(t, env("alice@example.com", "bob@example.org")))
	}
	// The disk is full: the bounce stands, and its DSNs are owed.
	tq.spool.mu.Lock()
	tq.spool.fsync = func(*os.File) error { return syscall.ENOSPC }
	tq.spool.mu.Unlock()
	if res, err := tq.Select("bounce", Selector{All: true}, true); err != nil || res.Messages != n {
		t.Fatalf("bounce -all: %+v, %v", res, err)
	}
	// Space returns, on a slow disk: each DSN takes a while to write, and
	// all of them would take 20 seconds.
	writing := make(chan struct{}, n)
	tq.spool.mu.Lock()
	tq.spool.fsync = func(f *os.File) error {
		writing <- struct{}{}
		time.Sleep(400 * time.Millisecond)
		return f.Sync()
	}
	tq.spool.mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- tq.Run(ctx) }()
	select {
	case <-writing:
	case <-time.After(10 * time.Second):
		t.Fatal("the owed DSNs were not tried")
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run went on writing DSNs long after the stop's grace")
	}
	tq.Close()
	tq.db.Close()

	tq = openTestQueue(t, path, newScripted(all(defer451)), Options{})
	written, owing := len(tq.dsnsTo(t, "alice@example.com")), 0
	tq.db.View(func(tx *bbolt.Tx) error {
		for _, id := range ids {
			if m, err := getMessage(tx, id); err == nil && m != nil && m.owesNotice() {
				owing++ // a message whose DSN was queued has left
			}
		}
		return nil
	})
	if written+owing != n || owing < n/2 {
		t.Fatalf("after the stop: %d DSNs queued, %d still owed; want all %d accounted for, most still owed", written, owing, n)
	}
	tq.run(t)
	eventually(t, "the owed DSNs", func() bool { return len(tq.dsnsTo(t, "alice@example.com")) == n })
	for _, id := range ids {
		if _, err := tq.Show(id); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s is still queued once its DSN is: %v", id, err)
		}
	}
}

// A DSN that returns an 8-bit message whole (RET=FULL) needs 8BITMIME at
// the sender's MX; SevenBitDSN makes the same notice 7-bit for one
// without it, the message still whole (RFC 6532 §3.7: message/global may
// be quoted-printable; message/rfc822 may not).
func TestSevenBitDSNKeepsTheWholeMessage(t *testing.T) {
	e := env("alice@example.com", "bob@example.org")
	e.Ret = "FULL"
	original := "From: alice@example.com\r\nTo: bob@example.org\r\nSubject: Grüße\r\n\r\n" +
		"Grüße aus Köln\r\n" + strings.Repeat("é", 450) + "\r\n.leading dot\r\n"
	dsn, raw := onlyDSNAbout(t, fail550, e, original)
	if env := dsn.Envelope; !env.Body8Bit || !env.OwnDSN {
		t.Fatalf("DSN envelope %+v, want an own DSN with 8-bit content", env)
	}
	eight := parseDSN(t, raw)
	if eight.contentType != "message/rfc822" || eight.content != original {
		t.Fatalf("the DSN returns %q as %q, want the whole message as message/rfc822", eight.content, eight.contentType)
	}

	seven, err := SevenBitDSN(raw)
	if err != nil {
		t.Fatal(err)
	}
	if !isASCII(string(seven)) {
		t.Error("the re-encoded DSN has 8-bit octets")
	}
	for _, l := range strings.Split(string(seven), "\r\n") {
		if len(l) > 998 { // RFC 5321 §4.5.3.1.6; the 900-octet line of é is 2,700 encoded
			t.Errorf("line of %d octets: %q", len(l), l)
		}
	}
	got := parseDSN(t, seven) // parts decoded
	if got.contentType != "message/global" || got.content != original {
		t.Errorf("returns %q as %q, want the whole message as message/global", got.content, got.contentType)
	}
	// RFC 2045 §6.4: the 8-bit multipart says so, the 7-bit one does not.
	if eight.header.Get("Content-Transfer-Encoding") != "8bit" || got.header["Content-Transfer-Encoding"] != nil {
		t.Errorf("Content-Transfer-Encoding %q, re-encoded %q; want 8bit, then none", eight.header["Content-Transfer-Encoding"], got.header["Content-Transfer-Encoding"])
	}
	delete(eight.header, "Content-Transfer-Encoding")
	if got.text != eight.text || got.statusType != eight.statusType || !reflect.DeepEqual(got.recipients, eight.recipients) ||
		!reflect.DeepEqual(got.header, eight.header) {
		t.Errorf("the notice changed beyond its encoding:\n%+v\nwas\n%+v", got, eight)
	}
}

// A report in UTF-8 (a remote's UTF-8 reply) about an ASCII message gets
// its text and global status part quoted-printable; the ASCII headers
// returned stay as they were.
func TestSevenBitDSNEncodesOnlyThe8BitParts(t *testing.T) {
	st := fail550
	st.Reply = "550 5.1.1 Empfänger unbekannt"
	st.Text = "mx.example.org[192.0.2.1]: " + st.Reply
	dsn, raw := onlyDSN(t, st, env("alice@example.com", "bob@example.org"))
	if !dsn.Envelope.Body8Bit {
		t.Fatal("a DSN with a UTF-8 reply is 7-bit; the test needs an 8-bit one")
	}
	seven, err := SevenBitDSN(raw)
	if err != nil {
		t.Fatal(err)
	}
	if !isASCII(string(seven)) {
		t.Error("the re-encoded DSN has 8-bit octets")
	}
	if n := strings.Count(string(seven), "Content-Transfer-Encoding: quoted-printable"); n != 2 {
		t.Errorf("%d parts quoted-printable, want 2 (the text and the status)", n)
	}
	was, got := parseDSN(t, raw), parseDSN(t, seven)
	if got.contentType != was.contentType || got.content != was.content || got.text != was.text ||
		got.recipients[0].Get("Diagnostic-Code") != "smtp; "+st.Reply {
		t.Errorf("re-encoded DSN %+v, want %+v but 7-bit", got, was)
	}
}

// An ASCII DSN comes back byte for byte: header section, preamble, parts
// and the closing boundary.
func TestSevenBitDSNLeavesASCIIAlone(t *testing.T) {
	dsn, raw := onlyDSN(t, fail550, env("alice@example.com", "bob@example.org"))
	if dsn.Envelope.Body8Bit {
		t.Fatal("an ASCII DSN is 8-bit; the test needs a 7-bit one")
	}
	seven, err := SevenBitDSN(raw)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(seven, raw) {
		t.Errorf("an ASCII DSN changed:\n%s\nwas\n%s", seven, raw)
	}
}

func TestSevenBitDSNRefusesWhatIsNoDSNOrCannotBeEncoded(t *testing.T) {
	report := "Content-Type: multipart/report; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b\r\n"
	for _, tc := range []struct{ in, want string }{
		{report + "Content-Type: multipart/mixed; boundary=c\r\n\r\n--c\r\n\r\nGrüße\r\n--c--\r\n--b--\r\n", "8-bit multipart/mixed part"}, // RFC 2045 §6.4
		{report + "Content-Type: message/partial\r\n\r\nGrüße\r\n--b--\r\n", "8-bit message/partial part"},
		{report + "Content-Type: text/plain\r\n\r\nGrüße b\r\n--b--\r\n", "holds the DSN's boundary"},
		{"Subject: hi\r\n\r\nGrüße\r\n", "not a DSN"},
		{"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nGrüße\r\n--b--\r\n", "not a DSN"},
		{"Content-Type: multipart/report; boundary=b\r\n\r\nno parts at all\r\n", "no body part"},
		{"Subject: Grüße\r\nContent-Type: multipart/report; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n", "ASCII header section"},
		{"no header section", "ASCII header section"},
	} {
		if out, err := SevenBitDSN([]byte(tc.in)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("SevenBitDSN(%q) = %q, %v; want an error saying %q", tc.in, out, err, tc.want)
		}
	}
}
