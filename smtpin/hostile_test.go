package smtpin

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/queue"
)

// Hostile input on the submission port, over real TCP: every case gets a
// clear 4xx or 5xx, the server keeps serving others, and nothing that was
// not answered 250 is queued.

// served checks that the server still takes a message from another client.
func served(t *testing.T, e *testEnv) {
	t.Helper()
	before := len(e.q.stored())
	d := authedDialogue(t, e)
	d.cmd("MAIL FROM:<app@example.com>", "250")
	d.cmd("RCPT TO:<r@example.org>", "250")
	d.cmd("DATA", "354")
	d.write(testMessage + ".\r\n")
	d.expect("250 2.0.0")
	d.cmd("QUIT", "221")
	if n := len(e.q.stored()); n != before+1 {
		t.Fatalf("queue holds %d messages, want %d", n, before+1)
	}
}

func wantQueued(t *testing.T, e *testEnv, n int) {
	t.Helper()
	if got := len(e.q.stored()); got != n {
		t.Fatalf("queue holds %d messages, want %d", got, n)
	}
}

func TestCommandOf100KBRefused(t *testing.T) {
	e := start(t, nil)
	for _, line := range []string{
		"MAIL FROM:<" + strings.Repeat("a", 100<<10) + "@example.com>",
		"EHLO " + strings.Repeat("h", 100<<10),
		strings.Repeat("X", 100<<10),
	} {
		d := dial(t, e.srv.Addr())
		// go-smtp stops at MaxLineLength, answers and hangs up, without
		// reading the rest.
		d.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
		go io.WriteString(d.nc, line+"\r\n")
		d.expect("500 5.4.0")
		if !d.closed() {
			t.Fatal("connection open after a 100 KB command")
		}
	}
	served(t, e)
	wantQueued(t, e, 1)
}

func TestHeaderLinesOver998Characters(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	// RFC 5321 §4.5.3.1.6: 998 octets and CRLF. Longer lines are refused
	// rather than relayed or folded (README, "Protocol decisions").
	send := func(line string) {
		d.cmd("MAIL FROM:<a@example.com>", "250")
		d.cmd("RCPT TO:<b@example.org>", "250")
		d.cmd("DATA", "354")
		d.write(line + "\r\n" + testMessage + ".\r\n")
	}
	line := "X-Long: " + strings.Repeat("v", 998-len("X-Long: "))
	send(line)
	d.expect("250 2.0.0")
	if m := e.q.stored(); !strings.Contains(m[len(m)-1].body, "\r\n"+line+"\r\n") {
		t.Fatal("998-character header line not stored unchanged")
	}
	send(line + "v")
	d.expect("554 5.6.0")
	send("X-Long: " + strings.Repeat("v", 5000))
	d.expect("554 5.6.0")
	// Past MaxLineLength go-smtp's reader cannot find the line's end to
	// drain the message, so the session ends after the reply.
	if !d.closed() {
		t.Fatal("session open after a line longer than MaxLineLength")
	}
	wantQueued(t, e, 1)
}

func TestTenThousandRecipients(t *testing.T) {
	e := start(t, nil) // MaxRecipients: the default, 1000
	d := authedDialogue(t, e)
	d.cmd("MAIL FROM:<app@example.com>", "250")
	const n = 10000
	// Pipelined in one go, read back concurrently.
	go func() {
		var b strings.Builder
		for i := range n {
			b.WriteString("RCPT TO:<r" + itoa(i) + "@example.org>\r\n")
		}
		d.nc.SetWriteDeadline(time.Now().Add(30 * time.Second))
		io.WriteString(d.nc, b.String())
	}()
	ok, over := 0, 0
	for range n {
		switch r := d.reply(); {
		case strings.HasPrefix(r, "250 "):
			ok++
		case strings.HasPrefix(r, "452 4.5.3"):
			over++
		default:
			t.Fatalf("RCPT reply %q", r)
		}
	}
	if ok != DefaultMaxRecipients || over != n-DefaultMaxRecipients {
		t.Fatalf("%d recipients accepted and %d refused, want %d and %d", ok, over, DefaultMaxRecipients, n-DefaultMaxRecipients)
	}
	d.cmd("DATA", "354")
	d.write(testMessage + ".\r\n")
	d.expect("250 2.0.0")
	if got := len(e.q.only(t).env.Recipients); got != DefaultMaxRecipients {
		t.Fatalf("stored %d recipients, want %d", got, DefaultMaxRecipients)
	}
}

func TestNULBytesRefused(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client\x00.test", "250")
	d.cmd("NO\x00OP", "501 5.5.2")
	d.cmd("MAIL FROM:<a\x00b@example.com>", "501 5.1.7")
	d.cmd("MAIL FROM:<a@example.com>", "250")
	d.cmd("RCPT TO:<b@exa\x00mple.org>", "501 5.1.3")
	d.cmd("RCPT TO:<b@example.org>", "250")
	d.cmd("DATA", "354")
	d.write("Subject: nul\r\n\r\nbefore\x00after\r\n.\r\n")
	r := d.expect("554 5.6.0")
	if !strings.Contains(r, "line 3") {
		t.Errorf("reply %q does not name the line", r)
	}
	// BDAT too.
	d.cmd("MAIL FROM:<a@example.com>", "250")
	d.cmd("RCPT TO:<b@example.org>", "250")
	chunk := "Subject: nul\r\n\r\n\x00\r\n"
	d.write("BDAT " + itoa(len(chunk)) + " LAST\r\n" + chunk)
	d.expect("554 5.6.0")
	d.cmd("NOOP", "250")
	wantQueued(t, e, 0)
}

func TestInvalidUTF8Refused(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	for _, utf8 := range []string{"", " SMTPUTF8"} {
		r := d.cmd("MAIL FROM:<j\xf6rg@example.com>"+utf8, "501 5.1.7")
		if strings.Contains(r, "\xf6") {
			t.Errorf("reply %q echoes the invalid byte", r)
		}
		d.cmd("MAIL FROM:<a@example.com>"+utf8, "250")
		d.cmd("RCPT TO:<b@\xff\xfe.example>", "501 5.1.3")
		d.cmd("RCPT TO:<\xc3@example.org>", "501 5.1.3")
		d.cmd("RSET", "250")
	}
	// Valid UTF-8 needs SMTPUTF8 (RFC 6531 §3.5)…
	d.cmd("MAIL FROM:<jörg@example.com>", "553 5.6.7")
	// … and with it, an 8-bit message text is taken as it is: stsrelay
	// relays text, it does not convert charsets.
	d.cmd("MAIL FROM:<jörg@example.com> SMTPUTF8", "250")
	d.cmd("RCPT TO:<b@example.org>", "250")
	d.cmd("DATA", "354")
	d.write("Subject: caf\xe9\r\n\r\nlatin-1 \xe9\xe8\r\n.\r\n")
	d.expect("250 2.0.0")
	if !strings.Contains(e.q.only(t).body, "latin-1 \xe9\xe8\r\n") {
		t.Fatal("8-bit text changed on the way")
	}
}

func TestAuthWithGarbageBase64(t *testing.T) {
	e := start(t, nil)
	d := tlsDialogue(t, e)
	// Undecodable base64 ends the attempt with 501 5.5.2 (RFC 4954 §4;
	// go-smtp v0.25.1 said 454 4.7.0, fixed in third_party/go-smtp), and
	// nothing is authenticated.
	d.cmd("AUTH PLAIN !!!not-base64!!!", "501 5.5.2")
	d.cmd("AUTH PLAIN", "334")
	d.cmd("%%%", "501 5.5.2")
	d.cmd("AUTH LOGIN", "334")
	d.cmd("*", "501")
	// Decodable but not a PLAIN response: a failed attempt, counted.
	d.cmd("AUTH PLAIN "+b64("garbage"), "535 5.7.8")
	d.cmd("AUTH PLAIN "+b64("\x00\x00\x00\x00"), "535 5.7.8")
	d.cmd("MAIL FROM:<app@example.com>", "530 5.7.0")
	d.cmd(authPlainLine(testUser, testPassword), "235")
	d.cmd("MAIL FROM:<app@example.com>", "250")
	wantQueued(t, e, 0)
}

func TestAuthWithAnUnknownMechanism(t *testing.T) {
	// RFC 4954 §4: an unsupported mechanism gets 504, with 5.5.4
	// (go-smtp v0.25.1 said 5.7.4, fixed in third_party/go-smtp); not a
	// failed password, so the client may go on with one we offer.
	e := start(t, nil)
	d := tlsDialogue(t, e)
	d.cmd("AUTH CRAM-MD5", "504 5.5.4")
	d.cmd("AUTH XOAUTH2 "+b64("user=x\x01auth=Bearer y\x01\x01"), "504 5.5.4")
	d.cmd(authPlainLine(testUser, testPassword), "235")
}

func TestSTARTTLSTwiceRefused(t *testing.T) {
	e := start(t, nil)
	d := authedDialogue(t, e)
	d.cmd("STARTTLS", "503 5.5.1")
	d.cmd("MAIL FROM:<app@example.com>", "250")
	// On the implicit TLS port as well.
	nc, err := tls.Dial("tcp", e.srv.TLSAddr().String(), e.clientTLS())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	d2 := &dialogue{t: t, nc: nc, r: bufio.NewReader(nc)}
	d2.expect("220 ")
	d2.cmd("EHLO client.test", "250")
	d2.cmd("STARTTLS", "503 5.5.1")
	d2.cmd("NOOP", "250")
	served(t, e)
}

func TestDataBeforeRcptRefused(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	d := dial(t, e.srv.Addr())
	d.cmd("DATA", "503 5.5.1") // before EHLO
	d.cmd("EHLO client.test", "250")
	d.cmd("DATA", "503 5.5.1")
	d.cmd("MAIL FROM:<a@example.com>", "250")
	d.cmd("DATA", "503 5.5.1")
	d.cmd("RCPT TO:<bad>", "501")
	d.cmd("DATA", "503 5.5.1")
	// The chunk of a refused BDAT is data, never commands: one reply.
	chunk := "MAIL FROM:<x@example.com>\r\nRCPT TO:<y@example.org>\r\n"
	d.write("BDAT " + itoa(len(chunk)) + " LAST\r\n" + chunk)
	d.expect("503 5.5.1")
	d.cmd("NOOP", "250")
	wantQueued(t, e, 0)
}

// A flood of connections from one address meets the per-IP cap; another
// client submits meanwhile.
func TestConnectionFloodFromOneIPLeavesOthersServed(t *testing.T) {
	e := start(t, func(o *Options) { o.MaxConnsPerIP = 5 })
	const flood = 200
	var wg sync.WaitGroup
	var mu sync.Mutex
	greetings := map[string]int{}
	for range flood {
		wg.Add(1)
		go func() {
			defer wg.Done()
			nc, err := net.DialTimeout("tcp", e.srv.Addr().String(), 5*time.Second)
			if err != nil {
				mu.Lock()
				greetings["dial error"]++
				mu.Unlock()
				return
			}
			defer nc.Close()
			nc.SetReadDeadline(time.Now().Add(10 * time.Second))
			line, _ := bufio.NewReader(nc).ReadString('\n')
			mu.Lock()
			greetings[line[:min(len(line), 9)]]++
			mu.Unlock()
			if strings.HasPrefix(line, "220 ") {
				time.Sleep(time.Second) // hold the slot while the others arrive
			}
		}()
	}
	// Meanwhile, from another address.
	other, err := dialFrom(t, e.srv.Addr(), "127.0.0.2")
	if err != nil {
		t.Fatal(err)
	}
	other.expect("220 ")
	other.cmd("EHLO other.test", "250")
	other.cmd("STARTTLS", "220")
	other.starttls(e.clientTLS())
	other.cmd("EHLO other.test", "250")
	other.cmd(authPlainLine(testUser, testPassword), "235")
	other.cmd("MAIL FROM:<app@example.com>", "250")
	other.cmd("RCPT TO:<r@example.org>", "250")
	other.cmd("DATA", "354")
	other.write(testMessage + ".\r\n")
	other.expect("250 2.0.0")
	wg.Wait()
	if greetings["220 relay"] < 5 || greetings["220 relay"]+greetings["421 4.7.0"] != flood {
		t.Fatalf("greetings %v: want at least 5 served, the rest 421 4.7.0", greetings)
	}
	wantQueued(t, e, 1)
}

// Commands pipelined after go-smtp's "Too many errors" (or after QUIT)
// are not run: the session ends there, and no panic is recovered and
// counted. go-smtp v0.25.1 ran them against the session it had closed
// and panicked (fixed in third_party/go-smtp).
func TestCommandsAfterTooManyErrorsNotRun(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	before := testutil.ToFloat64(metricPanics)
	transaction := "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" + testMessage + ".\r\n"
	for _, closing := range []string{strings.Repeat("XYZZ\r\n", 4), "QUIT\r\n"} {
		d := dial(t, e.srv.Addr())
		d.cmd("EHLO client.test", "250")
		d.write(closing + transaction)
		if closing == "QUIT\r\n" {
			d.expect("221 ")
		} else {
			for range 4 {
				d.expect("500 5.5.2")
			}
			d.expect("500 5.5.1 Too many errors")
		}
		d.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		if rest, err := io.ReadAll(d.r); len(rest) > 0 || err != nil {
			t.Errorf("after %q: %q, %v; want the end of the stream", closing, rest, err)
		}
	}
	served(t, e)
	// go-smtp's Shutdown waits for every session's goroutine to return, so
	// a panic in one would be counted by now.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := e.srv.smtp.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	if n := testutil.ToFloat64(metricPanics) - before; n != 0 {
		t.Errorf("%v panics recovered", n)
	}
	wantQueued(t, e, 1) // served's
}

// Nothing half-queued: hostile sessions against the real queue leave
// exactly the messages that were answered 250, each whole.
func TestHostileSessionsLeaveOnlyAcceptedMessagesInRealQueue(t *testing.T) {
	dir := t.TempDir()
	db, err := queue.OpenDB(filepath.Join(dir, "stsrelay.db"))
	if err != nil {
		t.Fatal(err)
	}
	q, err := queue.New(db, queue.Options{Deliverer: nobody{}, Hostname: "relay.test",
		Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	ca := testpki.NewCA(t)
	cert := ca.Issue(t, "localhost", "127.0.0.1")
	opts := Options{
		Hostname: "relay.test", Listen: "127.0.0.1:0",
		GetCertificate:  func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &cert, nil },
		TrustedNetworks: []netip.Prefix{mustPrefix(t, "127.0.0.1/32")},
		MaxMessageSize:  4096,
		DataTimeout:     time.Second,
		Logger:          slog.New(slog.NewTextHandler(newTestWriter(t), nil)),
	}
	srv, err := New(opts, q)
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})

	var clients []*dialogue
	begin := func() *dialogue {
		d := dial(t, srv.Addr())
		clients = append(clients, d)
		d.cmd("EHLO client.test", "250")
		d.cmd("MAIL FROM:<a@example.com>", "250")
		d.cmd("RCPT TO:<b@example.org>", "250")
		return d
	}
	var accepted []string
	good := "Subject: ok\r\n\r\nfine\r\n"
	for i, send := range []func() string{
		func() string { d := begin(); d.cmd("DATA", "354"); d.write(good + ".\r\n"); return d.expect("250 ") },
		func() string { // too large
			d := begin()
			d.cmd("DATA", "354")
			d.write(strings.Repeat(strings.Repeat("x", 98)+"\r\n", 50) + ".\r\n")
			return d.expect("552 ")
		},
		func() string { d := begin(); d.cmd("DATA", "354"); d.write("a\nb\r\n.\r\n"); return d.expect("554 ") },
		func() string { d := begin(); d.cmd("DATA", "354"); d.write("a\x00b\r\n.\r\n"); return d.expect("554 ") },
		func() string { // the client goes away mid-message
			d := begin()
			d.cmd("DATA", "354")
			d.write("Subject: cut\r\n\r\nhalf a mess")
			d.nc.Close()
			return ""
		},
		func() string { // stalls mid-message
			d := begin()
			d.cmd("DATA", "354")
			d.write("Subject: slow\r\n\r\nhalf")
			return d.expect("421 ")
		},
		func() string { // mid-BDAT
			d := begin()
			d.write("BDAT 100\r\nSubject: x\r\n\r\n")
			d.nc.Close()
			return ""
		},
		func() string { // inside the LAST chunk, short of its size
			d := begin()
			d.write("BDAT 100 LAST\r\nSubject: cut short\r\n\r\n")
			d.nc.Close()
			return ""
		},
		func() string { // inside the LAST chunk over TLS, ended by close_notify
			d := dial(t, srv.Addr())
			clients = append(clients, d)
			d.cmd("EHLO client.test", "250")
			d.cmd("STARTTLS", "220")
			d.starttls(&tls.Config{RootCAs: ca.Pool, ServerName: "localhost"})
			d.cmd("EHLO client.test", "250")
			d.cmd("MAIL FROM:<a@example.com>", "250")
			d.cmd("RCPT TO:<b@example.org>", "250")
			d.write("BDAT 100 LAST\r\nSubject: cut short\r\n\r\n")
			d.nc.Close()
			return ""
		},
		func() string {
			d := begin()
			d.write("BDAT " + itoa(len(good)) + " LAST\r\n" + good)
			return d.expect("250 ")
		},
	} {
		if r := send(); strings.HasPrefix(r, "250 ") {
			accepted = append(accepted, strings.TrimSpace(r[strings.LastIndex(r, " ")+1:]))
		} else if r != "" && !strings.HasPrefix(r, "4") && !strings.HasPrefix(r, "5") {
			t.Fatalf("case %d: reply %q", i, r)
		}
	}
	for _, d := range clients {
		d.nc.Close()
	}
	waitFor(t, func() bool { return srv.connCount() == 0 })
	page, err := q.List("", 0)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, m := range page.Messages {
		ids = append(ids, m.ID)
		mi, err := q.Show(m.ID)
		if err != nil || !strings.Contains(mi.Headers, "Subject: ok") {
			t.Errorf("message %s: %v, headers %q", m.ID, err, mi.Headers)
		}
	}
	if strings.Join(ids, ",") != strings.Join(accepted, ",") {
		t.Fatalf("queue holds %v, want exactly the accepted %v", ids, accepted)
	}
}

type nobody struct{}

func (nobody) Deliver(ctx context.Context, job *queue.Job) []queue.Status {
	return make([]queue.Status, len(job.Recipients))
}

// A client that only tries what it may not (MAIL without AUTH, AUTH in
// plaintext) is cut off after maxRefused refusals, with a 421: before, it
// could go on for ever, a reply and a log line each. A message accepted in
// between starts the count afresh.
func TestClientThatOnlyGetsRefusedIsCutOff(t *testing.T) {
	var logs syncBuffer
	e := start(t, func(o *Options) { o.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	for i := range maxRefused - 1 {
		d.cmd([]string{"MAIL FROM:<a@example.com>", "AUTH PLAIN"}[i%2], "5")
	}
	d.cmd("MAIL FROM:<a@example.com>", "421 4.7.0")
	if !d.closed() {
		t.Fatal("the connection is open after the 421")
	}
	if n := strings.Count(logs.String(), "smtpin: rejected"); n >= maxRefused {
		t.Errorf("%d rejection lines for one client, want fewer than %d", n, maxRefused)
	}

	trusted := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	d = dial(t, trusted.srv.Addr())
	d.cmd("EHLO client.test", "250")
	for range 3 {
		for range maxRefused - 1 {
			d.cmd("MAIL FROM:<bad address>", "5")
		}
		d.cmd("MAIL FROM:<a@example.com>", "250")
		d.cmd("RCPT TO:<b@example.org>", "250")
		d.cmd("DATA", "354")
		d.write(testMessage + ".\r\n")
		d.expect("250")
	}
}

// A client cut off while it still has commands in flight gets the 421
// and then the end of the stream, not a reset that can take the 421 with
// it: the relay shuts its side and drops the client's input for a moment
// before it closes.
func TestCutOffClientReadsThe421BeforeTheEnd(t *testing.T) {
	e := start(t, nil)
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	burst := strings.Repeat("MAIL FROM:<a@example.com>\r\n", maxRefused) +
		strings.Repeat("NOOP "+strings.Repeat("x", 500)+"\r\n", 200) // ~100 KB the relay never reads
	d.write(burst)
	d.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(d.r)
	if err != nil {
		t.Fatalf("after %q: %v, want the end of the stream", lastLineOf(string(got)), err)
	}
	if !strings.Contains(string(got), "\r\n421 4.7.0 ") {
		t.Errorf("no 421 before the end:\n%s", got)
	}
	d.nc.Close() // the relay's lingering ends with the client's close
	waitFor(t, func() bool { return e.srv.connCount() == 0 })
}

func lastLineOf(s string) string {
	s = strings.TrimSuffix(s, "\r\n")
	return s[strings.LastIndex(s, "\n")+1:]
}

// A scanner's connections to the TLS port, each a failed handshake, make
// a few log lines, not one each (as refused connections do).
func TestFailedHandshakesAreLoggedAFewAtATime(t *testing.T) {
	var logs syncBuffer
	e := start(t, func(o *Options) { o.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })
	for range 60 {
		nc, err := net.Dial("tcp", e.srv.TLSAddr().String())
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(nc, "GET / HTTP/1.0\r\n\r\n")
		nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		io.Copy(io.Discard, nc) // until the server closes it
		nc.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(logs.String(), "tls:") && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := strings.Count(logs.String(), "tls:"); n == 0 || n > 20 {
		t.Errorf("%d log lines about failed handshakes for 60 connections, want a few", n)
	}
}
