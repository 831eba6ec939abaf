package sts_test

import (
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"github.com/stsrelay/stsrelay/policy"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/sts"
)

// smtpMX is a go-smtp server on loopback playing one MX host.
type smtpMX struct {
	srv *smtp.Server

	mu       sync.Mutex
	messages int
	sessions int
	tls      []bool   // per message: did it arrive over TLS
	sni      []string // per handshake
	cert     tls.Certificate
}

// SetCert makes the MX present c from now on, as another server on its
// address would (an attacker's): with session ticket keys of its own, so
// no TLS session made with the previous certificate resumes.
func (m *smtpMX) SetCert(c tls.Certificate) {
	var key [32]byte
	rand.Read(key[:])
	m.srv.TLSConfig.SetSessionTicketKeys([][32]byte{key})
	m.mu.Lock()
	m.cert = c
	m.mu.Unlock()
}

// TLS returns, per message, whether it came over TLS, and the SNI of
// each handshake.
func (m *smtpMX) TLS() ([]bool, []string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]bool(nil), m.tls...), append([]string(nil), m.sni...)
}

type mxSession struct {
	mx *smtpMX
	c  *smtp.Conn
}

func (s *mxSession) Reset()                               {}
func (s *mxSession) Logout() error                        { return nil }
func (s *mxSession) Mail(string, *smtp.MailOptions) error { return nil }
func (s *mxSession) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (s *mxSession) Data(r io.Reader) error {
	if _, err := io.Copy(io.Discard, r); err != nil {
		return err
	}
	_, isTLS := s.c.TLSConnectionState()
	s.mx.mu.Lock()
	s.mx.messages++
	s.mx.tls = append(s.mx.tls, isTLS)
	s.mx.mu.Unlock()
	return nil
}

func (m *smtpMX) Messages() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.messages
}

func (m *smtpMX) Sessions() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.sessions
}

// MX starts an SMTP server for host (STARTTLS with cert unless cert is nil)
// and publishes "domain MX 10 host" and host's address.
func (e *env) MX(domain, host string, cert *tls.Certificate) *smtpMX {
	e.t.Helper()
	m := &smtpMX{}
	m.srv = smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		m.mu.Lock()
		m.sessions++
		m.mu.Unlock()
		return &mxSession{mx: m, c: c}, nil
	}))
	m.srv.Domain = host
	m.srv.ReadTimeout = 10 * time.Second
	m.srv.WriteTimeout = 10 * time.Second
	m.srv.ErrorLog = nopLogger{}
	if cert != nil {
		m.cert = *cert
		m.srv.TLSConfig = &tls.Config{
			GetCertificate: func(h *tls.ClientHelloInfo) (*tls.Certificate, error) {
				m.mu.Lock()
				defer m.mu.Unlock()
				m.sni = append(m.sni, h.ServerName)
				c := m.cert
				return &c, nil
			},
		}
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	go m.srv.Serve(l)
	// Only the listener is closed: go-smtp v0.25.1's Server.Close reads
	// Conn.conn unlocked while a STARTTLS in progress writes it (a data
	// race); the connections end when the client closes them.
	e.t.Cleanup(func() { l.Close() })
	ip := e.newIP()
	e.mu.Lock()
	e.mxs[ip] = l.Addr().String()
	e.mu.Unlock()
	e.DNS.Add(e.t, fmt.Sprintf("%s. 300 IN MX 10 %s.", domain, host))
	e.DNS.Add(e.t, fmt.Sprintf("%s. 300 IN A %s", host, ip))
	return m
}

type nopLogger struct{}

func (nopLogger) Printf(string, ...any) {}
func (nopLogger) Println(...any)        {}

// Engine is a delivery engine whose policy source is m, dialing through e.
func (e *env) Engine(m *sts.Manager) *delivery.Engine {
	e.t.Helper()
	return e.EngineWith(m, -1)
}

// EngineWith is Engine with a connection-reuse idle timeout (-1 disables reuse).
func (e *env) EngineWith(m *sts.Manager, idle time.Duration) *delivery.Engine {
	e.t.Helper()
	eng, err := delivery.New(delivery.Options{
		Hostname:       "relay.sender.test",
		Resolver:       e.Res,
		Policy:         m,
		Recorder:       e.Rec,
		DialContext:    e.Dial,
		RootCAs:        e.CA.Pool,
		ConnectTimeout: 2 * time.Second,
		Timeouts: delivery.Timeouts{Greeting: 2 * time.Second, Command: 2 * time.Second, Mail: 2 * time.Second,
			Rcpt: 2 * time.Second, DataInit: 2 * time.Second, DataBlock: 2 * time.Second, DataFinal: 2 * time.Second},
		IdleTimeout: idle,
		Logger:      slog.New(slog.DiscardHandler),
	})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { eng.Close() })
	return eng
}

const body = "From: a@sender.test\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"

func job(domain string) *queue.Job {
	rcpt := queue.RecipientParams{Addr: "b@" + domain}
	return &queue.Job{
		ID: "J1", Domain: domain, Attempt: 1, Arrived: time.Now(), Size: int64(len(body)),
		Envelope:   queue.Envelope{From: "a@sender.test", Recipients: []queue.RecipientParams{rcpt}},
		Recipients: []queue.RecipientParams{rcpt},
		Open:       func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader(body)), nil },
	}
}

func send(t *testing.T, eng *delivery.Engine, domain string) queue.Status {
	t.Helper()
	st := eng.Deliver(ctx, job(domain))
	if len(st) != 1 {
		t.Fatalf("%d statuses", len(st))
	}
	return st[0]
}

func wantDelivered(t *testing.T, st queue.Status, mx *smtpMX, n int) {
	t.Helper()
	if !st.Delivered() {
		t.Fatalf("status %s, want delivered", st)
	}
	if mx.Messages() != n {
		t.Fatalf("MX has %d messages, want %d", mx.Messages(), n)
	}
}

// wantSTSDeferral checks for the temporary 451 4.4.8 that RFC 8461 §5.1
// demands instead of a bounce, and that nothing was delivered.
func wantSTSDeferral(t *testing.T, st queue.Status, mx *smtpMX, parts ...string) {
	t.Helper()
	if st.Code != 451 || st.Enhanced != "4.4.8" || st.Permanent() {
		t.Fatalf("status %s, want 451 4.4.8", st)
	}
	for _, p := range append([]string{"MX hosts of 'example.com' failed MTA-STS validation"}, parts...) {
		if !strings.Contains(st.Text, p) {
			t.Errorf("status text %q does not contain %q", st.Text, p)
		}
	}
	if mx != nil && mx.Messages() != 0 {
		t.Fatalf("%d messages delivered despite the enforce failure", mx.Messages())
	}
}

func TestEnforceDeliversOverVerifiedTLS(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", enforcePolicy)
	cert := e.CA.Issue(t, "mx.example.com")
	mx := e.MX("example.com", "mx.example.com", &cert)
	wantDelivered(t, send(t, e.Engine(e.Manager(nil)), "example.com"), mx, 1)
	if isTLS, sni := mx.TLS(); !isTLS[0] || sni[0] != "mx.example.com" {
		t.Fatalf("tls %v, SNI %q; want TLS with SNI mx.example.com (RFC 8461 §7.1)", isTLS, sni)
	}
}

func TestEnforceDefersWhenCertificateNameMismatch(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", enforcePolicy)
	cert := e.CA.Issue(t, "other.example.org")
	mx := e.MX("example.com", "mx.example.com", &cert)
	wantSTSDeferral(t, send(t, e.Engine(e.Manager(nil)), "example.com"), mx, "mx.example.com")
}

func TestEnforceDefersWhenCertificateExpiredOrUntrusted(t *testing.T) {
	for name, opt := range map[string]testpki.Options{"expired": {Expired: true}, "self-signed": {SelfSigned: true}} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t)
			e.ValidHost("example.com", "id1", enforcePolicy)
			cert := e.CA.IssueWith(t, opt, "mx.example.com")
			mx := e.MX("example.com", "mx.example.com", &cert)
			wantSTSDeferral(t, send(t, e.Engine(e.Manager(nil)), "example.com"), mx)
		})
	}
}

func TestEnforceDefersWhenMXNotInPolicy(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", enforcePolicy)
	cert := e.CA.Issue(t, "mx.attacker.test")
	mx := e.MX("example.com", "mx.attacker.test", &cert)
	wantSTSDeferral(t, send(t, e.Engine(e.Manager(nil)), "example.com"), mx, "not listed in the MTA-STS policy")
	if mx.Sessions() != 0 {
		t.Fatal("connected to an MX host the policy does not list")
	}
}

func TestEnforceDefersWhenSTARTTLSNotOffered(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", enforcePolicy)
	mx := e.MX("example.com", "mx.example.com", nil)
	wantSTSDeferral(t, send(t, e.Engine(e.Manager(nil)), "example.com"), mx)
}

func TestTestingModeDeliversDespiteBadCertificate(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", "version: STSv1\nmode: testing\nmx: mx.example.com\nmax_age: 86400\n")
	cert := e.CA.Issue(t, "other.example.org")
	mx := e.MX("example.com", "mx.example.com", &cert)
	wantDelivered(t, send(t, e.Engine(e.Manager(nil)), "example.com"), mx, 1)
	var reported bool
	for _, r := range e.Rec.Results() {
		reported = reported || (r.Result != "" && r.MX == "mx.example.com" && r.Policy != nil && r.Policy.Type == policy.TypeSTS)
	}
	if !reported {
		t.Fatalf("the certificate failure was not recorded for TLSRPT: %+v", e.Rec.Results())
	}
}

func TestNoPolicyDeliversOpportunistically(t *testing.T) {
	e := newEnv(t)
	cert := e.CA.IssueWith(t, testpki.Options{SelfSigned: true}, "whatever.test")
	mx := e.MX("example.com", "mx.example.com", &cert)
	wantDelivered(t, send(t, e.Engine(e.Manager(nil)), "example.com"), mx, 1)
}

func TestEnforceStaysInForceDuringPolicyHostOutage(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	good := e.CA.Issue(t, "mx.example.com")
	mx := e.MX("example.com", "mx.example.com", &good)
	m := e.Manager(nil)
	eng := e.Engine(m)
	wantDelivered(t, send(t, eng, "example.com"), mx, 1)

	// The policy host goes down and the id changes; an attacker now
	// presents a bad certificate. The cached enforce policy must hold.
	h.SetStatus(503)
	e.SetID("example.com", "id2")
	bad := e.CA.IssueWith(t, testpki.Options{SelfSigned: true}, "mx.example.com")
	mx.SetCert(bad)
	wantSTSDeferral(t, send(t, eng, "example.com"), nil)
	if mx.Messages() != 1 {
		t.Fatal("delivered over an unverified connection during the outage")
	}
}

func TestEnforceFailureIsRetriedUnderUpdatedPolicy(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	cert := e.CA.Issue(t, "mx2.example.org")
	mx := e.MX("example.com", "mx2.example.org", &cert)
	eng := e.Engine(e.Manager(nil))
	wantSTSDeferral(t, send(t, eng, "example.com"), mx)
	// RFC 8461 §5.1: before failing for good, check DNS for a new policy.
	// The next attempt sees the new id and the new policy.
	h.Set("version: STSv1\nmode: enforce\nmx: mx2.example.org\nmax_age: 86400\n")
	e.SetID("example.com", "id2")
	wantDelivered(t, send(t, eng, "example.com"), mx, 1)
}

func TestCNAMEMXUnderBothMatchSettings(t *testing.T) {
	setup := func(t *testing.T) (*env, *smtpMX) {
		e := newEnv(t)
		e.ValidHost("example.com", "id1", "version: STSv1\nmode: enforce\nmx: mx.provider.net\nmax_age: 86400\n")
		cert := e.CA.Issue(t, "mx.provider.net")
		mx := e.MX("provider.net", "mx.provider.net", &cert)
		e.DNS.Add(t, "example.com. 300 IN MX 10 mail.example.com.")
		e.DNS.Add(t, "mail.example.com. 300 IN CNAME mx.provider.net.")
		return e, mx
	}
	t.Run("rfc", func(t *testing.T) {
		e, mx := setup(t)
		wantSTSDeferral(t, send(t, e.Engine(e.Manager(nil)), "example.com"), mx, "not listed")
	})
	t.Run("match_cname_target", func(t *testing.T) {
		e, mx := setup(t)
		m := e.Manager(func(o *sts.Options) { o.MatchCNAMETarget = true })
		wantDelivered(t, send(t, e.Engine(m), "example.com"), mx, 1)
		if _, sni := mx.TLS(); sni[0] != "mail.example.com" {
			t.Fatalf("SNI %q, want the MX name mail.example.com (RFC 8461 §7.1)", sni)
		}
	})
}

func TestFetchFailureWithoutCacheDeliversOpportunistically(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	h.SetStatus(503)
	cert := e.CA.IssueWith(t, testpki.Options{SelfSigned: true}, "mx.example.com")
	mx := e.MX("example.com", "mx.example.com", &cert)
	// RFC 8461 §5.1: no policy could be fetched and none is cached: deliver
	// as if the domain did not use MTA-STS, and report the failure (§6).
	wantDelivered(t, send(t, e.Engine(e.Manager(nil)), "example.com"), mx, 1)
	if got := e.Rec.Results(); len(got) == 0 || got[0].Result != sts.ResultFetchError {
		t.Fatalf("recorded %+v, want the fetch error first", got)
	}
}
