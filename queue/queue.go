package queue

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base32"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/bbolt"
	"golang.org/x/net/idna"
)

// Options configure a Queue. A zero field takes its value from
// DefaultOptions, which is also where stsrelay's configuration takes its
// defaults from.
type Options struct {
	Deliverer Deliverer // required
	// Dir is the spool directory for message bodies. Default: "spool"
	// beside the database file.
	Dir string
	// Workers is the number of deliveries in flight at once
	// (delivery.workers).
	Workers int
	// MaxConnsPerDomain caps the deliveries in flight to one destination
	// domain (delivery.max_connections_per_domain).
	MaxConnsPerDomain int
	// RetrySchedule is the wait after the 1st, 2nd, … failed attempt of a
	// recipient; the last entry repeats (delivery.retry_schedule). Each wait
	// gets up to 10% added at random so that retries spread out.
	RetrySchedule []time.Duration
	// MaxQueueTime is how long a recipient is retried before it bounces
	// with 5.4.7 (delivery.max_queue_time).
	MaxQueueTime time.Duration
	// DelayNoticeAfter is when a still-deferred recipient gets its one delay
	// DSN (delivery.delay_notice_after). 0 means never, as in the
	// configuration; DefaultOptions has the usual value.
	DelayNoticeAfter time.Duration
	// BounceSizeLimit is the largest message a failure DSN returns whole
	// when the sender asked for it (RET=FULL, RFC 3461 §4.3); a larger one
	// gets its header section, as without RET, so that the notice is not
	// itself refused for its size (delivery.bounce_size_limit).
	BounceSizeLimit int64
	// Hostname is this MTA's name: Reporting-MTA and postmaster@Hostname in
	// DSNs. Default os.Hostname().
	Hostname string
	// MaxMessageSize bounds what Enqueue reads; smtpin's own limit should
	// be lower.
	MaxMessageSize int64
	// ShutdownGrace is how long Run lets in-flight deliveries finish after
	// its context is done before cancelling them.
	ShutdownGrace time.Duration
	Logger        *slog.Logger     // default slog.Default()
	Now           func() time.Time // clock, for tests; default time.Now
}

// DefaultOptions are the values zero Options fields take, and the
// defaults of the [delivery] keys in stsrelay's configuration.
var DefaultOptions = Options{
	Workers:           32,
	MaxConnsPerDomain: 10,
	// RFC 5321 §4.5.4.1 asks for a delayed first retry and 30 minutes
	// between retries; the first two are shorter, as Postfix's are,
	// because greylisting clears in minutes.
	RetrySchedule:    []time.Duration{5 * time.Minute, 10 * time.Minute, 30 * time.Minute, time.Hour, 2 * time.Hour, 4 * time.Hour},
	MaxQueueTime:     120 * time.Hour, // RFC 5321 §4.5.4.1: 4-5 days
	DelayNoticeAfter: 4 * time.Hour,
	BounceSizeLimit:  10 << 20,
	MaxMessageSize:   64 << 20,
	ShutdownGrace:    10 * time.Second,
}

// inlineMax is the largest body that a group commit appends to the shared
// segment; larger ones get a file of their own.
const inlineMax = 256 << 10

// Enqueue reads the start of a body into a buffer to tell a small body
// from a large one before it knows the size. It holds that buffer while
// the client sends the message, so it starts with a short one
// (smallHeads) and takes one of inlineMax+1 (headPool) only for a body
// that fills it: a thousand sessions in DATA with messages of a few KiB
// hold 16 MiB of buffers, not 256 MiB.
const smallHead = 16 << 10

var (
	smallHeads = sync.Pool{New: func() any { b := make([]byte, smallHead); return &b }}
	headPool   = sync.Pool{New: func() any { b := make([]byte, inlineMax+1); return &b }}
)

// ErrTooBig is returned by Enqueue for a body over Options.MaxMessageSize.
var ErrTooBig = errors.New("message exceeds the queue's size limit")

// ErrNoSpace is in the chain of Enqueue's error when the file system that
// holds the queue is full or over quota: nothing was stored, and trying
// again once space returns will work (smtpin answers 452 4.3.1).
var ErrNoSpace = errors.New("the queue's file system is full")

// ErrStopping is the cause of the deliveries a stop cuts off once its
// grace is over; their recipients are due again at the next start.
var ErrStopping = errors.New("stsrelay is stopping; due again at the next start")

// Queue is the durable queue and its delivery scheduler.
type Queue struct {
	db     *bbolt.DB
	opts   Options
	log    *slog.Logger
	commit *committer
	spool  *spool
	reader *Reader
	recs   *records

	mu     sync.Mutex
	index  map[key]*entry
	totals [3]int // pending recipients in the index: queued, deferred, held
	sched  scheduler
	kick   chan struct{}
	// First copies held in memory (entry.fresh), and their bounds.
	firstBytes, firstMaxBytes int64
	firstCount, firstMaxCount int
	// owed holds the ids of the messages that owe a DSN (NoticeOwed), as
	// the index follows the records; true once a failure to write it was
	// logged. Run tries them again every noticeRetry (noticeNext), one try
	// at a time (noticing).
	owed       map[string]bool
	noticeNext time.Time
	noticing   bool
	noticeMu   sync.Mutex // one sendNotices at a time: a DSN's marks are cleared once
	// graceOver is set once a stop's grace has run out: the DSNs not
	// written by then stay owed (the marks are on disk) for the next
	// start, so that many owed after a full disk cannot hold the stop up.
	graceOver atomic.Bool

	closeOnce sync.Once
	// loaded is what load found, logged when Run starts: a start that
	// fails later (a port in use) then ends in one line, not a summary.
	loaded []any
	// damaged are the first records load could not decode, logged by Run
	// for the same reason.
	damaged []damagedRecord
}

// damagedRecord is a message record that does not decode.
type damagedRecord struct {
	id  string
	err error
}

// maxDamagedLogged bounds the damaged records named in the log one by
// one; the summary line counts them all.
const maxDamagedLogged = 100

// New opens the queue stored in db, creating its buckets, and loads what
// is pending. Whatever was in flight when the process last stopped is due
// again at once: delivery is at least once.
func New(db *bbolt.DB, opts Options) (*Queue, error) {
	if opts.Deliverer == nil {
		return nil, errors.New("queue: Options.Deliverer is required")
	}
	def := DefaultOptions
	if opts.Workers <= 0 {
		opts.Workers = def.Workers
	}
	if opts.MaxConnsPerDomain <= 0 {
		opts.MaxConnsPerDomain = def.MaxConnsPerDomain
	}
	if len(opts.RetrySchedule) == 0 {
		opts.RetrySchedule = def.RetrySchedule
	}
	for _, d := range opts.RetrySchedule {
		if d <= 0 {
			return nil, fmt.Errorf("queue: retry schedule entry %v is not positive", d)
		}
	}
	if opts.MaxQueueTime <= 0 {
		opts.MaxQueueTime = def.MaxQueueTime
	}
	if opts.DelayNoticeAfter < 0 {
		return nil, fmt.Errorf("queue: DelayNoticeAfter %v is negative (0 means never)", opts.DelayNoticeAfter)
	}
	if opts.BounceSizeLimit <= 0 {
		opts.BounceSizeLimit = def.BounceSizeLimit
	}
	if opts.Hostname == "" {
		h, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("queue: Options.Hostname is empty and os.Hostname failed: %v", err)
		}
		opts.Hostname = h
	}
	if opts.MaxMessageSize <= 0 {
		opts.MaxMessageSize = def.MaxMessageSize
	}
	if opts.ShutdownGrace <= 0 {
		opts.ShutdownGrace = def.ShutdownGrace
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Dir == "" {
		opts.Dir = filepath.Join(filepath.Dir(db.Path()), "spool")
	}
	sp, err := openSpool(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("queue: %w", err)
	}
	q := &Queue{
		recs:  newRecords(recordCacheMax),
		spool: sp,
		db:    db,
		opts:  opts,
		log:   opts.Logger,
		index: make(map[key]*entry),
		owed:  make(map[string]bool),
		sched: newScheduler(),
		kick:  make(chan struct{}, 1),

		firstMaxBytes: firstCopyMaxBytes,
		firstMaxCount: firstCopyMaxCount,
	}
	q.reader = &Reader{db: db, spool: sp, now: opts.Now}
	err = db.Update(func(tx *bbolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(bucketMessages)
		return err
	})
	if err != nil {
		sp.close()
		return nil, fmt.Errorf("queue: cannot create buckets in %s: %w", db.Path(), err)
	}
	if err := q.load(); err != nil {
		sp.close()
		return nil, err
	}
	q.commit = newCommitter(db, sp)
	return q, nil
}

// load builds the in-memory index from the database.
func (q *Queue) load() error {
	var damaged int
	stored := make(map[string]bool)
	// Each record decodes a copy of its segment's name and of its
	// domains, which the index would keep: one copy each instead, for a
	// queue of 100,000 messages that is 200,000 strings fewer to hold and
	// for the garbage collector to mark.
	names := make(map[string]string)
	intern := func(s string) string {
		if c, ok := names[s]; ok {
			return c
		}
		names[s] = s
		return s
	}
	err := q.db.View(func(tx *bbolt.Tx) error {
		n := 0
		return tx.Bucket(bucketMessages).ForEach(func(k, v []byte) error {
			if n++; n%8192 == 0 {
				// Now and then, not only at the end, so the scan's peak
				// stays small too (releaseMapping loses nothing).
				releaseMapping(q.db)
			}
			stored[string(k)] = true
			m, err := decodeMessage(v)
			if m != nil && m.BodyFile != "" {
				stored[m.BodyFile] = true
			}
			if err == nil {
				if _, ok := keyOf(string(k)); !ok {
					err = fmt.Errorf("%q is not a queue id (%d characters)", k, idLen)
				} else if m.ID != string(k) {
					err = fmt.Errorf("the record of %s holds the id %q", k, m.ID)
				}
			}
			if err != nil {
				// Leave it in place for an operator; it cannot be scheduled.
				if len(q.damaged) < maxDamagedLogged {
					q.damaged = append(q.damaged, damagedRecord{string(k), err})
				}
				damaged++
				return nil
			}
			m.BodyFile = intern(m.BodyFile)
			for i := range m.Recipients {
				m.Recipients[i].Domain = intern(m.Recipients[i].Domain)
			}
			q.indexPut(m)
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("queue: reading %s: %w", q.db.Path(), err)
	}
	releaseMapping(q.db)
	// A damaged record may point into any segment (the same reason as
	// for reclaimGaps below): while one is there, no segment is an
	// orphan, or mending the record would find its body gone.
	orphans, err := q.spool.sweep(stored, damaged > 0)
	if err != nil {
		return fmt.Errorf("queue: %w", err)
	}
	if damaged == 0 { // a damaged record may refer to any stretch
		live := make(map[string][]span)
		for _, e := range q.index {
			if e.bodyFile != "" {
				live[e.bodyFile] = append(live[e.bodyFile], span{e.bodyOff, e.size})
			}
		}
		q.spool.reclaimGaps(live)
	}
	q.loaded = []any{"messages", len(q.index), "damaged", damaged, "orphan_bodies_removed", orphans}
	return nil
}

// Update runs fn in the queue's next group commit and returns once that
// commit is on disk. It is for the other buckets of the same database (the
// MTA-STS cache, TLSRPT results): bbolt has one writer, and a transaction
// of their own would hold it, with two fsyncs, while acceptances wait
// behind it. fn may run more than once (when another write of the batch
// fails), so it must not have effects outside tx; an error from fn fails
// this Update alone. After Close, Update returns ErrClosed.
func (q *Queue) Update(fn func(tx *bbolt.Tx) error) error { return q.commit.do(fn, nil) }

// Close stops accepting writes and waits for pending ones. Call it after
// Run has returned.
func (q *Queue) Close() error {
	var err error
	q.closeOnce.Do(func() {
		q.commit.close()
		err = q.spool.close()
	})
	return err
}

// Body8BitReporter is a message body that learns, as it is read, whether
// it holds 8-bit octets; smtpin's does. The envelope goes to Enqueue before
// the body has arrived, so Enqueue asks once it has read the body to its
// end.
type Body8BitReporter interface {
	Body8Bit() bool
}

// Enqueue stores a message for delivery and returns its queue id once the
// message is committed and synced to disk. body is the whole message with
// CRLF line ends; when it is a Body8BitReporter that found 8-bit octets,
// the message is stored with Body8Bit set, whatever env says. When Enqueue
// returns an error, nothing was stored and the message must not be
// acknowledged (smtpin answers 451 4.3.0, or 452 4.3.1 for ErrNoSpace).
// Enqueue logs nothing: the caller's line is the one line per submission.
func (q *Queue) Enqueue(ctx context.Context, env Envelope, body io.Reader) (id string, err error) {
	defer func() {
		if isNoSpace(err) {
			err = fmt.Errorf("%w (%w)", ErrNoSpace, err)
		}
	}()
	if err := ctx.Err(); err != nil {
		return "", fmt.Errorf("message not queued: %w", err)
	}
	m, err := q.newMessage(env)
	if err != nil {
		return "", fmt.Errorf("message not queued: %w", err)
	}
	// A small body rides in the group commit's append to the current
	// segment: one write and one fsync for the whole batch. A large one gets a file of its own,
	// streamed to disk rather than held in memory.
	src := &readErr{r: body}
	limit := int(min(inlineMax, q.opts.MaxMessageSize)) + 1
	small := smallHeads.Get().(*[]byte)
	defer smallHeads.Put(small)
	head := (*small)[:min(limit, smallHead)]
	n, _ := io.ReadFull(src, head) // EOF and a short body are not errors here
	head = head[:n]
	if n == smallHead && n < limit && src.err == nil {
		big := headPool.Get().(*[]byte)
		defer headPool.Put(big)
		copy(*big, head)
		more, _ := io.ReadFull(src, (*big)[n:limit])
		head = (*big)[:n+more]
	}
	if src.err != nil {
		return "", fmt.Errorf("message not queued: reading the message: %w", src.err)
	}
	if len(head) < limit {
		m.Envelope.Body8Bit = m.Envelope.Body8Bit || has8Bit(body) // read to its end
		// The body outlives the call (the segment write, the first
		// attempt): it gets its own slice of exactly its size.
		head = bytes.Clone(head)
		m.ID, m.Size = newID(m.Arrived), int64(len(head))
		err = q.commit.doWithBody(func(tx *bbolt.Tx) error {
			for tx.Bucket(bucketMessages).Get([]byte(m.ID)) != nil {
				m.ID = newID(m.Arrived)
			}
			return q.recs.put(tx, m)
		}, func() { q.indexPutFirst(m, head) }, head, func(file string, off int64) { m.BodyFile, m.BodyOff = file, off })
		if err != nil {
			return "", fmt.Errorf("message not queued: %w", err)
		}
		metricEnqueued.Inc()
		q.wake()
		return m.ID, nil
	}
	f, id, size, err := q.spool.create(m.Arrived, io.MultiReader(bytes.NewReader(head), src), q.opts.MaxMessageSize)
	if err != nil {
		return "", fmt.Errorf("message not queued: %w", err)
	}
	m.ID, m.Size = id, size
	m.Envelope.Body8Bit = m.Envelope.Body8Bit || has8Bit(body)
	err = q.commit.doWithFile(func(tx *bbolt.Tx) error { return q.recs.put(tx, m) }, func() { q.indexPut(m) }, f)
	if cerr := f.Close(); err == nil && cerr != nil {
		// Synced and committed; a close error cannot lose the body.
		q.log.Warn("queue: closing spool file", "id", id, "err", cerr)
	}
	if err != nil {
		q.spool.remove(m.ID)
		return "", fmt.Errorf("message not queued: %w", err)
	}
	metricEnqueued.Inc()
	q.wake()
	return m.ID, nil
}

// has8Bit reports a body, read to its end, that found 8-bit octets in
// itself. RFC 6152 §3: such a message must not go to a server without
// 8BITMIME, and many clients send it without BODY=8BITMIME.
func has8Bit(body io.Reader) bool {
	r, ok := body.(Body8BitReporter)
	return ok && r.Body8Bit()
}

// isNoSpace reports a write refused for lack of space: ENOSPC from a spool
// write, a bbolt commit or an fsync, or EDQUOT from a quota.
func isNoSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

func (q *Queue) newMessage(env Envelope) (*message, error) {
	if len(env.Recipients) == 0 {
		return nil, errors.New("no recipients")
	}
	now := q.opts.Now()
	m := &message{Envelope: env, Arrived: now}
	m.Envelope.Recipients = nil // kept per recipient below
	for _, rp := range env.Recipients {
		d, err := RecipientDomain(rp.Addr)
		if err != nil {
			return nil, err
		}
		m.Recipients = append(m.Recipients, recipient{RecipientParams: rp, Domain: d, State: StateQueued, NextAttempt: now})
	}
	return m, nil
}

// RecipientDomain returns the lower-case A-label domain of addr, by which
// the queue schedules it; an error is why Enqueue refuses addr.
func RecipientDomain(addr string) (string, error) {
	at := strings.LastIndexByte(addr, '@')
	if at < 0 || at == len(addr)-1 {
		return "", fmt.Errorf("recipient %q has no domain", addr)
	}
	d := strings.TrimSuffix(addr[at+1:], ".")
	if strings.HasPrefix(d, "[") {
		return strings.ToLower(d), nil // address literal (RFC 5321 §4.1.3)
	}
	// The IDNA lookup mapping folds case itself (UTS #46): lower-casing
	// first would make "STRAẞE.de" straße.de, not strasse.de.
	a, err := idna.Lookup.ToASCII(d)
	if err != nil {
		return "", fmt.Errorf("recipient %q: invalid domain: %v", addr, err)
	}
	return strings.ToLower(a), nil
}

var idEncoding = base32.NewEncoding("0123456789abcdefghijklmnopqrstuv").WithPadding(base32.NoPadding)

// idLen is the length of a queue id.
const idLen = 20

// key is a message id as the index holds it: an array in the entry and
// the map rather than a string of its own, one object and two pointers
// fewer per queued message for the garbage collector to follow on every
// cycle.
type key [idLen]byte

// keyOf returns id's key; ok is false for a string that is no queue id.
func keyOf(id string) (k key, ok bool) {
	if len(id) != idLen {
		return k, false
	}
	copy(k[:], id)
	return k, true
}

func (k key) String() string { return string(k[:]) }

// entryLocked returns the index entry of the message id, nil when none.
func (q *Queue) entryLocked(id string) *entry {
	k, ok := keyOf(id)
	if !ok {
		return nil
	}
	return q.index[k]
}

// newID returns a 20-character id that sorts by arrival time.
func newID(now time.Time) string {
	var b [12]byte
	binary.BigEndian.PutUint64(b[:8], uint64(now.UnixNano()))
	_, _ = rand.Read(b[8:]) // crypto/rand.Read never fails (Go 1.24+)
	return idEncoding.EncodeToString(b[:])
}

func (q *Queue) wake() {
	select {
	case q.kick <- struct{}{}:
	default:
	}
}
