package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.etcd.io/bbolt"

	"github.com/stsrelay/stsrelay/admin"
	"github.com/stsrelay/stsrelay/config"
	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/internal/logwriter"
	"github.com/stsrelay/stsrelay/internal/sdnotify"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/resolve"
	"github.com/stsrelay/stsrelay/routing"
	"github.com/stsrelay/stsrelay/smtpin"
	"github.com/stsrelay/stsrelay/sts"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// shutdownGrace bounds how long in-flight sessions and deliveries may take
// to finish once a stop was asked for; what is left stays queued. Of it,
// shutdownRecord is kept back from deliveries for recording the ones cut
// off and closing the database, so that the whole stop fits in the grace.
const (
	shutdownGrace  = 30 * time.Second
	shutdownRecord = time.Second
)

func runServe(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("serve", "serve [-config file]", `
Serve runs the relay: the submission listener, the queue and the delivery
workers, until SIGINT or SIGTERM. SIGHUP reloads the users, the TLS
certificate, and the delivery routes, limits and TLS policies (with their
password files) from the configuration file; other changes need a restart.`, stderr)
	configPath := configFlag(fs)
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if fs.NArg() != 0 {
		return usageError(fs, stderr, "unexpected argument %q", fs.Arg(0))
	}
	cfg, err := loadConfig(*configPath)
	if err != nil {
		return fail(stderr, "%v", err)
	}
	// From here on the log is written through a logwriter: the goroutines
	// that log do not each wait for write(2). Everything else this command
	// writes to stderr goes the same way, so lines keep their order, and
	// the deferred Close writes what is left before the process exits.
	lw := logwriter.New(stderr, 0)
	defer lw.Close()
	stderr = lw
	logger := newLogger(cfg.Log, stderr)
	// Signals are caught before start: a SIGHUP from a log rotation during
	// start-up must not kill the process (its default action).
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	r, err := start(cfg, logger)
	if err != nil {
		return fail(stderr, "%v", err)
	}

	// Warnings come once everything is bound: a start that fails says one
	// line and nothing before it.
	for _, w := range r.warnings {
		logger.Warn(w.msg, w.attrs...)
	}
	notify(logger, sdnotify.Ready)
	logger.Info("stsrelay started", "version", versionLine(), "hostname", cfg.Hostname,
		"submission", addrString(r.smtp.Addr()), "submission_tls", addrString(r.smtp.TLSAddr()),
		"state_dir", cfg.StateDir)
	r.checkHostname()
wait:
	for {
		select {
		case <-hup:
			notify(logger, sdnotify.Reloading)
			r.reload(*configPath)
			notify(logger, sdnotify.Ready)
		case err := <-r.failed:
			logger.Error("stopping after a fatal error", "err", err)
			r.shutdown()
			return 1
		case <-ctx.Done():
			break wait
		}
	}
	notify(logger, sdnotify.Stopping)
	logger.Info("stopping: no new submissions; finishing what is in flight", "grace", shutdownGrace)
	r.shutdown()
	logger.Info("stopped")
	return 0
}

// notify tells systemd the daemon's state; a failure is logged, since
// systemd then waits for a message that never comes (and stops a start
// that never says READY=1 after TimeoutStartSec).
func notify(logger *slog.Logger, state func() error) {
	if err := state(); err != nil {
		logger.Warn("telling systemd the daemon's state failed", "err", err)
	}
}

// addrString prints a listener address, "off" for none.
func addrString(a net.Addr) string {
	if a == nil {
		return "off"
	}
	return a.String()
}

func newLogger(c config.Log, w io.Writer) *slog.Logger {
	var level slog.Level
	level.UnmarshalText([]byte(c.Level)) // validated by config
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "json" {
		opts.ReplaceAttr = durationText
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// durationText writes durations as Go writes them ("1.5s", "120ms"), as
// the text format does: JSON would otherwise get nanosecond integers.
func durationText(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindDuration {
		a.Value = slog.StringValue(a.Value.Duration().String())
	}
	return a
}

// relay is the running daemon: every part, so they can be stopped in order.
type relay struct {
	cfg     *config.Config
	logger  *slog.Logger
	db      *bbolt.DB
	writes  *sharedWrites
	queue   *queue.Queue
	engine  *delivery.Engine
	sts     *sts.Manager
	tlsrpt  *tlsrpt.Reporter
	smtp    *smtpin.Server
	certs   *smtpin.CertStore
	control *admin.Server
	metrics *http.Server
	// daneScope is where DANE applies with dane.enabled = false.
	daneScope *atomic.Pointer[routing.Table[bool]]

	res         *resolve.Resolver
	queueCtx    context.Context // ends at shutdown
	cancelQueue context.CancelFunc
	done        sync.WaitGroup
	failed      chan error // a part that stopped on its own
	// warnings are logged once start has succeeded.
	warnings []warning
}

// warning is one line logged at start.
type warning struct {
	msg   string
	attrs []any
}

// warn queues a warning for the end of a successful start.
func (r *relay) warn(msg string, attrs ...any) {
	r.warnings = append(r.warnings, warning{msg, attrs})
}

// sharedWrites runs the writes of the MTA-STS cache and of TLSRPT to the
// database the queue owns. Once the queue is up they go through its group
// commit (queue.(*Queue).Update) and share its fsyncs; before it is up, and
// after it has closed, straight to bbolt.
type sharedWrites struct {
	db *bbolt.DB
	q  atomic.Pointer[queue.Queue]
}

func (w *sharedWrites) update(fn func(tx *bbolt.Tx) error) error {
	if q := w.q.Load(); q != nil {
		if err := q.Update(fn); !errors.Is(err, queue.ErrClosed) {
			return err
		}
	}
	return w.db.Update(fn)
}

// start builds and starts every part. Anything that can fail for the
// operator's reasons (state_dir, ports, certificates) fails here, before
// systemd is told we are ready.
func start(cfg *config.Config, logger *slog.Logger) (_ *relay, err error) {
	r := &relay{cfg: cfg, logger: logger, failed: make(chan error, 4)}
	defer func() {
		if err != nil {
			r.closeParts()
		}
	}()
	if err := prepareStateDir(cfg.StateDir); err != nil {
		return nil, err
	}
	if r.db, err = queue.OpenDB(filepath.Join(cfg.StateDir, "stsrelay.db")); err != nil {
		return nil, err
	}
	r.writes = &sharedWrites{db: r.db}

	res, err := newResolver(cfg)
	if err != nil {
		return nil, err
	}
	r.res = res
	for _, w := range policyWarnings(cfg, res) {
		r.warn(w)
	}
	if err := r.newReporter(res); err != nil {
		return nil, err
	}
	parts, err := buildDelivery(cfg, res, r.db, r.writes.update, r.recorder(), logger)
	if err != nil {
		return nil, err
	}
	r.engine, r.sts, r.daneScope = parts.engine, parts.sts, parts.daneScope
	// r.smtp is made below, before the queue runs and calls this.
	signer, err := newSigner(cfg, logger, func(user, address string) bool { return r.smtp.SenderAllowed(user, address) })
	if err != nil {
		return nil, err
	}

	var schedule []time.Duration
	for _, d := range cfg.Delivery.RetrySchedule {
		schedule = append(schedule, d.Duration)
	}
	r.queue, err = queue.New(r.db, queue.Options{
		Deliverer:         signer.Wrap(r.engine),
		Workers:           cfg.Delivery.Workers,
		MaxConnsPerDomain: cfg.Delivery.MaxConnsPerDomain,
		RetrySchedule:     schedule,
		MaxQueueTime:      cfg.Delivery.MaxQueueTime.Duration,
		DelayNoticeAfter:  cfg.Delivery.DelayNoticeAfter.Duration,
		BounceSizeLimit:   int64(cfg.Delivery.BounceSizeLimit),
		Hostname:          cfg.Hostname,
		MaxMessageSize:    int64(cfg.Submission.MaxMessageSize) + 64<<10, // room for our Received header
		ShutdownGrace:     shutdownGrace - shutdownRecord,
		Logger:            logger,
	})
	if err != nil {
		return nil, err
	}
	r.writes.q.Store(r.queue)

	opts := smtpin.Options{
		Hostname:                 cfg.Hostname,
		Listen:                   cfg.Submission.Listen,
		ListenTLS:                cfg.Submission.ListenTLS,
		SessionTickets:           cfg.Submission.SessionTickets,
		TrustedNetworks:          prefixes(cfg.Submission.TrustedNetworks),
		InsecureAuthFromLoopback: true,
		Users:                    users(cfg.Submission.Users),
		ShowAuthUser:             cfg.Submission.ShowAuthUser,
		Postmaster:               cfg.Submission.Postmaster,
		MaxMessageSize:           int64(cfg.Submission.MaxMessageSize),
		MaxRecipients:            cfg.Submission.MaxRecipients,
		MaxHops:                  cfg.Submission.MaxHops,
		MaxConnsPerIP:            cfg.Submission.MaxConnsPerIP,
		MaxConns:                 cfg.Submission.MaxConns,
		CommandTimeout:           cfg.Submission.CommandTimeout.Duration,
		DataTimeout:              cfg.Submission.DataTimeout.Duration,
		AuthFailures:             cfg.Submission.AuthRate.Failures,
		AuthFailuresPerIP:        cfg.Submission.AuthRate.FailuresPerIP,
		AuthFailuresPer:          cfg.Submission.AuthRate.Per.Duration,
		Logger:                   logger,
	}
	if cfg.Submission.TLSCert != "" {
		if r.certs, err = smtpin.LoadCertificate(cfg.Submission.TLSCert, cfg.Submission.TLSKey); err != nil {
			if errors.Is(err, fs.ErrPermission) {
				return nil, fmt.Errorf("submission.tls_cert: %w (the user stsrelay runs as must be able to read the certificate and the key)", err)
			}
			return nil, fmt.Errorf("submission.tls_cert: %w", err)
		}
		opts.GetCertificate = r.certs.GetCertificate
	}
	if r.smtp, err = smtpin.New(opts, r.queue); err != nil {
		return nil, err
	}

	// Every listener is bound before any part starts, so that a port in
	// use fails the start with nothing running.
	mux := http.NewServeMux()
	r.queue.RegisterAdmin(mux)
	r.registerSTS(mux)
	r.registerTLSRPT(mux)
	if r.control, err = admin.Listen(admin.SocketPath(cfg.StateDir), mux, logger); err != nil {
		return nil, err
	}
	var metricsLn net.Listener
	if cfg.Metrics.Listen != "" {
		if metricsLn, err = net.Listen("tcp", cfg.Metrics.Listen); err != nil {
			return nil, fmt.Errorf("metrics.listen: %w", err)
		}
		m := http.NewServeMux()
		m.Handle("GET /metrics", promhttp.Handler())
		m.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
		if cfg.Metrics.Pprof {
			m.HandleFunc("GET /debug/pprof/", pprof.Index) // named profiles: allocs, heap, goroutine, …
			m.HandleFunc("GET /debug/pprof/cmdline", pprof.Cmdline)
			m.HandleFunc("GET /debug/pprof/profile", pprof.Profile)
			m.HandleFunc("GET /debug/pprof/symbol", pprof.Symbol)
			m.HandleFunc("GET /debug/pprof/trace", pprof.Trace)
		}
		r.metrics = &http.Server{Handler: m, ReadHeaderTimeout: 10 * time.Second}
	}
	if err := r.smtp.Listen(); err != nil {
		if metricsLn != nil {
			metricsLn.Close()
		}
		return nil, err
	}

	r.queueCtx, r.cancelQueue = context.WithCancel(context.Background())
	if r.metrics != nil {
		r.goServe("metrics", func() error { return r.metrics.Serve(metricsLn) })
	}
	r.goServe("queue", func() error { return r.queue.Run(r.queueCtx) })
	r.goServe("control socket", r.control.Serve)
	r.goServe("submission", r.smtp.Serve)
	r.startPolicy(r.queueCtx)
	r.startTLSRPT(r.queueCtx)
	return r, nil
}

// hostnameTimeout bounds the start-up lookup of our own name.
const hostnameTimeout = 10 * time.Second

// checkHostname warns when the name in EHLO, Received and DSNs
// (Reporting-MTA, postmaster@) is not one that receivers can check: left
// to the machine's name, not fully qualified, or without an address. It
// looks the name up in the background, so a slow resolver does not delay
// the start.
func (r *relay) checkHostname() {
	name := r.cfg.Hostname
	if r.cfg.HostnameFromSystem {
		r.logger.Warn("hostname is not set; using the machine's name, which MX hosts see in EHLO and senders in DSNs", "hostname", name)
	}
	if !strings.Contains(strings.TrimSuffix(name, "."), ".") {
		r.logger.Warn("hostname is not a fully qualified domain name; set hostname to a name with an A or AAAA record", "hostname", name)
		return
	}
	r.done.Add(1)
	go func() {
		defer r.done.Done()
		ctx, cancel := context.WithTimeout(r.queueCtx, hostnameTimeout)
		defer cancel()
		addrs, _, err := r.res.Addrs(ctx, name, resolve.IPBoth)
		switch {
		case r.queueCtx.Err() != nil:
		case (err != nil && resolve.IsNotFound(err)) || (err == nil && len(addrs) == 0):
			r.logger.Warn("hostname has no A or AAAA record; MX hosts may refuse an EHLO name without one", "hostname", name)
		case err != nil:
			r.logger.Warn("hostname: cannot look up its address; MX hosts may refuse an EHLO name without one", "hostname", name, "err", err)
		default:
			r.logger.Debug("hostname has an address", "hostname", name, "addrs", len(addrs))
		}
	}()
}

// goServe runs a part's serve loop; one that returns early is fatal.
func (r *relay) goServe(name string, serve func() error) {
	r.done.Add(1)
	go func() {
		defer r.done.Done()
		err := serve()
		if err != nil && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, smtpin.ErrServerClosed) {
			r.failed <- fmt.Errorf("%s: %w", name, err)
		}
	}()
}

// shutdown stops taking new work and lets what is in flight finish, under
// one deadline for submissions and deliveries alike (shutdownGrace, inside
// the unit's TimeoutStopSec). Undelivered recipients stay queued; a message
// submitted meanwhile is still committed, and goes out after the restart.
func (r *relay) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	r.cancelQueue()
	if err := r.smtp.Shutdown(ctx); err != nil {
		r.logger.Warn("submission sessions cut off at shutdown", "err", err)
	}
	r.control.Close()
	if r.metrics != nil {
		r.metrics.Close()
	}
	r.done.Wait()
	r.closeParts()
}

// closeParts releases whatever start got to, in reverse order.
func (r *relay) closeParts() {
	if r.metrics != nil {
		r.metrics.Close()
	}
	if r.control != nil {
		r.control.Close()
	}
	if r.engine != nil {
		r.engine.Close()
	}
	if r.sts != nil {
		r.sts.WaitWrites() // fetches finish after their deliveries
	}
	if r.tlsrpt != nil {
		r.tlsrpt.Close() // stores buffered results while the database is open
	}
	if r.queue != nil {
		r.queue.Close()
	}
	if r.db != nil {
		r.db.Close()
	}
}

// reload applies what can change without a restart: users, the TLS
// certificate, and delivery's routes, limits and TLS policies. It logs
// every other change it had to leave alone.
func (r *relay) reload(path string) {
	cfg, err := loadConfig(path)
	if err != nil {
		r.logger.Error("reload failed; keeping the running configuration", "err", err)
		return
	}
	if err := r.smtp.SetUsers(users(cfg.Submission.Users)); err != nil {
		r.logger.Error("reload: users not changed", "err", err)
	} else {
		r.logger.Info("reload: users loaded", "users", len(cfg.Submission.Users))
	}
	if r.certs != nil && cfg.Submission.TLSCert == r.cfg.Submission.TLSCert && cfg.Submission.TLSKey == r.cfg.Submission.TLSKey {
		if err := r.certs.Reload(); err != nil {
			r.logger.Error("reload: keeping the old certificate", "err", err)
		} else {
			r.logger.Info("reload: certificate loaded", "file", cfg.Submission.TLSCert)
		}
	}
	if err := r.reloadRoutes(cfg.Delivery); err != nil {
		r.logger.Error("reload: routes, limits and TLS policies not changed", "err", err)
	} else {
		r.logger.Info("reload: routes, limits and TLS policies loaded", "routes", len(cfg.Delivery.Routes),
			"limits", len(cfg.Delivery.Limits), "policies", len(cfg.Delivery.Policies))
		r.cfg.Delivery.Policies, r.cfg.Delivery.Routes, r.cfg.Delivery.Limits = cfg.Delivery.Policies, cfg.Delivery.Routes, cfg.Delivery.Limits
	}
	for _, key := range changedNeedingRestart(r.cfg, cfg) {
		r.logger.Warn("reload: setting changed but needs a restart", "key", key)
	}
	r.cfg.Submission.Users = cfg.Submission.Users
}

func (r *relay) reloadRoutes(d config.Delivery) error {
	overrides, routes, limits, err := deliveryTables(d)
	if err != nil {
		return err
	}
	scope, err := daneScope(d)
	if err != nil {
		return err
	}
	if err := r.engine.SetRoutes(overrides, routes, limits); err != nil {
		return err
	}
	r.daneScope.Store(scope)
	return nil
}

// changedNeedingRestart lists the keys that differ, except what reload
// applies (the users, the delivery policies, routes and limits).
func changedNeedingRestart(old, cur *config.Config) []string {
	return slices.DeleteFunc(config.Changed(old, cur), func(k string) bool {
		switch k {
		case "submission.users", "delivery.policy", "delivery.route", "delivery.limits":
			return true
		}
		return false
	})
}

// prepareStateDir creates the state directory and proves it writable, so
// that a read-only or foreign directory fails at start in one line.
func prepareStateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("state_dir %s: cannot create it: %w", dir, errors.Unwrap(err))
	}
	f, err := os.CreateTemp(dir, ".write-test-*")
	if err != nil {
		return fmt.Errorf("state_dir %s: not writable: %w", dir, errors.Unwrap(err))
	}
	f.Close()
	return os.Remove(f.Name())
}

func ipVersion(s string) resolve.IPVersion {
	switch s {
	case "4":
		return resolve.IPv4
	case "6":
		return resolve.IPv6
	}
	return resolve.IPBoth
}

func prefixes(nets []config.Network) []netip.Prefix {
	var p []netip.Prefix
	for _, n := range nets {
		p = append(p, n.Prefix)
	}
	return p
}

func users(us []config.User) []smtpin.User {
	var out []smtpin.User
	for _, u := range us {
		out = append(out, smtpin.User{Name: u.Name, PasswordHash: u.PasswordHash, AllowedSenders: u.AllowedSenders})
	}
	return out
}
