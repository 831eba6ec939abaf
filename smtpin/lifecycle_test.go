package smtpin

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"golang.org/x/crypto/bcrypt"

	"github.com/stsrelay/stsrelay/internal/testpki"
)

// A third-party client: swaks submits with AUTH PLAIN over STARTTLS,
// verifying our certificate.
func TestSwaksSubmitsWithAuthOverSTARTTLS(t *testing.T) {
	swaks, err := exec.LookPath("swaks")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("swaks is not installed; CI must install the Debian package swaks")
		}
		t.Skip("swaks is not installed")
	}
	e := start(t, nil)
	caFile := e.ca.WriteCAFile(t, t.TempDir())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, swaks,
		"--server", e.srv.Addr().String(),
		"--ehlo", "swaks.test",
		"--tls", "--tls-verify", "--tls-ca-path", caFile, "--tls-sni", "localhost",
		"--auth", "PLAIN", "--auth-user", testUser, "--auth-password", testPassword,
		"--from", "app@example.com", "--to", "rcpt@example.org",
		"--header", "Subject: from swaks", "--body", "Hello from swaks.")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("swaks: %v\n%s", err, out)
	}
	m := e.q.only(t)
	if !strings.Contains(string(out), "queued as "+m.id) {
		t.Errorf("swaks did not see the queue id %s:\n%s", m.id, out)
	}
	if m.env.User != testUser || !strings.Contains(m.body, "Subject: from swaks\r\n") ||
		!strings.Contains(m.body, "from swaks.test ([127.0.0.1])") {
		t.Errorf("stored %+v\n%s", m.env, m.body)
	}
}

func TestCertificateReloadServesNewCertificateWithoutRestart(t *testing.T) {
	ca := testpki.NewCA(t)
	dir := t.TempDir()
	first := ca.Issue(t, "localhost")
	certFile, keyFile := testpki.WriteFiles(t, dir, first)
	store, err := LoadCertificate(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	e := start(t, func(o *Options) { o.GetCertificate = store.GetCertificate })
	conf := &tls.Config{RootCAs: ca.Pool, ServerName: "localhost"}
	served := func() []byte {
		t.Helper()
		c, err := tls.Dial("tcp", e.srv.TLSAddr().String(), conf)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].Raw
	}
	if !bytes.Equal(served(), first.Leaf.Raw) {
		t.Fatal("not serving the loaded certificate")
	}

	second := ca.Issue(t, "localhost")
	testpki.WriteFiles(t, dir, second)
	if err := store.Reload(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(served(), second.Leaf.Raw) {
		t.Fatal("Reload did not change the certificate served")
	}

	os.WriteFile(keyFile, []byte("garbage"), 0o600)
	if err := store.Reload(); err == nil || !strings.Contains(err.Error(), keyFile) {
		t.Fatalf("Reload of a broken key: %v, want an error naming %s", err, keyFile)
	}
	if !bytes.Equal(served(), second.Leaf.Raw) {
		t.Fatal("a failed Reload dropped the working certificate")
	}
}

func TestListenReportsAddressInUse(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	srv, err := New(Options{Hostname: "relay.test", Listen: busy.Addr().String()}, &memQueue{})
	if err != nil {
		t.Fatal(err)
	}
	err = srv.Listen()
	if err == nil || !strings.Contains(err.Error(), busy.Addr().String()) || !strings.Contains(err.Error(), "address already in use") {
		t.Fatalf("Listen: %v, want one error naming %s and saying it is in use", err, busy.Addr())
	}
}

func TestNewRejectsImplicitTLSWithoutCertificate(t *testing.T) {
	_, err := New(Options{Hostname: "relay.test", ListenTLS: ":0"}, &memQueue{})
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("New: %v, want an error about the missing certificate", err)
	}
}

func TestIdleClientTimesOut(t *testing.T) {
	e := start(t, func(o *Options) { o.CommandTimeout = 300 * time.Millisecond })
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	time.Sleep(400 * time.Millisecond)
	d.expect("421 4.4.2")
	if !d.closed() {
		t.Fatal("connection still open after the timeout")
	}
}

func TestStalledDataTimesOut(t *testing.T) {
	e := start(t, func(o *Options) {
		o.CommandTimeout = 10 * time.Second
		o.DataTimeout = 300 * time.Millisecond
		o.TrustedNetworks = append(o.TrustedNetworks, mustPrefix(t, "127.0.0.1/32"))
	})
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	d.cmd("MAIL FROM:<a@example.com>", "250")
	d.cmd("RCPT TO:<b@example.org>", "250")
	d.cmd("DATA", "354")
	d.write("Subject: slow\r\n\r\nfirst line\r\n")
	begin := time.Now()
	d.expect("421 4.4.2")
	if !d.closed() {
		t.Fatal("connection still open after the data timeout")
	}
	if el := time.Since(begin); el > 5*time.Second {
		t.Errorf("took %v to drop a stalled client; the command timeout was used", el)
	}
	if n := len(e.q.stored()); n != 0 {
		t.Fatalf("queue holds %d messages", n)
	}
}

// A client that stalls inside a BDAT chunk is treated as one that stalls
// in DATA: 421 4.4.2, never a permanent 5xx for a network failure, and the
// connection closes, since the rest of the chunk may still come and must
// not be read as commands.
func TestStalledBDATChunkTimesOutLikeData(t *testing.T) {
	e := start(t, func(o *Options) {
		o.CommandTimeout = 10 * time.Second
		o.DataTimeout = 300 * time.Millisecond
		o.TrustedNetworks = append(o.TrustedNetworks, mustPrefix(t, "127.0.0.1/32"))
	})
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	d.cmd("MAIL FROM:<a@example.com>", "250")
	d.cmd("RCPT TO:<b@example.org>", "250")
	msg := "Subject: slow\r\n\r\nfirst line\r\n"
	rest := "RSET\r\nMAIL FROM:<c@example.com>\r\nRCPT TO:<d@example.org>\r\nDATA\r\n"
	d.write("BDAT " + itoa(len(msg)+len(rest)) + " LAST\r\n" + msg)
	d.expect("421 4.4.2")
	d.nc.Write([]byte(rest)) // too late: the chunk's text, which must not run as commands
	if !d.closed() {
		t.Fatal("connection still open after the data timeout")
	}
	if n := len(e.q.stored()); n != 0 {
		t.Fatalf("queue holds %d messages", n)
	}
}

func TestShutdownEndsIdleSessionsAndLetsTransfersFinish(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = append(o.TrustedNetworks, mustPrefix(t, "127.0.0.1/32")) })
	idle := dial(t, e.srv.Addr())
	idle.cmd("EHLO idle.test", "250")
	busy := dial(t, e.srv.Addr())
	busy.cmd("EHLO busy.test", "250")
	busy.cmd("MAIL FROM:<a@example.com>", "250")
	busy.cmd("RCPT TO:<b@example.org>", "250")
	busy.cmd("DATA", "354")
	busy.write("Subject: in flight\r\n\r\n")

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- e.srv.Shutdown(ctx)
	}()
	idle.expect("421")
	if !idle.closed() {
		t.Fatal("idle session not closed by Shutdown")
	}
	if c, err := net.DialTimeout("tcp", e.srv.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Fatal("new connection accepted during Shutdown")
	}
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v while a message was in flight", err)
	case <-time.After(200 * time.Millisecond):
	}
	busy.write("body\r\n.\r\n")
	busy.expect("250 2.0.0 Ok: queued as")
	busy.expect("421") // and then it is closed like the idle one
	if err := <-done; err != nil {
		t.Fatalf("Shutdown: %v", err)
	}
	e.q.only(t)
}

func TestShutdownClosesStalledTransferAtDeadline(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = append(o.TrustedNetworks, mustPrefix(t, "127.0.0.1/32")) })
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	d.cmd("MAIL FROM:<a@example.com>", "250")
	d.cmd("RCPT TO:<b@example.org>", "250")
	d.cmd("DATA", "354")
	d.write("Subject: stalled\r\n\r\n")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := e.srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown: %v, want context.DeadlineExceeded", err)
	}
	if !d.closed() {
		t.Fatal("stalled session still open after Shutdown gave up")
	}
	if n := len(e.q.stored()); n != 0 {
		t.Fatalf("queue holds %d messages", n)
	}
}

func TestSetUsersReplacesUsersAndKeepsOldOnError(t *testing.T) {
	e := start(t, nil)
	err := e.srv.SetUsers([]User{{Name: "new", PasswordHash: "plaintext-by-mistake"}})
	if err == nil || !strings.Contains(err.Error(), `"new"`) {
		t.Fatalf("SetUsers with a bad hash: %v, want an error naming the user", err)
	}
	c := e.client(t, true)
	if err := c.Auth(plainAuth()); err != nil {
		t.Fatalf("old user refused after a failed SetUsers: %v", err)
	}

	h, _ := bcrypt.GenerateFromPassword([]byte("second secret"), bcrypt.MinCost)
	if err := e.srv.SetUsers([]User{{Name: "second", PasswordHash: string(h)}}); err != nil {
		t.Fatal(err)
	}
	c2 := e.client(t, true)
	wantCode(t, c2.Auth(plainAuth()), 535, "5.7.8")
	c3 := e.client(t, true)
	if err := c3.Auth(plainAuthAs("second", "second secret")); err != nil {
		t.Fatalf("new user refused: %v", err)
	}
}

func TestSenderAllowedFollowsTheUsersInForce(t *testing.T) {
	srv, err := New(Options{Hostname: "relay.test", Listen: "127.0.0.1:0",
		Users: []User{{Name: "webapp", PasswordHash: userHash(t), AllowedSenders: []string{"*@app.test"}}}}, &memQueue{})
	if err != nil {
		t.Fatal(err)
	}
	for addr, want := range map[string]bool{
		"noreply@app.test":  true,
		"NoReply@APP.test":  true,
		`"a b"@app.test`:    true,
		"ceo@example.com":   false,
		"ceo@sub.app.test":  false,
		"not an address":    false,
		"ceo@app.test@evil": false,
	} {
		if got := srv.SenderAllowed("webapp", addr); got != want {
			t.Errorf("SenderAllowed(webapp, %q) = %v, want %v", addr, got, want)
		}
	}
	if srv.SenderAllowed("nobody", "noreply@app.test") {
		t.Error("an unknown login may use a sender")
	}
	if err := srv.SetUsers([]User{{Name: "webapp", PasswordHash: userHash(t), AllowedSenders: []string{"ceo@example.com"}}}); err != nil {
		t.Fatal(err)
	}
	if !srv.SenderAllowed("webapp", "ceo@example.com") || srv.SenderAllowed("webapp", "noreply@app.test") {
		t.Error("SenderAllowed did not follow SetUsers")
	}
}

func TestHashPasswordMakesBcryptHash(t *testing.T) {
	h, err := HashPassword([]byte("s3cret-s3cret"))
	if err != nil {
		t.Fatal(err)
	}
	if bcrypt.CompareHashAndPassword([]byte(h), []byte("s3cret-s3cret")) != nil {
		t.Fatal("hash does not verify")
	}
	if c, _ := bcrypt.Cost([]byte(h)); c != PasswordCost {
		t.Errorf("cost %d, want %d", c, PasswordCost)
	}
	if _, err := HashPassword(nil); err == nil {
		t.Error("empty password hashed")
	}
	if _, err := HashPassword(bytes.Repeat([]byte("x"), 73)); err == nil {
		t.Error("password over bcrypt's 72 bytes hashed (bcrypt would ignore the rest)")
	}
}

func TestMetricsCountAuthAndMessages(t *testing.T) {
	e := start(t, func(o *Options) { o.Logger = slog.New(slog.NewTextHandler(io.Discard, nil)) })
	okBefore := counter(t, metricAuth.WithLabelValues("success"))
	failBefore := counter(t, metricAuth.WithLabelValues("failure"))
	accBefore := counter(t, metricAccepted)
	relayBefore := counter(t, metricRejected.WithLabelValues("auth_required"))

	c := e.client(t, true)
	wantCode(t, c.Mail("a@example.com", nil), 530, "5.7.0")
	wantCode(t, c.Auth(plainAuthAs(testUser, "nope")), 535, "5.7.8")
	c2 := e.client(t, true)
	if err := c2.Auth(plainAuth()); err != nil {
		t.Fatal(err)
	}
	if _, err := send(t, c2, "a@example.com", []string{"b@example.org"}, testMessage); err != nil {
		t.Fatal(err)
	}
	for name, d := range map[string]float64{
		"auth success":            counter(t, metricAuth.WithLabelValues("success")) - okBefore,
		"auth failure":            counter(t, metricAuth.WithLabelValues("failure")) - failBefore,
		"accepted":                counter(t, metricAccepted) - accBefore,
		"rejected, auth required": counter(t, metricRejected.WithLabelValues("auth_required")) - relayBefore,
	} {
		if d != 1 {
			t.Errorf("%s counted %v times, want 1", name, d)
		}
	}
}

func counter(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

func TestLoadCertificateNamesMissingFile(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "nope.pem")
	_, err := LoadCertificate(missing, missing)
	if err == nil || !strings.Contains(err.Error(), missing) {
		t.Fatalf("LoadCertificate: %v, want an error naming %s", err, missing)
	}
}

// main closes the queue after Shutdown: no Enqueue may still be running.
func TestShutdownWaitsForEnqueueToReturn(t *testing.T) {
	e := start(t, func(o *Options) { o.TrustedNetworks = append(o.TrustedNetworks, mustPrefix(t, "127.0.0.1/32")) })
	e.q.mu.Lock()
	e.q.hang, e.q.returned = true, make(chan struct{})
	e.q.mu.Unlock()
	d := dial(t, e.srv.Addr())
	d.cmd("EHLO client.test", "250")
	d.cmd("MAIL FROM:<a@example.com>", "250")
	d.cmd("RCPT TO:<b@example.org>", "250")
	d.cmd("DATA", "354")
	d.write(testMessage + ".\r\n")
	time.Sleep(100 * time.Millisecond) // let it reach Enqueue
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := e.srv.Shutdown(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Shutdown: %v", err)
	}
	select {
	case <-e.q.returned:
	default:
		t.Fatal("Shutdown returned while Enqueue was still running")
	}
	if r, _ := io.ReadAll(d.r); strings.Contains(string(r), "250") {
		t.Fatalf("client was told %q", r)
	}
}

// dripConn writes what it is given a byte at a time, a pause apart: a
// client that keeps a connection alive with as little as it can.
type dripConn struct {
	net.Conn
	pause time.Duration
}

func (d dripConn) Write(p []byte) (int, error) {
	for i := range p {
		time.Sleep(d.pause)
		if _, err := d.Conn.Write(p[i : i+1]); err != nil {
			return i, err
		}
	}
	return len(p), nil
}

// A client has the command timeout from our last reply to send its next
// command whole, and its half of a TLS handshake: a byte now and then
// does not keep the connection, or its slot, for ever.
func TestDrippingClientIsCutAtTheCommandTimeout(t *testing.T) {
	e := start(t, func(o *Options) {
		o.CommandTimeout = 300 * time.Millisecond
		o.TrustedNetworks = append(o.TrustedNetworks, mustPrefix(t, "127.0.0.1/32"))
	})
	t.Run("a command", func(t *testing.T) {
		d := dial(t, e.srv.Addr())
		d.cmd("EHLO client.test", "250")
		drip := dripConn{d.nc, 50 * time.Millisecond}
		io.WriteString(drip, "MAIL FROM:<a@example.com>\r\n") // 27 bytes: 1.35 s
		if !d.closed() {
			t.Error("the connection is open after a command that took 4 command timeouts")
		}
	})
	t.Run("implicit TLS handshake", func(t *testing.T) {
		nc, err := net.Dial("tcp", e.srv.TLSAddr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		tc := tls.Client(dripConn{nc, 20 * time.Millisecond}, e.clientTLS()) // a ClientHello of some 300 bytes: 6 s
		if err := tc.Handshake(); err == nil {
			t.Error("a handshake dripped over 20 command timeouts completed")
		}
	})
}
