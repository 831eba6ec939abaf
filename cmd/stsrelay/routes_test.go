package main

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/testpki"
)

// smartHost is a go-smtp upstream on 127.0.0.1 that wants STARTTLS and
// AUTH PLAIN, and keeps what it is given.
type smartHost struct {
	addr string
	mu   sync.Mutex
	auth []string // "user:password:tls"
	rcpt []string
}

func newSmartHost(t *testing.T, user, pass string) *smartHost {
	t.Helper()
	h := &smartHost{}
	srv := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		return &smartSession{h: h, c: c, user: user, pass: pass}, nil
	}))
	srv.Domain = "smtp.provider.test"
	srv.ReadTimeout, srv.WriteTimeout = 10*time.Second, 10*time.Second
	srv.AllowInsecureAuth = true // refusing plaintext AUTH is the relay's job here
	srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{testpki.NewCA(t).Issue(t, "smtp.provider.test")}}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h.addr = l.Addr().String()
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return h
}

func (h *smartHost) got() (auth, rcpt []string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.auth...), append([]string(nil), h.rcpt...)
}

type smartSession struct {
	h          *smartHost
	c          *smtp.Conn
	user, pass string
	authed     bool
}

func (s *smartSession) AuthMechanisms() []string { return []string{sasl.Plain} }

func (s *smartSession) Auth(string) (sasl.Server, error) {
	return sasl.NewPlainServer(func(_, user, pass string) error {
		_, isTLS := s.c.TLSConnectionState()
		s.h.mu.Lock()
		s.h.auth = append(s.h.auth, fmt.Sprintf("%s:%s:%t", user, pass, isTLS))
		s.h.mu.Unlock()
		if user != s.user || pass != s.pass {
			return smtp.ErrAuthFailed
		}
		s.authed = true
		return nil
	}), nil
}

func (s *smartSession) Mail(string, *smtp.MailOptions) error {
	if !s.authed {
		return smtp.ErrAuthRequired
	}
	return nil
}

func (s *smartSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	s.h.mu.Lock()
	s.h.rcpt = append(s.h.rcpt, to)
	s.h.mu.Unlock()
	return nil
}

func (s *smartSession) Data(r io.Reader) error { _, err := io.Copy(io.Discard, r); return err }
func (s *smartSession) Reset()                 {}
func (s *smartSession) Logout() error          { return nil }

// With no DNS server reachable, mail waits; a route added by SIGHUP takes
// it to a smart host with STARTTLS and AUTH, from a password file whose
// content never shows in the log.
func TestServeReloadsRoutesOnSIGHUPAndDeliversThroughThem(t *testing.T) {
	const user, pass = "acct-4411", "pw-Vv3-never-logged"
	host := newSmartHost(t, user, pass)
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "upstream.pass"), []byte(pass+"\n"), 0o600)
	config := writeConfig(t, dir, configParts{tail: "[delivery]\nretry_schedule = [\"1h\"]\n"})
	d := startDaemon(t, config)
	addr := d.submissionAddr()
	submit(t, addr, "app@example.com", "someone@example.net", "Subject: r\r\n\r\nrouted\r\n")
	d.waitFor(`recipients updated.*recipients=someone@example.net.*outcome=deferred`)

	route := fmt.Sprintf("[delivery]\nretry_schedule = [\"1h\"]\n\n[[delivery.route]]\ndomains = [\"*\"]\nnexthop = \"[%s]:%s\"\n"+
		"tls = \"encrypt\"\nauth_username = %q\nauth_password_file = \"upstream.pass\"\nmax_connections = 2\n",
		strings.Split(host.addr, ":")[0], strings.Split(host.addr, ":")[1], user)
	writeConfig(t, dir, configParts{tail: route})
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitFor(`reload: routes, limits and TLS policies loaded.*routes=1`)
	if code, _, errOut := stsrelay(t, "", "queue", "retry", "-config", config, "-all"); code != 0 {
		t.Fatalf("queue retry: %s", errOut)
	}
	line := d.waitFor(`delivery attempt.*domain=example.net.*outcome=`)
	if !strings.Contains(line, "outcome=delivered") || !regexp.MustCompile(`route=delivery\.route\[0\] nexthop=\[127\.0\.0\.1\]:\d+`).MatchString(line) {
		t.Errorf("attempt: %s", line)
	}
	auth, rcpt := host.got()
	if len(auth) != 1 || auth[0] != user+":"+pass+":true" || len(rcpt) != 1 || rcpt[0] != "someone@example.net" {
		t.Errorf("smart host got AUTH %q, RCPT %q", auth, rcpt)
	}
	if strings.Contains(d.output(), pass) {
		t.Errorf("the password is in the log:\n%s", d.output())
	}
	if strings.Contains(d.output(), "needs a restart") {
		t.Errorf("a route change asked for a restart:\n%s", d.output())
	}

	// A password file that went missing keeps the running routes.
	os.Remove(filepath.Join(dir, "upstream.pass"))
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.waitFor(`reload failed; keeping the running configuration.*delivery.route\[0\].auth_password_file`)
	d.stop(syscall.SIGTERM)
}

func TestServeRefusesBadRoutesInOneLine(t *testing.T) {
	for _, c := range []struct{ name, tail, want string }{
		{"missing password file", "[[delivery.route]]\ndomains = [\"*\"]\nnexthop = \"smtp.provider.test:587\"\nauth_username = \"u\"\nauth_password_file = \"nope.pass\"\n",
			"line 17: delivery.route[0].auth_password_file: cannot read "},
		{"overlapping routes", "[[delivery.route]]\ndomains = [\"*\"]\nnexthop = \"a.test\"\n[[delivery.route]]\ndomains = [\"*\"]\nnexthop = \"b.test\"\n",
			"line 17: delivery.route[1].domains: overlaps delivery.route[0] (line 14)"},
		{"bad rate", "[[delivery.limits]]\ndomains = [\"a.test\"]\nrate = \"fast\"\n", `line 15: delivery.limits[0].rate: "fast" is not a rate`},
	} {
		t.Run(c.name, func(t *testing.T) {
			config := writeConfig(t, t.TempDir(), configParts{tail: c.tail})
			code, _, stderr := stsrelay(t, "", "serve", "-config", config)
			if code == 0 {
				t.Fatal("exit 0")
			}
			assertOneLine(t, stderr)
			if !strings.Contains(stderr, c.want) {
				t.Fatalf("stderr %q does not say %q", stderr, c.want)
			}
		})
	}
}
