//go:build linux

package main

import (
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/bench/internal/world"
)

func TestRampUpFindsWhenTheRateIsReached(t *testing.T) {
	start := time.Unix(1000, 0)
	var arr []world.Arrival
	// 2 s at 10/s, then 8 s at 100/s.
	for ms := 0; ms < 2000; ms += 100 {
		arr = append(arr, world.Arrival{At: start.Add(time.Duration(ms) * time.Millisecond), Recipients: 1})
	}
	for ms := 2000; ms < 10000; ms += 10 {
		arr = append(arr, world.Arrival{At: start.Add(time.Duration(ms) * time.Millisecond), Recipients: 1})
	}
	got := rampUp(arr, start)
	// The half-second window holds 90% of 100/s once 0.45 s of the fast
	// part has passed.
	if got < 2.4 || got > 2.5 {
		t.Fatalf("ramp-up = %.2f s, want about 2.45", got)
	}
}

func TestMedianAndRatiosInTheTable(t *testing.T) {
	if m := median([]float64{3, 1, 2}); m != 2 {
		t.Errorf("median(3,1,2) = %v", m)
	}
	if m := median([]float64{4, 1, 3, 2}); m != 2.5 {
		t.Errorf("median(4,1,3,2) = %v", m)
	}
	sc := &scenario{name: "x", messages: 10, size: 4096, rcpts: 1, domains: 1, sessions: 1, kind: world.Enforce,
		systems: []string{sysStsrelay, sysPostfixReuse}}
	rep := &report{sc: sc, runs: []*runResult{
		{System: sysStsrelay, E2ERate: 1000}, {System: sysStsrelay, E2ERate: 800}, {System: sysStsrelay, E2ERate: 900},
		{System: sysPostfixReuse, E2ERate: 100}, {System: sysPostfixReuse, Err: "failed", E2ERate: 1},
	}}
	rows := rep.table()
	if !slices.Equal(rows[0], []string{"figure (median)", "stsrelay", "Postfix reuse", "stsrelay / Postfix reuse"}) {
		t.Fatalf("header = %q", rows[0])
	}
	if !slices.Equal(rows[1], []string{"end-to-end msg/s", "900", "100", "9.00"}) {
		t.Fatalf("first row = %q (a failed run must not count)", rows[1])
	}
}

func TestScrapeSumsLabelledSeries(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("# HELP x y\nstsrelay_delivery_sessions_total{tls=\"true\"} 7\nstsrelay_delivery_sessions_total{tls=\"false\"} 3\nstsrelay_queue_commits_total 12\n"))
	}))
	defer srv.Close()
	m, err := scrape(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	if m["stsrelay_delivery_sessions_total"] != 10 || m[`stsrelay_delivery_sessions_total{tls="true"}`] != 7 || m["stsrelay_queue_commits_total"] != 12 {
		t.Fatalf("scrape = %v", m)
	}
}

func TestUserArgsDropsWhatBenchRunAdds(t *testing.T) {
	got := userArgs([]string{"-stsrelay", "/w/bin/stsrelay", "-work", "/w", "-quick", "-work=/x"})
	if !slices.Equal(got, []string{"-quick"}) {
		t.Fatalf("userArgs = %q", got)
	}
}

func TestBaselineRunsNextToStsrelayWithARatioColumn(t *testing.T) {
	all := []*scenario{
		{name: "a", systems: []string{sysStsrelay, sysStsrelayNoPolicy, sysPostfixReuse}},
		{name: "b", systems: []string{sysPostfix}},
	}
	withBaseline(all)
	if !slices.Equal(all[0].systems, []string{sysStsrelay, sysStsrelayBaseline, sysStsrelayNoPolicy, sysPostfixReuse}) {
		t.Errorf("systems %q, want the baseline right after stsrelay", all[0].systems)
	}
	if !slices.Equal(all[1].systems, []string{sysPostfix}) {
		t.Errorf("systems %q, want no baseline where stsrelay does not run", all[1].systems)
	}

	sc := &scenario{name: "x", messages: 10, size: 4096, rcpts: 1, domains: 1, sessions: 1, kind: world.Enforce,
		systems: []string{sysStsrelay, sysStsrelayBaseline, sysPostfixReuse}}
	counters := map[string]float64{"attempts": 100, "sessions": 10, "enqueued": 100, "commits": 50}
	rep := &report{sc: sc, runs: []*runResult{
		{System: sysStsrelay, E2ERate: 1200, Counters: counters}, {System: sysStsrelayBaseline, E2ERate: 1000},
		{System: sysPostfixReuse, E2ERate: 100},
	}}
	rows := rep.table()
	want := []string{"figure (median)", "stsrelay", "stsrelay baseline", "Postfix reuse", "stsrelay / stsrelay baseline", "stsrelay / Postfix reuse"}
	if !slices.Equal(rows[0], want) {
		t.Fatalf("header = %q", rows[0])
	}
	if !slices.Equal(rows[1], []string{"end-to-end msg/s", "1200", "1000", "100", "1.20", "12.00"}) {
		t.Fatalf("first row = %q", rows[1])
	}
	notes := strings.Join(rep.notes(), "\n")
	if !strings.Contains(notes, "stsrelay's own counters: 90.0% of delivery attempts reused a connection") ||
		!strings.Contains(notes, "stsrelay baseline's own counters: 0.0%") {
		t.Errorf("notes:\n%s", notes)
	}
}

func TestBaselineFlags(t *testing.T) {
	bin, err := os.Executable() // any executable file
	if err != nil {
		t.Fatal(err)
	}
	defer func() { systemTitles[sysStsrelayBaseline] = baselineTitle("") }()
	var out, errs strings.Builder
	if rc := run([]string{"-list", "-baseline", bin, "-baseline-rev", "v1.2"}, &out, &errs); rc != 0 {
		t.Fatalf("rc %d: %s", rc, errs.String())
	}
	for _, line := range strings.Split(strings.TrimSpace(out.String()), "\n") {
		has := strings.Contains(line, "[stsrelay, stsrelay-baseline")
		if strings.Contains(line, "[stsrelay") != has {
			t.Errorf("scenario line without the baseline next to stsrelay: %s", line)
		}
	}
	if systemTitles[sysStsrelayBaseline] != "stsrelay baseline (v1.2)" {
		t.Errorf("title %q", systemTitles[sysStsrelayBaseline])
	}
	for _, args := range [][]string{
		{"-list", "-baseline", t.TempDir()},
		{"-list", "-baseline", "/nonexistent/stsrelay"},
		{"-list", "-baseline-rev", "HEAD"},
	} {
		errs.Reset()
		if rc := run(args, io.Discard, &errs); rc != 2 {
			t.Errorf("%q: rc %d, want 2", args, rc)
		}
	}
	got := userArgs([]string{"-stsrelay", "/w/bin/stsrelay", "-work", "/w", "-baseline", "/w/bin/stsrelay-baseline", "-baseline-rev", "main~3"})
	if !slices.Equal(got, []string{"-baseline-rev", "main~3"}) {
		t.Errorf("userArgs = %q, want the revision and not the path bench/run built", got)
	}
	if got := userArgs([]string{"-baseline=/opt/old/stsrelay", "-quick"}); !slices.Equal(got, []string{"-baseline=/opt/old/stsrelay", "-quick"}) {
		t.Errorf("userArgs = %q, want a baseline of the user's own kept", got)
	}
}

func TestCPUTicksCountWork(t *testing.T) {
	busy0, total0 := cpuTicks()
	if total0 == 0 || busy0 > total0 {
		t.Fatalf("cpuTicks = %d busy of %d", busy0, total0)
	}
	// Half a second of one core's work shows up in the busy ticks (100 a
	// second per core).
	for end := time.Now().Add(500 * time.Millisecond); time.Now().Before(end); {
	}
	busy, total := cpuTicks()
	if busy-busy0 < 20 || total <= total0 {
		t.Fatalf("after half a second of work: %d busy ticks of %d", busy-busy0, total-total0)
	}
}

// A run that ended within its first 2 s has no p99 after them: the table
// shows a dash, not 0.0, and the runs that measured it make the median.
func TestUnmeasuredFiguresAreDashes(t *testing.T) {
	sc := &scenario{name: "x", messages: 10, size: 4096, rcpts: 1, domains: 1, sessions: 1, kind: world.Enforce,
		systems: []string{sysStsrelay, sysPostfixReuse}}
	rep := &report{sc: sc, runs: []*runResult{
		{System: sysStsrelay}, {System: sysStsrelay},
		{System: sysPostfixReuse, P99Steadyms: 30}, {System: sysPostfixReuse}, {System: sysPostfixReuse, P99Steadyms: 50},
	}}
	var row []string
	for _, r := range rep.table() {
		if r[0] == "acceptance p99 after the first 2 s ms" {
			row = r
		}
	}
	if want := []string{"acceptance p99 after the first 2 s ms", "–", "40.0", ""}; !slices.Equal(row, want) {
		t.Fatalf("row = %q, want %q", row, want)
	}
}
