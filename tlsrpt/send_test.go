package tlsrpt

import (
	"bytes"
	"context"
	"encoding/base64"
	"io"
	"mime"
	"mime/multipart"
	"net"
	"net/http"
	"net/mail"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-msgauth/dkim"
	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/policy"
)

func TestHTTPSEndpointsThatFailAreRetriedWithBackoffThenGivenUp(t *testing.T) {
	e := newEnv(t, nil)
	good := e.endpoint("good.example.org", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })
	failing := e.endpoint("5xx.example.org", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "backend down\nstack trace line 2", http.StatusServiceUnavailable)
	})
	redirect := e.endpoint("redirect.example.org", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, good.url, http.StatusTemporaryRedirect)
	})
	slow := e.endpoint("slow.example.org", func(w http.ResponseWriter, r *http.Request) {
		select { // longer than the client's timeout
		case <-r.Context().Done():
		case <-time.After(10 * time.Second):
		}
		// Never answer. Returning would send an implicit 200 the moment the
		// client hangs up, and on a loaded machine that 200 can reach the
		// client between its close_notify and its close, which the
		// transport rightly takes as the answer: the report "sent".
		panic(http.ErrAbortHandler)
	})
	for dom, ep := range map[string]*endpoint{"a.example": failing, "b.example": redirect, "c.example": slow} {
		e.dns.Add(t, `_smtp._tls.`+dom+`. 60 IN TXT "v=TLSRPTv1; rua=`+ep.url+`"`)
		e.rep.Record(result(dom, nil, 1, policy.ResultSuccess, "mx."+dom, ""))
	}
	res := e.send("2026-03-01", false)
	for dom, want := range map[string]string{"a.example": "503", "b.example": "redirect", "c.example": "deadline exceeded"} {
		r := resultFor(t, res, dom)
		if r.State != statePending || !strings.Contains(r.Error, want) || strings.Contains(r.Error, "\n") {
			t.Errorf("%s: %+v, want pending with one line about %q", dom, r, want)
		}
		if !r.Next.After(afterDay.Add(4 * time.Minute)) {
			t.Errorf("%s: next attempt %v, want backoff of minutes", dom, r.Next)
		}
	}
	if good.requests() != 0 {
		t.Errorf("the redirect was followed: its target got %d requests", good.requests())
	}

	// No retry storm: the loop running again at once sends nothing.
	ctx := context.Background()
	e.rep.runOnce(ctx)
	e.rep.runOnce(ctx)
	for _, ep := range []*endpoint{failing, redirect, slow} {
		if n := ep.requests(); n != 1 {
			t.Errorf("%s: %d requests right after the first, want 1", ep.url, n)
		}
	}
	// After the backoff, one more each.
	e.clock.Advance(10 * time.Minute)
	e.rep.runOnce(ctx)
	for _, ep := range []*endpoint{failing, redirect, slow} {
		if n := ep.requests(); n != 2 {
			t.Errorf("%s: %d requests after the backoff, want 2", ep.url, n)
		}
	}
	// Same report, same report-id, on every retry.
	if a, b := gunzipJSON(t, failing.body(0))["report-id"], gunzipJSON(t, failing.body(1))["report-id"]; a != b {
		t.Errorf("report-id changed across retries: %v, %v", a, b)
	}
	// §5.5: given up 24 hours after the first attempt.
	failedBefore := testutil.ToFloat64(metricReports.WithLabelValues(stateFailed))
	e.clock.Advance(25 * time.Hour)
	e.rep.runOnce(ctx)
	list, err := e.rep.List()
	if err != nil {
		t.Fatal(err)
	}
	for _, di := range list {
		if len(di.Reports) != 1 || di.Reports[0].State != stateFailed {
			t.Errorf("%s: reports %+v, want one, failed", di.Domain, di.Reports)
		}
	}
	if d := testutil.ToFloat64(metricReports.WithLabelValues(stateFailed)) - failedBefore; d != 3 {
		t.Errorf("failed reports counted: %v, want 3", d)
	}
	e.clock.Advance(24 * time.Hour)
	before := failing.requests()
	e.rep.runOnce(ctx)
	if failing.requests() != before {
		t.Error("a failed report was tried again")
	}
	if !strings.Contains(e.logs.String(), "report given up after 24 hours") {
		t.Error("giving up was not logged")
	}
}

func TestReportCountsAsDeliveredOnceOneRUAAcceptsIt(t *testing.T) {
	e := newEnv(t, nil)
	bad := e.endpoint("bad.example.org", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusInternalServerError) })
	good := e.endpoint("good.example.org", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })
	e.dns.Add(t, `_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=`+bad.url+`,ftp://x.example/,`+good.url+`"`)
	e.rep.Record(result("example.net", nil, 1, policy.ResultSuccess, "mx.example.net", ""))
	r := resultFor(t, e.send("2026-03-01", false), "example.net")
	if r.State != stateSent || len(r.SentTo) != 1 || r.SentTo[0] != good.url {
		t.Fatalf("%+v, want sent to %s", r, good.url)
	}
	e.clock.Advance(time.Hour)
	e.rep.runOnce(context.Background())
	if bad.requests() != 1 || good.requests() != 1 {
		t.Errorf("requests: bad %d, good %d; want one each, no retry after delivery", bad.requests(), good.requests())
	}
}

// TestHTTPSEndpointAnswering202Or204HasTheReport: RFC 8460 §5.4 asks for
// a successful response, and every 2xx is one; a collector that queues
// the upload answers 202 and must not get it again for a day.
func TestHTTPSEndpointAnswering202Or204HasTheReport(t *testing.T) {
	e := newEnv(t, nil)
	eps := map[string]*endpoint{
		"a.example": e.endpoint("accepted.example.org", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusAccepted) }),
		"b.example": e.endpoint("nocontent.example.org", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) }),
	}
	for dom, ep := range eps {
		e.dns.Add(t, `_smtp._tls.`+dom+`. 60 IN TXT "v=TLSRPTv1; rua=`+ep.url+`"`)
		e.rep.Record(result(dom, nil, 1, policy.ResultSuccess, "mx."+dom, ""))
	}
	res := e.send("2026-03-01", false)
	e.clock.Advance(25 * time.Hour)
	e.rep.runOnce(context.Background())
	for dom, ep := range eps {
		if r := resultFor(t, res, dom); r.State != stateSent || len(r.SentTo) != 1 || r.SentTo[0] != ep.url {
			t.Errorf("%s: %+v, want sent to %s", dom, r, ep.url)
		}
		if n := ep.requests(); n != 1 {
			t.Errorf("%s: %d requests, want 1", dom, n)
		}
	}
	if strings.Contains(e.logs.String(), "given up") {
		t.Errorf("a delivered report was given up:\n%s", e.logs.String())
	}
}

// TestEndpointWhoseIPv6AddressHangsGetsTheReportOverIPv4: the addresses
// are tried IPv6 first, each with a share of HTTPTimeout, so one that
// never answers leaves time for the next.
func TestEndpointWhoseIPv6AddressHangsGetsTheReportOverIPv4(t *testing.T) {
	const hangingIP = "fd00::dead"
	e := newEnv(t, func(o *Options) {
		o.HTTPTimeout = 2 * time.Second
		o.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
			if host, _, _ := net.SplitHostPort(addr); host == hangingIP {
				<-ctx.Done()
				return nil, ctx.Err()
			}
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		}
	})
	ep := e.endpoint("reports.example.org", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })
	e.dns.Add(t, "reports.example.org. 60 IN AAAA "+hangingIP)
	e.dns.Add(t, `_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=`+ep.url+`"`)
	e.rep.Record(result("example.net", nil, 1, policy.ResultSuccess, "mx.example.net", ""))
	r := resultFor(t, e.send("2026-03-01", false), "example.net")
	if r.State != stateSent || ep.requests() != 1 {
		t.Fatalf("%+v after %d requests, want the report sent over IPv4", r, ep.requests())
	}
}

func TestMailtoReportIsAnRFC8460MessageSignedAndQueuedAsTLSReport(t *testing.T) {
	e := newEnv(t, nil)
	e.dns.Add(t, `_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@reports.example.net"`)
	recordMixedDay(e.rep)
	r := resultFor(t, e.send("2026-03-01", false), "example.net")
	if r.State != stateSent || r.SentTo[0] != "mailto:tlsrpt@reports.example.net" {
		t.Fatalf("%+v", r)
	}
	d := e.sink.wait(t)

	// The envelope: from the report sender, delivered despite TLS policy
	// failures, and marked so its sessions are not reported (§3).
	env := d.job.Envelope
	if env.From != "tlsrpt-noreply@example.com" || len(d.job.Recipients) != 1 || d.job.Recipients[0].Addr != "tlsrpt@reports.example.net" {
		t.Errorf("envelope %q → %+v", env.From, d.job.Recipients)
	}
	if !env.NoTLSPolicy || !env.TLSReport {
		t.Errorf("envelope NoTLSPolicy=%v TLSReport=%v, want both", env.NoTLSPolicy, env.TLSReport)
	}

	// The DKIM signature verifies against the key published in DNS, and
	// has no l= (§3).
	vs, err := dkim.VerifyWithOptions(bytes.NewReader(d.body), &dkim.VerifyOptions{
		LookupTXT: func(name string) ([]string, error) {
			txts, _, err := e.res.TXT(context.Background(), name)
			return txts, err
		},
	})
	if err != nil || len(vs) != 1 || vs[0].Err != nil || vs[0].Domain != "example.com" {
		t.Fatalf("DKIM: %v %+v", err, vs)
	}
	for _, h := range []string{"tls-report-domain", "tls-report-submitter", "subject", "from"} {
		if !containsFold(vs[0].HeaderKeys, h) {
			t.Errorf("DKIM signature does not cover %s: %v", h, vs[0].HeaderKeys)
		}
	}

	msg, err := mail.ReadMessage(bytes.NewReader(d.body))
	if err != nil {
		t.Fatal(err)
	}
	if sig := msg.Header.Get("DKIM-Signature"); regexp.MustCompile(`(^|[;\s])l=`).MatchString(sig) {
		t.Errorf("DKIM-Signature has l=: %s", sig)
	}
	h := msg.Header
	wantSubject := "Report Domain: example.net Submitter: example.com Report-ID: <" + r.ReportID + ">"
	for k, want := range map[string]string{
		"Subject": wantSubject, "TLS-Report-Domain": "example.net", "TLS-Report-Submitter": "example.com",
		"From": "<tlsrpt-noreply@example.com>", "To": "<tlsrpt@reports.example.net>", "MIME-Version": "1.0",
		"Message-ID": "<" + r.ReportID + ">", "Auto-Submitted": "auto-generated",
	} {
		if got := h.Get(k); got != want {
			t.Errorf("%s: %q, want %q", k, got, want)
		}
	}
	if _, err := h.Date(); err != nil {
		t.Errorf("Date: %v", err)
	}
	mt, params, err := mime.ParseMediaType(h.Get("Content-Type"))
	if err != nil || mt != "multipart/report" || params["report-type"] != "tlsrpt" {
		t.Fatalf("Content-Type %q, want multipart/report; report-type=tlsrpt", h.Get("Content-Type"))
	}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	human, err := mr.NextPart()
	if err != nil {
		t.Fatal(err)
	}
	if ct := human.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Errorf("first part %q, want the human-readable text/plain", ct)
	}
	text, _ := io.ReadAll(human)
	if !strings.Contains(string(text), "example.net") || !strings.Contains(string(text), "12 successful and 7 failed") {
		t.Errorf("human-readable part:\n%s", text)
	}
	att, err := mr.NextPart()
	if err != nil {
		t.Fatal(err)
	}
	if ct := att.Header.Get("Content-Type"); ct != "application/tlsrpt+gzip" {
		t.Errorf("attachment type %q", ct)
	}
	_, dp, err := mime.ParseMediaType(att.Header.Get("Content-Disposition"))
	if err != nil {
		t.Fatal(err)
	}
	// §5.1: submitter!policy-domain!begin!end!unique-id.json.gz
	if !regexp.MustCompile(`^example\.com!example\.net!1772323200!1772409600![0-9a-f]+\.json\.gz$`).MatchString(dp["filename"]) {
		t.Errorf("filename %q", dp["filename"])
	}
	b64, _ := io.ReadAll(att)
	gz, err := base64.StdEncoding.DecodeString(strings.ReplaceAll(string(b64), "\r\n", ""))
	if err != nil {
		t.Fatal(err)
	}
	rep := gunzipJSON(t, gz)
	if rep["report-id"] != r.ReportID || len(rep["policies"].([]any)) != 4 {
		t.Errorf("attached report: id %v, %d policies", rep["report-id"], len(rep["policies"].([]any)))
	}
	if _, err := mr.NextPart(); err != io.EOF {
		t.Errorf("more than two parts: %v", err)
	}
}

// TestMailtoReportIsSevenBitCleanWithANonASCIIOrganization: the report is
// queued without BODY=8BITMIME, so organization_name (free text) and an
// IDN contact_info domain must reach it encoded.
// A report sender with a UTF-8 local part makes the report an SMTPUTF8
// message (RFC 6531 §3.4): queued without the flag, it would go to hosts
// that cannot take it, with UTF-8 in its From: (RFC 6532).
func TestReportFromAUTF8SenderIsSMTPUTF8(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.Sender = "rapports-tls-\u00e9t\u00e9@example.com" })
	e.dns.Add(t, `_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@reports.example.net"`)
	e.rep.Record(result("example.net", nil, 1, policy.ResultSuccess, "mx.example.net", ""))
	if r := resultFor(t, e.send("2026-03-01", false), "example.net"); r.State != stateSent {
		t.Fatalf("%+v", r)
	}
	d := e.sink.wait(t)
	if !d.job.Envelope.SMTPUTF8 || !d.job.Envelope.Body8Bit {
		t.Errorf("queued with SMTPUTF8=%v Body8Bit=%v, want both", d.job.Envelope.SMTPUTF8, d.job.Envelope.Body8Bit)
	}
}

func TestMailtoReportIsSevenBitCleanWithANonASCIIOrganization(t *testing.T) {
	e := newEnv(t, func(o *Options) {
		o.OrganizationName = "Société Générale"
		o.ContactInfo = "tlsrpt@société.example"
	})
	e.dns.Add(t, `_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@reports.example.net"`)
	e.rep.Record(result("example.net", nil, 1, policy.ResultSuccess, "mx.example.net", ""))
	if r := resultFor(t, e.send("2026-03-01", false), "example.net"); r.State != stateSent {
		t.Fatalf("%+v", r)
	}
	d := e.sink.wait(t)
	if d.job.Envelope.Body8Bit || d.job.Envelope.SMTPUTF8 {
		t.Errorf("queued with Body8Bit=%v SMTPUTF8=%v, want a 7-bit message", d.job.Envelope.Body8Bit, d.job.Envelope.SMTPUTF8)
	}
	for i, c := range d.body {
		if c >= 0x80 {
			t.Fatalf("byte %#x at %d in a 7-bit message:\n%s", c, i, d.body)
		}
	}
	msg, err := mail.ReadMessage(bytes.NewReader(d.body))
	if err != nil {
		t.Fatal(err)
	}
	if s := msg.Header.Get("Subject"); !strings.Contains(s, "Submitter: xn--socit-esab.example ") {
		t.Errorf("Subject %q, want the submitter's A-label", s)
	}
	_, params, _ := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	human, err := multipart.NewReader(msg.Body, params["boundary"]).NextPart()
	if err != nil {
		t.Fatal(err)
	}
	_, cs, _ := mime.ParseMediaType(human.Header.Get("Content-Type"))
	text, _ := io.ReadAll(human) // quoted-printable, decoded by the reader
	if cs["charset"] != "utf-8" || !strings.Contains(string(text), "(Société Générale)") {
		t.Errorf("human-readable part, charset %q:\n%s", cs["charset"], text)
	}
	vs, err := dkim.VerifyWithOptions(bytes.NewReader(d.body), &dkim.VerifyOptions{
		LookupTXT: func(name string) ([]string, error) {
			txts, _, err := e.res.TXT(context.Background(), name)
			return txts, err
		},
	})
	if err != nil || len(vs) != 1 || vs[0].Err != nil {
		t.Errorf("DKIM: %v %+v", err, vs)
	}
}

func containsFold(list []string, s string) bool {
	for _, x := range list {
		if strings.EqualFold(x, s) {
			return true
		}
	}
	return false
}

// TestMailtoWithABadDomainDoesNotKeepTheReportFromTheOthers: a DMARC-style
// size suffix ("!10m") is no part of RFC 8460 §3 and leaves a domain the
// queue refuses; the report still goes to the rua's good address.
func TestMailtoWithABadDomainDoesNotKeepTheReportFromTheOthers(t *testing.T) {
	e := newEnv(t, nil)
	e.dns.Add(t, `_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@example.net,mailto:tlsrpt@reports.example.net!10m"`)
	e.rep.Record(result("example.net", nil, 1, policy.ResultSuccess, "mx.example.net", ""))
	r := resultFor(t, e.send("2026-03-01", false), "example.net")
	if r.State != stateSent || len(r.SentTo) != 1 || r.SentTo[0] != "mailto:tlsrpt@example.net" {
		t.Fatalf("%+v, want sent to mailto:tlsrpt@example.net", r)
	}
	d := e.sink.wait(t)
	if len(d.job.Recipients) != 1 || d.job.Recipients[0].Addr != "tlsrpt@example.net" {
		t.Errorf("queued for %+v, want tlsrpt@example.net alone", d.job.Recipients)
	}
	if !regexp.MustCompile(`rua not used.*reports\.example\.net!10m`).MatchString(e.logs.String()) {
		t.Errorf("the unusable rua was not logged:\n%s", e.logs.String())
	}
}

func TestMailtoWithoutADKIMKeyFailsClearlyAndQueuesNothing(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.Sender = "reports@unsigned.example" })
	e.dns.Add(t, `_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=mailto:tlsrpt@example.net"`)
	e.rep.Record(result("example.net", nil, 1, policy.ResultSuccess, "mx.example.net", ""))
	r := resultFor(t, e.send("2026-03-01", false), "example.net")
	if r.State != statePending || !strings.Contains(r.Error, "no [[dkim]] key for the domain of reports@unsigned.example") {
		t.Errorf("%+v", r)
	}
	time.Sleep(100 * time.Millisecond)
	if e.sink.count() != 0 {
		t.Error("an unsigned report was queued")
	}
}

func TestSendIsIdempotentUnlessForcedAndForcedResendKeepsTheReportID(t *testing.T) {
	e := newEnv(t, nil)
	ep := e.endpoint("r.example.org", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })
	e.dns.Add(t, `_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=`+ep.url+`"`)
	e.rep.Record(result("example.net", stsID, 1, policy.ResultSuccess, "mx1.example.net", ""))

	first := resultFor(t, e.send("2026-03-01", false), "example.net")
	again := resultFor(t, e.send("2026-03-01", false), "example.net")
	if !again.Skipped || again.State != stateSent || ep.requests() != 1 {
		t.Errorf("second send: %+v, %d requests; want skipped", again, ep.requests())
	}
	forced := resultFor(t, e.send("2026-03-01", true), "example.net")
	if forced.State != stateSent || forced.ReportID != first.ReportID || ep.requests() != 2 {
		t.Errorf("forced: %+v (first id %s), %d requests", forced, first.ReportID, ep.requests())
	}
	if string(ep.body(0)) != string(ep.body(1)) {
		t.Error("a forced resend changed the report")
	}
}

func TestRunningDayIsSentOnlyWithForceAsAPartialReport(t *testing.T) {
	e := newEnv(t, nil)
	ep := e.endpoint("r.example.org", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })
	e.dns.Add(t, `_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=`+ep.url+`"`)
	now := time.Date(2026, 3, 1, 13, 14, 15, 0, time.UTC)
	e.clock.Set(now)
	e.rep.Record(result("example.net", nil, 1, policy.ResultSuccess, "mx.example.net", ""))
	if _, err := e.rep.Send(context.Background(), "2026-03-01", false); err == nil || !strings.Contains(err.Error(), "-force") {
		t.Errorf("running day without force: %v", err)
	}
	if _, err := e.rep.Send(context.Background(), "2026-03-02", true); err == nil {
		t.Error("a day not begun was sent")
	}
	r := resultFor(t, e.send("2026-03-01", true), "example.net")
	if r.State != stateSent || ep.requests() != 1 {
		t.Fatalf("%+v", r)
	}
	dr := gunzipJSON(t, ep.body(0))["date-range"].(map[string]any)
	if dr["start-datetime"] != "2026-03-01T00:00:00Z" || dr["end-datetime"] != "2026-03-01T13:14:15Z" {
		t.Errorf("partial date-range %v, want the day's start to now", dr)
	}
	// The full report still goes out after the day closes.
	e.clock.Set(afterDay)
	e.rep.runOnce(context.Background())
	if ep.requests() != 2 {
		t.Errorf("%d requests, want the partial one and the full one", ep.requests())
	}
}

func TestDailyJobWaitsForTheDelayThenSendsAndAPendingReportSurvivesARestart(t *testing.T) {
	e := newEnv(t, nil)
	var fail = true
	var ep *endpoint
	ep = e.endpoint("r.example.org", func(w http.ResponseWriter, r *http.Request) {
		ep.mu.Lock()
		failing := fail
		ep.mu.Unlock()
		if failing {
			w.WriteHeader(http.StatusBadGateway)
			return
		}
		w.WriteHeader(http.StatusOK)
	})
	e.dns.Add(t, `_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=`+ep.url+`"`)
	e.rep.Record(result("example.net", nil, 23, policy.ResultSuccess, "mx.example.net", ""))
	ctx := context.Background()

	e.clock.Set(day1.Add(24*time.Hour + 30*time.Second)) // before the delay (1 minute here)
	e.rep.runOnce(ctx)
	if ep.requests() != 0 {
		t.Fatalf("sent %d reports before the random delay", ep.requests())
	}
	e.clock.Set(day1.Add(24*time.Hour + 2*time.Minute))
	e.rep.runOnce(ctx)
	if ep.requests() != 1 {
		t.Fatalf("%d requests after the delay, want 1", ep.requests())
	}

	e.restart()
	ep.mu.Lock()
	fail = false
	ep.mu.Unlock()
	e.clock.Advance(time.Hour)
	e.rep.runOnce(ctx)
	if ep.requests() != 2 {
		t.Fatalf("%d requests, want the pending report retried after the restart", ep.requests())
	}
	if a, b := gunzipJSON(t, ep.body(0))["report-id"], gunzipJSON(t, ep.body(1))["report-id"]; a != b {
		t.Errorf("report-id changed across the restart: %v, %v", a, b)
	}
	list, _ := e.rep.List()
	if len(list) != 1 || len(list[0].Reports) != 1 || list[0].Reports[0].State != stateSent {
		t.Errorf("list: %+v", list)
	}
}

func TestTLSRPTLookupFailureIsRetriedByTheDailyJob(t *testing.T) {
	e := newEnv(t, nil)
	ep := e.endpoint("r.example.org", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })
	e.dns.Add(t, `_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=`+ep.url+`"`)
	e.dns.SetFault("_smtp._tls.example.net", 0, dnstest.FaultServfail)
	e.rep.Record(result("example.net", nil, 1, policy.ResultSuccess, "mx.example.net", ""))
	ctx := context.Background()
	e.rep.runOnce(ctx)
	if ep.requests() != 0 {
		t.Fatal("sent without a record")
	}
	if list, _ := e.rep.List(); len(list) != 1 || len(list[0].Reports) != 0 {
		t.Fatalf("after a DNS failure: %+v, want no report yet", list)
	}
	e.dns.SetFault("_smtp._tls.example.net", 0, dnstest.FaultNone)
	e.clock.Advance(10 * time.Minute)
	e.rep.runOnce(ctx)
	if ep.requests() != 1 {
		t.Fatalf("%d requests once DNS answers, want 1", ep.requests())
	}
}

// The 24 hours of retries of a record lookup (RFC 8460 §5.5) count from
// the first failed lookup, not from the end of the day: a relay that
// comes back after two days still tries for a day. A lookup cut off by a
// stop or a control client gone spends none of them.
func TestRecordLookupRetriesCountFromTheFirstFailure(t *testing.T) {
	e := newEnv(t, nil)
	ep := e.endpoint("r.example.org", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })
	e.dns.Add(t, `_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=`+ep.url+`"`)
	e.rep.Record(result("example.net", nil, 1, policy.ResultSuccess, "mx.example.net", ""))
	e.rep.Flush()

	// Failing from here on, so that a lookup the cut-off one left running
	// caches no answer.
	e.dns.SetFault("_smtp._tls.example.net", 0, dnstest.FaultServfail)
	cut, cancel := context.WithCancel(context.Background())
	cancel()
	e.clock.Set(day1.Add(50 * time.Hour))
	if r, err := e.rep.Send(cut, "2026-03-01", false); err != nil || len(r) != 1 || r[0].State != statePending {
		t.Fatalf("cut-off Send: %+v, %v; want the report still to make", r, err)
	}

	ctx := context.Background()
	for _, after := range []time.Duration{0, 12 * time.Hour, 23 * time.Hour} {
		e.clock.Set(day1.Add(50*time.Hour + after))
		e.rep.runOnce(ctx)
		if list, _ := e.rep.List(); len(list) != 1 || len(list[0].Reports) != 0 {
			t.Fatalf("%v after the first failure: %+v, want no report yet (not given up)", after, list)
		}
	}
	e.dns.SetFault("_smtp._tls.example.net", 0, dnstest.FaultNone)
	e.clock.Advance(10 * time.Minute)
	e.rep.runOnce(ctx)
	if ep.requests() != 1 {
		t.Fatalf("%d requests once DNS answers, want 1", ep.requests())
	}

	// A second domain whose lookup keeps failing is given up 24 hours
	// after its first failure.
	e.dns.Add(t, `_smtp._tls.example.org. 60 IN TXT "v=TLSRPTv1; rua=`+ep.url+`"`)
	e.dns.SetFault("_smtp._tls.example.org", 0, dnstest.FaultServfail)
	e.rep.Record(result("example.org", nil, 25, policy.ResultSuccess, "mx.example.org", ""))
	e.rep.Flush()
	e.clock.Set(day1.Add(100 * time.Hour))
	first := resultFor(t, e.send("2026-03-02", false), "example.org")
	e.clock.Advance(25 * time.Hour)
	last := resultFor(t, e.send("2026-03-02", false), "example.org")
	if first.State != statePending || last.State != stateFailed || !strings.Contains(last.Error, "SERVFAIL") {
		t.Errorf("first %+v, 25 hours on %+v; want pending, then failed", first, last)
	}
}

// A forced resend to a record that no longer names a usable rua fails
// as a first send would, instead of staying pending with nothing to try.
func TestForcedResendWithoutAUsableRUAFails(t *testing.T) {
	e := newEnv(t, nil)
	ep := e.endpoint("r.example.org", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusOK) })
	e.dns.Add(t, `_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=`+ep.url+`"`)
	e.rep.Record(result("example.net", nil, 1, policy.ResultSuccess, "mx.example.net", ""))
	if r := resultFor(t, e.send("2026-03-01", false), "example.net"); r.State != stateSent {
		t.Fatalf("first send: %+v", r)
	}
	e.dns.Remove("_smtp._tls.example.net", dns.TypeTXT)
	e.dns.Add(t, `_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=ftp://r.example.org/x"`)
	e.rep.opts.Resolver = testResolver(t, e.dns) // past the cached record
	r := resultFor(t, e.send("2026-03-01", true), "example.net")
	if r.State != stateFailed || r.Error != "no rua URI uses mailto or https" || ep.requests() != 1 {
		t.Errorf("forced resend: %+v, %d requests; want failed for want of a rua", r, ep.requests())
	}
}

// Before the day's delay, the daily job looks again when it ends, not a
// day later.
func TestDailyJobWakesAtTodaysDelay(t *testing.T) {
	e := newEnv(t, nil)
	e.clock.Set(day1.Add(24*time.Hour + 30*time.Second))
	if next := e.rep.runOnce(context.Background()); !next.Equal(day1.Add(24*time.Hour + time.Minute)) {
		t.Errorf("next look at %v, want %v", next, day1.Add(24*time.Hour+time.Minute))
	}
}
