package tlsrpt

import (
	"encoding/json"
	"maps"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/stsrelay/stsrelay/policy"
)

var (
	stsLines = []string{"version: STSv1", "mode: enforce", "mx: mx1.example.net", "mx: *.backup.example.net", "max_age: 86400"}
	stsID    = policy.NewIdentity(policy.TypeSTS, "example.net", stsLines, []string{"mx1.example.net", "*.backup.example.net"})
	tlsaID   = policy.NewIdentity(policy.TypeTLSA, "example.net", []string{"3 1 1 0123456789ABCDEF"}, nil)
	localID  = policy.NewIdentity(policy.TypeLocal, "example.net", nil, nil)
	// An MTA-STS fetch failure names the policy without its text.
	fetchID = policy.NewIdentity(policy.TypeSTS, "example.net", nil, nil)
)

// recordMixedDay records a day of results for example.net (and one for a
// domain without a TLSRPT record, and one the next day).
func recordMixedDay(r *Reporter) {
	for h := range 5 {
		r.Record(result("example.net", stsID, h, policy.ResultSuccess, "mx1.example.net", ""))
	}
	r.Record(result("example.net", stsID, 6, policy.ResultCertificateHostMismatch, "mx1.example.net", "certificate name mismatch"))
	r.Record(result("example.net", stsID, 7, policy.ResultCertificateHostMismatch, "mx1.example.net", "certificate name mismatch"))
	r.Record(result("example.net", stsID, 8, policy.ResultCertificateExpired, "mx1.example.net", "certificate expired"))
	r.Record(result("example.net", stsID, 9, policy.ResultSTARTTLSNotSupported, "mx2.backup.example.net", "STARTTLS not offered"))
	r.Record(result("example.net", fetchID, 10, policy.ResultSTSPolicyFetchError, "", "HTTP 404"))
	for h := range 3 {
		r.Record(result("example.net", tlsaID, 11+h, policy.ResultSuccess, "mx1.example.net", ""))
	}
	r.Record(result("example.net", tlsaID, 14, policy.ResultTLSAInvalid, "mx1.example.net", "TLSA records did not match the certificate"))
	for h := range 4 {
		r.Record(result("example.net", nil, 15+h, policy.ResultSuccess, "mx1.example.net", ""))
	}
	r.Record(result("example.net", nil, 19, policy.ResultSTARTTLSNotSupported, "mx1.example.net", "STARTTLS not offered"))
	// Not reported: a local policy decided, or the session carried a report.
	r.Record(result("example.net", localID, 20, policy.ResultSuccess, "mx1.example.net", ""))
	own := result("example.net", stsID, 21, policy.ResultCertificateHostMismatch, "mx1.example.net", "certificate name mismatch")
	own.Unreported = true
	r.Record(own)
	// The next day, and another domain.
	next := result("example.net", stsID, 0, policy.ResultSuccess, "mx1.example.net", "")
	next.Time = day1.Add(24*time.Hour + time.Minute)
	r.Record(next)
	r.Record(result("other.example", nil, 3, policy.ResultSuccess, "mx.other.example", ""))
}

func TestReportOfAMixedDayFollowsRFC8460FieldByField(t *testing.T) {
	e := newEnv(t, nil)
	ep := e.endpoint("reports.example.net", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusCreated) })
	e.dns.Add(t, `_smtp._tls.example.net. 60 IN TXT "v=TLSRPTv1; rua=`+ep.url+`"`)
	skippedLocal := testutil.ToFloat64(metricSkipped.WithLabelValues("local"))
	skippedOwn := testutil.ToFloat64(metricSkipped.WithLabelValues("unreported"))
	recordMixedDay(e.rep)
	if d := testutil.ToFloat64(metricSkipped.WithLabelValues("local")) - skippedLocal; d != 1 {
		t.Errorf("local results skipped: %v, want 1", d)
	}
	if d := testutil.ToFloat64(metricSkipped.WithLabelValues("unreported")) - skippedOwn; d != 1 {
		t.Errorf("report sessions skipped: %v, want 1", d)
	}

	res := e.send("2026-03-01", false)
	got := resultFor(t, res, "example.net")
	if got.State != stateSent || len(got.SentTo) != 1 || got.SentTo[0] != ep.url {
		t.Fatalf("example.net: %+v", got)
	}
	if o := resultFor(t, res, "other.example"); o.State != stateNoRecord {
		t.Errorf("other.example without a TLSRPT record: %+v", o)
	}
	if ep.requests() != 1 {
		t.Fatalf("%d POSTs, want 1", ep.requests())
	}
	if ep.types[0] != "POST application/tlsrpt+gzip" {
		t.Errorf("request %q, want POST with application/tlsrpt+gzip (§5.4)", ep.types[0])
	}
	rep := gunzipJSON(t, ep.body(0))

	// §4.4: exactly these top-level fields.
	wantKeys(t, "report", rep, "organization-name", "date-range", "contact-info", "report-id", "policies")
	if rep["organization-name"] != "Example Relay Operator" || rep["contact-info"] != "tlsrpt@example.com" {
		t.Errorf("organization-name %v, contact-info %v", rep["organization-name"], rep["contact-info"])
	}
	if rep["report-id"] != got.ReportID || !strings.HasSuffix(got.ReportID, "@example.com") {
		t.Errorf("report-id %v, send said %q", rep["report-id"], got.ReportID)
	}
	dr := rep["date-range"].(map[string]any)
	wantKeys(t, "date-range", dr, "start-datetime", "end-datetime")
	for k, want := range map[string]time.Time{"start-datetime": day1, "end-datetime": day1.Add(24 * time.Hour)} {
		s, _ := dr[k].(string)
		ts, err := time.Parse(time.RFC3339, s)
		if err != nil || !ts.Equal(want) {
			t.Errorf("%s = %q, want RFC 3339 %s", k, s, want.Format(time.RFC3339))
		}
	}

	pols := rep["policies"].([]any)
	byType := map[string]map[string]any{}
	for _, p := range pols {
		pm := p.(map[string]any)
		wantKeys(t, "policies[]", pm, "policy", "summary", "failure-details")
		pol := pm["policy"].(map[string]any)
		typ := pol["policy-type"].(string)
		if _, ok := pol["policy-string"]; !ok && typ == "sts" {
			typ = "sts-fetch"
		}
		byType[typ] = pm
		if pol["policy-domain"] != "example.net" {
			t.Errorf("%s: policy-domain %v", typ, pol["policy-domain"])
		}
		// Counts add up: the summary's failures are the details' sum.
		sum := pm["summary"].(map[string]any)
		wantKeys(t, typ+" summary", sum, "total-successful-session-count", "total-failure-session-count")
		var n int64
		for _, fd := range pm["failure-details"].([]any) {
			c, _ := fd.(map[string]any)["failed-session-count"].(json.Number).Int64()
			n += c
		}
		if f, _ := sum["total-failure-session-count"].(json.Number).Int64(); f != n {
			t.Errorf("%s: total-failure-session-count %d, failure-details add up to %d", typ, f, n)
		}
	}
	if len(pols) != 4 || len(byType) != 4 {
		t.Fatalf("%d policies (%v), want sts, the failed sts fetch, tlsa and no-policy-found", len(pols), slices.Collect(maps.Keys(byType)))
	}

	sts := byType["sts"]
	pol := sts["policy"].(map[string]any)
	wantKeys(t, "sts policy", pol, "policy-type", "policy-string", "policy-domain", "mx-host")
	if s := strings.Join(strs(pol["policy-string"]), "|"); s != strings.Join(stsLines, "|") {
		t.Errorf("policy-string %q", s)
	}
	if mx := strs(pol["mx-host"]); len(mx) != 2 || mx[0] != "mx1.example.net" || mx[1] != "*.backup.example.net" {
		t.Errorf("mx-host %v, want the policy's two patterns as an array", pol["mx-host"])
	}
	wantCounts(t, "sts", sts, 5, 4)
	details := sts["failure-details"].([]any)
	if len(details) != 3 {
		t.Fatalf("sts failure-details: %d groups, want 3 (two identical mismatches grouped): %v", len(details), details)
	}
	var mismatch map[string]any
	for _, d := range details {
		if dm := d.(map[string]any); dm["result-type"] == "certificate-host-mismatch" {
			mismatch = dm
		}
	}
	if mismatch == nil {
		t.Fatalf("no certificate-host-mismatch group: %v", details)
	}
	wantKeys(t, "failure-details[]", mismatch, "result-type", "sending-mta-ip", "receiving-mx-hostname",
		"receiving-mx-helo", "receiving-ip", "failed-session-count", "failure-reason-code")
	for k, v := range map[string]any{"sending-mta-ip": "192.0.2.10", "receiving-mx-hostname": "mx1.example.net",
		"receiving-mx-helo": "mx1.example.net", "receiving-ip": "198.51.100.25", "failed-session-count": json.Number("2"),
		"failure-reason-code": "certificate name mismatch"} {
		if mismatch[k] != v {
			t.Errorf("mismatch %s = %v, want %v", k, mismatch[k], v)
		}
	}

	fetch := byType["sts-fetch"]
	wantCounts(t, "sts fetch", fetch, 0, 1)
	fd := fetch["failure-details"].([]any)[0].(map[string]any)
	wantKeys(t, "fetch failure", fd, "result-type", "failed-session-count", "failure-reason-code")
	if fd["result-type"] != "sts-policy-fetch-error" {
		t.Errorf("fetch failure result-type %v", fd["result-type"])
	}

	tlsa := byType["tlsa"]
	wantKeys(t, "tlsa policy", tlsa["policy"].(map[string]any), "policy-type", "policy-string", "policy-domain")
	wantCounts(t, "tlsa", tlsa, 3, 1)

	none := byType["no-policy-found"]
	wantKeys(t, "no-policy-found policy", none["policy"].(map[string]any), "policy-type", "policy-domain")
	wantCounts(t, "no-policy-found", none, 4, 1)
}

func wantKeys(t *testing.T, what string, m map[string]any, keys ...string) {
	t.Helper()
	got := slices.Sorted(maps.Keys(m))
	slices.Sort(keys)
	if !slices.Equal(got, keys) {
		t.Errorf("%s has fields %q, want exactly %q", what, got, keys)
	}
}

func wantCounts(t *testing.T, what string, p map[string]any, ok, failed int64) {
	t.Helper()
	s := p["summary"].(map[string]any)
	gotOK, _ := s["total-successful-session-count"].(json.Number).Int64()
	gotFailed, _ := s["total-failure-session-count"].(json.Number).Int64()
	if gotOK != ok || gotFailed != failed {
		t.Errorf("%s: %d successful, %d failed; want %d, %d", what, gotOK, gotFailed, ok, failed)
	}
}

func strs(v any) []string {
	var out []string
	for _, x := range v.([]any) {
		out = append(out, x.(string))
	}
	return out
}

func TestFailureDetailsStayBoundedWhateverTheReasons(t *testing.T) {
	a := &aggregate{Domain: "example.net", Type: "sts"}
	for i := range 5 * maxFailureGroups {
		a.addFailure(failureGroup{Result: "validation-failure", Reason: "reason " + strings.Repeat("x", i%7) + string(rune('a'+i%26)) + string(rune(i)), Count: 1})
	}
	if len(a.Failures) > maxFailureGroups+1 {
		t.Errorf("%d failure groups, want at most %d", len(a.Failures), maxFailureGroups+1)
	}
	if a.failed() != 5*maxFailureGroups {
		t.Errorf("failed = %d, want every failure counted (%d)", a.failed(), 5*maxFailureGroups)
	}
}

func TestFilenameFollowsRFC8460Section5_1(t *testing.T) {
	got := Filename("mail.sender.example.com", "example.net", day1, day1.Add(24*time.Hour), "0a1b2c")
	if want := "mail.sender.example.com!example.net!1772323200!1772409600!0a1b2c.json.gz"; got != want {
		t.Errorf("Filename = %q, want %q", got, want)
	}
}
