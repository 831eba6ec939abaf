package smtpin

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"

	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/queue"
)

// memQueue is the queue boundary: it keeps messages in memory, or fails
// when told to.
type memQueue struct {
	mu   sync.Mutex
	msgs []stored
	fail error
	next int
	// hang makes Enqueue wait for its context, as a stuck disk would;
	// returned is closed when such an Enqueue has returned.
	hang     bool
	returned chan struct{}
}

type stored struct {
	id   string
	env  queue.Envelope
	body string
}

func (q *memQueue) Enqueue(ctx context.Context, env queue.Envelope, body io.Reader) (string, error) {
	b, err := io.ReadAll(body)
	if err != nil {
		return "", fmt.Errorf("read message: %w", err)
	}
	if r, ok := body.(queue.Body8BitReporter); ok && r.Body8Bit() {
		env.Body8Bit = true // as queue.Enqueue does
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.hang {
		q.mu.Unlock()
		<-ctx.Done()
		time.Sleep(100 * time.Millisecond) // slow to notice
		close(q.returned)
		q.mu.Lock()
		return "", ctx.Err()
	}
	if q.fail != nil {
		return "", q.fail
	}
	q.next++
	id := fmt.Sprintf("Q%04d", q.next)
	q.msgs = append(q.msgs, stored{id: id, env: env, body: string(b)})
	return id, nil
}

func (q *memQueue) stored() []stored {
	q.mu.Lock()
	defer q.mu.Unlock()
	return append([]stored(nil), q.msgs...)
}

func (q *memQueue) only(t *testing.T) stored {
	t.Helper()
	m := q.stored()
	if len(m) != 1 {
		t.Fatalf("queue holds %d messages, want 1", len(m))
	}
	return m[0]
}

const (
	testUser     = "app"
	testPassword = "correct horse battery staple"
)

var (
	testHashOnce sync.Once
	testHash     string
)

// userHash is a low-cost hash so tests stay fast.
func userHash(t testing.TB) string {
	testHashOnce.Do(func() {
		h, err := bcrypt.GenerateFromPassword([]byte(testPassword), bcrypt.MinCost)
		if err != nil {
			t.Fatal(err)
		}
		testHash = string(h)
	})
	return testHash
}

type testEnv struct {
	srv *Server
	q   *memQueue
	ca  *testpki.CA
}

// start runs a server on 127.0.0.1 with a certificate for "localhost",
// the test user, and whatever edit changes.
func start(t *testing.T, edit func(*Options)) *testEnv {
	t.Helper()
	ca := testpki.NewCA(t)
	cert := ca.Issue(t, "localhost", "127.0.0.1")
	opts := Options{
		Hostname:       "relay.test",
		Listen:         "127.0.0.1:0",
		ListenTLS:      "127.0.0.1:0",
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &cert, nil },
		Users:          []User{{Name: testUser, PasswordHash: userHash(t)}},
		Logger:         slog.New(slog.NewTextHandler(newTestWriter(t), nil)),
	}
	if edit != nil {
		edit(&opts)
	}
	q := &memQueue{}
	srv, err := New(opts, q)
	if err != nil {
		t.Fatal(err)
	}
	srv.authFailDelay = 0
	if err := srv.Listen(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve() }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil && !errors.Is(err, ErrServerClosed) {
			t.Errorf("Shutdown: %v", err)
		}
		// A test that ends before the goroutine reaches Serve gets
		// ErrServerClosed from it, as documented.
		if err := <-done; err != nil && !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve: %v", err)
		}
	})
	return &testEnv{srv: srv, q: q, ca: ca}
}

// testWriter sends log output to t.Log until the test's cleanup is done;
// a session goroutine may still log after that.
type testWriter struct {
	t    *testing.T
	mu   *sync.Mutex
	done *bool
}

func newTestWriter(t *testing.T) testWriter {
	w := testWriter{t: t, mu: new(sync.Mutex), done: new(bool)}
	t.Cleanup(func() {
		w.mu.Lock()
		*w.done = true
		w.mu.Unlock()
	})
	return w
}

func (w testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !*w.done {
		w.t.Log(strings.TrimSuffix(string(p), "\n"))
	}
	return len(p), nil
}

func (e *testEnv) clientTLS() *tls.Config {
	return &tls.Config{RootCAs: e.ca.Pool, ServerName: "localhost"}
}

// client dials the STARTTLS port with go-smtp's client, says EHLO and,
// if withTLS, starts TLS.
func (e *testEnv) client(t *testing.T, withTLS bool) *smtp.Client {
	t.Helper()
	var c *smtp.Client
	var err error
	if withTLS {
		c, err = smtp.DialStartTLS(e.srv.Addr().String(), e.clientTLS())
	} else {
		c, err = smtp.Dial(e.srv.Addr().String())
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	return c
}

func plainAuth() sasl.Client { return sasl.NewPlainClient("", testUser, testPassword) }

const testMessage = "From: app@example.com\r\nTo: rcpt@example.org\r\nSubject: test\r\n\r\nHello.\r\n"

// send runs one transaction and returns the DATA reply.
func send(t *testing.T, c *smtp.Client, from string, to []string, msg string) (*smtp.DataResponse, error) {
	t.Helper()
	if err := c.Mail(from, nil); err != nil {
		return nil, err
	}
	for _, r := range to {
		if err := c.Rcpt(r, nil); err != nil {
			return nil, err
		}
	}
	w, err := c.Data()
	if err != nil {
		return nil, err
	}
	if _, err := io.WriteString(w, msg); err != nil {
		return nil, err
	}
	return w.CloseWithResponse()
}

// wantCode checks that err is an SMTP reply with code and enhanced code.
func wantCode(t *testing.T, err error, code int, enhanced string) {
	t.Helper()
	var e *smtp.SMTPError
	if !errors.As(err, &e) {
		t.Fatalf("got %v, want SMTP error %d %s", err, code, enhanced)
	}
	got := fmt.Sprintf("%d.%d.%d", e.EnhancedCode[0], e.EnhancedCode[1], e.EnhancedCode[2])
	if e.Code != code || got != enhanced {
		t.Fatalf("got %d %s %q, want %d %s", e.Code, got, e.Message, code, enhanced)
	}
}

// dialogue is a raw SMTP conversation over a socket, for error paths and
// for byte sequences a well-behaved client would never send.
type dialogue struct {
	t  *testing.T
	nc net.Conn
	r  *bufio.Reader
}

func dial(t *testing.T, addr net.Addr) *dialogue {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	d := &dialogue{t: t, nc: nc, r: bufio.NewReader(nc)}
	d.expect("220 ")
	return d
}

// starttls upgrades the connection, as a client does after "220".
func (d *dialogue) starttls(conf *tls.Config) {
	d.t.Helper()
	tc := tls.Client(d.nc, conf)
	if err := tc.Handshake(); err != nil {
		d.t.Fatalf("TLS handshake: %v", err)
	}
	d.nc = tc
	d.r = bufio.NewReader(tc)
}

func (d *dialogue) write(s string) {
	d.t.Helper()
	d.nc.SetWriteDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(d.nc, s); err != nil {
		d.t.Fatalf("write %q: %v", s, err)
	}
}

// reply reads one (possibly multi-line) reply and returns it whole.
func (d *dialogue) reply() string {
	d.t.Helper()
	d.nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	var all strings.Builder
	for {
		line, err := d.r.ReadString('\n')
		if err != nil {
			d.t.Fatalf("reading reply (so far %q): %v", all.String(), err)
		}
		all.WriteString(line)
		if len(line) < 4 || line[3] != '-' {
			return all.String()
		}
	}
}

// expect reads a reply and checks its start ("250 ", "530 5.7.0").
func (d *dialogue) expect(prefix string) string {
	d.t.Helper()
	r := d.reply()
	last := r[strings.LastIndex(strings.TrimSuffix(r, "\r\n"), "\n")+1:]
	if !strings.HasPrefix(last, prefix) {
		d.t.Fatalf("reply %q, want %q…", r, prefix)
	}
	return r
}

// cmd sends one command line and checks the reply.
func (d *dialogue) cmd(line, prefix string) string {
	d.t.Helper()
	d.write(line + "\r\n")
	return d.expect(prefix)
}

// closed reports whether the server closes the connection within 5s,
// after whatever it still sends.
func (d *dialogue) closed() bool {
	d.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err := io.Copy(io.Discard, d.r)
	var ne net.Error
	return !(errors.As(err, &ne) && ne.Timeout())
}

func mustPrefix(t *testing.T, s string) netip.Prefix {
	t.Helper()
	p, err := netip.ParsePrefix(s)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func authPlainLine(user, password string) string {
	return "AUTH PLAIN " + b64("\x00"+user+"\x00"+password)
}

func itoa(n int) string { return strconv.Itoa(n) }

func errorsAs(err error, target any) bool { return errors.As(err, target) }

// newRawConn connects without reading the greeting.
func newRawConn(t *testing.T, addr net.Addr) *dialogue {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr.String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return &dialogue{t: t, nc: nc, r: bufio.NewReader(nc)}
}

func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached within 5s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (q *memQueue) setFail(err error) {
	q.mu.Lock()
	q.fail = err
	q.mu.Unlock()
}

func plainAuthAs(user, password string) sasl.Client { return sasl.NewPlainClient("", user, password) }
