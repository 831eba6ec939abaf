// Package logwriter keeps the daemon's log off the paths it describes.
//
// Every log.Logger and slog handler writes a line with one write(2) while
// holding its mutex, so at thousands of messages a second the goroutines
// that accept and deliver mail queue up behind the log's system calls, and
// behind a log reader that stalls (a full pipe to journald). A Writer
// takes each line into a buffer and one goroutine writes whatever has
// gathered: one system call for many lines under load, each line at once
// when the daemon is idle. Before it writes, that goroutine lets the
// goroutines that are ready to run go first, so that under load the lines
// they are about to log join the write: it costs nothing when the daemon
// is idle, unlike waiting for a timer. It is the queue's group commit
// applied to the log, with the same bound: when the buffer is full,
// writers wait, as they would on a full pipe.
//
// The price: a line still in the buffer when the process is killed
// (SIGKILL, a crash) is lost, where write(2) would have left it in the
// pipe. The window is the time the writing goroutine takes to run, and
// the log is not the record of what was done: the queue is.
package logwriter

import (
	"io"
	"runtime"
	"sync"
)

// DefaultLimit is how many bytes may wait to be written: about half a
// second of the log at 4,000 messages a second.
const DefaultLimit = 1 << 20

// Writer batches writes to an underlying writer. Each Write must be whole
// lines (as log and slog write them); lines from concurrent writers never
// mix. Call Close to write what is left before the process exits.
type Writer struct {
	w     io.Writer
	limit int

	mu      sync.Mutex
	space   sync.Cond // a write finished: there is room again
	buf     []byte
	closing bool
	closed  bool
	err     error // the first write error, for Close

	wake chan struct{} // one token: buf went from empty to not
	done chan struct{}
}

// New returns a Writer writing to w, holding at most limit bytes (0 means
// DefaultLimit) before Write waits.
func New(w io.Writer, limit int) *Writer {
	if limit <= 0 {
		limit = DefaultLimit
	}
	lw := &Writer{w: w, limit: limit, wake: make(chan struct{}, 1), done: make(chan struct{})}
	lw.space.L = &lw.mu
	go lw.run()
	return lw
}

// Write copies p into the buffer and returns; it waits only while the
// buffer is full. After Close it writes p directly.
func (lw *Writer) Write(p []byte) (int, error) {
	lw.mu.Lock()
	for !lw.closed && len(lw.buf) > 0 && len(lw.buf)+len(p) > lw.limit {
		lw.space.Wait()
	}
	if lw.closed {
		lw.mu.Unlock()
		return lw.w.Write(p)
	}
	first := len(lw.buf) == 0
	lw.buf = append(lw.buf, p...)
	lw.mu.Unlock()
	if first {
		select {
		case lw.wake <- struct{}{}:
		default: // a token is already there
		}
	}
	return len(p), nil
}

// run writes what has gathered until Close, then what is left.
func (lw *Writer) run() {
	defer close(lw.done)
	var out []byte
	for {
		lw.mu.Lock()
		for len(lw.buf) == 0 && !lw.closing {
			lw.mu.Unlock()
			<-lw.wake
			lw.mu.Lock()
		}
		if !lw.closing {
			// The goroutines ready to run go first: under load they log
			// too, and their lines join this write (at 3,000 messages a
			// second, one write(2) fewer per message).
			lw.mu.Unlock()
			runtime.Gosched()
			lw.mu.Lock()
		}
		if len(lw.buf) == 0 { // closing, and all is written
			lw.closed = true
			lw.space.Broadcast()
			lw.mu.Unlock()
			return
		}
		out, lw.buf = lw.buf, out[:0]
		lw.space.Broadcast()
		lw.mu.Unlock()

		_, err := lw.w.Write(out)
		if err != nil {
			// The lines are lost, as they would be with a direct write;
			// the log cannot report its own failure.
			lw.mu.Lock()
			if lw.err == nil {
				lw.err = err
			}
			lw.mu.Unlock()
		}
		if cap(out) > 4*64<<10 {
			out = nil // a burst's buffer is not kept for good
		}
	}
}

// Close writes what is buffered and returns the first write error. Writes
// after Close go straight to the underlying writer. Close does not close
// it.
func (lw *Writer) Close() error {
	lw.mu.Lock()
	lw.closing = true
	lw.mu.Unlock()
	select {
	case lw.wake <- struct{}{}:
	default:
	}
	<-lw.done
	lw.mu.Lock()
	defer lw.mu.Unlock()
	return lw.err
}
