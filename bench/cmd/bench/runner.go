//go:build linux

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/stsrelay/stsrelay/bench/internal/load"
	"github.com/stsrelay/stsrelay/bench/internal/proc"
	"github.com/stsrelay/stsrelay/bench/internal/world"
)

// memoryInterval is how often the relay's memory is sampled. A sample
// of Postfix's tree (about 90 processes: a walk of /proc and each one's
// smaps_rollup) takes 20 ms of CPU and more on the cores Postfix runs
// on: at five a second Postfix with reuse ran 10–20% slower than at one
// (BENCHMARKS.md). Postfix runs last minutes, so a sample a second still
// sees its plateau, and stsrelay's peak RSS comes from its own VmHWM.
const memoryInterval = time.Second

// warmup is how far into a run a message must begin to count in the
// steady-state p99: the cold start's target is full rate within 2 s.
const warmup = 2 * time.Second

// worldDomains is how many recipient domains of each kind the world has.
const worldDomains = 100

// runResult is one run of one scenario against one system.
type runResult struct {
	Scenario string    `json:"scenario"`
	System   string    `json:"system"`
	Rep      int       `json:"rep"`
	At       time.Time `json:"at"`
	Err      string    `json:"error,omitempty"`

	Messages   int    `json:"messages"`
	Accepted   int    `json:"accepted"`
	Failed     int    `json:"failed"`
	FirstError string `json:"first_error,omitempty"`
	Delivered  int    `json:"delivered_recipients"`
	Plaintext  int    `json:"plaintext_transactions"`

	E2ERate    float64 `json:"e2e_msgs_per_s"`
	AcceptRate float64 `json:"accept_msgs_per_s"`
	P50ms      float64 `json:"accept_p50_ms"`
	P90ms      float64 `json:"accept_p90_ms"`
	P99ms      float64 `json:"accept_p99_ms"`
	// P99Steadyms is the p99 of the messages begun warmup or later into
	// the run: the acceptance latency once a cold start is behind.
	P99Steadyms float64 `json:"accept_p99_after_warmup_ms"`
	Maxms       float64 `json:"accept_max_ms"`
	CPUms       float64 `json:"cpu_ms_per_msg"`
	// ReadsPerMsg, WritesPerMsg and FaultsPerMsg are the read-like and
	// write-like system calls and the page faults of the system's process
	// tree per message accepted (proc.Usage): what the code asks of the
	// kernel, which moves far less than CPU time with the machine's speed
	// (reads that find nothing yet still depend on timing).
	ReadsPerMsg  float64 `json:"reads_per_msg"`
	WritesPerMsg float64 `json:"writes_per_msg"`
	FaultsPerMsg float64 `json:"page_faults_per_msg"`
	RSSMB        float64 `json:"peak_rss_mb"`
	PSSMB        float64 `json:"peak_pss_mb"`
	RampUps      float64 `json:"ramp_up_s"`

	SinkConnsPerTx float64            `json:"sink_connections_per_transaction"`
	ResumedShare   float64            `json:"tls_resumed_share"`
	Counters       map[string]float64 `json:"relay_counters,omitempty"`
	// CPUShare splits the CPU time by process name (Postfix's services,
	// the resolver); exited children count under their parent.
	CPUShare map[string]float64 `json:"cpu_share,omitempty"`
	Load1    float64            `json:"loadavg_1m_at_start"`
	// HarnessCPUms is this driver's own CPU per message over the same
	// window (the load generator, the DNS and policy servers, the sink):
	// on a small machine they share the cores with the relay. CoresBusy
	// is how many cores the whole machine kept busy meanwhile.
	HarnessCPUms float64 `json:"harness_cpu_ms_per_msg"`
	CoresBusy    float64 `json:"cores_busy"`
}

func (b *bench) newSystem(name string) system {
	switch name {
	case sysStsrelay, sysStsrelayNoPolicy, sysStsrelayEmpty:
		return &stsrelaySys{env: b.env, bin: b.env.stsrelayBin}
	case sysStsrelayBaseline:
		return &stsrelaySys{env: b.env, bin: b.env.baselineBin}
	case sysPostfix:
		return &postfixSys{env: b.env}
	case sysPostfixReuse:
		return &postfixSys{env: b.env, reuse: true}
	}
	panic("unknown system " + name)
}

// scenario runs sc against each of its systems, b.reps times, interleaved.
func (b *bench) scenario(ctx context.Context, sc *scenario) (*report, error) {
	unlock, err := b.lockPorts()
	if err != nil {
		return nil, err
	}
	defer unlock()
	w, err := world.Start(world.Options{Domains: worldDomains, CA: b.ca})
	if err != nil {
		return nil, err
	}
	defer w.Close()
	b.logf("== %s: %s", sc.name, sc.title())

	snapshots := make(map[string]string)
	if sc.deferred > 0 {
		for _, sys := range sc.systems {
			if sys == sysStsrelayEmpty {
				continue
			}
			dir, err := b.prefill(ctx, sc, sys)
			if err != nil {
				return nil, fmt.Errorf("queueing %d deferred messages in %s: %w", sc.deferred, sys, err)
			}
			snapshots[sys] = dir
		}
	}
	rep := &report{sc: sc}
	for i := range b.reps {
		// Every run starts after a sync and on idle cores, so that none
		// pays for the writeback or the winding down the one before it
		// left (Postfix's queue files and exiting processes, for one).
		for _, sys := range runOrder(sc.systems, i) {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			syscall.Sync()
			if waited, idle := settle(30 * time.Second); !idle {
				b.logf("   the cores or the disk were still busy after %s; running anyway", waited.Round(time.Second))
			}
			r := b.runOnce(ctx, sc, w, sys, i, snapshots[sys], runOptions{})
			rep.runs = append(rep.runs, r)
		}
	}
	if sc.profile {
		// Every stsrelay of the scenario, so that what a lever or a full
		// queue costs can be read off two profiles of the same load.
		for _, sys := range sc.systems {
			if sys != sysStsrelay && !(sc.profileAll && isStsrelay(sys)) {
				continue
			}
			if err := b.profile(ctx, sc, w, rep, sys, snapshots[sys]); err != nil {
				b.logf("   profile of %s: %v", sys, err)
			}
		}
	}
	if !b.keep {
		for _, dir := range snapshots {
			os.RemoveAll(dir)
		}
	}
	return rep, nil
}

func (b *bench) logf(format string, args ...any) {
	fmt.Fprintf(b.log, "[%6.0fs] "+format+"\n", append([]any{time.Since(b.start).Seconds()}, args...)...)
}

func (b *bench) loadOptions(sc *scenario, runID string) load.Options {
	o := load.Options{
		Addr:              submitAddr,
		Messages:          sc.messages,
		Size:              sc.size,
		Recipients:        sc.rcpts,
		DomainsPerMessage: sc.domains,
		Domains:           world.Domains(sc.kind, worldDomains),
		Sessions:          sc.sessions,
		ConnPerMessage:    sc.connPerMessage,
		RunID:             runID,
		Warmup:            warmup,
	}
	if sc.auth {
		o.TLS = b.clientTLS()
		o.User, o.Password = b.env.user, b.env.password
	}
	return o
}

// runOnce starts a fresh instance of sys, submits the load, waits until
// every accepted recipient has arrived at the sink, and stops it.
func (b *bench) runOnce(ctx context.Context, sc *scenario, w *world.World, sysName string, rep int, snapshot string, o runOptions) *runResult {
	r := &runResult{Scenario: sc.name, System: sysName, Rep: rep + 1, At: time.Now(), Messages: sc.messages}
	defer b.record(r)
	dir := filepath.Join(b.work, "runs", fmt.Sprintf("%s-%s-%d", sc.name, sysName, rep+1))
	if o.pprof {
		dir += "-pprof"
	}
	os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		r.Err = err.Error()
		return r
	}
	s := b.newSystem(sysName)
	if snapshot != "" {
		if err := copyState(snapshot, dir, s.stateDirs()); err != nil {
			r.Err = err.Error()
			return r
		}
	}
	if err := s.start(ctx, sc, dir, o); err != nil {
		r.Err = "start: " + err.Error()
		return r
	}
	stopped := false
	defer func() {
		if !stopped {
			s.stop()
		}
		if !b.keep && r.Err == "" {
			os.RemoveAll(dir)
		}
	}()

	w.Sink.Reset(0)
	pids := s.pids()
	use0 := proc.ReadUsage(pids...)
	self0 := selfCPU()
	busy0, total0 := cpuTicks()
	r.Load1 = load1()
	sampler := proc.Sample(memoryInterval, pids...)
	if o.onStart != nil {
		o.onStart()
	}
	lo := b.loadOptions(sc, fmt.Sprintf("%s.%s.%d", sc.name, sysName, rep+1))
	if sysName == sysStsrelayNoPolicy {
		lo.Domains = world.Domains(world.Plain, worldDomains)
	}
	res, err := load.Run(ctx, lo)
	if err != nil {
		sampler.Stop()
		r.Err = err.Error()
		return r
	}
	w.Sink.Expect(res.Recipients)
	waitCtx, cancel := context.WithTimeout(ctx, 20*time.Minute)
	count, werr := w.Sink.Wait(waitCtx)
	cancel()
	use := proc.ReadUsage(pids...)
	cpu := use.CPU - use0.CPU
	self := selfCPU() - self0
	if busy, total := cpuTicks(); total > total0 {
		r.CoresBusy = float64(runtime.NumCPU()) * float64(busy-busy0) / float64(total-total0)
	}
	if cpu > 0 {
		r.CPUShare = make(map[string]float64)
		for name, t := range use.ByName {
			if d := t - use0.ByName[name]; d > 0 {
				r.CPUShare[name] = float64(d) / float64(cpu)
			}
		}
	}
	mem := sampler.Stop()
	if isStsrelay(sysName) {
		mem.RSS = max(mem.RSS, proc.HighWater(pids[0]))
	}
	r.Counters = s.counters()
	if o.onDone != nil {
		o.onDone(count)
	}
	stopped = true
	if err := s.stop(); err != nil {
		b.logf("   %s: stop: %v", sysName, err)
	}

	r.Accepted, r.Failed, r.FirstError = res.Accepted, res.Failed, res.FirstError
	r.Delivered, r.Plaintext = count.Recipients, count.Plaintext
	if werr != nil {
		r.Err = fmt.Sprintf("the sink got %d of %d recipients: %v", count.Recipients, res.Recipients, werr)
	}
	if res.Failed > 0 && r.Err == "" {
		r.Err = fmt.Sprintf("%d messages not accepted, first: %s", res.Failed, res.FirstError)
	}
	if e2e := count.Last.Sub(res.Start).Seconds(); e2e > 0 && werr == nil {
		r.E2ERate = float64(res.Accepted) / e2e
	}
	r.AcceptRate = res.Rate()
	r.P50ms = ms(res.Percentile(50))
	r.P90ms = ms(res.Percentile(90))
	r.P99ms = ms(res.Percentile(99))
	r.P99Steadyms = ms(res.SteadyPercentile(99))
	r.Maxms = ms(res.Percentile(100))
	if res.Accepted > 0 {
		r.CPUms = ms(cpu) / float64(res.Accepted)
		r.HarnessCPUms = ms(self) / float64(res.Accepted)
		n := float64(res.Accepted)
		r.ReadsPerMsg = float64(use.Reads-use0.Reads) / n
		r.WritesPerMsg = float64(use.Writes-use0.Writes) / n
		r.FaultsPerMsg = float64(use.Faults-use0.Faults) / n
	}
	r.RSSMB, r.PSSMB = float64(mem.RSS)/(1<<20), float64(mem.PSS)/(1<<20)
	r.RampUps = rampUp(count.Arrivals, res.Start)
	if count.Messages > 0 {
		r.SinkConnsPerTx = float64(count.Conns) / float64(count.Messages)
	}
	if count.Handshakes > 0 {
		r.ResumedShare = float64(count.Resumed) / float64(count.Handshakes)
	}
	status := "ok"
	if r.Err != "" {
		status = r.Err
	}
	b.logf("   %-14s #%d  e2e %7.1f msg/s  accept %7.1f msg/s  p99 %6.1f ms  cpu %5.2f ms/msg (harness %4.2f, cores busy %3.1f)  syscalls r/w %.1f/%.1f  rss %5.0f MB  pss %5.0f MB  %s",
		sysName, rep+1, r.E2ERate, r.AcceptRate, r.P99ms, r.CPUms, r.HarnessCPUms, r.CoresBusy, r.ReadsPerMsg, r.WritesPerMsg, r.RSSMB, r.PSSMB, status)
	return r
}

func (b *bench) record(r *runResult) {
	j, _ := json.Marshal(r)
	b.runs.Write(append(j, '\n'))
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// rampUp is how long after the first submission the sink first receives
// at 90% of the steady rate (over a sliding half second); the steady
// rate is the one of the middle half of the run.
func rampUp(arr []world.Arrival, start time.Time) float64 {
	if len(arr) < 20 {
		return 0
	}
	total := arr[len(arr)-1].At.Sub(start)
	lo, hi := start.Add(total/4), start.Add(3*total/4)
	n := 0
	for _, a := range arr {
		if !a.At.Before(lo) && a.At.Before(hi) {
			n += a.Recipients
		}
	}
	steady := float64(n) / hi.Sub(lo).Seconds()
	const window = 500 * time.Millisecond
	in, j := 0, 0 // recipients in (a.At-window, a.At], from index j
	for _, a := range arr {
		in += a.Recipients
		for arr[j].At.Before(a.At.Add(-window)) || arr[j].At.Equal(a.At.Add(-window)) {
			in -= arr[j].Recipients
			j++
		}
		if a.At.Sub(start) >= window && float64(in)/window.Seconds() >= 0.9*steady {
			return a.At.Sub(start).Seconds()
		}
	}
	return total.Seconds()
}

// prefill queues sc.deferred messages to the domain whose MX refuses
// connections, waits until the system has tried and deferred them all,
// stops it and keeps its state as the snapshot every run starts from.
func (b *bench) prefill(ctx context.Context, sc *scenario, sysName string) (string, error) {
	dir := filepath.Join(b.work, "snapshots", sc.name+"-"+sysName)
	os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	s := b.newSystem(sysName)
	if err := s.start(ctx, sc, dir, runOptions{}); err != nil {
		return "", err
	}
	b.logf("   %s: queueing %d messages to %s (MX refuses connections)", sysName, sc.deferred, world.DeferDomain)
	o := b.loadOptions(sc, "prefill")
	o.Messages, o.Recipients, o.DomainsPerMessage = sc.deferred, 1, 1
	o.Domains = []string{world.DeferDomain}
	res, err := load.Run(ctx, o)
	if err == nil && res.Failed > 0 {
		err = fmt.Errorf("%d messages not accepted, first: %s", res.Failed, res.FirstError)
	}
	if err != nil {
		s.stop()
		return "", err
	}
	deadline := time.Now().Add(30 * time.Minute)
	last := time.Now()
	for {
		n, err := s.deferredCount()
		if err == nil && n >= res.Accepted {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			s.stop()
			return "", fmt.Errorf("only %d of %d deferred after 30 minutes (%v)", n, res.Accepted, err)
		}
		if time.Since(last) > 15*time.Second {
			b.logf("   %s: %d of %d deferred", sysName, n, res.Accepted)
			last = time.Now()
		}
		time.Sleep(time.Second)
	}
	if err := s.stop(); err != nil {
		return "", err
	}
	b.logf("   %s: %d deferred messages queued (%.0fs)", sysName, res.Accepted, time.Since(res.Start).Seconds())
	return dir, nil
}

// copyState copies the state directories of a snapshot into dir, owners
// and times kept (Postfix reads a deferred file's time as its retry time).
func copyState(snapshot, dir string, names []string) error {
	for _, n := range names {
		out, err := exec.Command("cp", "-a", filepath.Join(snapshot, n), filepath.Join(dir, n)).CombinedOutput()
		if err != nil {
			return fmt.Errorf("copying the snapshot: %v: %s", err, out)
		}
	}
	return nil
}

// profile runs sys once more with its pprof endpoint on, takes a CPU
// profile over most of the run and the allocation profile after it. The
// profiles of stsrelay go to profiles/SCENARIO, those of the scenario's
// other stsrelay systems to profiles/SCENARIO/SYSTEM.
func (b *bench) profile(ctx context.Context, sc *scenario, w *world.World, rep *report, sys, snapshot string) error {
	est := 10.0
	if m := rep.median(sys, func(r *runResult) float64 { return r.E2ERate }); m > 0 {
		est = float64(sc.messages) / m
	}
	// Most of the run, never its idle end: the estimate comes from the
	// runs before, and the machine is shared.
	seconds := max(1, min(30, int(est*0.6)))
	profDir := filepath.Join(b.work, "profiles", sc.name)
	if sys != sysStsrelay {
		profDir = filepath.Join(profDir, sys)
	}
	if err := os.MkdirAll(profDir, 0o755); err != nil {
		return err
	}
	var (
		cpuDone chan error
		t0      time.Time
		inWin   int
	)
	o := runOptions{pprof: true}
	o.onStart = func() {
		t0 = time.Now()
		cpuDone = make(chan error, 1)
		go func() {
			cpuDone <- fetch(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", metricsAddr, seconds), filepath.Join(profDir, "cpu.pprof"))
		}()
	}
	var allocErr error
	o.onDone = func(c world.Count) {
		for _, a := range c.Arrivals {
			if a.At.Sub(t0) <= time.Duration(seconds)*time.Second {
				inWin += a.Recipients
			}
		}
		if err := <-cpuDone; err != nil {
			allocErr = fmt.Errorf("CPU profile: %w", err)
		}
		if err := fetch("http://"+metricsAddr+"/debug/pprof/allocs", filepath.Join(profDir, "allocs.pprof")); err != nil && allocErr == nil {
			allocErr = fmt.Errorf("allocation profile: %w", err)
		}
	}
	r := b.runOnce(ctx, sc, w, sys, 0, snapshot, o)
	if r.Err != "" {
		return fmt.Errorf("%s", r.Err)
	}
	if allocErr != nil {
		return allocErr
	}
	if sys == sysStsrelay {
		rep.profileDir, rep.profileSeconds, rep.profileRun = profDir, seconds, r
	}
	summary := fmt.Sprintf(`%s profiles, scenario %s (%s)
run: %.0f msg/s end to end, %.2f ms CPU per message (process)
cpu.pprof: the first %d s of the load, in which the sink received %d recipients
allocs.pprof: every allocation since start (the whole run, start-up included), %d messages accepted

  go tool pprof -top -cum %s/bin/stsrelay cpu.pprof
  go tool pprof -top -sample_index=alloc_space %s/bin/stsrelay allocs.pprof
  go tool pprof -http=127.0.0.1:8080 %s/bin/stsrelay cpu.pprof
`, systemTitles[sys], sc.name, sc.title(), r.E2ERate, r.CPUms, seconds, inWin, r.Accepted, b.work, b.work, b.work)
	if err := os.WriteFile(filepath.Join(profDir, "README"), []byte(summary), 0o644); err != nil {
		return err
	}
	b.logf("   profiles of %s (CPU over the first %ds, allocations over the run) in %s", sys, seconds, profDir)
	return nil
}

func fetch(url, file string) error {
	c := http.Client{Timeout: 2 * time.Minute}
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	if _, err := f.ReadFrom(resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// settle waits, at most max, until the cores were at least 90% idle over
// half a second and so were the disks, and says how long it waited and
// whether they were. The disks count because I/O wait is idle time to
// the cores: after a run that wrote many files (Postfix's queue), the
// writeback and the file system's journal go on after the sync, and the
// next system's fsyncs would wait behind them.
func settle(max time.Duration) (time.Duration, bool) {
	const window = 500 * time.Millisecond
	start := time.Now()
	busy0, total0 := cpuTicks()
	io0 := diskTicks()
	for time.Since(start) < max {
		time.Sleep(window)
		busy, total := cpuTicks()
		io := diskTicks()
		cpuIdle := total > total0 && float64(busy-busy0) <= 0.1*float64(total-total0)
		diskIdle := true
		for dev, ms := range io {
			if d := time.Duration(ms-io0[dev]) * time.Millisecond; d > window/10 {
				diskIdle = false
			}
		}
		if cpuIdle && diskIdle {
			return time.Since(start), true
		}
		busy0, total0, io0 = busy, total, io
	}
	return time.Since(start), false
}

// diskTicks returns, for each disk, the milliseconds it has spent doing
// I/O since boot (the tenth statistic of /proc/diskstats, io_ticks).
// Partitions and virtual devices are left out: a disk's own count covers
// its partitions.
func diskTicks() map[string]uint64 {
	b, _ := os.ReadFile("/proc/diskstats")
	out := make(map[string]uint64)
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) < 13 || strings.HasPrefix(f[2], "loop") || strings.HasPrefix(f[2], "ram") {
			continue
		}
		if _, err := os.Stat("/sys/block/" + f[2] + "/device"); err != nil {
			continue // a partition, or a device mapper or md volume
		}
		v, _ := strconv.ParseUint(f[12], 10, 64)
		out[f[2]] = v
	}
	return out
}

// selfCPU is the user and system time of this process alone, its
// children (the relays) not included.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// cpuTicks returns the busy and total ticks of all cores since boot, from
// the first line of /proc/stat (idle and iowait count as idle).
func cpuTicks() (busy, total uint64) {
	b, _ := os.ReadFile("/proc/stat")
	line, _, _ := strings.Cut(string(b), "\n")
	fields := strings.Fields(line)
	if len(fields) < 2 || fields[0] != "cpu" {
		return 0, 0 // no /proc: settle waits its maximum
	}
	for i, f := range fields[1:] {
		v, _ := strconv.ParseUint(f, 10, 64)
		if i == 7 { // steal: another guest's, not ours to wait for
			continue
		}
		if i >= 8 { // guest time is already in user time
			break
		}
		total += v
		if i != 3 && i != 4 { // idle, iowait
			busy += v
		}
	}
	return busy, total
}

// load1 is the machine's one-minute load average: how busy the others
// sharing it were.
func load1() float64 {
	b, _ := os.ReadFile("/proc/loadavg")
	var v float64
	fmt.Sscan(string(b), &v)
	return v
}
