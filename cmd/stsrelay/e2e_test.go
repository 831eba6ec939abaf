package main

// End-to-end tests: the real binary, submitting over SMTP, delivering on
// port 25 to go-smtp servers on 127.0.0.x, fetching MTA-STS policies over
// HTTPS on port 443, with DNS from a test server. The binary has no test
// hooks: trust in the test CA comes from SSL_CERT_FILE, as it would for an
// operator with a private CA.
//
// ROOT ONLY: binding ports 25 and 443 needs root (CI runs as root).

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"io"
	"mime"
	"mime/multipart"
	"net"
	"net/http"
	"net/mail"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/internal/testpki"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("this test binds ports 25 and 443 and must run as root in CI")
	}
	t.Skip("needs root to bind ports 25 and 443 on 127.0.0.x; CI runs it as root")
}

// received is one message a sink accepted.
type received struct {
	From       string
	To         []string
	Data       string
	TLS        bool
	RequireTLS bool               // MAIL FROM carried REQUIRETLS
	Notify     [][]smtp.DSNNotify // NOTIFY of each RCPT, on a sink with DSN
}

// sink is a go-smtp server on ip:25 that records what it receives.
type sink struct {
	mu   sync.Mutex
	msgs []received
	got  chan struct{}
	srv  *smtp.Server
	addr string
}

func startSink(t *testing.T, ip string, cert *tls.Certificate, opts ...func(*smtp.Server)) *sink {
	t.Helper()
	return startSinkAt(t, net.JoinHostPort(ip, "25"), cert, opts...)
}

// startSinkAt is startSink on any address; "127.0.0.1:0" takes a free
// port (k.addr), for relays that reach it through a route.
func startSinkAt(t *testing.T, addr string, cert *tls.Certificate, opts ...func(*smtp.Server)) *sink {
	t.Helper()
	k := &sink{got: make(chan struct{}, 100)}
	s := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		_, isTLS := c.TLSConnectionState()
		return &sinkSession{sink: k, tls: isTLS}, nil
	}))
	s.Domain = "sink.test"
	s.AllowInsecureAuth = true
	s.EnableREQUIRETLS = true
	if cert != nil {
		s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{*cert}}
	}
	for _, o := range opts {
		o(s)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("sink on %s: %v", addr, err)
	}
	go s.Serve(ln)
	k.srv, k.addr = s, ln.Addr().String()
	t.Cleanup(func() { s.Close() })
	return k
}

type sinkSession struct {
	sink *sink
	tls  bool
	msg  received
}

func (s *sinkSession) Reset()        { s.msg = received{} }
func (s *sinkSession) Logout() error { return nil }
func (s *sinkSession) Mail(from string, opts *smtp.MailOptions) error {
	s.msg.From = from
	s.msg.RequireTLS = opts != nil && opts.RequireTLS
	return nil
}
func (s *sinkSession) Rcpt(to string, opts *smtp.RcptOptions) error {
	s.msg.To = append(s.msg.To, to)
	var notify []smtp.DSNNotify
	if opts != nil {
		notify = opts.Notify
	}
	s.msg.Notify = append(s.msg.Notify, notify)
	return nil
}
func (s *sinkSession) Data(r io.Reader) error {
	b, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.msg.Data, s.msg.TLS = string(b), s.tls
	s.sink.mu.Lock()
	s.sink.msgs = append(s.sink.msgs, s.msg)
	s.sink.mu.Unlock()
	s.sink.got <- struct{}{}
	return nil
}

// wait returns the n-th received message, failing after timeout.
func (k *sink) wait(t *testing.T, timeout time.Duration) received {
	t.Helper()
	select {
	case <-k.got:
	case <-time.After(timeout):
		t.Fatalf("sink received nothing within %s", timeout)
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.msgs[len(k.msgs)-1]
}

func (k *sink) count() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.msgs)
}

// policyServer serves an MTA-STS policy on ip:443 until stop is called.
func policyServer(t *testing.T, ip string, cert tls.Certificate, policy string) (stop func()) {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "443"))
	if err != nil {
		t.Fatalf("policy server on %s:443: %v", ip, err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path != "/.well-known/mta-sts.txt" {
				http.NotFound(w, r)
				return
			}
			w.Header().Set("Content-Type", "text/plain")
			io.WriteString(w, policy)
		}),
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}},
	}
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	return func() { srv.Close() }
}

// e2e is one relay with its DNS, CA and state.
type e2e struct {
	t      *testing.T
	dns    *dnstest.Server
	ca     *testpki.CA
	config string
	d      *daemon
	addr   string
	env    []string // trust in the test CA, for the daemon and the CLI
}

func newE2E(t *testing.T, records ...string) *e2e {
	t.Helper()
	return newE2EWithTLS(t, false, records...)
}

// newE2EWithTLS is newE2E; with tlsSubmission the relay offers STARTTLS
// on submission with a certificate for relay.test from the test CA.
func newE2EWithTLS(t *testing.T, tlsSubmission bool, records ...string) *e2e {
	t.Helper()
	requireRoot(t)
	dir := t.TempDir()
	e := &e2e{t: t, dns: dnstest.New(t, records...), ca: testpki.NewCA(t)}
	caFile := e.ca.WriteCAFile(t, dir)
	submission := ""
	if tlsSubmission {
		certFile, keyFile := testpki.WriteFiles(t, dir, e.ca.Issue(t, "relay.test"))
		submission = "tls_cert = \"" + certFile + "\"\ntls_key = \"" + keyFile + "\"\n"
	}
	e.config = writeConfig(t, dir, configParts{resolver: e.dns.Addr, submission: submission, tail: `
[delivery]
retry_schedule = ["1h"]
connect_timeout = "5s"
ip_version = "4"
`})
	e.env = []string{"SSL_CERT_FILE=" + caFile, "SSL_CERT_DIR="}
	e.d = startDaemon(t, e.config, e.env...)
	e.addr = e.d.submissionAddr()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("relay log:\n%s", e.d.output())
		}
		if e.d.cmd.ProcessState == nil {
			e.d.stop(syscall.SIGTERM)
		}
	})
	return e
}

// recipient is what `stsrelay queue list -json` says of one recipient.
type recipient struct {
	Address          string `json:"address"`
	State            string `json:"state"`
	LastCode         int    `json:"last_code"`
	LastEnhancedCode string `json:"last_enhanced_code"`
	LastText         string `json:"last_text"`
}

// waitRecipientState polls the queue through the CLI until rcpt reaches
// state, and returns it.
func (e *e2e) waitRecipientState(rcpt, state string) recipient {
	e.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var last string
	for time.Now().Before(deadline) {
		code, out, errOut := stsrelay(e.t, "", "queue", "list", "-json", "-config", e.config)
		if code != 0 {
			e.t.Fatalf("queue list: %s", errOut)
		}
		last = out
		var msgs []struct {
			Recipients []recipient `json:"recipients"`
		}
		if err := json.Unmarshal([]byte(out), &msgs); err != nil {
			e.t.Fatalf("queue list -json: %v\n%s", err, out)
		}
		for _, m := range msgs {
			for _, r := range m.Recipients {
				if r.Address == rcpt && r.State == state {
					return r
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.t.Fatalf("%s never reached state %s; queue:\n%s\nlog:\n%s", rcpt, state, last, e.d.output())
	return recipient{}
}

const stsPolicy = "version: STSv1\nmode: enforce\nmx: mx.example.net\nmax_age: 86400\n"

func stsRecords(mxIP, stsIP string) []string {
	return []string{
		"example.net. 60 IN MX 10 mx.example.net.",
		"mx.example.net. 60 IN A " + mxIP,
		"_mta-sts.example.net. 60 IN TXT \"v=STSv1; id=20261123\"",
		"mta-sts.example.net. 60 IN A " + stsIP,
	}
}

func TestEndToEndDeliversOverVerifiedTLSUnderMTASTSEnforce(t *testing.T) {
	e := newE2E(t, stsRecords("127.0.0.2", "127.0.0.3")...)
	mxCert := e.ca.Issue(t, "mx.example.net")
	k := startSink(t, "127.0.0.2", &mxCert)
	policyServer(t, "127.0.0.3", e.ca.Issue(t, "mta-sts.example.net"), stsPolicy)

	submit(t, e.addr, "app@example.com", "user@example.net", "Subject: enforce\r\n\r\nover verified TLS\r\n")
	msg := k.wait(t, 30*time.Second)
	if !msg.TLS {
		t.Fatal("delivered without TLS under an enforce policy")
	}
	if msg.From != "app@example.com" || len(msg.To) != 1 || msg.To[0] != "user@example.net" {
		t.Fatalf("envelope = %+v", msg)
	}
	if !strings.Contains(msg.Data, "over verified TLS") || !strings.Contains(msg.Data, "Received: ") {
		t.Fatalf("message as delivered:\n%s", msg.Data)
	}
	// One line an operator greps for: verified, the name the certificate
	// matched, the policy, the TLS version spelled as in Received.
	line := e.d.waitFor(`delivery attempt.*outcome=delivered`)
	for _, want := range []string{"policy=mta-sts/verify", "tls=TLSv1.3", `tls_auth="verified TLS, MTA-STS enforce"`, "cert_name=mx.example.net"} {
		if !strings.Contains(line, want) {
			t.Errorf("delivery line lacks %q: %s", want, line)
		}
	}
}

func TestEndToEndDefersRatherThanSendUnverifiedUnderEnforce(t *testing.T) {
	e := newE2E(t, stsRecords("127.0.0.4", "127.0.0.5")...)
	wrong := e.ca.Issue(t, "some-other-host.example")
	k := startSink(t, "127.0.0.4", &wrong)
	policyServer(t, "127.0.0.5", e.ca.Issue(t, "mta-sts.example.net"), stsPolicy)

	submit(t, e.addr, "app@example.com", "user@example.net", "Subject: enforce\r\n\r\nmust not leak\r\n")
	r := e.waitRecipientState("user@example.net", "deferred")
	if r.LastCode != 451 || r.LastEnhancedCode != "4.4.8" || !strings.Contains(r.LastText, "MX hosts of 'example.net' failed MTA-STS validation") {
		t.Fatalf("deferral = %d %s %q, want 451 4.4.8 MX hosts of 'example.net' failed MTA-STS validation…", r.LastCode, r.LastEnhancedCode, r.LastText)
	}
	if !strings.Contains(r.LastText, "mx.example.net") {
		t.Fatalf("deferral %q does not name the failing host", r.LastText)
	}
	if n := k.count(); n != 0 {
		t.Fatalf("the MX received %d messages over an unverified channel", n)
	}
}

func TestEndToEndNullMXBouncesToTheSender(t *testing.T) {
	e := newE2E(t,
		"nomail.example. 60 IN MX 0 .",
		"example.com. 60 IN MX 10 mx.example.com.",
		"mx.example.com. 60 IN A 127.0.0.6",
	)
	k := startSink(t, "127.0.0.6", nil)
	submit(t, e.addr, "app@example.com", "user@nomail.example", "Subject: to nowhere\r\n\r\nbody\r\n")

	dsn := k.wait(t, 30*time.Second)
	if dsn.From != "" || len(dsn.To) != 1 || dsn.To[0] != "app@example.com" {
		t.Fatalf("bounce envelope = %q → %v, want <> → app@example.com", dsn.From, dsn.To)
	}
	for _, want := range []string{"report-type=delivery-status", "Status: 5.1.10", "Final-Recipient: rfc822; user@nomail.example", "null MX"} {
		if !strings.Contains(dsn.Data, want) {
			t.Errorf("bounce lacks %q:\n%s", want, dsn.Data)
		}
	}
}

func TestEndToEndSTSCommandsShowRefreshAndPurgeTheCache(t *testing.T) {
	e := newE2E(t, stsRecords("127.0.0.7", "127.0.0.8")...)
	mxCert := e.ca.Issue(t, "mx.example.net")
	k := startSink(t, "127.0.0.7", &mxCert)
	policyServer(t, "127.0.0.8", e.ca.Issue(t, "mta-sts.example.net"), stsPolicy)
	submit(t, e.addr, "app@example.com", "user@example.net", "Subject: x\r\n\r\nx\r\n")
	k.wait(t, 30*time.Second)

	// Flags go before the arguments, as with the go tool.
	sts := func(args ...string) (int, string, string) {
		all := append([]string{"sts", args[0], "-config", e.config}, args[1:]...)
		return stsrelayEnv(t, e.env, "", all...)
	}
	code, out, errOut := sts("list", "-json")
	if code != 0 || !strings.Contains(out, "example.net") || !strings.Contains(out, "20261123") {
		t.Fatalf("sts list -json: %d %s %s", code, out, errOut)
	}
	code, out, _ = sts("show", "example.net")
	if code != 0 || !strings.Contains(out, "mode:      enforce") || !strings.Contains(out, "mx:        mx.example.net") {
		t.Fatalf("sts show: %d\n%s", code, out)
	}
	if code, _, errOut := sts("refresh", "example.net"); code != 0 {
		t.Fatalf("sts refresh: %s", errOut)
	}
	if code, out, _ := sts("purge", "example.net"); code != 0 || !strings.Contains(out, "purged") {
		t.Fatalf("sts purge: %d %s", code, out)
	}
	// Administrative changes name who asked.
	e.d.waitFor(`sts: refresh by the administrator.*domain=example.net.*by_uid=0 by_user=root`)
	e.d.waitFor(`sts: purge by the administrator.*domain=example.net.*by_uid=0 by_user=root`)
	code, _, errOut = sts("show", "example.net")
	if code == 0 {
		t.Fatal("sts show succeeded for a purged domain")
	}
	assertOneLine(t, errOut)
	if code, _, errOut := sts("purge", "not-cached.example"); code == 0 {
		t.Fatalf("purging an unknown domain succeeded: %s", errOut)
	}
}

// During an outage the postmaster runs sts list first: it shows the
// domains that have no policy because their policy host is down, with the
// failed id, when and why, escaped where the policy host chose the words;
// once the host is back and the policy fetched, the domain is listed as a
// cached policy and the failure is gone.
func TestEndToEndSTSListShowsDomainsWhosePolicyCannotBeFetched(t *testing.T) {
	e := newE2E(t,
		"_mta-sts.down.example. 60 IN TXT \"v=STSv1; id=20261201\"",
		"mta-sts.down.example. 60 IN A 127.0.0.37", // nothing listens yet
		"_mta-sts.hostile.example. 60 IN TXT \"v=STSv1; id=20261202\"",
		"mta-sts.hostile.example. 60 IN A 127.0.0.38",
	)
	// The certificate names are the policy host's, and end up in the error.
	stopHostile := policyServer(t, "127.0.0.38", e.ca.Issue(t, "\x1b]0;owned\x07\x1b[2J", "x\n  forged line"), stsPolicy)
	sts := func(args ...string) (int, string, string) {
		all := append([]string{"sts", args[0], "-config", e.config}, args[1:]...)
		return stsrelayEnv(t, e.env, "", all...)
	}
	code, out, _ := sts("list")
	if code != 0 || out != "no cached MTA-STS policies\n" {
		t.Fatalf("sts list before any fetch: %d %q", code, out)
	}
	for _, d := range []string{"down.example", "hostile.example"} {
		code, _, errOut := sts("refresh", d)
		if code == 0 {
			t.Fatalf("sts refresh %s succeeded", d)
		}
		assertOneLine(t, errOut)
		if strings.ContainsAny(errOut, "\x1b\x07") {
			t.Errorf("sts refresh %s printed a control character: %q", d, errOut)
		}
	}
	code, out, errOut := sts("show", "hostile.example")
	if code == 0 || !strings.Contains(errOut, "no cached MTA-STS policy for hostile.example; the fetch of policy id 20261202 failed") ||
		!strings.Contains(errOut, `\x1b]0;owned\a\x1b[2J`) || strings.ContainsAny(errOut, "\x1b\x07") {
		t.Errorf("sts show hostile.example: %d %q %q; want its failed fetch, escaped", code, out, errOut)
	}

	code, out, _ = sts("list")
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if code != 0 || len(lines) != 3 || !strings.HasPrefix(lines[0], "DOMAIN") || !strings.HasSuffix(lines[0], "MX  LAST FETCH FAILED") {
		t.Fatalf("sts list during the outage: %d\n%s", code, out)
	}
	if f := strings.Fields(lines[1]); len(f) < 9 || f[0] != "down.example" || strings.Join(f[1:5], " ") != "- - - -" || f[5] != "20261201" ||
		f[6] != "at" || !strings.Contains(lines[1], "connection refused") || strings.Contains(lines[1], "https://") {
		t.Errorf("down.example in the list: %q; want no policy, the fetch of 20261201 refused", lines[1])
	}
	if !strings.HasPrefix(lines[2], "hostile.example") || !strings.Contains(lines[2], "20261202 at ") ||
		!strings.Contains(lines[2], `certificate is valid for \x1b]0;owned\a\x1b[2J, x forged line, not mta-sts.hostile.example`) {
		t.Errorf("hostile.example in the list: %q; want its failure with the certificate names escaped", lines[2])
	}
	if strings.ContainsAny(out, "\x1b\x07\t") {
		t.Errorf("sts list printed a control character:\n%q", out)
	}
	var list []map[string]any
	code, out, _ = sts("list", "-json")
	if err := json.Unmarshal([]byte(out), &list); code != 0 || err != nil || len(list) != 2 {
		t.Fatalf("sts list -json: %d %v\n%s", code, err, out)
	}
	if f, _ := list[0]["last_failure"].(map[string]any); list[0]["domain"] != "down.example" || list[0]["not_cached"] != true ||
		f["id"] != "20261201" || f["result"] != "sts-policy-fetch-error" || list[0]["mode"] != nil {
		t.Errorf("down.example in sts list -json: %v", list[0])
	}

	// The policy host comes up: the domain is a cached policy, no more
	// failure, and the failure column stays for the domain still failing.
	stopDown := policyServer(t, "127.0.0.37", e.ca.Issue(t, "mta-sts.down.example"),
		"version: STSv1\nmode: testing\nmx: mx.down.example\nmax_age: 86400\n")
	if code, _, errOut := sts("refresh", "down.example"); code != 0 {
		t.Fatalf("sts refresh down.example once its host is up: %s", errOut)
	}
	code, out, _ = sts("list")
	lines = strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if f := strings.Fields(lines[1]); code != 0 || len(lines) != 3 || len(f) != 5 || f[0] != "down.example" || f[1] != "testing" ||
		f[2] != "20261201" || f[4] != "mx.down.example" || lines[1] != strings.TrimRight(lines[1], " ") {
		t.Errorf("down.example after its policy was fetched: %d\n%s", code, out)
	}
	stopHostile()
	policyServer(t, "127.0.0.38", e.ca.Issue(t, "mta-sts.hostile.example"), "version: STSv1\nmode: none\nmax_age: 86400\n")
	if code, _, errOut := sts("refresh", "hostile.example"); code != 0 {
		t.Fatalf("sts refresh hostile.example with a good certificate: %s", errOut)
	}
	// With no failure left, the list reads as it did before failures
	// were listed.
	code, out, _ = sts("list")
	if lines := strings.Split(out, "\n"); code != 0 || len(lines) != 4 || strings.TrimRight(lines[0], " ") != "DOMAIN           MODE     ID        EXPIRES               MX" ||
		!strings.HasPrefix(lines[2], "hostile.example  none     20261202  ") {
		t.Errorf("sts list with every fetch done: %d\n%s", code, out)
	}

	// The host of a cached policy goes down: show says which id failed.
	stopDown()
	if code, _, _ := sts("refresh", "down.example"); code == 0 {
		t.Fatal("sts refresh down.example succeeded with its policy host down")
	}
	code, out, _ = sts("show", "down.example")
	if code != 0 || !strings.Contains(out, "id:        20261201\n") || !strings.Contains(out, "\nlast fetch failed: 20261201 at ") ||
		!strings.Contains(out, "connection refused") {
		t.Errorf("sts show down.example after a failed refresh: %d\n%s", code, out)
	}
}

func TestEndToEndCachedPolicyOutlivesPolicyHostOutageAndRestart(t *testing.T) {
	e := newE2E(t, stsRecords("127.0.0.11", "127.0.0.12")...)
	good := e.ca.Issue(t, "mx.example.net")
	k := startSink(t, "127.0.0.11", &good)
	stopPolicy := policyServer(t, "127.0.0.12", e.ca.Issue(t, "mta-sts.example.net"), stsPolicy)
	submit(t, e.addr, "app@example.com", "user@example.net", "Subject: 1\r\n\r\nfirst\r\n")
	if !k.wait(t, 30*time.Second).TLS {
		t.Fatal("first message not over TLS")
	}

	// The policy host goes away, the relay restarts, and the MX now shows
	// a certificate for another name. The cached enforce policy must hold.
	stopPolicy()
	if code := e.d.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("exit %d", code)
	}
	k.srv.Close()
	wrong := e.ca.Issue(t, "other.example")
	k2 := startSink(t, "127.0.0.11", &wrong)
	e.d = startDaemon(t, e.config, e.env...)
	e.addr = e.d.submissionAddr()

	submit(t, e.addr, "app@example.com", "user2@example.net", "Subject: 2\r\n\r\nsecond\r\n")
	r := e.waitRecipientState("user2@example.net", "deferred")
	if r.LastCode != 451 || r.LastEnhancedCode != "4.4.8" {
		t.Fatalf("after the outage and restart: %d %s %q, want 451 4.4.8 from the cached enforce policy", r.LastCode, r.LastEnhancedCode, r.LastText)
	}
	if n := k2.count(); n != 0 {
		t.Fatalf("%d messages went to an MX with the wrong certificate", n)
	}

	// check follows the relay's cache, not the (failing) live fetch.
	code, out, _ := stsrelayEnv(t, e.env, "", "check", "-config", e.config, "example.net")
	if code != 1 || !strings.Contains(out, "cached by the running relay: id 20261123, mode enforce") ||
		!strings.Contains(out, "would defer: 451 4.4.8") {
		t.Fatalf("check during the outage: exit %d, want 1 with the cached policy's deferral:\n%s", code, out)
	}
}

// submitRequireTLS submits over STARTTLS with MAIL FROM … REQUIRETLS.
func (e *e2e) submitRequireTLS(from, to, body string) {
	e.t.Helper()
	c, err := smtp.DialStartTLS(e.addr, &tls.Config{ServerName: "relay.test", RootCAs: e.ca.Pool})
	if err != nil {
		e.t.Fatal(err)
	}
	defer c.Close()
	if err := c.Mail(from, &smtp.MailOptions{RequireTLS: true}); err != nil {
		e.t.Fatalf("MAIL FROM … REQUIRETLS: %v", err)
	}
	if err := c.Rcpt(to, nil); err != nil {
		e.t.Fatal(err)
	}
	w, err := c.Data()
	if err != nil {
		e.t.Fatal(err)
	}
	io.WriteString(w, body)
	if err := w.Close(); err != nil {
		e.t.Fatal(err)
	}
	c.Quit()
}

func TestEndToEndRequireTLSGoesOnlyToAnAuthenticatedMX(t *testing.T) {
	e := newE2EWithTLS(t, true, append(stsRecords("127.0.0.13", "127.0.0.14"),
		// example.org: no MTA-STS, no DNSSEC: its MX cannot be validated.
		"example.org. 60 IN MX 10 mx.example.org.",
		"mx.example.org. 60 IN A 127.0.0.15",
		"example.com. 60 IN MX 10 mx.example.com.",
		"mx.example.com. 60 IN A 127.0.0.16",
	)...)
	good := e.ca.Issue(t, "mx.example.net")
	k := startSink(t, "127.0.0.13", &good)
	policyServer(t, "127.0.0.14", e.ca.Issue(t, "mta-sts.example.net"), stsPolicy)
	orgCert := e.ca.Issue(t, "mx.example.org")
	unvalidated := startSink(t, "127.0.0.15", &orgCert)
	senderMX := startSink(t, "127.0.0.16", nil)

	e.submitRequireTLS("app@example.com", "user@example.net", "Subject: requiretls\r\n\r\nsecret\r\n")
	msg := k.wait(t, 30*time.Second)
	if !msg.TLS || !msg.RequireTLS {
		t.Fatalf("delivered with TLS=%v REQUIRETLS=%v, want both (RFC 8689 §4.2.1)", msg.TLS, msg.RequireTLS)
	}

	// No MX of example.org can be validated: a permanent 5.7.30, never a
	// plaintext or unauthenticated delivery, never a retry loop.
	e.submitRequireTLS("app@example.com", "user@example.org", "Subject: requiretls\r\n\r\nsecret\r\n")
	e.d.waitFor(`recipients updated.*recipients=user@example.org outcome=failed status="550 5.7.30`)
	// The bounce carries REQUIRETLS too (RFC 8689 §5), and example.com's
	// MX is not validated either: it fails, and a bounce is never bounced.
	e.d.waitFor(`queued DSN`)
	e.d.waitFor(`recipients updated.*recipients=app@example.com outcome=failed status="550 5.7.30`)
	if n := unvalidated.count() + senderMX.count(); n != 0 {
		t.Fatalf("%d REQUIRETLS messages went to MX hosts that neither DNSSEC nor MTA-STS validates", n)
	}
}

// RFC 3461 §5.2.1, §5.2.2: NOTIFY=SUCCESS goes on to a DSN-capable next
// hop, which then owns the success notice: the relay sends none of its
// own. A next hop without DSN gets the message without NOTIFY, and the
// sender a "relayed" DSN.
func TestEndToEndSuccessNoticeBelongsToADSNCapableNextHop(t *testing.T) {
	e := newE2E(t,
		"dsn.example. 60 IN MX 10 mx.dsn.example.",
		"mx.dsn.example. 60 IN A 127.0.0.17",
		"nodsn.example. 60 IN MX 10 mx.nodsn.example.",
		"mx.nodsn.example. 60 IN A 127.0.0.18",
		"example.com. 60 IN MX 10 mx.example.com.",
		"mx.example.com. 60 IN A 127.0.0.19",
	)
	withDSN := startSink(t, "127.0.0.17", nil, func(s *smtp.Server) { s.EnableDSN = true })
	withoutDSN := startSink(t, "127.0.0.18", nil)
	sender := startSink(t, "127.0.0.19", nil)
	submitNotify := func(to string) {
		t.Helper()
		c, err := smtp.Dial(e.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := c.Mail("app@example.com", nil); err != nil {
			t.Fatal(err)
		}
		if err := c.Rcpt(to, &smtp.RcptOptions{Notify: []smtp.DSNNotify{smtp.DSNNotifySuccess, smtp.DSNNotifyFailure}}); err != nil {
			t.Fatal(err)
		}
		w, err := c.Data()
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(w, "Subject: notify\r\n\r\nbody\r\n")
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
	}

	submitNotify("user@dsn.example")
	msg := withDSN.wait(t, 30*time.Second)
	if len(msg.Notify) != 1 || len(msg.Notify[0]) != 2 || msg.Notify[0][0] != smtp.DSNNotifySuccess {
		t.Fatalf("NOTIFY at the DSN-capable hop = %v, want SUCCESS,FAILURE passed on", msg.Notify)
	}
	e.d.waitFor(`recipients=user@dsn.example outcome=delivered`)

	submitNotify("user@nodsn.example")
	msg = withoutDSN.wait(t, 30*time.Second)
	if len(msg.Notify) != 1 || msg.Notify[0] != nil {
		t.Fatalf("NOTIFY sent to a hop without DSN: %v", msg.Notify)
	}
	dsn := sender.wait(t, 30*time.Second)
	for _, want := range []string{"Action: relayed", "Final-Recipient: rfc822; user@nodsn.example"} {
		if !strings.Contains(dsn.Data, want) {
			t.Errorf("DSN lacks %q:\n%s", want, dsn.Data)
		}
	}
	// The first message's outcome was logged, with any DSN it caused,
	// before the second was submitted: one DSN in all.
	if n := strings.Count(e.d.output(), "queued DSN"); n != 1 {
		t.Errorf("%d DSNs queued, want only the relayed one (the DSN-capable hop owns the other)", n)
	}
	if strings.Contains(dsn.Data, "user@dsn.example") || sender.count() != 1 {
		t.Errorf("the sender got a success DSN for the DSN-capable hop's recipient:\n%s", dsn.Data)
	}
}

// DANE through the binary: TLSA records in a zone the resolver marks
// secure authenticate a self-signed MX certificate (no CA would), and a
// mismatching RRset defers with 4.7.5 without a byte of the message sent.
func TestEndToEndDANEAuthenticatesTheMXOrDefers(t *testing.T) {
	e := newE2E(t,
		"dane.example. 60 IN MX 10 mx.dane.example.",
		"mx.dane.example. 60 IN A 127.0.0.41",
		"bad.example. 60 IN MX 10 mx.bad.example.",
		"mx.bad.example. 60 IN A 127.0.0.41",
		"_25._tcp.mx.bad.example. 60 IN TLSA 3 1 1 "+strings.Repeat("00", 32))
	cert := e.ca.IssueWith(t, testpki.Options{SelfSigned: true}, "mx.dane.example", "mx.bad.example")
	e.dns.Add(t, "_25._tcp.mx.dane.example. 60 IN TLSA "+testpki.TLSA(cert.Leaf, 3, 1, 1))
	e.dns.Secure("dane.example", "mx.dane.example", "_25._tcp.mx.dane.example",
		"bad.example", "mx.bad.example", "_25._tcp.mx.bad.example")
	k := startSink(t, "127.0.0.41", &cert)

	submit(t, e.addr, "app@example.com", "user@dane.example", "Subject: dane\r\n\r\nauthenticated by DANE\r\n")
	if msg := k.wait(t, 30*time.Second); !msg.TLS || !strings.Contains(msg.Data, "authenticated by DANE") {
		t.Fatalf("delivered %+v, want it over TLS", msg)
	}
	e.d.waitFor(`policy=dane/dane`)

	submit(t, e.addr, "app@example.com", "user@bad.example", "Subject: dane\r\n\r\nmust not leak\r\n")
	r := e.waitRecipientState("user@bad.example", "deferred")
	if r.LastCode != 451 || r.LastEnhancedCode != "4.7.5" || !strings.Contains(r.LastText, "mx.bad.example[127.0.0.41]: TLSA records did not match the certificate (DANE)") {
		t.Fatalf("deferral = %d %s %q, want 451 4.7.5 … TLSA records did not match the certificate", r.LastCode, r.LastEnhancedCode, r.LastText)
	}
	if n := k.count(); n != 1 {
		t.Fatalf("the MX received %d messages, want only the authenticated one", n)
	}
}

// sevenBitMX is an SMTP server on ip:25 that offers no extension at all,
// 8BITMIME included (go-smtp's server always offers it), and sends each
// message it takes, dots unstuffed, to the channel it returns.
func sevenBitMX(t *testing.T, ip string) <-chan string {
	t.Helper()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "25"))
	if err != nil {
		t.Fatalf("MX on %s: %v", ip, err)
	}
	t.Cleanup(func() { ln.Close() })
	got := make(chan string, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				r := bufio.NewReader(c)
				io.WriteString(c, "220 mx.example.com ESMTP\r\n")
				for {
					line, err := r.ReadString('\n')
					if err != nil {
						return
					}
					switch verb := strings.ToUpper(strings.Fields(line + " x")[0]); verb {
					case "EHLO":
						io.WriteString(c, "250 mx.example.com\r\n")
					case "DATA":
						io.WriteString(c, "354 go ahead\r\n")
						var b strings.Builder
						for {
							l, err := r.ReadString('\n')
							if err != nil {
								return
							}
							if l == ".\r\n" {
								break
							}
							b.WriteString(strings.TrimPrefix(l, "."))
						}
						got <- b.String()
						io.WriteString(c, "250 2.0.0 queued\r\n")
					case "QUIT":
						io.WriteString(c, "221 bye\r\n")
						return
					default:
						io.WriteString(c, "250 ok\r\n")
					}
				}
			}()
		}
	}()
	return got
}

// The bounce of an 8-bit message returned whole (RET=FULL), to a sender
// whose MX lacks 8BITMIME: the relay's own DSN goes 7-bit, the message
// still whole in it, rather than failing with 5.6.3 and, having the null
// sender, being lost.
func TestEndToEndBounceOfAn8BitMessageReachesAMXWithout8BITMIME(t *testing.T) {
	e := newE2E(t,
		"nomail.example. 60 IN MX 0 .",
		"example.com. 60 IN MX 10 mx.example.com.",
		"mx.example.com. 60 IN A 127.0.0.49",
	)
	got := sevenBitMX(t, "127.0.0.49")
	c, err := smtp.Dial(e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Mail("app@example.com", &smtp.MailOptions{Body: smtp.Body8BitMIME, Return: smtp.DSNReturnFull}); err != nil {
		t.Fatal(err)
	}
	if err := c.Rcpt("user@nomail.example", nil); err != nil {
		t.Fatal(err)
	}
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(w, "From: app@example.com\r\nSubject: Grüße\r\n\r\nGrüße aus Köln\r\n")
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	c.Quit()

	var dsn string
	select {
	case dsn = <-got:
	case <-time.After(30 * time.Second):
		t.Fatalf("no DSN reached the sender's MX; relay log:\n%s", e.d.output())
	}
	for i := 0; i < len(dsn); i++ {
		if dsn[i] >= 0x80 {
			t.Fatalf("8-bit octet at %d of the DSN sent to a host without 8BITMIME:\n%s", i, dsn)
		}
	}
	msg, err := mail.ReadMessage(strings.NewReader(dsn))
	if err != nil {
		t.Fatal(err)
	}
	_, params, _ := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	mr := multipart.NewReader(msg.Body, params["boundary"])
	var parts []string
	var returned string
	for {
		p, err := mr.NextPart() // quoted-printable decoded
		if err != nil {
			break
		}
		b, _ := io.ReadAll(p)
		ct := p.Header.Get("Content-Type")
		parts = append(parts, ct)
		if ct == "message/global" {
			returned = string(b)
		}
	}
	if len(parts) != 3 || !strings.Contains(dsn, "Status: 5.1.10") {
		t.Fatalf("DSN parts %q; want a failure report:\n%s", parts, dsn)
	}
	if !strings.HasSuffix(returned, "Subject: Grüße\r\n\r\nGrüße aus Köln\r\n") || !strings.Contains(returned, "Received: ") {
		t.Errorf("the message returned, decoded:\n%s\nwant the whole message as queued", returned)
	}
}
