package sts

import (
	"context"

	dto "github.com/prometheus/client_model/go"
)

// RefreshDue runs one pass of the background refresh, for tests.
func (m *Manager) RefreshDue(ctx context.Context) { m.refreshDue(ctx) }

// SetMaxFailures sets how many domains' failed fetches m remembers, for tests.
func (m *Manager) SetMaxFailures(n int) { m.maxFailures = n }

// Counters reads the package's metrics, for tests: fetches by result,
// cache lookups by result and decisions by mode.
func Counters(metric, label string) float64 {
	var m dto.Metric
	switch metric {
	case "fetches":
		policyFetches.WithLabelValues(label).Write(&m)
	case "cache":
		cacheLookups.WithLabelValues(label).Write(&m)
	case "deliveries":
		decisions.WithLabelValues(label).Write(&m)
	}
	return m.GetCounter().GetValue()
}

// DomainsFetching reports how many domains m keeps fetch records for, for
// tests: only those with a fetch under way.
func (m *Manager) DomainsFetching() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.fetching)
}
