package main

// End-to-end TLS reporting through the binary. ROOT ONLY, like the other
// e2e tests: the MX sinks listen on port 25 of 127.0.0.x.

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
	"io"
	"mime"
	"mime/multipart"
	"net"
	"net/http"
	"net/http/httptest"
	"net/mail"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-msgauth/dkim"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/internal/testpki"
	"github.com/stsrelay/stsrelay/resolve"
)

func TestEndToEndTLSRPTSendForceDeliversASignedReport(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	keyFile := filepath.Join(dir, "dkim.pem")
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600)
	der, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
	pub := "v=DKIM1; k=rsa; p=" + base64.StdEncoding.EncodeToString(der)

	dns := dnstest.New(t,
		"example.net. 60 IN MX 10 mx.example.net.",
		"mx.example.net. 60 IN A 127.0.0.17",
		`_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@reports.example.org"`,
		"reports.example.org. 60 IN MX 10 mx.reports.example.org.",
		"mx.reports.example.org. 60 IN A 127.0.0.18",
		`s1._domainkey.example.com. 60 IN TXT "`+pub[:200]+`" "`+pub[200:]+`"`,
	)
	ca := testpki.NewCA(t)
	mxCert := ca.Issue(t, "mx.example.net")
	mx := startSink(t, "127.0.0.17", &mxCert)
	reports := startSink(t, "127.0.0.18", nil)

	config := writeConfig(t, dir, configParts{resolver: dns.Addr, tail: `
[delivery]
retry_schedule = ["1h"]
connect_timeout = "5s"
ip_version = "4"
[tlsrpt]
enabled = true
organization_name = "Example Relay Operator"
contact_info = "tlsrpt@example.com"
report_sender = "tlsrpt-noreply@example.com"
[[dkim]]
domain = "example.com"
selector = "s1"
key_file = "dkim.pem"
`})
	env := []string{"SSL_CERT_FILE=" + ca.WriteCAFile(t, dir), "SSL_CERT_DIR="}
	d := startDaemon(t, config, env...)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("relay log:\n%s", d.output())
		}
	})
	submit(t, d.submissionAddr(), "app@example.com", "user@example.net", "Subject: x\r\n\r\nx\r\n")
	if !mx.wait(t, 30*time.Second).TLS {
		t.Fatal("the test message did not go over TLS")
	}

	tlsrpt := func(args ...string) (int, string, string) {
		return stsrelayEnv(t, env, "", append([]string{"tlsrpt", args[0], "-config", config}, args[1:]...)...)
	}
	today := time.Now().UTC().Format("2006-01-02")
	code, out, errOut := tlsrpt("list", "-json")
	if code != 0 || !strings.Contains(out, `"domain": "example.net"`) || !strings.Contains(out, `"successful": 1`) {
		t.Fatalf("tlsrpt list -json: %d %s %s", code, out, errOut)
	}
	// The running day needs -force.
	if code, _, errOut := tlsrpt("send", "-day", today); code == 0 || !strings.Contains(errOut, "-force") {
		t.Errorf("send of the running day without -force: %d %q", code, errOut)
	} else {
		assertOneLine(t, errOut)
	}
	code, out, errOut = tlsrpt("send", "-day", today, "-force")
	if code != 0 || !strings.Contains(out, "example.net: sent to mailto:tlsrpt@reports.example.org") {
		t.Fatalf("tlsrpt send -force: %d\n%s%s", code, out, errOut)
	}

	msg := reports.wait(t, 30*time.Second)
	if msg.From != "tlsrpt-noreply@example.com" || len(msg.To) != 1 || msg.To[0] != "tlsrpt@reports.example.org" {
		t.Fatalf("report envelope %q → %v", msg.From, msg.To)
	}
	res, err := resolve.New(resolve.Config{Servers: []string{dns.Addr}})
	if err != nil {
		t.Fatal(err)
	}
	vs, err := dkim.VerifyWithOptions(strings.NewReader(msg.Data), &dkim.VerifyOptions{
		LookupTXT: func(name string) ([]string, error) {
			txts, _, err := res.TXT(context.Background(), name)
			return txts, err
		},
	})
	if err != nil || len(vs) != 1 || vs[0].Err != nil || vs[0].Domain != "example.com" {
		t.Fatalf("DKIM: %v %+v", err, vs)
	}
	m, err := mail.ReadMessage(strings.NewReader(msg.Data))
	if err != nil {
		t.Fatal(err)
	}
	if m.Header.Get("TLS-Report-Domain") != "example.net" || m.Header.Get("TLS-Report-Submitter") != "example.com" ||
		!strings.HasPrefix(m.Header.Get("Subject"), "Report Domain: example.net Submitter: example.com Report-ID: <") {
		t.Errorf("report headers: %v", m.Header)
	}
	_, params, err := mime.ParseMediaType(m.Header.Get("Content-Type"))
	if err != nil || params["report-type"] != "tlsrpt" {
		t.Fatalf("Content-Type %q", m.Header.Get("Content-Type"))
	}
	mr := multipart.NewReader(m.Body, params["boundary"])
	mr.NextPart()
	att, err := mr.NextPart()
	if err != nil {
		t.Fatal(err)
	}
	b64, _ := io.ReadAll(att)
	gz, _ := base64.StdEncoding.DecodeString(strings.ReplaceAll(string(b64), "\r\n", ""))
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatal(err)
	}
	var rep struct {
		Policies []struct {
			Policy struct {
				Type   string `json:"policy-type"`
				Domain string `json:"policy-domain"`
			} `json:"policy"`
			Summary struct {
				OK int `json:"total-successful-session-count"`
			} `json:"summary"`
		} `json:"policies"`
	}
	if err := json.NewDecoder(zr).Decode(&rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Policies) != 1 || rep.Policies[0].Policy.Type != "no-policy-found" || rep.Policies[0].Policy.Domain != "example.net" || rep.Policies[0].Summary.OK != 1 {
		t.Errorf("report: %+v", rep)
	}

	// The session that carried the report is not counted (RFC 8460 §3).
	code, out, _ = tlsrpt("list", "-json")
	if code != 0 || strings.Contains(out, `"domain": "reports.example.org"`) {
		t.Errorf("the report's own session was counted:\n%s", out)
	}
	if code, out, _ := tlsrpt("list"); code != 0 || !strings.Contains(out, "example.net") {
		t.Errorf("tlsrpt list: %d\n%s", code, out)
	}
	d.stop(syscall.SIGTERM)
}

func TestTLSRPTCommandsSayWhenReportingIsOff(t *testing.T) {
	dir := t.TempDir()
	config := writeConfig(t, dir, configParts{})
	d := startDaemon(t, config)
	d.submissionAddr()
	code, _, errOut := stsrelay(t, "", "tlsrpt", "list", "-config", config)
	if code == 0 || !strings.Contains(errOut, "tlsrpt.enabled = false") {
		t.Errorf("tlsrpt list with reporting off: %d %q", code, errOut)
	}
	assertOneLine(t, errOut)
	d.stop(syscall.SIGTERM)
	code, _, errOut = stsrelay(t, "", "tlsrpt", "send", "-config", config, "-day", "2026-13-01")
	if code == 0 || !strings.Contains(errOut, "YYYY-MM-DD") {
		t.Errorf("bad -day: %d %q", code, errOut)
	}
}

// TestEndToEndTLSRPTSendForcePostsToHTTPS proves the https report path
// through the binary: the rua found in DNS, the POST over TLS to a server
// the relay trusts through SSL_CERT_FILE, the gzip JSON naming the domain.
func TestEndToEndTLSRPTSendForcePostsToHTTPS(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	ca := testpki.NewCA(t)

	type post struct {
		contentType string
		body        []byte
	}
	posts := make(chan post, 4)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if r.Method != http.MethodPost || r.URL.Path != "/tlsrpt" {
			http.Error(w, "wrong method or path", http.StatusBadRequest)
			return
		}
		posts <- post{r.Header.Get("Content-Type"), b}
		w.WriteHeader(http.StatusCreated)
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{ca.Issue(t, "reports.example.org")}}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	rua := "https://reports.example.org:" + port + "/tlsrpt"

	dns := dnstest.New(t,
		"example.net. 60 IN MX 10 mx.example.net.",
		"mx.example.net. 60 IN A 127.0.0.19",
		`_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=`+rua+`"`,
		"reports.example.org. 60 IN A 127.0.0.1",
	)
	mxCert := ca.Issue(t, "mx.example.net")
	mx := startSink(t, "127.0.0.19", &mxCert)
	config := writeConfig(t, dir, configParts{resolver: dns.Addr, tail: `
[delivery]
retry_schedule = ["1h"]
connect_timeout = "5s"
ip_version = "4"
[tlsrpt]
enabled = true
organization_name = "Example Relay Operator"
contact_info = "tlsrpt@example.com"
`})
	env := []string{"SSL_CERT_FILE=" + ca.WriteCAFile(t, dir), "SSL_CERT_DIR="}
	d := startDaemon(t, config, env...)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("relay log:\n%s", d.output())
		}
	})
	submit(t, d.submissionAddr(), "app@example.com", "user@example.net", "Subject: x\r\n\r\nx\r\n")
	mx.wait(t, 30*time.Second)

	today := time.Now().UTC().Format("2006-01-02")
	code, out, errOut := stsrelayEnv(t, env, "", "tlsrpt", "send", "-config", config, "-day", today, "-force")
	if code != 0 || !strings.Contains(out, "example.net: sent to "+rua) {
		t.Fatalf("tlsrpt send -force: %d\n%s%s", code, out, errOut)
	}
	var p post
	select {
	case p = <-posts:
	case <-time.After(30 * time.Second):
		t.Fatal("no report was posted")
	}
	if p.contentType != "application/tlsrpt+gzip" {
		t.Errorf("Content-Type %q", p.contentType)
	}
	zr, err := gzip.NewReader(bytes.NewReader(p.body))
	if err != nil {
		t.Fatalf("the report is not gzip: %v", err)
	}
	var rep struct {
		Org      string `json:"organization-name"`
		Policies []struct {
			Policy struct {
				Domain string `json:"policy-domain"`
			} `json:"policy"`
			Summary struct {
				OK int `json:"total-successful-session-count"`
			} `json:"summary"`
		} `json:"policies"`
	}
	if err := json.NewDecoder(zr).Decode(&rep); err != nil {
		t.Fatal(err)
	}
	if rep.Org != "Example Relay Operator" || len(rep.Policies) != 1 || rep.Policies[0].Policy.Domain != "example.net" || rep.Policies[0].Summary.OK != 1 {
		t.Errorf("report: %+v", rep)
	}
	d.stop(syscall.SIGTERM)
}
