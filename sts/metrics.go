package sts

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

var (
	policyFetches = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "stsrelay_sts_policy_fetches_total",
		Help: "MTA-STS policy fetches by result: ok, or an RFC 8460 result type.",
	}, []string{"result"})
	cacheLookups = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "stsrelay_sts_cache_lookups_total",
		Help: "MTA-STS policy lookups by whether the cache answered (hit) or not (miss).",
	}, []string{"result"})
	decisions = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "stsrelay_sts_deliveries_total",
		Help: "Delivery attempts by the MTA-STS mode that decided their requirements (enforce, testing, none, no-policy).",
	}, []string{"mode"})
)

// The labels counted on every delivery, resolved once.
var (
	cacheHits   = cacheLookups.WithLabelValues("hit")
	cacheMisses = cacheLookups.WithLabelValues("miss")
)
