package tlsrpt

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/bbolt"

	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/resolve"
)

// Defaults for zero Options fields.
const (
	DefaultBuffer      = 10000
	DefaultMaxDelay    = 4 * time.Hour
	DefaultHTTPTimeout = 30 * time.Second
	// flushEvery is how long recorded results may wait in memory before
	// they are written; a crash loses at most that much.
	flushEvery = time.Second
	// maxBatch writes a batch early once it holds this many results.
	maxBatch = 2000
	// minDelay lets results of the closing day reach the database before
	// its reports are made.
	minDelay = time.Minute
	// retryWindow is how long a report is retried (RFC 8460 §5.5).
	retryWindow = 24 * time.Hour
	// senders is how many reports are delivered at once.
	senders = 4
)

// backoff is the wait after the 1st, 2nd, … failed attempt of a report;
// the last repeats, until retryWindow has passed.
var backoff = []time.Duration{5 * time.Minute, 15 * time.Minute, 30 * time.Minute, time.Hour, 2 * time.Hour, 4 * time.Hour}

// Enqueuer queues a message for delivery: queue.Queue implements it.
type Enqueuer interface {
	Enqueue(ctx context.Context, env queue.Envelope, body io.Reader) (string, error)
}

// Options configure a Reporter. DB, Resolver, OrganizationName and
// ContactInfo are required.
type Options struct {
	// DB is the database the queue opened; tlsrpt keeps its own buckets.
	DB *bbolt.DB
	// Update, when set, runs tlsrpt's writes to DB; nil means DB.Update.
	// The daemon passes the queue's group commit (queue.(*Queue).Update),
	// so that the writes share the queue's fsyncs instead of holding
	// bbolt's one writer while acceptances wait.
	Update func(fn func(tx *bbolt.Tx) error) error
	// Resolver finds TLSRPT records and the addresses of https endpoints.
	Resolver *resolve.Resolver
	// Queue sends mailto: reports; nil makes them fail.
	Queue Enqueuer
	// OrganizationName and ContactInfo fill the report's organization-name
	// and contact-info (an email address, whose domain is the submitter).
	OrganizationName string
	ContactInfo      string
	// Sender is the From and envelope sender of report mail; default
	// tlsrpt-noreply@Hostname.
	Sender   string
	Hostname string
	// DKIM keys sign report mail; the one whose domain is the Sender's (or
	// a parent of it) is used. RFC 8460 §3: receivers ignore unsigned
	// reports, so without one mailto: endpoints fail.
	DKIM []DKIMKey
	// MaxDelay bounds the random wait after 00:00 UTC before a day's
	// reports go out (RFC 8460 §4.1); default DefaultMaxDelay.
	MaxDelay time.Duration
	// Buffer is how many results may wait for the database; past it they
	// are dropped and counted. Default DefaultBuffer.
	Buffer int
	// HTTPTimeout bounds one https POST; default DefaultHTTPTimeout.
	HTTPTimeout time.Duration
	// RootCAs verify https endpoints; nil means the system roots.
	RootCAs *x509.CertPool
	// DialContext dials https endpoints' addresses; nil means net.Dialer.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)
	Logger      *slog.Logger
	// Now is the clock; nil means time.Now.
	Now func() time.Time
}

// Reporter records session results and sends the reports. It implements
// policy.Recorder; Record never blocks.
type Reporter struct {
	opts      Options
	log       *slog.Logger
	submitter string
	http      *http.Client
	delay     time.Duration // after midnight UTC, chosen once per process

	results chan policy.SessionResult
	flushes chan chan struct{}
	stop    chan struct{}
	stopped chan struct{}
	closed  atomic.Bool
	close   sync.Once

	// work serializes making and sending reports (the daily job and the
	// control socket's send).
	work     sync.Mutex
	madeDays map[string]bool // closed days whose reports are all made; under work
	// lookupFailing is when the record lookup for a report not yet made
	// first failed, by report key: the 24 hours of retries count from
	// there (RFC 8460 §5.5), not from the day's end. Under work; a
	// restart begins them again.
	lookupFailing map[string]time.Time
}

// New checks opts and starts the writer that stores recorded results.
// Close stops it.
func New(opts Options) (*Reporter, error) {
	if opts.DB == nil || opts.Resolver == nil {
		return nil, errors.New("tlsrpt: Options.DB and Options.Resolver are required")
	}
	if opts.Update == nil {
		opts.Update = opts.DB.Update
	}
	if opts.OrganizationName == "" {
		return nil, errors.New("tlsrpt: an organization name is required (tlsrpt.organization_name)")
	}
	// The submitter goes into the Subject, Message-ID and filename of
	// report mail, which must stay ASCII: an IDN is taken as its A-label.
	submitter, err := queue.RecipientDomain(opts.ContactInfo)
	if err != nil || !validMailbox(opts.ContactInfo) {
		return nil, fmt.Errorf("tlsrpt: contact info %q is not an email address (tlsrpt.contact_info)", opts.ContactInfo)
	}
	if opts.Sender == "" {
		if opts.Hostname == "" {
			return nil, errors.New("tlsrpt: Options.Sender or Options.Hostname is required")
		}
		opts.Sender = "tlsrpt-noreply@" + opts.Hostname
	}
	if !validMailbox(opts.Sender) {
		return nil, fmt.Errorf("tlsrpt: report sender %q is not an email address (tlsrpt.report_sender)", opts.Sender)
	}
	if opts.MaxDelay <= 0 {
		opts.MaxDelay = DefaultMaxDelay
	}
	if opts.Buffer <= 0 {
		opts.Buffer = DefaultBuffer
	}
	if opts.HTTPTimeout <= 0 {
		opts.HTTPTimeout = DefaultHTTPTimeout
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	t := &Reporter{
		opts:          opts,
		log:           opts.Logger,
		submitter:     submitter,
		delay:         minDelay + rand.N(max(opts.MaxDelay-minDelay, time.Second)),
		results:       make(chan policy.SessionResult, opts.Buffer),
		flushes:       make(chan chan struct{}),
		stop:          make(chan struct{}),
		stopped:       make(chan struct{}),
		madeDays:      make(map[string]bool),
		lookupFailing: make(map[string]time.Time),
	}
	t.http = newHTTPClient(&opts)
	err = opts.DB.Update(func(tx *bbolt.Tx) error {
		for _, b := range [][]byte{bucketResults, bucketReports} {
			if _, err := tx.CreateBucketIfNotExists(b); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("tlsrpt: cannot create buckets in %s: %w", opts.DB.Path(), err)
	}
	go t.writer()
	return t, nil
}

// Sender is the address report mail comes from.
func (t *Reporter) Sender() string { return t.opts.Sender }

// Record takes one result for the reports. It never blocks: when the
// buffer is full the result is dropped and counted.
func (t *Reporter) Record(r policy.SessionResult) {
	switch {
	case r.Unreported:
		metricSkipped.WithLabelValues("unreported").Inc()
		return
	case r.Policy != nil && r.Policy.Type == policy.TypeLocal:
		metricSkipped.WithLabelValues("local").Inc()
		return
	case r.PolicyDomain == "":
		return
	}
	if r.Time.IsZero() {
		r.Time = t.opts.Now()
	}
	name := string(r.Result)
	if r.Result == policy.ResultSuccess {
		name = "success"
	}
	metricResults.WithLabelValues(name).Inc()
	if t.closed.Load() {
		metricDropped.Inc()
		return
	}
	select {
	case t.results <- r:
	default:
		metricDropped.Inc()
	}
}

// writer stores results in batches: one transaction per second or per
// maxBatch results, so a busy relay does not pay a disk sync per session.
func (t *Reporter) writer() {
	defer close(t.stopped)
	tick := time.NewTicker(flushEvery)
	defer tick.Stop()
	b, n := batch{}, 0
	add := func(r policy.SessionResult) {
		b.add(r.Time.UTC().Format(dayFormat), policyKey(r), aggregateOf(r))
		n++
	}
	flush := func() {
		if n == 0 {
			return
		}
		if err := storeBatch(t.opts.Update, b); err != nil {
			metricDropped.Add(float64(n))
			t.log.Error("tlsrpt: session results lost: cannot store them", "results", n, "err", err)
		}
		b, n = batch{}, 0
	}
	drain := func() {
		for {
			select {
			case r := <-t.results:
				add(r)
			default:
				return
			}
		}
	}
	for {
		select {
		case r := <-t.results:
			add(r)
			if n >= maxBatch {
				flush()
			}
		case <-tick.C:
			flush()
		case done := <-t.flushes:
			drain()
			flush()
			close(done)
		case <-t.stop:
			drain()
			flush()
			return
		}
	}
}

// Flush stores every result recorded so far.
func (t *Reporter) Flush() {
	done := make(chan struct{})
	select {
	case t.flushes <- done:
		<-done
	case <-t.stopped:
	}
}

// Close stores what is buffered and stops the writer. Results recorded
// after Close are dropped. Call it before closing the database.
func (t *Reporter) Close() error {
	t.close.Do(func() {
		t.closed.Store(true)
		close(t.stop)
	})
	<-t.stopped
	return nil
}
