package delivery

import (
	"context"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/time/rate"

	"github.com/stsrelay/stsrelay/queue"
)

// waiters is how many deliveries wait for a slot of the destination key.
func (e *Engine) waitersFor(key string) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	if d := e.dests[key]; d != nil {
		return d.waiters
	}
	return 0
}

// twoDomainsOneProvider is a.test and b.test, whose MX hosts are both
// *.bigmail.test and reach the same upstream.
func twoDomainsOneProvider(t *testing.T) (*testEnv, *upstream) {
	v := newEnv(t,
		"a.test. 300 IN MX 10 mx1.bigmail.test.",
		"b.test. 300 IN MX 10 mx2.bigmail.test.",
		"mx1.bigmail.test. 300 IN A 127.0.0.2",
		"mx2.bigmail.test. 300 IN A 127.0.0.3")
	up := sink(t)
	v.route("127.0.0.2", "127.0.0.1:"+itoa(up.Port))
	v.route("127.0.0.3", "127.0.0.1:"+itoa(up.Port))
	return v, up
}

func TestMXHostLimitHoldsConnectionsAtTheMaximumUnderLoad(t *testing.T) {
	v, up := twoDomainsOneProvider(t)
	e := v.engine(func(o *Options) {
		o.Limits = []Limit{{MXHosts: []string{".bigmail.test"}, Shaping: Shaping{MaxConnections: 3}}}
	})
	up.hold()
	const n = 20
	var wg sync.WaitGroup
	results := make([][]queue.Status, n)
	for i := range n {
		domain := "a.test"
		if i%2 == 1 {
			domain = "b.test"
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = deliver(t, e, testJob(domain, "x@"+domain))
		}()
	}
	// Three connections reach the provider; the other deliveries, to both
	// domains, wait for one of its three slots instead of failing.
	waitFor(t, "3 connections and 17 waiting", func() bool {
		open, _, _, _ := up.stats()
		return open == 3 && e.waitersFor("mx .bigmail.test") == n-3
	})
	up.release()
	wg.Wait()
	for i, st := range results {
		if !st[0].Delivered() {
			t.Errorf("delivery %d: %v", i, st[0])
		}
	}
	if _, maxOpen, refused, _ := up.stats(); maxOpen != 3 || refused != 0 {
		t.Errorf("at most %d connections at once (%d refused), want exactly 3", maxOpen, refused)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.dests) != 0 {
		t.Errorf("shaping state kept for %d idle destinations", len(e.dests))
	}
}

func TestDomainLimitDoesNotHoldUpOtherDestinations(t *testing.T) {
	v, up := twoDomainsOneProvider(t)
	e := v.engine(func(o *Options) {
		o.Limits = []Limit{{Domains: []string{"a.test"}, Shaping: Shaping{MaxConnections: 1}}}
	})
	up.hold()
	done := make(chan []queue.Status, 2)
	go func() { done <- deliver(t, e, testJob("a.test", "x@a.test")) }()
	waitFor(t, "a.test's connection", func() bool { open, _, _, _ := up.stats(); return open == 1 })
	go func() { done <- deliver(t, e, testJob("a.test", "y@a.test")) }()
	waitFor(t, "a waiter for a.test", func() bool { return e.waitersFor("domain a.test") == 1 })
	// b.test has its own slots; a.test's full ones do not delay it.
	go func() { done <- deliver(t, e, testJob("b.test", "z@b.test")) }()
	waitFor(t, "b.test's connection", func() bool { open, _, _, _ := up.stats(); return open == 2 })
	if w := e.waitersFor("domain a.test"); w != 1 {
		t.Errorf("%d waiting for a.test, want 1", w)
	}
	up.release()
	for range 3 {
		if st := <-done; !st[0].Delivered() {
			t.Error(st[0])
		}
	}
}

// A connection that goes idle while a delivery to another domain of the
// same provider waits for its slot gives the slot up at once, not when the
// idle timer fires.
func TestIdleConnectionMakesRoomForAWaiterOfAnotherDomain(t *testing.T) {
	v, up := twoDomainsOneProvider(t)
	e := v.engine(func(o *Options) {
		o.IdleTimeout = time.Hour
		o.Limits = []Limit{{MXHosts: []string{".bigmail.test"}, Shaping: Shaping{MaxConnections: 1}}}
	})
	up.hold()
	done := make(chan []queue.Status, 2)
	go func() { done <- deliver(t, e, testJob("a.test", "x@a.test")) }()
	waitFor(t, "a.test's connection", func() bool { open, _, _, _ := up.stats(); return open == 1 })
	go func() {
		// Far below the idle timeout: a waiter woken only by the idle
		// timer gives up with 451 4.4.2.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		done <- e.Deliver(ctx, testJob("b.test", "y@b.test"))
	}()
	waitFor(t, "b.test waiting for the provider's slot", func() bool { return e.waitersFor("mx .bigmail.test") == 1 })
	up.release()
	for range 2 {
		if st := <-done; !st[0].Delivered() {
			t.Error(st[0])
		}
	}
	if _, maxOpen, _, conns := up.stats(); maxOpen != 1 || conns != 2 {
		t.Errorf("%d connections, at most %d at once; want 2, one at a time", conns, maxOpen)
	}
}

func TestMaxMessagesPerConnection(t *testing.T) {
	v, up := twoDomainsOneProvider(t)
	e := v.engine(func(o *Options) {
		o.IdleTimeout = time.Minute
		o.Limits = []Limit{{Domains: []string{"a.test"}, Shaping: Shaping{MaxMessagesPerConn: 2}}}
	})
	for range 5 {
		if st := deliver(t, e, testJob("a.test", "x@a.test")); !st[0].Delivered() {
			t.Fatal(st[0])
		}
	}
	if _, _, _, conns := up.stats(); conns != 3 {
		t.Errorf("%d connections for 5 messages at 2 per connection, want 3", conns)
	}
}

func TestRateLimitMakesTheNextMessageWait(t *testing.T) {
	v, up := twoDomainsOneProvider(t)
	e := v.engine(func(o *Options) {
		o.Limits = []Limit{{Domains: []string{"a.test"}, Shaping: Shaping{Rate: rate.Every(time.Hour)}}}
	})
	if st := deliver(t, e, testJob("a.test", "x@a.test")); !st[0].Delivered() {
		t.Fatal(st[0])
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	st := e.Deliver(ctx, testJob("a.test", "y@a.test"))
	wantStatus(t, st[0], 451, "4.4.2", "waiting for the destination's rate limit")
	// Another destination is not limited.
	if st := deliver(t, e, testJob("b.test", "z@b.test")); !st[0].Delivered() {
		t.Error(st[0])
	}
	if n := len(up.messages()); n != 2 {
		t.Errorf("%d messages, want 2", n)
	}
}

// A message takes one token of its destination's rate: the connection
// that replaces a stale idle one, in the same attempt, waits for no
// second token.
func TestStaleIdleConnectionTakesNoSecondRateToken(t *testing.T) {
	v, _ := oneMX(t)
	mx := &groupMX{hangUpAfter: 1}
	v.route("127.0.0.2", rawServer(t, mx.serve))
	const every = 1500 * time.Millisecond
	e := v.engine(func(o *Options) {
		o.IdleTimeout = time.Minute
		o.Limits = []Limit{{Domains: []string{"example.test"}, Shaping: Shaping{Rate: rate.Every(every)}}}
	})
	wantStatus(t, deliver(t, e, testJob("example.test", "a@example.test"))[0], 250, "2.0.0", "queued")
	time.Sleep(every) // the one token is back; the idle connection is closed
	// A second token would come only after the deadline, and the limiter
	// says so at once.
	ctx, cancel := context.WithTimeout(context.Background(), every/2)
	defer cancel()
	wantStatus(t, e.Deliver(ctx, testJob("example.test", "b@example.test"))[0], 250, "2.0.0", "queued")
	if conns, _, bodies := mx.state(); conns != 2 || len(bodies) != 2 {
		t.Errorf("%d connections, %d messages; want 2 of each", conns, len(bodies))
	}
}

// throttles records Job.Throttle signals.
type throttles struct {
	mu  sync.Mutex
	got []string
}

func (th *throttles) job(domain, rcpt string) *queue.Job {
	j := testJob(domain, rcpt)
	j.Throttle = func(limit int, d time.Duration) {
		th.mu.Lock()
		defer th.mu.Unlock()
		th.got = append(th.got, itoa(limit)+" "+d.String())
	}
	return j
}

func TestTooManyConnectionsLowersConcurrencyAndTellsTheQueue(t *testing.T) {
	v := newEnv(t)
	up := sink(t)
	up.limit = 2 // a provider that takes two connections from us
	e := v.engine(withRoutes(Route{Domains: []string{"*"}, Nexthop: up.nexthop()}), func(o *Options) {
		o.ThrottleFor = time.Hour
	})
	var th throttles

	// Ten at once: two get in, the others are greeted with 421, or wait
	// for a slot once the first refusals have lowered the limit.
	up.hold()
	key := "nexthop " + up.nexthop()
	signals := func() []string {
		th.mu.Lock()
		defer th.mu.Unlock()
		return append([]string(nil), th.got...)
	}
	var wg sync.WaitGroup
	results := make([][]queue.Status, 10)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = deliver(t, e, th.job("example.org", "a@example.org"))
		}()
	}
	waitFor(t, "two sessions, the rest refused or waiting, every refusal handled", func() bool {
		open, _, refused, _ := up.stats()
		return open == 2 && refused+e.waitersFor(key) == 8 && len(signals()) == refused
	})
	up.release()
	wg.Wait()
	_, _, refused, _ := up.stats()
	deferred := 0
	for _, st := range results {
		if !st[0].Delivered() {
			wantStatus(t, st[0], 421, "4.7.0", "too many connections")
			deferred++
		}
	}
	if refused == 0 || deferred != refused {
		t.Errorf("%d refused, %d deferred; want some, and one deferral per refusal", refused, deferred)
	}
	logs := v.logs.String()
	if n := strings.Count(logs, "lowering concurrency"); n != 1 {
		t.Errorf("lowering logged %d times, want once:\n%s", n, logs)
	}
	got := signals()
	if len(got) != refused {
		t.Errorf("queue told %d times, want once per refusal: %q", len(got), got)
	}
	// The refusals came with the two accepted sessions open: the limit
	// falls to what the provider takes. The signals are computed in order
	// but may reach the queue out of it (each after the engine's lock), so
	// the lowest, not the last, is the limit reached; the queue keeps the
	// lowest in force (queue.TestThrottleKeepsTheLowerOfSignalsArrivingOutOfOrder).
	limit := func(sig string) int {
		n, _ := strconv.Atoi(strings.Fields(sig)[0])
		return n
	}
	lowest := slices.MinFunc(got, func(a, b string) int { return limit(a) - limit(b) })
	if lowest != "1 1h0m0s" && lowest != "2 1h0m0s" {
		t.Errorf("signals %q, want a limit of at most 2 for 1h among them", got)
	}

	// Now at most two at once: ten more go through without a refusal.
	refusedBefore := refused
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = deliver(t, e, th.job("example.org", "b@example.org"))
		}()
	}
	wg.Wait()
	for _, st := range results {
		if !st[0].Delivered() {
			t.Errorf("after lowering: %v", st[0])
		}
	}
	if _, _, refused, _ := up.stats(); refused != refusedBefore {
		t.Errorf("%d more refusals after lowering", refused-refusedBefore)
	}
}

func itoa(n int) string { return strconv.Itoa(n) }

func TestLoweredConcurrencyIsRestoredAfterAWhile(t *testing.T) {
	v := newEnv(t)
	var mu sync.Mutex
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	e := v.engine(func(o *Options) {
		o.ThrottleFor = time.Minute
		o.Now = func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	})
	h := hop{key: "domain x.test"}
	var th throttles
	e.throttle(h, th.job("x.test", "a@x.test"), "421 4.7.0 too many connections")
	limit := func() int {
		e.mu.Lock()
		defer e.mu.Unlock()
		n, _ := e.maxLocked(e.destLocked(h.key, h.shaping))
		return n
	}
	if n := limit(); n != 1 || len(th.got) != 1 || th.got[0] != "1 1m0s" {
		t.Fatalf("limit %d, queue told %q; want 1 and \"1 1m0s\"", n, th.got)
	}
	mu.Lock()
	now = now.Add(time.Minute)
	mu.Unlock()
	if err := e.acquireSlot(t.Context(), h); err != nil {
		t.Fatal(err)
	}
	e.releaseSlot(h.key)
	if n := limit(); n != 10 {
		t.Errorf("limit %d after the while, want the default 10", n)
	}
	if !strings.Contains(v.logs.String(), "destination concurrency restored") {
		t.Errorf("restoring not logged:\n%s", v.logs.String())
	}
}
