package queue

import (
	"bytes"
	"slices"
	"sync"

	"go.etcd.io/bbolt"
)

// records reads and writes message records for the queue's own work,
// keeping the latest ones decoded. Decoding a record's JSON is the largest
// cost in the commit of a delivery's outcome (about 20 µs for five
// recipients), and the record an outcome reads is nearly always the one
// Enqueue or the previous outcome wrote moments before.
//
// An entry keeps the exact bytes it stands for, and get uses it only when
// the transaction holds those bytes: it cannot be stale, whatever wrote
// the record since, and whether or not the transaction that stored it
// committed.
type records struct {
	mu      sync.Mutex
	entries map[string]cachedRecord
	max     int
	misses  int // records decoded by get
}

type cachedRecord struct {
	raw []byte
	m   *message // what decodeMessage(raw) returns; never modified
}

// recordCacheMax bounds the entries: messages between their enqueue and
// their last outcome, about 2 KiB each with five recipients. A large
// backlog simply decodes, as before.
const recordCacheMax = 2048

func newRecords(max int) *records {
	return &records{entries: make(map[string]cachedRecord), max: max}
}

// get returns the record of id in tx, nil if there is none. The caller
// owns the result and may change it.
func (c *records) get(tx *bbolt.Tx, id string) (*message, error) {
	v := tx.Bucket(bucketMessages).Get([]byte(id))
	if v == nil {
		return nil, nil
	}
	c.mu.Lock()
	e, ok := c.entries[id]
	if !ok || !bytes.Equal(e.raw, v) {
		ok = false
		c.misses++
	}
	c.mu.Unlock()
	if ok {
		return e.m.clone(), nil
	}
	m, err := decodeRecord(id, v)
	if err != nil {
		return nil, err
	}
	// v belongs to tx; the entry needs bytes of its own.
	c.remember(id, bytes.Clone(v), m.clone())
	return m, nil
}

// put stores m in tx.
func (c *records) put(tx *bbolt.Tx, m *message) error {
	v, err := encodeMessage(m)
	if err != nil {
		return err
	}
	b := tx.Bucket(bucketMessages)
	b.FillPercent = 0.9 // ids grow with time: mostly appends, so pack pages
	if err := b.Put([]byte(m.ID), v); err != nil {
		return err
	}
	if bytes.Contains(v, []byte(`\ufffd`)) {
		// encoding/json replaced bytes that are not UTF-8 (a remote's
		// reply, say): what is read back differs from m.
		c.forget(m.ID)
		return nil
	}
	c.remember(m.ID, v, asStored(m))
	return nil
}

// save stores m in tx, or deletes its record when m is done: every
// recipient final and no notice owed.
func (c *records) save(tx *bbolt.Tx, m *message) error {
	if m.done() {
		return c.delete(tx, m.ID)
	}
	return c.put(tx, m)
}

// delete removes the record of id from tx; the caller removes its body
// once the commit is on disk.
func (c *records) delete(tx *bbolt.Tx, id string) error {
	c.forget(id)
	return tx.Bucket(bucketMessages).Delete([]byte(id))
}

func (c *records) remember(id string, raw []byte, m *message) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.entries[id]; !ok && len(c.entries) >= c.max {
		for k := range c.entries { // any one: Go's map order is random
			delete(c.entries, k)
			break
		}
	}
	c.entries[id] = cachedRecord{raw: raw, m: m}
}

func (c *records) forget(id string) {
	c.mu.Lock()
	delete(c.entries, id)
	c.mu.Unlock()
}

// clone copies m deeply enough to change its recipients' states. NOTIFY
// lists are shared: nothing changes them in place.
func (m *message) clone() *message {
	c := *m
	c.Recipients = slices.Clone(m.Recipients)
	return &c
}

// asStored returns a copy of m as decodeMessage reads it back from
// encodeMessage's bytes, given that every string is UTF-8: times in UTC to
// the nanosecond with no monotonic reading, an empty NOTIFY list as none,
// and no envelope recipients (the record's own recipients stand for them).
// TestAsStoredIsWhatTheRecordReadsBackAs holds it to the codec, field by field.
func asStored(m *message) *message {
	c := m.clone()
	c.Envelope.Recipients = nil
	c.Arrived = fromUnixNano(unixNano(c.Arrived))
	if c.Recipients == nil {
		c.Recipients = []recipient{}
	}
	for i := range c.Recipients {
		r := &c.Recipients[i]
		if len(r.Notify) == 0 {
			r.Notify = nil
		}
		r.NextAttempt = fromUnixNano(unixNano(r.NextAttempt))
		r.LastAttempt = fromUnixNano(unixNano(r.LastAttempt))
		r.ResumeAt = fromUnixNano(unixNano(r.ResumeAt))
	}
	return c
}
