package smtpin

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/netip"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/queue"
)

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func TestSubmitWithAuthOverSTARTTLS(t *testing.T) {
	e := start(t, nil)
	c := e.client(t, true)
	if ok, _ := c.Extension("AUTH"); !ok {
		t.Fatal("AUTH not offered after STARTTLS")
	}
	if err := c.Auth(plainAuth()); err != nil {
		t.Fatalf("AUTH PLAIN: %v", err)
	}
	resp, err := send(t, c, "app@example.com", []string{"rcpt@example.org"}, testMessage)
	if err != nil {
		t.Fatal(err)
	}
	m := e.q.only(t)
	if !strings.Contains(resp.StatusText, "queued as "+m.id) {
		t.Errorf("DATA reply %q does not name queue id %s", resp.StatusText, m.id)
	}
	want := queue.Envelope{
		From:       "app@example.com",
		Recipients: []queue.RecipientParams{{Addr: "rcpt@example.org"}},
		User:       testUser,
		ClientAddr: "127.0.0.1",
		Body8Bit:   true, // go-smtp's client sends BODY=8BITMIME when offered
	}
	// The message had no Message-ID: the envelope carries the one added.
	if added := regexp.MustCompile(`(?m)^Message-ID: (<[A-Z2-7]+@relay\.test>)\r$`).FindStringSubmatch(m.body); added != nil {
		want.MessageID = added[1]
	}
	if !envEqual(m.env, want) {
		t.Errorf("envelope %+v, want %+v", m.env, want)
	}
	if !strings.HasSuffix(m.body, testMessage) {
		t.Errorf("stored body does not end with the submitted message:\n%s", m.body)
	}
	received := regexp.MustCompile(`^Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n\t\(using TLSv1\.3 with cipher TLS_[A-Z0-9_]+\)\r\n\tby relay\.test \(stsrelay\) with ESMTPSA;\r\n\t[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4}\r\n`)
	if !received.MatchString(m.body) {
		t.Errorf("no Received header with TLS details at the top:\n%s", m.body)
	}
	if strings.Contains(m.body, testUser) && strings.Contains(m.body, "authenticated") {
		t.Errorf("Received names the user although ShowAuthUser is off:\n%s", m.body)
	}
	if !regexp.MustCompile(`(?m)^Message-ID: <[A-Z2-7]+@relay\.test>\r$`).MatchString(m.body) {
		t.Errorf("missing Message-ID not added:\n%s", m.body)
	}
	if !regexp.MustCompile(`(?m)^Date: [A-Z][a-z]{2}, `).MatchString(m.body) {
		t.Errorf("missing Date not added:\n%s", m.body)
	}
}

func envEqual(a, b queue.Envelope) bool {
	return reflect.DeepEqual(a, b)
}

func TestSubmitWithAuthLoginOverImplicitTLS(t *testing.T) {
	e := start(t, func(o *Options) { o.ShowAuthUser = true })
	c, err := smtp.DialTLS(e.srv.TLSAddr().String(), e.clientTLS())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Auth(loginClient{testUser, testPassword}); err != nil {
		t.Fatalf("AUTH LOGIN: %v", err)
	}
	if _, err := send(t, c, "app@example.com", []string{"rcpt@example.org"}, testMessage); err != nil {
		t.Fatal(err)
	}
	m := e.q.only(t)
	if m.env.User != testUser {
		t.Errorf("envelope user %q, want %q", m.env.User, testUser)
	}
	if !strings.Contains(m.body, "\t(authenticated user app)\r\n") {
		t.Errorf("Received does not name the user although ShowAuthUser is on:\n%s", m.body)
	}
}

// loginClient is SASL LOGIN; go-sasl's needs the exact server prompts.
type loginClient struct{ user, password string }

func (l loginClient) Start() (string, []byte, error) { return "LOGIN", nil, nil }
func (l loginClient) Next(challenge []byte) ([]byte, error) {
	switch string(challenge) {
	case "Username:":
		return []byte(l.user), nil
	case "Password:":
		return []byte(l.password), nil
	}
	return nil, sasl.ErrUnexpectedServerChallenge
}

func TestAuthLoginWithInitialResponse(t *testing.T) {
	e := start(t, nil)
	d := tlsDialogue(t, e)
	d.cmd("AUTH LOGIN "+b64(testUser), "334 "+b64("Password:"))
	d.cmd(b64(testPassword), "235 2.0.0")
}

func TestAuthRefusedWithoutTLS(t *testing.T) {
	e := start(t, nil) // loopback exemption off, no trusted networks
	d := dial(t, e.srv.Addr())
	ehlo := d.cmd("EHLO client.test", "250")
	if strings.Contains(ehlo, "AUTH") {
		t.Errorf("AUTH offered on a plaintext connection:\n%s", ehlo)
	}
	if !strings.Contains(ehlo, "STARTTLS") {
		t.Errorf("STARTTLS not offered:\n%s", ehlo)
	}
	d.cmd(authPlainLine(testUser, testPassword), "538 5.7.11")
	d.cmd("MAIL FROM:<app@example.com>", "530 5.7.0")
}

func TestAuthWithoutTLSAllowedFromLoopbackWhenConfigured(t *testing.T) {
	e := start(t, func(o *Options) { o.InsecureAuthFromLoopback = true })
	d := dial(t, e.srv.Addr())
	if ehlo := d.cmd("EHLO client.test", "250"); !strings.Contains(ehlo, "AUTH PLAIN LOGIN") {
		t.Errorf("AUTH not offered to loopback:\n%s", ehlo)
	}
	d.cmd(authPlainLine(testUser, testPassword), "235 2.0.0")
	d.cmd("MAIL FROM:<app@example.com>", "250")
}

func TestAuthWithoutTLSAllowedFromTrustedNetwork(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.0/8")} })
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	d.cmd(authPlainLine(testUser, testPassword), "235 2.0.0")
}

// RFC 4954 §4: AUTH is not permitted during a mail transaction, which
// MAIL starts and RSET or the end of the message ends (a BDAT chunk that
// is not the last leaves it open). The sender was checked at MAIL without
// the rights AUTH would bring.
func TestAuthDuringMailTransactionRefused(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	d.cmd("MAIL FROM:<anyone@example.com>", "250")
	d.cmd(authPlainLine(testUser, testPassword), "503 5.5.1")
	d.cmd("RCPT TO:<b@example.org>", "250")
	d.write("BDAT 12\r\nSubject: x\r\n")
	d.expect("250")
	d.cmd(authPlainLine(testUser, testPassword), "503 5.5.1")
	d.write("BDAT 5 LAST\r\n\r\nx\r\n")
	d.expect("250")
	d.cmd("MAIL FROM:<anyone@example.com>", "250")
	d.cmd("RSET", "250")
	d.cmd(authPlainLine(testUser, testPassword), "235")
	if m := e.q.only(t); m.env.User != "" {
		t.Errorf("message stored as user %q, after a refused AUTH", m.env.User)
	}
}

func TestAuthFailsWithWrongPasswordOrUnknownUser(t *testing.T) {
	var logBuf syncBuffer
	e := start(t, func(o *Options) { o.Logger = slog.New(slog.NewTextHandler(&logBuf, nil)) })
	for _, tc := range []struct{ name, user, password, logged string }{
		{"wrong password", testUser, "wrong", "user=" + testUser},
		{"unknown user", "nobody", testPassword, "user=unknown#" + nameHash("nobody")},
		// A password pasted into the user name field stays out of the log.
		{"password as user name", testPassword, "", "user=unknown#" + nameHash(testPassword)},
		{"other authorization identity", "", "", "user=" + testUser},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := e.client(t, true)
			var a sasl.Client = sasl.NewPlainClient("", tc.user, tc.password)
			if tc.user == "" {
				a = sasl.NewPlainClient("admin", testUser, testPassword)
			}
			wantCode(t, c.Auth(a), 535, "5.7.8")
			wantCode(t, c.Mail("app@example.com", nil), 530, "5.7.0")
			if !strings.Contains(logBuf.String(), tc.logged) {
				t.Errorf("log lacks %s:\n%s", tc.logged, logBuf.String())
			}
		})
	}
	if strings.Contains(logBuf.String(), testPassword) || strings.Contains(logBuf.String(), "user=nobody") {
		t.Errorf("a password or an unconfigured user name reached the log:\n%s", logBuf.String())
	}
}

// nameHash is how a user name that is not configured appears in the log.
func nameHash(name string) string {
	sum := sha256.Sum256([]byte(name))
	return hex.EncodeToString(sum[:4])
}

func TestAuthRateLimitedAfterRepeatedFailures(t *testing.T) {
	e := start(t, nil)
	d := tlsDialogue(t, e)
	for range DefaultAuthFailures {
		d.cmd(authPlainLine(testUser, "guess"), "535 5.7.8")
	}
	// Now even the right password is refused, from a new connection too.
	d.cmd(authPlainLine(testUser, testPassword), "454 4.7.0")
	c := e.client(t, true)
	wantCode(t, c.Auth(plainAuth()), 454, "4.7.0")
}

func TestFailedAuthOfOneUserDoesNotLockOutAnother(t *testing.T) {
	var logBuf syncBuffer
	e := start(t, func(o *Options) { o.Logger = slog.New(slog.NewTextHandler(&logBuf, nil)) })
	d := tlsDialogue(t, e)
	// A misconfigured application on the same host uses up its own tries.
	for range DefaultAuthFailures {
		d.cmd(authPlainLine("misconfigured", "old password"), "535 5.7.8")
	}
	d.cmd(authPlainLine("misconfigured", "old password"), "454 4.7.0")
	if !strings.Contains(logBuf.String(), `msg="smtpin: auth refused: too many failed attempts for this user from this client" client=127.0.0.1`) ||
		!strings.Contains(logBuf.String(), "user=unknown#"+nameHash("misconfigured")) {
		t.Errorf("the refusal does not name the (hashed, unconfigured) user tried:\n%s", logBuf.String())
	}
	if strings.Contains(logBuf.String(), "old password") {
		t.Error("a password reached the log")
	}
	// The other application from the same address still gets in.
	c := e.client(t, true)
	if err := c.Auth(plainAuth()); err != nil {
		t.Fatalf("another user from the same client: %v", err)
	}
}

// syncBuffer is a bytes.Buffer safe for a logger and a test at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func TestTheMessagesOwnMessageIDTravelsInTheEnvelope(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	c := e.client(t, false)
	msg := "From: app@example.com\r\nMessage-ID:\r\n <folded.1@app.example.com>\r\nSubject: x\r\n\r\nx\r\n"
	if _, err := send(t, c, "app@example.com", []string{"a@example.org"}, msg); err != nil {
		t.Fatal(err)
	}
	if m := e.q.only(t); m.env.MessageID != "<folded.1@app.example.com>" {
		t.Errorf("envelope Message-ID %q", m.env.MessageID)
	}
}

func TestTrustedNetworkRelaysWithoutAuth(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	c := e.client(t, false)
	if _, err := send(t, c, "bounce-handler@example.com", []string{"a@example.org", "b@example.net"}, testMessage); err != nil {
		t.Fatal(err)
	}
	m := e.q.only(t)
	if m.env.User != "" || len(m.env.Recipients) != 2 {
		t.Errorf("envelope %+v: want no user and two recipients", m.env)
	}
	if !strings.Contains(m.body, "with ESMTP;") {
		t.Errorf("Received does not say plain ESMTP:\n%s", m.body)
	}
}

func TestReceivedSaysSMTPAfterHELO(t *testing.T) {
	// RFC 3848: "SMTP" for a client that greeted with HELO, "ESMTP" for
	// EHLO; a later EHLO in the session counts from then on.
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	d := dial(t, e.srv.Addr())
	send := func(greeting string) {
		t.Helper()
		d.cmd(greeting+" client.test", "250")
		d.cmd("MAIL FROM:<app@example.com>", "250")
		d.cmd("RCPT TO:<a@example.org>", "250")
		d.cmd("DATA", "354")
		d.cmd("From: app@example.com\r\nSubject: x\r\n\r\nx\r\n.", "250")
	}
	send("HELO")
	send("EHLO")
	send("HELO")
	var with []string
	for _, m := range e.q.stored() {
		with = append(with, regexp.MustCompile(`with [A-Z0-9]+;`).FindString(m.body))
	}
	if want := []string{"with SMTP;", "with ESMTP;", "with SMTP;"}; !slices.Equal(with, want) {
		t.Errorf("Received says %q, want %q", with, want)
	}
}

// RFC 5321 §4.5.1: "RCPT TO:<Postmaster>" without a domain is taken by
// every relay, for the postmaster of the relay: Options.Postmaster, by
// default postmaster@Hostname. (Only a client that may relay gets past
// MAIL to ask.)
func TestPostmasterWithoutADomain(t *testing.T) {
	for _, tc := range []struct{ postmaster, want string }{
		{"", "postmaster@relay.test"},
		{"ops@example.com", "ops@example.com"},
		// A client without SMTPUTF8 must reach it too.
		{"ops@Bücher.example.", "ops@xn--bcher-kva.example"},
	} {
		e := start(t, func(o *Options) {
			o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")}
			o.Postmaster = tc.postmaster
		})
		d := dial(t, e.srv.Addr())
		d.cmd("EHLO client.test", "250")
		d.cmd("MAIL FROM:<app@example.com>", "250")
		d.cmd("RCPT TO:<Postmaster>", "250")
		d.cmd("DATA", "354")
		d.cmd("Subject: x\r\n\r\nx\r\n.", "250")
		if m := e.q.only(t); len(m.env.Recipients) != 1 || m.env.Recipients[0].Addr != tc.want {
			t.Errorf("postmaster %q: recipients %+v, want %s", tc.postmaster, m.env.Recipients, tc.want)
		}
	}
	for _, bad := range []string{"ops", "jörg@example.com"} {
		if _, err := New(Options{Hostname: "relay.test", Listen: "127.0.0.1:0", Postmaster: bad}, &memQueue{}); err == nil {
			t.Errorf("postmaster %q was taken", bad)
		}
	}
}

func TestOpenRelayAttemptRefused(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "192.0.2.0/24")} })
	for _, withTLS := range []bool{false, true} {
		c := e.client(t, withTLS)
		wantCode(t, c.Mail("someone@example.com", nil), 530, "5.7.0")
		if err := c.Rcpt("victim@example.org", nil); err == nil {
			t.Fatal("RCPT accepted without MAIL")
		}
	}
	if n := len(e.q.stored()); n != 0 {
		t.Fatalf("queue holds %d messages", n)
	}
}

func TestAllowedSendersRestrictsMailFrom(t *testing.T) {
	e := start(t, func(o *Options) {
		o.Users[0].AllowedSenders = []string{"*@apps.example.com", "alerts@example.com"}
	})
	c := e.client(t, true)
	if err := c.Auth(plainAuth()); err != nil {
		t.Fatal(err)
	}
	for _, ok := range []string{"cron@apps.example.com", "CRON@Apps.Example.com", "alerts@example.com"} {
		if err := c.Mail(ok, nil); err != nil {
			t.Errorf("MAIL FROM:<%s>: %v", ok, err)
		}
		c.Reset()
	}
	for _, bad := range []string{"ceo@example.com", "x@sub.apps.example.com", ""} {
		err := c.Mail(bad, nil)
		wantCode(t, err, 553, "5.7.1")
		c.Reset()
	}
}

func TestAllowedSendersMatchInternationalisedDomainsEitherWay(t *testing.T) {
	// RFC 5890 §2.3.2.1: a U-label and its A-label are one name. A
	// pattern written in either form matches a sender in either, the
	// UTF-8 one under SMTPUTF8 (RFC 6531).
	e := start(t, func(o *Options) {
		o.Users[0].AllowedSenders = []string{"*@Bücher.example", "alerts@xn--caf-dma.example"}
	})
	d := authedDialogue(t, e)
	for _, ok := range []string{"<a@bücher.example> SMTPUTF8", "<a@xn--bcher-kva.example>", "<a@XN--BCHER-KVA.Example>",
		"<alerts@café.example> SMTPUTF8", "<alerts@xn--caf-dma.example>"} {
		d.cmd("MAIL FROM:"+ok, "250")
		d.cmd("RSET", "250")
	}
	for _, bad := range []string{"<a@bucher.example>", "<a@xn--bcher-kva.example.com>", "<other@café.example> SMTPUTF8", "<a@xn--zz.example>"} {
		d.cmd("MAIL FROM:"+bad, "553 5.7.1")
	}
	if _, err := New(Options{Hostname: "relay.test", Listen: "127.0.0.1:0", Users: []User{{Name: "u", PasswordHash: userHash(t),
		AllowedSenders: []string{"*@bücher..example"}}}}, &memQueue{}); err == nil || !strings.Contains(err.Error(), "not a domain name") {
		t.Errorf("a pattern whose domain is no IDNA name: %v", err)
	}
}

func TestMessageLargerThanLimitRejected(t *testing.T) {
	e := start(t, func(o *Options) { o.MaxMessageSize = 1000 })
	big := "Subject: big\r\n\r\n" + strings.Repeat(strings.Repeat("x", 98)+"\r\n", 20)

	t.Run("SIZE parameter", func(t *testing.T) {
		d := authedDialogue(t, e)
		// SIZE without a number (RFC 1870 §4): see Options.MaxMessageSize.
		if ehlo := d.cmd("EHLO client.test", "250"); !strings.Contains(ehlo, "250-SIZE\r\n") {
			t.Errorf("EHLO does not announce SIZE:\n%s", ehlo)
		}
		d.cmd("MAIL FROM:<app@example.com> SIZE=5000", "552 5.3.4")
		d.cmd("MAIL FROM:<app@example.com> SIZE=1001", "552 5.3.4")
		d.cmd("MAIL FROM:<app@example.com> SIZE=1000", "250")
	})
	t.Run("DATA", func(t *testing.T) {
		c := e.client(t, true)
		c.Auth(plainAuth())
		_, err := send(t, c, "app@example.com", []string{"r@example.org"}, big)
		wantCode(t, err, 552, "5.3.4")
		// The session is still usable.
		if _, err := send(t, c, "app@example.com", []string{"r@example.org"}, testMessage); err != nil {
			t.Fatalf("next message after a rejected one: %v", err)
		}
	})
	t.Run("BDAT", func(t *testing.T) {
		d := authedDialogue(t, e)
		d.cmd("MAIL FROM:<app@example.com>", "250")
		d.cmd("RCPT TO:<r@example.org>", "250")
		chunk := strings.Repeat(strings.Repeat("x", 98)+"\r\n", 20)
		d.write("BDAT " + itoa(len(chunk)) + " LAST\r\n" + chunk)
		d.expect("552 5.3.4")
	})
	if n := len(e.q.stored()); n != 1 {
		t.Fatalf("queue holds %d messages, want only the small one", n)
	}
}

// authedDialogue is a raw session after STARTTLS and AUTH.
func authedDialogue(t *testing.T, e *testEnv) *dialogue {
	t.Helper()
	d := tlsDialogue(t, e)
	d.cmd(authPlainLine(testUser, testPassword), "235")
	return d
}

// tlsDialogue is a dialogue past STARTTLS and the EHLO after it.
func tlsDialogue(t *testing.T, e *testEnv) *dialogue {
	t.Helper()
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	d.cmd("STARTTLS", "220")
	d.starttls(e.clientTLS())
	d.cmd("EHLO client.test", "250")
	return d
}

func TestTooManyRecipientsRejected(t *testing.T) {
	e := start(t, func(o *Options) { o.MaxRecipients = 2 })
	d := authedDialogue(t, e)
	d.cmd("MAIL FROM:<app@example.com>", "250")
	d.cmd("RCPT TO:<a@example.org>", "250")
	d.cmd("RCPT TO:<b@example.org>", "250")
	d.cmd("RCPT TO:<c@example.org>", "452 4.5.3")
	d.cmd("DATA", "354")
	d.write(testMessage + ".\r\n")
	d.expect("250")
	if got := e.q.only(t).env.Recipients; len(got) != 2 {
		t.Fatalf("stored %d recipients, want 2", len(got))
	}
}

func TestLongLineRejected(t *testing.T) {
	e := start(t, func(o *Options) { o.MaxLineLength = 200 })
	t.Run("DATA", func(t *testing.T) {
		d := authedDialogue(t, e)
		d.cmd("MAIL FROM:<app@example.com>", "250")
		d.cmd("RCPT TO:<a@example.org>", "250")
		d.cmd("DATA", "354")
		d.write("Subject: x\r\n\r\n" + strings.Repeat("y", 300) + "\r\n.\r\n")
		d.expect("554 5.6.0")
	})
	t.Run("BDAT", func(t *testing.T) {
		d := authedDialogue(t, e)
		d.cmd("MAIL FROM:<app@example.com>", "250")
		d.cmd("RCPT TO:<a@example.org>", "250")
		msg := "Subject: x\r\n\r\n" + strings.Repeat("y", 300) + "\r\n"
		d.write("BDAT " + itoa(len(msg)) + " LAST\r\n" + msg)
		// Our check answers 554 5.6.0; go-smtp's own line limit also
		// counts chunk bytes read ahead with the BDAT command, and then
		// answers 500 5.4.0 and closes. Either way nothing is queued.
		d.expect("5")
	})
	if n := len(e.q.stored()); n != 0 {
		t.Fatalf("queue holds %d messages", n)
	}
}

func TestBadAddressSyntaxNamesTheAddress(t *testing.T) {
	e := start(t, nil)
	d := authedDialogue(t, e)
	r := d.cmd("MAIL FROM:<app@exa mple..com>", "5")
	if !strings.HasPrefix(r, "501 5.5.2") && !strings.HasPrefix(r, "501 5.1.7") {
		t.Fatalf("got %q", r)
	}
	if r := d.cmd("MAIL FROM:<app@example..com>", "501 5.1.7"); !strings.Contains(r, "app@example..com") {
		t.Errorf("reply %q does not quote the address", r)
	}
	d.cmd("MAIL FROM:<app@example.com>", "250")
	if r := d.cmd("RCPT TO:<who@-bad-.example>", "501 5.1.3"); !strings.Contains(r, "who@-bad-.example") {
		t.Errorf("reply %q does not quote the address", r)
	}
	d.cmd("RCPT TO:<jörg@example.org>", "553 5.6.7") // no SMTPUTF8 on MAIL
}

func TestPipelinedCommandsAnsweredInOrder(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	d := dial(t, e.srv.Addr())
	if ehlo := d.cmd("EHLO client.test", "250"); !strings.Contains(ehlo, "PIPELINING") || !strings.Contains(ehlo, "CHUNKING") {
		t.Fatalf("PIPELINING/CHUNKING not offered:\n%s", ehlo)
	}
	// RFC 2920: the whole transaction in one write.
	d.write("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<bad@@x>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n")
	d.expect("250")
	d.expect("250")
	d.expect("501")
	d.expect("250")
	d.expect("354")
	d.write(testMessage + ".\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<d@example.org>\r\nBDAT 10 LAST\r\nSubject: yNOOP\r\n")
	d.expect("250 2.0.0 Ok: queued as Q0001")
	d.expect("250")
	d.expect("250")
	d.expect("250 2.0.0 Ok: queued as Q0002")
	d.expect("250")
	msgs := e.q.stored()
	if len(msgs) != 2 || len(msgs[0].env.Recipients) != 2 || msgs[1].env.Recipients[0].Addr != "d@example.org" {
		t.Fatalf("stored %+v", msgs)
	}
	if !strings.HasSuffix(msgs[1].body, "\r\nSubject: y\r\n") {
		t.Errorf("BDAT message without final CRLF not completed: %q", msgs[1].body)
	}
}

// A man in the middle appends commands to the client's STARTTLS; they
// must not be run inside the TLS session (CVE-2011-0411 class).
func TestSTARTTLSDiscardsPipelinedCommands(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	d.write("STARTTLS\r\nEHLO evil.test\r\nMAIL FROM:<evil@example.com>\r\n")
	d.expect("220")
	d.starttls(e.clientTLS())
	// Had the injected MAIL run in the TLS session, RCPT would be accepted.
	d.cmd("RCPT TO:<victim@example.org>", "503 5.5.1")
	d.cmd("EHLO client.test", "250")
	d.cmd("RCPT TO:<victim@example.org>", "503 5.5.1")
}

func TestSmugglingAttemptsRejected(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	for name, end := range map[string]string{
		`\n.\n`:   "\n.\n",
		`\r.\r`:   "\r.\r",
		`\n.\r\n`: "\n.\r\n",
		`\r.\r\n`: "\r.\r\n",
	} {
		t.Run(name, func(t *testing.T) {
			d := dial(t, e.srv.Addr())
			d.cmd("EHLO client.test", "250")
			d.cmd("MAIL FROM:<a@example.com>", "250")
			d.cmd("RCPT TO:<b@example.org>", "250")
			d.cmd("DATA", "354")
			d.write("Subject: first\r\n\r\nfirst" + end +
				"MAIL FROM:<admin@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n")
			d.expect("554 5.5.2")
			// One reply for the whole DATA: the smuggled commands were data.
			d.cmd("NOOP", "250")
		})
	}
	t.Run("BDAT", func(t *testing.T) {
		d := dial(t, e.srv.Addr())
		d.cmd("EHLO client.test", "250")
		d.cmd("MAIL FROM:<a@example.com>", "250")
		d.cmd("RCPT TO:<b@example.org>", "250")
		chunk := "Subject: first\r\n\r\nfirst\n.\nMAIL FROM:<admin@example.com>\r\n"
		d.write("BDAT " + itoa(len(chunk)) + " LAST\r\n" + chunk)
		d.expect("554 5.5.2")
		d.cmd("NOOP", "250")
	})
	if n := len(e.q.stored()); n != 0 {
		t.Fatalf("queue holds %d messages", n)
	}
}

func TestAuthNotOfferedWithoutUsers(t *testing.T) {
	e := start(t, func(o *Options) { o.Users = nil })
	c := e.client(t, true)
	if ok, _ := c.Extension("AUTH"); ok {
		t.Fatal("AUTH offered with no users configured")
	}
	wantCode(t, c.Auth(plainAuth()), 502, "5.7.0")
}

func TestQueueFailureAnswers451(t *testing.T) {
	e := start(t, nil)
	e.q.setFail(errFake("disk full"))
	c := e.client(t, true)
	c.Auth(plainAuth())
	_, err := send(t, c, "app@example.com", []string{"r@example.org"}, testMessage)
	wantCode(t, err, 451, "4.3.0")
	var se *smtp.SMTPError
	if errorsAs(err, &se) && strings.Contains(se.Message, "disk full") {
		t.Errorf("reply leaks the queue's internal error: %q", se.Message)
	}
}

// A full disk is a condition the client can wait out: 452 4.3.1 (RFC 3463
// X.3.1), not the generic 451 4.3.0.
func TestQueueFullDiskAnswers452(t *testing.T) {
	e := start(t, nil)
	e.q.setFail(fmt.Errorf("%w (spool file: %w)", queue.ErrNoSpace, syscall.ENOSPC))
	c := e.client(t, true)
	c.Auth(plainAuth())
	_, err := send(t, c, "app@example.com", []string{"r@example.org"}, testMessage)
	wantCode(t, err, 452, "4.3.1")
}

type errFake string

func (e errFake) Error() string { return string(e) }

func TestDSNAndRequireTLSCarriedToQueue(t *testing.T) {
	e := start(t, nil)
	d := authedDialogue(t, e)
	ehlo := d.cmd("EHLO client.test", "250")
	for _, ext := range []string{"8BITMIME", "SMTPUTF8", "DSN", "REQUIRETLS", "CHUNKING", "PIPELINING"} {
		if !strings.Contains(ehlo, ext) {
			t.Errorf("EHLO under TLS lacks %s:\n%s", ext, ehlo)
		}
	}
	d.cmd("MAIL FROM:<app@example.com> BODY=8BITMIME SMTPUTF8 REQUIRETLS RET=HDRS ENVID=msg+2B1", "250")
	d.cmd("RCPT TO:<jörg@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;orig+40example.org", "250")
	d.cmd("RCPT TO:<b@example.org> NOTIFY=NEVER", "250")
	d.cmd("DATA", "354")
	d.write("TLS-Required: No\r\n" + testMessage + ".\r\n")
	d.expect("250")
	want := queue.Envelope{
		From: "app@example.com",
		Recipients: []queue.RecipientParams{
			{Addr: "jörg@example.org", Notify: []string{"SUCCESS", "FAILURE"}, ORcpt: "RFC822;orig@example.org"},
			{Addr: "b@example.org", Notify: []string{"NEVER"}},
		},
		User:       testUser,
		ClientAddr: "127.0.0.1",
		Body8Bit:   true,
		SMTPUTF8:   true,
		RequireTLS: true,
		Ret:        "HDRS",
		EnvID:      "msg+1",
		// NoTLSPolicy stays false: REQUIRETLS wins over the header (RFC 8689 §5).
	}
	m := e.q.only(t)
	if m.env.MessageID == "" || !strings.Contains(m.body, "Message-ID: "+m.env.MessageID+"\r\n") {
		t.Errorf("envelope Message-ID %q is not the message's", m.env.MessageID)
	}
	want.MessageID = m.env.MessageID
	if !envEqual(m.env, want) {
		t.Errorf("envelope\n %+v\nwant\n %+v", m.env, want)
	}
	if !strings.Contains(m.body, "with UTF8SMTPSA;") {
		t.Errorf("Received lacks UTF8SMTPSA:\n%s", m.body)
	}
}

// RFC 6152 §3: 8-bit text must not go to a server without 8BITMIME. Many
// clients send it without BODY=8BITMIME, or even with BODY=7BIT, so the
// message is marked 8-bit by what it holds, by DATA and by BDAT; a
// declared BODY=8BITMIME is kept as it is.
func Test8BitBodyIsMarked8BitWhateverBodyDeclared(t *testing.T) {
	const text8 = "From: app@example.com\r\nSubject: test\r\nContent-Type: text/plain; charset=utf-8\r\n" +
		"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"
	for _, c := range []struct {
		name, mail, text string
		bdat, want       bool
	}{
		{"undeclared", "MAIL FROM:<app@example.com>", text8, false, true},
		{"BODY=7BIT", "MAIL FROM:<app@example.com> BODY=7BIT", text8, false, true},
		{"undeclared BDAT", "MAIL FROM:<app@example.com>", text8, true, true},
		{"8-bit header", "MAIL FROM:<app@example.com>", "Subject: K\xc3\xb6ln\r\n\r\nx\r\n", false, true},
		{"7-bit", "MAIL FROM:<app@example.com>", testMessage, false, false},
		{"7-bit BDAT", "MAIL FROM:<app@example.com>", testMessage, true, false},
		{"BODY=8BITMIME 7-bit", "MAIL FROM:<app@example.com> BODY=8BITMIME", testMessage, false, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.0/8")} })
			d := dial(t, e.srv.Addr())
			d.cmd("EHLO client.test", "250")
			d.cmd(c.mail, "250")
			d.cmd("RCPT TO:<someone@example.org>", "250")
			if c.bdat {
				d.write("BDAT " + itoa(len(c.text)) + " LAST\r\n" + c.text)
			} else {
				d.cmd("DATA", "354")
				d.write(c.text + ".\r\n")
			}
			d.expect("250 ")
			if m := e.q.only(t); m.env.Body8Bit != c.want {
				t.Errorf("stored with Body8Bit=%v, want %v", m.env.Body8Bit, c.want)
			}
		})
	}
}

func TestTLSRequiredNoHeaderSetsNoTLSPolicy(t *testing.T) {
	e := start(t, nil)
	c := e.client(t, true)
	c.Auth(plainAuth())
	msg := "Subject: a\r\nTLS-Required:\r\n  no\r\n\r\nbody\r\n"
	if _, err := send(t, c, "app@example.com", []string{"r@example.org"}, msg); err != nil {
		t.Fatal(err)
	}
	if _, err := send(t, c, "app@example.com", []string{"r@example.org"}, testMessage); err != nil {
		t.Fatal(err)
	}
	msgs := e.q.stored()
	if !msgs[0].env.NoTLSPolicy {
		t.Error("TLS-Required: No (folded) did not set NoTLSPolicy")
	}
	if msgs[1].env.NoTLSPolicy {
		t.Error("NoTLSPolicy set without the header")
	}
}

func TestRequireTLSRefusedOnPlaintext(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	d := dial(t, e.srv.Addr())
	if ehlo := d.cmd("EHLO client.test", "250"); strings.Contains(ehlo, "REQUIRETLS") {
		t.Errorf("REQUIRETLS offered without TLS:\n%s", ehlo)
	}
	d.cmd("MAIL FROM:<a@example.com> REQUIRETLS", "530 5.7.10")
}

func TestExistingMessageIDAndDateKept(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	c := e.client(t, false)
	msg := "message-id: <x@example.com>\r\nDATE: Mon, 23 Nov 2026 10:00:00 +0000\r\n" + testMessage
	if _, err := send(t, c, "a@example.com", []string{"b@example.org"}, msg); err != nil {
		t.Fatal(err)
	}
	body := e.q.only(t).body
	if strings.Count(strings.ToLower(body), "message-id:") != 1 || strings.Count(strings.ToLower(body), "\ndate:") != 1 {
		t.Errorf("Message-ID or Date added although present:\n%s", body)
	}
}

// RFC 5322 §4.5.3 (obs-optional): a field name may be followed by white
// space before its colon, and a receiver must accept it. Such a field is
// a header field, not the start of the body: the message's own Message-ID
// and Date further down are found, none is added, and the envelope (and
// so the log line) carries the message's own Message-ID.
func TestObsoleteHeaderSyntaxKeepsTheMessagesOwnMessageIDAndDate(t *testing.T) {
	for _, msg := range []string{
		"Subject : hello\r\nFrom: app@example.com\r\nMessage-ID: <own@example.com>\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\nx\r\n",
		"From: app@example.com\r\nMessage-ID\t : <own@example.com>\r\nDate : Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\nx\r\n",
	} {
		e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
		c := e.client(t, false)
		if _, err := send(t, c, "app@example.com", []string{"a@example.org"}, msg); err != nil {
			t.Fatal(err)
		}
		m := e.q.only(t)
		lower := strings.ToLower(m.body)
		if strings.Count(lower, "\nmessage-id") != 1 || strings.Count(lower, "\ndate") != 1 {
			t.Errorf("%q stored with a Message-ID or Date added:\n%s", msg, m.body)
		}
		if m.env.MessageID != "<own@example.com>" {
			t.Errorf("%q: envelope Message-ID %q, want the message's own", msg, m.env.MessageID)
		}
	}
}

// RFC 5321 §6.3: a message with more Received fields than MaxHops (100 by
// default, the least the RFC suggests) has gone round a loop of relays,
// and is refused with 554 5.4.6 (RFC 3463: routing loop detected) rather
// than relayed once more; fewer pass, by DATA and by BDAT.
func TestMailLoopRefusedByCountingReceivedFields(t *testing.T) {
	received := func(n int) string {
		var b strings.Builder
		for i := range n {
			fmt.Fprintf(&b, "Received: from relay%d.example.net (relay%d.example.net [192.0.2.%d])\r\n\tby relay.example.org; Mon, 23 Nov 2026 10:00:00 +0000\r\n", i, i, i%250)
		}
		return b.String()
	}
	for _, c := range []struct {
		name  string
		hops  int
		opts  func(*Options)
		bdat  bool
		reply string
	}{
		{"150 hops", 150, nil, false, "554 5.4.6"},
		{"150 hops BDAT", 150, nil, true, "554 5.4.6"},
		{"101 hops", DefaultMaxHops + 1, nil, false, "554 5.4.6"},
		{"100 hops", DefaultMaxHops, nil, false, "250 "},
		{"20 hops", 20, nil, false, "250 "},
		{"20 hops, limit 10", 20, func(o *Options) { o.MaxHops = 10 }, false, "554 5.4.6"},
		{"10 hops, limit 10", 10, func(o *Options) { o.MaxHops = 10 }, true, "250 "},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := start(t, func(o *Options) {
				o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")}
				if c.opts != nil {
					c.opts(o)
				}
			})
			d := dial(t, e.srv.Addr())
			d.cmd("EHLO client.test", "250")
			d.cmd("MAIL FROM:<a@example.com>", "250")
			d.cmd("RCPT TO:<b@example.org>", "250")
			msg := received(c.hops) + testMessage
			if c.bdat {
				d.write("BDAT " + itoa(len(msg)) + " LAST\r\n" + msg)
			} else {
				d.cmd("DATA", "354")
				d.write(msg + ".\r\n")
			}
			d.expect(c.reply)
			want := 0
			if c.reply == "250 " {
				want = 1
			}
			if n := len(e.q.stored()); n != want {
				t.Fatalf("queue holds %d messages, want %d", n, want)
			}
			d.cmd("NOOP", "250") // the session goes on
		})
	}
}

func TestHeaderSectionLargerThanLimitRejected(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")} })
	c := e.client(t, false)
	msg := strings.Repeat("X-Filler: "+strings.Repeat("z", 900)+"\r\n", maxHeaderBytes/900+2) + "\r\nbody\r\n"
	_, err := send(t, c, "a@example.com", []string{"b@example.org"}, msg)
	wantCode(t, err, 552, "5.3.4")
}

func TestConnectionsPerIPCapped(t *testing.T) {
	e := start(t, func(o *Options) { o.MaxConnsPerIP = 2 })
	d1 := dial(t, e.srv.Addr())
	dial(t, e.srv.Addr())
	d3 := newRawConn(t, e.srv.Addr())
	d3.expect("421 4.7.0")
	// A slot frees when a client leaves.
	d1.cmd("QUIT", "221")
	waitFor(t, func() bool {
		e.srv.mu.Lock()
		defer e.srv.mu.Unlock()
		return len(e.srv.conns) == 1
	})
	dial(t, e.srv.Addr())
}

func TestTrustedNetworksAreNotCappedPerIP(t *testing.T) {
	e := start(t, func(o *Options) {
		o.MaxConnsPerIP = 2
		o.TrustedNetworks = []netip.Prefix{mustPrefix(t, "127.0.0.1/32")}
	})
	for range 4 {
		dial(t, e.srv.Addr()) // fails the test on a 421 greeting
	}
}

func TestNoSessionTicketsByDefault(t *testing.T) {
	for _, tickets := range []bool{false, true} {
		e := start(t, func(o *Options) { o.SessionTickets = tickets })
		conf := e.clientTLS()
		conf.ClientSessionCache = tls.NewLRUClientSessionCache(4)
		conf.MaxVersion = tls.VersionTLS12 // resumption visible after one handshake
		var resumed bool
		for range 2 {
			c, err := smtp.DialStartTLS(e.srv.Addr().String(), conf)
			if err != nil {
				t.Fatal(err)
			}
			if err := c.Noop(); err != nil {
				t.Fatal(err)
			}
			st, _ := c.TLSConnectionState()
			resumed = st.DidResume
			c.Quit()
		}
		if resumed != tickets {
			t.Errorf("SessionTickets=%v: second handshake resumed=%v", tickets, resumed)
		}
	}
}

func TestMinimumTLSVersionIs12(t *testing.T) {
	e := start(t, nil)
	conf := e.clientTLS()
	conf.MaxVersion = tls.VersionTLS11
	if _, err := smtp.DialTLS(e.srv.TLSAddr().String(), conf); err == nil {
		t.Fatal("TLS 1.1 handshake succeeded")
	}
}

// RFC 5321 §4.1.2, §4.1.3: a quoted local part may hold an '@', and the
// IPv6 tag of an address literal is case-insensitive. Both are stored as
// written, so delivery sends them on unchanged.
func TestQuotedLocalPartAndIPv6LiteralAccepted(t *testing.T) {
	e := start(t, nil)
	d := authedDialogue(t, e)
	d.cmd("MAIL FROM:<app@example.com>", "250")
	d.cmd(`RCPT TO:<"a@b"@example.org>`, "250")
	d.cmd("RCPT TO:<user@[ipv6:2001:db8::1]>", "250")
	d.cmd("DATA", "354")
	d.write(testMessage + ".\r\n")
	d.expect("250")
	got := e.q.only(t).env.Recipients
	if len(got) != 2 || got[0].Addr != `"a@b"@example.org` || got[1].Addr != "user@[ipv6:2001:db8::1]" {
		t.Fatalf("stored %+v", got)
	}
}

// A local part with an '@' must be quoted: <victim@evil.example@example.com>
// is refused, not stored as "victim@evil.example"@example.com, an address
// the client never sent (and that an AllowedSenders pattern on
// example.com would let through).
func TestUnquotedAtSignInTheLocalPartRefused(t *testing.T) {
	e := start(t, nil)
	d := authedDialogue(t, e)
	d.cmd("MAIL FROM:<victim@evil.example@example.com>", "501")
	d.cmd("MAIL FROM:<app@example.com>", "250")
	d.cmd("RCPT TO:<user@evil.example@example.org>", "501")
	d.cmd(`RCPT TO:<"user@evil.example"@example.org>`, "250")
	d.cmd("DATA", "354")
	d.write(testMessage + ".\r\n")
	d.expect("250")
	if got := e.q.only(t).env.Recipients; len(got) != 1 || got[0].Addr != `"user@evil.example"@example.org` {
		t.Fatalf("stored %+v", got)
	}
}

// RFC 5321 §4.5.3.1.6: a message line holds at most 998 octets before its
// CRLF. stsrelay refuses a longer one at submission, by DATA and by BDAT,
// with the default options; a line of exactly 998 octets passes.
func TestMessageLineOver998OctetsRejected(t *testing.T) {
	e := start(t, nil)
	send := func(t *testing.T, bdat bool, n int, want string) {
		d := authedDialogue(t, e)
		d.cmd("MAIL FROM:<app@example.com>", "250")
		d.cmd("RCPT TO:<a@example.org>", "250")
		msg := "Subject: x\r\n\r\n" + strings.Repeat("y", n) + "\r\n"
		if bdat {
			d.write("BDAT " + itoa(len(msg)) + " LAST\r\n" + msg)
		} else {
			d.cmd("DATA", "354")
			d.write(msg + ".\r\n")
		}
		if r := d.expect(want); want != "250" && !strings.Contains(r, "998 octets") {
			t.Errorf("reply %q does not say the limit", r)
		}
	}
	for _, bdat := range []bool{false, true} {
		send(t, bdat, 999, "554 5.6.0")
		send(t, bdat, 1500, "554 5.6.0")
	}
	if n := len(e.q.stored()); n != 0 {
		t.Fatalf("queue holds %d messages with long lines", n)
	}
	send(t, false, 998, "250")
	send(t, true, 998, "250")
}
