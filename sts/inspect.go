package sts

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Inspection is what MTA-STS discovery finds for a domain now, for
// "stsrelay check": the data, not its presentation.
type Inspection struct {
	Domain    string
	Discovery *Discovery // nil when DNS failed
	Record    *Record
	// RecordErr wraps ErrNoRecord when the domain does not publish
	// MTA-STS; then nothing else is looked at.
	RecordErr error
	// Applied is the policy delivery applies now, as Requirements would
	// see it: fetched, or cached when a fetch fails (RFC 8461 §5.1).
	Applied *CachedPolicy
	// FetchErr is the last failed fetch of the policy, if any.
	FetchErr error
}

// Published reports whether the domain publishes a _mta-sts record, valid
// or not: only then are MTA-STS problems the domain owner's to fix.
func (i *Inspection) Published() bool {
	return i.Discovery != nil && len(i.Discovery.STS) > 0
}

// Inspect looks up the TXT record of domain and the policy in force, with
// the same cache and fetch logic as delivery. Failures are part of the
// result, not errors.
func (m *Manager) Inspect(ctx context.Context, domain string) *Inspection {
	i := &Inspection{Domain: domain}
	d, err := policyDomain(domain)
	if err != nil {
		i.RecordErr = err
		return i
	}
	i.Domain = d
	i.Record, i.Discovery, i.RecordErr = LookupRecord(ctx, m.resolver, d)
	if cp, err := m.Policy(ctx, d); err == nil {
		i.Applied = cp
	}
	m.mu.Lock()
	if f, ok := m.failures[d]; ok {
		i.FetchErr = &FetchError{Domain: d, ResultType: classify(f.err), Err: f.err}
	}
	m.mu.Unlock()
	return i
}

// Prime puts a policy that another process cached (for check, the running
// relay's) into this Manager's cache, in memory only, so that decisions
// here follow the cache the relay delivers with.
func (m *Manager) Prime(domain, id, text string, fetched, expires time.Time) error {
	d, err := policyDomain(domain)
	if err != nil {
		return err
	}
	p, err := Parse([]byte(text))
	if err != nil {
		return fmt.Errorf("cached MTA-STS policy of %s: %w", d, err)
	}
	if !expires.After(fetched) {
		return errors.New("cached MTA-STS policy of " + d + ": expires before it was fetched")
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	m.entries[d] = &entry{policy: newCachedPolicy(d, id, p, fetched, expires), lastUsed: m.now()}
	return nil
}
