package queue

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"sync/atomic"

	"go.etcd.io/bbolt"
)

// ErrClosed is returned by operations on a closed Queue.
var ErrClosed = errors.New("queue is closed")

// maxBatch and maxBatchBytes bound one group commit, so one transaction
// and one append to the spool stay small.
const (
	maxBatch      = 512
	maxBatchBytes = 8 << 20
)

// committer is the group commit: one goroutine takes every pending write,
// runs them in one bbolt transaction and one commit (fdatasync of the data,
// then of the meta page), then wakes all waiters. While a commit is on disk
// the next batch gathers, so concurrent writers share fsyncs instead of
// queueing behind one another. bbolt's own Batch waits a fixed 10 ms per
// batch, which caps it near 80 commits/s.
type committer struct {
	db      *bbolt.DB
	spool   *spool
	reqs    chan *commitReq
	mu      sync.RWMutex // held for reading while sending; Close takes it to stop senders
	closed  bool
	quit    chan struct{}
	done    chan struct{}
	commits atomic.Int64
}

type commitReq struct {
	// fn runs inside the shared write transaction. It may run more than
	// once (when another request in the batch fails), so it must not have
	// effects outside tx other than setting its own results.
	fn func(tx *bbolt.Tx) error
	// after, if set, runs on the committer goroutine once the commit is on
	// disk, in commit order: the in-memory index follows the file exactly.
	after func()
	// file, if set, is a new body file: it and the spool directory are
	// synced before the commit, so the body is as durable as its record.
	file *os.File
	// body, if set, is a small body to append to the spool's current
	// segment; place learns where it went before fn runs.
	body  []byte
	place func(file string, off int64)
	off   int64 // where body went in the segment
	err   chan error
}

func newCommitter(db *bbolt.DB, sp *spool) *committer {
	c := &committer{
		db:    db,
		spool: sp,
		reqs:  make(chan *commitReq, maxBatch),
		quit:  make(chan struct{}),
		done:  make(chan struct{}),
	}
	go c.run()
	return c
}

// do runs fn in a write transaction and returns once it is committed and
// synced to disk, or with the reason it was not. It does not give up
// early: once submitted, the caller must learn whether the write happened.
func (c *committer) do(fn func(tx *bbolt.Tx) error, after func()) error {
	return c.submit(&commitReq{fn: fn, after: after, err: make(chan error, 1)})
}

// doWithFile is do for a write whose body file f was just created.
func (c *committer) doWithFile(fn func(tx *bbolt.Tx) error, after func(), f *os.File) error {
	return c.submit(&commitReq{fn: fn, after: after, file: f, err: make(chan error, 1)})
}

// doWithBody is do for a write whose small body goes into the spool's
// current segment.
func (c *committer) doWithBody(fn func(tx *bbolt.Tx) error, after func(), body []byte, place func(string, int64)) error {
	return c.submit(&commitReq{fn: fn, after: after, body: body, place: place, err: make(chan error, 1)})
}

func (c *committer) submit(r *commitReq) error {
	c.mu.RLock()
	if c.closed {
		c.mu.RUnlock()
		return ErrClosed
	}
	c.reqs <- r
	c.mu.RUnlock()
	return <-r.err
}

func (c *committer) close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		<-c.done
		return
	}
	c.closed = true
	c.mu.Unlock()
	close(c.quit)
	<-c.done
}

func (c *committer) run() {
	defer close(c.done)
	for {
		var batch []*commitReq
		select {
		case r := <-c.reqs:
			batch = append(batch, r)
		case <-c.quit:
			// No sender is left (close holds the lock); finish what is queued.
			for {
				select {
				case r := <-c.reqs:
					c.commit([]*commitReq{r})
				default:
					return
				}
			}
		}
		size := len(batch[0].body)
	gather:
		for len(batch) < maxBatch && size < maxBatchBytes {
			select {
			case r := <-c.reqs:
				batch = append(batch, r)
				size += len(r.body)
			default:
				break gather
			}
		}
		c.commit(batch)
	}
}

func (c *committer) commit(batch []*commitReq) {
	batch, seg := c.syncFiles(batch)
	if len(batch) == 0 {
		return
	}
	for len(batch) > 0 {
		failed, ferr := -1, error(nil)
		err := c.db.Update(func(tx *bbolt.Tx) error {
			for i, r := range batch {
				if err := r.fn(tx); err != nil {
					failed, ferr = i, err
					return err
				}
			}
			return nil
		})
		if failed >= 0 {
			// One request's own error: drop it, redo the rest.
			c.discard(seg, batch[failed])
			batch[failed].err <- ferr
			batch = slices.Delete(batch, failed, failed+1)
			continue
		}
		if err == nil {
			c.commits.Add(1)
			metricCommits.Inc()
		}
		for _, r := range batch {
			if err != nil {
				c.discard(seg, r) // no record refers to it (a full disk, say)
			} else if r.after != nil {
				r.after()
			}
			r.err <- err
		}
		return
	}
}

// discard frees the segment stretch of a request whose record was not
// committed.
func (c *committer) discard(seg *segment, r *commitReq) {
	if r.body != nil && seg != nil {
		c.spool.discard(seg.name, r.off, int64(len(r.body)))
	}
}

// syncFiles appends the small bodies of batch to the current segment, then
// syncs it and the other new body files all at once (the file system can
// commit them in one journal transaction), then the spool directory when
// it has a new name. It answers the requests whose body could not be
// stored and returns the rest.
func (c *committer) syncFiles(batch []*commitReq) (kept []*commitReq, seg *segment) {
	errs := make([]error, len(batch))
	var bodies [][]byte
	for _, r := range batch {
		if r.body != nil {
			bodies = append(bodies, r.body)
		}
	}
	var segErr error
	newNames := false
	if len(bodies) > 0 {
		var offs []int64
		seg, offs, newNames, segErr = c.spool.appendBatch(bodies)
		if segErr == nil {
			k := 0
			for _, r := range batch {
				if r.body != nil {
					r.off = offs[k]
					r.place(seg.name, r.off)
					k++
				}
			}
		}
	}
	// The syncs run side by side, the last on this goroutine: a batch of
	// small bodies has only the segment's, and a goroutine of its own
	// would only add a hand-over to the commit, and one more wait for a
	// processor behind busy goroutines (the handshakes of a cold start).
	var syncs []func()
	for i, r := range batch {
		switch {
		case r.file != nil:
			newNames = true
			syncs = append(syncs, func() {
				if err := r.file.Sync(); err != nil {
					errs[i] = fmt.Errorf("spool file %s: %w", r.file.Name(), plainErr(err))
				}
			})
		case r.body != nil:
			errs[i] = segErr
		}
	}
	if seg != nil {
		syncs = append(syncs, func() { segErr = c.spool.syncSegment(seg) })
	}
	if len(syncs) > 0 {
		var wg sync.WaitGroup
		for _, f := range syncs[:len(syncs)-1] {
			wg.Go(f)
		}
		syncs[len(syncs)-1]()
		wg.Wait()
	}
	var dirErr error
	if newNames {
		if dirErr = c.spool.syncDir(); dirErr != nil && seg != nil {
			// Its name may not be on disk, and later batches would not
			// sync the directory again.
			c.spool.spoil(seg)
		}
	}
	kept = batch[:0]
	for i, r := range batch {
		switch {
		case errs[i] != nil:
			r.err <- errs[i]
		case r.body != nil && segErr != nil:
			c.discard(seg, r)
			r.err <- segErr
		case dirErr != nil:
			c.discard(seg, r)
			r.err <- dirErr
		default:
			kept = append(kept, r)
		}
	}
	return kept, seg
}
