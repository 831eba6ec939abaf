package sts

import (
	"container/list"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"sort"
	"strings"
	"sync"
	"time"

	"go.etcd.io/bbolt"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/resolve"
)

const (
	// FetchBackoff is how long a failed fetch of one policy id keeps us
	// from fetching it again (RFC 8461 §3.3: "at least 5 minutes").
	FetchBackoff = 5 * time.Minute
	// defaultMaxFailures bounds how many domains' failed fetches are
	// remembered; beyond it the oldest is forgotten, and that domain's
	// next fetch counts as a first one again.
	defaultMaxFailures = 10000
	// refreshAge is how old a policy may get before the background refresh
	// fetches it again; RFC 8461 §10.2 suggests about daily. Policies with
	// a shorter max_age are refreshed at half their life.
	refreshAge = 24 * time.Hour
	// activeWindow is how recently a domain must have had mail for the
	// background refresh to keep its policy fresh; it covers the queue's
	// default lifetime of 5 days with room to spare.
	activeWindow = 7 * 24 * time.Hour
	// defaultRefreshInterval is how often Run looks for policies to refresh.
	defaultRefreshInterval = 10 * time.Minute
)

// Options configure a Manager. Resolver is required.
type Options struct {
	Resolver *resolve.Resolver
	// DB persists the cache, in bucket "sts.policies", so a restart keeps
	// policies. nil keeps the cache in memory only (stsrelay check).
	DB *bbolt.DB
	// Update, when set, runs the cache's writes to DB; nil means DB.Batch,
	// so that writes arriving together share a transaction. The daemon
	// passes the queue's group commit (queue.(*Queue).Update): at a cold
	// start a policy arrives for every domain at once, and transactions of
	// their own would hold bbolt's one writer while the queue's commits,
	// and the clients waiting on them, queue behind.
	Update func(fn func(tx *bbolt.Tx) error) error
	// RootCAs verify policy hosts; nil means the system roots (which Go
	// reads from SSL_CERT_FILE / SSL_CERT_DIR when set).
	RootCAs *x509.CertPool
	// DialContext dials "ip:443" for policy fetches; nil means a plain
	// net.Dialer. Tests point it at loopback servers.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	// Proxy, when set, is the HTTP proxy for policy fetches; the
	// environment's proxy variables are never used.
	Proxy func(*http.Request) (*url.URL, error)
	// FetchTimeout bounds one policy fetch; 0 means DefaultFetchTimeout,
	// and it is at most MaxFetchTimeout.
	FetchTimeout time.Duration
	// FetchWait bounds how long Requirements waits for a fetch, counted
	// from its start, when no cached policy applies meanwhile. Then it
	// defers the delivery if this is the first fetch of the policy id, and
	// goes on without MTA-STS if one has failed before. 0 means
	// DefaultFetchWait; FetchTimeout or more waits for the fetch's end.
	FetchWait time.Duration
	// MatchCNAMETarget also accepts an MX host whose final CNAME target
	// matches the policy (docs/DESIGN.md, "MX names and CNAMEs";
	// sts.match_cname_target).
	MatchCNAMETarget bool
	// Recorder receives policy fetch failures for TLSRPT; may be nil.
	Recorder policy.Recorder
	Logger   *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// RefreshInterval is how often Run looks for policies to refresh; 0
	// means 10 minutes.
	RefreshInterval time.Duration
}

// CachedPolicy is a policy as the cache holds it. It is never modified
// after it is made; a refresh replaces it.
type CachedPolicy struct {
	Domain  string // policy domain, lower-case A-labels
	ID      string // the TXT record id it was fetched for
	Policy  *Policy
	Fetched time.Time
	Expires time.Time // Fetched + max_age (RFC 8461 §3.2)
	// Identity is the policy as TLS reports name it (RFC 8460 §4.4).
	Identity *policy.Identity
}

func newCachedPolicy(domain, id string, p *Policy, fetched, expires time.Time) *CachedPolicy {
	return &CachedPolicy{Domain: domain, ID: id, Policy: p, Fetched: fetched, Expires: expires,
		Identity: policy.NewIdentity(policy.TypeSTS, domain, p.Lines(), p.MX)}
}

// Expired reports whether the policy may no longer be applied at now.
func (c *CachedPolicy) Expired(now time.Time) bool { return !now.Before(c.Expires) }

type entry struct {
	policy *CachedPolicy
	// seq is the number of the fetch that brought policy; 0 for a policy
	// loaded from the database or primed.
	seq      uint64
	lastUsed time.Time // in memory only between fetches, to spare bbolt a write per delivery
	// txt and rec are the last TXT record seen for the domain and its
	// parse, so that an unchanged record is not parsed on every delivery.
	txt string
	rec *Record
}

// failure is a domain's last failed fetch, remembered until a fetch begun
// after it succeeds.
type failure struct {
	id    string
	at    time.Time
	until time.Time // no fetch of id before then (RFC 8461 §3.3)
	err   error
	seq   uint64        // the number of the failed fetch
	elem  *list.Element // in Manager.failOrder
}

// fetchKey names a fetch under way: deliveries share a fetch only when
// they saw the same policy id.
type fetchKey struct{ domain, id string }

// fetching is what the Manager keeps of a domain's fetches under way, from
// the first one's start to the last one's end.
type fetching struct {
	n int // fetches of the domain under way
	// floor is the last fetch that forgetting the domain's entry left
	// behind: a purge leaves every fetch under way, the drop of an expired
	// policy the fetches begun before the one that brought it. A fetch
	// numbered up to floor serves the callers that joined it, and is
	// neither cached, nor remembered as failed, nor joined any more.
	floor uint64
}

type call struct {
	// seq numbers the fetch in the order fetches began, so that the
	// cache keeps the policy of the fetch begun last.
	seq     uint64
	started time.Time // wall clock, for FetchWait
	done    chan struct{}
	policy  *CachedPolicy
	err     error
	stored  chan struct{} // closed when the write of the entry ended
}

// Manager discovers, fetches, caches and refreshes MTA-STS policies, and
// decides per MX host what delivery needs (it is a policy.PolicySource).
// It is safe for concurrent use.
type Manager struct {
	resolver         *resolve.Resolver
	db               *bbolt.DB
	update           func(fn func(tx *bbolt.Tx) error) error // writes to db
	http             *http.Client
	fetchTimeout     time.Duration
	fetchWait        time.Duration
	matchCNAMETarget bool
	recorder         policy.Recorder
	log              *slog.Logger
	now              func() time.Time
	refreshInterval  time.Duration
	// skipped are the stored policies New could not read; Run logs them.
	skipped []error

	mu       sync.Mutex
	entries  map[string]*entry   // the cache, mirrored in db
	failures map[string]failure  // by domain: the last failed fetch, until one begun after it succeeds
	inflight map[fetchKey]*call  // by domain and policy id: the fetch under way
	fetching map[string]fetching // by domain, while it has fetches under way
	fetches  uint64              // fetches begun; the last one's seq
	writes   map[string]*call    // by domain: the latest write of its entry under way (a fetch's or a deletion)
	writing  int                 // cache writes under way (see WaitWrites)
	written  sync.Cond           // on mu: a write ended
	// failOrder holds the domains in failures, the least recently failed
	// first, so that the oldest is forgotten beyond maxFailures.
	failOrder   *list.List
	maxFailures int
}

// New returns a Manager and loads the persisted cache from opts.DB; Run
// logs the stored policies that could not be read.
func New(opts Options) (*Manager, error) {
	if opts.Resolver == nil {
		return nil, errors.New("sts: Options.Resolver is required")
	}
	m := &Manager{
		resolver:         opts.Resolver,
		db:               opts.DB,
		update:           opts.Update,
		fetchTimeout:     opts.FetchTimeout,
		fetchWait:        opts.FetchWait,
		matchCNAMETarget: opts.MatchCNAMETarget,
		recorder:         opts.Recorder,
		log:              opts.Logger,
		now:              opts.Now,
		refreshInterval:  opts.RefreshInterval,
		entries:          make(map[string]*entry),
		failures:         make(map[string]failure),
		failOrder:        list.New(),
		maxFailures:      defaultMaxFailures,
		inflight:         make(map[fetchKey]*call),
		fetching:         make(map[string]fetching),
		writes:           make(map[string]*call),
	}
	if m.fetchTimeout <= 0 {
		m.fetchTimeout = DefaultFetchTimeout
	}
	m.fetchTimeout = min(m.fetchTimeout, MaxFetchTimeout)
	if m.fetchWait <= 0 {
		m.fetchWait = DefaultFetchWait
	}
	if m.log == nil {
		m.log = slog.Default()
	}
	if m.now == nil {
		m.now = time.Now
	}
	if m.refreshInterval <= 0 {
		m.refreshInterval = defaultRefreshInterval
	}
	m.http = newHTTPClient(&opts, m.fetchTimeout)
	m.written.L = &m.mu
	if m.db != nil && m.update == nil {
		m.update = m.db.Batch
	}
	if m.db != nil {
		entries, bad, err := loadAll(m.db)
		if err != nil {
			return nil, fmt.Errorf("sts: loading cached policies: %w", err)
		}
		m.entries, m.skipped = entries, bad
	}
	return m, nil
}

// policyDomain returns the policy domain for a next-hop domain: the domain
// itself, never a parent (RFC 8461 §3.4), as lower-case A-labels. Address
// literals have no policy domain.
func policyDomain(domain string) (string, error) {
	d := strings.TrimSuffix(domain, ".")
	if strings.HasPrefix(d, "[") {
		return "", ErrAddressLiteral
	}
	if mayBeAddr(d) {
		if _, err := netip.ParseAddr(d); err == nil {
			return "", ErrAddressLiteral
		}
	}
	n, err := normalizeHost(d)
	if err != nil {
		return "", fmt.Errorf("domain %q: %w", truncate(domain), err)
	}
	return n, nil
}

// mayBeAddr reports whether s could parse as an IP address: an IPv6
// address has a colon, an IPv4 one only digits and dots. It spares a domain
// name the error value netip.ParseAddr makes for it.
func mayBeAddr(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c == ':' {
			return true
		} else if c != '.' && (c < '0' || c > '9') {
			return false
		}
	}
	return true
}

// noPolicy wraps cause in ErrNoPolicy, as fmt.Errorf("%w: %w") would, but
// makes its text only when read: delivery to a domain without MTA-STS asks
// for it on every attempt and only tests it with errors.Is.
func noPolicy(cause error) error { return &noPolicyError{cause} }

type noPolicyError struct{ cause error }

func (e *noPolicyError) Error() string        { return ErrNoPolicy.Error() + ": " + e.cause.Error() }
func (e *noPolicyError) Is(target error) bool { return target == ErrNoPolicy }
func (e *noPolicyError) Unwrap() error        { return e.cause }

// Policy returns the policy in force for domain. When none applies it
// returns an error wrapping ErrNoPolicy and the reason; the caller then
// delivers as if the domain did not use MTA-STS (RFC 8461 §5.1). A policy of
// mode none is returned as such. Only a cancelled ctx gives other errors.
//
// Every call looks up the TXT record (answered from the resolver's cache
// within its TTL), so a new policy id is noticed on the next attempt; a
// cached policy with the current id costs a map lookup.
func (m *Manager) Policy(ctx context.Context, domain string) (*CachedPolicy, error) {
	return m.policy(ctx, domain, 0)
}

// policy is Policy; a wait above 0 bounds how long a fetch is waited
// for, after which ErrFetchPending is returned if no cached policy applies.
func (m *Manager) policy(ctx context.Context, domain string, wait time.Duration) (*CachedPolicy, error) {
	d, err := policyDomain(domain)
	if err != nil {
		return nil, noPolicy(err)
	}
	txt, lerr := lookupRecordText(ctx, m.resolver, d)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	now := m.now()
	m.mu.Lock()
	var cached *CachedPolicy
	var rec *Record
	e := m.entries[d]
	if e != nil {
		e.lastUsed = now
		if !e.policy.Expired(now) {
			cached = e.policy
		}
		if lerr == nil && e.rec != nil && e.txt == txt {
			rec = e.rec
		}
	}
	m.mu.Unlock()
	if lerr == nil && rec == nil {
		rec, lerr = ParseRecord(txt)
		if lerr == nil && e != nil {
			m.mu.Lock()
			e.txt, e.rec = txt, rec
			m.mu.Unlock()
		}
	}

	if lerr != nil {
		// RFC 8461 §5.1: a missing, invalid or unreachable TXT record
		// does not end an unexpired cached policy; the policy is valid
		// for max_age whatever DNS says meanwhile.
		if cached != nil {
			cacheHits.Inc()
			return cached, nil
		}
		cacheMisses.Inc()
		if !isRecordError(lerr) {
			m.log.Info("sts: TXT lookup failed, no cached policy", "domain", d, "err", lerr)
		}
		return nil, noPolicy(lerr)
	}
	// RFC 8461 §3.3: a cached policy whose id matches the TXT record is
	// current; no fetch.
	if cached != nil && cached.ID == rec.ID {
		cacheHits.Inc()
		return cached, nil
	}
	// RFC 8461 §3.3, §5.1: a different id (or no unexpired policy) means
	// fetch the policy.
	cacheMisses.Inc()
	p, ferr := m.refresh(ctx, d, rec.ID, false, wait)
	if ferr == nil {
		return p, nil
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// RFC 8461 §5.1: if the new policy cannot be fetched, the cached one
	// stays in force until it expires.
	if cached != nil {
		if fe := (*FetchError)(nil); errors.As(ferr, &fe) { // said once per failed fetch, not per delivery
			m.log.Warn("sts: policy fetch failed; applying the cached policy", "domain", d,
				"cached_id", cached.ID, "new_id", rec.ID, "expires", cached.Expires, "err", ferr)
		}
		return cached, nil
	}
	if errors.Is(ferr, ErrFetchPending) {
		// Not "no policy": the first fetch of this id may yet bring the
		// policy, and going ahead now could be the downgrade it exists
		// to prevent.
		return nil, ferr
	}
	return nil, noPolicy(ferr)
}

// refresh fetches the policy of domain for TXT id and stores it. Callers
// that arrive while a fetch of the same domain and id runs share its
// result; a caller with another id starts a fetch of its own. Of fetches
// that overlap, the cache keeps the policy of the one begun last. Unless
// force is set, a failed fetch of the same id is not repeated for
// FetchBackoff (RFC 8461 §3.3). A wait above 0 and below the fetch timeout
// ends the wait once the fetch has run that long, with ErrFetchPending if
// no fetch of id has failed before; the fetch goes on for later callers.
func (m *Manager) refresh(ctx context.Context, domain, id string, force bool, wait time.Duration) (*CachedPolicy, error) {
	m.mu.Lock()
	last, failed := m.failures[domain]
	key := fetchKey{domain, id}
	c, running := m.inflight[key]
	if running && c.seq <= m.fetching[domain].floor {
		// The domain was purged since this fetch began (or its
		// policy dropped, fetched after it began): the fetch serves
		// only the callers that joined it, and this one fetches the
		// policy afresh.
		running = false
	}
	if !running {
		if failed && !force && last.id == id && m.now().Before(last.until) {
			m.mu.Unlock()
			return nil, fmt.Errorf("%w (until %s): %w", ErrFetchBackoff, last.until.UTC().Format(time.TimeOnly), last.err)
		}
		// RFC 8461 §3.3: a new id means fetch the policy anew. A fetch
		// for another id may be running: it began before this id was
		// seen, and may bring the policy this id replaces.
		m.fetches++
		c = &call{seq: m.fetches, started: time.Now(), done: make(chan struct{})}
		m.inflight[key] = c
		f := m.fetching[domain]
		f.n++
		m.fetching[domain] = f
		// The fetch outlives a cancelled caller, since others may be
		// waiting for it; FetchTimeout bounds it.
		go m.fetchAndStore(context.WithoutCancel(ctx), domain, id, c)
	}
	m.mu.Unlock()
	var waited <-chan time.Time
	if wait > 0 && wait < m.fetchTimeout {
		t := time.NewTimer(time.Until(c.started.Add(wait)))
		defer t.Stop()
		waited = t.C
	}
	select {
	case <-c.done:
		return c.policy, c.err
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-waited:
	}
	slow := fmt.Sprintf("mta-sts.%s has not answered in %s", domain, wait)
	if !failed {
		return nil, fmt.Errorf("%w: %s", ErrFetchPending, slow)
	}
	lastErr := fmt.Sprintf("the fetch of policy id %s failed at %s: %v", last.id, last.at.UTC().Format(time.RFC3339), last.err)
	if last.id != id {
		return nil, fmt.Errorf("%w: %s; %s", ErrFetchPending, slow, lastErr)
	}
	// RFC 8461 §5.1: with no policy fetched and none cached, deliver as
	// without MTA-STS. Deferring is for an id's first fetch, whose policy
	// may arrive a second later; after a failure it would defer every
	// retry of a dead policy host until the message expired.
	return nil, fmt.Errorf("%w: %s; %s", errRefetchPending, slow, lastErr)
}

// errRefetchPending means a fetch of a policy that failed before is slow
// again; the caller goes on without the policy meanwhile.
var errRefetchPending = errors.New("policy fetch failed before and is being tried again")

// failedLocked remembers domain's failed fetch f until a fetch succeeds;
// beyond maxFailures domains, the oldest is forgotten.
func (m *Manager) failedLocked(domain string, f failure) {
	if old, ok := m.failures[domain]; ok {
		f.elem = old.elem
		m.failOrder.MoveToBack(f.elem)
	} else {
		f.elem = m.failOrder.PushBack(domain)
		if m.failOrder.Len() > m.maxFailures {
			oldest := m.failOrder.Remove(m.failOrder.Front()).(string)
			delete(m.failures, oldest)
		}
	}
	m.failures[domain] = f
}

// laterOutcomeLocked reports whether a fetch of domain begun after fetch
// seq has ended already, with a policy or a failure.
func (m *Manager) laterOutcomeLocked(domain string, seq uint64) bool {
	if e := m.entries[domain]; e != nil && e.seq > seq {
		return true
	}
	f, ok := m.failures[domain]
	return ok && f.seq > seq
}

// forgetFailureLocked forgets domain's failed fetch, if any.
func (m *Manager) forgetFailureLocked(domain string) {
	if f, ok := m.failures[domain]; ok {
		m.failOrder.Remove(f.elem)
		delete(m.failures, domain)
	}
}

// endFetchLocked ends fetch c of domain for id and reports whether
// forgetting the domain's entry left it behind (fetching.floor): then what
// it brings serves its callers only.
func (m *Manager) endFetchLocked(domain, id string, c *call) (forgotten bool) {
	if key := (fetchKey{domain, id}); m.inflight[key] == c {
		delete(m.inflight, key)
	}
	f := m.fetching[domain]
	forgotten = c.seq <= f.floor
	if f.n--; f.n == 0 {
		delete(m.fetching, domain) // and its floor: every fetch after this one is numbered above it
	} else {
		m.fetching[domain] = f
	}
	return forgotten
}

// leaveBehindLocked makes the fetches of domain under way numbered up to
// seq serve their callers only (fetching.floor).
func (m *Manager) leaveBehindLocked(domain string, seq uint64) {
	if f, ok := m.fetching[domain]; ok && seq > f.floor {
		f.floor = seq
		m.fetching[domain] = f
	}
}

func (m *Manager) fetchAndStore(ctx context.Context, domain, id string, c *call) {
	start := m.now()
	ctx, cancel := context.WithTimeout(ctx, m.fetchTimeout)
	p, err := m.fetch(ctx, domain)
	cancel()
	now := m.now()
	if err != nil {
		fe := &FetchError{Domain: domain, ResultType: classify(err), Err: err}
		policyFetches.WithLabelValues(string(fe.ResultType)).Inc()
		m.log.Warn("sts: policy fetch failed", "domain", domain, "id", id,
			"result", fe.ResultType, "err", err, "duration", now.Sub(start))
		// RFC 8460 §4.3.2 / RFC 8461 §6: a policy that could not be
		// fetched is reported, with no MX host.
		if m.recorder != nil {
			m.recorder.Record(policy.SessionResult{
				Time: now, PolicyDomain: domain, Policy: policy.NewIdentity(policy.TypeSTS, domain, nil, nil),
				Result: fe.ResultType, Detail: oneLine(err.Error()),
			})
		}
		m.mu.Lock()
		// The outcome of a fetch begun later, for another id, is the
		// one that counts; nor is this one's if a purge forgot it.
		if forgotten := m.endFetchLocked(domain, id, c); !forgotten && !m.laterOutcomeLocked(domain, c.seq) {
			m.failedLocked(domain, failure{id: id, at: now, until: now.Add(FetchBackoff), err: err, seq: c.seq})
		}
		m.mu.Unlock()
		c.err = fe
		close(c.done)
		return
	}
	policyFetches.WithLabelValues("ok").Inc()
	cp := newCachedPolicy(domain, id, p, now, now.Add(p.MaxAge))
	m.log.Info("sts: policy fetched", "domain", domain, "id", id, "mode", p.Mode,
		"max_age", p.MaxAge, "duration", now.Sub(start))
	m.mu.Lock()
	forgotten := m.endFetchLocked(domain, id, c)
	c.policy = cp
	if forgotten {
		// The domain's entry was purged, or dropped expired with a
		// policy fetched after this one began, while this fetch ran:
		// caching its policy would bring back what was forgotten.
		m.mu.Unlock()
		m.log.Info("sts: policy fetched before the domain's cache entry was forgotten not cached", "domain", domain, "id", id)
		close(c.done)
		return
	}
	if e := m.entries[domain]; e != nil && e.seq > c.seq {
		// A fetch begun later, for another id, has cached its policy:
		// this one serves the deliveries that waited for it and is
		// dropped, in memory and on disk.
		cachedID := e.policy.ID
		m.mu.Unlock()
		m.log.Info("sts: policy fetched for an older id not cached", "domain", domain, "id", id, "cached_id", cachedID)
		close(c.done)
		return
	}
	// RFC 8461 §5.1: the new policy (mode none included) replaces the
	// old one. Deliveries go on with it from memory while it is written.
	// The domain was last used when a delivery last asked (policy sets
	// it before any fetch it starts), not now: a background refresh is
	// no use, or an idle domain would be refreshed every day for ever
	// and never leave the cache.
	lastUsed := now
	if e := m.entries[domain]; e != nil {
		lastUsed = e.lastUsed
	}
	m.entries[domain] = &entry{policy: cp, seq: c.seq, lastUsed: lastUsed}
	if f, ok := m.failures[domain]; ok && f.seq < c.seq {
		m.forgetFailureLocked(domain)
	}
	prev := m.beginWriteLocked(domain, c)
	m.mu.Unlock()
	close(c.done)
	if m.db != nil {
		if prev != nil {
			// A new id can start the next fetch while this domain's last
			// policy is still being written: the writes land in the order
			// of the fetches.
			<-prev.stored
		}
		// A failed write keeps the policy in memory.
		if err := storePolicy(m.update, cp, lastUsed); err != nil {
			m.log.Error("sts: storing policy", "domain", domain, "err", err)
		}
	}
	m.endWrite(domain, c)
}

// beginWriteLocked makes c the latest write of domain's cache entry and
// returns the one before it, still under way or nil. Each write waits for
// the one before, so a domain's writes reach the disk in the order its
// entry changed in memory.
func (m *Manager) beginWriteLocked(domain string, c *call) (prev *call) {
	c.stored = make(chan struct{})
	prev = m.writes[domain]
	m.writes[domain] = c
	m.writing++
	return prev
}

// endWrite ends c, a write of domain's entry begun by beginWriteLocked.
func (m *Manager) endWrite(domain string, c *call) {
	m.mu.Lock()
	if m.writes[domain] == c {
		delete(m.writes, domain)
	}
	m.writing--
	close(c.stored)
	m.written.Broadcast() // WaitWrites, and forget waiting for this domain
	m.mu.Unlock()
}

// WaitWrites returns once the cache writes under way have ended. A fetched
// policy is written after the deliveries waiting for it went on; the
// daemon calls this before it closes the database.
func (m *Manager) WaitWrites() {
	m.mu.Lock()
	for m.writing > 0 {
		m.written.Wait()
	}
	m.mu.Unlock()
}

// Refresh looks up the TXT record and fetches the policy now, ignoring the
// cache and the fetch backoff (the admin "refresh" command).
func (m *Manager) Refresh(ctx context.Context, domain string) (*CachedPolicy, error) {
	d, err := policyDomain(domain)
	if err != nil {
		return nil, err
	}
	rec, _, err := LookupRecord(ctx, m.resolver, d)
	if err != nil {
		return nil, err
	}
	return m.refresh(ctx, d, rec.ID, true, 0)
}

// Cached returns the cached policy of domain, expired or not, or
// ErrNotCached.
func (m *Manager) Cached(domain string) (*CachedPolicy, error) {
	d, err := policyDomain(domain)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if e := m.entries[d]; e != nil {
		return e.policy, nil
	}
	return nil, ErrNotCached
}

// List returns every cached policy, sorted by domain.
func (m *Manager) List() []*CachedPolicy {
	m.mu.Lock()
	list := make([]*CachedPolicy, 0, len(m.entries))
	for _, e := range m.entries {
		list = append(list, e.policy)
	}
	m.mu.Unlock()
	sort.Slice(list, func(i, j int) bool { return list[i].Domain < list[j].Domain })
	return list
}

// Purge forgets the cached policy of domain, in memory and on disk, its
// last failed fetch, and its fetches under way: they serve the deliveries
// that waited for them, but their policy is not cached nor their failure
// remembered. The next delivery discovers the policy afresh.
func (m *Manager) Purge(domain string) error {
	d, err := policyDomain(domain)
	if err != nil {
		return err
	}
	ok, err := m.forget(d, nil)
	if err != nil {
		return fmt.Errorf("sts: purging %s: %w", d, err)
	}
	if !ok {
		return ErrNotCached
	}
	return nil
}

// forget drops the cached policy of d, in memory and in the database, and
// reports whether there was one. With only nil (a purge), it also forgets
// d's last failed fetch and leaves behind d's fetches under way. With only
// set, it drops d's policy only if that entry is still the one cached: a
// fetch may have replaced it since the caller chose it. A write of d's
// policy under way ends first, or the deletion could reach the disk
// before it and the policy come back at the next start; a write begun
// after the deletion waits for it.
func (m *Manager) forget(d string, only *entry) (bool, error) {
	m.mu.Lock()
	for m.writes[d] != nil {
		m.written.Wait()
	}
	e, ok := m.entries[d]
	if only != nil && e != only {
		m.mu.Unlock()
		return false, nil
	}
	delete(m.entries, d)
	if only == nil {
		m.forgetFailureLocked(d)
		m.leaveBehindLocked(d, m.fetches)
	} else {
		// The entry said that the fetches begun before its own were
		// superseded; they still are.
		m.leaveBehindLocked(d, only.seq)
	}
	if m.db == nil {
		m.mu.Unlock()
		return ok, nil
	}
	c := new(call)
	m.beginWriteLocked(d, c) // nothing before it: the loop above waited
	m.mu.Unlock()
	err := deletePolicy(m.update, d)
	m.endWrite(d, c)
	return ok, err
}

// Run refreshes policies in the background until ctx is done: a policy of a
// domain that had mail in the last 7 days is fetched again when it is a day
// old (or half its max_age, if shorter), so it never expires while in use
// (RFC 8461 §10.2). Expired policies of idle domains are dropped.
func (m *Manager) Run(ctx context.Context) {
	// Said here rather than in New, which runs while the daemon may still
	// fail to start: a failed start says one line and nothing before it
	// (docs/DESIGN.md, "Start-up").
	for _, err := range m.skipped {
		m.log.Warn("sts: skipping stored policy", "err", err)
	}
	t := time.NewTicker(m.refreshInterval)
	defer t.Stop()
	for {
		m.refreshDue(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// refreshDue is one pass of Run.
func (m *Manager) refreshDue(ctx context.Context) {
	now := m.now()
	var due []string
	drop := make(map[string]*entry)
	m.mu.Lock()
	for d, e := range m.entries {
		active := now.Sub(e.lastUsed) < activeWindow
		switch {
		case active && now.Sub(e.policy.Fetched) >= min(refreshAge, e.policy.Policy.MaxAge/2):
			due = append(due, d)
		case !active && e.policy.Expired(now):
			drop[d] = e
		}
	}
	m.mu.Unlock()
	for d, e := range drop {
		// Only the entry chosen: a delivery may have fetched a fresh
		// policy since.
		if _, err := m.forget(d, e); err != nil {
			m.log.Error("sts: dropping expired policy", "domain", d, "err", err)
		}
	}
	for _, d := range due {
		if ctx.Err() != nil {
			return
		}
		rec, _, err := LookupRecord(ctx, m.resolver, d)
		if err != nil {
			// No usable record: the cached policy runs out on its own
			// (RFC 8461 §5.1); nothing to fetch.
			m.log.Info("sts: not refreshing policy", "domain", d, "err", err)
			continue
		}
		if _, err := m.refresh(ctx, d, rec.ID, false, 0); err != nil {
			m.log.Info("sts: background refresh failed", "domain", d, "err", err)
		}
	}
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}
