package main

import (
	"context"
	"errors"
	"flag"
	"io"
	"log/slog"
	"net/url"
	"os"
	"time"

	"github.com/stsrelay/stsrelay/admin"
	"github.com/stsrelay/stsrelay/config"
	"github.com/stsrelay/stsrelay/resolve"
	"github.com/stsrelay/stsrelay/sts"
)

func runCheck(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("check", "check [-config file] domain", `
Check explains how mail to a domain would be protected by MTA-STS: it prints
the _mta-sts TXT record, fetches the policy, shows the policy cached by the
running relay (if one runs), and tells for each MX host whether it passes the
policy's mx patterns, both as RFC 8461 §4.1 reads them (the MX record's own
name) and with sts.match_cname_target (the final CNAME target too). No mail
is sent.

The DNS resolver, fetch timeout and match_cname_target come from the
configuration file; without one at the default path, built-in defaults
(/etc/resolv.conf) are used.`, stderr)
	cfgPath := configFlag(fs)
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if fs.NArg() != 1 || fs.Arg(0) == "" {
		fs.Usage()
		return 2
	}
	domain := fs.Arg(0)

	cfg, err := loadConfig(*cfgPath)
	if err != nil {
		explicit := false
		fs.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "config" })
		if _, serr := os.Stat(*cfgPath); explicit || !errors.Is(serr, os.ErrNotExist) {
			return fail(stderr, "check: %v", err)
		}
		cfg = config.Default()
		cfg.StateDir = "" // no configuration, so no known daemon either
	}

	var servers []string
	if cfg.DNS.Resolver != "" {
		servers = []string{cfg.DNS.Resolver}
	}
	res, err := resolve.New(resolve.Config{Servers: servers, Timeout: cfg.DNS.Timeout.Duration})
	if err != nil {
		return fail(stderr, "check: %v", err)
	}
	m, err := sts.New(sts.Options{
		Resolver:         res,
		FetchTimeout:     cfg.STS.FetchTimeout.Duration,
		MatchCNAMETarget: cfg.STS.MatchCNAMETarget,
		Logger:           slog.New(slog.DiscardHandler),
	})
	if err != nil {
		return fail(stderr, "check: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	report := m.Check(ctx, domain)

	switch {
	case cfg.StateDir == "":
		report.CachedNote = "unknown: no configuration file, so no daemon to ask"
	default:
		var info sts.PolicyInfo
		err := admin.Dial(admin.SocketPath(cfg.StateDir)).Call(ctx, "GET", "/sts/"+url.PathEscape(report.Domain), nil, &info)
		switch {
		case err == nil:
			report.Cached = &info
		case errors.Is(err, admin.ErrNotRunning):
			report.CachedNote = "no daemon running"
		default:
			report.CachedNote = err.Error()
		}
	}
	report.Write(stdout)
	return 0
}
