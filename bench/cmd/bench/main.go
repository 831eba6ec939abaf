//go:build linux

// Command bench is the end-to-end benchmark of stsrelay against Postfix
// with postfix-mta-sts-resolver. bench/run builds it and runs it as root
// in a private mount namespace; see BENCHMARKS.md.
//
// For every scenario it starts the world (DNS, MTA-STS policy hosts, the
// STARTTLS sink, all on loopback), then runs the same load against each
// system in turn, repeated (A B C, A B C, …), each run on a fresh
// instance, and prints medians and stsrelay/Postfix ratios.
package main

import (
	"context"
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/stsrelay/stsrelay/bench/internal/world"
	"github.com/stsrelay/stsrelay/smtpin"
)

// portsLock is the lock every stsrelay test that binds fixed ports takes.
const portsLock = "/tmp/stsrelay-ports.lock"

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	quick := fs.Bool("quick", false, "small loads, one repetition: a few minutes")
	reps := fs.Int("reps", 0, "repetitions of every scenario (default 3, 1 with -quick)")
	only := fs.String("scenarios", "", "comma-separated scenario names to run (default all)")
	systems := fs.String("systems", "", "comma-separated systems to run (default each scenario's)")
	bin := fs.String("stsrelay", "", "the stsrelay binary (bench/run builds it)")
	work := fs.String("work", "", "working directory for state, logs, results and profiles")
	keep := fs.Bool("keep", false, "keep every run's state directory")
	list := fs.Bool("list", false, "list the scenarios and exit")
	messages := fs.Int("messages", 0, "override every scenario's message count (a smoke test)")
	profileAll := fs.Bool("profile", false, "take pprof profiles of every stsrelay system in every scenario, not only of stsrelay in the main one")
	baseline := fs.String("baseline", "", "another stsrelay binary to run as system stsrelay-baseline next to stsrelay in every scenario that has it, for before/after ratios")
	baselineRev := fs.String("baseline-rev", "", "the git revision -baseline was built from, for the report (bench/run -baseline-rev REV builds it and sets both)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	all := scenarios(*quick)
	if *profileAll {
		for _, sc := range all {
			sc.profile, sc.profileAll = true, true
		}
	}
	if *messages > 0 {
		for _, sc := range all {
			sc.messages = *messages
			sc.deferred = min(sc.deferred, *messages)
		}
	}
	if *baselineRev != "" && *baseline == "" {
		fmt.Fprintln(stderr, "bench: -baseline-rev names the revision of -baseline; use bench/run -baseline-rev REV, which builds it")
		return 2
	}
	if *baseline != "" {
		if fi, err := os.Stat(*baseline); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
			fmt.Fprintf(stderr, "bench: -baseline %s is not an executable file\n", *baseline)
			return 2
		}
		withBaseline(all)
		systemTitles[sysStsrelayBaseline] = baselineTitle(*baselineRev)
	}
	if *list {
		for _, sc := range all {
			fmt.Fprintf(stdout, "%-22s %s [%s]\n", sc.name, sc.title(), strings.Join(sc.systems, ", "))
		}
		return 0
	}
	if *bin == "" || *work == "" {
		fmt.Fprintln(stderr, "bench: -stsrelay and -work are required; run it through bench/run")
		return 2
	}
	if *reps == 0 {
		*reps = 3
		if *quick {
			*reps = 1
		}
	}
	selected := all
	if *only != "" {
		selected = nil
		for _, name := range strings.Split(*only, ",") {
			i := slices.IndexFunc(all, func(s *scenario) bool { return s.name == name })
			if i < 0 {
				fmt.Fprintf(stderr, "bench: no scenario %q (see -list)\n", name)
				return 2
			}
			selected = append(selected, all[i])
		}
	}
	if *systems != "" {
		want := strings.Split(*systems, ",")
		for _, sc := range selected {
			sc.systems = slices.DeleteFunc(slices.Clone(sc.systems), func(s string) bool {
				// The baseline goes with stsrelay unless asked for alone.
				if s == sysStsrelayBaseline && slices.Contains(want, sysStsrelay) {
					return false
				}
				return !slices.Contains(want, s)
			})
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	b, err := newBench(*work, *bin, *baseline, *reps, *keep, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "bench: %v\n", err)
		return 1
	}
	fmt.Fprintf(stderr, "bench: %d scenario(s), %d repetition(s); work directory %s\n", len(selected), *reps, *work)
	var reports []*report
	failed := false
	for _, sc := range selected {
		rep, err := b.scenario(ctx, sc)
		if err != nil {
			fmt.Fprintf(stderr, "bench: %s: %v\n", sc.name, err)
			failed = true
			if ctx.Err() != nil {
				break
			}
			continue
		}
		reports = append(reports, rep)
		rep.printText(stdout)
	}
	printTargets(stdout, targets(reports))
	if len(reports) > 0 {
		md := filepath.Join(*work, "results.md")
		if err := writeMarkdown(md, reports, *quick, *reps, args); err != nil {
			fmt.Fprintf(stderr, "bench: %v\n", err)
		} else {
			fmt.Fprintf(stderr, "bench: tables in %s; raw runs in %s\n", md, filepath.Join(*work, "runs.jsonl"))
		}
	}
	if failed {
		return 1
	}
	return 0
}

// baselineTitle names the baseline in tables: "stsrelay baseline", with
// the revision it was built from when known.
func baselineTitle(rev string) string {
	if rev == "" {
		return "stsrelay baseline"
	}
	return "stsrelay baseline (" + rev + ")"
}

// bench holds what lives across scenarios.
type bench struct {
	work  string
	reps  int
	keep  bool
	log   io.Writer
	env   *env
	ca    *world.CA
	runs  *os.File // one JSON line per run
	start time.Time
}

func newBench(work, bin, baseline string, reps int, keep bool, log io.Writer) (*bench, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("needs root: ports 25, 53 and 443, a private mount namespace, Postfix")
	}
	// Postfix runs as its own user, so everything it reads must be reachable.
	if err := os.MkdirAll(work, 0o755); err != nil {
		return nil, err
	}
	if err := os.Chmod(work, 0o755); err != nil {
		return nil, err
	}
	if err := privateResolvConf(work); err != nil {
		return nil, err
	}
	ca, err := world.NewCA()
	if err != nil {
		return nil, err
	}
	caFile, err := ca.WriteCA(work)
	if err != nil {
		return nil, err
	}
	relay, err := ca.Issue("relay.bench.example")
	if err != nil {
		return nil, err
	}
	certFile, keyFile, err := world.WriteCert(work, "relay", relay)
	if err != nil {
		return nil, err
	}
	const password = "bench-password"
	hash, err := smtpin.HashPassword([]byte(password))
	if err != nil {
		return nil, err
	}
	runs, err := os.OpenFile(filepath.Join(work, "runs.jsonl"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, err
	}
	return &bench{
		work: work, reps: reps, keep: keep, log: log, ca: ca, runs: runs, start: time.Now(),
		env: &env{
			stsrelayBin: bin, baselineBin: baseline, caFile: caFile, relayCert: certFile, relayKey: keyFile,
			user: "app@bench.example", password: password, passHash: hash,
		},
	}, nil
}

// privateResolvConf points /etc/resolv.conf at the bench DNS for this
// process and its children (Postfix, the MTA-STS resolver), by a bind
// mount in the mount namespace bench/run made with unshare. It refuses to
// run in its caller's namespace, whose resolv.conf it must not change.
func privateResolvConf(work string) error {
	// bench/run names the namespace it started in; the parent's is only a
	// fallback, since a parent that exits (bench/run under nohup, say)
	// leaves nothing to compare with.
	self, err1 := os.Readlink("/proc/self/ns/mnt")
	caller, err2 := os.Getenv("STSRELAY_BENCH_CALLER_MNTNS"), error(nil)
	if caller == "" {
		caller, err2 = os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", os.Getppid()))
	}
	if err1 != nil || err2 != nil || self == caller {
		return fmt.Errorf("not in a mount namespace of its own: run it through bench/run (unshare -m), which keeps the system's /etc/resolv.conf untouched")
	}
	// Nothing mounted here may propagate back to the caller's namespace.
	if err := syscall.Mount("", "/", "", syscall.MS_REC|syscall.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("making mounts private: %w", err)
	}
	f := filepath.Join(work, "resolv.conf")
	if err := os.WriteFile(f, []byte("nameserver "+world.DNSIP+"\noptions timeout:2 attempts:2\n"), 0o644); err != nil {
		return err
	}
	if err := syscall.Mount(f, "/etc/resolv.conf", "", syscall.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind-mounting %s on /etc/resolv.conf: %w", f, err)
	}
	return nil
}

// lockPorts takes the lock shared with the tests that bind fixed ports,
// for one scenario at a time, so that they can run in between.
func (b *bench) lockPorts() (unlock func(), err error) {
	f, err := os.OpenFile(portsLock, os.O_CREATE|os.O_RDWR, 0o666)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		fmt.Fprintf(b.log, "bench: waiting for %s (someone runs tests on fixed ports)\n", portsLock)
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
			f.Close()
			return nil, err
		}
	}
	return func() { f.Close() }, nil
}

// clientTLS is how the load generator checks the relays' submission
// certificate: issued by the bench CA for relay.bench.example.
func (b *bench) clientTLS() *tls.Config {
	return &tls.Config{RootCAs: b.ca.Pool, ServerName: "relay.bench.example", MinVersion: tls.VersionTLS12}
}
