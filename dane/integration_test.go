package dane_test

// DANE against real DNSSEC: a zone signed with ldns-signzone, served by
// nsd, validated by unbound (its only trust anchor), and mail delivered by
// the delivery engine to a go-smtp server on loopback. It proves that a
// real validator's AD bit, not a test double's, reaches the decision.

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/dane"
	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/internal/dnssectest"
	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/resolve"
)

// receiver is a go-smtp server on 127.0.0.1 that keeps what it gets.
type receiver struct {
	port int
	mu   sync.Mutex
	got  map[string]bool // recipient -> arrived over TLS
	sni  map[string]bool
}

func newReceiver(t *testing.T, cert tls.Certificate) *receiver {
	t.Helper()
	r := &receiver{got: map[string]bool{}, sni: map[string]bool{}}
	s := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		return &recvSession{r: r, c: c}, nil
	}))
	s.Domain = "receiver.test"
	s.ReadTimeout, s.WriteTimeout = 10*time.Second, 10*time.Second
	s.TLSConfig = &tls.Config{
		Certificates: []tls.Certificate{cert},
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) {
			r.mu.Lock()
			r.sni[h.ServerName] = true
			r.mu.Unlock()
			return nil, nil
		},
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r.port = l.Addr().(*net.TCPAddr).Port
	go s.Serve(l)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(ctx)
	})
	return r
}

type recvSession struct {
	r     *receiver
	c     *smtp.Conn
	rcpts []string
}

func (s *recvSession) Reset()                               { s.rcpts = nil }
func (s *recvSession) Logout() error                        { return nil }
func (s *recvSession) Mail(string, *smtp.MailOptions) error { return nil }
func (s *recvSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	s.rcpts = append(s.rcpts, to)
	return nil
}
func (s *recvSession) Data(r io.Reader) error {
	if _, err := io.ReadAll(r); err != nil {
		return err
	}
	_, isTLS := s.c.TLSConnectionState()
	s.r.mu.Lock()
	for _, to := range s.rcpts {
		s.r.got[to] = isTLS
	}
	s.r.mu.Unlock()
	return nil
}

func (r *receiver) received(rcpt string) (ok, overTLS bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	overTLS, ok = r.got[rcpt]
	return ok, overTLS
}

func (r *receiver) sawSNI(name string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sni[name]
}

func job(domain string) *queue.Job {
	const body = "Subject: dane\r\n\r\nhello\r\n"
	rcpt := queue.RecipientParams{Addr: "user@" + domain}
	return &queue.Job{
		ID: "J" + domain, Domain: domain, Size: int64(len(body)), Arrived: time.Now(), Attempt: 1,
		Envelope:   queue.Envelope{From: "sender@sender.test", Recipients: []queue.RecipientParams{rcpt}},
		Recipients: []queue.RecipientParams{rcpt},
		Open:       func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader(body)), nil },
	}
}

func TestDANEAgainstARealValidatingResolver(t *testing.T) {
	dnssectest.Require(t)
	cert := testpki.NewCA(t).IssueWith(t, testpki.Options{SelfSigned: true}, "mx.good.dane.test")
	match := testpki.TLSA(cert.Leaf, 3, 1, 1)
	wrong := "3 1 1 " + strings.Repeat("00", 32)
	// The bogus record is signed as this, then altered on the server.
	signedAs := "3 1 1 " + strings.Repeat("11", 32)

	env := dnssectest.Start(t, dnssectest.Zone{Name: "dane.test", Records: []string{
		"good.dane.test. 60 IN MX 10 mx.good.dane.test.",
		"mx.good.dane.test. 60 IN A 127.0.0.1",
		"_25._tcp.mx.good.dane.test. 60 IN TLSA " + match,

		"bad.dane.test. 60 IN MX 10 mx.bad.dane.test.",
		"mx.bad.dane.test. 60 IN A 127.0.0.1",
		"_25._tcp.mx.bad.dane.test. 60 IN TLSA " + wrong,

		// A signed host whose AAAA answer is forged: the validator says
		// SERVFAIL to it, and its validated A record stays under DANE.
		"aaaa.dane.test. 60 IN MX 10 mx.aaaa.dane.test.",
		"mx.aaaa.dane.test. 60 IN A 127.0.0.1",
		"mx.aaaa.dane.test. 60 IN AAAA 2001:db8::1111",
		"_25._tcp.mx.aaaa.dane.test. 60 IN TLSA " + wrong,

		"bogus.dane.test. 60 IN MX 10 mx.bogus.dane.test.",
		"mx.bogus.dane.test. 60 IN A 127.0.0.1",
		"_25._tcp.mx.bogus.dane.test. 60 IN TLSA " + signedAs,

		// A secure alias to the good host: TLSA at the expanded name.
		"alias.dane.test. 60 IN MX 10 mx.alias.dane.test.",
		"mx.alias.dane.test. 60 IN CNAME mx.good.dane.test.",

		// A secure alias into the unsigned child: only the original name
		// is a TLSA base domain (RFC 7672 §2.2.2).
		"mixed.dane.test. 60 IN MX 10 mx.mixed.dane.test.",
		"mx.mixed.dane.test. 60 IN CNAME mx.insecure.dane.test.",
		"_25._tcp.mx.mixed.dane.test. 60 IN TLSA " + match,

		"insecure.dane.test. 60 IN NS ns.insecure.dane.test.",
		"ns.insecure.dane.test. 60 IN A 127.0.0.1",
	}}, []dnssectest.Zone{{Name: "insecure.dane.test", Records: []string{
		"insecure.dane.test. 60 IN MX 10 mx.insecure.dane.test.",
		"mx.insecure.dane.test. 60 IN A 127.0.0.1",
		"_25._tcp.mx.insecure.dane.test. 60 IN TLSA " + wrong,
	}}}, func(zone string) string {
		zone = strings.ReplaceAll(zone, "2001:db8::1111", "2001:db8::2222")
		return strings.ReplaceAll(zone, strings.Repeat("11", 32), strings.Repeat("22", 32))
	})
	defer func() {
		if t.Failed() {
			t.Log(env.Logs())
		}
	}()

	recv := newReceiver(t, cert)
	res, err := resolve.New(resolve.Config{Servers: []string{env.Resolver}, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	src, err := dane.New(dane.Options{Resolver: res})
	if err != nil {
		t.Fatal(err)
	}
	// A real validator sends a signed alias with its RRSIG (DO is set),
	// though the chain ends unsigned: what tells the dane package that a
	// failed CNAME query for that name is a failure in a signed zone.
	if _, r, err := res.Addrs(t.Context(), "mx.mixed.dane.test", resolve.IPv4); err != nil || !r.AliasSigned || r.Secure {
		t.Errorf("mx.mixed.dane.test: %+v, %v; want the alias signed, the chain not secure", r, err)
	}
	var logs strings.Builder
	var logMu sync.Mutex
	e, err := delivery.New(delivery.Options{
		Hostname: "relay.sender.test",
		Resolver: res,
		Policy:   policy.Chain(src),
		// Every MX is 127.0.0.1; port 25 there is the receiver's port.
		DialContext: func(ctx context.Context, network, address string) (net.Conn, error) {
			if address != "127.0.0.1:25" {
				return nil, fmt.Errorf("dialed %s, not an MX of the test zone", address)
			}
			var d net.Dialer
			return d.DialContext(ctx, network, fmt.Sprintf("127.0.0.1:%d", recv.port))
		},
		Timeouts: delivery.Timeouts{Greeting: 5 * time.Second, Command: 5 * time.Second},
		Logger: slog.New(slog.NewTextHandler(writerFunc(func(p []byte) (int, error) {
			logMu.Lock()
			defer logMu.Unlock()
			return logs.Write(p)
		}), nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	deliver := func(domain string) queue.Status {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		return e.Deliver(ctx, job(domain))[0]
	}

	for _, tc := range []struct {
		domain   string
		code     int
		enhanced string
		text     string
	}{
		{"good.dane.test", 250, "2.0.0", ""},
		{"alias.dane.test", 250, "2.0.0", ""},
		{"mixed.dane.test", 250, "2.0.0", ""},
		// Mismatching TLSA in the unsigned zone: not DANE, opportunistic.
		{"insecure.dane.test", 250, "2.0.0", ""},
		{"bad.dane.test", 451, "4.7.5", "mx.bad.dane.test[127.0.0.1]: TLSA records did not match the certificate (DANE)"},
		// A forged AAAA must not turn DANE off for the host's A record.
		{"aaaa.dane.test", 451, "4.7.5", "mx.aaaa.dane.test[127.0.0.1]: TLSA records did not match the certificate (DANE)"},
		// Bogus TLSA: the validator answers SERVFAIL; the host is not used.
		{"bogus.dane.test", 451, "4.7.5", "mx.bogus.dane.test: TLSA lookup for _25._tcp.mx.bogus.dane.test failed: SERVFAIL (DANE)"},
	} {
		st := deliver(tc.domain)
		if st.Code != tc.code || st.Enhanced != tc.enhanced || !strings.Contains(st.Text, tc.text) {
			t.Errorf("%s: %s, want %d %s %s", tc.domain, st, tc.code, tc.enhanced, tc.text)
		}
		ok, overTLS := recv.received("user@" + tc.domain)
		if ok != (tc.code == 250) || (ok && !overTLS) {
			t.Errorf("%s: received %v over TLS %v", tc.domain, ok, overTLS)
		}
	}
	logMu.Lock()
	log := logs.String()
	logMu.Unlock()
	for _, want := range []string{
		"domain=good.dane.test outcome=delivered delivered=1 deferred=0 failed=0 mx=mx.good.dane.test ip=127.0.0.1 policy=dane/dane",
		"domain=alias.dane.test outcome=delivered delivered=1 deferred=0 failed=0 mx=mx.alias.dane.test ip=127.0.0.1 policy=dane/dane",
		"domain=mixed.dane.test outcome=delivered delivered=1 deferred=0 failed=0 mx=mx.mixed.dane.test ip=127.0.0.1 policy=dane/dane",
		"domain=insecure.dane.test outcome=delivered delivered=1 deferred=0 failed=0 mx=mx.insecure.dane.test ip=127.0.0.1 policy=may",
	} {
		if !strings.Contains(log, want) {
			t.Errorf("log lacks %q:\n%s", want, log)
		}
	}
	for _, sni := range []string{"mx.good.dane.test", "mx.mixed.dane.test"} {
		if !recv.sawSNI(sni) {
			t.Errorf("no handshake with SNI %s (the TLSA base domain)", sni)
		}
	}
	if recv.sawSNI("mx.alias.dane.test") {
		t.Error("SNI was the alias, not the TLSA base domain mx.good.dane.test")
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
