package policy_test

import (
	"context"
	"errors"
	"strconv"
	"testing"

	"github.com/stsrelay/stsrelay/policy"
)

func TestParseSecurity(t *testing.T) {
	for in, want := range map[string]policy.Security{"may": policy.SecurityMay, "none": policy.SecurityNone,
		"encrypt": policy.SecurityEncrypt, "verify": policy.SecurityVerify, "dane-only": policy.SecurityDANE,
		" Verify ": policy.SecurityVerify} {
		if got, err := policy.ParseSecurity(in); err != nil || got != want {
			t.Errorf("ParseSecurity(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, bad := range []string{"secure", "dane"} {
		if _, err := policy.ParseSecurity(bad); err == nil {
			t.Errorf("ParseSecurity accepted %q, which is not one level", bad)
		}
	}
}

// "dane" is DANE when published, else what DNS gives; "dane-only" is DANE
// or nothing (Postfix's policy table levels).
func TestParseLocalTellsDANEFromDANEOnly(t *testing.T) {
	for in, want := range map[string]policy.Local{
		"dane":      {Published: true},
		" DANE ":    {Published: true},
		"dane-only": {Security: policy.SecurityDANE},
		"verify":    {Security: policy.SecurityVerify},
		"none":      {Security: policy.SecurityNone},
	} {
		got, err := policy.ParseLocal(in)
		if err != nil || got != want {
			t.Errorf("ParseLocal(%q) = %+v, %v; want %+v", in, got, err, want)
		}
		if !got.WantsDANE() && (in == "dane" || in == "dane-only") {
			t.Errorf("ParseLocal(%q) does not ask for TLSA lookups", in)
		}
	}
	if _, err := policy.ParseLocal("dane-preferred"); err == nil {
		t.Error("ParseLocal accepted an unknown value")
	}
}

var (
	sts  = policy.NewIdentity(policy.TypeSTS, "example.com", []string{"version: STSv1", "mode: enforce"}, []string{"mx.example.com"})
	tlsa = policy.NewIdentity(policy.TypeTLSA, "example.com", []string{"3 1 1 aa"}, nil)
)

// The demands of each kind of requirement, decided in one place.
func TestRequirementDemands(t *testing.T) {
	for _, tc := range []struct {
		name                                  string
		req                                   policy.Requirement
		mustTLS, mustAuth, excluded, enforced bool
		label                                 string
	}{
		{"opportunistic", policy.Requirement{}, false, false, false, false, "may"},
		{"local none", policy.Requirement{Security: policy.SecurityNone, Policy: policy.NewIdentity(policy.TypeLocal, "example.com", nil, nil)}, false, false, false, false, "local/none"},
		{"local encrypt", policy.Requirement{Security: policy.SecurityEncrypt, Policy: policy.NewIdentity(policy.TypeLocal, "example.com", nil, nil)}, true, false, false, false, "local/encrypt"},
		{"mta-sts enforce", policy.Requirement{Security: policy.SecurityVerify, Policy: sts}, true, true, false, true, "mta-sts/verify"},
		{"mta-sts enforce, unlisted MX", policy.Requirement{Security: policy.SecurityVerify, Policy: sts, Skip: "not listed"}, true, true, true, true, "mta-sts/verify"},
		{"mta-sts testing", policy.Requirement{Security: policy.SecurityVerify, Policy: sts, Testing: true, Skip: "not listed"}, false, false, false, false, "mta-sts/verify/testing"},
		{"dane", policy.Requirement{Security: policy.SecurityDANE, Policy: tlsa}, true, true, false, true, "dane/dane"},
		{"dane, no usable records", policy.Requirement{Security: policy.SecurityEncrypt, Policy: tlsa}, true, false, false, true, "dane/encrypt"},
	} {
		r := tc.req
		if r.MustTLS() != tc.mustTLS || r.MustAuthenticate() != tc.mustAuth || r.Excluded() != tc.excluded || r.Enforced() != tc.enforced {
			t.Errorf("%s: MustTLS %v MustAuthenticate %v Excluded %v Enforced %v; want %v %v %v %v", tc.name,
				r.MustTLS(), r.MustAuthenticate(), r.Excluded(), r.Enforced(), tc.mustTLS, tc.mustAuth, tc.excluded, tc.enforced)
		}
		if r.Label() != tc.label {
			t.Errorf("%s: Label %q, want %q", tc.name, r.Label(), tc.label)
		}
	}
}

func TestRequirementKeyFollowsThePolicy(t *testing.T) {
	a := policy.Requirement{Security: policy.SecurityVerify, Policy: sts, Names: []string{"mx.example.com"}}
	same := policy.Requirement{Security: policy.SecurityVerify, Names: []string{"mx.example.com"},
		Policy: policy.NewIdentity(policy.TypeSTS, "example.com", []string{"version: STSv1", "mode: enforce"}, []string{"mx.example.com"})}
	if a.Key() != same.Key() {
		t.Error("equal policies from two fetches give different keys")
	}
	changed := same
	changed.Policy = policy.NewIdentity(policy.TypeSTS, "example.com", []string{"version: STSv1", "mode: testing"}, []string{"mx.example.com"})
	if a.Key() == changed.Key() {
		t.Error("a changed policy text keeps the key")
	}
	opp := policy.Requirement{Security: policy.SecurityVerify, Names: []string{"mx.example.com"}}
	if a.Key() == opp.Key() {
		t.Error("a requirement without policy shares the key of an MTA-STS one")
	}
	// Separators cannot be forged by moving text between fields.
	x := policy.NewIdentity(policy.TypeSTS, "example.com", []string{"a", "b"}, nil)
	y := policy.NewIdentity(policy.TypeSTS, "example.com", []string{"a"}, []string{"b"})
	if x.Key() == y.Key() {
		t.Error("policy strings and mx hosts collide in the key")
	}
}

type fixed []policy.Requirement

func (f fixed) Requirements(context.Context, string, []policy.MX) ([]policy.Requirement, error) {
	return f, nil
}

type failing struct{ err error }

func (f failing) Requirements(context.Context, string, []policy.MX) ([]policy.Requirement, error) {
	return nil, f.err
}

func TestChainLetsDANEDecideBeforeMTASTS(t *testing.T) {
	mxs := []policy.MX{{Name: "a.test"}, {Name: "b.test"}}
	dane := fixed{{Security: policy.SecurityDANE, Policy: tlsa}, {MXValidated: true}}
	stsSrc := fixed{
		{Security: policy.SecurityVerify, Policy: sts, Skip: "not listed"},
		{Security: policy.SecurityVerify, Policy: sts, Skip: "not listed"},
	}
	got, err := policy.Chain(dane, nil, stsSrc).Requirements(t.Context(), "example.test", mxs)
	if err != nil {
		t.Fatal(err)
	}
	if got[0].Source() != policy.TypeTLSA || got[0].Skip != "" {
		t.Errorf("host with DANE got %+v, want the DANE requirement alone (RFC 8461 §2)", got[0])
	}
	if got[1].Source() != policy.TypeSTS || got[1].Skip == "" || !got[1].MXValidated {
		t.Errorf("host without DANE got %+v, want the MTA-STS requirement, MX validated by DNSSEC", got[1])
	}
}

func TestChainStopsAtTheFirstErrorAndChecksCounts(t *testing.T) {
	mxs := []policy.MX{{Name: "a.test"}}
	want := &policy.Error{Code: 451, Enhanced: "4.7.5", Text: "a.test: TLSA lookup failed"}
	_, err := policy.Chain(failing{want}, fixed{{}}).Requirements(t.Context(), "example.test", mxs)
	var pe *policy.Error
	if !errors.As(err, &pe) || pe != want {
		t.Errorf("err = %v, want the source's own *Error", err)
	}
	if _, err := policy.Chain(fixed{{}, {}}).Requirements(t.Context(), "example.test", mxs); err == nil {
		t.Error("a source answering for two hosts when asked about one was accepted")
	}
}

func TestRequirementKeyLayout(t *testing.T) {
	id := policy.NewIdentity(policy.TypeSTS, "example.com", []string{"mode: enforce"}, nil)
	for _, tc := range []struct {
		req  policy.Requirement
		want string
	}{
		{policy.Requirement{}, "0|||falsefalsefalse|"},
		{policy.Requirement{Security: policy.SecurityVerify, ServerName: "mx.example.com", Names: []string{"mx.example.com", "mx.provider.net"},
			Testing: true, MXValidated: true, Skip: "x", Policy: id},
			strconv.Itoa(int(policy.SecurityVerify)) + "|mx.example.com|mx.example.com,mx.provider.net|truetruetrue|" + id.Key()},
	} {
		if got := tc.req.Key(); got != tc.want {
			t.Errorf("Key() = %q, want %q", got, tc.want)
		}
	}
}
