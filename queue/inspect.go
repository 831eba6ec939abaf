package queue

import (
	"cmp"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"time"

	"go.etcd.io/bbolt"
)

// Reader reads the queue: the running daemon's, or the database of a
// stopped one opened with OpenReadOnly, so that `stsrelay queue list`
// and `show` work either way with the same code.
type Reader struct {
	db    *bbolt.DB
	spool *spool // read only: no directory handle
	now   func() time.Time
}

// NewReader reads the queue in db, whose bodies are in spoolDir ("" means
// the "spool" folder beside the database file, as Options.Dir).
func NewReader(db *bbolt.DB, spoolDir string) *Reader {
	if spoolDir == "" {
		spoolDir = filepath.Join(filepath.Dir(db.Path()), "spool")
	}
	return &Reader{db: db, spool: &spool{dir: spoolDir}, now: time.Now}
}

// Page sizes of List: one page is one short read transaction, so that a
// listing of a large queue neither holds bbolt's remapping back (which
// would stall every commit) nor makes a reply too large.
const (
	DefaultPageSize = 1000
	MaxPageSize     = 10000
	// maxPageRecipients ends a page early when its messages hold this
	// many recipients (about 10 MB of JSON): 1,000 messages of 1,000
	// recipients each, a bulk mailing stuck, would otherwise make a reply
	// larger than the control socket takes.
	maxPageRecipients = 20000
)

// Page is one page of the queue listing, oldest first.
type Page struct {
	Messages []MessageInfo `json:"messages"`
	// Next is the id to ask for the next page after; "" on the last page.
	Next string `json:"next,omitempty"`
}

// List returns up to limit messages whose ids sort after after ("" for
// the start). Ids sort by arrival, so pages come oldest first.
func (r *Reader) List(after string, limit int) (*Page, error) {
	if limit <= 0 {
		limit = DefaultPageSize
	}
	limit = min(limit, MaxPageSize)
	p := &Page{Messages: []MessageInfo{}}
	err := r.db.View(func(tx *bbolt.Tx) error {
		b := tx.Bucket(bucketMessages)
		if b == nil {
			return nil // a database no queue has written to yet
		}
		c := b.Cursor()
		k, v := seekAfter(c, after)
		recipients := 0
		for ; k != nil; k, v = c.Next() {
			if n := len(p.Messages); n == limit || recipients >= maxPageRecipients {
				p.Next = p.Messages[n-1].ID
				return nil
			}
			m, err := decodeMessage(v)
			if err != nil {
				p.Messages = append(p.Messages, MessageInfo{ID: string(k), From: "(damaged record)", Recipients: []RecipientInfo{}})
				continue
			}
			p.Messages = append(p.Messages, info(m))
			recipients += len(m.Recipients)
		}
		return nil
	})
	return p, err
}

// seekAfter positions c on the first key after after.
func seekAfter(c *bbolt.Cursor, after string) (k, v []byte) {
	if after == "" {
		return c.First()
	}
	k, v = c.Seek([]byte(after))
	if k != nil && string(k) == after {
		k, v = c.Next()
	}
	return k, v
}

// each calls fn for every readable message, a page of records per read
// transaction, for the same reason List pages.
func (r *Reader) each(fn func(m *message)) error {
	after := ""
	for {
		var batch []*message
		err := r.db.View(func(tx *bbolt.Tx) error {
			b := tx.Bucket(bucketMessages)
			if b == nil {
				return nil
			}
			c := b.Cursor()
			for k, v := seekAfter(c, after); k != nil && len(batch) < DefaultPageSize; k, v = c.Next() {
				after = string(k)
				if m, err := decodeMessage(v); err == nil {
					batch = append(batch, m)
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		for _, m := range batch {
			fn(m)
		}
		if len(batch) < DefaultPageSize {
			return nil
		}
	}
}

// Show returns one message with its header section (up to 64 KiB).
func (r *Reader) Show(id string) (*MessageInfo, error) {
	var mi *MessageInfo
	err := r.db.View(func(tx *bbolt.Tx) error {
		if tx.Bucket(bucketMessages) == nil {
			return nil
		}
		m, err := getMessage(tx, id)
		if err != nil || m == nil {
			return err
		}
		h, err := r.spool.read(locOf(m), 64<<10)
		if err != nil {
			return err
		}
		x := info(m)
		x.Headers = string(headerSection(h))
		mi = &x
		return nil
	})
	if err == nil && mi == nil {
		err = fmt.Errorf("%s: %w", id, ErrNotFound)
	}
	return mi, err
}

// Message opens the stored message id: headers and body as they will be
// sent, our Received header first, CRLF line ends.
func (r *Reader) Message(id string) (io.ReadCloser, error) {
	var loc *bodyLoc
	err := r.db.View(func(tx *bbolt.Tx) error {
		if tx.Bucket(bucketMessages) == nil {
			return nil
		}
		m, err := getMessage(tx, id)
		if m != nil {
			l := locOf(m)
			loc = &l
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	if loc == nil {
		return nil, fmt.Errorf("%s: %w", id, ErrNotFound)
	}
	// The message may leave the queue meanwhile: open says so.
	return r.spool.open(*loc)
}

// AgeBuckets are the upper bounds of Summary's age columns, doubling as
// qshape's do; the last column counts everything older.
var AgeBuckets = []time.Duration{5 * time.Minute, 10 * time.Minute, 20 * time.Minute, 40 * time.Minute,
	80 * time.Minute, 160 * time.Minute, 320 * time.Minute, 640 * time.Minute, 1280 * time.Minute}

// Summary is the shape of the queue, as qshape shows Postfix's: waiting
// recipients by destination domain and age, and why they wait.
type Summary struct {
	Messages int `json:"messages"`
	// Total sums every domain.
	Total DomainCount `json:"total"`
	// Domains are sorted by the most recipients first.
	Domains []DomainCount `json:"domains"`
	// Reasons are the most common last replies of deferred recipients,
	// most frequent first, at most MaxReasons.
	Reasons []ReasonCount `json:"reasons"`
}

// MaxReasons bounds Summary.Reasons.
const MaxReasons = 10

// DomainCount counts the waiting recipients of one destination domain.
type DomainCount struct {
	Domain   string `json:"domain"`
	Total    int    `json:"total"`
	Active   int    `json:"active"`   // due now or being delivered
	Deferred int    `json:"deferred"` // waiting for a retry
	Held     int    `json:"held"`
	// Ages counts by time in the queue: Ages[i] are younger than
	// AgeBuckets[i] (and not younger than the bucket before); the last
	// entry counts the older ones.
	Ages []int `json:"ages"`
}

// ReasonCount is how many deferred recipients at Domain last got Status.
type ReasonCount struct {
	Domain string `json:"domain"`
	Status string `json:"status"` // "451 4.4.8 MX hosts of 'example.com' failed MTA-STS validation"
	Count  int    `json:"count"`
}

// Summary counts the waiting (queued, deferred, held) recipients.
func (r *Reader) Summary() (*Summary, error) {
	now := r.now()
	s := &Summary{Domains: []DomainCount{}, Reasons: []ReasonCount{}}
	s.Total.Ages = make([]int, len(AgeBuckets)+1)
	domains := map[string]*DomainCount{}
	type reasonKey struct{ domain, status string }
	reasons := map[reasonKey]int{}
	err := r.each(func(m *message) {
		s.Messages++
		age := now.Sub(m.Arrived)
		bucket := len(AgeBuckets)
		for i, b := range AgeBuckets {
			if age < b {
				bucket = i
				break
			}
		}
		for i := range m.Recipients {
			rc := &m.Recipients[i]
			if rc.State.Final() {
				continue
			}
			d := domains[rc.Domain]
			if d == nil {
				d = &DomainCount{Domain: rc.Domain, Ages: make([]int, len(AgeBuckets)+1)}
				domains[rc.Domain] = d
			}
			for _, c := range []*DomainCount{d, &s.Total} {
				c.Total++
				c.Ages[bucket]++
				switch statusOf(rc, now) {
				case StatusActive:
					c.Active++
				case StatusDeferred:
					c.Deferred++
				case StatusHeld:
					c.Held++
				}
			}
			if rc.State == StateDeferred && rc.Last.Code != 0 {
				reasons[reasonKey{rc.Domain, rc.Last.String()}]++
			}
		}
	})
	if err != nil {
		return nil, err
	}
	for _, d := range domains {
		s.Domains = append(s.Domains, *d)
	}
	slices.SortFunc(s.Domains, func(a, b DomainCount) int {
		return cmp.Or(cmp.Compare(b.Total, a.Total), cmp.Compare(a.Domain, b.Domain))
	})
	for k, n := range reasons {
		s.Reasons = append(s.Reasons, ReasonCount{Domain: k.domain, Status: k.status, Count: n})
	}
	slices.SortFunc(s.Reasons, func(a, b ReasonCount) int {
		return cmp.Or(cmp.Compare(b.Count, a.Count), cmp.Compare(a.Domain, b.Domain), cmp.Compare(a.Status, b.Status))
	})
	if len(s.Reasons) > MaxReasons {
		s.Reasons = s.Reasons[:MaxReasons]
	}
	return s, nil
}

// The statuses a selection can ask for (stsrelay queue … -status).
const (
	StatusActive   = "active"   // due now or being delivered
	StatusDeferred = "deferred" // waiting for a retry
	StatusHeld     = "held"
)

// statusOf places a waiting recipient in one of the selectable statuses;
// "" for a final one.
func statusOf(r *recipient, now time.Time) string {
	switch {
	case r.State == StateHeld:
		return StatusHeld
	case r.State == StateDeferred && r.NextAttempt.After(now):
		return StatusDeferred
	case r.pending():
		return StatusActive
	}
	return ""
}
