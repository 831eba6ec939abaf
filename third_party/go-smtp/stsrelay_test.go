package smtp_test

// Tests of stsrelay's changes to this copy of go-smtp (README.md).

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"log"
	"math/big"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// A connection that ends inside a LAST chunk, short of its size, aborts
// the message: by a TCP close, and by a TLS close_notify, which
// crypto/tls reports as a clean end of the stream.
func TestServerBdatCutShortIsNotAMessage(t *testing.T) {
	for _, useTLS := range []bool{false, true} {
		name := "TCP close"
		if useTLS {
			name = "TLS close_notify"
		}
		t.Run(name, func(t *testing.T) {
			be, s, c, scanner, _ := testServerEhlo(t, func(s *smtp.Server) { s.TLSConfig = selfSigned(t) })
			defer s.Close()
			defer c.Close()
			be.dataErrors = make(chan error, 1)
			if useTLS {
				c, scanner = startTLS(t, c, scanner)
			}
			for _, cmd := range []string{"MAIL FROM:<root@nsa.gov>", "RCPT TO:<root@gchq.gov.uk>"} {
				io.WriteString(c, cmd+"\r\n")
				scanner.Scan()
				if !strings.HasPrefix(scanner.Text(), "250 ") {
					t.Fatalf("%s: %s", cmd, scanner.Text())
				}
			}
			io.WriteString(c, "BDAT 100 LAST\r\nSubject: cut short\r\n\r\n")
			c.Close()
			select {
			case err := <-be.dataErrors:
				if err == nil {
					t.Fatal("a chunk cut short was taken as a whole message")
				}
			case <-time.After(5 * time.Second):
				t.Fatal("Data did not end")
			}
			if len(be.messages)+len(be.anonmsgs) != 0 {
				t.Fatal("a chunk cut short was stored")
			}
		})
	}
}

// The server's writes, which the client cannot see: TCP may join or
// split them.
type writeLog struct {
	net.Listener
	writes chan string
}

func (l writeLog) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return loggedConn{c, l.writes}, nil
}

type loggedConn struct {
	net.Conn
	writes chan string
}

func (c loggedConn) Write(p []byte) (int, error) {
	c.writes <- string(p) // before the bytes go: a client that has them sees the entry
	return c.Conn.Write(p)
}

// A reply goes out in one write; with GroupPipelinedReplies the success
// replies to a pipelined group of RSET, MAIL and RCPT go out with the
// reply that ends the group (RFC 2920 §3.2 (10)), or ahead of a BDAT; a
// reply is never held for a command that has not fully arrived, nor when
// it is an error.
func TestServerSendsRepliesToAPipelinedGroupTogether(t *testing.T) {
	for _, group := range []bool{false, true} {
		t.Run(map[bool]string{false: "default", true: "grouped"}[group], func(t *testing.T) {
			testReplyWrites(t, group)
		})
	}
}

func testReplyWrites(t *testing.T, group bool) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	writes := make(chan string, 100)
	s := smtp.NewServer(new(backend))
	s.Domain = "localhost"
	s.GroupPipelinedReplies = group
	go s.Serve(writeLog{l, writes})
	defer s.Close()
	c, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	r := bufio.NewReader(c)
	// replies reads n replies and returns the server's writes that carried them.
	replies := func(n int) []string {
		t.Helper()
		for n > 0 {
			line, err := r.ReadString('\n')
			if err != nil {
				t.Fatal(err)
			}
			if len(line) > 3 && line[3] == ' ' {
				n--
			}
		}
		var got []string
		for len(writes) > 0 {
			got = append(got, <-writes)
		}
		return got
	}
	// step sends send and wants n replies: in the writes want with
	// GroupPipelinedReplies, else one write each.
	step := func(send string, n int, want ...string) {
		t.Helper()
		io.WriteString(c, send)
		got := replies(n)
		if !group {
			var each []string
			for _, w := range want {
				for _, line := range strings.SplitAfter(w, "\r\n") {
					if line != "" {
						each = append(each, line)
					}
				}
			}
			want = each
		}
		if len(got) != len(want) {
			t.Fatalf("after %q: %d writes %q, want %d", send, len(got), got, len(want))
		}
		for i := range got {
			if !strings.HasPrefix(got[i], want[i]) {
				t.Fatalf("after %q: write %d is %q, want it to start %q", send, i, got[i], want[i])
			}
		}
	}
	step("", 1, "220 ")
	if io.WriteString(c, "EHLO localhost\r\n"); len(replies(1)) != 1 {
		t.Fatal("the EHLO reply came in more than one write")
	}
	step("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n", 4,
		"250 2.0.0 Roger, accepting mail from <a@example.com>\r\n250 2.0.0 I'll make sure <b@example.org> gets this\r\n250 2.0.0 I'll make sure <c@example.org> gets this\r\n354 ")
	step("Subject: x\r\n\r\nhi\r\n.\r\n", 1, "250 ")
	// A BDAT's reply waits for the message to be stored: the group's go first.
	step("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nBDAT 16 LAST\r\nSubject: x\r\n\r\nhi", 3,
		"250 2.0.0 Roger, accepting mail from <a@example.com>\r\n250 2.0.0 I'll make sure <b@example.org> gets this\r\n", "250 ")
	// The next command is not all here: the client may be waiting for
	// this reply before it sends the rest.
	step("RSET\r\nNOOP", 1, "250 2.0.0 Session reset\r\n")
	step("\r\n", 1, "250 ")
	// An error goes at once, with any replies held before it.
	step("RSET\r\nRCPT TO:<b@example.org>\r\nNOOP\r\n", 3, "250 2.0.0 Session reset\r\n5", "250 ")
	// Commands sent one at a time get one write each.
	step("MAIL FROM:<a@example.com>\r\n", 1, "250 ")
	step("RCPT TO:<b@example.org>\r\n", 1, "250 ")
}

// startTLS upgrades a test connection: STARTTLS, the handshake, EHLO.
func startTLS(t *testing.T, c net.Conn, scanner *bufio.Scanner) (net.Conn, *bufio.Scanner) {
	t.Helper()
	io.WriteString(c, "STARTTLS\r\n")
	scanner.Scan()
	if !strings.HasPrefix(scanner.Text(), "220 ") {
		t.Fatalf("STARTTLS: %s", scanner.Text())
	}
	tc := tls.Client(c, &tls.Config{InsecureSkipVerify: true})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	scanner = bufio.NewScanner(tc)
	io.WriteString(tc, "EHLO localhost\r\n")
	for scanner.Scan() && !strings.HasPrefix(scanner.Text(), "250 ") {
	}
	return tc, scanner
}

// selfSigned is a server configuration with a certificate made for the test.
func selfSigned(t *testing.T) *tls.Config {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "localhost"},
		DNSNames:     []string{"localhost"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
}

// A server that offers its EHLO keywords in lower case (RFC 5321 §2.4:
// they are case-insensitive) gets the MAIL and RCPT parameters of
// SMTPUTF8, 8BITMIME, SIZE and DSN, as one offering them in upper case
// does.
func TestClientEhloKeywordsAreCaseInsensitive(t *testing.T) {
	addr, commands := scriptedServer(t, "250-mx.test\r\n250-8bitmime\r\n250-Smtputf8\r\n250-dsn\r\n250 size 1000000\r\n")
	c, err := smtp.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Mail("jöran@example.org", &smtp.MailOptions{UTF8: true, Size: 10, Return: smtp.DSNReturnHeaders}); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("root@example.org", &smtp.RcptOptions{Notify: []smtp.DSNNotify{smtp.DSNNotifySuccess}}); err != nil {
		t.Fatal(err)
	}
	if size, ok := c.MaxMessageSize(); !ok || size != 1000000 {
		t.Errorf("MaxMessageSize() = %d, %v; want 1000000, true", size, ok)
	}
	c.Quit()
	want := []string{
		"EHLO localhost",
		"MAIL FROM:<jöran@example.org> BODY=8BITMIME SIZE=10 SMTPUTF8 RET=HDRS",
		"RCPT TO:<root@example.org> NOTIFY=SUCCESS",
		"QUIT",
	}
	if got := commands(); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("sent %q\nwant %q", got, want)
	}
}

// scriptedServer is an SMTP server on loopback for one connection: it
// greets, answers EHLO with ehloReply (lines with their CRLFs), everything
// else with 250 (221 to QUIT), and keeps the command lines it was sent.
func scriptedServer(t *testing.T, ehloReply string) (addr string, commands func() []string) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	var mu sync.Mutex
	var cmds []string
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "220 mx.test ESMTP\r\n")
		r := bufio.NewScanner(c)
		for r.Scan() {
			mu.Lock()
			cmds = append(cmds, r.Text())
			mu.Unlock()
			switch verb := strings.ToUpper(strings.SplitN(r.Text(), " ", 2)[0]); verb {
			case "EHLO":
				io.WriteString(c, ehloReply)
			case "QUIT":
				io.WriteString(c, "221 bye\r\n")
				return
			default:
				io.WriteString(c, "250 ok\r\n")
			}
		}
	}()
	return l.Addr().String(), func() []string {
		<-done
		mu.Lock()
		defer mu.Unlock()
		return append([]string(nil), cmds...)
	}
}

// Commands pipelined after the reply that closes the session, "Too many
// errors" or QUIT's, are not run: the connection ends there, and nothing
// meets the closed session (which panicked, recovered, in v0.25.1).
func TestServerRunsNothingAfterClosing(t *testing.T) {
	for name, closing := range map[string]string{
		"too many errors": strings.Repeat("FOO\r\n", 4),
		"QUIT":            "QUIT\r\n",
	} {
		t.Run(name, func(t *testing.T) {
			var logged bytes.Buffer
			be, s, c, scanner, _ := testServerEhlo(t, func(s *smtp.Server) { s.ErrorLog = log.New(&logged, "", 0) })
			defer c.Close()
			io.WriteString(c, closing+"MAIL FROM:<root@nsa.gov>\r\nRCPT TO:<root@gchq.gov.uk>\r\nDATA\r\n")
			var replies []string
			c.SetDeadline(time.Now().Add(5 * time.Second))
			for scanner.Scan() {
				replies = append(replies, scanner.Text())
			}
			if err := scanner.Err(); err != nil {
				t.Fatalf("the server did not close the connection: %v; replies %q", err, replies)
			}
			last := replies[len(replies)-1]
			if !strings.HasPrefix(last, "500 5.5.1 Too many errors") && !strings.HasPrefix(last, "221 ") {
				t.Errorf("replies %q go on after the closing one", replies)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if err := s.Shutdown(ctx); err != nil {
				t.Fatal(err)
			}
			if logged.Len() > 0 {
				t.Errorf("the server logged:\n%s", logged.String())
			}
			if len(be.messages)+len(be.anonmsgs) != 0 {
				t.Error("a message was stored")
			}
		})
	}
}

// A response that is not base64, as the initial response or after a
// challenge, is refused with 501 5.5.2 (RFC 4954 §4), and ends the
// attempt; a good one still works after.
func TestServerAuthUndecodableResponseIs501(t *testing.T) {
	_, s, c, scanner, _ := testServerEhlo(t)
	defer s.Close()
	defer c.Close()
	for _, lines := range [][]string{{"AUTH PLAIN !!!"}, {"AUTH PLAIN", "%%%"}} {
		for _, l := range lines {
			io.WriteString(c, l+"\r\n")
			scanner.Scan()
		}
		if got := scanner.Text(); !strings.HasPrefix(got, "501 5.5.2 ") {
			t.Errorf("%q: %q, want 501 5.5.2", lines, got)
		}
	}
	io.WriteString(c, "AUTH PLAIN AHVzZXJuYW1lAHBhc3N3b3Jk\r\n")
	scanner.Scan()
	if got := scanner.Text(); !strings.HasPrefix(got, "235 ") {
		t.Errorf("AUTH after: %q", got)
	}
}

// AUTH inside a mail transaction, after MAIL and before the message's end,
// is refused with 503 5.5.1 (RFC 4954 §4); after RSET it works.
func TestServerAuthDuringMailTransactionIs503(t *testing.T) {
	_, s, c, scanner, _ := testServerEhlo(t)
	defer s.Close()
	defer c.Close()
	for _, step := range []struct{ line, want string }{
		{"MAIL FROM:<root@nsa.gov>", "250 "},
		{"AUTH PLAIN AHVzZXJuYW1lAHBhc3N3b3Jk", "503 5.5.1 "},
		{"RCPT TO:<root@gchq.gov.uk>", "250 "},
		{"AUTH PLAIN", "503 5.5.1 "},
		{"RSET", "250 "},
		{"AUTH PLAIN AHVzZXJuYW1lAHBhc3N3b3Jk", "235 "},
	} {
		io.WriteString(c, step.line+"\r\n")
		scanner.Scan()
		if got := scanner.Text(); !strings.HasPrefix(got, step.want) {
			t.Fatalf("%s: %q, want %s", step.line, got, step.want)
		}
	}
}

// What the server echoes from the client, the EHLO or HELO name and an
// unknown verb, keeps the reply line a reply line (RFC 5321 §4.2): a bare
// CR, other control characters and 8-bit bytes become '?', and a long
// name is cut at 255 octets.
func TestServerEchoesOnlyPrintableText(t *testing.T) {
	_, s, c, _ := testServerGreeted(t)
	defer s.Close()
	defer c.Close()
	r := bufio.NewReader(c)
	c.SetDeadline(time.Now().Add(5 * time.Second))
	for _, tc := range []struct{ cmd, want string }{
		{"EHLO a\rb\x01c\xffd\x7fe", "250-Hello a?b?c?d?e\r\n"},
		{"HELO a\rb", "250 2.0.0 Hello a?b\r\n"},
		{"EHLO " + strings.Repeat("x", 600), "250-Hello " + strings.Repeat("x", 255) + "\r\n"},
		{"X\rYZ", "500 5.5.2 Syntax errors, X?YZ command unrecognized\r\n"},
		{"\xe9\x00ZZ", "500 5.5.2 Syntax errors, ??ZZ command unrecognized\r\n"},
	} {
		io.WriteString(c, tc.cmd+"\r\n")
		got, err := r.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		if got != tc.want {
			t.Errorf("%q: %q, want %q", tc.cmd, got, tc.want)
		}
		for strings.HasPrefix(got, "250-") { // the rest of EHLO's reply
			if got, err = r.ReadString('\n'); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// lockedWriter is an io.Writer for a server's ErrorLog, which goroutines
// of many connections write to.
type lockedWriter struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *lockedWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}

// A client that sends a BDAT command and leaves before any byte of its
// chunk has arrived can close the connection, and with it the session,
// before the goroutine that hands the chunk to Session.Data has run. That goroutine
// found no session and panicked (recovered, and logged) in v0.25.1.
func TestServerBdatGoroutineOutlivesTheSession(t *testing.T) {
	base := runtime.NumGoroutine()
	var logged lockedWriter
	_, s, c, _, _ := testServerEhlo(t, func(s *smtp.Server) { s.ErrorLog = log.New(&logged, "", 0) })
	addr := c.RemoteAddr().String()
	c.Close()
	for i := 0; i < 300; i++ {
		nc, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		// All at once, then the end of the stream, with no byte of the
		// chunk: the server reads BDAT, starts the chunk's goroutine, finds
		// nothing to hand it (so nothing waits for it) and closes, all
		// before that goroutine may have run.
		io.WriteString(nc, "EHLO localhost\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nBDAT 100 LAST\r\n")
		nc.(*net.TCPConn).CloseWrite()
		nc.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.Copy(io.Discard, nc); err != nil {
			t.Fatalf("reading replies: %v", err)
		}
		nc.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	// The chunk goroutines are the server's too: wait for them to end.
	for deadline := time.Now().Add(5 * time.Second); runtime.NumGoroutine() > base && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if got := logged.String(); got != "" {
		t.Errorf("the server logged:\n%.2000s", got)
	}
}

// RFC 5321 §4.2: a reply's text is optional ("Reply-code [ SP textstring ]
// CRLF"). A bare code is a whole reply, also as the last line of a
// multiline one, and so is a code with an empty text.
func TestClientTakesRepliesWithoutText(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	replies := map[string]string{
		"EHLO": "250-mx.test\r\n250-\r\n250-8BITMIME\r\n250\r\n",
		"MAIL": "250\r\n",
		"RCPT": "250 \r\n",
		"DATA": "354\r\n",
		".":    "250\r\n",
		"RSET": "250\r\n",
		"QUIT": "221\r\n",
	}
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "220\r\n")
		r := bufio.NewScanner(c)
		for r.Scan() {
			verb := strings.ToUpper(strings.SplitN(r.Text(), " ", 2)[0])
			if verb == "RCPT" && strings.Contains(r.Text(), "nobody") {
				io.WriteString(c, "550\r\n")
				continue
			}
			if verb == "DATA" {
				io.WriteString(c, replies[verb])
				for r.Scan() && r.Text() != "." {
				}
				verb = "."
			}
			io.WriteString(c, replies[verb])
		}
	}()
	c, err := smtp.Dial(l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello("client.test"); err != nil {
		t.Fatalf("EHLO: %v", err)
	}
	if ok, _ := c.Extension("8BITMIME"); !ok {
		t.Error("8BITMIME, offered before the bare last line, not seen")
	}
	if err := c.Mail("root@example.org", nil); err != nil {
		t.Fatalf("MAIL: %v", err)
	}
	if err := c.Rcpt("root@example.org", nil); err != nil {
		t.Fatalf("RCPT: %v", err)
	}
	var se *smtp.SMTPError
	if err := c.Rcpt("nobody@example.org", nil); !errors.As(err, &se) || se.Code != 550 {
		t.Fatalf("RCPT refused with a bare 550: %v, want an SMTPError with code 550", err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatalf("DATA: %v", err)
	}
	io.WriteString(w, "Subject: bare\r\n\r\nhello\r\n")
	resp, err := w.CloseWithResponse()
	if err != nil {
		t.Fatalf("end of data: %v", err)
	}
	if resp.StatusText != "" {
		t.Errorf("status text %q, want none", resp.StatusText)
	}
	if err := c.Quit(); err != nil {
		t.Errorf("QUIT: %v", err)
	}
}

// A read that fails inside a BDAT chunk, here the read timeout, is a
// network failure, not the message's: 421 4.4.2 rather than v0.25.1's 554
// with the socket error, the backend's Data learns the cause, and the
// connection closes, since the rest of the chunk could still come and be
// read as commands.
func TestServerBdatChunkReadFailureIs421AndCloses(t *testing.T) {
	be, s, c, scanner, _ := testServerEhlo(t, func(s *smtp.Server) { s.ReadTimeout = 200 * time.Millisecond })
	defer s.Close()
	defer c.Close()
	be.dataErrors = make(chan error, 1)
	for _, cmd := range []string{"MAIL FROM:<root@nsa.gov>", "RCPT TO:<root@gchq.gov.uk>"} {
		io.WriteString(c, cmd+"\r\n")
		scanner.Scan()
		if !strings.HasPrefix(scanner.Text(), "250 ") {
			t.Fatalf("%s: %s", cmd, scanner.Text())
		}
	}
	io.WriteString(c, "BDAT 100 LAST\r\nSubject: stalled\r\n\r\n")
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if !scanner.Scan() || !strings.HasPrefix(scanner.Text(), "421 4.4.2 ") {
		t.Fatalf("stalled chunk answered %q (%v), want 421 4.4.2", scanner.Text(), scanner.Err())
	}
	var netErr net.Error
	if err := <-be.dataErrors; !errors.As(err, &netErr) || !netErr.Timeout() {
		t.Errorf("Data got %v, want the read timeout", err)
	}
	io.WriteString(c, "QUIT\r\n")
	if scanner.Scan() {
		t.Errorf("the connection stays open: %q", scanner.Text())
	}
	if len(be.messages)+len(be.anonmsgs) != 0 {
		t.Error("a message was stored")
	}
}

// Server.Limits joins RCPTMAX in the one LIMITS keyword of the EHLO reply,
// each parameter as written, a malformed one too: tests of clients need
// remotes that say MAILMAX (RFC 9422 §4.1), well or badly.
func TestServerAdvertisesLimits(t *testing.T) {
	for _, tc := range []struct {
		rcptMax int
		limits  []string
		want    string
	}{
		{0, nil, ""},
		{2, nil, "LIMITS RCPTMAX=2"},
		{0, []string{"MAILMAX=3"}, "LIMITS MAILMAX=3"},
		{2, []string{"MAILMAX=3", "MAILMAX=abc"}, "LIMITS RCPTMAX=2 MAILMAX=3 MAILMAX=abc"},
	} {
		_, s, c, _, caps := testServerEhlo(t, func(s *smtp.Server) {
			s.MaxRecipients = tc.rcptMax
			s.Limits = tc.limits
		})
		var got []string
		for line := range caps {
			if strings.HasPrefix(line, "LIMITS") {
				got = append(got, line)
			}
		}
		c.Close()
		s.Close()
		if tc.want == "" && len(got) != 0 || tc.want != "" && (len(got) != 1 || got[0] != tc.want) {
			t.Errorf("RCPTMAX %d, Limits %q: EHLO says %q, want %q", tc.rcptMax, tc.limits, got, tc.want)
		}
	}
}

// An unquoted local part ends at the first '@', and a domain holds none
// (RFC 5321 §4.1.2): <a@b@c> is a syntax error, <"a@b"@c> is not.
func TestServerRefusesAnAtSignInTheDomain(t *testing.T) {
	_, s, c, scanner, _ := testServerEhlo(t)
	defer s.Close()
	defer c.Close()
	for _, step := range []struct{ line, want string }{
		{"MAIL FROM:<victim@evil.example@example.com>", "501 "},
		{"MAIL FROM:<root@nsa.gov>", "250 "},
		{"RCPT TO:<user@evil.example@example.org>", "501 "},
		{`RCPT TO:<"a@b"@example.org>`, "250 "},
	} {
		io.WriteString(c, step.line+"\r\n")
		scanner.Scan()
		if got := scanner.Text(); !strings.HasPrefix(got, step.want) {
			t.Errorf("%s: %q, want %s", step.line, got, step.want)
		}
	}
}

// "<Postmaster>" without a domain is a recipient (RFC 5321 §4.1.1.3),
// handed on as written; only the whole word is.
func TestServerTakesPostmasterWithoutADomain(t *testing.T) {
	be, s, c, scanner, _ := testServerEhlo(t)
	defer s.Close()
	defer c.Close()
	for _, step := range []struct{ line, want string }{
		{"MAIL FROM:<root@nsa.gov>", "250 "},
		{"RCPT TO:<postmasterx>", "501 "},
		{"RCPT TO:<postmaster", "501 "},
		{"RCPT TO:<PostMaster>", "250 "},
		{"RCPT TO: <postmaster> ", "250 "},
		{"RCPT TO:<postmaster@example.org>", "250 "},
		{"DATA", "354 "},
		{"Subject: x\r\n\r\nx\r\n.", "250 "},
	} {
		io.WriteString(c, step.line+"\r\n")
		scanner.Scan()
		if got := scanner.Text(); !strings.HasPrefix(got, step.want) {
			t.Errorf("%s: %q, want %s", step.line, got, step.want)
		}
	}
	if len(be.anonmsgs) != 1 || strings.Join(be.anonmsgs[0].To, " ") != "PostMaster postmaster postmaster@example.org" {
		t.Errorf("recipients: %+v", be.anonmsgs)
	}
}

// Replies of RFC 5321 §4.2.4, RFC 3207 §4 and RFC 1870 where v0.25.1 gave
// others: 503 for a command out of order (it said 502, "not
// implemented"), 501 for STARTTLS with a parameter or AUTH without one,
// no STARTTLS for a line that merely begins with it, and 552 for a SIZE
// over the limit however many digits it has (from 4 GiB on it said 501).
func TestServerRepliesBySequenceAndSyntax(t *testing.T) {
	_, s, c, scanner := testServerGreeted(t, func(s *smtp.Server) { s.MaxMessageBytes = 1 << 20 })
	defer s.Close()
	defer c.Close()
	for _, step := range []struct{ line, want string }{
		{"MAIL FROM:<root@nsa.gov>", "503 5.5.1 "},
		{"AUTH PLAIN", "503 5.5.1 "},
		{"EHLO localhost", "250"},
		{"STARTTLS now", "501 5.5.4 "},
		{"STARTTLSX", "501 5.5.2 "},
		{"AUTH", "501 5.5.4 "},
		{"RCPT TO:<root@gchq.gov.uk>", "503 5.5.1 "},
		{"DATA", "503 5.5.1 "},
		{"MAIL FROM:<root@nsa.gov> SIZE=5000000000", "552 5.3.4 "},
		{"MAIL FROM:<root@nsa.gov> SIZE=99999999999999999999", "552 5.3.4 "},
		{"MAIL FROM:<root@nsa.gov> SIZE=12x", "501 5.5.4 "},
		{"MAIL FROM:<root@nsa.gov> SIZE=1000", "250 "},
		{"DATA", "503 5.5.1 "},
	} {
		io.WriteString(c, step.line+"\r\n")
		scanner.Scan()
		for strings.HasPrefix(scanner.Text(), "250-") { // EHLO's reply
			scanner.Scan()
		}
		if got := scanner.Text(); !strings.HasPrefix(got, step.want) {
			t.Errorf("%s: %q, want %s", step.line, got, step.want)
		}
	}
}
