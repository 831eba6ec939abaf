package queue

import (
	"errors"
	"math/rand/v2"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"go.etcd.io/bbolt"
)

// randomFill sets every field of v, recursively, to a random value of the
// kinds the record codec must survive: strings that are empty, UTF-8 or
// not, slices that are nil, empty or not, times that are zero, UTC or
// local with a monotonic reading. Going by reflection, it also fills a
// field added later, which the codec must then store.
func randomFill(rng *rand.Rand, v reflect.Value) {
	if v.Type() == reflect.TypeFor[time.Time]() {
		var t time.Time
		switch rng.IntN(4) {
		case 1:
			t = time.Unix(rng.Int64N(1<<33), rng.Int64N(1e9)).UTC()
		case 2:
			t = time.Now().Add(time.Duration(rng.Int64N(1 << 50))) // local, monotonic
		case 3:
			t = time.Unix(rng.Int64N(1<<33), 0).In(time.FixedZone("X", 3600))
		}
		v.Set(reflect.ValueOf(t))
		return
	}
	switch v.Kind() {
	case reflect.String:
		s := []string{"", "bob@example.org", "¿qué? ✉", "550 5.1.1 \"no\" <x>\t\\", "\ufffd", `\ufffd`}[rng.IntN(6)]
		if rng.IntN(50) == 0 {
			s = "\xff\xfe not UTF-8" // rare: records have dozens of strings
		}
		v.SetString(s)
	case reflect.Bool:
		v.SetBool(rng.IntN(2) == 1)
	case reflect.Int, reflect.Int64:
		v.SetInt(rng.Int64N(1<<40) - 1<<39)
	case reflect.Slice:
		switch n := rng.IntN(4); n {
		case 0:
			v.Set(reflect.Zero(v.Type()))
		default:
			s := reflect.MakeSlice(v.Type(), n-1, n-1)
			for i := range n - 1 {
				randomFill(rng, s.Index(i))
			}
			v.Set(s)
		}
	case reflect.Struct:
		for i := range v.NumField() {
			randomFill(rng, v.Field(i))
		}
	default:
		panic("randomFill: no values for " + v.Type().String())
	}
}

// The cache hands out asStored(m) where a decode of the stored bytes would
// give decodeMessage's result: the two must be the same for every record
// whose bytes pass put's check.
func TestAsStoredIsWhatTheRecordReadsBackAs(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	checked := 0
	for range 20000 {
		var m message
		randomFill(rng, reflect.ValueOf(&m).Elem())
		v, err := encodeMessage(&m)
		if err != nil {
			t.Fatal(err)
		}
		got, err := decodeMessage(v)
		if err != nil {
			t.Fatalf("decoding %s: %v", v, err)
		}
		if strings.Contains(string(v), `\ufffd`) {
			continue // put does not cache it
		}
		checked++
		if want := asStored(&m); !reflect.DeepEqual(want, got) {
			t.Fatalf("record %s\nreads back as %+v\nasStored says %+v", v, got, want)
		}
	}
	if checked < 1000 {
		t.Fatalf("only %d records were cacheable: the generator is off", checked)
	}
}

func testRecord(id string) *message {
	return &message{
		ID: id, Envelope: Envelope{From: "a@example.com", MessageID: "<1@example.com>"}, Size: 4096,
		BodyFile: "b-1", BodyOff: 512, Arrived: time.Now(),
		Recipients: []recipient{{RecipientParams: RecipientParams{Addr: "bob@example.org"}, Domain: "example.org", State: StateQueued, NextAttempt: time.Now()}},
	}
}

func TestRecordCacheServesOnlyWhatTheTransactionHolds(t *testing.T) {
	db, err := OpenDB(filepath.Join(t.TempDir(), "stsrelay.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	c := newRecords(4)
	update := func(fn func(tx *bbolt.Tx) error) error { return db.Update(fn) }
	update(func(tx *bbolt.Tx) error { _, err := tx.CreateBucketIfNotExists(bucketMessages); return err })
	// read gets id through the cache, checks it against a decode of the
	// disk, and says whether it came from the cache.
	read := func(id string) (m *message, hit bool) {
		t.Helper()
		db.View(func(tx *bbolt.Tx) error {
			want, err := getMessage(tx, id)
			if err != nil {
				t.Fatal(err)
			}
			misses := c.misses
			if m, err = c.get(tx, id); err != nil {
				t.Fatal(err)
			}
			hit = c.misses == misses
			if !reflect.DeepEqual(m, want) {
				t.Fatalf("cache says %+v, the disk %+v", m, want)
			}
			return nil
		})
		return m, hit
	}
	cached := func(id string) *message {
		t.Helper()
		m, hit := read(id)
		if !hit {
			t.Fatalf("%s was decoded, not taken from the cache", id)
		}
		return m
	}

	m := testRecord("m1")
	if err := update(func(tx *bbolt.Tx) error { return c.put(tx, m) }); err != nil {
		t.Fatal(err)
	}
	got := cached("m1")

	// What a caller does with its copy stays with it.
	got.Recipients[0].State = StateDelivered
	m.Recipients[0].State = StateFailed
	if r := cached("m1"); r.Recipients[0].State != StateQueued {
		t.Fatalf("state %s after callers changed their copies", r.Recipients[0].State)
	}

	// A transaction that stores a change, then fails: the disk keeps the
	// old record, and so does what get returns.
	boom := errors.New("boom")
	err = update(func(tx *bbolt.Tx) error {
		m2 := testRecord("m1")
		m2.Recipients[0].State = StateDeferred
		if err := c.put(tx, m2); err != nil {
			return err
		}
		if r, _ := c.get(tx, "m1"); r.Recipients[0].State != StateDeferred {
			t.Errorf("inside the transaction: state %s, want its own write", r.Recipients[0].State)
		}
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatal(err)
	}
	// The cache still has the write that was rolled back; the bytes tell.
	if r, hit := read("m1"); hit || r.Recipients[0].State != StateQueued {
		t.Fatalf("state %s (from the cache: %v) after a rolled back write", r.Recipients[0].State, hit)
	}

	// A record written around the cache is read as written.
	update(func(tx *bbolt.Tx) error {
		m3 := testRecord("m1")
		m3.Recipients[0].Attempts = 7
		v, _ := encodeMessage(m3)
		return tx.Bucket(bucketMessages).Put([]byte("m1"), v)
	})
	if r, hit := read("m1"); hit || r.Recipients[0].Attempts != 7 {
		t.Fatalf("attempts %d (from the cache: %v), want the record's 7", r.Recipients[0].Attempts, hit)
	}
	cached("m1") // a decode is remembered

	// A reply that is not UTF-8 is stored as JSON stores it, and read so.
	update(func(tx *bbolt.Tx) error {
		m4 := testRecord("m4")
		m4.Recipients[0].Last = Status{Code: 451, Text: "mx[1.2.3.4]: 451 \xff"}
		return c.put(tx, m4)
	})
	if r, _ := read("m4"); r.Recipients[0].Last.Text != "mx[1.2.3.4]: 451 \ufffd" {
		t.Fatalf("text %q", r.Recipients[0].Last.Text)
	}

	update(func(tx *bbolt.Tx) error { return c.delete(tx, "m1") })
	if r, _ := read("m1"); r != nil {
		t.Fatalf("a deleted record read as %+v", r)
	}

	// The bound holds, and a record pushed out is decoded again.
	update(func(tx *bbolt.Tx) error {
		for _, id := range []string{"a", "b", "c", "d", "e", "f"} {
			if err := c.put(tx, testRecord(id)); err != nil {
				return err
			}
		}
		return nil
	})
	if len(c.entries) > 4 {
		t.Fatalf("%d entries, bound 4", len(c.entries))
	}
	for _, id := range []string{"a", "b", "c", "d", "e", "f", "m4"} {
		read(id)
	}
	if len(c.entries) > 4 {
		t.Fatalf("%d entries after reads, bound 4", len(c.entries))
	}
}

// BenchmarkRecordGet reads the record of a message with five recipients
// that have each had an attempt, as a delivery's outcome does: decoded
// from its JSON, and from the cache.
//
//	go test -run '^$' -bench RecordGet -benchmem ./queue/
func BenchmarkRecordGet(b *testing.B) {
	db, err := OpenDB(filepath.Join(b.TempDir(), "stsrelay.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	m := testRecord("m1")
	r := m.Recipients[0]
	r.Attempts, r.State, r.LastAttempt, r.LastMX = 1, StateDeferred, time.Now(), "mx1.example.org"
	r.Last = Status{Code: 451, Enhanced: "4.4.2", Text: "mx1.example.org[192.0.2.1]: 451 4.4.2 try again later", RemoteMTA: "mx1.example.org", Reply: "451 4.4.2 try again later"}
	m.Recipients = []recipient{r, r, r, r, r}
	c := newRecords(recordCacheMax)
	if err := db.Update(func(tx *bbolt.Tx) error {
		if _, err := tx.CreateBucketIfNotExists(bucketMessages); err != nil {
			return err
		}
		return c.put(tx, m)
	}); err != nil {
		b.Fatal(err)
	}
	for _, from := range []string{"json", "cache"} {
		b.Run("from="+from, func(b *testing.B) {
			db.View(func(tx *bbolt.Tx) error {
				b.ReportAllocs()
				for b.Loop() {
					if from == "json" {
						getMessage(tx, "m1")
					} else {
						c.get(tx, "m1")
					}
				}
				return nil
			})
		})
	}
}
