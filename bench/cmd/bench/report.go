//go:build linux

package main

import (
	"cmp"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// report is one scenario's runs.
type report struct {
	sc   *scenario
	runs []*runResult

	profileDir     string
	profileSeconds int
	profileRun     *runResult
}

// figure is one row of a scenario's table.
type figure struct {
	label string
	get   func(*runResult) float64
	prec  int
	ratio bool // print the stsrelay/Postfix ratio
	// unset: 0 means not measured, printed as a dash (a run that ended
	// within its first 2 s has no p99 after them)
	unset bool
}

var figures = []figure{
	{"end-to-end msg/s", func(r *runResult) float64 { return r.E2ERate }, 0, true, false},
	{"acceptance msg/s", func(r *runResult) float64 { return r.AcceptRate }, 0, true, false},
	{"acceptance p50 ms", func(r *runResult) float64 { return r.P50ms }, 1, true, false},
	{"acceptance p90 ms", func(r *runResult) float64 { return r.P90ms }, 1, true, false},
	{"acceptance p99 ms", func(r *runResult) float64 { return r.P99ms }, 1, true, false},
	{"acceptance p99 after the first 2 s ms", func(r *runResult) float64 { return r.P99Steadyms }, 1, true, true},
	{"acceptance max ms", func(r *runResult) float64 { return r.Maxms }, 0, true, false},
	{"CPU ms/msg (process tree)", func(r *runResult) float64 { return r.CPUms }, 2, true, false},
	{"read system calls/msg", func(r *runResult) float64 { return r.ReadsPerMsg }, 1, true, false},
	{"write system calls/msg", func(r *runResult) float64 { return r.WritesPerMsg }, 1, true, false},
	{"page faults/msg", func(r *runResult) float64 { return r.FaultsPerMsg }, 2, true, false},
	{"peak RSS MB (sum)", func(r *runResult) float64 { return r.RSSMB }, 0, true, false},
	{"peak PSS MB", func(r *runResult) float64 { return r.PSSMB }, 0, true, false},
	{"ramp-up to 90% rate s", func(r *runResult) float64 { return r.RampUps }, 1, false, false},
	{"sink connections/transaction", func(r *runResult) float64 { return r.SinkConnsPerTx }, 3, false, false},
	{"TLS handshakes resumed %", func(r *runResult) float64 { return 100 * r.ResumedShare }, 0, false, false},
}

// ok returns the runs of sys that completed.
func (rep *report) ok(sys string) []*runResult {
	var out []*runResult
	for _, r := range rep.runs {
		if r.System == sys && r.Err == "" {
			out = append(out, r)
		}
	}
	return out
}

func (rep *report) median(sys string, get func(*runResult) float64) float64 {
	var v []float64
	for _, r := range rep.ok(sys) {
		v = append(v, get(r))
	}
	return median(v)
}

// measuredMedian is median for a figure whose 0 means not measured: the
// median of the runs that measured it, 0 if none did.
func (rep *report) measuredMedian(sys string, get func(*runResult) float64) float64 {
	var v []float64
	for _, r := range rep.ok(sys) {
		if x := get(r); x != 0 {
			v = append(v, x)
		}
	}
	return median(v)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	v = slices.Clone(v)
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// table returns the rows of the scenario's table, header first.
func (rep *report) table() [][]string {
	sc := rep.sc
	var others []string
	for _, s := range sc.systems {
		if s != sysStsrelay {
			others = append(others, s)
		}
	}
	head := []string{"figure (median)"}
	for _, s := range sc.systems {
		head = append(head, systemTitles[s])
	}
	if slices.Contains(sc.systems, sysStsrelay) {
		for _, o := range others {
			head = append(head, "stsrelay / "+systemTitles[o])
		}
	}
	rows := [][]string{head}
	for _, f := range figures {
		row := []string{f.label}
		vals := map[string]float64{}
		for _, s := range sc.systems {
			if len(rep.ok(s)) == 0 {
				row = append(row, "failed")
				continue
			}
			v := rep.median(s, f.get)
			if f.unset {
				if v = rep.measuredMedian(s, f.get); v == 0 {
					row = append(row, "–")
					continue
				}
			}
			vals[s] = v
			row = append(row, fmt.Sprintf("%.*f", f.prec, v))
		}
		if slices.Contains(sc.systems, sysStsrelay) {
			for _, o := range others {
				a, okA := vals[sysStsrelay]
				b, okB := vals[o]
				if !f.ratio || !okA || !okB || b == 0 {
					row = append(row, "")
					continue
				}
				row = append(row, fmt.Sprintf("%.2f", a/b))
			}
		}
		rows = append(rows, row)
	}
	return rows
}

// notes are the lines under a table: run counts, failures, and what
// stsrelay says of its own connection reuse and group commits.
func (rep *report) notes() []string {
	var out []string
	for _, s := range rep.sc.systems {
		n, all := len(rep.ok(s)), 0
		for _, r := range rep.runs {
			if r.System == s {
				all++
				if r.Err != "" {
					out = append(out, fmt.Sprintf("%s run %d failed: %s", systemTitles[s], r.Rep, r.Err))
				}
			}
		}
		if n != all {
			out = append(out, fmt.Sprintf("%s: median of %d completed runs out of %d", systemTitles[s], n, all))
		}
	}
	for _, sys := range []string{sysStsrelay, sysStsrelayBaseline} {
		runs := rep.ok(sys)
		if len(runs) == 0 {
			continue
		}
		reuse := median(collect(runs, func(r *runResult) (float64, bool) {
			a, s := r.Counters["attempts"], r.Counters["sessions"]
			return 1 - s/a, a > 0
		}))
		commits := median(collect(runs, func(r *runResult) (float64, bool) {
			e, c := r.Counters["enqueued"], r.Counters["commits"]
			return c / e, e > 0
		}))
		out = append(out, fmt.Sprintf("%s's own counters: %.1f%% of delivery attempts reused a connection; %.2f queue commits (fsync'd) per message, acceptance and outcomes together.", systemTitles[sys], 100*reuse, commits))
	}
	for _, s := range rep.sc.systems {
		if isStsrelay(s) {
			continue
		}
		share := map[string][]float64{}
		for _, r := range rep.ok(s) {
			for name, v := range r.CPUShare {
				share[name] = append(share[name], v)
			}
		}
		type part struct {
			name string
			v    float64
		}
		var parts []part
		for name, v := range share {
			if m := median(v); m >= 0.01 {
				parts = append(parts, part{name, m})
			}
		}
		slices.SortFunc(parts, func(a, b part) int { return cmp.Compare(b.v, a.v) })
		var txt []string
		for _, p := range parts {
			txt = append(txt, fmt.Sprintf("%s %.0f%%", p.name, 100*p.v))
		}
		if len(txt) > 0 {
			out = append(out, fmt.Sprintf("%s CPU by process: %s.", systemTitles[s], strings.Join(txt, ", ")))
		}
	}
	var loads []float64
	for _, r := range rep.runs {
		loads = append(loads, r.Load1)
	}
	if len(loads) > 0 {
		out = append(out, fmt.Sprintf("Machine load average (1 min) as runs started: %.1f to %.1f.", slices.Min(loads), slices.Max(loads)))
	}
	if rep.profileDir != "" {
		out = append(out, fmt.Sprintf("pprof of stsrelay (CPU over %ds, allocations over the whole run): %s", rep.profileSeconds, rep.profileDir))
	}
	return out
}

func collect(runs []*runResult, f func(*runResult) (float64, bool)) []float64 {
	var v []float64
	for _, r := range runs {
		if x, ok := f(r); ok {
			v = append(v, x)
		}
	}
	return v
}

func (rep *report) printText(w io.Writer) {
	fmt.Fprintf(w, "\n%s: %s\n", rep.sc.name, rep.sc.title())
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	for _, row := range rep.table() {
		fmt.Fprintln(tw, strings.Join(row, "\t")+"\t")
	}
	tw.Flush()
	for _, n := range rep.notes() {
		fmt.Fprintln(w, "  "+n)
	}
}

// writeMarkdown writes every table, with what BENCHMARKS.md records of
// a run: date, machine, command.
func writeMarkdown(file string, reports []*report, quick bool, reps int, args []string) error {
	var b strings.Builder
	fmt.Fprintf(&b, "### %s: `bench/run %s`\n\n", time.Now().Format("2006-01-02"), strings.Join(userArgs(args), " "))
	fmt.Fprintf(&b, "Machine: %d cores, %s memory, %s; %s; Postfix %s, postfix-mta-sts-resolver %s. ",
		runtime.NumCPU(), memTotal(), kernel(), runtime.Version(), postfixVersion(), dpkgVersion("postfix-mta-sts-resolver"))
	fmt.Fprintf(&b, "Medians of %d interleaved runs per system; load average at the end %s.\n\n", reps, loadavg())
	if ts := targets(reports); len(ts) > 0 {
		b.WriteString("| target | measured | |\n|---|---|---|\n")
		for _, t := range ts {
			fmt.Fprintf(&b, "| %s | %s | %s |\n", t.what, t.got, t.verdict())
		}
		b.WriteString("\n")
	}
	for _, rep := range reports {
		fmt.Fprintf(&b, "#### %s: %s\n\n", rep.sc.name, rep.sc.title())
		for i, row := range rep.table() {
			b.WriteString("| " + strings.Join(row, " | ") + " |\n")
			if i == 0 {
				b.WriteString("|" + strings.Repeat("---|", len(row)) + "\n")
			}
		}
		b.WriteString("\n")
		for _, n := range rep.notes() {
			b.WriteString(n + "\n")
		}
		b.WriteString("\n")
	}
	return os.WriteFile(file, []byte(b.String()), 0o644)
}

// userArgs drops the flags bench/run adds itself: -stsrelay, -work, and
// -baseline when it built the baseline from -baseline-rev, which stays.
func userArgs(args []string) []string {
	added := []string{"-stsrelay", "-work"}
	if slices.ContainsFunc(args, func(a string) bool { return a == "-baseline-rev" || strings.HasPrefix(a, "-baseline-rev=") }) {
		added = append(added, "-baseline")
	}
	var out []string
	for i := 0; i < len(args); i++ {
		if slices.Contains(added, args[i]) {
			i++
			continue
		}
		if name, _, ok := strings.Cut(args[i], "="); ok && slices.Contains(added, name) {
			continue
		}
		out = append(out, args[i])
	}
	return out
}

func memTotal() string {
	b, _ := os.ReadFile("/proc/meminfo")
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "MemTotal:"); ok {
			var kb int64
			fmt.Sscan(rest, &kb)
			return fmt.Sprintf("%.0f GiB", float64(kb)/(1<<20))
		}
	}
	return "unknown"
}

func kernel() string {
	out, err := exec.Command("uname", "-sr").Output()
	if err != nil {
		return "unknown kernel"
	}
	return strings.TrimSpace(string(out))
}

func postfixVersion() string {
	out, err := exec.Command("postconf", "-dh", "mail_version").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

func dpkgVersion(pkg string) string {
	out, err := exec.Command("dpkg-query", "-W", "-f", "${Version}", pkg).Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// target is one of the targets, checked against this run.
type target struct {
	what string
	got  string
	met  bool
}

// targets checks the targets whose scenarios ran.
func targets(reports []*report) []target {
	find := func(name string) *report {
		for _, r := range reports {
			if r.sc.name == name {
				return r
			}
		}
		return nil
	}
	val := func(scen, sys string, get func(*runResult) float64) (float64, bool) {
		r := find(scen)
		if r == nil || len(r.ok(sys)) == 0 {
			return 0, false
		}
		return r.median(sys, get), true
	}
	e2e := func(r *runResult) float64 { return r.E2ERate }
	var out []target
	ratio := func(what, scen, a, b string, want float64) {
		x, ok1 := val(scen, a, e2e)
		y, ok2 := val(scen, b, e2e)
		if ok1 && ok2 && y > 0 {
			out = append(out, target{what, fmt.Sprintf("%.2f× (%s)", x/y, scen), x/y >= want})
		}
	}
	ratio("end-to-end ≥ 10× Postfix reuse, MTA-STS enforce, 4 KiB", "4k-enforce", sysStsrelay, sysPostfixReuse, 10)
	ratio("end-to-end ≥ 5× Postfix reuse, 100 KiB × 5 recipients", "100k-enforce", sysStsrelay, sysPostfixReuse, 5)
	if v, ok := val("4k-enforce", sysStsrelay, func(r *runResult) float64 { return r.P99ms }); ok {
		// The target is the whole run's; what it is once the cold start is
		// behind is said beside it.
		m := fmt.Sprintf("%.1f ms", v)
		if s, ok := val("4k-enforce", sysStsrelay, func(r *runResult) float64 { return r.P99Steadyms }); ok && s > 0 {
			m += fmt.Sprintf(" (%.1f ms after the first 2 s)", s)
		}
		out = append(out, target{"acceptance p99 ≤ 15 ms, 20 sessions", m, v <= 15})
	}
	if v, ok := val("4k-enforce", sysStsrelay, func(r *runResult) float64 { return r.CPUms }); ok {
		out = append(out, target{"CPU ≤ 0.5 ms per message end to end", fmt.Sprintf("%.2f ms", v), v <= 0.5})
	}
	worst, where := 0.0, ""
	for _, r := range reports {
		for _, s := range r.sc.systems {
			if isStsrelay(s) && len(r.ok(s)) > 0 {
				if v := r.median(s, func(r *runResult) float64 { return r.RSSMB }); v > worst {
					worst, where = v, r.sc.name
				}
			}
		}
	}
	if where != "" {
		out = append(out, target{"peak RSS ≤ 150 MB in every scenario", fmt.Sprintf("%.0f MB at most (%s)", worst, where), worst <= 150})
	}
	if x, ok := val("4k-enforce", sysStsrelay, e2e); ok {
		if y, ok := val("4k-enforce", sysStsrelayNoPolicy, e2e); ok && y > 0 {
			cost := 1 - x/y
			out = append(out, target{"MTA-STS enforce costs ≤ 3% throughput", fmt.Sprintf("%+.1f%%", 100*cost), cost <= 0.03})
		}
	}
	if v, ok := val("4k-enforce", sysStsrelay, func(r *runResult) float64 { return r.RampUps }); ok {
		out = append(out, target{"cold start (no cached policy, 100 domains) at full rate within 2 s", fmt.Sprintf("%.1f s", v), v <= 2})
	}
	ratio("submission with STARTTLS + AUTH ≥ 5× Postfix reuse", "4k-auth", sysStsrelay, sysPostfixReuse, 5)
	if r := find("4k-enforce-deferred"); r != nil {
		ratio(fmt.Sprintf("with %s deferred queued, ≥ 90%% of the throughput", thousands(r.sc.deferred)), "4k-enforce-deferred", sysStsrelay, sysStsrelayEmpty, 0.9)
	}
	return out
}

func (t target) verdict() string {
	if t.met {
		return "met"
	}
	return "NOT met"
}

func printTargets(w io.Writer, ts []target) {
	if len(ts) == 0 {
		return
	}
	fmt.Fprintln(w, "\nTargets of the issue (medians of this run):")
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, t := range ts {
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", t.what, t.got, t.verdict())
	}
	tw.Flush()
}
