package tlsrpt

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/resolve"
)

// The day the tests record, and a clock time when its reports are due.
var (
	day1     = time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	afterDay = time.Date(2026, 3, 2, 5, 0, 0, 0, time.UTC)
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}
func (c *clock) Advance(d time.Duration) { c.Set(c.Now().Add(d)) }

// syncBuffer collects log output from several goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// env is a Reporter on a real database, with a DNS server, a CA for https
// endpoints, a DKIM key published in DNS, and a running queue whose
// deliveries end in a sink.
type env struct {
	t     *testing.T
	dns   *dnstest.Server
	res   *resolve.Resolver
	ca    *testpki.CA
	clock *clock
	path  string
	db    *bbolt.DB
	q     *queue.Queue
	sink  *sink
	logs  *syncBuffer
	opts  Options
	rep   *Reporter
}

var (
	dkimOnce sync.Once
	dkimKey  *rsa.PrivateKey
)

// testDKIMKey is one RSA key for the whole test binary: making one is slow.
func testDKIMKey(t *testing.T) *rsa.PrivateKey {
	dkimOnce.Do(func() {
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		dkimKey = k
	})
	return dkimKey
}

// dkimRecord is the TXT record publishing key at s1._domainkey.example.com,
// split into strings of at most 255 octets.
func dkimRecord(t *testing.T, key *rsa.PrivateKey) string {
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	txt := "v=DKIM1; k=rsa; p=" + base64.StdEncoding.EncodeToString(der)
	var parts []string
	for len(txt) > 200 {
		parts = append(parts, `"`+txt[:200]+`"`)
		txt = txt[200:]
	}
	parts = append(parts, `"`+txt+`"`)
	return "s1._domainkey.example.com. 60 IN TXT " + strings.Join(parts, " ")
}

func newEnv(t *testing.T, mod func(*Options), records ...string) *env {
	t.Helper()
	key := testDKIMKey(t)
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "dkim.pem")
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600); err != nil {
		t.Fatal(err)
	}
	signer, err := LoadDKIMKey(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, ca: testpki.NewCA(t), clock: &clock{t: afterDay}, path: filepath.Join(dir, "stsrelay.db"), logs: &syncBuffer{}}
	e.dns = dnstest.New(t, append(records, dkimRecord(t, key))...)
	e.res = testResolver(t, e.dns)
	if e.db, err = queue.OpenDB(e.path); err != nil {
		t.Fatal(err)
	}
	e.sink = &sink{got: make(chan delivered, 10)}
	logger := slog.New(slog.NewTextHandler(e.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	if e.q, err = queue.New(e.db, queue.Options{Deliverer: e.sink, Hostname: "relay.example.com", Logger: logger}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.q.Run(ctx); close(done) }()
	e.opts = Options{
		DB: e.db, Update: e.q.Update, Resolver: e.res, Queue: e.q, // as the daemon wires it
		OrganizationName: "Example Relay Operator",
		ContactInfo:      "tlsrpt@example.com",
		Sender:           "tlsrpt-noreply@example.com",
		DKIM:             []DKIMKey{{Domain: "example.com", Selector: "s1", Signer: signer}},
		HTTPTimeout:      500 * time.Millisecond,
		RootCAs:          e.ca.Pool,
		Logger:           logger,
		Now:              e.clock.Now,
	}
	if mod != nil {
		mod(&e.opts)
	}
	e.start()
	t.Cleanup(func() {
		e.rep.Close()
		cancel()
		<-done
		e.q.Close()
		e.db.Close()
		if t.Failed() {
			t.Logf("log:\n%s", e.logs.String())
		}
	})
	return e
}

// start makes the Reporter, as the daemon does at start.
func (e *env) start() {
	e.t.Helper()
	r, err := New(e.opts)
	if err != nil {
		e.t.Fatal(err)
	}
	r.delay = time.Minute
	e.rep = r
}

// restart closes the Reporter and makes a new one on the same database.
func (e *env) restart() {
	e.rep.Close()
	e.start()
}

func (e *env) send(day string, force bool) []SendResult {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	res, err := e.rep.Send(ctx, day, force)
	if err != nil {
		e.t.Fatalf("Send(%s, %v): %v", day, force, err)
	}
	return res
}

func resultFor(t *testing.T, res []SendResult, domain string) SendResult {
	t.Helper()
	for _, r := range res {
		if r.Domain == domain {
			return r
		}
	}
	t.Fatalf("no result for %s in %+v", domain, res)
	return SendResult{}
}

// delivered is one message the queue handed to delivery.
type delivered struct {
	job  *queue.Job
	body []byte
}

// sink is the queue's Deliverer: it accepts everything and keeps it.
type sink struct {
	mu   sync.Mutex
	msgs []delivered
	got  chan delivered
}

func (s *sink) Deliver(ctx context.Context, job *queue.Job) []queue.Status {
	rc, err := job.Open()
	if err != nil {
		panic(err)
	}
	b, _ := io.ReadAll(rc)
	rc.Close()
	d := delivered{job: job, body: b}
	s.mu.Lock()
	s.msgs = append(s.msgs, d)
	s.mu.Unlock()
	s.got <- d
	out := make([]queue.Status, len(job.Recipients))
	for i := range out {
		out[i] = queue.Status{Code: 250, Enhanced: "2.0.0", Text: "ok"}
	}
	return out
}

func (s *sink) wait(t *testing.T) delivered {
	t.Helper()
	select {
	case d := <-s.got:
		return d
	case <-time.After(20 * time.Second):
		t.Fatal("the queue delivered no report mail")
	}
	return delivered{}
}

func (s *sink) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.msgs)
}

// endpoint is an https report receiver on loopback with a certificate
// for name from the test CA.
type endpoint struct {
	srv    *httptest.Server
	url    string
	mu     sync.Mutex
	bodies [][]byte
	types  []string
}

func (e *env) endpoint(name string, handler func(w http.ResponseWriter, r *http.Request)) *endpoint {
	e.t.Helper()
	ep := &endpoint{}
	ep.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(io.LimitReader(r.Body, 20<<20))
		ep.mu.Lock()
		ep.bodies = append(ep.bodies, b)
		ep.types = append(ep.types, r.Method+" "+r.Header.Get("Content-Type"))
		ep.mu.Unlock()
		handler(w, r)
	}))
	ep.srv.TLS = &tls.Config{Certificates: []tls.Certificate{e.ca.Issue(e.t, name)}}
	ep.srv.StartTLS()
	e.t.Cleanup(ep.srv.Close)
	_, port, _ := strings.Cut(strings.TrimPrefix(ep.srv.URL, "https://"), ":")
	ep.url = fmt.Sprintf("https://%s:%s/v1/tlsrpt", name, port)
	e.dns.Add(e.t, name+". 60 IN A 127.0.0.1")
	return ep
}

func (ep *endpoint) requests() int {
	ep.mu.Lock()
	defer ep.mu.Unlock()
	return len(ep.bodies)
}

func (ep *endpoint) body(i int) []byte {
	ep.mu.Lock()
	defer ep.mu.Unlock()
	return ep.bodies[i]
}

// gunzipJSON decodes a compressed report, numbers kept exact.
func gunzipJSON(t *testing.T, gz []byte) map[string]any {
	t.Helper()
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatalf("report is not gzip: %v", err)
	}
	js, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("report is not JSON: %v\n%s", err, js)
	}
	return m
}

// result is a SessionResult at hour h of day1.
func result(domain string, id *policy.Identity, h int, rt policy.ResultType, mx, detail string) policy.SessionResult {
	r := policy.SessionResult{
		Time: day1.Add(time.Duration(h) * time.Hour), PolicyDomain: domain, Policy: id, Result: rt, Detail: detail,
	}
	if mx != "" {
		r.MX, r.SendingIP, r.ReceivingIP, r.HELO = mx, "192.0.2.10", "198.51.100.25", mx
	}
	return r
}
