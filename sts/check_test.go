package sts_test

import (
	"strings"
	"testing"

	"github.com/stsrelay/stsrelay/sts"
)

func checkOutput(t *testing.T, m *sts.Manager, domain string, mod func(*sts.CheckReport)) string {
	t.Helper()
	r := m.Check(ctx, domain)
	if mod != nil {
		mod(r)
	}
	var b strings.Builder
	r.Write(&b)
	return b.String()
}

func wantLines(t *testing.T, out string, parts ...string) {
	t.Helper()
	for _, p := range parts {
		if !strings.Contains(out, p) {
			t.Errorf("output lacks %q:\n%s", p, out)
		}
	}
}

func TestCheckExplainsCNAMEMXUnderBothReadings(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", "version: STSv1\nmode: enforce\nmx: mx.provider.net\nmax_age: 86400\n")
	cert := e.CA.Issue(t, "mx.provider.net")
	e.MX("provider.net", "mx.provider.net", &cert)
	e.DNS.Add(t, "example.com. 300 IN MX 10 mail.example.com.")
	e.DNS.Add(t, "mail.example.com. 300 IN CNAME mx.provider.net.")

	out := checkOutput(t, e.Manager(nil), "example.com", func(r *sts.CheckReport) { r.CachedNote = "no daemon running" })
	wantLines(t, out,
		`"v=STSv1; id=id1"`, "OK: policy id id1",
		"mode: enforce", "mx: mx.provider.net",
		"no daemon running",
		"is a CNAME: mail.example.com -> mx.provider.net",
		"MX name mail.example.com, as RFC 8461 §4.1 reads: NOT in the policy",
		"CNAME target mx.provider.net, with match_cname_target: matches the policy",
		"WARNING: an MX target is a CNAME",
		"some large senders",
		"deferred (451 4.4.8)",
	)

	out = checkOutput(t, e.Manager(func(o *sts.Options) { o.MatchCNAMETarget = true }), "example.com", nil)
	wantLines(t, out, "sts.match_cname_target = true", "1 of 1 MX hosts may receive mail")
}

func TestCheckReportsFetchProblemAndCachedPolicy(t *testing.T) {
	e := newEnv(t)
	e.PolicyHost("example.com", "id1", enforcePolicy, e.CA.Issue(t, "wrong.example.com"))
	cert := e.CA.Issue(t, "mx.example.com")
	e.MX("example.com", "mx.example.com", &cert)
	out := checkOutput(t, e.Manager(nil), "example.com", func(r *sts.CheckReport) {
		r.Cached = &sts.PolicyInfo{Domain: "example.com", ID: "id0", Mode: sts.ModeEnforce,
			MX: []string{"mx.example.com"}, Policy: "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n"}
	})
	wantLines(t, out, "PROBLEM [sts-webpki-invalid]", "id id0, mode enforce",
		"checked against the cached policy", "1 of 1 MX hosts may receive mail")
}

func TestCheckWithoutPolicy(t *testing.T) {
	e := newEnv(t)
	e.DNS.Add(t, `_mta-sts.example.com. 300 IN TXT "v=spf1 -all"`)
	cert := e.CA.Issue(t, "mx.example.com")
	e.MX("example.com", "mx.example.com", &cert)
	out := checkOutput(t, e.Manager(nil), "example.com", nil)
	wantLines(t, out, `"v=spf1 -all" (not v=STSv1, ignored)`, "does not publish MTA-STS", "no MTA-STS policy applies")
}
