package main

// The soak: the relay under steady load at half its measured maximum rate,
// with deferrals and retries, for a long time, its memory and goroutines
// sampled from /metrics. By default (and in CI) it runs two minutes,
// sampling every 10 s; STSRELAY_SOAK=1h runs an hour, sampling every
// minute (STSRELAY_SOAK_EVERY overrides the interval).

import (
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Flat, after a warm-up of the first fifth of the run: the highest sample
// of the second half of the rest is at most the highest of the first half
// times (1 + tolerance), plus a fixed allowance for what a steady load
// varies by (a garbage collection cycle's heap growth, sessions in flight).
const (
	soakRSSTolerance        = 0.10
	soakRSSAllowance        = 8 << 20
	soakGoroutineTolerance  = 0.20
	soakGoroutinesAllowance = 10
)

// soakSample is one scrape of /metrics.
type soakSample struct {
	at         time.Duration
	rss        float64
	heap       float64
	goroutines float64
	queued     float64
	deferrals  float64 // attempts the relay recorded as deferred, so far
	delivered  int
}

func TestSoakKeepsMemoryAndGoroutinesFlat(t *testing.T) {
	if testing.Short() {
		t.Skip("the soak takes minutes; skipped in -short")
	}
	duration, every := 2*time.Minute, 10*time.Second
	if v := os.Getenv("STSRELAY_SOAK"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("STSRELAY_SOAK=%q: %v", v, err)
		}
		duration, every = d, time.Minute
	}
	if v := os.Getenv("STSRELAY_SOAK_EVERY"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("STSRELAY_SOAK_EVERY=%q: %v", v, err)
		}
		every = d
	}

	k := startLoadSink(t)
	dir := t.TempDir()
	addr, metrics := freePort(t), freePort(t)
	config := writeLoadConfig(t, dir, filepath.Join(dir, "state"), addr, k, "warn",
		"[metrics]\nlisten = "+strconv.Quote(metrics)+"\n")
	// At level warn the log holds deferrals and problems only: an hour's
	// info lines would fill the test's memory.
	d := startBinary(t, plainBinary(t), config)
	waitUntil(t, d, "/healthz answers", func() bool {
		resp, err := http.Get("http://" + metrics + "/healthz")
		if err == nil {
			resp.Body.Close()
		}
		return err == nil && resp.StatusCode == 200
	})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("relay log (tail):\n%s", tail(d.output(), 40))
		}
	})

	// The maximum rate: as many submitters as the relay takes, to a domain
	// that accepts everything, counting what is both accepted and delivered.
	probe := newLoadGen(addr, func(int) []string { return []string{okDomains[0]} })
	probeTime := 15 * time.Second
	probe.start(16)
	time.Sleep(probeTime)
	probe.stop()
	maxRate := float64(min(probe.ackedCount(), k.delivered())) / probeTime.Seconds()
	waitDelivered(t, probe, k, time.Time{}, time.Minute)
	rate := maxRate / 2
	if rate < 1 {
		t.Fatalf("measured maximum rate %.1f messages/s; the relay is not working", maxRate)
	}

	// The soak: half that rate, a fifth of the mail to a domain that defers
	// the first attempt (retried after 1 s).
	tick := time.NewTicker(time.Duration(float64(time.Second) / rate))
	defer tick.Stop()
	g := newLoadGen(addr, func(n int) []string {
		if n%5 == 0 {
			return []string{domainFlaky}
		}
		return []string{okDomains[n%len(okDomains)]}
	})
	g.pace = tick.C
	g.next.Store(1 << 20) // apart from the probe's numbers
	g.start(8)
	defer g.cancel()
	start := time.Now()
	var samples []soakSample
	for {
		time.Sleep(every - time.Since(start)%every)
		s := scrape(t, metrics)
		s.at, s.delivered = time.Since(start).Round(time.Second), k.delivered()
		samples = append(samples, s)
		t.Logf("sample %s: rss %.1f MiB, heap %.1f MiB, %.0f goroutines, %.0f messages queued, %d delivered",
			s.at, s.rss/(1<<20), s.heap/(1<<20), s.goroutines, s.queued, s.delivered)
		if time.Since(start) >= duration {
			break
		}
	}
	g.stop()
	elapsed := time.Since(start)
	last := samples[len(samples)-1]
	if code := d.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("exit %d after SIGTERM", code)
	}

	warm := max(1, len(samples)/5)
	rest := samples[warm:]
	if len(rest) < 2 {
		t.Fatalf("only %d samples after the warm-up; run longer or sample more often", len(rest))
	}
	first, second := rest[:len(rest)/2], rest[len(rest)/2:]
	peak := func(ss []soakSample, f func(soakSample) float64) float64 {
		return slices.Max(func() []float64 {
			var v []float64
			for _, s := range ss {
				v = append(v, f(s))
			}
			return v
		}())
	}
	rss := func(s soakSample) float64 { return s.rss }
	gor := func(s soakSample) float64 { return s.goroutines }
	if a, b := peak(first, rss), peak(second, rss); b > a*(1+soakRSSTolerance)+soakRSSAllowance {
		t.Errorf("RSS grew: peak %.1f MiB in the first half, %.1f MiB in the second", a/(1<<20), b/(1<<20))
	}
	if a, b := peak(first, gor), peak(second, gor); b > a*(1+soakGoroutineTolerance)+soakGoroutinesAllowance {
		t.Errorf("goroutines grew: peak %.0f in the first half, %.0f in the second", a, b)
	}
	t.Logf("RESULT soak: %s paced at %.1f messages/s (half of the measured %.1f), %.1f/s achieved: %d acknowledged, %d delivered, %.0f deferred attempts retried; "+
		"RSS %.1f → %.1f MiB, goroutines %.0f → %.0f (peaks of the two halves after a %s warm-up)",
		elapsed.Round(time.Second), rate, maxRate, float64(g.ackedCount())/elapsed.Seconds(), g.ackedCount(), k.delivered()-probe.ackedCount(), last.deferrals,
		peak(first, rss)/(1<<20), peak(second, rss)/(1<<20), peak(first, gor), peak(second, gor), samples[warm-1].at)
}

// plainBinary builds stsrelay without the race detector, whose own
// bookkeeping grows with every goroutine and lock a long run creates (some
// 2.5 MiB a minute here): the soak measures the relay, not the detector.
func plainBinary(t *testing.T) string {
	t.Helper()
	p := filepath.Join(filepath.Dir(binary), "stsrelay-plain")
	if out, err := exec.Command("go", "build", "-o", p, ".").CombinedOutput(); err != nil {
		t.Fatalf("building stsrelay without -race: %v\n%s", err, out)
	}
	return p
}

// scrape reads the figures the soak watches from /metrics.
func scrape(t *testing.T, addr string) soakSample {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	// value sums the series of name whose labels contain labels.
	value := func(name, labels string) float64 {
		m := regexp.MustCompile(`(?m)^`+name+`(?:\{[^}]*`+regexp.QuoteMeta(labels)+`[^}]*\})? (\S+)$`).FindAllStringSubmatch(string(b), -1)
		if m == nil {
			t.Fatalf("/metrics has no %s", name)
		}
		sum := 0.0
		for _, x := range m {
			v, err := strconv.ParseFloat(x[1], 64)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			sum += v
		}
		return sum
	}
	return soakSample{
		rss:        value("process_resident_memory_bytes", ""),
		heap:       value("go_memstats_heap_inuse_bytes", ""),
		goroutines: value("go_goroutines", ""),
		queued:     value("stsrelay_queue_messages", ""),
		deferrals:  value("stsrelay_queue_deliveries_total", `outcome="deferred"`),
	}
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
