package tlsrpt

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.etcd.io/bbolt"

	"github.com/stsrelay/stsrelay/policy"
)

func TestRecordNeverBlocksAndCountsWhatAFullBufferDrops(t *testing.T) {
	// A Reporter whose writer is stuck: nothing drains the buffer.
	r := &Reporter{opts: Options{Now: time.Now}, results: make(chan policy.SessionResult, 2)}
	before := testutil.ToFloat64(metricDropped)
	done := make(chan struct{})
	go func() {
		for range 5 {
			r.Record(result("example.net", nil, 1, policy.ResultSuccess, "mx.example.net", ""))
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Record blocked on a full buffer")
	}
	if d := testutil.ToFloat64(metricDropped) - before; d != 3 {
		t.Errorf("dropped %v, want 3", d)
	}
}

func TestCloseStoresWhatWasBufferedAndLaterResultsAreDropped(t *testing.T) {
	e := newEnv(t, nil)
	e.rep.Record(result("example.net", stsID, 1, policy.ResultSuccess, "mx1.example.net", ""))
	e.rep.Record(result("example.net", stsID, 2, policy.ResultCertificateExpired, "mx1.example.net", "certificate expired"))
	e.rep.Close()
	before := testutil.ToFloat64(metricDropped)
	e.rep.Record(result("example.net", stsID, 3, policy.ResultSuccess, "mx1.example.net", ""))
	if d := testutil.ToFloat64(metricDropped) - before; d != 1 {
		t.Errorf("a result after Close: dropped %v, want 1", d)
	}
	e.start()
	list, err := e.rep.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || len(list[0].Policies) != 1 {
		t.Fatalf("list after reopening: %+v", list)
	}
	p := list[0].Policies[0]
	if list[0].Day != "2026-03-01" || p.Type != "sts" || p.Successful != 1 || p.Failed != 1 || p.Failures["certificate-expired"] != 1 {
		t.Errorf("stored: %+v", list[0])
	}
}

func TestOldResultsAndReportsAreForgotten(t *testing.T) {
	e := newEnv(t, nil)
	e.rep.Record(result("example.net", nil, 1, policy.ResultSuccess, "mx.example.net", ""))
	e.send("2026-03-01", false) // no TLSRPT record: a no-record report entry
	e.clock.Advance(keepResults + 24*time.Hour)
	e.rep.runOnce(t.Context())
	list, _ := e.rep.List()
	if len(list) != 0 {
		t.Errorf("results kept past %v: %+v", keepResults, list)
	}
	e.clock.Advance(keepReports)
	e.rep.runOnce(t.Context())
	n := 0
	e.db.View(func(tx *bbolt.Tx) error { n = len(allReports(tx)); return nil })
	if n != 0 {
		t.Errorf("%d report records kept past %v", n, keepReports)
	}
}

// TestWritesGoThroughOptionsUpdate: the daemon hands tlsrpt the queue's
// group commit, so its writes share the queue's fsyncs.
func TestWritesGoThroughOptionsUpdate(t *testing.T) {
	var writes atomic.Int32
	e := newEnv(t, func(o *Options) {
		update := o.Update
		o.Update = func(fn func(*bbolt.Tx) error) error {
			writes.Add(1)
			return update(fn)
		}
	})
	e.rep.Record(result("example.net", stsID, 1, policy.ResultSuccess, "mx1.example.net", ""))
	e.rep.Flush()
	if n := writes.Load(); n != 1 {
		t.Fatalf("%d writes through Options.Update, want 1", n)
	}
	list, err := e.rep.List()
	if err != nil || len(list) != 1 || len(list[0].Policies) != 1 || list[0].Policies[0].Successful != 1 {
		t.Fatalf("stored: %+v, %v; want the one success", list, err)
	}
}
