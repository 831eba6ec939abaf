package sts_test

import (
	"context"
	"github.com/stsrelay/stsrelay/policy"
	"slices"
	"testing"

	"github.com/stsrelay/stsrelay/sts"
)

func requirements(t *testing.T, m *sts.Manager, mxs ...policy.MX) []policy.Requirement {
	t.Helper()
	reqs, err := m.Requirements(ctx, "example.com", mxs)
	if err != nil {
		t.Fatal(err)
	}
	if len(reqs) != len(mxs) {
		t.Fatalf("%d requirements for %d MX hosts", len(reqs), len(mxs))
	}
	return reqs
}

func mx(name string, cnames ...string) policy.MX {
	final := name
	if len(cnames) > 0 {
		final = cnames[len(cnames)-1]
	}
	return policy.MX{Name: name, Final: final, CNAMEs: cnames, Preference: 10}
}

func TestEnforceRequiresVerifiedTLSForListedMX(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", enforcePolicy)
	reqs := requirements(t, e.Manager(nil), mx("MX.Example.com."), mx("a.mail.example.net"))
	for i, want := range []string{"MX.Example.com", "a.mail.example.net"} {
		r := reqs[i]
		if r.Security != policy.SecurityVerify || r.Source() != policy.TypeSTS || r.Skip != "" || r.Testing ||
			!r.MXValidated || r.ServerName != want || !slices.Equal(r.Names, []string{want}) {
			t.Errorf("requirement %d = %+v, want verify for %s", i, r, want)
		}
	}
}

func TestEnforceSkipsMXNotListed(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", enforcePolicy)
	reqs := requirements(t, e.Manager(nil), mx("mx.example.com"), mx("backup.example.org"), mx("a.b.mail.example.net"))
	if reqs[0].Skip != "" {
		t.Fatalf("listed MX skipped: %+v", reqs[0])
	}
	for _, r := range reqs[1:] {
		if r.Skip != "not listed in the MTA-STS policy for example.com" || r.MXValidated || r.Security != policy.SecurityVerify {
			t.Errorf("unlisted MX: %+v", r)
		}
	}
}

func TestCNAMEMXIsMatchedByItsOwnNameByDefault(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", "version: STSv1\nmode: enforce\nmx: mx.provider.net\nmax_age: 86400\n")
	// example.com MX mail.example.com, which is a CNAME to mx.provider.net.
	in := mx("mail.example.com", "mx.provider.net")

	r := requirements(t, e.Manager(nil), in)[0]
	if r.Skip == "" {
		t.Fatalf("RFC 8461 §4.1 reading: the MX name does not match, want Skip; got %+v", r)
	}

	r = requirements(t, e.Manager(func(o *sts.Options) { o.MatchCNAMETarget = true }), in)[0]
	if r.Skip != "" || !slices.Equal(r.Names, []string{"mx.provider.net"}) || r.ServerName != "mail.example.com" || !r.MXValidated {
		t.Fatalf("match_cname_target: %+v, want Names=[mx.provider.net], SNI the MX name", r)
	}
}

func TestCNAMEMXListedUnderItsOwnNameNeedsNoOption(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", "version: STSv1\nmode: enforce\nmx: mail.example.com\nmax_age: 86400\n")
	for _, match := range []bool{false, true} {
		r := requirements(t, e.Manager(func(o *sts.Options) { o.MatchCNAMETarget = match }), mx("mail.example.com", "mx.provider.net"))[0]
		if r.Skip != "" || !slices.Equal(r.Names, []string{"mail.example.com"}) {
			t.Fatalf("match_cname_target=%v: %+v, want the MX name matched", match, r)
		}
	}
}

func TestCNAMEMXWithBothNamesListedAcceptsEitherCertificateOnlyWithOption(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: mx.provider.net\nmax_age: 86400\n")
	in := mx("mail.example.com", "mx.provider.net")
	r := requirements(t, e.Manager(nil), in)[0]
	if !slices.Equal(r.Names, []string{"mail.example.com"}) {
		t.Fatalf("RFC reading: Names %q, want only the MX name (RFC 8461 §4.2)", r.Names)
	}
	r = requirements(t, e.Manager(func(o *sts.Options) { o.MatchCNAMETarget = true }), in)[0]
	if !slices.Equal(r.Names, []string{"mail.example.com", "mx.provider.net"}) {
		t.Fatalf("match_cname_target: Names %q, want both listed names", r.Names)
	}
}

func TestTestingModeMarksEveryRequirementTesting(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", "version: STSv1\nmode: testing\nmx: mx.example.com\nmax_age: 86400\n")
	reqs := requirements(t, e.Manager(nil), mx("mx.example.com"), mx("other.example.org"))
	for _, r := range reqs {
		if r.Security != policy.SecurityVerify || !r.Testing || r.Source() != policy.TypeSTS {
			t.Errorf("testing mode: %+v", r)
		}
	}
	// The unlisted host carries the reason, which delivery reports for
	// TLSRPT before delivering anyway.
	if reqs[0].Skip != "" || reqs[1].Skip == "" {
		t.Errorf("Skip %q/%q, want only the unlisted host to carry a reason", reqs[0].Skip, reqs[1].Skip)
	}
	if !reqs[0].MXValidated || reqs[1].MXValidated {
		t.Errorf("MXValidated %v/%v, want only the listed host", reqs[0].MXValidated, reqs[1].MXValidated)
	}
}

func TestNoPolicyMeansOpportunistic(t *testing.T) {
	e := newEnv(t)
	for _, r := range requirements(t, e.Manager(nil), mx("mx.example.com")) {
		if r.Security != policy.SecurityMay || r.Source() != policy.TypeNone || r.Skip != "" || r.Names != nil || r.MXValidated {
			t.Fatalf("no policy: %+v", r)
		}
	}
}

func TestRequirementsErrOnlyWhenCancelled(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", enforcePolicy)
	c, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := e.Manager(nil).Requirements(c, "example.com", []policy.MX{mx("mx.example.com")}); err == nil {
		t.Fatal("no error with a cancelled context")
	}
}
