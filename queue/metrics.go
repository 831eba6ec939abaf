package queue

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promauto"
)

var (
	metricRecipients = promauto.NewGaugeVec(prometheus.GaugeOpts{
		Name: "stsrelay_queue_recipients",
		Help: "Recipients waiting in the queue, by state (queued, deferred, held).",
	}, []string{"state"})
	metricMessages = promauto.NewGauge(prometheus.GaugeOpts{
		Name: "stsrelay_queue_messages",
		Help: "Messages in the queue with at least one recipient not yet delivered or failed.",
	})
	metricOldest = promauto.NewGauge(prometheus.GaugeOpts{
		Name: "stsrelay_queue_oldest_message_age_seconds",
		Help: "Age of the oldest message in the queue; 0 when the queue is empty.",
	})
	metricEnqueued = promauto.NewCounter(prometheus.CounterOpts{
		Name: "stsrelay_queue_enqueued_total",
		Help: "Messages committed to the queue, DSNs included.",
	})
	metricDeliveries = promauto.NewCounterVec(prometheus.CounterOpts{
		Name: "stsrelay_queue_deliveries_total",
		Help: "Delivery attempt outcomes per recipient: delivered, deferred, failed, expired.",
	}, []string{"outcome"})
	metricCommits = promauto.NewCounter(prometheus.CounterOpts{
		Name: "stsrelay_queue_commits_total",
		Help: "Group commits (each one synced to disk) of the queue database.",
	})
)

// updateGauges recomputes the gauges from the in-memory index.
func (q *Queue) updateGauges() {
	q.mu.Lock()
	var counts [3]int
	oldest := q.opts.Now()
	for _, e := range q.index {
		for i, n := range e.counts {
			counts[i] += int(n)
		}
		if e.arrived.Before(oldest) {
			oldest = e.arrived
		}
	}
	n := len(q.index)
	q.mu.Unlock()
	metricRecipients.WithLabelValues(string(StateQueued)).Set(float64(counts[0]))
	metricRecipients.WithLabelValues(string(StateDeferred)).Set(float64(counts[1]))
	metricRecipients.WithLabelValues(string(StateHeld)).Set(float64(counts[2]))
	metricMessages.Set(float64(n))
	metricOldest.Set(q.opts.Now().Sub(oldest).Seconds())
}
