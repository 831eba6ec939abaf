package tlsrpt

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

var (
	metricResults = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "stsrelay_tlsrpt_results_total",
		Help: "TLS session results recorded for reports, by RFC 8460 result type (\"success\" for a session that met its policy).",
	}, []string{"result"})
	metricSkipped = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "stsrelay_tlsrpt_results_skipped_total",
		Help: "Session results not counted in reports, by reason: unreported (one of our own reports, or a message with TLS-Required: No), local (a local policy decided).",
	}, []string{"reason"})
	metricDropped = promauto.NewCounter(prometheus.CounterOpts{
		Name: "stsrelay_tlsrpt_results_dropped_total",
		Help: "Session results lost because the recording buffer was full or the database refused them.",
	})
	metricReports = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "stsrelay_tlsrpt_reports_total",
		Help: "Reports by final state: sent (a rua accepted it), failed (given up after retries), no-record (the domain wants no reports).",
	}, []string{"state"})
	metricDeliveries = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "stsrelay_tlsrpt_report_deliveries_total",
		Help: "Attempts to hand a report to one rua, by method (mailto, https) and outcome (ok, error).",
	}, []string{"method", "outcome"})
)
