package delivery

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

var (
	metricAttempts = promauto.NewCounter(prometheus.CounterOpts{
		Name: "stsrelay_delivery_attempts_total",
		Help: "Delivery attempts (one per job: one message to one domain).",
	})
	metricRecipients = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "stsrelay_delivery_recipients_total",
		Help: "Recipient outcomes of delivery attempts, by outcome (delivered, deferred, failed) and the policy that applied (\"may\", \"mta-sts/verify\", \"mta-sts/verify/testing\", \"local/encrypt\", …).",
	}, []string{"outcome", "policy"})
	metricSessions = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "stsrelay_delivery_sessions_total",
		Help: "SMTP sessions opened to MX hosts, by whether TLS was used.",
	}, []string{"tls"})
	metricTLSResumed = promauto.NewCounter(prometheus.CounterOpts{
		Name: "stsrelay_delivery_tls_resumed_total",
		Help: "SMTP sessions to MX hosts whose TLS handshake resumed an earlier session (abbreviated handshake; the certificate was checked again); of stsrelay_delivery_sessions_total{tls=\"yes\"}.",
	})
	metricDANESessions = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "stsrelay_delivery_dane_sessions_total",
		Help: "Session attempts with MX hosts whose TLSA records decide, by DANE outcome: authenticated, encrypted (no usable TLSA record: TLS without authentication), or the RFC 8460 result type of the failure (certificate-not-trusted, starttls-not-supported, dnssec-invalid, tlsa-invalid, dane-required, …).",
	}, []string{"outcome"})
	metricHostFailures = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "stsrelay_delivery_host_failures_total",
		Help: "Connections to MX hosts that could not be used, by reason class.",
	}, []string{"reason"})
	metricConnsActive = promauto.NewGauge(prometheus.GaugeOpts{
		Name: "stsrelay_delivery_connections_active",
		Help: "Open SMTP connections to MX hosts, busy or idle, over all domains.",
	})
	metricDomainConns = promauto.NewGaugeVec(prometheus.GaugeOpts{
		Name: "stsrelay_delivery_domain_connections_active",
		Help: "Open SMTP connections per destination domain (or route nexthop); a destination appears only while it has some.",
	}, []string{"domain"})
	metricThrottled = promauto.NewCounter(prometheus.CounterOpts{
		Name: "stsrelay_delivery_throttled_total",
		Help: "Times a destination said it has too many connections from us (a 421 greeting) and its concurrency was lowered.",
	})
	metricSessionDuration = promauto.NewHistogram(prometheus.HistogramOpts{
		Name:    "stsrelay_delivery_session_duration_seconds",
		Help:    "Lifetime of SMTP connections to MX hosts, from connect to close.",
		Buckets: []float64{0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900},
	})
)

// domainConns counts open connections per domain for metricDomainConns. A
// domain's series is deleted when its count drops to zero, so the series
// are as few as the domains being delivered to at the moment.
var domainConns = struct {
	sync.Mutex
	n map[string]int
}{n: make(map[string]int)}

func connOpened(domain string) {
	metricConnsActive.Inc()
	domainConns.Lock()
	defer domainConns.Unlock()
	domainConns.n[domain]++
	metricDomainConns.WithLabelValues(domain).Set(float64(domainConns.n[domain]))
}

func connClosed(domain string) {
	metricConnsActive.Dec()
	domainConns.Lock()
	defer domainConns.Unlock()
	domainConns.n[domain]--
	if n := domainConns.n[domain]; n > 0 {
		metricDomainConns.WithLabelValues(domain).Set(float64(n))
		return
	}
	delete(domainConns.n, domain)
	metricDomainConns.DeleteLabelValues(domain)
}
