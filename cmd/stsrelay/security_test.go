package main

// Security review items, through the binary: TLS 1.2 at least on every
// listener and every outbound session, a control socket only its owner can
// use, and no secret in the logs.
//
// ROOT ONLY: the control-socket test (it runs a command as user nobody).

import (
	"crypto/tls"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/internal/testpki"
)

// tls11Only is a client or server that speaks TLS 1.0 and 1.1 only.
func tls11Only(c *tls.Config) *tls.Config {
	c.MinVersion, c.MaxVersion = tls.VersionTLS10, tls.VersionTLS11
	return c
}

// TestTLS11PeersCanTalk proves the TLS 1.1 configurations of the tests
// below work at all, so that a refused handshake there means the relay
// refused it.
func TestTLS11PeersCanTalk(t *testing.T) {
	ca := testpki.NewCA(t)
	cert := ca.Issue(t, "relay.test")
	ln, err := tls.Listen("tcp", "127.0.0.1:0", tls11Only(&tls.Config{Certificates: []tls.Certificate{cert}}))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), tls11Only(&tls.Config{RootCAs: ca.Pool, ServerName: "relay.test"}))
	if err != nil {
		t.Fatalf("a TLS 1.1 client and server do not agree: %v", err)
	}
	defer c.Close()
	if v := c.ConnectionState().Version; v != tls.VersionTLS11 {
		t.Fatalf("negotiated %s", tls.VersionName(v))
	}
}

// startTLSHandshake runs STARTTLS and the handshake (go-smtp's client
// shakes hands lazily, at the next command) and returns what failed.
func startTLSHandshake(addr string, conf *tls.Config) error {
	c, err := smtp.DialStartTLS(addr, conf)
	if err != nil {
		return err
	}
	defer c.Close()
	return c.Noop()
}

func TestSubmissionRefusesTLSBelow12(t *testing.T) {
	dir := t.TempDir()
	ca := testpki.NewCA(t)
	certFile, keyFile := testpki.WriteFiles(t, dir, ca.Issue(t, "relay.test"))
	d := startDaemon(t, writeConfig(t, dir, configParts{
		submission: fmt.Sprintf("listen_tls = \"127.0.0.1:0\"\ntls_cert = %q\ntls_key = %q\n", certFile, keyFile),
	}))
	line := d.waitFor(`stsrelay started`)
	starttls := regexp.MustCompile(`submission=(\S+)`).FindStringSubmatch(line)[1]
	implicit := regexp.MustCompile(`submission_tls=(\S+)`).FindStringSubmatch(line)[1]
	conf := func() *tls.Config { return &tls.Config{RootCAs: ca.Pool, ServerName: "relay.test"} }

	// STARTTLS (port 587 style).
	if err := startTLSHandshake(starttls, tls11Only(conf())); err == nil {
		t.Error("STARTTLS completed with a TLS 1.1-only client")
	}
	c, err := smtp.DialStartTLS(starttls, conf())
	if err != nil {
		t.Fatalf("STARTTLS with TLS 1.2+: %v", err)
	}
	if err := c.Noop(); err != nil {
		t.Fatal(err)
	}
	if cs, _ := c.TLSConnectionState(); cs.Version < tls.VersionTLS12 {
		t.Errorf("STARTTLS negotiated %s", tls.VersionName(cs.Version))
	}
	c.Close()

	// Implicit TLS (port 465 style).
	if tc, err := tls.Dial("tcp", implicit, tls11Only(conf())); err == nil {
		tc.Close()
		t.Error("implicit TLS completed with a TLS 1.1-only client")
	}
	tc, err := tls.Dial("tcp", implicit, conf())
	if err != nil {
		t.Fatalf("implicit TLS with TLS 1.2+: %v", err)
	}
	tc.Close()
	d.stop(syscall.SIGTERM)
}

// tlsSink is a go-smtp server on a free loopback port that offers
// STARTTLS with the given TLS versions only, and records what clients
// offered and agreed.
type tlsSink struct {
	addr     string
	mu       sync.Mutex
	hellos   [][]uint16 // versions each ClientHello offered
	sessions []uint16   // the version of each session that got past the handshake
	got      []received
}

func startTLSSink(t *testing.T, cert tls.Certificate, min, max uint16) *tlsSink {
	t.Helper()
	k := &tlsSink{}
	s := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		if cs, ok := c.TLSConnectionState(); ok {
			k.mu.Lock()
			k.sessions = append(k.sessions, cs.Version)
			k.mu.Unlock()
		}
		_, isTLS := c.TLSConnectionState()
		return &tlsSinkSession{sink: k, tls: isTLS}, nil
	}))
	s.Domain = "old.test"
	s.TLSConfig = &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   min, MaxVersion: max,
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			k.mu.Lock()
			k.hellos = append(k.hellos, slices.Clone(h.SupportedVersions))
			k.mu.Unlock()
			return nil, nil
		},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go s.Serve(ln)
	k.addr = ln.Addr().String()
	t.Cleanup(func() { s.Close() })
	return k
}

type tlsSinkSession struct {
	sink *tlsSink
	tls  bool
	msg  received
}

func (s *tlsSinkSession) Reset()        { s.msg = received{} }
func (s *tlsSinkSession) Logout() error { return nil }
func (s *tlsSinkSession) Mail(from string, _ *smtp.MailOptions) error {
	s.msg.From = from
	return nil
}
func (s *tlsSinkSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	s.msg.To = append(s.msg.To, to)
	return nil
}
func (s *tlsSinkSession) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.msg.Data, s.msg.TLS = string(b), s.tls
	s.sink.mu.Lock()
	s.sink.got = append(s.sink.got, s.msg)
	s.sink.mu.Unlock()
	return nil
}

func TestDeliveryRefusesTLSBelow12(t *testing.T) {
	// Two domains routed to one MX that speaks TLS 1.0–1.1 only: one where
	// the relay must encrypt, one opportunistic.
	ca := testpki.NewCA(t)
	k := startTLSSink(t, ca.Issue(t, "mx.old.example"), tls.VersionTLS10, tls.VersionTLS11)
	nexthop := "[" + strings.Replace(k.addr, ":", "]:", 1)
	dir := t.TempDir()
	e := &e2e{t: t, config: writeConfig(t, dir, configParts{tail: fmt.Sprintf(`[delivery]
retry_schedule = ["1h"]
[[delivery.route]]
domains = ["old.example"]
nexthop = %[1]q
tls = "encrypt"
[[delivery.route]]
domains = ["may.example"]
nexthop = %[1]q
tls = "may"
`, nexthop)})}
	e.d = startDaemon(t, e.config)
	e.addr = e.d.submissionAddr()

	// The sink does speak TLS 1.1, to a client that offers it.
	if err := startTLSHandshake(k.addr, tls11Only(&tls.Config{RootCAs: ca.Pool, ServerName: "mx.old.example"})); err != nil {
		t.Fatalf("the TLS 1.1 sink refused a TLS 1.1 client: %v", err)
	}
	k.mu.Lock()
	k.hellos, k.sessions = nil, nil // the relay's own are what count
	k.mu.Unlock()

	submit(t, e.addr, "app@example.com", "user@old.example", "Subject: encrypt\r\n\r\nmust not go over TLS 1.1\r\n")
	r := e.waitRecipientState("user@old.example", "deferred")
	if r.LastCode/100 != 4 || !strings.Contains(r.LastText, "TLS") {
		t.Errorf("under tls = encrypt: %d %s %q, want a deferral naming TLS", r.LastCode, r.LastEnhancedCode, r.LastText)
	}
	// Opportunistic TLS falls back to plaintext after a failed handshake
	// (as Postfix does), never to TLS 1.1.
	submit(t, e.addr, "app@example.com", "user@may.example", "Subject: may\r\n\r\nplaintext rather than TLS 1.1\r\n")
	e.d.waitFor(`recipients updated.*recipients=user@may.example`)

	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.hellos) == 0 {
		t.Fatal("the relay never tried STARTTLS with the sink; the test proves nothing")
	}
	for _, h := range k.hellos {
		for _, v := range h {
			if v < tls.VersionTLS12 {
				t.Errorf("the relay offered %s in a ClientHello", tls.VersionName(v))
			}
		}
	}
	for _, v := range k.sessions {
		t.Errorf("a session went through with %s", tls.VersionName(v))
	}
	for _, m := range k.got {
		if m.To[0] == "user@old.example" {
			t.Errorf("delivered to old.example, whose policy is encrypt, over an MX without TLS 1.2")
		}
		if m.TLS {
			t.Errorf("delivered over TLS to an MX that has no TLS 1.2")
		}
	}
	t.Logf("%d ClientHellos, all offering TLS 1.2 or later only; %d messages delivered in plaintext under opportunistic TLS", len(k.hellos), len(k.got))
}

// TestControlSocketRefusesOtherUsers connects to the control socket as
// user nobody: refused by the socket's mode, and, with the mode loosened
// by hand, by the daemon itself (SO_PEERCRED). ROOT ONLY.
func TestControlSocketRefusesOtherUsers(t *testing.T) {
	requireRootTo(t, "run a command as user nobody")
	// Everything on the way is open to others, so that the socket's own
	// mode is what keeps them out: the binary, the configuration, the
	// state directory.
	dir := t.TempDir()
	openToOthers(t, dir)
	bin := filepath.Join(dir, "stsrelay")
	data, err := os.ReadFile(binary)
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(bin, data, 0o755)
	os.Mkdir(filepath.Join(dir, "state"), 0o755)
	config := writeConfig(t, dir, configParts{})
	os.Chmod(config, 0o644)
	d := startDaemon(t, config)
	d.submissionAddr()

	sock := filepath.Join(dir, "state", "control.sock")
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("control socket mode %v, want 0600", fi.Mode().Perm())
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Uid != uint32(os.Geteuid()) {
		t.Errorf("control socket owned by uid %d", st.Uid)
	}

	asNobody := func() (string, error) {
		cmd := exec.Command(bin, "queue", "list", "-config", config)
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if code, _, errOut := stsrelay(t, "", "queue", "list", "-config", config); code != 0 {
		t.Fatalf("the owner cannot use the control socket: %s", errOut)
	}
	out, err := asNobody()
	if err == nil || !strings.Contains(out, "permission denied") {
		t.Errorf("user nobody, socket mode 0600: err %v, output %q; want permission denied", err, out)
	}
	assertOneLine(t, out)

	// Loosened by hand: the daemon itself still refuses.
	os.Chmod(sock, 0o666)
	out, err = asNobody()
	if err == nil {
		t.Errorf("user nobody used the control socket once its mode was 0666:\n%s", out)
	}
	d.waitFor(`control socket: refused a connection from another user.*uid=65534`)
	if code, _, errOut := stsrelay(t, "", "queue", "list", "-config", config); code != 0 {
		t.Fatalf("the owner cannot use the control socket after the refusal: %s", errOut)
	}
	d.stop(syscall.SIGTERM)
}

// assertNoSecret fails if a log holds the password of user in any form a
// client sends it: as typed, base64 alone (AUTH LOGIN), or in an AUTH
// PLAIN response.
func assertNoSecret(t *testing.T, log, user, password string) {
	t.Helper()
	b64 := base64.StdEncoding.EncodeToString
	for name, form := range map[string]string{
		"the password":             password,
		"the password in base64":   b64([]byte(password)),
		"the AUTH PLAIN response":  b64([]byte("\x00" + user + "\x00" + password)),
		"AUTH PLAIN with authzid":  b64([]byte(user + "\x00" + user + "\x00" + password)),
		"the password's first 8":   password[:8],
		"the base64 password core": b64([]byte(password))[:12],
	} {
		if strings.Contains(log, form) {
			t.Errorf("the log holds %s (%q)", name, form)
		}
	}
}

// TestSecretsNeverLogged runs a full exchange at debug level — AUTH PLAIN
// and LOGIN, a wrong password, garbage, a delivery — and searches the
// relay's whole log for the password.
func TestSecretsNeverLogged(t *testing.T) {
	k := startSinkAt(t, "127.0.0.1:0", nil)
	dns := dnstest.New(t)
	dir := t.TempDir()
	ca := testpki.NewCA(t)
	certFile, keyFile := testpki.WriteFiles(t, dir, ca.Issue(t, "relay.test"))
	config := filepath.Join(dir, "config.toml")
	os.WriteFile(config, []byte(fmt.Sprintf(`hostname = "relay.test"
state_dir = "state"
[log]
level = "debug"
[submission]
listen = "127.0.0.1:0"
tls_cert = %q
tls_key = %q
received_show_user = true
%s
[dns]
resolver = %q
%s`, certFile, keyFile, userBlock(t), dns.Addr, sinkRoute(k))), 0o600)
	d := startDaemon(t, config)
	addr := d.submissionAddr()
	dial := func() *smtp.Client {
		t.Helper()
		c, err := smtp.DialStartTLS(addr, &tls.Config{RootCAs: ca.Pool, ServerName: "relay.test"})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	send := func(c *smtp.Client, to string) {
		t.Helper()
		if err := c.SendMail("app@example.com", []string{to}, strings.NewReader("Subject: s\r\n\r\nbody\r\n")); err != nil {
			t.Fatalf("sending to %s: %v", to, err)
		}
	}

	c := dial()
	if err := c.Auth(sasl.NewPlainClient("", peerUser, peerPassword)); err != nil {
		t.Fatalf("AUTH PLAIN: %v", err)
	}
	send(c, "plain@example.net")
	c.Close()
	c = dial()
	if err := c.Auth(sasl.NewLoginClient(peerUser, peerPassword)); err != nil {
		t.Fatalf("AUTH LOGIN: %v", err)
	}
	send(c, "login@example.net")
	c.Close()
	c = dial()
	if err := c.Auth(sasl.NewPlainClient("", peerUser, peerPassword+"x")); err == nil {
		t.Fatal("a wrong password was accepted")
	}
	c.Close()
	// Garbage, by hand. (A password sent in the user name field is logged
	// as the name tried: failed attempts name the user, as OpenSSH's
	// "Invalid user" does, so that an operator finds the misconfigured
	// application; that case is not searched for.)
	for _, line := range []string{
		"AUTH PLAIN !!not-base64" + peerPassword,
		"AUTH LOGIN " + base64.StdEncoding.EncodeToString([]byte(peerPassword)),
	} {
		raw(t, addr, ca, line)
	}
	for range 2 {
		select {
		case <-k.got:
		case <-time.After(30 * time.Second):
			t.Fatalf("the sink received %d of 2 messages", k.count())
		}
	}
	d.stop(syscall.SIGTERM)
	assertNoSecret(t, d.output(), peerUser, peerPassword)
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, m := range k.msgs {
		assertNoSecret(t, m.Data, peerUser, peerPassword)
		if !strings.Contains(m.Data, "authenticated user "+peerUser) {
			t.Errorf("the Received header does not name the user:\n%s", m.Data)
		}
	}
	if !strings.Contains(d.output(), "level=DEBUG") {
		t.Error("no debug lines: the test searched less than the most verbose log")
	}
}

// raw sends one command after STARTTLS and reads the reply, as a client
// that builds its own AUTH lines would.
func raw(t *testing.T, addr string, ca *testpki.CA, line string) {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	text := textproto.NewConn(nc)
	step := func(cmd string, want int) {
		t.Helper()
		if cmd != "" {
			if err := text.PrintfLine("%s", cmd); err != nil {
				t.Fatal(err)
			}
		}
		if _, _, err := text.ReadResponse(want); err != nil {
			t.Fatalf("%q: %v", cmd, err)
		}
	}
	step("", 220)
	step("EHLO raw.test", 250)
	step("STARTTLS", 220)
	tc := tls.Client(nc, &tls.Config{RootCAs: ca.Pool, ServerName: "relay.test"})
	text = textproto.NewConn(tc)
	step("EHLO raw.test", 250)
	text.PrintfLine("%s", line)
	code, msg, _ := text.ReadResponse(0)
	if code == 235 {
		t.Errorf("%q was accepted: %d %s", line, code, msg)
	}
	if code == 334 { // the server waits for more: send garbage, then give up
		text.PrintfLine("%s", "*")
		text.ReadResponse(0)
	}
}
