package main

// Tests of `stsrelay check` through the binary, against a test DNS server,
// MTA-STS policy hosts on 127.0.0.x:443 and MX hosts on 127.0.0.x:25.
// ROOT ONLY (ports 25 and 443), like the other end-to-end tests.
//
// The golden files in testdata/check hold the expected output, with times
// and cipher suites replaced by placeholders;
// `go test ./cmd/stsrelay/ -run TestCheck -args -update` rewrites them after
// a deliberate change.

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/queue"
)

var update = flag.Bool("update", false, "rewrite the golden files of check")

// checkWorld is DNS, a CA and a configuration; no daemon unless started.
type checkWorld struct {
	t      *testing.T
	dns    *dnstest.Server
	ca     *testpki.CA
	dir    string
	config string
	env    []string
}

func newCheckWorld(t *testing.T, tail string, records ...string) *checkWorld {
	t.Helper()
	requireRoot(t)
	w := &checkWorld{t: t, dns: dnstest.New(t, records...), ca: testpki.NewCA(t), dir: t.TempDir()}
	caFile := w.ca.WriteCAFile(t, w.dir)
	w.config = writeConfig(t, w.dir, configParts{resolver: w.dns.Addr, tail: `
[delivery]
retry_schedule = ["1h"]
connect_timeout = "5s"
ip_version = "4"
` + tail})
	w.env = []string{"SSL_CERT_FILE=" + caFile, "SSL_CERT_DIR="}
	return w
}

func (w *checkWorld) check(args ...string) (int, string) {
	w.t.Helper()
	code, out, errOut := stsrelayEnv(w.t, w.env, "", append([]string{"check", "-config", w.config}, args...)...)
	if errOut != "" {
		w.t.Errorf("check wrote to stderr: %s", errOut)
	}
	return code, out
}

// deliverOnce starts the relay on the same configuration, submits one
// message to rcpt and returns the recipient once it is delivered or
// deferred, with the daemon stopped.
func (w *checkWorld) deliverOnce(rcpt string) recipient {
	w.t.Helper()
	e := &e2e{t: w.t, dns: w.dns, ca: w.ca, config: w.config, env: w.env}
	e.d = startDaemon(w.t, w.config, w.env...)
	defer e.d.stop(syscall.SIGTERM)
	submit(w.t, e.d.submissionAddr(), "app@sender.test", rcpt, "Subject: check\r\n\r\nproof\r\n")
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		_, out, _ := stsrelay(w.t, "", "queue", "list", "-json", "-config", w.config)
		var msgs []struct {
			Recipients []recipient `json:"recipients"`
		}
		json.Unmarshal([]byte(out), &msgs)
		for _, m := range msgs {
			for _, r := range m.Recipients {
				if r.Address == rcpt && (r.State == "deferred" || r.State == "delivered" || r.State == "failed") {
					return r
				}
			}
		}
		if strings.Contains(e.d.output(), `outcome=delivered`) {
			return recipient{Address: rcpt, State: "delivered", LastCode: 250}
		}
		time.Sleep(100 * time.Millisecond)
	}
	w.t.Fatalf("no outcome for %s; log:\n%s", rcpt, e.d.output())
	return recipient{}
}

var (
	timeRE   = regexp.MustCompile(`\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z`)
	cipherRE = regexp.MustCompile(`TLS_[A-Z0-9_]+`)
	hexRE    = regexp.MustCompile(`[0-9a-f]{24,}`) // TLSA data of fresh keys
)

// golden compares out with testdata/check/name, after replacing what
// changes from run to run.
func golden(t *testing.T, name, out string) {
	t.Helper()
	out = timeRE.ReplaceAllString(out, "<TIME>")
	out = cipherRE.ReplaceAllString(out, "<CIPHER>")
	out = hexRE.ReplaceAllString(out, "<HEX>")
	path := filepath.Join("testdata", "check", name)
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(out), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if string(want) != out {
		t.Errorf("check output differs from %s:\n--- got\n%s\n--- want\n%s", path, out, want)
	}
}

func stsZone(domain, mxIP, stsIP string) []string {
	return []string{
		domain + ". 60 IN MX 10 mx." + domain + ".",
		"mx." + domain + ". 60 IN A " + mxIP,
		"_mta-sts." + domain + ". 60 IN TXT \"v=STSv1; id=20261205\"",
		"mta-sts." + domain + ". 60 IN A " + stsIP,
	}
}

func enforceFor(mx string) string {
	return "version: STSv1\nmode: enforce\nmx: " + mx + "\nmax_age: 604800\n"
}

func TestCheckHealthyEnforceDomain(t *testing.T) {
	w := newCheckWorld(t, "", stsZone("good.example", "127.0.0.20", "127.0.0.21")...)
	cert := w.ca.Issue(t, "mx.good.example")
	startSink(t, "127.0.0.20", &cert)
	policyServer(t, "127.0.0.21", w.ca.Issue(t, "mta-sts.good.example"), enforceFor("mx.good.example"))

	code, out := w.check("good.example")
	if code != 0 {
		t.Errorf("exit %d, want 0:\n%s", code, out)
	}
	golden(t, "healthy.txt", out)

	code, out = w.check("-json", "good.example")
	if code != 0 {
		t.Errorf("-json: exit %d, want 0", code)
	}
	var v checkJSON
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		t.Fatalf("-json output does not parse: %v\n%s", err, out)
	}
	if v.Exit != 0 || len(v.Hosts) != 1 || v.Hosts[0].Session == nil || v.Hosts[0].Requirement.Policy != "sts" ||
		v.MTASTS == nil || v.MTASTS.Policy == nil || v.MTASTS.Policy.Mode != "enforce" || v.Outcome == nil || v.Outcome.Code != 250 {
		t.Errorf("-json = %+v", v)
	}
	golden(t, "healthy.json", out)
}

func TestCheckEnforceWithAWrongNameCertificate(t *testing.T) {
	w := newCheckWorld(t, "", stsZone("bad.example", "127.0.0.22", "127.0.0.23")...)
	cert := w.ca.Issue(t, "some-other-host.example")
	startSink(t, "127.0.0.22", &cert)
	policyServer(t, "127.0.0.23", w.ca.Issue(t, "mta-sts.bad.example"), enforceFor("mx.bad.example"))

	code, out := w.check("bad.example")
	if code != 1 {
		t.Errorf("exit %d, want 1", code)
	}
	if !strings.Contains(out, "would defer: 451 4.4.8") || !strings.Contains(out, "certificate name mismatch") {
		t.Errorf("the verdict does not name the status and the reason:\n%s", out)
	}
	golden(t, "wrong-certificate.txt", out)
}

// The MX record's own name is an alias of the host the policy lists.
func TestCheckCNAMEMXUnderBothReadings(t *testing.T) {
	records := []string{
		"cname.example. 60 IN MX 10 mx.cname.example.",
		"mx.cname.example. 60 IN CNAME host.provider.example.",
		"host.provider.example. 60 IN A 127.0.0.24",
		"_mta-sts.cname.example. 60 IN CNAME _mta-sts.provider.example.",
		"_mta-sts.provider.example. 60 IN TXT \"v=STSv1; id=hosted1\"",
		"mta-sts.cname.example. 60 IN CNAME sts.provider.example.",
		"sts.provider.example. 60 IN A 127.0.0.25",
	}
	for _, tc := range []struct {
		name, tail, file string
		exit             int
	}{
		{"RFC 8461 §4.1", "", "cname-rfc.txt", 1},
		{"match_cname_target", "[sts]\nmatch_cname_target = true\n", "cname-target.txt", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newCheckWorld(t, tc.tail, records...)
			c := w.ca.Issue(t, "host.provider.example")
			startSink(t, "127.0.0.24", &c)
			policyServer(t, "127.0.0.25", w.ca.Issue(t, "mta-sts.cname.example"), enforceFor("host.provider.example"))
			code, out := w.check("cname.example")
			if code != tc.exit {
				t.Errorf("exit %d, want %d:\n%s", code, tc.exit, out)
			}
			if !strings.Contains(out, "MX target mx.cname.example is a CNAME of host.provider.example") ||
				!strings.Contains(out, "_mta-sts.cname.example: CNAME to _mta-sts.provider.example") {
				t.Errorf("no CNAME advice or hosted-TXT line:\n%s", out)
			}
			golden(t, tc.file, out)
		})
	}
}

// A local policy changes what delivery does, and check says exactly that:
// the same configuration then delivers (or defers) as check said.
func TestCheckFollowsLocalPolicies(t *testing.T) {
	for _, tc := range []struct {
		name, tls, file string
		exit            int
		state           string
		code            int
		enhanced        string
		plaintext       bool
	}{
		{"tls none over MTA-STS enforce", "none", "local-none.txt", 0, "delivered", 250, "", true},
		{"dane-only without TLSA", "dane-only", "local-dane-only.txt", 1, "deferred", 451, "4.7.5", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newCheckWorld(t, "[[delivery.policy]]\ndomain = \"local.example\"\ntls = \""+tc.tls+"\"\n",
				stsZone("local.example", "127.0.0.26", "127.0.0.27")...)
			wrong := w.ca.Issue(t, "some-other-host.example")
			k := startSink(t, "127.0.0.26", &wrong)
			policyServer(t, "127.0.0.27", w.ca.Issue(t, "mta-sts.local.example"), enforceFor("mx.local.example"))

			code, out := w.check("local.example")
			if code != tc.exit {
				t.Errorf("exit %d, want %d:\n%s", code, tc.exit, out)
			}
			golden(t, tc.file, out)

			r := w.deliverOnce("user@local.example")
			if r.State != tc.state || (tc.enhanced != "" && (r.LastCode != tc.code || r.LastEnhancedCode != tc.enhanced)) {
				t.Fatalf("delivery: %+v, want %s %d %s as check said", r, tc.state, tc.code, tc.enhanced)
			}
			if tc.state == "delivered" {
				if m := k.wait(t, 10*time.Second); m.TLS != !tc.plaintext {
					t.Errorf("delivered with TLS=%v, check said plaintext=%v", m.TLS, tc.plaintext)
				}
			} else if k.count() != 0 {
				t.Error("delivered although check said it would defer")
			}
		})
	}
}

func TestCheckShowsTheImplicitMX(t *testing.T) {
	w := newCheckWorld(t, "", "implicit.example. 60 IN A 127.0.0.28")
	startSink(t, "127.0.0.28", nil)
	code, out := w.check("implicit.example")
	if code != 0 {
		t.Errorf("exit %d, want 0:\n%s", code, out)
	}
	if strings.Contains(out, "PROBLEM") {
		t.Errorf("an MTA-STS problem reported for a domain that does not publish MTA-STS:\n%s", out)
	}
	golden(t, "implicit.txt", out)

	code, out = w.check("-no-connect", "implicit.example")
	if code != 0 || !strings.Contains(out, "would try (not connected") {
		t.Errorf("-no-connect: exit %d:\n%s", code, out)
	}
}

func TestCheckNullMXAndDNSFailure(t *testing.T) {
	w := newCheckWorld(t, "",
		"nomail.example. 60 IN MX 0 .",
		"broken.example. 60 IN MX 10 mx.broken.example.")
	w.dns.SetFault("broken.example.", 0, dnstest.FaultServfail)

	code, out := w.check("nomail.example")
	if code != 1 || !strings.Contains(out, "550 5.1.10") {
		t.Errorf("null MX: exit %d, want 1 with 550 5.1.10:\n%s", code, out)
	}
	golden(t, "null-mx.txt", out)

	code, out = w.check("broken.example")
	if code != 2 || !strings.Contains(out, "451 4.4.3") {
		t.Errorf("DNS failure: exit %d, want 2 with 451 4.4.3:\n%s", code, out)
	}
	golden(t, "dns-failure.txt", out)

	if code, _, errOut := stsrelayEnv(t, w.env, "", "check", "-config", w.config); code != 2 || !strings.Contains(errOut, "want exactly one domain") {
		t.Errorf("no domain: exit %d, stderr %q", code, errOut)
	}
}

func TestCheckAdvisesTheDomainOwner(t *testing.T) {
	w := newCheckWorld(t, "", stsZone("soon.example", "127.0.0.29", "127.0.0.30")...)
	cert := w.ca.IssueWith(t, testpki.Options{ValidFor: 3 * 24 * time.Hour}, "mx.soon.example")
	startSink(t, "127.0.0.29", &cert)
	policyServer(t, "127.0.0.30", w.ca.Issue(t, "mta-sts.soon.example"),
		"version: STSv1\nmode: enforce\nmx: mx.soon.example\nmx: *.old.example\nmax_age: 3600\n")
	code, out := w.check("soon.example")
	if code != 0 {
		t.Errorf("exit %d, want 0: advice is no failure:\n%s", code, out)
	}
	for _, want := range []string{
		"max_age is 1h0m0s",
		`mx pattern "*.old.example" matches no MX host`,
		"The certificate of mx.soon.example expires",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("advice lacks %q:\n%s", want, out)
		}
	}
}

// A policy host that accepts connections and never answers: check waits
// for the whole fetch, as it makes no later attempt, and says what
// delivery does once the fetch failed (RFC 8461 §5.1), never a deferral.
func TestCheckPolicyHostThatNeverAnswers(t *testing.T) {
	w := newCheckWorld(t, "[sts]\nfetch_timeout = \"1s\"\n", stsZone("stalled.example", "127.0.0.32", "127.0.0.33")...)
	startSink(t, "127.0.0.32", nil)
	ln, err := net.Listen("tcp", "127.0.0.33:443")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		var conns []net.Conn // held open, silent
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
	code, out := w.check("-no-connect", "stalled.example")
	if code == 2 || strings.Contains(out, "4.4.3") || !strings.Contains(out, "[sts-policy-fetch-error]") ||
		!strings.Contains(out, "Senders without a cached policy deliver without MTA-STS") {
		t.Errorf("exit %d; want the fetch failure and delivery without MTA-STS, not a deferral:\n%s", code, out)
	}
}

// A route decides the next hop before any MX lookup; check shows it, and
// never the credentials.
func TestCheckShowsTheRoute(t *testing.T) {
	w := newCheckWorld(t, "[[delivery.route]]\ndomains = [\".routed.example\"]\nnexthop = \"[127.0.0.31]:25\"\ntls = \"may\"\n")
	startSink(t, "127.0.0.31", nil)
	code, out := w.check("mail.routed.example")
	if code != 0 {
		t.Errorf("exit %d, want 0:\n%s", code, out)
	}
	golden(t, "route.txt", out)
}

// DANE in check: the DNSSEC status of each answer, the TLSA records with
// their usability, the base domain, and the live certificate held against
// the records, with what to publish when it does not match; the relay on
// the same configuration then does what check said.
func TestCheckShowsDANE(t *testing.T) {
	records := []string{
		"dane.example. 60 IN MX 10 mx.dane.example.",
		"mx.dane.example. 60 IN A 127.0.0.42",
		"mismatch.example. 60 IN MX 10 mx.mismatch.example.",
		"mx.mismatch.example. 60 IN A 127.0.0.42",
		"_25._tcp.mx.mismatch.example. 60 IN TLSA 3 1 1 " + strings.Repeat("00", 32),
		"_25._tcp.mx.mismatch.example. 60 IN TLSA 1 1 1 " + strings.Repeat("00", 32),
	}
	w := newCheckWorld(t, "", records...)
	cert := w.ca.IssueWith(t, testpki.Options{SelfSigned: true}, "mx.dane.example", "mx.mismatch.example")
	w.dns.Add(t, "_25._tcp.mx.dane.example. 60 IN TLSA "+testpki.TLSA(cert.Leaf, 3, 1, 1))
	w.dns.Secure("dane.example", "mx.dane.example", "_25._tcp.mx.dane.example",
		"mismatch.example", "mx.mismatch.example", "_25._tcp.mx.mismatch.example")
	k := startSink(t, "127.0.0.42", &cert)

	code, out := w.check("dane.example")
	if code != 0 {
		t.Errorf("exit %d, want 0:\n%s", code, out)
	}
	for _, want := range []string{
		"requires: TLS authenticated by TLSA records (DANE, TLSA base domain mx.dane.example)",
		"DNSSEC: MX dane.example (secure); A/AAAA mx.dane.example (secure); TLSA _25._tcp.mx.dane.example (secure, 1 record)",
		"TLSA base domain: mx.dane.example (tried in order: mx.dane.example)",
		"usable; matches the server's certificate",
		"live certificate: authenticated by the TLSA records",
		"verdict: would deliver (DANE-authenticated TLS, DANE)",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("check lacks %q:\n%s", want, out)
		}
	}
	golden(t, "dane.txt", out)

	code, out = w.check("mismatch.example")
	if code != 1 {
		t.Errorf("exit %d, want 1:\n%s", code, out)
	}
	for _, want := range []string{
		"not usable: usage PKIX-EE(1) is not used for SMTP (RFC 7672 §3.1.3)",
		"live certificate: FAILS the TLSA records: TLSA records did not match the certificate",
		"verdict: would defer: 451 4.7.5 mx.mismatch.example[127.0.0.42]: TLSA records did not match the certificate (DANE)",
		"mx.mismatch.example: the TLSA records at _25._tcp.mx.mismatch.example. match none of the certificates the server sends",
		"publish _25._tcp.mx.mismatch.example. IN TLSA " + testpki.TLSA(cert.Leaf, 3, 1, 1),
	} {
		if !strings.Contains(out, want) {
			t.Errorf("check lacks %q:\n%s", want, out)
		}
	}
	golden(t, "dane-mismatch.txt", out)

	code, out = w.check("-json", "mismatch.example")
	var v checkJSON
	if err := json.Unmarshal([]byte(out), &v); err != nil || code != 1 {
		t.Fatalf("-json: exit %d, %v\n%s", code, err, out)
	}
	d := v.Hosts[0].DANE
	if d == nil || d.Base != "mx.mismatch.example" || len(d.Records) != 2 || d.Records[0].Usable != true ||
		d.Records[0].Match == nil || *d.Records[0].Match != -1 || d.Live == nil || d.Live.Authenticated ||
		d.Live.Result != "certificate-not-trusted" || v.Hosts[0].Requirement.Policy != "tlsa" {
		t.Errorf("-json dane = %+v", d)
	}

	if r := w.deliverOnce("user@mismatch.example"); r.State != "deferred" || r.LastEnhancedCode != "4.7.5" {
		t.Fatalf("delivery: %+v, want deferred 4.7.5 as check said", r)
	}
	if r := w.deliverOnce("user@dane.example"); r.State != "delivered" {
		t.Fatalf("delivery: %+v, want delivered as check said", r)
	}
	if m := k.wait(t, 10*time.Second); !m.TLS {
		t.Error("delivered without TLS")
	}
}

// Without -sender, check plans for ordinary mail, as delivery routes it
// for any sender; -sender '<>' plans for bounces, as routes and
// `queue -sender` spell the null sender.
func TestCheckPlansForAnySenderUnlessTheNullSenderIsAsked(t *testing.T) {
	w := newCheckWorld(t, `[[delivery.route]]
domains = ["*"]
senders = ["<>"]
nexthop = "[127.0.0.43]:25"
tls = "may"
`, "plain.example. 60 IN MX 10 mx.plain.example.", "mx.plain.example. 60 IN A 127.0.0.44")

	for _, tc := range []struct {
		name   string
		args   []string
		bounce bool
	}{
		{"no sender", nil, false},
		{"an address", []string{"-sender", "app@sender.test"}, false},
		{"the null sender", []string{"-sender", "<>"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out := w.check(append(tc.args, "-no-connect", "plain.example")...)
			if code != 0 {
				t.Errorf("exit %d, want 0:\n%s", code, out)
			}
			routed := strings.Contains(out, "delivery.route[0]: next hop [127.0.0.43]")
			mx := strings.Contains(out, "MX 10 mx.plain.example")
			if routed != tc.bounce || mx == tc.bounce {
				t.Errorf("bounce route shown %v, MX shown %v; want the bounce route only for <>:\n%s", routed, mx, out)
			}
		})
	}
}

// What a remote controls (certificate names, the greeting, reply text)
// reaches an operator's terminal escaped: an MX host cannot retitle,
// clear or recolour it, nor forge a line of the report.
func TestCheckEscapesControlCharactersFromTheNetwork(t *testing.T) {
	w := newCheckWorld(t, "",
		"esc.example. 60 IN MX 10 mx1.esc.example.",
		"esc.example. 60 IN MX 20 mx2.esc.example.",
		"mx1.esc.example. 60 IN A 127.0.0.45",
		"mx2.esc.example. 60 IN A 127.0.0.46")
	cert := w.ca.IssueWith(t, testpki.Options{SelfSigned: true, CommonName: "issuer\x1b[31m\u009b2J"},
		"mx1.esc.example", "\x1b]0;owned\x07\x1b[2J", "x\n      verdict: forged")
	startSink(t, "127.0.0.45", &cert, func(s *smtp.Server) { s.Domain = "sink\u009b2J.test" })
	ln, err := net.Listen("tcp", "127.0.0.46:25")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.WriteString(c, "554 5.7.1 go away\u009b2J\x1b]0;x\x07\r\n")
			c.Close()
		}
	}()

	for _, args := range [][]string{{"esc.example"}, {"-json", "esc.example"}} {
		_, out := w.check(args...)
		if i := strings.IndexFunc(out, func(r rune) bool {
			return r != '\n' && (r < 0x20 || r == 0x7f || r >= 0x80 && r < 0xa0)
		}); i >= 0 {
			t.Errorf("check %v printed a control character at byte %d:\n%q", args, i, out)
		}
		if strings.Contains(out, "\n      verdict: forged") {
			t.Errorf("check %v printed a line break from a certificate:\n%s", args, out)
		}
	}
	_, out := w.check("esc.example")
	// Certificate fields are shown escaped; the greeting and reply texts
	// come through delivery, which drops control characters.
	for _, want := range []string{`\x1b]0;owned\a\x1b[2J`, `issuer\x1b[31m\u009b2J`, `sink2J.test`, `go away2J]0;x`} {
		if !strings.Contains(out, want) {
			t.Errorf("check does not show %s escaped:\n%s", want, out)
		}
	}
}

// A local level is credited to the entry or route that sets it, with its
// value as the configuration writes it: "dane-only" is not "dane", which
// there means something weaker.
func TestCheckNamesTheLocalSettingThatApplies(t *testing.T) {
	w := newCheckWorld(t, `[[delivery.policy]]
domain = "other.example"
tls = "verify"

[[delivery.policy]]
domain = "strict.example"
tls = "dane-only"

[[delivery.route]]
domains = [".routed.example"]
nexthop = "[127.0.0.47]:25"
tls = "encrypt"

[[delivery.route]]
domains = ["daneroute.example"]
nexthop = "[mx.strict.example]:25"
tls = "dane-only"
`, "strict.example. 60 IN MX 10 mx.strict.example.", "mx.strict.example. 60 IN A 127.0.0.48")

	for domain, want := range map[string][]string{
		"strict.example":      {`(delivery.policy[1] tls = "dane-only")`},
		"mail.routed.example": {`(delivery.route[0] tls = "encrypt")`, ", tls encrypt\n"},
		"daneroute.example":   {`(delivery.route[1] tls = "dane-only")`, ", tls dane-only\n"},
	} {
		_, out := w.check("-no-connect", domain)
		for _, s := range want {
			if !strings.Contains(out, s) {
				t.Errorf("check %s lacks %q:\n%s", domain, s, out)
			}
		}
		if strings.Contains(out, "[[delivery.policy]]") {
			t.Errorf("check %s credits a [[delivery.policy]] entry in general:\n%s", domain, out)
		}
	}
}

// A host's verdict counts only the addresses one delivery attempt would
// dial (delivery.HostReport.Reach), though check dials them all.
func TestHostVerdictCountsTheAttemptsConnections(t *testing.T) {
	refused := func(n int) []queue.Status {
		var fs []queue.Status
		for i := range n {
			fs = append(fs, queue.Status{Code: 451, Enhanced: "4.4.1", Text: fmt.Sprintf("mx1.example[192.0.2.%d]: connection refused", i+1)})
		}
		return fs
	}
	session := &delivery.SessionReport{Protection: "plaintext, STARTTLS not available"}
	for _, tc := range []struct {
		name string
		h    delivery.HostReport
		want string
	}{
		{"session within reach", delivery.HostReport{Probed: true, Reach: 9, Failures: refused(8), Session: session},
			"would deliver (plaintext, STARTTLS not available)"},
		{"session beyond reach", delivery.HostReport{Probed: true, Reach: 9, Failures: refused(9), Session: session},
			"would defer: a delivery attempt dials at most 9 of this host's addresses, and the first 9 failed (the session shown is at address 10)"},
		{"failures beyond reach", delivery.HostReport{Probed: true, Reach: 2, Failures: refused(3)},
			"would defer: 451 4.4.1 mx1.example[192.0.2.2]: connection refused"},
		{"no connection left", delivery.HostReport{Probed: true, Reach: 0, Session: session},
			fmt.Sprintf("would not try this host: the hosts before it use every connection of a delivery attempt (at most %d)", delivery.MaxConnectionsPerAttempt)},
	} {
		if got := hostVerdict(tc.h, true); got != tc.want {
			t.Errorf("%s: verdict %q, want %q", tc.name, got, tc.want)
		}
	}
}
