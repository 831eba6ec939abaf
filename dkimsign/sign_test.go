package dkimsign

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"testing/iotest"

	"github.com/emersion/go-msgauth/dkim"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/stsrelay/stsrelay/queue"
)

// reader is the Deliverer behind the signer: it reads what delivery would
// send.
type reader struct{ got string }

func (r *reader) Deliver(_ context.Context, job *queue.Job) []queue.Status {
	rc, err := job.Open()
	if err != nil {
		return []queue.Status{{Code: 451, Text: err.Error()}}
	}
	defer rc.Close()
	b, _ := io.ReadAll(rc)
	r.got = string(b)
	return []queue.Status{{Code: 250}}
}

func job(from, msg string) *queue.Job {
	return &queue.Job{ID: "q1", Envelope: queue.Envelope{From: from},
		Open: func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader(msg)), nil }}
}

func deliver(t *testing.T, s *Signer, j *queue.Job) string {
	t.Helper()
	r := &reader{}
	if st := s.Wrap(r).Deliver(context.Background(), j); st[0].Code != 250 {
		t.Fatalf("status %+v", st)
	}
	return r.got
}

func edKey(t *testing.T, domain, selector string) (Key, func(string) ([]string, error)) {
	pub, priv, _ := ed25519.GenerateKey(rand.Reader)
	txt := "v=DKIM1; k=ed25519; p=" + b64(pub)
	return Key{Domain: domain, Selector: selector, Signer: priv}, func(name string) ([]string, error) {
		if name == selector+"._domainkey."+domain {
			return []string{txt}, nil
		}
		return nil, errors.New("no such record: " + name)
	}
}

const msg = "From: <a@example.com>\r\nTo: <b@example.net>\r\nSubject: hi\r\n\r\nbody\r\n"

func TestSignsAndVerifies(t *testing.T) {
	k, lookup := edKey(t, "example.com", "s1")
	s, err := New(Options{Keys: []Key{k}})
	if err != nil {
		t.Fatal(err)
	}
	before := testutil.ToFloat64(metricSigned.WithLabelValues("signed"))
	got := deliver(t, s, job("a@example.com", msg))
	if testutil.ToFloat64(metricSigned.WithLabelValues("signed")) != before+1 {
		t.Error("the signature was not counted")
	}
	vs, err := dkim.VerifyWithOptions(strings.NewReader(got), &dkim.VerifyOptions{LookupTXT: lookup})
	if err != nil || len(vs) != 1 || vs[0].Err != nil {
		t.Fatalf("verify: %v %+v\n%s", err, vs, got)
	}
	if !strings.HasSuffix(got, msg) {
		t.Errorf("the message changed:\n%s", got)
	}
	h := strings.SplitN(got, "\r\n\r\n", 2)[0]
	if !strings.Contains(strings.ReplaceAll(h, "\r\n ", ""), "h=From:From:To:To:Cc:Cc:Subject:Subject:") {
		t.Errorf("From, To, Cc and Subject are not oversigned:\n%s", h)
	}
	// A second Subject, To or From added on the way, above the first
	// where mail programs show it, breaks the signature.
	sig, rest, _ := strings.Cut(got, "From: ")
	for _, added := range []string{"Subject: PAY NOW\r\n", "To: <victim@example.org>\r\n", "From: <ceo@example.com>\r\n"} {
		forged := sig + added + "From: " + rest
		vs, err := dkim.VerifyWithOptions(strings.NewReader(forged), &dkim.VerifyOptions{LookupTXT: lookup})
		if err == nil && len(vs) == 1 && vs[0].Err == nil {
			t.Errorf("the signature still verifies with %q added", added)
		}
	}
}

func TestLeavesAlone(t *testing.T) {
	k, _ := edKey(t, "example.com", "s1")
	var logs bytes.Buffer
	s, _ := New(Options{Keys: []Key{k}, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	presigned := "DKIM-Signature: v=1; a=ed25519-sha256; d=Example.COM;\r\n s = s1 ; b=abc; bh=def; h=from\r\n" + msg
	// warn: the message, not the keys, is why, and MAIL FROM's domain has
	// a key, so the operator hears of it.
	for name, tc := range map[string]struct {
		j    *queue.Job
		warn bool
	}{
		"null sender":                 {j: job("", msg)},
		"tls report":                  {j: &queue.Job{ID: "q", Envelope: queue.Envelope{From: "r@example.com", TLSReport: true}, Open: job("", msg).Open}},
		"other domain":                {j: job("a@example.com", strings.Replace(msg, "a@example.com", "a@example.community", 1))},
		"no From":                     {j: job("a@example.com", "Subject: x\r\n\r\nbody\r\n"), warn: true},
		"no From, other MAIL":         {j: job("a@example.org", "Subject: x\r\n\r\nbody\r\n")},
		"two From fields":             {j: job("a@example.com", "From: a@example.com\r\n"+msg), warn: true},
		"two From addresses":          {j: job("a@example.com", strings.Replace(msg, "<a@example.com>", "<a@example.com>, <c@example.com>", 1)), warn: true},
		"unparsable From":             {j: job("a@example.com", strings.Replace(msg, "<a@example.com>", "<<a@@example.com", 1)), warn: true},
		"body without the empty line": {j: job("a@example.com", "From: <a@example.com>\r\nSubject: hi\r\nbody\r\n"), warn: true},
		"already signed":              {j: job("a@example.com", presigned)},
		"header section only":         {j: job("a@example.com", "To: x@example.net\r\n"), warn: true},
	} {
		logs.Reset()
		before := testutil.ToFloat64(metricSigned.WithLabelValues("unsignable"))
		want := ""
		if tc.j.Open != nil {
			rc, _ := tc.j.Open()
			b, _ := io.ReadAll(rc)
			want = string(b)
		}
		if got := deliver(t, s, tc.j); got != want {
			t.Errorf("%s: changed to\n%s", name, got)
		}
		warned := strings.Contains(logs.String(), "level=WARN")
		counted := testutil.ToFloat64(metricSigned.WithLabelValues("unsignable")) - before
		if warned != tc.warn || (counted == 1) != tc.warn {
			t.Errorf("%s: warned %v, counted %v; want %v\n%s", name, warned, counted, tc.warn, logs.String())
		}
	}
}

func TestSignsOnlyFromAddressesTheLoginMayUse(t *testing.T) {
	k, lookup := edKey(t, "example.com", "s1")
	var logs bytes.Buffer
	var asked []string
	s, _ := New(Options{Keys: []Key{k}, Logger: slog.New(slog.NewTextHandler(&logs, nil)),
		SenderAllowed: func(user, address string) bool {
			asked = append(asked, user+" "+address)
			return user == "ceo" && address == "ceo@example.com"
		}})
	spoof := "From: CEO <ceo@example.com>\r\nTo: <b@example.net>\r\nSubject: wire\r\n\r\nbody\r\n"
	asLogin := func(user string) *queue.Job {
		j := job("webapp@app.test", spoof)
		j.Envelope.User = user
		return j
	}
	before := testutil.ToFloat64(metricSigned.WithLabelValues("not_allowed"))
	if got := deliver(t, s, asLogin("webapp")); got != spoof {
		t.Errorf("signed for a login not allowed to send as ceo@example.com:\n%s", got)
	}
	if testutil.ToFloat64(metricSigned.WithLabelValues("not_allowed")) != before+1 {
		t.Error("the refusal was not counted")
	}
	if l := logs.String(); !strings.Contains(l, "level=WARN") || !strings.Contains(l, "user=webapp") || !strings.Contains(l, "header_from=ceo@example.com") {
		t.Errorf("log: %s", l)
	}
	if len(asked) != 1 || asked[0] != "webapp ceo@example.com" {
		t.Errorf("SenderAllowed asked %q, want the login and the From: address", asked)
	}

	verified := func(msg string) bool {
		vs, err := dkim.VerifyWithOptions(strings.NewReader(msg), &dkim.VerifyOptions{LookupTXT: lookup})
		return err == nil && len(vs) == 1 && vs[0].Err == nil
	}
	if got := deliver(t, s, asLogin("ceo")); !verified(got) {
		t.Errorf("not signed for a login allowed to send as ceo@example.com:\n%s", got)
	}
	// A trusted network has no login and may send as anyone.
	if got := deliver(t, s, asLogin("")); !verified(got) {
		t.Errorf("not signed for a trusted network:\n%s", got)
	}
	// Without the rule to check against, no login's mail is signed.
	s, _ = New(Options{Keys: []Key{k}})
	if got := deliver(t, s, asLogin("ceo")); got != spoof {
		t.Errorf("signed a login's mail without SenderAllowed:\n%s", got)
	}
}

// TestSignsFromWithEncodedWordsInAnyCharset: only the address picks the
// key, so a display name in a charset Go cannot decode must not leave
// the message unsigned (and failing DMARC).
func TestSignsFromWithEncodedWordsInAnyCharset(t *testing.T) {
	k, lookup := edKey(t, "example.com", "s1")
	s, _ := New(Options{Keys: []Key{k}})
	for _, from := range []string{
		"=?windows-1252?Q?Jos=E9_Garc=EDa?= <a@example.com>",
		"=?ISO-2022-JP?B?GyRCOzNFRBsoQg==?= <a@example.com>",
		"=?koi8-r?B?5M3J1NLJyg==?= <a@example.com>",
		"=?GB2312?B?1tDOxA==?= <a@example.com>",
		"=?utf-8?Q?Jos=C3=A9?= <a@example.com>",
		"a@example.com (=?windows-1251?B?wuvg5Ojs6PA=?=)",
	} {
		m := strings.Replace(msg, "<a@example.com>", from, 1)
		got := deliver(t, s, job("a@example.com", m))
		vs, err := dkim.VerifyWithOptions(strings.NewReader(got), &dkim.VerifyOptions{LookupTXT: lookup})
		if err != nil || len(vs) != 1 || vs[0].Err != nil || vs[0].Domain != "example.com" {
			t.Errorf("From: %s: verify %v %+v\n%s", from, err, vs, got)
		}
	}
}

// failing is a key whose every signature fails, like an HSM that went
// away.
type failing struct{ crypto.Signer }

func (failing) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) {
	return nil, errors.New("key unavailable")
}

func TestFailingKeySendsUnsigned(t *testing.T) {
	k, _ := edKey(t, "example.com", "s1")
	k.Signer = failing{k.Signer}
	var logs bytes.Buffer
	s, _ := New(Options{Keys: []Key{k}, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	before := testutil.ToFloat64(metricSigned.WithLabelValues("failed"))
	if got := deliver(t, s, job("a@example.com", msg)); got != msg {
		t.Errorf("sent\n%s\nwant the message unchanged", got)
	}
	if testutil.ToFloat64(metricSigned.WithLabelValues("failed")) != before+1 {
		t.Error("the failure was not counted")
	}
	if !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "key unavailable") {
		t.Errorf("log: %s", logs.String())
	}
}

func TestClosestKeyWins(t *testing.T) {
	parent, _ := edKey(t, "example.com", "p")
	child, _ := edKey(t, "mail.example.com", "c")
	s, err := New(Options{Keys: []Key{parent, child}})
	if err != nil {
		t.Fatal(err)
	}
	for from, want := range map[string]string{"a@mail.example.com": "c", "a@x.mail.example.com": "c", "a@example.com": "p", "a@other.example.com": "p"} {
		if ks := s.keysFor(from[2:]); len(ks) != 1 || ks[0].Selector != want {
			t.Errorf("%s: keys %+v, want selector %s alone", from, ks, want)
		}
	}
	if _, err := New(Options{Keys: []Key{parent, parent}}); err == nil {
		t.Error("the same key twice was accepted")
	}
}

// A From: in U-labels (RFC 6532 mail) finds the key of its A-labels.
func TestInternationalisedFromDomainFindsItsKey(t *testing.T) {
	k, lookup := edKey(t, "xn--bcher-kva.example", "s1")
	s, err := New(Options{Keys: []Key{k}})
	if err != nil {
		t.Fatal(err)
	}
	m := "From: <a@Bücher.example>\r\nTo: <b@example.net>\r\nSubject: hi\r\n\r\nbody\r\n"
	got := deliver(t, s, job("a@bücher.example", m))
	vs, err := dkim.VerifyWithOptions(strings.NewReader(got), &dkim.VerifyOptions{LookupTXT: lookup})
	if err != nil || len(vs) != 1 || vs[0].Err != nil || vs[0].Domain != "xn--bcher-kva.example" {
		t.Fatalf("verify: %v %+v\n%s", err, vs, got)
	}
}

// Every key of the domain signs: an RSA key beside an Ed25519 one, since
// a receiver that does not know ed25519-sha256 (RFC 8463) takes its
// signature for none. A key whose signature the message carries already
// does not sign again.
func TestEveryKeyOfTheDomainSigns(t *testing.T) {
	ed, edLookup := edKey(t, "example.com", "ed")
	rsaPriv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&rsaPriv.PublicKey)
	rsaTXT := "v=DKIM1; k=rsa; p=" + b64(der)
	lookup := func(name string) ([]string, error) {
		if name == "rs._domainkey.example.com" {
			return []string{rsaTXT}, nil
		}
		return edLookup(name)
	}
	s, err := New(Options{Keys: []Key{ed, {Domain: "example.com", Selector: "rs", Signer: rsaPriv}}})
	if err != nil {
		t.Fatal(err)
	}
	got := deliver(t, s, job("a@example.com", msg))
	vs, err := dkim.VerifyWithOptions(strings.NewReader(got), &dkim.VerifyOptions{LookupTXT: lookup})
	if err != nil || len(vs) != 2 || vs[0].Err != nil || vs[1].Err != nil {
		t.Fatalf("verify: %v %+v\n%s", err, vs, got)
	}
	again := deliver(t, s, job("a@example.com", got))
	if n := strings.Count(again, "DKIM-Signature:"); n != 2 {
		t.Errorf("%d signatures after a second pass, want the 2 already there", n)
	}
}

func TestReadHeaderIsBounded(t *testing.T) {
	long := "From: <a@example.com>\r\nX: " + strings.Repeat("y", maxHeaderBytes) + "\r\n\r\nbody\r\n"
	if _, _, err := readHeader(strings.NewReader(long)); !errors.Is(err, errHeaderTooLarge) {
		t.Errorf("err = %v, want errHeaderTooLarge", err)
	}
	h, ended, err := readHeader(strings.NewReader(msg))
	if err != nil || !ended || string(h) != strings.SplitN(msg, "\r\n\r\n", 2)[0]+"\r\n\r\n" {
		t.Errorf("header %q, ended %v, %v", h, ended, err)
	}
}

// A message of header fields only (RFC 5322 §3.5: the body and the
// empty line before it may go) is signed, and goes out with the empty
// line the signer needs to find the header's end.
func TestMessageWithoutABodyIsSigned(t *testing.T) {
	k, lookup := edKey(t, "example.com", "s1")
	s, err := New(Options{Keys: []Key{k}})
	if err != nil {
		t.Fatal(err)
	}
	headersOnly := "From: <a@example.com>\r\nSubject: x\r\n"
	got := deliver(t, s, job("a@example.com", headersOnly))
	vs, err := dkim.VerifyWithOptions(strings.NewReader(got), &dkim.VerifyOptions{LookupTXT: lookup})
	if err != nil || len(vs) != 1 || vs[0].Err != nil {
		t.Fatalf("verify: %v %+v\n%q", err, vs, got)
	}
	if !strings.HasSuffix(got, headersOnly+"\r\n") {
		t.Errorf("sent %q, want the message with the empty line after its header", got)
	}
}

func b64(b []byte) string { return base64.StdEncoding.EncodeToString(b) }

// bigMessage streams a message of n body bytes without holding it.
type bigMessage struct {
	head   string
	n      int64
	off    int64
	sample func() // called about every MiB read
}

func (b *bigMessage) Read(p []byte) (int, error) {
	line := "0123456789012345678901234567890123456789012345678901234567890123456789012345678\r\n"
	total := int64(len(b.head)) + b.n
	if b.off >= total {
		return 0, io.EOF
	}
	if b.sample != nil && b.off%(1<<20) < int64(len(p)) {
		b.sample()
	}
	i := 0
	for i < len(p) && b.off < total {
		if b.off < int64(len(b.head)) {
			p[i] = b.head[b.off]
		} else {
			p[i] = line[(b.off-int64(len(b.head)))%int64(len(line))]
		}
		i++
		b.off++
	}
	return i, nil
}

// TestLargeMessageInBoundedMemory signs 32 MiB through the wrapper and
// checks, while the signer and then the sender read it, that the heap in
// use never grew by more than a small part of it: what is bounded is
// memory, by design, not the time taken.
func TestLargeMessageInBoundedMemory(t *testing.T) {
	k, lookup := edKey(t, "example.com", "s1")
	s, _ := New(Options{Keys: []Key{k}})
	const size = 32 << 20
	head := "From: <a@example.com>\r\nSubject: big\r\n\r\n"
	var peak uint64
	sample := func() {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		peak = max(peak, ms.HeapInuse)
	}
	j := &queue.Job{ID: "big", Envelope: queue.Envelope{From: "a@example.com"},
		Open: func() (io.ReadCloser, error) {
			return io.NopCloser(&bigMessage{head: head, n: size, sample: sample}), nil
		}}
	d := DelivererFunc(func(_ context.Context, job *queue.Job) []queue.Status {
		rc, err := job.Open()
		if err != nil {
			t.Fatal(err)
		}
		defer rc.Close()
		// Keep the signature header, stream the rest through a verifier.
		pr, pw := io.Pipe()
		done := make(chan error, 1)
		go func() {
			vs, err := dkim.VerifyWithOptions(pr, &dkim.VerifyOptions{LookupTXT: lookup})
			if err == nil && (len(vs) != 1 || vs[0].Err != nil) {
				err = fmt.Errorf("verifications %+v", vs)
			}
			io.Copy(io.Discard, pr)
			done <- err
		}()
		io.CopyBuffer(pw, rc, make([]byte, 64<<10))
		pw.Close()
		if err := <-done; err != nil {
			t.Errorf("verify: %v", err)
		}
		return []queue.Status{{Code: 250}}
	})
	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)
	s.Wrap(d).Deliver(context.Background(), j)
	if peak == 0 {
		t.Fatal("no samples")
	}
	if peak > base.HeapInuse+16<<20 {
		t.Errorf("heap in use rose by %d MiB while sending a %d MiB message", (peak-base.HeapInuse)>>20, size>>20)
	}
}

// DelivererFunc adapts a function to queue.Deliverer.
type DelivererFunc func(context.Context, *queue.Job) []queue.Status

func (f DelivererFunc) Deliver(ctx context.Context, j *queue.Job) []queue.Status { return f(ctx, j) }

// Delivery opens a message again for each host and transaction of an
// attempt. The attempt signs once, and logs and counts once, what it
// decided: the metric counts attempts, as its help says.
func TestOneDecisionPerAttempt(t *testing.T) {
	k, lookup := edKey(t, "example.com", "s1")
	var logs bytes.Buffer
	s, _ := New(Options{Keys: []Key{k}, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	thrice := DelivererFunc(func(_ context.Context, j *queue.Job) []queue.Status {
		var got []string
		for range 3 {
			rc, err := j.Open()
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(rc)
			rc.Close()
			got = append(got, string(b))
		}
		if got[0] != got[1] || got[1] != got[2] {
			t.Errorf("the opens of one attempt read differently:\n%s", strings.Join(got, "\n--\n"))
		}
		if j.ID == "signed" {
			vs, err := dkim.VerifyWithOptions(strings.NewReader(got[0]), &dkim.VerifyOptions{LookupTXT: lookup})
			if err != nil || len(vs) != 1 || vs[0].Err != nil {
				t.Errorf("verify: %v %+v\n%s", err, vs, got[0])
			}
		}
		return []queue.Status{{Code: 250}}
	})
	for _, tc := range []struct {
		id, msg, result string
	}{
		{"signed", msg, "signed"},
		{"unsignable", "Subject: x\r\n\r\nbody\r\n", "unsignable"},
	} {
		logs.Reset()
		before := testutil.ToFloat64(metricSigned.WithLabelValues(tc.result))
		j := job("a@example.com", tc.msg)
		j.ID = tc.id
		s.Wrap(thrice).Deliver(context.Background(), j)
		if n := testutil.ToFloat64(metricSigned.WithLabelValues(tc.result)) - before; n != 1 {
			t.Errorf("%s: counted %v times in one attempt, want once", tc.id, n)
		}
		if n := strings.Count(logs.String(), "level=WARN"); tc.result == "unsignable" && n != 1 {
			t.Errorf("%s: %d warnings in one attempt, want one:\n%s", tc.id, n, logs.String())
		}
	}
}

// A stored message that cannot be read (a disk error) is no reason to
// send it unsigned: the open fails, as delivery's would without keys,
// and the next open, the disk readable again, signs.
func TestUnreadableMessageIsNotSentUnsigned(t *testing.T) {
	k, lookup := edKey(t, "example.com", "s1")
	s, _ := New(Options{Keys: []Key{k}})
	for _, at := range []int{10, len(msg) - 3} { // in the header section, in the body
		failing := true
		j := job("a@example.com", msg)
		j.Open = func() (io.ReadCloser, error) {
			if failing {
				return io.NopCloser(io.MultiReader(strings.NewReader(msg[:at]), iotest.ErrReader(syscall.EIO))), nil
			}
			return io.NopCloser(strings.NewReader(msg)), nil
		}
		d := DelivererFunc(func(_ context.Context, j *queue.Job) []queue.Status {
			rc, err := j.Open()
			if err == nil {
				b, _ := io.ReadAll(rc)
				t.Errorf("failing at %d: opened, and would have sent:\n%s", at, b)
				return nil
			}
			if !errors.Is(err, syscall.EIO) {
				t.Errorf("failing at %d: %v, want the read error", at, err)
			}
			failing = false
			rc, err = j.Open()
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(rc)
			vs, err := dkim.VerifyWithOptions(bytes.NewReader(b), &dkim.VerifyOptions{LookupTXT: lookup})
			if err != nil || len(vs) != 1 || vs[0].Err != nil {
				t.Errorf("failing at %d, then readable: %v %+v\n%s", at, err, vs, b)
			}
			return nil
		})
		s.Wrap(d).Deliver(context.Background(), j)
	}
}
