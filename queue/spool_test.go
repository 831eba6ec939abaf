package queue

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"testing/iotest"
	"time"

	"go.etcd.io/bbolt"
)

// segments lists the spool's segment files.
func segments(t *testing.T, dir string) []string {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, batchPrefix+"*"))
	if err != nil {
		t.Fatal(err)
	}
	return names
}

// allocated is the disk space the spool's files take.
func allocated(t *testing.T, dir string) int64 {
	t.Helper()
	names, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, e := range names {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(dir, e.Name()), &st); err != nil {
			t.Fatal(err)
		}
		n += st.Blocks * 512
	}
	return n
}

// numbered is a distinct body of about size bytes, without NUL bytes.
func numbered(i, size int) string {
	head := fmt.Sprintf("From: a@example.com\r\nSubject: %d\r\n\r\n", i)
	line := strings.Repeat(fmt.Sprintf("%d ", i), 80)[:76] + "\r\n"
	return head + strings.Repeat(line, (size-len(head))/len(line))
}

func (tq *testQueue) enqueueBody(t *testing.T, e Envelope, body string) string {
	t.Helper()
	id, err := tq.Enqueue(context.Background(), e, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func TestSmallBodiesOfManyCommitsShareOneSegment(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(ok250)), Options{})
	ids := map[string]string{}
	for i := range 50 { // one at a time: fifty group commits
		body := numbered(i, 4096)
		ids[tq.enqueueBody(t, env("alice@example.com", "bob@example.org"), body)] = body
	}
	if segs := segments(t, tq.spool.dir); len(segs) != 1 {
		t.Errorf("%d segments after fifty commits, want 1: %v", len(segs), segs)
	}
	for id, want := range ids {
		if got := tq.body(t, tq.stored(t, id)); string(got) != want {
			t.Fatalf("%s: body read back differs", id)
		}
	}
}

// requirePunch skips a test of given-back space where the test
// directory's file system cannot punch holes; CI's can.
func requirePunch(t *testing.T) {
	t.Helper()
	probe, err := os.CreateTemp(t.TempDir(), "probe")
	if err != nil {
		t.Fatal(err)
	}
	defer probe.Close()
	probe.Write(make([]byte, 8192))
	if err := punchHole(probe, 0, 4096); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("the test directory's file system cannot punch holes: %v", err)
		}
		t.Skipf("the test directory's file system cannot punch holes: %v", err)
	}
}

// A message that waits pins its segment, but not the space of the
// messages around it that have left.
func TestSegmentSpaceOfDeliveredMessagesIsGivenBack(t *testing.T) {
	requirePunch(t)

	waiting := func(job *Job) []Status {
		if job.Domain == "slow.test" {
			return all(defer451)(job)
		}
		return all(ok250)(job)
	}
	tq := newTestQueue(t, newScripted(waiting), Options{})
	tq.run(t)
	const n, every, size = 400, 20, 8192
	live := map[string]string{}
	var liveBytes int64
	for i := range n {
		rcpt := "bob@example.org"
		if i%every == 0 {
			rcpt = "carol@slow.test"
		}
		body := numbered(i, size)
		id := tq.enqueueBody(t, env("alice@example.com", rcpt), body)
		if i%every == 0 {
			live[id] = body
			liveBytes += int64(len(body))
		}
	}
	tq.waitJobs(t, n)
	tq.settle(t)
	tq.spool.waitPunched()

	// Up to punchEvery of what has left waits for the next punch; each
	// waiting body can keep the partial blocks at its two ends.
	slack := int64(len(live)) * 2 * 4096
	if got := spoolBodyBytes(t, tq.spool.dir); got < liveBytes || got > liveBytes+punchEvery {
		t.Errorf("spool holds %d bytes of bodies, want the %d of the waiting messages and at most %d more", got, liveBytes, punchEvery)
	}
	if got, max := allocated(t, tq.spool.dir), liveBytes+slack+punchEvery; got > max {
		t.Errorf("spool takes %d bytes on disk, want at most %d (%d written)", got, max, n*size)
	}
	// Leaving the segment (here at close; when full, in a running relay)
	// gives back the rest.
	tq.spool.mu.Lock()
	tq.spool.retireLocked(tq.spool.cur)
	tq.spool.cur = nil
	tq.spool.mu.Unlock()
	tq.spool.waitPunched()
	if got := spoolBodyBytes(t, tq.spool.dir); got != liveBytes {
		t.Errorf("retired segment holds %d bytes of bodies, want the %d of the waiting messages", got, liveBytes)
	}
	if got, max := allocated(t, tq.spool.dir), liveBytes+slack; got > max {
		t.Errorf("retired segment takes %d bytes on disk, want at most %d", got, max)
	}
	for id, want := range live {
		if got := tq.body(t, tq.stored(t, id)); string(got) != want {
			t.Fatalf("waiting message %s: body read back differs", id)
		}
	}
}

func TestFullSegmentsAreLeftAndRemovedWithTheirLastMessage(t *testing.T) {
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	waiting := func(job *Job) []Status {
		if job.Domain == "slow.test" {
			return all(defer451)(job)
		}
		return all(ok250)(job)
	}
	tq := openTestQueue(t, path, newScripted(waiting), Options{})
	tq.spool.segMax = 64 << 10
	tq.run(t)
	pinned := tq.enqueueBody(t, env("alice@example.com", "carol@slow.test"), numbered(0, 4096))
	pinnedSeg := tq.stored(t, pinned).BodyFile
	for i := 1; i < 80; i++ { // 320 KiB: five segments or more
		tq.enqueueBody(t, env("alice@example.com", "bob@example.org"), numbered(i, 4096))
	}
	tq.waitJobs(t, 80)
	tq.settle(t)
	tq.spool.mu.Lock()
	cur := tq.spool.cur.name
	tq.spool.mu.Unlock()
	for _, name := range segments(t, tq.spool.dir) {
		if base := filepath.Base(name); base != cur && base != pinnedSeg {
			t.Errorf("segment %s is full and empty but still there", base)
		}
	}
	if _, err := os.Stat(tq.spool.path(pinnedSeg)); err != nil {
		t.Fatalf("the waiting message's segment: %v", err)
	}

	// After a restart the waiting message is delivered: its segment, of
	// an earlier run, goes with it.
	tq.Close()
	tq.db.Close()
	tq = openTestQueue(t, path, newScripted(all(ok250)), Options{})
	tq.clock.Advance(time.Hour)
	tq.run(t)
	tq.waitJobs(t, 1)
	tq.settle(t)
	if _, err := os.Stat(tq.spool.path(pinnedSeg)); err == nil {
		t.Error("the segment outlived its last message")
	}
}

// A crash can come after a message's record is gone but before its
// stretch was punched (less than punchEvery had gathered, or a delivery
// was still reading it), or after a batch was written but not committed.
// The next start gives that space back.
func TestStartGivesBackSegmentSpaceNoRecordRefersTo(t *testing.T) {
	requirePunch(t)
	path := filepath.Join(t.TempDir(), "stsrelay.db")
	tq := openTestQueue(t, path, newScripted(all(ok250)), Options{})
	bodies := map[string]string{}
	for i := range 3 {
		b := numbered(i, 8192)
		bodies[tq.enqueueBody(t, env("alice@example.com", "bob@example.org"), b)] = b
	}
	var left, seg string
	for id := range bodies {
		left, seg = id, tq.stored(t, id).BodyFile
		break
	}
	// The record goes, the process dies before the stretch is freed.
	if err := tq.db.Update(func(tx *bbolt.Tx) error { return tx.Bucket(bucketMessages).Delete([]byte(left)) }); err != nil {
		t.Fatal(err)
	}
	delete(bodies, left)
	tq.Close()
	tq.db.Close()
	f, err := os.OpenFile(tq.spool.path(seg), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(numbered(9, 8192)) // a batch whose records never committed
	f.Close()

	tq = openTestQueue(t, path, newScripted(all(ok250)), Options{})
	tq.spool.waitPunched()
	var want int64
	for id, b := range bodies {
		want += int64(len(b))
		if got := tq.body(t, tq.stored(t, id)); string(got) != b {
			t.Fatalf("queued message %s: body read back differs", id)
		}
	}
	if got := spoolBodyBytes(t, tq.spool.dir); got != want {
		t.Errorf("spool holds %d bytes of bodies after the start, want the %d of the queued messages", got, want)
	}
}

func TestFailedSegmentWriteMovesToANewSegment(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(ok250)), Options{})
	first := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	broken := tq.stored(t, first).BodyFile
	tq.spool.mu.Lock()
	tq.spool.cur.f.Close() // the next append fails, as on a disk error
	tq.spool.mu.Unlock()
	_, err := tq.Enqueue(context.Background(), env("alice@example.com", "bob@example.org"), strings.NewReader(testBody))
	if err == nil || !strings.HasPrefix(err.Error(), "message not queued: spool file") {
		t.Fatalf("enqueue into a broken segment: %v, want a spool file error", err)
	}
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	m := tq.stored(t, id)
	if m.BodyFile == broken {
		t.Fatalf("message stored in the segment whose write failed")
	}
	if got := tq.body(t, m); !bytes.Equal(got, []byte(testBody)) {
		t.Errorf("body read back: %q", got)
	}
	if got := tq.body(t, tq.stored(t, first)); !bytes.Equal(got, []byte(testBody)) {
		t.Errorf("earlier message in the retired segment: %q", got)
	}
}

func TestMergeSpans(t *testing.T) {
	got := mergeSpans([]span{{100, 10}, {0, 50}, {50, 20}, {105, 20}, {200, 1}, {130, 5}})
	want := []span{{0, 70}, {100, 25}, {130, 5}, {200, 1}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("mergeSpans = %v, want %v", got, want)
	}
	if got := appendSpan(appendSpan(nil, span{0, 10}), span{10, 5}); fmt.Sprint(got) != "[{0 15}]" {
		t.Errorf("appendSpan of touching spans = %v", got)
	}
}

// TestAHangingPunchDoesNotHoldUpTheQueue: giving space back takes
// fallocate(2) calls of half a millisecond and more, which reclaim makes
// off the committer and without the spool's lock. While one hangs,
// messages are still accepted, delivered and let go.
func TestAHangingPunchDoesNotHoldUpTheQueue(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(ok250)), Options{})
	entered, release := make(chan struct{}, 1), make(chan struct{})
	tq.spool.mu.Lock()
	tq.spool.punch = func(f *os.File, off, n int64) error {
		select {
		case entered <- struct{}{}:
		default:
		}
		<-release
		return punchHole(f, off, n)
	}
	tq.spool.mu.Unlock()
	defer close(release)
	tq.run(t)

	tq.enqueueBody(t, env("alice@example.com", "bob@example.org"), numbered(0, 4096))
	tq.waitJobs(t, 1)
	select {
	case <-entered: // the message left; punching its space hangs
	case <-time.After(10 * time.Second):
		t.Fatal("the space of a delivered message was not given back")
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 1; i <= 20; i++ {
			if _, err := tq.Enqueue(context.Background(), env("alice@example.com", "bob@example.org"), strings.NewReader(numbered(i, 4096))); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the queue stood still while a punch hung")
	}
	tq.waitJobs(t, 20)
}

// A body is stored whole whatever its size against the buffers Enqueue
// reads its start into: the short one, the one of inlineMax+1, and the
// file of its own beyond that, the reader handing it over in pieces.
func TestBodiesAroundTheHeadBuffersAreStoredWhole(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(ok250)), Options{})
	for _, size := range []int{0, 1, smallHead - 1, smallHead, smallHead + 1, inlineMax, inlineMax + 1, inlineMax + smallHead} {
		body := make([]byte, size)
		for i := range body {
			body[i] = 'a' + byte((i*7+size)%26)
		}
		id, err := tq.Enqueue(context.Background(), env("alice@example.com", "bob@example.org"), iotest.HalfReader(bytes.NewReader(body)))
		if err != nil {
			t.Fatalf("%d bytes: %v", size, err)
		}
		m := tq.stored(t, id)
		if got := tq.body(t, m); !bytes.Equal(got, body) {
			t.Errorf("%d bytes: stored %d bytes, not the body", size, len(got))
		}
		if inSegment := m.BodyFile != ""; inSegment != (size <= inlineMax) {
			t.Errorf("%d bytes: in a segment %v, want %v", size, inSegment, size <= inlineMax)
		}
	}
}

// A session whose client is still sending a small message holds the
// short buffer, not one of inlineMax: 200 of them in DATA at once hold
// about 3 MiB of buffers, where they held 50.
func TestSessionsInDATAHoldShortBuffersForSmallMessages(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(ok250)), Options{})
	const sessions = 200
	runtime.GC()
	runtime.GC() // and the pools' buffers with it
	var before, during runtime.MemStats
	runtime.ReadMemStats(&before)
	writers := make([]*io.PipeWriter, sessions)
	errs := make(chan error, sessions)
	for i := range writers {
		pr, pw := io.Pipe()
		writers[i] = pw
		go func() {
			_, err := tq.Enqueue(context.Background(), env("alice@example.com", "bob@example.org"), pr)
			errs <- err
		}()
		// Returns once Enqueue has read it: the session is in DATA.
		if _, err := pw.Write([]byte(numbered(i, 4096))); err != nil {
			t.Fatal(err)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&during)
	for _, pw := range writers {
		pw.Close()
	}
	for range sessions {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	held := int64(during.HeapAlloc) - int64(before.HeapAlloc)
	t.Logf("%d sessions in DATA hold %d KiB of heap", sessions, held>>10)
	if held > sessions*(inlineMax/4) {
		t.Errorf("%d sessions in DATA hold %d KiB of heap, over %d KiB each", sessions, held>>10, (inlineMax/4)>>10)
	}
}

// One failed punch (ENOSPC when a punch must split an extent on a full
// disk, say) costs that stretch until its segment goes, not every punch
// after it: only a file system that cannot punch turns punching off.
func TestAFailedPunchDoesNotStopThePunching(t *testing.T) {
	tq := newTestQueue(t, newScripted(all(ok250)), Options{})
	var calls atomic.Int32
	tq.spool.mu.Lock()
	tq.spool.punch = func(f *os.File, off, n int64) error {
		if calls.Add(1) == 1 {
			return syscall.ENOSPC
		}
		return punchHole(f, off, n)
	}
	tq.spool.mu.Unlock()
	tq.run(t)
	for i := range 20 {
		tq.enqueueBody(t, env("alice@example.com", "bob@example.org"), numbered(i, 4096))
		tq.waitJobs(t, 1)
	}
	deadline := time.Now().Add(10 * time.Second)
	for calls.Load() < 2 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	tq.spool.mu.Lock()
	off := tq.spool.noPunch
	tq.spool.mu.Unlock()
	if n := calls.Load(); n < 2 || off {
		t.Errorf("%d punches after the failed one's, punching off %v; want punching to go on", n-1, off)
	}
}
