package main

// Crash safety of the whole binary: stsrelay runs as a child process under
// load from several submitters, delivering through routes to a sink on
// loopback ports, and is killed, stopped and starved of disk. Then what
// the submitters were told is checked against what the sink received and
// what is still queued (verifyLoad). docs/RELIABILITY.md has the figures.
//
// ROOT ONLY: the full-disk test, which mounts a tmpfs.

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/bbolt"
)

// The crash test SIGKILLs the relay at least crashKills times, and goes on
// until crashMessages were acknowledged or crashTime has passed (a slow
// machine); fewer than crashMessages/2 fails the test.
const (
	crashKills    = 20
	crashMessages = 2000
	crashTime     = 150 * time.Second
)

func TestCrashUnderLoadLosesNoAcknowledgedMessage(t *testing.T) {
	k := startLoadSink(t)
	dir := t.TempDir()
	addr := freePort(t)
	config := writeLoadConfig(t, dir, filepath.Join(dir, "state"), addr, k, "debug", "")

	g := newLoadGen(addr, mixedDomains)
	g.start(8)
	defer g.cancel()
	var logs []string
	var killed []bool
	kills, start := 0, time.Now()
	for ; kills < crashKills || g.ackedCount() < crashMessages && time.Since(start) < crashTime; kills++ {
		d := startDaemon(t, config)
		waitLoaded(t, d)
		// A random moment: in the middle of submissions, commits and
		// deliveries, sometimes right after the start.
		time.Sleep(time.Duration(100+rand.IntN(1900)) * time.Millisecond)
		d.cmd.Process.Signal(syscall.SIGKILL)
		<-d.exited
		if ws, ok := d.cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() {
			t.Fatalf("round %d: relay exited before it was killed:\n%s", kills, d.output())
		}
		logs, killed = append(logs, d.output()), append(killed, true)
		checkLoaded(t, d.output())
		k.nextEpoch(t)
	}

	// The last lifetime: the load stops, the relay drains what it can.
	d := startDaemon(t, config)
	waitLoaded(t, d)
	time.Sleep(time.Second)
	g.stop()
	waitDelivered(t, g, k, time.Time{}, 2*time.Minute)
	queued := queuedRecipients(t, config)
	if code := d.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("exit %d after SIGTERM:\n%s", code, d.output())
	}
	logs, killed = append(logs, d.output()), append(killed, false)
	checkLoaded(t, d.output())

	rep := verifyLoad(t, g, k, queued, logs, killed, false)
	for rc, state := range queued {
		if pending(state) && !strings.HasSuffix(rc, "@"+domainDefer) {
			t.Errorf("%s still queued after the drain", rc)
		}
	}
	if rep.acked < crashMessages/2 {
		t.Errorf("only %d messages acknowledged over %d kills; the test proves little", rep.acked, kills)
	}
	checkDB(t, filepath.Join(dir, "state", "stsrelay.db"))
	t.Logf("RESULT crash: %d SIGKILLs; %s", kills, rep)
}

// checkLoaded fails unless a relay's start found no damaged record.
func checkLoaded(t *testing.T, log string) {
	t.Helper()
	m := regexp.MustCompile(`msg="queue loaded" messages=\d+ damaged=(\d+)`).FindStringSubmatch(log)
	if m == nil {
		t.Fatalf("no 'queue loaded' line:\n%s", log)
	}
	if m[1] != "0" {
		t.Errorf("the relay found %s damaged records at start", m[1])
	}
}

// checkDB runs bbolt's consistency check over the relay's database (the
// relay must be stopped).
func checkDB(t *testing.T, path string) {
	t.Helper()
	db, err := bbolt.Open(path, 0o600, &bbolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatalf("opening %s: %v", path, err)
	}
	defer db.Close()
	db.View(func(tx *bbolt.Tx) error {
		for err := range tx.Check() {
			t.Errorf("bbolt check: %v", err)
		}
		return nil
	})
}

func TestSIGTERMUnderLoadLosesNothingAndEndsWithinTheGrace(t *testing.T) {
	k := startLoadSink(t)
	dir := t.TempDir()
	addr := freePort(t)
	config := writeLoadConfig(t, dir, filepath.Join(dir, "state"), addr, k, "debug", "")

	// One message in twenty goes to a domain whose MX never answers the
	// final dot: those deliveries are in flight at the stop and must be cut
	// off when the grace runs out, and stay queued.
	g := newLoadGen(addr, func(n int) []string {
		if n%20 == 0 {
			return []string{domainStall}
		}
		return mixedDomains(n)
	})
	k.holdStalled()
	// The race detector's runtime sleeps a second at exit by default.
	d := startDaemon(t, config, "GORACE=atexit_sleep_ms=0")
	waitLoaded(t, d)
	g.start(8)
	defer g.cancel()
	waitUntil(t, d, "3 deliveries stalled and 300 messages acknowledged", func() bool {
		return k.stalledCount() >= 3 && g.ackedCount() >= 300
	})
	start := time.Now()
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.exited:
	case <-time.After(2 * shutdownGrace):
		t.Fatalf("relay still running %s after SIGTERM:\n%s", 2*shutdownGrace, d.output())
	}
	took := time.Since(start)
	if code := d.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("exit %d after SIGTERM:\n%s", code, d.output())
	}
	if took > shutdownGrace {
		t.Errorf("stopping took %s, more than the grace of %s", took.Round(time.Millisecond), shutdownGrace)
	}
	if !strings.Contains(d.output(), "cancelling deliveries still running at shutdown") {
		t.Errorf("no delivery was cut off at the end of the grace; the test proves less than it should")
	}
	g.stop()
	logs := []string{d.output()}
	stalled := k.stalledCount()
	k.release()
	k.nextEpoch(t)

	// After the restart everything acknowledged goes out, the stalled
	// deliveries too, since the sink no longer stalls.
	d = startDaemon(t, config)
	waitLoaded(t, d)
	waitDelivered(t, g, k, time.Time{}, 2*time.Minute)
	queued := queuedRecipients(t, config)
	d.stop(syscall.SIGTERM)
	logs = append(logs, d.output())
	rep := verifyLoad(t, g, k, queued, logs, []bool{false, false}, false)
	t.Logf("RESULT sigterm: stopped in %s (grace %s) with %d deliveries stalled; %s",
		took.Round(time.Millisecond), shutdownGrace, stalled, rep)
}

// TestFullDiskAnswers452AndLosesNothing runs the relay with its state on
// a small tmpfs, fills it while submissions go on, and frees it again.
func TestFullDiskAnswers452AndLosesNothing(t *testing.T) {
	requireRootTo(t, "mount a tmpfs")
	k := startLoadSink(t)
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", state, "tmpfs", 0, "size=48m,mode=0700"); err != nil {
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() { syscall.Unmount(state, syscall.MNT_DETACH) })
	addr := freePort(t)
	config := writeLoadConfig(t, dir, state, addr, k, "debug", "")

	g := newLoadGen(addr, mixedDomains)
	d := startDaemon(t, config)
	waitLoaded(t, d)
	g.start(8)
	defer g.cancel()
	waitUntil(t, d, "200 messages acknowledged", func() bool { return g.ackedCount() >= 200 })

	// Fill the file system and keep it full (deliveries free space as
	// they remove bodies) until enough submissions were turned away.
	filler := filepath.Join(state, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 64<<10)
	fill := func() {
		for size := len(chunk); size >= 512; size /= 2 {
			for {
				if _, err := f.Write(chunk[:size]); err != nil {
					break
				}
			}
		}
	}
	ackedBefore := g.ackedCount()
	deadline := time.Now().Add(time.Minute)
	for g.replyCount("452 4.3.1") < 50 {
		fill()
		if time.Now().After(deadline) {
			t.Fatalf("no 452 4.3.1 replies with the disk full; replies %v\n%s", g.replies, d.output())
		}
		time.Sleep(5 * time.Millisecond)
	}
	f.Close()
	full := g.replyCount("452 4.3.1")
	ackedFull := g.ackedCount() - ackedBefore

	// Space returns: submission works again at once.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	freed := time.Now()
	ackedAfter := g.ackedCount()
	waitUntil(t, d, "200 more messages acknowledged once space returned", func() bool { return g.ackedCount() >= ackedAfter+200 })
	g.stop()
	for reply, n := range g.replies {
		if reply != "452 4.3.1" {
			t.Errorf("%d submissions answered %s; a full disk must answer 452 4.3.1", n, reply)
		}
	}

	// What was accepted after the disk was freed is delivered. Deliveries
	// whose outcome could not be recorded while it was full are retried a
	// minute later; the test does not wait for them: every acknowledged
	// recipient must be delivered or still queued.
	waitDelivered(t, g, k, freed, 2*time.Minute)
	queued := queuedRecipients(t, config)
	if code := d.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("exit %d after SIGTERM:\n%s", code, d.output())
	}
	checkDB(t, filepath.Join(state, "stsrelay.db"))
	d2 := startDaemon(t, config)
	waitLoaded(t, d2)
	checkLoaded(t, d2.output())
	d2.stop(syscall.SIGTERM)

	rep := verifyLoad(t, g, k, queued, []string{d.output()}, []bool{false}, true)
	if n := strings.Count(d.output(), "no space left on device"); n == 0 {
		t.Errorf("the relay's log never names the full disk")
	}
	t.Logf("RESULT disk: %d submissions answered 452 4.3.1 while the disk was full (%d accepted meanwhile as deliveries freed space); %s",
		full, ackedFull, rep)
}
