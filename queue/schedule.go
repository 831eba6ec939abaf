package queue

import (
	"bytes"
	"container/heap"
	"context"
	"fmt"
	"io"
	"slices"
	"sync"
	"time"

	"go.etcd.io/bbolt"
)

// entry is the in-memory summary of one stored message: enough to schedule
// it and to count it in metrics, a few hundred bytes per message.
type entry struct {
	id       key
	arrived  int64  // Unix nanoseconds (see timed)
	bodyFile string // the spool segment holding the body, "" for a file of its own
	bodyOff  int64  // where in bodyFile
	size     int64
	counts   [3]int32 // pending recipients: queued, deferred, held
	// slot0 is the first destination domain's slot, in the entry's own
	// allocation, and more holds the others (see slots). Most messages go
	// to one domain, and every pointer in the index is one more for the
	// garbage collector to follow on every cycle, 100,000 times over with
	// a queue of 100,000 deferred messages.
	slot0 slot
	more  []*slot
	// fresh is the message as Enqueue committed it, with its small body,
	// kept for the first attempt at each of its domains (see firstCopy).
	fresh *firstCopy
	// readers counts the bodies openBody handed out and not yet closed;
	// left is set when the message leaves the index. The body is freed
	// when both hold: a punched stretch reads as zeros (see openBody).
	readers int32
	left    bool
}

// slots yields e's slots, one per destination domain.
func (e *entry) slots(yield func(*slot) bool) {
	if e.slot0.e == nil || !yield(&e.slot0) {
		return
	}
	for _, s := range e.more {
		if !yield(s) {
			return
		}
	}
}

// firstCopy is a just-committed message and its body in memory. It is
// valid only while the record on disk is the one Enqueue wrote: the next
// commit that touches the message (an outcome, an operator's hold,
// release, bounce or delete) drops it, and the attempt after that reads
// the disk as always.
type firstCopy struct {
	m     *message // never modified once committed
	body  []byte
	slots int // first attempts still to take it
}

// Bounds of the memory that first attempts may take from: small bodies
// just committed wait here for a worker. A message that does not fit is
// read from disk as always. The copies fill up only when delivery lags
// far behind acceptance, when a disk read no longer matters; the bound
// keeps that case well inside the 150 MB a queue of 100,000 messages may
// use (a full set of 4 KiB copies adds about 20 MB).
const (
	firstCopyMaxBytes = 16 << 20
	firstCopyMaxCount = 4096
)

// slot is one (message, destination domain) pair: the unit of scheduling.
type slot struct {
	e        *entry
	domain   string
	due      int64 // earliest next attempt of a pending recipient (Unix ns, see timed); 0: none
	inflight bool  // a delivery is running; never two at once
	ready    bool  // due and waiting for a worker or a domain slot
	gone     bool  // the message left the queue
	// cancel cuts off the delivery in flight (an operator's bounce, delete
	// or hold of its recipients, see carriersLocked); nil when none runs.
	cancel context.CancelCauseFunc
	// carrying are the recipients (indexes into the record) of the
	// delivery in flight, nil until it has read them.
	carrying []int
}

// timed is a slot's due time in the heap. The index keeps times in Unix
// nanoseconds: a time.Time would add a pointer (its Location) per queued
// message for the garbage collector to follow on every cycle.
type timed struct {
	due int64
	s   *slot
}

type timerHeap []timed

func (h timerHeap) Len() int           { return len(h) }
func (h timerHeap) Less(i, j int) bool { return h[i].due < h[j].due }
func (h timerHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *timerHeap) Push(x any)        { *h = append(*h, x.(timed)) }
func (h *timerHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// scheduler holds the due times and the ready lists, guarded by Queue.mu.
// Stale heap items are skipped when popped rather than removed.
type scheduler struct {
	timers timerHeap
	// due are slots pushed already due, in order: a new message, due at
	// once, skips the heap, where it would climb past every deferred
	// message's timer to the top and then sink back from there, two
	// passes of cache misses through a heap as large as the backlog.
	due     []timed
	ready   map[string][]*slot // domain → due slots waiting for a worker
	domains []string           // domains with ready slots, served round-robin
	next    int
	active  map[string]int // domain → deliveries in flight
	running int
	// throttled lowers a domain's limit of deliveries in flight for a
	// while, when its servers asked us to slow down (Job.Throttle): the
	// lowest of the signals still in force, none covered by another.
	throttled map[string][]throttle
}

type throttle struct {
	limit int
	until time.Time
}

func newScheduler() scheduler {
	return scheduler{ready: make(map[string][]*slot), active: make(map[string]int), throttled: make(map[string][]throttle)}
}

// throttle lowers domain's deliveries in flight to limit (at least one,
// so the domain keeps moving and its finishing delivery wakes the next)
// until d has passed.
//
// Signals combine rather than replace: the limit is the lowest of those
// still in force. The Deliverer computes its signals in order but hands
// them over after its own lock, so a higher limit computed earlier may
// arrive after a lower one; replacing would allow one delivery more than
// the destination takes. A higher limit that lasts longer is kept too,
// for after the lower one ends. Each kept signal is lower or lasts longer
// than every other, so with limits capped at MaxConnsPerDomain a domain
// has at most that many of them.
func (q *Queue) throttle(domain string, limit int, d time.Duration) {
	q.mu.Lock()
	defer q.mu.Unlock()
	now := q.opts.Now()
	for k := range q.sched.throttled {
		q.liveThrottlesLocked(k, now) // few entries: only destinations that complained
	}
	t := throttle{limit: min(max(1, limit), q.opts.MaxConnsPerDomain), until: now.Add(d)}
	ts := q.sched.throttled[domain]
	for _, o := range ts {
		if o.limit <= t.limit && !o.until.Before(t.until) {
			return // as low and as long already
		}
	}
	ts = slices.DeleteFunc(ts, func(o throttle) bool { return o.limit >= t.limit && !o.until.After(t.until) })
	q.sched.throttled[domain] = append(ts, t)
}

// liveThrottlesLocked drops domain's throttles that have ended by now and
// returns the others.
func (q *Queue) liveThrottlesLocked(domain string, now time.Time) []throttle {
	ts := slices.DeleteFunc(q.sched.throttled[domain], func(t throttle) bool { return !now.Before(t.until) })
	if len(ts) == 0 {
		delete(q.sched.throttled, domain)
		return nil
	}
	q.sched.throttled[domain] = ts
	return ts
}

// limitLocked is how many deliveries to domain may run at once now.
func (q *Queue) limitLocked(domain string, now time.Time) int {
	n := q.opts.MaxConnsPerDomain
	if _, ok := q.sched.throttled[domain]; !ok {
		return n
	}
	for _, t := range q.liveThrottlesLocked(domain, now) {
		n = min(n, t.limit)
	}
	return n
}

// indexPut records the state of m after a committed write. It runs on
// the committer goroutine (or at load), so updates arrive in commit order.
func (q *Queue) indexPut(m *message) { q.indexPutFirst(m, nil) }

// indexPutFirst is indexPut for a message Enqueue just committed with its
// small body, which first attempts may then take from memory.
func (q *Queue) indexPutFirst(m *message, body []byte) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.indexPutLocked(m, body)
}

// indexPutLocked is indexPutFirst with q.mu held.
func (q *Queue) indexPutLocked(m *message, body []byte) {
	k, ok := keyOf(m.ID)
	if !ok {
		// Not reached: newID makes ids, and load refuses a record whose
		// id is not one, which the next start reports as damaged.
		q.log.Error("queue: not scheduling a message whose id is no queue id; restart to have it reported", "id", m.ID)
		return
	}
	e := q.index[k]
	if e != nil {
		q.dropFirstLocked(e) // the record changed: the disk has the truth
	}
	if m.done() {
		if e != nil {
			q.indexRemoveLocked(e)
		} else if m.BodyFile != "" { // done on its first write (a DSN to <> say)
			q.spool.discard(m.BodyFile, m.BodyOff, m.Size)
		} else {
			q.spool.remove(m.ID)
		}
		return
	}
	if _, ok := q.owed[m.ID]; ok != m.owesNotice() {
		if ok {
			delete(q.owed, m.ID)
		} else {
			q.owed[m.ID] = false
		}
	}
	if e == nil {
		e = &entry{id: k, arrived: unixNano(m.Arrived), bodyFile: m.BodyFile, bodyOff: m.BodyOff, size: m.Size}
		q.index[k] = e
		if m.BodyFile != "" {
			q.spool.retain(m.BodyFile)
		}
		if len(q.index) == 1 {
			metricOldest.Set(max(q.opts.Now().Sub(fromUnixNano(e.arrived)).Seconds(), 0))
		}
	}
	defer q.countLocked(e, 1)
	q.countLocked(e, -1)
	e.counts = [3]int32{}
	// Each domain's earliest next attempt of a pending recipient; zero
	// when none is pending. A message has few domains: a slice, not a map.
	type domainDue struct {
		domain string
		due    time.Time
	}
	var buf [4]domainDue
	due := buf[:0]
	for i := range m.Recipients {
		r := &m.Recipients[i]
		switch r.State {
		case StateQueued:
			e.counts[0]++
		case StateDeferred:
			e.counts[1]++
		case StateHeld:
			e.counts[2]++
		}
		j := 0
		for j < len(due) && due[j].domain != r.Domain {
			j++
		}
		if j == len(due) {
			due = append(due, domainDue{domain: r.Domain})
		}
		if d := &due[j]; r.pending() && (d.due.IsZero() || r.NextAttempt.Before(d.due)) {
			d.due = r.NextAttempt
		}
	}
	if body != nil && q.firstBytes+int64(len(body)) <= q.firstMaxBytes && q.firstCount < q.firstMaxCount {
		e.fresh = &firstCopy{m: m, body: body, slots: len(due)}
		q.firstBytes += int64(len(body))
		q.firstCount++
	}
	for _, d := range due {
		var s *slot
		for x := range e.slots {
			if x.domain == d.domain {
				s = x
				break
			}
		}
		if s == nil {
			if e.slot0.e == nil {
				e.slot0 = slot{e: e, domain: d.domain}
				s = &e.slot0
			} else {
				s = &slot{e: e, domain: d.domain}
				e.more = append(e.more, s)
			}
		}
		s.due = unixNano(d.due)
		q.pushLocked(s)
	}
}

// indexRemoveLocked forgets a message whose record is gone and removes its
// body file, or frees its stretch of a segment.
func (q *Queue) indexRemoveLocked(e *entry) {
	q.dropFirstLocked(e)
	for s := range e.slots {
		s.gone = true
	}
	q.countLocked(e, -1)
	delete(q.index, e.id)
	delete(q.owed, string(e.id[:]))
	if len(q.index) == 0 {
		metricOldest.Set(0)
	}
	metricMessages.Set(float64(len(q.index)))
	e.left = true
	if e.readers == 0 {
		q.freeBodyLocked(e)
	}
}

// freeBodyLocked removes the body file of e, or frees its stretch of a
// segment, once e has left and no reader has its body open.
func (q *Queue) freeBodyLocked(e *entry) {
	if e.bodyFile == "" {
		q.spool.remove(e.id.String())
		return
	}
	q.spool.release(e.bodyFile, e.bodyOff, e.size)
}

// openBody opens the stored body of e for a delivery attempt (Job.Open).
// Once the message has left the queue (delivered, deleted, bounced) it
// fails, and while the body is open its space is not freed even if the
// message leaves meanwhile: punched out, a stretch of a segment reads as
// zeros, and a remote would take those for the message. So a delivery
// that has started sends the message whole, as it does from a body file
// of its own (removed, still open) or from the first attempt's copy.
func (q *Queue) openBody(e *entry) (io.ReadCloser, error) {
	if err := q.holdBody(e); err != nil {
		return nil, err
	}
	rc, err := q.spool.open(bodyLoc{id: e.id.String(), file: e.bodyFile, off: e.bodyOff, size: e.size})
	if err != nil {
		q.closeBody(e)
		return nil, err
	}
	return &openedBody{ReadCloser: rc, closed: func() { q.closeBody(e) }}, nil
}

// holdBody counts a reader of e's body, which closeBody ends, or fails
// once the message has left the queue.
func (q *Queue) holdBody(e *entry) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if e.left {
		return fmt.Errorf("message %s is no longer in the queue", e.id)
	}
	e.readers++
	return nil
}

// closeBody counts a reader of e's body closed, and frees the body when
// it was the last one of a message that has left. Such a late free is
// rare (an operator's delete or bounce during a delivery), so its
// stretch is handed to reclaim at once rather than with the next MiB.
func (q *Queue) closeBody(e *entry) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if e.readers--; e.readers > 0 || !e.left {
		return
	}
	q.freeBodyLocked(e)
	if e.bodyFile != "" {
		q.spool.flush(e.bodyFile)
	}
}

// openedBody is a body from openBody; Close tells the queue once.
type openedBody struct {
	io.ReadCloser
	once   sync.Once
	closed func()
}

func (b *openedBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.closed)
	return err
}

// dropFirstLocked forgets e's in-memory first copy, if any.
func (q *Queue) dropFirstLocked(e *entry) {
	if e.fresh == nil {
		return
	}
	q.firstBytes -= int64(len(e.fresh.body))
	q.firstCount--
	e.fresh = nil
}

// takeFirstLocked returns e's first copy for one first attempt, or nil
// when the attempt must read the disk.
func (q *Queue) takeFirstLocked(e *entry) *firstCopy {
	f := e.fresh
	if f == nil {
		return nil
	}
	if f.slots--; f.slots <= 0 {
		q.dropFirstLocked(e)
	}
	return f
}

// pushLocked arms s's timer, unless it is running or already waiting.
func (q *Queue) pushLocked(s *slot) {
	if s.gone || s.inflight || s.ready || s.due == 0 {
		return
	}
	if s.due <= q.opts.Now().UnixNano() {
		q.sched.due = append(q.sched.due, timed{due: s.due, s: s})
		return
	}
	heap.Push(&q.sched.timers, timed{due: s.due, s: s})
}

// Run delivers due messages until ctx is done. It then gives in-flight
// deliveries and DSN writes Options.ShutdownGrace to finish, cancels the
// deliveries still running (they stay queued and are due again at the
// next start), leaves the DSNs not yet written owed for the next start,
// and returns.
func (q *Queue) Run(ctx context.Context) error {
	for _, d := range q.damaged {
		q.log.Error("queue: damaged message record, not scheduled", "id", d.id, "err", d.err)
	}
	q.damaged = nil
	q.log.Info("queue loaded", q.loaded...)
	jobCtx, cancelJobs := context.WithCancelCause(context.WithoutCancel(ctx))
	defer cancelJobs(nil)
	var wg sync.WaitGroup
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	metricsTick := time.NewTicker(10 * time.Second)
	defer metricsTick.Stop()
	q.updateGauges()
	for {
		wait := q.dispatch(jobCtx, &wg)
		timer.Reset(wait)
		select {
		case <-ctx.Done():
			done := make(chan struct{})
			go func() { wg.Wait(); close(done) }()
			grace := time.NewTimer(q.opts.ShutdownGrace)
			defer grace.Stop()
			select {
			case <-done:
			case <-grace.C:
				q.log.Warn("queue: cancelling deliveries still running at shutdown")
				q.graceOver.Store(true)
				cancelJobs(ErrStopping)
				<-done
			}
			q.updateGauges()
			return nil
		case <-q.kick:
		case <-timer.C:
		case <-metricsTick.C:
			q.updateGauges()
		}
	}
}

// dispatch moves due slots to the ready lists, starts as many deliveries
// as the limits allow and returns how long to sleep.
func (q *Queue) dispatch(ctx context.Context, wg *sync.WaitGroup) time.Duration {
	q.mu.Lock()
	defer q.mu.Unlock()
	now := q.opts.Now()
	sc := &q.sched
	q.collectDueLocked(now)
	for sc.running < q.opts.Workers {
		s := q.nextReadyLocked()
		if s == nil {
			break
		}
		s.ready, s.inflight = false, true
		sc.running++
		sc.active[s.domain]++
		attempt, cancel := context.WithCancelCause(ctx)
		s.cancel = cancel
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer cancel(nil)
			q.work(attempt, s)
		}()
	}
	wait := time.Hour
	if len(q.owed) > 0 && !q.noticing {
		if now.Before(q.noticeNext) {
			wait = q.noticeNext.Sub(now)
		} else {
			q.noticePassLocked(wg)
		}
	}
	if len(sc.timers) == 0 {
		return wait
	}
	return max(min(time.Duration(sc.timers[0].due-now.UnixNano()), wait), time.Millisecond)
}

// collectDueLocked moves the slots due by now to the ready lists: the
// heap's in the order of their due times, then the due list's in the
// order they were pushed (a message's id order at the start, arrival
// order after).
func (q *Queue) collectDueLocked(now time.Time) {
	sc := &q.sched
	for len(sc.timers) > 0 && sc.timers[0].due <= now.UnixNano() {
		q.readyLocked(heap.Pop(&sc.timers).(timed))
	}
	for i, t := range sc.due {
		q.readyLocked(t)
		sc.due[i] = timed{}
	}
	sc.due = sc.due[:0]
}

// readyLocked puts a due slot on its domain's ready list, unless t is
// stale: the slot is running, waiting already, gone, or due at another
// time since.
func (q *Queue) readyLocked(t timed) {
	sc, s := &q.sched, t.s
	if s.gone || s.inflight || s.ready || t.due != s.due {
		return
	}
	s.ready = true
	if len(sc.ready[s.domain]) == 0 {
		sc.domains = append(sc.domains, s.domain)
	}
	sc.ready[s.domain] = append(sc.ready[s.domain], s)
}

// noticePassLocked tries again to queue the DSNs that are owed (after a
// full disk, say, or a stop), off the scheduler's goroutine.
func (q *Queue) noticePassLocked(wg *sync.WaitGroup) {
	ids := make([]string, 0, len(q.owed))
	for id := range q.owed {
		ids = append(ids, id)
	}
	q.noticing = true
	wg.Go(func() {
		q.sendNotices(ids)
		q.mu.Lock()
		q.noticing, q.noticeNext = false, q.opts.Now().Add(noticeRetry)
		q.mu.Unlock()
		q.wake()
	})
}

// nextReadyLocked picks the next ready slot round-robin over domains,
// skipping domains at their connection limit: a slow or deferred domain
// never holds up the others.
func (q *Queue) nextReadyLocked() *slot {
	sc := &q.sched
	now := q.opts.Now()
	for checked := 0; checked < len(sc.domains); {
		if sc.next >= len(sc.domains) {
			sc.next = 0
		}
		d := sc.domains[sc.next]
		if sc.active[d] >= q.limitLocked(d, now) {
			sc.next++
			checked++
			continue
		}
		list := sc.ready[d]
		var s *slot
		for len(list) > 0 && s == nil {
			if !list[0].gone {
				s = list[0]
			}
			list[0].ready = false
			list[0] = nil
			list = list[1:]
		}
		if len(list) == 0 {
			// The next domain slides into this position.
			delete(sc.ready, d)
			sc.domains = append(sc.domains[:sc.next], sc.domains[sc.next+1:]...)
		} else {
			sc.ready[d] = list
			sc.next++
		}
		if s != nil {
			return s
		}
	}
	return nil
}

// work runs one delivery of s and records the outcome. ctx is the
// attempt's own: Run cancels it at a stop once the grace is over, and an
// operator's bounce, delete or hold of its recipients cuts it off.
func (q *Queue) work(ctx context.Context, s *slot) {
	retryAt := time.Time{}
	defer func() { q.finish(s, retryAt) }()
	q.mu.Lock()
	startDue := s.due
	q.mu.Unlock()
	job, idx, nextDue, err := q.loadJob(s)
	if err != nil {
		q.log.Error("queue: cannot load message for delivery", "id", s.e.id.String(), "domain", s.domain, "err", err)
		retryAt = q.opts.Now().Add(time.Minute)
		return
	}
	if job == nil {
		// Nothing due after all (an operator held it, say). Unless a commit
		// rescheduled the slot meanwhile, wait for what the record says.
		q.mu.Lock()
		if s.due == startDue {
			s.due = unixNano(nextDue)
		}
		q.mu.Unlock()
		return
	}
	q.mu.Lock()
	s.carrying = idx
	q.mu.Unlock()
	statuses := q.opts.Deliverer.Deliver(ctx, job)
	if err := q.applyOutcome(job, idx, statuses, context.Cause(ctx)); err != nil {
		// Nothing was recorded; try again later rather than in a loop.
		q.log.Error("queue: cannot record delivery outcome; will retry", "id", job.ID, "domain", job.Domain, "err", err)
		retryAt = q.opts.Now().Add(time.Minute)
	}
}

func (q *Queue) finish(s *slot, retryAt time.Time) {
	q.mu.Lock()
	s.inflight, s.cancel, s.carrying = false, nil, nil
	q.sched.running--
	if q.sched.active[s.domain]--; q.sched.active[s.domain] <= 0 {
		delete(q.sched.active, s.domain)
	}
	if !retryAt.IsZero() {
		s.due = unixNano(retryAt)
	}
	q.pushLocked(s)
	q.mu.Unlock()
	q.wake()
}

// loadJob reads the recipients of s that are due now. It returns a nil
// job when none is (they were delivered, held or rescheduled meanwhile),
// with the earliest later attempt at the domain (zero: none).
func (q *Queue) loadJob(s *slot) (job *Job, idx []int, nextDue time.Time, err error) {
	now := q.opts.Now()
	q.mu.Lock()
	f := q.takeFirstLocked(s.e)
	q.mu.Unlock()
	if f != nil {
		// The record on disk is still the one f holds: no commit touched
		// the message since Enqueue, or f would be gone.
		job, idx, nextDue = q.jobFor(s, f.m, now, func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(f.body)), nil
		})
		if job != nil {
			metricFirstFromMemory.Inc()
		}
		return job, idx, nextDue, nil
	}
	err = q.db.View(func(tx *bbolt.Tx) error {
		m, err := q.recs.get(tx, s.e.id.String())
		if err != nil || m == nil {
			return err
		}
		job, idx, nextDue = q.jobFor(s, m, now, func() (io.ReadCloser, error) { return q.openBody(s.e) })
		return nil
	})
	return job, idx, nextDue, err
}

// jobFor builds the job of the recipients of m at s's domain that are due
// now; nil when none is, with the earliest later attempt there.
func (q *Queue) jobFor(s *slot, m *message, now time.Time, open func() (io.ReadCloser, error)) (job *Job, idx []int, nextDue time.Time) {
	minAttempts := -1
	var rcpts []RecipientParams
	for i := range m.Recipients {
		r := &m.Recipients[i]
		if r.Domain != s.domain || !r.pending() {
			continue
		}
		if r.NextAttempt.After(now) {
			if nextDue.IsZero() || r.NextAttempt.Before(nextDue) {
				nextDue = r.NextAttempt
			}
			continue
		}
		idx = append(idx, i)
		rcpts = append(rcpts, r.RecipientParams)
		if minAttempts < 0 || r.Attempts < minAttempts {
			minAttempts = r.Attempts
		}
	}
	if len(idx) == 0 {
		return nil, nil, nextDue
	}
	env := m.Envelope
	env.Recipients = rcpts
	job = &Job{
		ID:         m.ID,
		Domain:     s.domain,
		Envelope:   env,
		Recipients: rcpts,
		Size:       m.Size,
		Arrived:    m.Arrived,
		Attempt:    minAttempts + 1,
		Open:       open,
		Throttle:   func(limit int, d time.Duration) { q.throttle(s.domain, limit, d) },
	}
	return job, idx, nextDue
}
