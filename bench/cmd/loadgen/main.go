// Command loadgen submits a load of messages to an SMTP relay and prints
// what it measured as JSON: acceptance rate and latencies, and, with
// -sink, the end-to-end rate up to the last arrival at world's sink.
//
//	loadgen -addr 127.0.0.1:2525 -n 20000 -size 4096 -c 20 -domain-kind enforce
//	loadgen -addr 127.0.0.1:587 -starttls -ca /tmp/world/ca.pem -servername relay.example -user app -password … -conn-per-message
package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/stsrelay/stsrelay/bench/internal/load"
	"github.com/stsrelay/stsrelay/bench/internal/world"
)

func main() {
	var o load.Options
	flag.StringVar(&o.Addr, "addr", "127.0.0.1:2525", "the relay's submission address")
	flag.IntVar(&o.Messages, "n", 1000, "messages")
	flag.IntVar(&o.Size, "size", 4096, "bytes per message, headers included")
	flag.IntVar(&o.Recipients, "rcpts", 1, "recipients per message")
	flag.IntVar(&o.DomainsPerMessage, "domains-per-message", 1, "recipient domains per message")
	flag.IntVar(&o.Sessions, "c", 20, "concurrent sessions")
	flag.BoolVar(&o.ConnPerMessage, "conn-per-message", false, "a new connection for every message")
	flag.StringVar(&o.User, "user", "", "AUTH PLAIN as this user")
	flag.StringVar(&o.Password, "password", "", "the password for -user")
	flag.StringVar(&o.From, "from", "app@bench.example", "MAIL FROM")
	kind := flag.String("domain-kind", "enforce", "recipient domains: enforce or plain (world's names)")
	domains := flag.Int("domains", 100, "how many of world's domains to spread recipients over")
	startTLS := flag.Bool("starttls", false, "use STARTTLS")
	caFile := flag.String("ca", "", "PEM CA file to verify the relay's certificate (default: the system's)")
	serverName := flag.String("servername", "", "the name the relay's certificate must carry (default: -addr's host)")
	sink := flag.String("sink", "", "world's count URL (http://127.0.25.1:8025/count): wait for every recipient there")
	flag.Parse()
	o.Domains = world.Domains(world.Kind(*kind), *domains)
	o.RunID = fmt.Sprint(time.Now().UnixNano())
	if *startTLS {
		o.TLS = &tls.Config{ServerName: *serverName, MinVersion: tls.VersionTLS12}
		if *caFile != "" {
			pem, err := os.ReadFile(*caFile)
			if err != nil {
				fail(err)
			}
			o.TLS.RootCAs = x509.NewCertPool()
			if !o.TLS.RootCAs.AppendCertsFromPEM(pem) {
				fail(fmt.Errorf("%s: no certificate", *caFile))
			}
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var before world.Count
	if *sink != "" {
		var err error
		if before, err = count(*sink); err != nil {
			fail(err)
		}
	}
	res, err := load.Run(ctx, o)
	if err != nil {
		fail(err)
	}
	out := map[string]any{
		"accepted":          res.Accepted,
		"failed":            res.Failed,
		"first_error":       res.FirstError,
		"accept_msgs_per_s": res.Rate(),
		"accept_p50_ms":     ms(res.Percentile(50)),
		"accept_p99_ms":     ms(res.Percentile(99)),
		"accept_max_ms":     ms(res.Percentile(100)),
	}
	if *sink != "" {
		last, err := waitSink(ctx, *sink, before.Recipients+res.Recipients)
		if err != nil {
			fail(err)
		}
		out["e2e_msgs_per_s"] = float64(res.Accepted) / last.Sub(res.Start).Seconds()
	}
	json.NewEncoder(os.Stdout).Encode(out)
}

func count(url string) (world.Count, error) {
	var c world.Count
	resp, err := http.Get(url)
	if err != nil {
		return c, err
	}
	defer resp.Body.Close()
	return c, json.NewDecoder(resp.Body).Decode(&c)
}

// waitSink polls the sink until it has want recipients in all, and returns
// the time of the last arrival.
func waitSink(ctx context.Context, url string, want int) (time.Time, error) {
	for {
		c, err := count(url)
		if err != nil {
			return time.Time{}, err
		}
		if c.Recipients >= want {
			return c.Last, nil
		}
		select {
		case <-ctx.Done():
			return time.Time{}, errors.New("interrupted before the sink had every recipient")
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

func fail(err error) {
	fmt.Fprintf(os.Stderr, "loadgen: %v\n", err)
	os.Exit(1)
}
