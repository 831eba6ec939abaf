package sts_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"github.com/stsrelay/stsrelay/policy"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/resolve"
	"github.com/stsrelay/stsrelay/sts"
)

const enforcePolicy = "version: STSv1\nmode: enforce\nmx: mx.example.com\nmx: *.mail.example.net\nmax_age: 604800\n"

// blackholeIP is an address whose connections hang until the dial's context ends.
const blackholeIP = "fd00::dead"

// clock is a settable clock for the cache's notion of time.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// policyHost is a real HTTPS server on loopback that plays mta-sts.<domain>.
type policyHost struct {
	srv      *httptest.Server
	ip       string // the address DNS gives mta-sts.<domain>
	requests atomic.Int32

	mu          sync.Mutex
	body        string
	contentType string
	status      int
	delay       time.Duration
	serverNames []string // SNI of each request
	cookies     []string // Cookie header of each request
	handler     http.HandlerFunc
}

func (h *policyHost) Set(body string) {
	h.mu.Lock()
	h.body, h.status = body, http.StatusOK
	h.mu.Unlock()
}

func (h *policyHost) SetStatus(status int) {
	h.mu.Lock()
	h.status = status
	h.mu.Unlock()
}

func (h *policyHost) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.requests.Add(1)
	h.mu.Lock()
	body, ct, status, delay, handler := h.body, h.contentType, h.status, h.delay, h.handler
	if r.TLS != nil {
		h.serverNames = append(h.serverNames, r.TLS.ServerName)
	}
	h.cookies = append(h.cookies, r.Header.Get("Cookie"))
	h.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return
		}
	}
	if handler != nil {
		handler(w, r)
		return
	}
	if r.URL.Path != "/.well-known/mta-sts.txt" {
		http.NotFound(w, r)
		return
	}
	w.Header().Set("Content-Type", ct)
	w.WriteHeader(status)
	fmt.Fprint(w, body)
}

// env is one test's world: DNS, a CA, policy hosts on loopback and a
// dialer that sends <ip>:443 to the host playing that address.
type env struct {
	t     testing.TB
	DNS   *dnstest.Server
	CA    *testpki.CA
	Res   *resolve.Resolver
	Clock *clock
	Rec   *recorder

	mu     sync.Mutex
	hosts  map[string]string // "127.0.0.N" -> policy host listener (port 443)
	mxs    map[string]string // "127.0.0.N" -> SMTP listener (port 25)
	nextIP int
}

func newEnv(t testing.TB) *env {
	t.Helper()
	e := &env{t: t, DNS: dnstest.New(t), CA: testpki.NewCA(t), Clock: newClock(),
		Rec: &recorder{}, hosts: map[string]string{}, mxs: map[string]string{}, nextIP: 2}
	// No DNS cache: tests change records between lookups.
	res, err := resolve.New(resolve.Config{Servers: []string{e.DNS.Addr}, Timeout: time.Second, CacheEntries: -1})
	if err != nil {
		t.Fatal(err)
	}
	e.Res = res
	return e
}

// Dial is the injected DialContext for policy fetches and SMTP: <ip>:443
// goes to the policy host given that address, <ip>:25 to the MX given it;
// anything else is refused.
func (e *env) Dial(ctx context.Context, network, addr string) (net.Conn, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	if host == blackholeIP {
		<-ctx.Done()
		return nil, fmt.Errorf("dial %s: %w", addr, ctx.Err())
	}
	e.mu.Lock()
	target, ok := e.hosts[host]
	if port == "25" {
		target, ok = e.mxs[host]
	}
	e.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("test dialer: nothing listens at %s", addr)
	}
	var d net.Dialer
	return d.DialContext(ctx, network, target)
}

// PolicyHost starts an HTTPS server with cert serving body for
// mta-sts.<domain>, publishes its address in DNS, and publishes the TXT
// record with id (unless id is "").
func (e *env) PolicyHost(domain, id, body string, cert tls.Certificate) *policyHost {
	e.t.Helper()
	return e.PolicyHostTLS(domain, id, body, &tls.Config{Certificates: []tls.Certificate{cert}})
}

// PolicyHostTLS is PolicyHost with a whole TLS configuration.
func (e *env) PolicyHostTLS(domain, id, body string, cfg *tls.Config) *policyHost {
	e.t.Helper()
	h := &policyHost{body: body, contentType: "text/plain; charset=utf-8", status: http.StatusOK}
	srv := httptest.NewUnstartedServer(h)
	srv.TLS = cfg
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.StartTLS()
	e.t.Cleanup(srv.Close)
	h.srv = srv
	ip := e.newIP()
	h.ip = ip
	e.mu.Lock()
	e.hosts[ip] = srv.Listener.Addr().String()
	e.mu.Unlock()
	e.DNS.Add(e.t, fmt.Sprintf("mta-sts.%s. 300 IN A %s", domain, ip))
	if id != "" {
		e.SetID(domain, id)
	}
	return h
}

// Refuse makes connections to h's address refused, as when the policy
// host is down, or with refuse false answered by h again.
func (e *env) Refuse(h *policyHost, refuse bool) {
	e.t.Helper()
	addr := h.srv.Listener.Addr().String()
	if refuse {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			e.t.Fatal(err)
		}
		addr = ln.Addr().String()
		ln.Close() // nothing listens there now
	}
	e.mu.Lock()
	e.hosts[h.ip] = addr
	e.mu.Unlock()
}

// ValidHost is PolicyHost with a certificate for mta-sts.<domain>.
func (e *env) ValidHost(domain, id, body string) *policyHost {
	return e.PolicyHost(domain, id, body, e.CA.Issue(e.t, "mta-sts."+domain))
}

// SetID replaces the _mta-sts TXT record of domain.
func (e *env) SetID(domain, id string) {
	e.DNS.Remove("_mta-sts."+domain+".", 0)
	e.DNS.Add(e.t, fmt.Sprintf("_mta-sts.%s. 300 IN TXT \"v=STSv1; id=%s\"", domain, id))
}

func (e *env) Options() sts.Options {
	return sts.Options{
		Resolver:    e.Res,
		RootCAs:     e.CA.Pool,
		DialContext: e.Dial,
		Recorder:    e.Rec,
		Now:         e.Clock.Now,
		Logger:      slog.New(slog.DiscardHandler),
	}
}

// Manager returns a Manager with e.Options() changed by mod.
func (e *env) Manager(mod func(*sts.Options)) *sts.Manager {
	e.t.Helper()
	opts := e.Options()
	if mod != nil {
		mod(&opts)
	}
	m, err := sts.New(opts)
	if err != nil {
		e.t.Fatal(err)
	}
	return m
}

func openDB(t *testing.T, path string) *bbolt.DB {
	t.Helper()
	db, err := queue.OpenDB(path) // the daemon's database, shared with the queue
	if err != nil {
		t.Fatal(err)
	}
	return db
}

func dbPath(t *testing.T) string { return filepath.Join(t.TempDir(), "stsrelay.db") }

// recorder collects TLSRPT results.
type recorder struct {
	mu      sync.Mutex
	results []policy.SessionResult
}

func (r *recorder) Record(res policy.SessionResult) {
	r.mu.Lock()
	r.results = append(r.results, res)
	r.mu.Unlock()
}

func (r *recorder) Results() []policy.SessionResult {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]policy.SessionResult(nil), r.results...)
}

// Wait waits, a bounded time, until n results have been recorded: a
// failed policy fetch records one as it ends.
func (r *recorder) Wait(t *testing.T, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for len(r.Results()) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d results recorded after 10s, want %d", len(r.Results()), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// StallingHost publishes mta-sts.<domain> at an address that accepts TCP
// connections and then sends nothing, so a TLS handshake never ends.
func (e *env) StallingHost(domain string) {
	e.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { ln.Close() })
	go func() {
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()
	ip := e.newIP()
	e.mu.Lock()
	e.hosts[ip] = ln.Addr().String()
	e.mu.Unlock()
	e.DNS.Add(e.t, fmt.Sprintf("mta-sts.%s. 300 IN A %s", domain, ip))
}

// resultTypes lists the ResultType of every recorded result.
func (r *recorder) ResultTypes() string {
	var types []string
	for _, res := range r.Results() {
		types = append(types, string(res.Result))
	}
	return strings.Join(types, ",")
}

// newIP hands out a loopback address that names one test server.
func (e *env) newIP() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	ip := fmt.Sprintf("127.0.0.%d", e.nextIP)
	e.nextIP++
	return ip
}

// HoldFirstRequest makes h answer its first request with first, but only
// once release is called (arrived is closed as the request comes in), and
// the requests after it with then. The test's end releases it too.
func (h *policyHost) HoldFirstRequest(t *testing.T, first string, then http.HandlerFunc) (arrived chan struct{}, release func()) {
	arrived, held := make(chan struct{}), make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(held) }) }
	t.Cleanup(release)
	var n atomic.Int32
	h.mu.Lock()
	h.handler = func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1) > 1 {
			then(w, r)
			return
		}
		close(arrived)
		<-held
		servePolicy(first)(w, r)
	}
	h.mu.Unlock()
	return arrived, release
}

// servePolicy answers a request with body as a policy.
func servePolicy(body string) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprint(w, body)
	}
}
