package delivery

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/iotest"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
)

// scriptMX is an SMTP server on loopback that answers EHLO with exactly
// the lines a test gives (lower-case keywords, no 8BITMIME), as some real
// servers do and go-smtp's server cannot, and keeps every command line.
// It answers each command as it comes, so pipelined groups too.
type scriptMX struct {
	ehlo    []string         // EHLO keywords before STARTTLS, as sent
	ehloTLS []string         // and after it
	cert    *tls.Certificate // offers STARTTLS when set
	// replies replaces the reply to a verb ("." for the final dot's,
	// "greeting" for the greeting), lines separated by CRLF, as sent. A
	// reply starting with 421 ends the session.
	replies map[string]string
	// rcptMax refuses the RCPTs of a transaction past that many with
	// limitReply, 452 4.5.3 when empty (0: no limit).
	rcptMax    int
	limitReply string

	mu    sync.Mutex
	cmds  []string
	data  []string
	rcpts [][]string // the recipients of each message taken
}

func newScriptMX(t *testing.T, m *scriptMX) string {
	t.Helper()
	if m.cert != nil && !slices.Contains(m.ehlo, "STARTTLS") {
		m.ehlo = append(m.ehlo, "STARTTLS")
	}
	return rawServer(t, m.serve)
}

func (m *scriptMX) commands() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.cmds...)
}

// verbs are the commands' verbs, in order.
func (m *scriptMX) verbs() []string {
	var out []string
	for _, c := range m.commands() {
		out = append(out, strings.ToUpper(strings.SplitN(c, " ", 2)[0]))
	}
	return out
}

// messages are the recipients of each message taken.
func (m *scriptMX) messages() [][]string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.rcpts)
}

// command returns the first command line starting with verb, or "".
func (m *scriptMX) command(verb string) string {
	for _, c := range m.commands() {
		if strings.HasPrefix(c, verb) {
			return c
		}
	}
	return ""
}

// multiline is a reply of code with each text as a line.
func multiline(code string, texts ...string) string {
	var b strings.Builder
	for i, l := range texts {
		sep := "-"
		if i == len(texts)-1 {
			sep = " "
		}
		if i > 0 {
			b.WriteString("\r\n")
		}
		b.WriteString(code + sep + l)
	}
	return b.String()
}

func (m *scriptMX) serve(c net.Conn) {
	var conn io.ReadWriter = c
	r := bufio.NewReader(conn)
	// reply sends the reply set for key, else def; false: the session ends.
	reply := func(key, def string) bool {
		if rep, ok := m.replies[key]; ok {
			def = rep
		}
		io.WriteString(conn, def+"\r\n")
		return !strings.HasPrefix(def, "421")
	}
	if !reply("greeting", "220 mx.test ESMTP") {
		return
	}
	inTLS := false
	var rcpts []string
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		line = strings.TrimSuffix(line, "\r\n")
		m.mu.Lock()
		m.cmds = append(m.cmds, line)
		m.mu.Unlock()
		verb := strings.ToUpper(strings.SplitN(line, " ", 2)[0])
		ok := true
		switch {
		case verb == "EHLO":
			keys := m.ehlo
			if inTLS {
				keys = m.ehloTLS
			}
			ok = reply(verb, multiline("250", append([]string{"mx.test"}, keys...)...))
		case verb == "STARTTLS" && m.cert != nil && !inTLS:
			reply(verb, "220 ready")
			tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{*m.cert}})
			if tc.Handshake() != nil {
				return
			}
			conn, r, inTLS = tc, bufio.NewReader(tc), true
		case verb == "MAIL", verb == "RSET":
			rcpts = nil
			ok = reply(verb, "250 ok")
		case verb == "RCPT" && m.rcptMax > 0 && len(rcpts) >= m.rcptMax:
			limit := m.limitReply
			if limit == "" {
				limit = "452 4.5.3 too many recipients"
			}
			ok = reply("", limit)
		case verb == "RCPT":
			_, to, _ := strings.Cut(line, "<")
			to, _, _ = strings.Cut(to, ">")
			rcpts = append(rcpts, to)
			ok = reply(verb, "250 ok")
		case verb == "DATA" && len(rcpts) == 0:
			ok = reply("", "554 5.5.1 no valid recipients")
		case verb == "DATA" && m.replies["DATA"] != "" && !strings.HasPrefix(m.replies["DATA"], "354"):
			rcpts = nil
			ok = reply(verb, "")
		case verb == "DATA":
			if !reply(verb, "354 go ahead") {
				return
			}
			var b strings.Builder
			for {
				l, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if l == ".\r\n" {
					break
				}
				b.WriteString(l)
			}
			if rep := m.replies["."]; rep == "" || rep[0] == '2' {
				m.mu.Lock()
				m.data = append(m.data, b.String())
				m.rcpts = append(m.rcpts, rcpts)
				m.mu.Unlock()
			}
			rcpts = nil
			ok = reply(".", "250 2.0.0 queued")
		case verb == "QUIT":
			reply(verb, "221 bye")
			return
		case verb == "NOOP":
			ok = reply(verb, "250 ok")
		default:
			ok = reply(verb, "502 5.5.1 unknown command")
		}
		if !ok {
			return
		}
	}
}

// RFC 5321 §2.4: EHLO keywords are case-insensitive. A server that offers
// them in lower case gets SMTPUTF8, BODY=8BITMIME, SIZE and the DSN
// parameters. go-smtp v0.25.1 as released sees none of them; its copy in
// third_party/go-smtp upper-cases the keywords (its README, change 5).
func TestLowerCaseEHLOKeywordsAreHonoured(t *testing.T) {
	v, _ := oneMX(t)
	mx := &scriptMX{ehlo: []string{"pipelining", "8bitmime", "smtputf8", "dsn", "size 1000000"}}
	v.route("127.0.0.2", newScriptMX(t, mx))
	job := testJob("example.test", "jöran@example.test")
	job.Envelope.SMTPUTF8, job.Envelope.Body8Bit = true, true
	job.Envelope.Ret, job.Envelope.EnvID = "HDRS", "E1"
	job.Recipients[0].Notify = []string{"SUCCESS"}
	st := deliver(t, v.engine(), job)
	wantStatus(t, st[0], 250, "2.0.0")
	if st[0].Relayed {
		t.Error("Relayed set although the remote offers dsn: a false relayed DSN")
	}
	want := "MAIL FROM:<sender@sender.test> BODY=8BITMIME SIZE=" + strconv.FormatInt(job.Size, 10) + " SMTPUTF8 RET=HDRS ENVID=E1"
	if got := mx.command("MAIL"); got != want {
		t.Errorf("sent %q\n want %q", got, want)
	}
	if got, want := mx.command("RCPT"), "RCPT TO:<jöran@example.test> NOTIFY=SUCCESS"; got != want {
		t.Errorf("sent %q, want %q", got, want)
	}
}

func TestLowerCaseRequireTLSKeywordIsHonoured(t *testing.T) {
	v, _ := oneMX(t)
	cert := v.ca.Issue(t, "mx1.example.test")
	mx := &scriptMX{ehlo: []string{"8bitmime"}, ehloTLS: []string{"8bitmime", "requiretls"}, cert: &cert}
	mx.ehlo = append(mx.ehlo, "starttls")
	v.route("127.0.0.2", newScriptMX(t, mx))
	e := v.engine(func(o *Options) { o.Policy = everyMX(policy.Requirement{MXValidated: true}) })
	st := deliver(t, e, requireTLSJob())
	wantStatus(t, st[0], 250, "2.0.0")
	if got := mx.command("MAIL"); !strings.HasSuffix(got, " REQUIRETLS") {
		t.Errorf("sent %q, want MAIL … REQUIRETLS", got)
	}
}

// RFC 6152 §3: 8-bit content never goes to a server without 8BITMIME;
// stsrelay returns it (5.6.3) rather than rewriting it. 7-bit content
// goes as usual.
func TestEightBitMessageReturnedWhenRemoteLacks8BITMIME(t *testing.T) {
	v, _ := oneMX(t)
	mx := &scriptMX{ehlo: []string{"PIPELINING", "SIZE 1000000"}}
	v.route("127.0.0.2", newScriptMX(t, mx))
	e := v.engine()
	job := testJob("example.test", "a@example.test")
	job.Envelope.Body8Bit = true
	st := deliver(t, e, job)
	wantStatus(t, st[0], 550, "5.6.3", "8BITMIME")
	if st[0].RemoteMTA != "" {
		t.Errorf("RemoteMTA = %q for a decision of ours", st[0].RemoteMTA)
	}
	if c := mx.command("MAIL"); c != "" {
		t.Errorf("sent %q to a remote without 8BITMIME", c)
	}

	st = deliver(t, e, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 250, "2.0.0")
	if got := mx.command("MAIL"); strings.Contains(got, "BODY=") {
		t.Errorf("sent %q: BODY=8BITMIME to a remote without it", got)
	}
}

func TestEightBitMessageGoesToAnMXWith8BITMIME(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	seven := &scriptMX{ehlo: []string{"SIZE 1000000"}}
	v.route("127.0.0.2", newScriptMX(t, seven))
	eight := newMX(t)
	v.route("127.0.0.3", eight.Addr)
	job := testJob("example.test", "a@example.test")
	job.Envelope.Body8Bit = true
	wantStatus(t, deliver(t, v.engine(), job)[0], 250, "2.0.0")
	if m := eight.messages(); len(m) != 1 || m[0].mail.Body != "8BITMIME" {
		t.Errorf("the 8BITMIME host got %+v, want the message with BODY=8BITMIME", m)
	}
}

// ownDSN is a DSN as the queue writes one, returning an 8-bit message
// whole (RET=FULL).
const ownDSN = "From: Mail Delivery System <postmaster@relay.test>\r\n" +
	"To: <sender@sender.test>\r\nSubject: Undelivered Mail Returned to Sender\r\n" +
	"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"b1\"\r\n" +
	"\r\nThis is a MIME-encapsulated message.\r\n" +
	"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nYour message could not be delivered.\r\n" +
	"\r\n--b1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; relay.test\r\n\r\n" +
	"Final-Recipient: rfc822; a@example.test\r\nAction: failed\r\nStatus: 5.1.1\r\n" +
	"\r\n--b1\r\nContent-Transfer-Encoding: 8bit\r\nContent-Type: message/rfc822\r\n\r\n" +
	"From: sender@sender.test\r\nSubject: Grüße\r\n\r\nGrüße aus Köln\r\n" +
	"\r\n--b1--\r\n"

// A DSN of our own cannot return to its sender, so to a host without
// 8BITMIME it goes re-encoded as 7-bit (queue.SevenBitDSN) rather than
// being refused with 5.6.3 and lost; any other 8-bit message is not
// ours to rewrite.
func TestOwnDSNGoesSevenBitToAHostWithout8BITMIME(t *testing.T) {
	v, _ := oneMX(t)
	mx := &scriptMX{ehlo: []string{"PIPELINING", "SIZE 1000000"}}
	v.route("127.0.0.2", newScriptMX(t, mx))
	e := v.engine()
	job := testJob("example.test", "a@example.test")
	job.Envelope = queue.Envelope{From: "", Body8Bit: true, OwnDSN: true}
	job.Size = int64(len(ownDSN))
	job.Open = func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader(ownDSN)), nil }
	wantStatus(t, deliver(t, e, job)[0], 250, "2.0.0")

	seven, err := queue.SevenBitDSN([]byte(ownDSN))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := mx.command("MAIL"), fmt.Sprintf("MAIL FROM:<> SIZE=%d", len(seven)); got != want {
		t.Errorf("sent %q, want %q: the re-encoded size and no BODY=8BITMIME", got, want)
	}
	mx.mu.Lock()
	data := slices.Clone(mx.data)
	mx.mu.Unlock()
	if len(data) != 1 || data[0] != string(seven) {
		t.Errorf("the host got %q, want the DSN re-encoded:\n%s", data, seven)
	}

	// Not a DSN after all: it stays where it is, and says why.
	job.Open = func() (io.ReadCloser, error) {
		return io.NopCloser(strings.NewReader("Subject: Grüße\r\n\r\nx\r\n")), nil
	}
	wantStatus(t, deliver(t, e, job)[0], 550, "5.6.3", "8BITMIME not supported", "re-encoding this DSN failed: not a DSN")
}

// A DSN that cannot be read to be re-encoded waits for a retry, as any
// message that cannot be read does; it is not refused, which would lose
// it. A host with 8BITMIME gets the DSN as it was queued.
func TestOwnDSNUnreadOrFor8BITMIMEGoesAsQueued(t *testing.T) {
	v := newEnv(t,
		"example.test. 300 IN MX 10 mx1.example.test.",
		"example.test. 300 IN MX 20 mx2.example.test.",
		"mx1.example.test. 300 IN A 127.0.0.2",
		"mx2.example.test. 300 IN A 127.0.0.3")
	seven := &scriptMX{ehlo: []string{"PIPELINING", "SIZE 1000000"}}
	v.route("127.0.0.2", newScriptMX(t, seven))
	eight := &scriptMX{ehlo: []string{"PIPELINING", "8BITMIME", "SIZE 1000000"}}
	v.route("127.0.0.3", newScriptMX(t, eight))
	e := v.engine()
	job := testJob("example.test", "a@example.test")
	job.Envelope = queue.Envelope{From: "", Body8Bit: true, OwnDSN: true}
	job.Size = int64(len(ownDSN))
	opens := 0
	job.Open = func() (io.ReadCloser, error) {
		opens++
		if opens == 1 { // the read for re-encoding
			return io.NopCloser(io.MultiReader(strings.NewReader(ownDSN[:100]), iotest.ErrReader(syscall.EIO))), nil
		}
		return io.NopCloser(strings.NewReader(ownDSN)), nil
	}
	wantStatus(t, deliver(t, e, job)[0], 451, "4.3.0", "reading the queued message", "input/output error")
	if c := seven.command("MAIL"); c != "" {
		t.Errorf("sent %q after the DSN could not be read", c)
	}
	if c := eight.command("MAIL"); c != "" {
		t.Errorf("went on to the next host with %q after the DSN could not be read", c)
	}

	// mx1 has no 8BITMIME and the re-encoding fails (not a DSN): mx2 gets
	// it as queued.
	notDSN := "Subject: Grüße\r\n\r\nx\r\n"
	job.Size = int64(len(notDSN))
	job.Open = func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader(notDSN)), nil }
	wantStatus(t, deliver(t, e, job)[0], 250, "2.0.0")
	if got, want := eight.command("MAIL"), fmt.Sprintf("MAIL FROM:<> BODY=8BITMIME SIZE=%d", len(notDSN)); got != want {
		t.Errorf("sent %q, want %q", got, want)
	}
	eight.mu.Lock()
	data := slices.Clone(eight.data)
	eight.mu.Unlock()
	if len(data) != 1 || data[0] != notDSN {
		t.Errorf("the 8BITMIME host got %q, want the message as queued", data)
	}
}

// A handshake cut off by cancellation (shutdown) is not the server's
// failure, so no TLS report may count it.
func TestCancelledHandshakeIsNotRecorded(t *testing.T) {
	v, _ := oneMX(t)
	hello := make(chan struct{})
	v.route("127.0.0.2", rawServer(t, func(c net.Conn) {
		r := bufio.NewReader(c)
		io.WriteString(c, "220 mx.test ESMTP\r\n")
		r.ReadString('\n') // EHLO
		io.WriteString(c, "250-mx.test\r\n250 STARTTLS\r\n")
		r.ReadString('\n') // STARTTLS
		io.WriteString(c, "220 ready\r\n")
		r.ReadByte() // the ClientHello begins; never answer it
		close(hello)
		io.Copy(io.Discard, r)
	}))
	e := v.engine(func(o *Options) {
		o.Policy = everyMX(policy.Requirement{Security: policy.SecurityVerify, Policy: testSTS, MXValidated: true})
	})
	ctx, cancel := context.WithCancel(context.Background())
	go func() { <-hello; cancel() }()
	st := e.Deliver(ctx, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.2", "interrupted")
	for _, r := range v.rec.results() {
		if r.Result != policy.ResultSuccess {
			t.Errorf("recorded %s (%s) for a handshake cut off by cancellation", r.Result, r.Detail)
		}
	}
}

// An attempt cut off with a cause (an operator's bounce, say) closes the
// connection of a transfer stalled in DATA, and its status and log line
// say why; one cut off before it started says so too.
func TestCutOffTransferSaysWhy(t *testing.T) {
	v, _ := oneMX(t)
	inData := make(chan struct{})
	closed := make(chan struct{})
	v.route("127.0.0.2", rawServer(t, func(c net.Conn) {
		r := bufio.NewReader(c)
		io.WriteString(c, "220 mx.test ESMTP\r\n")
		r.ReadString('\n') // EHLO
		io.WriteString(c, "250-mx.test\r\n250 PIPELINING\r\n")
		for _, reply := range []string{"250 ok\r\n", "250 ok\r\n", "354 go ahead\r\n"} { // MAIL, RCPT, DATA
			r.ReadString('\n')
			io.WriteString(c, reply)
		}
		close(inData) // and never answer the final dot
		io.Copy(io.Discard, r)
		close(closed)
	}))
	e := v.engine()
	bounced := errors.New("bounced by the mail system administrator")
	ctx, cancel := context.WithCancelCause(context.Background())
	go func() { <-inData; cancel(bounced) }()
	st := e.Deliver(ctx, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.2", "delivery interrupted", "(bounced by the mail system administrator)")
	select {
	case <-closed: // EOF, or a reset: the message was still unread
	case <-time.After(10 * time.Second):
		t.Fatal("the connection stayed open after the cut")
	}
	if logs := v.logs.String(); !strings.Contains(logs, "bounced by the mail system administrator") {
		t.Errorf("the attempt's log line does not say why it was cut off:\n%s", logs)
	}

	st = e.Deliver(ctx, testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.2", "delivery interrupted before it started: bounced by the mail system administrator")
}

// A DSN's Diagnostic-Code carries the remote's reply as received (RFC 3464
// §2.3.6); a status of our own has none, and names no Remote-MTA.
func TestRemoteReplyIsKeptAsReceived(t *testing.T) {
	v, mx := oneMX(t)
	mx.rcptErr["gone@example.test"] = smtpErr(550, smtp.EnhancedCode{5, 1, 1}, "no such user")
	st := deliver(t, v.engine(), testJob("example.test", "gone@example.test"))
	if got, want := st[0].Reply, "550 5.1.1 no such user"; got != want || st[0].RemoteMTA != "mx1.example.test" {
		t.Errorf("Reply %q RemoteMTA %q, want %q from mx1.example.test", got, st[0].RemoteMTA, want)
	}

	v.route("127.0.0.2", v.closed)
	st = deliver(t, v.engine(), testJob("example.test", "a@example.test"))
	wantStatus(t, st[0], 451, "4.4.1", "connection refused")
	if st[0].Reply != "" || st[0].RemoteMTA != "" {
		t.Errorf("Reply %q RemoteMTA %q for a connection that was refused", st[0].Reply, st[0].RemoteMTA)
	}
}

// A quoted local part with an '@', and an address literal with a
// lower-case IPv6 tag, go out exactly as they were submitted.
func TestUnusualAddressesAreDeliveredUnchanged(t *testing.T) {
	v, _ := oneMX(t)
	mx := &scriptMX{ehlo: []string{"8BITMIME"}}
	addr := newScriptMX(t, mx)
	v.route("127.0.0.2", addr)
	v.route("2001:db8::1", addr)
	e := v.engine()

	wantStatus(t, deliver(t, e, testJob("example.test", `"a@b"@example.test`))[0], 250, "2.0.0")
	job := testJob("[ipv6:2001:db8::1]", "user@[ipv6:2001:db8::1]")
	wantStatus(t, deliver(t, e, job)[0], 250, "2.0.0")
	var rcpts []string
	for _, c := range mx.commands() {
		if strings.HasPrefix(c, "RCPT") {
			rcpts = append(rcpts, c)
		}
	}
	if want := []string{`RCPT TO:<"a@b"@example.test>`, "RCPT TO:<user@[ipv6:2001:db8::1]>"}; !slices.Equal(rcpts, want) {
		t.Errorf("sent %q, want %q", rcpts, want)
	}
}

// RFC 5321 §4.2: "Reply-code [ SP textstring ] CRLF". A remote that
// answers with bare codes (a multiline EHLO reply ending in one too) has
// taken the message at its bare 250: one copy, delivered, on every path
// that reads replies.
func TestRepliesWithoutTextAreWholeReplies(t *testing.T) {
	for _, tc := range []struct {
		name, ehlo string
		tls        bool
	}{
		{"lock-step", "250-mx.test\r\n250-\r\n250-8BITMIME\r\n250", false},
		{"pipelining", "250-mx.test\r\n250-\r\n250-PIPELINING\r\n250", false},
		{"STARTTLS", "250-mx.test\r\n250-\r\n250-STARTTLS\r\n250", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, _ := oneMX(t)
			mx := &scriptMX{replies: map[string]string{
				"greeting": "220", "EHLO": tc.ehlo, "STARTTLS": "220", "MAIL": "250", "RCPT": "250 ",
				"DATA": "354", ".": "250", "RSET": "250", "QUIT": "221",
			}}
			if tc.tls {
				cert := mustCert(t)
				mx.cert = &cert
			}
			v.route("127.0.0.2", newScriptMX(t, mx))
			e := v.engine(func(o *Options) { o.IdleTimeout = 5 * time.Second })
			for range 2 {
				st := deliver(t, e, testJob("example.test", "a@example.test"))
				if want := "mx1.example.test[127.0.0.2]: 250 2.0.0"; !st[0].Delivered() || st[0].Text != want || st[0].Reply != "250" {
					t.Fatalf("status %q, reply %q; want %q, reply \"250\"", st[0].String(), st[0].Reply, want)
				}
			}
			if n := len(mx.messages()); n != 2 {
				t.Errorf("the remote took %d messages, want 2", n)
			}
			ehlos := 1 // a second one after STARTTLS
			if tc.tls {
				ehlos = 2
			}
			if got := mx.verbs(); !slices.Contains(got, "RSET") || strings.Count(strings.Join(got, " "), "EHLO") != ehlos {
				t.Errorf("commands %q, want the second message on the same connection, after RSET", got)
			}
		})
	}
}

// RFC 5321 §4.5.3.1.10: a remote at its recipient limit answers 452, and
// the client sends the rest in another transaction; on the same
// connection, not hours later on the retry schedule.
func TestRecipientLimitSendsTheRestInAnotherTransaction(t *testing.T) {
	for _, tc := range []struct {
		name string
		ehlo []string
	}{
		{"lock-step", []string{"8BITMIME"}},
		{"pipelining", []string{"PIPELINING", "8BITMIME"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, _ := oneMX(t)
			mx := &scriptMX{ehlo: tc.ehlo, rcptMax: 2}
			v.route("127.0.0.2", newScriptMX(t, mx))
			job := testJob("example.test", "a@example.test", "b@example.test", "c@example.test", "d@example.test", "e@example.test")
			st := deliver(t, v.engine(), job)
			for i, s := range st {
				if !s.Delivered() {
					t.Errorf("recipient %d: %s", i, s.String())
				}
			}
			want := [][]string{{"a@example.test", "b@example.test"}, {"c@example.test", "d@example.test"}, {"e@example.test"}}
			if got := mx.messages(); !slices.EqualFunc(got, want, slices.Equal) {
				t.Errorf("transactions %q, want %q", got, want)
			}
			if got := strings.Join(mx.verbs(), " "); strings.Count(got, "EHLO") != 1 || strings.Count(got, "RSET") != 2 {
				t.Errorf("commands %s, want one connection, RSET before each new transaction", got)
			}
		})
	}
}

// RFC 5321 §4.5.3.1.10: some servers answer 552 at their recipient limit,
// which the client SHOULD take as temporary: the rest go in another
// transaction, never into a bounce.
func TestRecipientLimitAnswered552IsTemporary(t *testing.T) {
	v, _ := oneMX(t)
	mx := &scriptMX{ehlo: []string{"PIPELINING"}, rcptMax: 2, limitReply: "552 5.5.3 too many recipients"}
	v.route("127.0.0.2", newScriptMX(t, mx))
	job := testJob("example.test", "a@example.test", "b@example.test", "c@example.test")
	for i, s := range deliver(t, v.engine(), job) {
		if !s.Delivered() {
			t.Errorf("recipient %d: %s", i, s.String())
		}
	}
	want := [][]string{{"a@example.test", "b@example.test"}, {"c@example.test"}}
	if got := mx.messages(); !slices.EqualFunc(got, want, slices.Equal) {
		t.Errorf("transactions %q, want %q", got, want)
	}
	mx = &scriptMX{ehlo: []string{"PIPELINING"}, replies: map[string]string{"RCPT": "552 5.5.3 too many recipients"}}
	v.route("127.0.0.2", newScriptMX(t, mx))
	for _, s := range deliver(t, v.engine(), testJob("example.test", "a@example.test")) {
		wantStatus(t, s, 452, "4.5.3", "552 5.5.3 too many recipients")
	}
}

// A remote that takes none at its limit makes no progress: the
// recipients wait for the retry schedule (or the next MX host), after one
// transaction.
func TestRecipientLimitWithNothingTakenDefers(t *testing.T) {
	v, _ := oneMX(t)
	mx := &scriptMX{ehlo: []string{"PIPELINING"}, replies: map[string]string{"RCPT": "452 4.5.3 too many recipients"}}
	v.route("127.0.0.2", newScriptMX(t, mx))
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test", "b@example.test"))
	for _, s := range st {
		wantStatus(t, s, 452, "4.5.3", "too many recipients")
	}
	if got := strings.Join(mx.verbs(), " "); strings.Count(got, "MAIL") != 1 {
		t.Errorf("commands %s, want one transaction", got)
	}
}

// RFC 9422 §4.2: a remote that says LIMITS RCPTMAX=n gets at most n
// recipients per transaction, so none is refused for the limit. go-smtp's
// server says it for its MaxRecipients.
func TestRCPTMAXSplitsTheRecipientsIntoTransactions(t *testing.T) {
	t.Run("LIMITS", func(t *testing.T) {
		v, _ := oneMX(t)
		mx := &scriptMX{ehlo: []string{"PIPELINING", "LIMITS MAILMAX=1000 rcptmax=2 RCPTDOMAINMAX=1"}, rcptMax: 2}
		v.route("127.0.0.2", newScriptMX(t, mx))
		job := testJob("example.test", "a@example.test", "b@example.test", "c@example.test", "d@example.test", "e@example.test")
		for i, s := range deliver(t, v.engine(), job) {
			if !s.Delivered() {
				t.Errorf("recipient %d: %s", i, s.String())
			}
		}
		if got := strings.Join(mx.verbs(), " "); strings.Count(got, "RCPT") != 5 || strings.Count(got, "MAIL") != 3 {
			t.Errorf("commands %s, want 5 RCPT in 3 transactions", got)
		}
	})
	for _, chunking := range []bool{true, false} {
		t.Run(fmt.Sprintf("go-smtp, BDAT %v", chunking), func(t *testing.T) {
			v, mx := oneMX(t, func(s *smtpServer) { s.MaxRecipients = 2 })
			job := testJob("example.test", "a@example.test", "b@example.test", "c@example.test", "d@example.test", "e@example.test")
			for i, s := range deliver(t, v.engine(func(o *Options) { o.NoChunking = !chunking }), job) {
				if !s.Delivered() {
					t.Errorf("recipient %d: %s", i, s.String())
				}
			}
			if m := mx.messages(); len(m) != 3 || mx.sessionCount() != 1 {
				t.Errorf("%d transactions over %d connections, want 3 over 1", len(m), mx.sessionCount())
			}
		})
	}
}

// What refuses a transaction as a whole refuses it for the recipients
// not yet sent, as in one transaction: they are not sent in another.
func TestTransactionRefusalAppliesToTheRecipientsNotYetSent(t *testing.T) {
	v, _ := oneMX(t)
	mx := &scriptMX{ehlo: []string{"PIPELINING", "LIMITS RCPTMAX=2"}, replies: map[string]string{"DATA": "451 4.3.0 try again later"}}
	v.route("127.0.0.2", newScriptMX(t, mx))
	st := deliver(t, v.engine(), testJob("example.test", "a@example.test", "b@example.test", "c@example.test"))
	for _, s := range st {
		wantStatus(t, s, 451, "4.3.0", "try again later")
	}
	if got := strings.Join(mx.verbs(), " "); strings.Count(got, "MAIL") != 1 {
		t.Errorf("commands %s, want one transaction", got)
	}
}
