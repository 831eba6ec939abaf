package sts_test

import (
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/sts"
)

func TestInspectReportsNoProblemForADomainWithoutMTASTS(t *testing.T) {
	e := newEnv(t)
	i := e.Manager(nil).Inspect(ctx, "example.com")
	if i.Published() || i.Applied != nil || i.FetchErr != nil || !errors.Is(i.RecordErr, sts.ErrNoRecord) {
		t.Fatalf("inspection = %+v, want no record, no policy and no fetch error", i)
	}
}

func TestInspectShowsTheFetchFailureOfAPublishedPolicy(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	h.status = http.StatusNotFound
	i := e.Manager(nil).Inspect(ctx, "example.com")
	var fe *sts.FetchError
	if !i.Published() || i.Applied != nil || !errors.As(i.FetchErr, &fe) || fe.ResultType != policy.ResultSTSPolicyFetchError {
		t.Fatalf("inspection = %+v, want the record and an sts-policy-fetch-error", i)
	}
}

// A policy the running relay cached is what check's decisions follow, also
// while the policy host is down (RFC 8461 §5.1).
func TestPrimedPolicyIsAppliedWhileThePolicyHostIsDown(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	h.status = http.StatusServiceUnavailable
	m := e.Manager(nil)
	now := time.Now()
	if err := m.Prime("example.com", "id1", enforcePolicy, now.Add(-time.Hour), now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	i := m.Inspect(ctx, "example.com")
	if i.Applied == nil || i.Applied.ID != "id1" || i.Applied.Policy.Mode != sts.ModeEnforce || i.FetchErr != nil {
		t.Fatalf("inspection = %+v, want the primed enforce policy and no fetch (same id)", i)
	}
	if err := m.Prime("example.com", "id1", "not a policy", now, now.Add(time.Hour)); err == nil {
		t.Error("Prime accepted an invalid policy text")
	}
}
