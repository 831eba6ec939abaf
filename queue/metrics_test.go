package queue

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// value reads a counter or gauge (testutil would need another module).
func value(t *testing.T, m prometheus.Metric) float64 {
	t.Helper()
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		t.Fatal(err)
	}
	if d.Counter != nil {
		return d.Counter.GetValue()
	}
	return d.Gauge.GetValue()
}

func TestMetricsCountOutcomesAndQueueState(t *testing.T) {
	d := newScripted(func(job *Job) []Status {
		if job.Domain == "bad.test" {
			return []Status{fail550}
		}
		return []Status{defer451}
	})
	tq := newTestQueue(t, d, Options{})
	failed0 := value(t, metricDeliveries.WithLabelValues(outcomeFailed))
	deferred0 := value(t, metricDeliveries.WithLabelValues(outcomeDeferred))
	enq0 := value(t, metricEnqueued)
	tq.enqueue(t, env("alice@example.com", "x@bad.test", "y@slow.test"))
	tq.run(t)
	tq.waitJobs(t, 2)
	tq.settle(t)
	if got := value(t, metricDeliveries.WithLabelValues(outcomeFailed)) - failed0; got != 1 {
		t.Errorf("failed deliveries +%v, want +1", got)
	}
	if got := value(t, metricDeliveries.WithLabelValues(outcomeDeferred)) - deferred0; got < 1 {
		t.Errorf("deferred deliveries +%v, want at least +1", got)
	}
	if got := value(t, metricEnqueued) - enq0; got != 2 { // the message and its bounce
		t.Errorf("enqueued +%v, want +2", got)
	}
	tq.clock.Advance(time.Minute)
	tq.updateGauges()
	if got := value(t, metricMessages); got != 2 {
		t.Errorf("messages gauge %v, want 2", got)
	}
	// y is deferred; the bounce is queued or, once tried, deferred.
	waiting := value(t, metricRecipients.WithLabelValues("deferred")) + value(t, metricRecipients.WithLabelValues("queued"))
	if got := value(t, metricRecipients.WithLabelValues("deferred")); got < 1 || waiting != 2 {
		t.Errorf("deferred recipients gauge %v, deferred+queued %v; want y deferred and 2 waiting (y and the bounce)", got, waiting)
	}
	if got := value(t, metricOldest); got != 60 {
		t.Errorf("oldest message age %vs, want 60s", got)
	}
}
