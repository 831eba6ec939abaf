package sts_test

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.etcd.io/bbolt"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/sts"
)

var ctx = context.Background()

func mustPolicy(t *testing.T, m *sts.Manager, domain string) *sts.CachedPolicy {
	t.Helper()
	cp, err := m.Policy(ctx, domain)
	if err != nil {
		t.Fatalf("Policy(%s): %v", domain, err)
	}
	m.WaitWrites() // the tests look at the database next
	return cp
}

func TestSameIDDoesNotFetchAgain(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	m := e.Manager(nil)
	for range 5 {
		mustPolicy(t, m, "example.com")
		e.Clock.Advance(time.Hour)
	}
	if n := h.requests.Load(); n != 1 {
		t.Fatalf("%d fetches for an unchanged id, want 1", n)
	}
}

func TestNewIDTriggersRefetch(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	m := e.Manager(nil)
	mustPolicy(t, m, "example.com")
	h.Set("version: STSv1\nmode: testing\nmx: mx.example.com\nmax_age: 86400\n")
	e.SetID("example.com", "id2")
	cp := mustPolicy(t, m, "example.com")
	if h.requests.Load() != 2 || cp.ID != "id2" || cp.Policy.Mode != sts.ModeTesting {
		t.Fatalf("after id change: %d fetches, policy %+v", h.requests.Load(), cp)
	}
}

// The Manager keeps the parse of the last TXT record it saw: every change
// of the record's text must be parsed afresh, whatever came before.
func TestChangedTXTRecordIsParsedAgain(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	m := e.Manager(nil)
	setTXT := func(txts ...string) {
		e.DNS.Remove("_mta-sts.example.com.", 0)
		for _, txt := range txts {
			e.DNS.Add(t, fmt.Sprintf("_mta-sts.example.com. 300 IN TXT %q", txt))
		}
	}
	step := func(what, wantID string, wantFetches int32) {
		t.Helper()
		for range 3 {
			if cp := mustPolicy(t, m, "example.com"); cp.ID != wantID {
				t.Fatalf("%s: policy id %q, want %q", what, cp.ID, wantID)
			}
		}
		if n := h.requests.Load(); n != wantFetches {
			t.Fatalf("%s: %d fetches, want %d", what, n, wantFetches)
		}
	}
	step("first record", "id1", 1)
	e.SetID("example.com", "id2")
	step("new id", "id2", 2)
	e.SetID("example.com", "id1")
	step("old id back", "id1", 3)
	setTXT("v=STSv1; id=id1; ext=x")
	step("same id, another text", "id1", 3)
	setTXT("v=STSv1; id=id1!")
	step("invalid record, cached policy", "id1", 3)
	setTXT("v=STSv1; id=id1", "v=STSv1; id=id4")
	step("two records, cached policy", "id1", 3)
	setTXT("v=STSv1; id=id3")
	step("valid again with a new id", "id3", 4)
}

func TestExpiredPolicyIsFetchedAgainEvenWithSameID(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 3600\n")
	m := e.Manager(nil)
	mustPolicy(t, m, "example.com")
	e.Clock.Advance(time.Hour)
	mustPolicy(t, m, "example.com")
	if n := h.requests.Load(); n != 2 {
		t.Fatalf("%d fetches, want a second one after max_age", n)
	}
}

func TestCachedPolicySurvivesPolicyHostOutage(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	m := e.Manager(nil)
	first := mustPolicy(t, m, "example.com")
	// The id changes but the policy host is down: RFC 8461 §5.1 keeps the
	// cached policy in force until it expires.
	h.SetStatus(http.StatusServiceUnavailable)
	e.SetID("example.com", "id2")
	e.Clock.Advance(24 * time.Hour)
	cp := mustPolicy(t, m, "example.com")
	if cp != first || cp.Policy.Mode != sts.ModeEnforce {
		t.Fatalf("got %+v, want the cached policy", cp)
	}
	if h.requests.Load() != 2 {
		t.Fatalf("%d requests, want the new id to be tried", h.requests.Load())
	}
	if got := e.Rec.ResultTypes(); got != string(sts.ResultFetchError) {
		t.Fatalf("recorded %q, want one fetch error", got)
	}
	// After expiry the stale policy no longer applies.
	e.Clock.Advance(7 * 24 * time.Hour)
	if cp, err := m.Policy(ctx, "example.com"); !errors.Is(err, sts.ErrNoPolicy) {
		t.Fatalf("after expiry: %+v, %v; want no policy", cp, err)
	}
}

func TestCachedPolicySurvivesRestartAndOutage(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	path := dbPath(t)
	db := openDB(t, path)
	m := e.Manager(func(o *sts.Options) { o.DB = db })
	first := mustPolicy(t, m, "example.com")
	db.Close()

	h.SetStatus(http.StatusInternalServerError)
	e.Clock.Advance(48 * time.Hour)
	db = openDB(t, path)
	defer db.Close()
	m = e.Manager(func(o *sts.Options) { o.DB = db })
	cp := mustPolicy(t, m, "example.com")
	if cp.ID != "id1" || cp.Policy.Mode != sts.ModeEnforce || !cp.Expires.Equal(first.Expires) || !cp.Policy.Match("mx.example.com") {
		t.Fatalf("after restart: %+v, want the stored policy %+v", cp, first)
	}
	if n := h.requests.Load(); n != 1 {
		t.Fatalf("%d fetches; the restarted manager should use the stored policy", n)
	}
	// The id changes while the host is down: the stored policy still holds.
	e.SetID("example.com", "id2")
	if cp := mustPolicy(t, m, "example.com"); cp.ID != "id1" {
		t.Fatalf("got id %s, want the stored id1", cp.ID)
	}
}

func TestMissingTXTRecordKeepsUnexpiredPolicy(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", enforcePolicy)
	m := e.Manager(nil)
	mustPolicy(t, m, "example.com")
	e.DNS.Remove("_mta-sts.example.com.", 0)
	e.Clock.Advance(6 * 24 * time.Hour)
	if cp := mustPolicy(t, m, "example.com"); cp.Policy.Mode != sts.ModeEnforce {
		t.Fatalf("got %+v", cp)
	}
	// A DNS failure must not end it either.
	e.DNS.SetFault("_mta-sts.example.com.", 0, dnstest.FaultServfail)
	mustPolicy(t, m, "example.com")
	e.Clock.Advance(24 * time.Hour)
	if _, err := m.Policy(ctx, "example.com"); !errors.Is(err, sts.ErrNoPolicy) {
		t.Fatalf("err = %v after expiry, want ErrNoPolicy", err)
	}
}

func TestModeNoneReplacesCachedPolicy(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	db := openDB(t, dbPath(t))
	defer db.Close()
	m := e.Manager(func(o *sts.Options) { o.DB = db })
	mustPolicy(t, m, "example.com")
	h.Set("version: STSv1\nmode: none\nmax_age: 86400\n")
	e.SetID("example.com", "withdrawn")
	cp := mustPolicy(t, m, "example.com")
	if cp.Policy.Mode != sts.ModeNone {
		t.Fatalf("got %+v, want mode none", cp)
	}
	reqs, err := m.Requirements(ctx, "example.com", []policy.MX{{Name: "other.example.org", Final: "other.example.org"}})
	if err != nil || reqs[0].Security != policy.SecurityMay || reqs[0].Skip != "" || reqs[0].Source() != policy.TypeNone {
		t.Fatalf("requirements under mode none: %+v, %v", reqs, err)
	}
	if c, _ := m.Cached("example.com"); c.Policy.Mode != sts.ModeNone {
		t.Fatalf("cache holds %+v", c)
	}
}

func TestFailedFetchIsNotRetriedForFiveMinutes(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	h.SetStatus(http.StatusInternalServerError)
	m := e.Manager(nil)
	for range 3 {
		if _, err := m.Policy(ctx, "example.com"); !errors.Is(err, sts.ErrNoPolicy) {
			t.Fatalf("err = %v", err)
		}
	}
	if n := h.requests.Load(); n != 1 {
		t.Fatalf("%d fetches right after a failure, want 1", n)
	}
	e.Clock.Advance(sts.FetchBackoff - time.Second)
	_, err := m.Policy(ctx, "example.com")
	if n := h.requests.Load(); n != 1 || !errors.Is(err, sts.ErrFetchBackoff) {
		t.Fatalf("%d fetches, err %v before 5 minutes passed", n, err)
	}
	// A new id is a different policy: no need to wait.
	e.SetID("example.com", "id2")
	m.Policy(ctx, "example.com")
	if n := h.requests.Load(); n != 2 {
		t.Fatalf("%d fetches, want one for the new id", n)
	}
	e.Clock.Advance(sts.FetchBackoff)
	h.Set(enforcePolicy)
	if cp := mustPolicy(t, m, "example.com"); cp.ID != "id2" {
		t.Fatalf("got %+v", cp)
	}
	if n := h.requests.Load(); n != 3 {
		t.Fatalf("%d fetches, want a retry after 5 minutes", n)
	}
}

func TestConcurrentLookupsShareOneFetch(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	h.delay = 200 * time.Millisecond
	m := e.Manager(nil)
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for range 100 {
		wg.Go(func() {
			reqs, err := m.Requirements(ctx, "example.com", []policy.MX{{Name: "mx.example.com", Final: "mx.example.com"}})
			if err == nil && reqs[0].Security != policy.SecurityVerify {
				err = errors.New("policy not applied")
			}
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := h.requests.Load(); n != 1 {
		t.Fatalf("%d fetches for 100 concurrent lookups, want 1", n)
	}
}

func TestCancelledCallerDoesNotCancelSharedFetch(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	h.delay = 200 * time.Millisecond
	m := e.Manager(nil)
	c, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := m.Policy(c, "example.com"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want the caller's deadline", err)
	}
	mustPolicy(t, m, "example.com")
	if n := h.requests.Load(); n != 1 {
		t.Fatalf("%d fetches, want the first one to have completed and been shared", n)
	}
}

func TestHotPathDoesNotTouchTheDatabase(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", enforcePolicy)
	db := openDB(t, dbPath(t))
	defer db.Close()
	m := e.Manager(func(o *sts.Options) { o.DB = db })
	mustPolicy(t, m, "example.com")
	before := db.Stats()
	for range 100 {
		mustPolicy(t, m, "example.com")
	}
	after := db.Stats()
	if after.TxN != before.TxN || after.TxStats.GetWrite() != before.TxStats.GetWrite() {
		t.Fatalf("100 cached lookups used the database: %d read tx, %d page writes",
			after.TxN-before.TxN, after.TxStats.GetWrite()-before.TxStats.GetWrite())
	}
}

func TestBackgroundRefreshRenewsPolicyOfActiveDomain(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy) // max_age one week
	m := e.Manager(nil)
	first := mustPolicy(t, m, "example.com")
	e.Clock.Advance(23 * time.Hour)
	m.RefreshDue(ctx)
	if n := h.requests.Load(); n != 1 {
		t.Fatalf("refreshed a policy younger than a day (%d fetches)", n)
	}
	e.Clock.Advance(2 * time.Hour)
	m.RefreshDue(ctx)
	if n := h.requests.Load(); n != 2 {
		t.Fatalf("%d fetches, want a refresh of a day-old policy", n)
	}
	if c, _ := m.Cached("example.com"); !c.Expires.After(first.Expires) {
		t.Fatalf("expiry %v not extended past %v", c.Expires, first.Expires)
	}
}

func TestBackgroundRefreshLeavesIdleDomainsToExpire(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n")
	db := openDB(t, dbPath(t))
	defer db.Close()
	m := e.Manager(func(o *sts.Options) { o.DB = db })
	mustPolicy(t, m, "example.com")
	e.Clock.Advance(8 * 24 * time.Hour)
	m.RefreshDue(ctx)
	if n := h.requests.Load(); n != 1 {
		t.Fatalf("%d fetches for a domain without mail for 8 days", n)
	}
	if _, err := m.Cached("example.com"); !errors.Is(err, sts.ErrNotCached) {
		t.Fatalf("expired idle policy still cached: %v", err)
	}
	m2 := e.Manager(func(o *sts.Options) { o.DB = db })
	if len(m2.List()) != 0 {
		t.Fatal("expired idle policy still stored")
	}
}

// A background refresh is no use of the domain: a domain that got mail
// once is refreshed while it is active (7 days), then left to expire and
// dropped, in memory and on disk; before, each refresh counted as use, so
// it was refreshed every day for ever.
func TestBackgroundRefreshesDoNotKeepADomainActive(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 604800\n")
	db := openDB(t, dbPath(t))
	defer db.Close()
	m := e.Manager(func(o *sts.Options) { o.DB = db })
	mustPolicy(t, m, "example.com")
	for range 30 {
		e.Clock.Advance(25 * time.Hour)
		m.RefreshDue(ctx)
	}
	if n := h.requests.Load(); n < 2 || n > 8 {
		t.Errorf("%d fetches in 31 days for a domain mailed once, want the refreshes of its first 7 days", n)
	}
	if _, err := m.Cached("example.com"); !errors.Is(err, sts.ErrNotCached) {
		t.Errorf("the policy of a domain idle for 30 days is still cached: %v", err)
	}
	if len(e.Manager(func(o *sts.Options) { o.DB = db }).List()) != 0 {
		t.Error("the policy of a domain idle for 30 days is still stored")
	}
}

func TestPurgeForgetsPolicyOnDisk(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	db := openDB(t, dbPath(t))
	defer db.Close()
	m := e.Manager(func(o *sts.Options) { o.DB = db })
	mustPolicy(t, m, "example.com")
	if err := m.Purge("Example.COM."); err != nil {
		t.Fatal(err)
	}
	if len(e.Manager(func(o *sts.Options) { o.DB = db }).List()) != 0 {
		t.Fatal("purged policy still stored")
	}
	mustPolicy(t, m, "example.com")
	if n := h.requests.Load(); n != 2 {
		t.Fatalf("%d fetches, want a new fetch after purge", n)
	}
}

func TestMaxAgeZeroPolicyAppliesToTheFetchingDeliveryOnly(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 0\n")
	m := e.Manager(nil)
	for i := 1; i <= 2; i++ {
		if cp := mustPolicy(t, m, "example.com"); cp.Policy.Mode != sts.ModeEnforce {
			t.Fatalf("got %+v", cp)
		}
		if n := h.requests.Load(); n != int32(i) {
			t.Fatalf("%d fetches after %d lookups; a max_age 0 policy is never current", n, i)
		}
	}
}

func TestRunRefreshesInTheBackgroundUntilCancelled(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	m := e.Manager(func(o *sts.Options) { o.RefreshInterval = 10 * time.Millisecond })
	mustPolicy(t, m, "example.com")
	e.Clock.Advance(25 * time.Hour)
	c, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { m.Run(c); close(done) }()
	deadline := time.Now().Add(5 * time.Second)
	for h.requests.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatal("Run did not refresh a day-old policy")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after its context ended")
	}
}

func TestMetricsCountFetchesCacheHitsAndModes(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	m := e.Manager(nil)
	before := map[string]float64{
		"fetches/ok": sts.Counters("fetches", "ok"), "cache/hit": sts.Counters("cache", "hit"),
		"cache/miss": sts.Counters("cache", "miss"), "deliveries/enforce": sts.Counters("deliveries", "enforce"),
		"deliveries/no-policy": sts.Counters("deliveries", "no-policy"),
	}
	for range 3 {
		requirements(t, m, mx("mx.example.com"))
	}
	m.Requirements(ctx, "other.example", []policy.MX{mx("mx.other.example")})
	// The counters are process-wide: a fetch that an earlier test left
	// running in the background may finish now, so fetches are counted at
	// this test's own policy host and the counter is held to at least that.
	if n := h.requests.Load(); n != 1 {
		t.Errorf("policy host asked %d times, want 1", n)
	}
	if got := sts.Counters("fetches", "ok") - before["fetches/ok"]; got < 1 {
		t.Errorf("fetches/ok grew by %v, want at least 1", got)
	}
	for key, want := range map[string]float64{"cache/hit": 2, "cache/miss": 2, "deliveries/enforce": 3, "deliveries/no-policy": 1} {
		metric, label, _ := strings.Cut(key, "/")
		if got := sts.Counters(metric, label) - before[key]; got != want {
			t.Errorf("%s grew by %v, want %v", key, got, want)
		}
	}
}

// RFC 8461 §3.3 gives a policy host a minute. While one answers slowly,
// its domain's delivery is deferred after FetchWait (never sent without
// the policy, never holding its worker for the minute), other domains'
// lookups go on, and the fetch completes in the background for the next
// attempt.
func TestSlowPolicyHostDefersItsDomainWithoutHoldingOthers(t *testing.T) {
	e := newEnv(t)
	slow := e.ValidHost("slow.example", "id1", enforcePolicy)
	arrived, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	slow.handler = func(w http.ResponseWriter, r *http.Request) {
		once.Do(func() { close(arrived) })
		<-release
		fmt.Fprint(w, enforcePolicy)
	}
	defer func() {
		select {
		case <-release:
		default:
			close(release)
		}
	}()
	e.ValidHost("fast.example", "id1", enforcePolicy)
	m := e.Manager(func(o *sts.Options) { o.FetchTimeout, o.FetchWait = 30*time.Second, 3*time.Second })
	mxs := []policy.MX{{Name: "mx.example.com", Final: "mx.example.com"}}

	type result struct {
		reqs []policy.Requirement
		err  error
	}
	slowDone := make(chan result, 1)
	go func() {
		reqs, err := m.Requirements(ctx, "slow.example", mxs)
		slowDone <- result{reqs, err}
	}()
	<-arrived

	// Another domain's fetch and lookup complete while the slow host has
	// not answered.
	reqs, err := m.Requirements(ctx, "fast.example", mxs)
	if err != nil || reqs[0].Security != policy.SecurityVerify {
		t.Fatalf("fast.example: %+v, %v; want its enforce policy while slow.example's host stalls", reqs, err)
	}

	// The slow domain's delivery is deferred while its host still stalls.
	r := <-slowDone
	var pe *policy.Error
	if !errors.As(r.err, &pe) || pe.Code != 451 || !strings.Contains(pe.Text, "slow.example") {
		t.Fatalf("slow.example: %+v, %v; want a 451 deferral while its policy host answers", r.reqs, r.err)
	}

	// The fetch goes on; once the host answers, the next attempt finds
	// the policy without fetching again.
	close(release)
	for i := 0; ; i++ {
		if _, err := m.Cached("slow.example"); err == nil {
			break
		}
		if i == 1000 {
			t.Fatal("the background fetch never stored the policy")
		}
		time.Sleep(10 * time.Millisecond)
	}
	reqs, err = m.Requirements(ctx, "slow.example", mxs)
	if err != nil || reqs[0].Security != policy.SecurityVerify {
		t.Fatalf("slow.example after its host answered: %+v, %v", reqs, err)
	}
	if n := slow.requests.Load(); n != 1 {
		t.Errorf("%d fetches of slow.example, want the one that was waited for", n)
	}
}

// RFC 8461 §5.1: a published policy that cannot be fetched, with none
// cached, means delivering as if the domain had no MTA-STS. Only the first
// fetch of a policy id is waited for with a deferral; once it has failed,
// each later attempt goes ahead while the fetch is tried again, rather than
// deferring every retry until the message expires.
func TestPolicyHostThatNeverAnswersDefersOnlyTheFirstAttempt(t *testing.T) {
	for _, tc := range []struct {
		name  string
		setup func(e *env)
	}{
		{"address drops packets", func(e *env) {
			e.DNS.Add(t, "mta-sts.example.com. 300 IN AAAA "+blackholeIP)
		}},
		{"TLS handshake stalls", func(e *env) { e.StallingHost("example.com") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.SetID("example.com", "id1")
			tc.setup(e)
			m := e.Manager(func(o *sts.Options) { o.FetchTimeout, o.FetchWait = 200*time.Millisecond, 50*time.Millisecond })
			mxs := []policy.MX{mx("mx.example.com")}

			_, err := m.Requirements(ctx, "example.com", mxs)
			var pe *policy.Error
			if !errors.As(err, &pe) || pe.Code != 451 || pe.Enhanced != "4.4.3" {
				t.Fatalf("first attempt: %v; want 451 4.4.3 while the first fetch runs", err)
			}
			e.Rec.Wait(t, 1) // the fetch fails at its timeout
			for attempt := 2; attempt <= 4; attempt++ {
				e.Clock.Advance(30 * time.Minute) // the queue's next retry, after the backoff
				reqs, err := m.Requirements(ctx, "example.com", mxs)
				if err != nil || reqs[0].Security != policy.SecurityMay || reqs[0].Policy != nil {
					t.Fatalf("attempt %d: %+v, %v; want delivery as without MTA-STS", attempt, reqs, err)
				}
				// The fetch was tried again, and its failure reported
				// (RFC 8461 §6).
				e.Rec.Wait(t, attempt)
			}
			want := strings.TrimSuffix(strings.Repeat(string(sts.ResultFetchError)+",", 4), ",")
			if got := e.Rec.ResultTypes(); got != want {
				t.Errorf("recorded %s, want %s", got, want)
			}
			// An operator asking about the domain learns why its mail
			// goes without MTA-STS.
			if _, err := m.Info("example.com"); !errors.Is(err, sts.ErrNotCached) || !strings.Contains(err.Error(), "the fetch of policy id id1 failed at") {
				t.Errorf("Info: %v; want ErrNotCached saying how the last fetch failed", err)
			}
			// A new id's first fetch is waited for again, and the
			// deferral says how the last one ended.
			e.SetID("example.com", "id2")
			_, err = m.Requirements(ctx, "example.com", mxs)
			if !errors.As(err, &pe) || pe.Code != 451 || !strings.Contains(pe.Text, "policy id id1 failed") {
				t.Fatalf("first attempt under a new id: %v; want 451 naming the failed fetch of id1", err)
			}
		})
	}
}

// Failed fetches are remembered until a fetch succeeds, for a bounded
// number of domains: beyond it the oldest is forgotten, and that domain's
// next fetch is waited for as a first one.
func TestRememberedFetchFailuresAreBounded(t *testing.T) {
	e := newEnv(t)
	domains := []string{"a.example", "b.example", "c.example"}
	for _, d := range domains {
		e.SetID(d, "id1")
		e.DNS.Add(t, "mta-sts."+d+". 300 IN AAAA "+blackholeIP)
	}
	m := e.Manager(func(o *sts.Options) { o.FetchTimeout, o.FetchWait = 200*time.Millisecond, 20*time.Millisecond })
	m.SetMaxFailures(2)
	deferred := func(d string) bool {
		t.Helper()
		_, err := m.Requirements(ctx, d, []policy.MX{mx("mx." + d)})
		var pe *policy.Error
		if err != nil && !errors.As(err, &pe) {
			t.Fatal(err)
		}
		return err != nil
	}
	for i, d := range domains {
		if !deferred(d) {
			t.Fatalf("%s: the first fetch was not waited for", d)
		}
		e.Rec.Wait(t, i+1)
	}
	e.Clock.Advance(time.Hour)
	if !deferred("a.example") {
		t.Error("a.example, the oldest of three failures with room for two, is still remembered")
	}
	if deferred("c.example") {
		t.Error("c.example, the latest failure, was forgotten")
	}
}

// stsrelay check waits for the whole fetch (FetchWait of FetchTimeout), as
// it makes no later attempt: it gets the fetch's outcome, never a deferral
// from its wait ending just before the fetch's own timeout.
func TestWaitForTheWholeFetchGetsItsOutcome(t *testing.T) {
	e := newEnv(t)
	e.SetID("example.com", "id1")
	e.DNS.Add(t, "mta-sts.example.com. 300 IN AAAA "+blackholeIP)
	m := e.Manager(func(o *sts.Options) { o.FetchTimeout, o.FetchWait = 200*time.Millisecond, 200*time.Millisecond })
	reqs, err := m.Requirements(ctx, "example.com", []policy.MX{mx("mx.example.com")})
	if err != nil || reqs[0].Security != policy.SecurityMay {
		t.Fatalf("%+v, %v; want no policy once the fetch failed", reqs, err)
	}
}

func TestNoPolicyErrorWrapsItsCause(t *testing.T) {
	e := newEnv(t)
	m := e.Manager(nil)
	_, err := m.Policy(ctx, "example.com")
	if !errors.Is(err, sts.ErrNoPolicy) || !errors.Is(err, sts.ErrNoRecord) {
		t.Fatalf("err = %v, want ErrNoPolicy wrapping ErrNoRecord", err)
	}
	if want := sts.ErrNoPolicy.Error() + ": " + sts.ErrNoRecord.Error(); err.Error() != want {
		t.Errorf("err = %q, want %q", err, want)
	}
}

// TestDeliveryDoesNotWaitForThePolicyWrite: a fetched policy is applied
// from memory at once; it is written through Options.Update (the queue's
// group commit in the daemon) after, and WaitWrites waits for that.
func TestDeliveryDoesNotWaitForThePolicyWrite(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", enforcePolicy)
	path := dbPath(t)
	db := openDB(t, path)
	release := make(chan struct{})
	var writes atomic.Int32
	m := e.Manager(func(o *sts.Options) {
		o.DB = db
		o.Update = func(fn func(*bbolt.Tx) error) error {
			writes.Add(1)
			<-release // a disk that is slow today
			return db.Update(fn)
		}
	})
	c, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cp, err := m.Policy(c, "example.com")
	if err != nil || cp.Policy.Mode != sts.ModeEnforce {
		t.Fatalf("Policy = %+v, %v; want the enforce policy while its write waits", cp, err)
	}
	waited := make(chan struct{})
	go func() { m.WaitWrites(); close(waited) }()
	select {
	case <-waited:
		t.Fatal("WaitWrites returned while the policy's write was held up")
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	<-waited
	if n := writes.Load(); n != 1 {
		t.Fatalf("%d writes through Options.Update, want 1", n)
	}
	db.Close()

	// The write landed: a restarted manager has the policy without a fetch.
	db = openDB(t, path)
	defer db.Close()
	m = e.Manager(func(o *sts.Options) { o.DB = db })
	if cp, err := m.Cached("example.com"); err != nil || cp.ID != "id1" {
		t.Fatalf("after restart: %+v, %v; want the written policy", cp, err)
	}
}

// A purge while the fetched policy is still being written must not be
// undone by that write landing after it.
func TestPurgeWaitsForThePolicyWrite(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", enforcePolicy)
	path := dbPath(t)
	db := openDB(t, path)
	m, release := managerWithHeldWrite(e, db)
	c, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := m.Policy(c, "example.com"); err != nil {
		t.Fatal(err)
	}
	purged := make(chan error, 1)
	go func() { purged <- m.Purge("example.com") }()
	select {
	case err := <-purged:
		t.Fatalf("Purge returned (%v) while the policy's write was held up; that write would land after the deletion", err)
	case <-time.After(50 * time.Millisecond):
	}
	close(release)
	if err := <-purged; err != nil {
		t.Fatalf("Purge = %v, want nil", err)
	}
	m.WaitWrites()
	if _, err := m.Cached("example.com"); !errors.Is(err, sts.ErrNotCached) {
		t.Fatalf("Cached after Purge = %v, want ErrNotCached", err)
	}
	db.Close()

	db = openDB(t, path)
	defer db.Close()
	m = e.Manager(func(o *sts.Options) { o.DB = db })
	if cp, err := m.Cached("example.com"); !errors.Is(err, sts.ErrNotCached) {
		t.Fatalf("after restart: %+v, %v; want the purged policy gone", cp, err)
	}
}

// A new policy id while the last policy is still being written starts a
// fetch of its own (joining the finished one would serve the old policy),
// and the two writes land in the order of the fetches.
func TestNewIDWhileThePolicyIsWritten(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "id1", enforcePolicy)
	path := dbPath(t)
	db := openDB(t, path)
	m, release := managerWithHeldWrite(e, db)
	c, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if cp, err := m.Policy(c, "example.com"); err != nil || cp.ID != "id1" {
		t.Fatalf("Policy = %+v, %v; want id1", cp, err)
	}
	h.Set("version: STSv1\nmode: testing\nmx: mx.example.com\nmax_age: 86400\n")
	e.SetID("example.com", "id2")
	cp, err := m.Policy(c, "example.com")
	if err != nil || cp.ID != "id2" || cp.Policy.Mode != sts.ModeTesting {
		t.Fatalf("Policy after the id changed = %+v, %v; want id2 in testing mode while id1 is still being written", cp, err)
	}
	close(release)
	m.WaitWrites()
	db.Close()

	db = openDB(t, path)
	defer db.Close()
	m = e.Manager(func(o *sts.Options) { o.DB = db })
	if cp, err := m.Cached("example.com"); err != nil || cp.ID != "id2" {
		t.Fatalf("after restart: %+v, %v; want id2, written last", cp, err)
	}
}

const (
	policyForA = "version: STSv1\nmode: enforce\nmx: mx-a.example.com\nmax_age: 604800\n"
	policyForB = "version: STSv1\nmode: enforce\nmx: mx-b.example.com\nmax_age: 86400\n"
)

// fetchUnderID starts a delivery's lookup of example.com's policy and
// returns what it gets.
func fetchUnderID(m *sts.Manager) <-chan *sts.CachedPolicy {
	got := make(chan *sts.CachedPolicy, 1)
	go func() {
		c, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		cp, _ := m.Policy(c, "example.com")
		got <- cp
	}()
	return got
}

// RFC 8461 §3.3: a new policy id means fetch the policy anew. A delivery
// that sees the new id while the fetch for the old one still runs does not
// take that fetch's policy (asked for before the change): it gets one
// fetched after the new id was seen. The older fetch, ending later, does
// not replace it, in memory or on disk.
func TestNewIDDuringTheOldIDsFetchIsFetchedAnew(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "idA", "")
	arrived, release := h.HoldFirstRequest(t, policyForA, servePolicy(policyForB))
	path := dbPath(t)
	db := openDB(t, path)
	m := e.Manager(func(o *sts.Options) { o.DB, o.FetchWait = db, 2*time.Second })

	first := fetchUnderID(m)
	<-arrived // the fetch for idA is held
	e.SetID("example.com", "idB")
	reqs, err := m.Requirements(ctx, "example.com", []policy.MX{mx("mx-b.example.com")})
	if err != nil || reqs[0].Security != policy.SecurityVerify || reqs[0].Skip != "" {
		t.Fatalf("delivery under idB while the fetch for idA is held: %+v, %v; want mx-b.example.com verified under idB's policy", reqs, err)
	}
	if n := h.requests.Load(); n != 2 {
		t.Fatalf("%d requests to the policy host, want a second one for idB", n)
	}

	release()
	if cp := <-first; cp == nil || cp.ID != "idA" || !cp.Policy.Match("mx-a.example.com") {
		t.Fatalf("the delivery under idA got %+v; want the policy its fetch brought", cp)
	}
	m.WaitWrites()
	wantB := func(when string, m *sts.Manager) {
		t.Helper()
		cp, err := m.Cached("example.com")
		if err != nil || cp.ID != "idB" || !cp.Policy.Match("mx-b.example.com") || cp.Policy.Match("mx-a.example.com") || cp.Policy.MaxAge != 24*time.Hour {
			t.Fatalf("%s: cached %+v, %v; want idB's policy", when, cp, err)
		}
	}
	wantB("after the fetch for idA ended", m)
	reqs, err = m.Requirements(ctx, "example.com", []policy.MX{mx("mx-b.example.com")})
	if err != nil || reqs[0].Security != policy.SecurityVerify || reqs[0].Skip != "" {
		t.Fatalf("delivery under idB after the fetch for idA ended: %+v, %v", reqs, err)
	}
	if n := h.requests.Load(); n != 2 {
		t.Fatalf("%d requests to the policy host, want no more once idB's policy is cached", n)
	}
	db.Close()

	db = openDB(t, path)
	defer db.Close()
	wantB("after restart", e.Manager(func(o *sts.Options) { o.DB = db }))
}

// A fetch for the old id that ends after the new id's fetch failed is
// cached, the only policy fetched, in force until the new id's can be
// fetched (RFC 8461 §5.1); the failure stays the new id's, and so does its
// backoff.
func TestOldIDsFetchEndingAfterTheNewIDsFailedKeepsTheBackoff(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "idA", "")
	arrived, release := h.HoldFirstRequest(t, policyForA, func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "down", http.StatusServiceUnavailable)
	})
	m := e.Manager(func(o *sts.Options) { o.FetchWait = 2 * time.Second })

	first := fetchUnderID(m)
	<-arrived
	e.SetID("example.com", "idB")
	reqs, err := m.Requirements(ctx, "example.com", []policy.MX{mx("mx-b.example.com")})
	if err != nil || reqs[0].Security != policy.SecurityMay || reqs[0].Policy != nil {
		t.Fatalf("delivery under idB whose fetch failed: %+v, %v; want delivery as without MTA-STS", reqs, err)
	}
	if n := h.requests.Load(); n != 2 {
		t.Fatalf("%d requests to the policy host, want a second one for idB", n)
	}

	release()
	if cp := <-first; cp == nil || cp.ID != "idA" {
		t.Fatalf("the delivery under idA got %+v; want the policy its fetch brought", cp)
	}
	m.WaitWrites()
	e.Clock.Advance(sts.FetchBackoff / 2)
	cp, err := m.Policy(ctx, "example.com")
	if err != nil || cp.ID != "idA" || !cp.Policy.Match("mx-a.example.com") {
		t.Fatalf("Policy under idB within its backoff = %+v, %v; want idA's policy, cached", cp, err)
	}
	if n := h.requests.Load(); n != 2 {
		t.Fatalf("%d requests to the policy host; idB's failed fetch is not repeated within %s", n, sts.FetchBackoff)
	}
	if info, err := m.Info("example.com"); err != nil || !strings.Contains(info.LastError, "503") {
		t.Fatalf("Info = %+v, %v; want idB's failed fetch", info, err)
	}
}

// managerWithHeldWrite returns a Manager on db whose first cache write
// waits until release is closed, as on a slow disk; the others go through.
func managerWithHeldWrite(e *env, db *bbolt.DB) (m *sts.Manager, release chan struct{}) {
	release = make(chan struct{})
	var held atomic.Bool
	m = e.Manager(func(o *sts.Options) {
		o.DB = db
		o.Update = func(fn func(*bbolt.Tx) error) error {
			if held.CompareAndSwap(false, true) {
				<-release
			}
			return db.Update(fn)
		}
	})
	return m, release
}

// The background pass drops an idle domain's expired policy only if it is
// still the one cached: a delivery that fetched a fresh policy while the
// drop waited keeps it, in memory and on disk.
func TestExpiredDropKeepsAPolicyFetchedMeanwhile(t *testing.T) {
	e := newEnv(t)
	e.ValidHost("example.com", "id1", "version: STSv1\nmode: enforce\nmx: mx.example.com\nmax_age: 86400\n")
	path := dbPath(t)
	db := openDB(t, path)
	m, release := managerWithHeldWrite(e, db)
	c, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if _, err := m.Policy(c, "example.com"); err != nil { // its write is held up
		t.Fatal(err)
	}
	e.Clock.Advance(8 * 24 * time.Hour)
	passed := make(chan struct{})
	go func() {
		m.RefreshDue(c) // chooses id1, expired and idle, and waits for its write
		close(passed)
	}()
	select {
	case <-passed:
		t.Fatal("the background pass dropped a policy whose write was held up")
	case <-time.After(50 * time.Millisecond):
	}
	e.SetID("example.com", "id2")
	if cp, err := m.Policy(c, "example.com"); err != nil || cp.ID != "id2" {
		t.Fatalf("Policy = %+v, %v; want id2 fetched", cp, err)
	}
	close(release)
	<-passed
	m.WaitWrites()
	if cp, err := m.Cached("example.com"); err != nil || cp.ID != "id2" {
		t.Fatalf("Cached after the pass = %+v, %v; want the fresh id2 kept", cp, err)
	}
	db.Close()

	db = openDB(t, path)
	defer db.Close()
	m = e.Manager(func(o *sts.Options) { o.DB = db })
	if cp, err := m.Cached("example.com"); err != nil || cp.ID != "id2" {
		t.Fatalf("after restart: %+v, %v; want id2", cp, err)
	}
}

// A purge forgets the fetches under way with the cached policy. Here the
// fetch for idA, begun first, is held; the delivery under idB fetches and
// caches idB's policy; the domain is purged; then the fetch for idA ends.
// It serves the delivery that waited for it, but its policy, superseded by
// idB's, is not cached, in memory or on disk: were it, a failed fetch of
// idB's policy would leave idA's in force (RFC 8461 §5.1), refusing mx-b.
func TestPurgeDuringAnOlderFetchDoesNotBringBackItsPolicy(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "idA", "")
	var after atomic.Int32
	arrived, release := h.HoldFirstRequest(t, policyForA, func(w http.ResponseWriter, r *http.Request) {
		if after.Add(1) == 1 {
			servePolicy(policyForB)(w, r) // idB's fetch
			return
		}
		http.Error(w, "down", http.StatusServiceUnavailable)
	})
	path := dbPath(t)
	db := openDB(t, path)
	m := e.Manager(func(o *sts.Options) { o.DB, o.FetchWait = db, 2*time.Second })

	first := fetchUnderID(m)
	<-arrived // the fetch for idA is held
	e.SetID("example.com", "idB")
	if cp := mustPolicy(t, m, "example.com"); cp.ID != "idB" {
		t.Fatalf("under idB: %+v, want idB's policy", cp)
	}
	if err := m.Purge("example.com"); err != nil {
		t.Fatalf("Purge = %v", err)
	}

	release()
	if cp := <-first; cp == nil || cp.ID != "idA" || !cp.Policy.Match("mx-a.example.com") {
		t.Fatalf("the delivery under idA got %+v; want the policy its fetch brought", cp)
	}
	m.WaitWrites()
	if cp, err := m.Cached("example.com"); !errors.Is(err, sts.ErrNotCached) {
		t.Fatalf("after the fetch for idA, begun before the purge, ended: cached %+v, %v; want nothing", cp, err)
	}
	if n := m.DomainsFetching(); n != 0 {
		t.Errorf("%d domains with fetch records once no fetch is under way, want 0", n)
	}

	// idB's policy host fails now: with no policy cached, the delivery
	// goes as without MTA-STS (RFC 8461 §5.1).
	reqs, err := m.Requirements(ctx, "example.com", []policy.MX{mx("mx-b.example.com")})
	if err != nil || reqs[0].Skip != "" || reqs[0].Policy != nil {
		t.Fatalf("delivery under idB, whose fetch fails: %+v, %v; want mx-b.example.com usable, not refused by idA's superseded policy", reqs, err)
	}
	if n := h.requests.Load(); n != 3 {
		t.Fatalf("%d requests to the policy host, want a third one for idB after the purge", n)
	}
	db.Close()

	db = openDB(t, path)
	defer db.Close()
	if cp, err := e.Manager(func(o *sts.Options) { o.DB = db }).Cached("example.com"); !errors.Is(err, sts.ErrNotCached) {
		t.Fatalf("after restart: cached %+v, %v; want the purged domain without a policy", cp, err)
	}
}

// A fetch under way when the domain is purged that then fails leaves no
// failure behind: the purge forgot the domain's failed fetch, and with it
// the backoff; one begun before the purge does not bring them back.
func TestPurgeDuringAFetchThatFailsForgetsTheFailure(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "idA", "")
	arrived, release := h.HoldFirstRequest(t, "not a policy", servePolicy(policyForA))
	m := e.Manager(nil)

	first := fetchUnderID(m)
	<-arrived
	if err := m.Purge("example.com"); !errors.Is(err, sts.ErrNotCached) {
		t.Fatalf("Purge = %v, want ErrNotCached", err)
	}
	release()
	if cp := <-first; cp != nil {
		t.Fatalf("the delivery whose fetch failed got %+v", cp)
	}
	e.Rec.Wait(t, 1) // the failure is reported all the same
	if _, err := m.Info("example.com"); !errors.Is(err, sts.ErrNotCached) || strings.Contains(err.Error(), "failed") {
		t.Fatalf("Info = %v; want nothing known of the domain", err)
	}
	if list := m.Infos(); len(list) != 0 {
		t.Fatalf("Infos = %+v, want nothing", list)
	}
	if cp := mustPolicy(t, m, "example.com"); cp.ID != "idA" {
		t.Fatalf("Policy = %+v, want idA's, fetched at once", cp)
	}
	if n := h.requests.Load(); n != 2 {
		t.Fatalf("%d requests to the policy host, want a second one without backoff", n)
	}
}

// After a purge, a refresh (or a delivery) does not join a fetch begun
// before it, whose policy would not be cached: it fetches the policy
// afresh, and the cache keeps that.
func TestRefreshAfterPurgeFetchesAfresh(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "idA", "")
	arrived, release := h.HoldFirstRequest(t, policyForA, servePolicy(policyForB))
	m := e.Manager(nil)

	first := fetchUnderID(m)
	<-arrived
	if err := m.Purge("example.com"); !errors.Is(err, sts.ErrNotCached) {
		t.Fatalf("Purge = %v, want ErrNotCached", err)
	}
	c, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	cp, err := m.Refresh(c, "example.com")
	if err != nil || !cp.Policy.Match("mx-b.example.com") {
		t.Fatalf("Refresh after the purge, with the fetch begun before it held: %+v, %v; want the policy fetched anew", cp, err)
	}
	if got, err := m.Cached("example.com"); err != nil || got != cp {
		t.Fatalf("Cached = %+v, %v; want the refreshed policy", got, err)
	}

	release()
	if cp := <-first; cp == nil || !cp.Policy.Match("mx-a.example.com") {
		t.Fatalf("the delivery under idA got %+v; want the policy its fetch brought", cp)
	}
	m.WaitWrites()
	if got, err := m.Cached("example.com"); err != nil || got != cp {
		t.Fatalf("Cached after the older fetch ended = %+v, %v; want the refreshed policy kept", got, err)
	}
	if n := m.DomainsFetching(); n != 0 {
		t.Errorf("%d domains with fetch records once no fetch is under way, want 0", n)
	}
}

// The background pass that drops an idle domain's expired policy does not
// forget that the fetches begun before the one that brought it were
// superseded: one that ends after the drop is not cached either.
func TestExpiredDropDuringAnOlderFetchDoesNotBringBackItsPolicy(t *testing.T) {
	e := newEnv(t)
	h := e.ValidHost("example.com", "idA", "")
	arrived, release := h.HoldFirstRequest(t, policyForA, servePolicy(policyForB))
	path := dbPath(t)
	db := openDB(t, path)
	m := e.Manager(func(o *sts.Options) { o.DB, o.FetchWait = db, 2*time.Second })

	first := fetchUnderID(m)
	<-arrived
	e.SetID("example.com", "idB")
	if cp := mustPolicy(t, m, "example.com"); cp.ID != "idB" {
		t.Fatalf("under idB: %+v, want idB's policy", cp)
	}
	e.Clock.Advance(8 * 24 * time.Hour) // idB's policy expired, the domain idle
	m.RefreshDue(ctx)
	if _, err := m.Cached("example.com"); !errors.Is(err, sts.ErrNotCached) {
		t.Fatalf("Cached after the pass = %v, want idB's expired policy dropped", err)
	}

	release()
	if cp := <-first; cp == nil || cp.ID != "idA" {
		t.Fatalf("the delivery under idA got %+v; want the policy its fetch brought", cp)
	}
	m.WaitWrites()
	if cp, err := m.Cached("example.com"); !errors.Is(err, sts.ErrNotCached) {
		t.Fatalf("after the fetch for idA ended: cached %+v, %v; want nothing", cp, err)
	}
	db.Close()

	db = openDB(t, path)
	defer db.Close()
	if cp, err := e.Manager(func(o *sts.Options) { o.DB = db }).Cached("example.com"); !errors.Is(err, sts.ErrNotCached) {
		t.Fatalf("after restart: cached %+v, %v; want nothing", cp, err)
	}
}
