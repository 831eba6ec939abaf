// Command world runs the benchmark's world on its own, for experiments by
// hand: the DNS server (127.0.25.53:53), the MTA-STS policy host
// (127.0.25.2:443) and the STARTTLS sink on port 25 of 127.0.26.1-N, with
// a fresh CA written to -dir. It serves the sink's counts as JSON on
// -control, which loadgen -sink reads. Needs root for the ports. bench/run
// does not use it: its driver runs the same world in-process.
//
//	world -dir /tmp/world &
//	SSL_CERT_FILE=/tmp/world/ca.pem stsrelay serve -config relay.toml   # dns.resolver = "127.0.25.53:53"
//	loadgen -addr 127.0.0.1:2525 -n 2000 -sink http://127.0.25.1:8025/count
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/stsrelay/stsrelay/bench/internal/world"
)

func main() {
	dir := flag.String("dir", "", "where to write ca.pem (required)")
	domains := flag.Int("domains", 100, "recipient domains of each kind (enforce001.example…, plain001.example…)")
	control := flag.String("control", "127.0.25.1:8025", "address of the JSON counts (GET /count)")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "world: -dir is required")
		os.Exit(2)
	}
	if err := run(*dir, *domains, *control); err != nil {
		fmt.Fprintf(os.Stderr, "world: %v\n", err)
		os.Exit(1)
	}
}

func run(dir string, domains int, control string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	ca, err := world.NewCA()
	if err != nil {
		return err
	}
	caFile, err := ca.WriteCA(dir)
	if err != nil {
		return err
	}
	w, err := world.Start(world.Options{Domains: domains, CA: ca})
	if err != nil {
		return err
	}
	defer w.Close()
	l, err := net.Listen("tcp", control)
	if err != nil {
		return fmt.Errorf("control: %w", err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(rw http.ResponseWriter, _ *http.Request) {
			c := w.Sink.Snapshot()
			c.Arrivals = nil
			rw.Header().Set("Content-Type", "application/json")
			json.NewEncoder(rw).Encode(c)
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go srv.Serve(l)
	defer srv.Close()
	fmt.Printf("world: CA %s; DNS %s:53; MTA-STS policies %s:443; sink %s..%s:25; counts http://%s/count\n",
		caFile, world.DNSIP, world.PolicyIP, world.MXIP(1), world.MXIP(domains), control)
	fmt.Printf("world: domains %s..%s (MTA-STS enforce), %s..%s (no policy), %s (MX refuses)\n",
		world.Domain(world.Enforce, 1), world.Domain(world.Enforce, domains),
		world.Domain(world.Plain, 1), world.Domain(world.Plain, domains), world.DeferDomain)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	<-ctx.Done()
	return nil
}
