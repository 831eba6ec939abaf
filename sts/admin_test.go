package sts_test

import (
	"errors"
	"net/http"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/admin"
	"github.com/stsrelay/stsrelay/sts"
)

// controlSocket serves m's admin routes on a real unix socket.
func controlSocket(t *testing.T, m *sts.Manager) *admin.Client {
	t.Helper()
	mux := http.NewServeMux()
	m.RegisterAdmin(mux)
	path := filepath.Join(t.TempDir(), admin.SocketName)
	srv, err := admin.Listen(path, mux, nil)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve()
	t.Cleanup(func() { srv.Close() })
	return admin.Dial(path)
}

func TestAdminListsShowsRefreshesAndPurges(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	m := e.Manager(nil)
	c := controlSocket(t, m)

	var list []sts.PolicyInfo
	if err := c.Call(ctx, "GET", "/sts", nil, &list); err != nil || len(list) != 0 {
		t.Fatalf("empty cache: %+v, %v", list, err)
	}
	var info sts.PolicyInfo
	if err := c.Call(ctx, "POST", "/sts/example.com/refresh", nil, &info); err != nil {
		t.Fatal(err)
	}
	if info.Domain != "example.com" || info.ID != "id1" || info.Mode != sts.ModeEnforce || info.MaxAge != 604800 || len(info.MX) != 2 {
		t.Fatalf("refresh returned %+v", info)
	}
	if err := c.Call(ctx, "GET", "/sts", nil, &list); err != nil || len(list) != 1 || list[0].Domain != "example.com" {
		t.Fatalf("list: %+v, %v", list, err)
	}
	if err := c.Call(ctx, "GET", "/sts/EXAMPLE.com", nil, &info); err != nil || info.ID != "id1" {
		t.Fatalf("show: %+v, %v", info, err)
	}
	// Refresh ignores the backoff and the unchanged id: a second fetch.
	if err := c.Call(ctx, "POST", "/sts/example.com/refresh", nil, &info); err != nil || h.requests.Load() != 2 {
		t.Fatalf("second refresh: %v, %d fetches", err, h.requests.Load())
	}
	if err := c.Call(ctx, "DELETE", "/sts/example.com", nil, nil); err != nil {
		t.Fatal(err)
	}
	err := c.Call(ctx, "GET", "/sts/example.com", nil, &info)
	if err == nil || !strings.Contains(err.Error(), "no cached MTA-STS policy for example.com") {
		t.Fatalf("after purge: %v", err)
	}
}

func TestAdminRefreshReportsFetchFailure(t *testing.T) {
	e := newEnv(t)
	e.PolicyHost("example.com", "id1", enforcePolicy, e.CA.Issue(t, "wrong.example.com"))
	c := controlSocket(t, e.Manager(nil))
	err := c.Call(ctx, "POST", "/sts/example.com/refresh", nil, nil)
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("err = %v, want the certificate failure", err)
	}
}

// During an outage of policy hosts the list shows, besides the cached
// policies, the domains that have none because their fetch failed, and
// for a cached policy that its last refresh failed: which id, when, why.
// A cached policy's JSON keeps its fields; one that is fetched again
// loses its failure.
func TestAdminListShowsDomainsWhosePolicyCannotBeFetched(t *testing.T) {
	e := newEnv(t)
	down := e.ValidHost("down.example", "id1", enforcePolicy)
	e.Refuse(down, true)
	stale := e.ValidHost("example.com", "id1", enforcePolicy)
	m := e.Manager(nil)
	c := controlSocket(t, m)
	mustPolicy(t, m, "example.com")
	stale.SetStatus(http.StatusServiceUnavailable)
	e.SetID("example.com", "id2")
	if _, err := m.Policy(ctx, "down.example"); !errors.Is(err, sts.ErrNoPolicy) {
		t.Fatalf("down.example: %v, want no policy while its host refuses", err)
	}
	if cp := mustPolicy(t, m, "example.com"); cp.ID != "id1" {
		t.Fatalf("example.com: %+v, want the cached id1 while id2 cannot be fetched", cp)
	}

	var list []sts.PolicyInfo
	if err := c.Call(ctx, "GET", "/sts?not_cached=1", nil, &list); err != nil || len(list) != 2 {
		t.Fatalf("list: %+v, %v; want two domains", list, err)
	}
	d, s := list[0], list[1]
	if f := d.LastFailure; d.Domain != "down.example" || !d.NotCached || d.ID != "" || d.Mode != "" || f == nil ||
		f.ID != "id1" || !f.At.Equal(e.Clock.Now()) || f.Result != sts.ResultFetchError ||
		!strings.Contains(f.Reason, "connection refused") || strings.Contains(f.Reason, "https://") ||
		!strings.HasPrefix(d.LastError, "2026-01-02T03:04:05Z: ") {
		t.Errorf("down.example: %+v, failure %+v; want not cached, its fetch of id1 refused", d, f)
	}
	if f := s.LastFailure; s.Domain != "example.com" || s.NotCached || s.ID != "id1" || s.Mode != sts.ModeEnforce || f == nil ||
		f.ID != "id2" || !strings.Contains(f.Reason, "HTTP status 503") || s.LastError == "" {
		t.Errorf("example.com: %+v, failure %+v; want id1 cached, the refresh to id2 failed", s, f)
	}

	// The JSON of a domain without a policy has none of a policy's
	// fields, not even "expired": false; a cached policy's has them all,
	// as before.
	var raw []map[string]any
	if err := c.Call(ctx, "GET", "/sts?not_cached=1", nil, &raw); err != nil {
		t.Fatal(err)
	}
	if got, want := keys(raw[0]), "domain last_error last_failure not_cached"; got != want {
		t.Errorf("keys of a domain without a policy: %s, want %s", got, want)
	}
	if got, want := keys(raw[1]), "domain expired expires fetched id last_error last_failure last_used max_age mode mx policy"; got != want {
		t.Errorf("keys of a cached policy: %s, want %s", got, want)
	}

	// A client that does not ask for the domains without a policy, as
	// one written before they were listed, gets the cached policies
	// only: it would read any other element as a policy in force.
	var old []struct {
		Domain  string    `json:"domain"`
		ID      string    `json:"id"`
		Expires time.Time `json:"expires"`
		Expired bool      `json:"expired"`
	}
	if err := c.Call(ctx, "GET", "/sts", nil, &old); err != nil || len(old) != 1 || old[0].Domain != "example.com" || old[0].ID != "id1" {
		t.Errorf("list without not_cached: %+v, %v; want example.com's cached policy only", old, err)
	}

	// The host is back: after a fetch, the domain is listed with its
	// policy and without the failure.
	e.Refuse(down, false)
	e.Clock.Advance(sts.FetchBackoff)
	mustPolicy(t, m, "down.example")
	list, raw = nil, nil // Unmarshal would keep fields the new reply leaves out
	if err := c.Call(ctx, "GET", "/sts?not_cached=1", nil, &list); err != nil || len(list) != 2 {
		t.Fatalf("list: %+v, %v", list, err)
	}
	if d := list[0]; d.Domain != "down.example" || d.NotCached || d.ID != "id1" || d.Mode != sts.ModeEnforce ||
		d.LastFailure != nil || d.LastError != "" {
		t.Errorf("down.example after its policy was fetched: %+v, want cached without a failure", d)
	}
	if err := c.Call(ctx, "GET", "/sts", nil, &raw); err != nil {
		t.Fatal(err)
	}
	if got, want := keys(raw[0]), "domain expired expires fetched id last_used max_age mode mx policy"; got != want {
		t.Errorf("keys of a cached policy without a failure: %s, want %s", got, want)
	}
}

func keys(m map[string]any) string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return strings.Join(ks, " ")
}
