package queue

import (
	"cmp"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"
)

// spool holds message bodies beside the database: small ones appended to a
// segment file shared by many group commits, large ones in a file named by
// their queue id. The committer syncs what it wrote (and the directory,
// for a new file) before it commits the records, so a committed record
// always has its body. A crash can leave a file no record refers to, or
// bytes at a segment's end that none does; load removes the files.
type spool struct {
	dir string
	d   *os.File // the directory, for fsync

	mu      sync.Mutex
	cur     *segment                             // the segment the committer appends to
	segs    map[string]*segment                  // cur and every segment a message refers to
	noPunch bool                                 // the file system cannot punch holes
	segMax  int64                                // segmentMax; smaller in tests
	punch   func(f *os.File, off, n int64) error // punchHole; tests hold it up
	fsync   func(f *os.File) error               // f.Sync in write; tests hold it up or fail it

	// The space of messages that left is punched out by reclaim, off the
	// committer: fallocate(2) takes half a millisecond and more, and the
	// committer frees space with the queue's index locked.
	toPunch    map[string][]span // by segment name, for reclaim
	punching   bool              // reclaim is at work on what it took
	handed     uint64            // stretches handed to reclaim so far
	done       uint64            // of those, how many reclaim has punched
	punched    sync.Cond         // on mu: done moved, or reclaim went idle
	punchWake  chan struct{}     // one token: toPunch has work
	punchQuit  chan struct{}
	punchEnded chan struct{}
}

func openSpool(dir string) (*spool, error) {
	_, statErr := os.Stat(dir)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("cannot create spool directory %s: %w", dir, plainErr(err))
	}
	if errors.Is(statErr, fs.ErrNotExist) {
		// Made now: its entry must outlive a crash with the bodies
		// synced into it.
		if err := syncDir(filepath.Dir(dir)); err != nil {
			return nil, fmt.Errorf("cannot sync the directory of %s: %w", dir, plainErr(err))
		}
	}
	d, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("cannot open spool directory %s: %w", dir, plainErr(err))
	}
	s := &spool{dir: dir, d: d, segs: make(map[string]*segment), segMax: segmentMax, punch: punchHole,
		fsync: (*os.File).Sync, punchWake: make(chan struct{}, 1), punchQuit: make(chan struct{}), punchEnded: make(chan struct{})}
	s.punched.L = &s.mu
	go s.reclaim()
	return s, nil
}

func (s *spool) close() error {
	s.mu.Lock()
	if s.cur != nil {
		s.retireLocked(s.cur)
		s.cur = nil
	}
	s.mu.Unlock()
	close(s.punchQuit)
	<-s.punchEnded
	return s.d.Close()
}

func (s *spool) path(id string) string { return filepath.Join(s.dir, id) }

// write stores body under a new id, reading at most limit bytes, and
// syncs the file. On error nothing is left behind.
func (s *spool) write(now time.Time, body io.Reader, limit int64) (id string, size int64, err error) {
	f, id, size, err := s.create(now, body, limit)
	if err != nil {
		return "", 0, err
	}
	s.mu.Lock()
	fsync := s.fsync
	s.mu.Unlock()
	err = fsync(f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return "", 0, fmt.Errorf("spool file %s: %w", f.Name(), plainErr(err))
	}
	return id, size, nil
}

// create stores body under a new id, reading at most limit bytes, and
// returns the file still open and not yet synced: the group commit syncs
// it. On error nothing is left behind.
func (s *spool) create(now time.Time, body io.Reader, limit int64) (f *os.File, id string, size int64, err error) {
	for {
		id = newID(now)
		f, err = os.OpenFile(s.path(id), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if !errors.Is(err, fs.ErrExist) {
			break
		}
	}
	if err != nil {
		return nil, "", 0, fmt.Errorf("spool file: %w", plainErr(err))
	}
	src := &readErr{r: io.LimitReader(body, limit+1)}
	size, err = io.Copy(f, src)
	switch {
	case src.err != nil:
		err = fmt.Errorf("reading the message: %w", src.err)
	case err != nil:
		err = fmt.Errorf("spool file: %w", plainErr(err))
	case size > limit:
		err = fmt.Errorf("%w (%d bytes)", ErrTooBig, limit)
	}
	if err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, "", 0, err
	}
	return f, id, size, nil
}

// readErr remembers a read error, to tell it from a write error.
type readErr struct {
	r   io.Reader
	err error
}

func (r *readErr) Read(p []byte) (int, error) {
	n, err := r.r.Read(p)
	if err != nil && err != io.EOF {
		r.err = err
	}
	return n, err
}

// syncDir makes new and removed names durable.
func (s *spool) syncDir() error {
	if err := s.d.Sync(); err != nil {
		return fmt.Errorf("spool directory %s: %w", s.dir, plainErr(err))
	}
	return nil
}

// bodyLoc is where a body is: its own file, or a stretch of a segment.
type bodyLoc struct {
	id, file  string // file "" means the file named id
	off, size int64
}

func locOf(m *message) bodyLoc { return bodyLoc{m.ID, m.BodyFile, m.BodyOff, m.Size} }

func (s *spool) open(l bodyLoc) (io.ReadCloser, error) {
	name := l.file
	if name == "" {
		name = l.id
	}
	f, err := os.Open(s.path(name))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("message %s is no longer in the queue", l.id)
	}
	if err != nil {
		return nil, err
	}
	var r io.Reader = f
	if l.file != "" {
		r = io.NewSectionReader(f, l.off, l.size)
	}
	return struct {
		io.Reader
		io.Closer
	}{&wholeReader{r: r, left: l.size, id: l.id}, f}, nil
}

// errShortBody is a body shorter than its record says: its file was cut
// by something outside the queue (a restored backup, a file system
// fault).
var errShortBody = errors.New("body shorter than its record says (spool damaged)")

// wholeReader fails where a body ends short of its size instead of
// ending early, so that a cut message is never sent as a whole one.
type wholeReader struct {
	r    io.Reader
	left int64
	id   string
}

func (w *wholeReader) Read(p []byte) (int, error) {
	n, err := w.r.Read(p)
	w.left -= int64(n)
	if err == io.EOF && w.left > 0 {
		err = fmt.Errorf("message %s: %w, %d bytes missing", w.id, errShortBody, w.left)
	}
	return n, err
}

// read returns up to limit bytes of a body (all of it if limit < 0).
func (s *spool) read(l bodyLoc, limit int64) ([]byte, error) {
	f, err := s.open(l)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if limit < 0 {
		return io.ReadAll(f)
	}
	return io.ReadAll(io.LimitReader(f, limit))
}

// batchPrefix starts the names of segment files, which hold the small
// bodies of many group commits one after another.
const batchPrefix = "b-"

// segmentMax is the size at which the committer starts a new segment. It
// bounds the file, not the disk space: the stretches of messages that have
// left are punched out (see release), and a segment is removed once no
// message refers to it.
const segmentMax = 64 << 20

// punchEvery is how much of the current segment may have left before its
// space is given back (see freeLocked).
const punchEvery = 1 << 20

// segment is a file of small bodies. Only the committer appends to the
// current one; records name it with an offset, so a body never moves.
type segment struct {
	name string
	f    *os.File // open for appending while current, nil once retired
	// size is where the next batch goes: everything before it is written,
	// but only the stretches whose records committed are referred to.
	size      int64
	refs      int    // messages in the index whose body is here
	dead      []span // stretches no record refers to any more, not yet punched
	deadBytes int64  // their length
	// retire makes the committer start a new segment at its next batch:
	// this one is full, or a write or sync of it failed and its state on
	// disk is unknown.
	retire bool
}

type span struct{ off, len int64 }

// appendBatch writes bodies one after another at the end of the current
// segment, starting a new one first when needed, and returns the segment
// with each body's offset. Nothing is synced: the committer syncs the
// segment (and, when fresh, the directory) before it commits the records.
// Only the committer calls it.
func (s *spool) appendBatch(bodies [][]byte) (seg *segment, offs []int64, fresh bool, err error) {
	s.mu.Lock()
	seg = s.cur
	if seg == nil || seg.retire || seg.size >= s.segMax {
		if seg != nil {
			s.retireLocked(seg)
		}
		s.cur = nil
		s.mu.Unlock()
		seg, err = s.newSegment()
		if err != nil {
			return nil, nil, false, err
		}
		fresh = true
		s.mu.Lock()
		s.cur = seg
		s.segs[seg.name] = seg
	}
	start := seg.size
	s.mu.Unlock()

	off := start
	for _, b := range bodies {
		offs = append(offs, off)
		off += int64(len(b))
	}
	// writeBuffers consumes its argument; bodies stay as they were.
	werr := writeBuffers(seg.f, slices.Clone(bodies))
	s.mu.Lock()
	defer s.mu.Unlock()
	seg.size = off
	if werr != nil {
		// Part of the batch may be on disk, at offsets the file position
		// no longer matches: never append to this segment again.
		seg.retire = true
		seg.dead = append(seg.dead, span{start, off - start})
		return nil, nil, fresh, fmt.Errorf("spool file %s: %w", seg.f.Name(), plainErr(werr))
	}
	return seg, offs, fresh, nil
}

func (s *spool) newSegment() (*segment, error) {
	for {
		name := batchPrefix + newID(time.Now())
		f, err := os.OpenFile(s.path(name), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
		if errors.Is(err, fs.ErrExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("spool file: %w", plainErr(err))
		}
		return &segment{name: name, f: f}, nil
	}
}

// syncSegment makes a batch appended to seg durable. A failure retires the
// segment: after a failed fsync the kernel may have dropped the pages, so
// nothing more is written to it.
func (s *spool) syncSegment(seg *segment) error {
	if err := fdatasync(seg.f); err != nil {
		s.spoil(seg)
		return fmt.Errorf("spool file %s: %w", seg.f.Name(), plainErr(err))
	}
	return nil
}

// spoil makes the committer leave seg for a new segment at its next batch.
func (s *spool) spoil(seg *segment) {
	s.mu.Lock()
	seg.retire = true
	s.mu.Unlock()
}

// retain counts a message in the index whose body is in the segment name
// (at load, a segment of an earlier run).
func (s *spool) retain(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	seg := s.segs[name]
	if seg == nil {
		seg = &segment{name: name}
		s.segs[name] = seg
	}
	seg.refs++
}

// release forgets a counted message's body: the segment goes when nothing
// refers to it any more, and otherwise the body's stretch is freed.
func (s *spool) release(name string, off, size int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	seg := s.segs[name]
	if seg == nil {
		return
	}
	seg.refs--
	s.freeLocked(seg, span{off, size})
}

// discard frees the stretch of a body whose record was never counted: its
// commit failed, or the message was done on its first write.
func (s *spool) discard(name string, off, size int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if seg := s.segs[name]; seg != nil {
		s.freeLocked(seg, span{off, size})
	}
}

func (s *spool) freeLocked(seg *segment, sp span) {
	if seg.f == nil {
		// Retired: a message that waited (a retry, a hold) has left.
		if seg.refs <= 0 {
			delete(s.segs, seg.name)
			s.remove(seg.name)
			return
		}
		s.punchLaterLocked(seg.name, []span{sp})
		return
	}
	seg.dead = appendSpan(seg.dead, sp)
	seg.deadBytes += sp.len
	if seg.refs <= 0 || seg.deadBytes >= punchEvery {
		// Everything committed to the current segment has left (the usual
		// state of a relay that keeps up), or enough has: give the space
		// back in one go rather than a system call per message.
		s.punchDeadLocked(seg)
	}
}

// punchLaterLocked hands stretches of the segment name to reclaim.
func (s *spool) punchLaterLocked(name string, spans []span) {
	if s.noPunch {
		return
	}
	if s.toPunch == nil {
		s.toPunch = make(map[string][]span)
	}
	s.toPunch[name] = append(s.toPunch[name], spans...)
	s.handed += uint64(len(spans))
	select {
	case s.punchWake <- struct{}{}:
	default: // reclaim has a token already
	}
}

// reclaim punches out what punchLaterLocked handed over, until close;
// then it does what is left and returns. It opens each segment by name: a
// segment may be retired (its file closed) or removed meanwhile, and a
// dead stretch is never written again, so punching it late is safe.
func (s *spool) reclaim() {
	defer close(s.punchEnded)
	for {
		quit := false
		select {
		case <-s.punchWake:
		case <-s.punchQuit:
			quit = true
		}
		s.mu.Lock()
		work, taken := s.toPunch, s.handed
		s.toPunch, s.punching = nil, true
		s.mu.Unlock()
		for name, spans := range work {
			s.punchFile(name, mergeSpans(spans))
		}
		s.mu.Lock()
		s.punching, s.done = false, taken
		s.punched.Broadcast()
		more := len(s.toPunch) > 0
		s.mu.Unlock()
		if quit && !more {
			return
		}
	}
}

// waitPunched returns once reclaim has punched everything handed to it.
func (s *spool) waitPunched() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(s.toPunch) > 0 || s.punching {
		s.punched.Wait()
	}
}

// flush hands reclaim the stretches of name that have left, without
// waiting for more to gather. Once reclaim has punched the ticket it
// returns, they are gone from the disk (see waitFor).
func (s *spool) flush(name string) (ticket uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if seg := s.segs[name]; seg != nil && seg.f != nil {
		s.punchDeadLocked(seg)
	}
	return s.handed
}

// waitFor returns once reclaim has punched every stretch handed to it up
// to ticket. Unlike waitPunched it ends under a steady stream of new work,
// and at once where holes cannot be punched.
func (s *spool) waitFor(ticket uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for s.done < ticket && !s.noPunch {
		s.punched.Wait()
	}
}

// retireLocked closes a segment the committer no longer appends to.
func (s *spool) retireLocked(seg *segment) {
	if seg.refs <= 0 {
		seg.f.Close()
		delete(s.segs, seg.name)
		s.remove(seg.name)
		return
	}
	s.punchDeadLocked(seg)
	seg.f.Close()
	seg.f = nil
}

// punchDeadLocked hands the dead stretches of an open segment to reclaim.
func (s *spool) punchDeadLocked(seg *segment) {
	if len(seg.dead) == 0 {
		return
	}
	s.punchLaterLocked(seg.name, seg.dead)
	seg.dead, seg.deadBytes = nil, 0
}

// reclaimGaps hands reclaim every stretch of the segments of an earlier
// run that no record refers to, given the stretches that records do
// refer to (live, by segment). A crash can leave such stretches: a
// message that left before its stretch was punched (less than
// punchEvery had gathered, or a delivery was still reading it), or a
// batch written but never committed. Nothing appends to these segments
// any more, so what no record refers to now never will be.
func (s *spool) reclaimGaps(live map[string][]span) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for name, spans := range live {
		fi, err := os.Stat(s.path(name))
		if err != nil {
			continue
		}
		var gaps []span
		at := int64(0)
		for _, sp := range mergeSpans(spans) {
			if sp.off > at {
				gaps = append(gaps, span{at, sp.off - at})
			}
			at = max(at, sp.off+sp.len)
		}
		if fi.Size() > at {
			gaps = append(gaps, span{at, fi.Size() - at})
		}
		if len(gaps) > 0 {
			s.punchLaterLocked(name, gaps)
		}
	}
}

// punchFile frees stretches of the segment name, by name: reclaim calls it
// without the lock. A segment removed meanwhile has nothing left to free,
// and a stretch that is a hole already (punched before a restart) is
// skipped, at the cost of a seek.
func (s *spool) punchFile(name string, spans []span) {
	f, err := os.OpenFile(s.path(name), os.O_WRONLY, 0)
	if err != nil {
		return
	}
	defer f.Close()
	for _, sp := range spans {
		if !hasData(f, sp.off, sp.len) {
			continue
		}
		if err := s.punch(f, sp.off, sp.len); err != nil {
			// The space of this stretch comes back when the segment is
			// removed. Only a file system that cannot punch holes stops
			// the punching; another failure (ENOSPC when a punch splits
			// an extent on a full disk, EIO) is this stretch's alone.
			if cannotPunch(err) {
				s.mu.Lock()
				s.noPunch = true
				s.mu.Unlock()
				return
			}
		}
	}
}

// appendSpan adds sp to spans, joining it to the last one when they touch:
// messages mostly leave in the order they came, so the list stays short.
func appendSpan(spans []span, sp span) []span {
	if n := len(spans); n > 0 && spans[n-1].off+spans[n-1].len == sp.off {
		spans[n-1].len += sp.len
		return spans
	}
	return append(spans, sp)
}

// mergeSpans sorts spans and joins those that touch or overlap.
func mergeSpans(spans []span) []span {
	slices.SortFunc(spans, func(a, b span) int { return cmp.Compare(a.off, b.off) })
	out := spans[:0]
	for _, sp := range spans {
		if n := len(out); n > 0 && out[n-1].off+out[n-1].len >= sp.off {
			out[n-1].len = max(out[n-1].len, sp.off+sp.len-out[n-1].off)
			continue
		}
		out = append(out, sp)
	}
	return out
}

// remove deletes a body file whose records are gone. A failure leaves a
// file that the next start sweeps away.
func (s *spool) remove(name string) { os.Remove(s.path(name)) }

// sweep removes body files that no record refers to: bodies written just
// before a crash, before their record was committed. With keepSegments
// it leaves every segment, which a record it could not read may share.
func (s *spool) sweep(keep map[string]bool, keepSegments bool) (int, error) {
	names, err := s.d.Readdirnames(-1)
	if err != nil {
		return 0, fmt.Errorf("reading spool directory %s: %w", s.dir, err)
	}
	if _, err := s.d.Seek(0, io.SeekStart); err != nil {
		return 0, err
	}
	n := 0
	for _, name := range names {
		segment := strings.HasPrefix(name, batchPrefix)
		if !keep[name] && (len(name) == idLen || segment && !keepSegments) {
			if os.Remove(s.path(name)) == nil {
				n++
			}
		}
	}
	return n, nil
}
