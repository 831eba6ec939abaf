//go:build linux

package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/stsrelay/stsrelay/bench/internal/world"
)

// Addresses the relays listen on (one relay runs at a time).
const (
	submitAddr  = "127.0.25.10:587"
	metricsAddr = "127.0.25.10:9100"
)

// system is one relay under test: started fresh for every run.
type system interface {
	// start starts it with its state in dir (restored from a snapshot
	// when the scenario queues deferred mail first).
	start(ctx context.Context, sc *scenario, dir string, o runOptions) error
	// pids are the roots of its process tree.
	pids() []int
	// stop stops it and every process it started.
	stop() error
	// counters returns figures the relay reports about itself.
	counters() map[string]float64
	// deferredCount reports how many messages wait deferred.
	deferredCount() (int, error)
	// stateDirs lists what a snapshot must copy, relative to dir.
	stateDirs() []string
}

type runOptions struct {
	pprof   bool              // serve /debug/pprof on the metrics listener
	onStart func()            // called as the load starts
	onDone  func(world.Count) // called once the sink has everything, before stop
}

// env is what every system needs from the world and the build.
type env struct {
	stsrelayBin string
	baselineBin string // -baseline, for stsrelay-baseline; "" when none
	caFile      string
	relayCert   string // submission certificate for relay.bench.example
	relayKey    string
	user        string
	password    string
	passHash    string // bcrypt of password, for stsrelay
}

type stsrelaySys struct {
	env  *env
	bin  string // the binary run
	dir  string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited
	err  error         // its exit status, once done is closed
	log  *os.File
}

func (s *stsrelaySys) stateDirs() []string { return []string{"state"} }

func (s *stsrelaySys) start(ctx context.Context, sc *scenario, dir string, o runOptions) error {
	s.dir = dir
	trusted := `["127.0.0.0/8"]`
	if sc.auth {
		trusted = `[]`
	}
	pprof := ""
	if o.pprof {
		pprof = "pprof = true\n"
	}
	// Defaults everywhere but what the world needs: the bench DNS, IPv4,
	// and retries far enough out that deferred mail stays put during a run.
	conf := fmt.Sprintf(`hostname = "relay.bench.example"
state_dir = "state"

[log]
level = "info"

[submission]
listen = %q
tls_cert = %q
tls_key = %q
trusted_networks = %s
max_connections_per_ip = 100

[[submission.users]]
name = %q
password_hash = %q
allowed_senders = ["*@bench.example"]

[dns]
resolver = "127.0.25.53:53"

[delivery]
retry_schedule = ["1h", "2h", "4h"]
ip_version = "4"

[metrics]
listen = %q
%s`, submitAddr, s.env.relayCert, s.env.relayKey, trusted, s.env.user, s.env.passHash, metricsAddr, pprof)
	confFile := filepath.Join(dir, "stsrelay.toml")
	if err := os.WriteFile(confFile, []byte(conf), 0o600); err != nil {
		return err
	}
	var err error
	if s.log, err = os.Create(filepath.Join(dir, "stsrelay.log")); err != nil {
		return err
	}
	s.cmd = exec.Command(s.bin, "serve", "-config", confFile)
	s.cmd.Env = append(os.Environ(), "SSL_CERT_FILE="+s.env.caFile, "SSL_CERT_DIR=/nonexistent")
	s.cmd.Stdout, s.cmd.Stderr = s.log, s.log
	if err := s.cmd.Start(); err != nil {
		return err
	}
	s.done = make(chan struct{})
	go func() {
		s.err = s.cmd.Wait()
		close(s.done)
	}()
	if err := waitBanner(ctx, submitAddr, s.done, s.log.Name()); err != nil {
		s.stop()
		return err
	}
	return nil
}

func (s *stsrelaySys) pids() []int { return []int{s.cmd.Process.Pid} }

func (s *stsrelaySys) stop() error {
	defer s.log.Close()
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.done:
		if s.err != nil {
			return fmt.Errorf("stsrelay exited with %v; see %s", s.err, s.log.Name())
		}
		return nil
	case <-time.After(45 * time.Second):
		s.cmd.Process.Kill()
		<-s.done
		return fmt.Errorf("stsrelay did not stop within 45s of SIGTERM; killed")
	}
}

func (s *stsrelaySys) counters() map[string]float64 {
	m, err := scrape("http://" + metricsAddr + "/metrics")
	if err != nil {
		return nil
	}
	out := map[string]float64{
		"attempts": m["stsrelay_delivery_attempts_total"],
		"sessions": m["stsrelay_delivery_sessions_total"],
		"commits":  m["stsrelay_queue_commits_total"],
		"enqueued": m["stsrelay_queue_enqueued_total"],
	}
	return out
}

func (s *stsrelaySys) deferredCount() (int, error) {
	m, err := scrape("http://" + metricsAddr + "/metrics")
	if err != nil {
		return 0, err
	}
	return int(m[`stsrelay_queue_deliveries_total{outcome="deferred"}`]), nil
}

// scrape reads a Prometheus text exposition: series name with labels →
// value; series of the same name without their labels are also summed
// under the bare name.
func scrape(url string) (map[string]float64, error) {
	c := http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	out := make(map[string]float64)
	sc := bufio.NewScanner(io.LimitReader(resp.Body, 16<<20))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		series := line[:i]
		out[series] = v
		if j := strings.IndexByte(series, '{'); j >= 0 {
			out[series[:j]] += v
		}
	}
	return out, sc.Err()
}

// waitBanner waits until addr greets with 220, or the process exits.
func waitBanner(ctx context.Context, addr string, exited <-chan struct{}, logFile string) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.SetDeadline(time.Now().Add(5 * time.Second))
			line, _ := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if strings.HasPrefix(line, "220") {
				return nil
			}
		}
		select {
		case <-exited:
			return fmt.Errorf("exited during start-up; see %s", logFile)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not greet within 60s; see %s", addr, logFile)
		}
	}
}
