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
	metricFirstFromMemory = promauto.NewCounter(prometheus.CounterOpts{
		Name: "stsrelay_queue_first_attempts_from_memory_total",
		Help: "Delivery attempts that took the message from memory right after its commit instead of reading the queue.",
	})
	metricCommits = promauto.NewCounter(prometheus.CounterOpts{
		Name: "stsrelay_queue_commits_total",
		Help: "Group commits (each one synced to disk) of the queue database.",
	})
)

// countLocked adds (sign 1) or removes (sign -1) e's recipients from
// the queue's totals and sets the gauges, so that they follow every
// commit at once. The caller holds q.mu.
func (q *Queue) countLocked(e *entry, sign int) {
	for i, n := range e.counts {
		q.totals[i] += sign * int(n)
	}
	metricRecipients.WithLabelValues(string(StateQueued)).Set(float64(q.totals[0]))
	metricRecipients.WithLabelValues(string(StateDeferred)).Set(float64(q.totals[1]))
	metricRecipients.WithLabelValues(string(StateHeld)).Set(float64(q.totals[2]))
	metricMessages.Set(float64(len(q.index)))
}

// updateGauges recomputes the gauges from the in-memory index: the age of
// the oldest message grows by itself, and changes when it leaves.
func (q *Queue) updateGauges() {
	q.mu.Lock()
	defer q.mu.Unlock()
	var oldest int64 // Unix nanoseconds; 0: none
	for _, e := range q.index {
		if e.arrived != 0 && (oldest == 0 || e.arrived < oldest) {
			oldest = e.arrived
		}
	}
	age := 0.0
	if oldest != 0 {
		age = max(q.opts.Now().Sub(fromUnixNano(oldest)).Seconds(), 0)
	}
	metricOldest.Set(age)
	metricMessages.Set(float64(len(q.index)))
	metricRecipients.WithLabelValues(string(StateQueued)).Set(float64(q.totals[0]))
	metricRecipients.WithLabelValues(string(StateDeferred)).Set(float64(q.totals[1]))
	metricRecipients.WithLabelValues(string(StateHeld)).Set(float64(q.totals[2]))
}
