package tlsrpt

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/bbolt"

	"github.com/stsrelay/stsrelay/policy"
)

// The database is the queue's (queue.OpenDB); tlsrpt keeps two buckets:
//
//	tlsrpt.results  one bucket per UTC day ("2026-03-01"), key domain NUL
//	                policy-hash, value a JSON aggregate
//	tlsrpt.reports  key day NUL domain [NUL "partial-" unix], value a
//	                JSON storedReport: the report as sent, and its state
var (
	bucketResults = []byte("tlsrpt.results")
	bucketReports = []byte("tlsrpt.reports")
)

const dayFormat = "2006-01-02"

// Retention: results are kept while their reports may still be made and
// listed; report records a little longer, so `tlsrpt list` shows them.
const (
	keepResults = 8 * 24 * time.Hour
	keepReports = 15 * 24 * time.Hour
)

// Report states.
const (
	statePending  = "pending"   // made, not yet accepted by any rua
	stateSent     = "sent"      // a rua accepted it
	stateFailed   = "failed"    // given up (§5.5: 24 hours of retries)
	stateNoRecord = "no-record" // the domain publishes no usable TLSRPT record
)

// storedReport is one report and its delivery state.
type storedReport struct {
	Day      string    `json:"day"`
	Domain   string    `json:"domain"`
	Partial  bool      `json:"partial,omitempty"` // a running day's, sent on request
	ReportID string    `json:"report_id,omitempty"`
	UID      string    `json:"uid,omitempty"`
	Start    time.Time `json:"start"`
	End      time.Time `json:"end"`
	// Successful and Failed are the report's totals, for listings.
	Successful int64     `json:"successful"`
	Failed     int64     `json:"failed"`
	State      string    `json:"state"`
	RUA        []string  `json:"rua,omitempty"`
	Created    time.Time `json:"created"` // first attempt's clock: §5.5's 24 hours count from here
	Attempts   int       `json:"attempts,omitempty"`
	Next       time.Time `json:"next,omitempty"`
	Sent       time.Time `json:"sent,omitempty"`
	SentTo     []string  `json:"sent_to,omitempty"`
	LastError  string    `json:"last_error,omitempty"`
	// Body is the gzip-compressed JSON, kept so a retry sends the very
	// same report, report-id included.
	Body []byte `json:"body,omitempty"`
}

func (r *storedReport) key() []byte {
	k := r.Day + "\x00" + r.Domain
	if r.Partial {
		k += "\x00partial-" + strconv.FormatInt(r.End.Unix(), 10)
	}
	return []byte(k)
}

// policyKey names an aggregate within its day bucket.
func policyKey(r policy.SessionResult) []byte {
	h := "none"
	if r.Policy != nil && r.Policy.Type != policy.TypeNone {
		sum := sha256.Sum256([]byte(r.Policy.Key()))
		h = hex.EncodeToString(sum[:8])
	}
	return []byte(r.PolicyDomain + "\x00" + h)
}

// batch is results not yet stored: day → aggregate key → counts.
type batch map[string]map[string]*aggregate

func (b batch) add(day string, key []byte, a *aggregate) {
	m := b[day]
	if m == nil {
		m = make(map[string]*aggregate)
		b[day] = m
	}
	if old := m[string(key)]; old != nil {
		old.add(a)
		return
	}
	m[string(key)] = a
}

// update runs a write transaction: Options.Update.
type update = func(fn func(tx *bbolt.Tx) error) error

// storeBatch merges b into the stored aggregates in one transaction. It
// reads b and changes only tx, so it may run twice (Options.Update).
func storeBatch(update update, b batch) error {
	return update(func(tx *bbolt.Tx) error {
		root, err := tx.CreateBucketIfNotExists(bucketResults)
		if err != nil {
			return err
		}
		for day, aggs := range b {
			bk, err := root.CreateBucketIfNotExists([]byte(day))
			if err != nil {
				return err
			}
			for k, a := range aggs {
				if v := bk.Get([]byte(k)); v != nil {
					var old aggregate
					if json.Unmarshal(v, &old) == nil {
						old.add(a)
						a = &old
					}
				}
				v, err := json.Marshal(a)
				if err != nil {
					return err
				}
				if err := bk.Put([]byte(k), v); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// dayResults returns the aggregates of day by domain.
func dayResults(tx *bbolt.Tx, day string) map[string][]*aggregate {
	out := make(map[string][]*aggregate)
	root := tx.Bucket(bucketResults)
	if root == nil {
		return out
	}
	bk := root.Bucket([]byte(day))
	if bk == nil {
		return out
	}
	bk.ForEach(func(k, v []byte) error {
		var a aggregate
		if json.Unmarshal(v, &a) == nil && a.Domain != "" {
			out[a.Domain] = append(out[a.Domain], &a)
		}
		return nil
	})
	return out
}

// days lists the days that have results, oldest first.
func days(tx *bbolt.Tx) []string {
	var out []string
	if root := tx.Bucket(bucketResults); root != nil {
		root.ForEach(func(k, v []byte) error {
			if v == nil { // a nested bucket
				out = append(out, string(k))
			}
			return nil
		})
	}
	return out
}

func getReport(tx *bbolt.Tx, key []byte) *storedReport {
	b := tx.Bucket(bucketReports)
	if b == nil {
		return nil
	}
	v := b.Get(key)
	if v == nil {
		return nil
	}
	var r storedReport
	if json.Unmarshal(v, &r) != nil {
		return nil
	}
	return &r
}

func putReport(update update, r *storedReport) error {
	v, err := json.Marshal(r)
	if err != nil {
		return err
	}
	return update(func(tx *bbolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketReports)
		if err != nil {
			return err
		}
		return b.Put(r.key(), v)
	})
}

// allReports returns every stored report, by key order (day, domain).
func allReports(tx *bbolt.Tx) []*storedReport {
	var out []*storedReport
	if b := tx.Bucket(bucketReports); b != nil {
		b.ForEach(func(k, v []byte) error {
			var r storedReport
			if json.Unmarshal(v, &r) == nil {
				out = append(out, &r)
			}
			return nil
		})
	}
	return out
}

// prune forgets results and reports past their retention.
func prune(update update, now time.Time) error {
	resultsBefore := now.UTC().Add(-keepResults).Format(dayFormat)
	reportsBefore := now.UTC().Add(-keepReports).Format(dayFormat)
	return update(func(tx *bbolt.Tx) error {
		for _, d := range days(tx) {
			if d < resultsBefore {
				if err := tx.Bucket(bucketResults).DeleteBucket([]byte(d)); err != nil {
					return err
				}
			}
		}
		b := tx.Bucket(bucketReports)
		if b == nil {
			return nil
		}
		var old [][]byte
		b.ForEach(func(k, _ []byte) error {
			day, _, _ := strings.Cut(string(k), "\x00")
			if day < reportsBefore {
				old = append(old, append([]byte(nil), k...))
			}
			return nil
		})
		for _, k := range old {
			if err := b.Delete(k); err != nil {
				return err
			}
		}
		return nil
	})
}
