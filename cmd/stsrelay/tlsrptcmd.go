package main

import (
	"context"
	"fmt"
	"io"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/stsrelay/stsrelay/tlsrpt"
)

const tlsrptHelp = `
Tlsrpt shows and sends the TLS reports (RFC 8460) of the running relay,
through its control socket. TLS reporting is on with tlsrpt.enabled = true.

The commands are:

	list     show the session counts gathered per day, domain and policy
	send     send the reports of a day now

Use "stsrelay tlsrpt <command> -help" for more information about a command.`

func runTLSRPT(args []string, stdout, stderr io.Writer) int {
	return runGroup("tlsrpt", tlsrptHelp, args, stderr, map[string]func([]string) int{
		"list": func(a []string) int { return runTLSRPTList(a, stdout, stderr) },
		"send": func(a []string) int { return runTLSRPTSend(a, stdout, stderr) },
	})
}

func runTLSRPTList(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("tlsrpt list", "tlsrpt list [-config file] [-json]", `
List prints the TLS session results the running relay has gathered, per UTC
day, recipient domain and policy (sts, tlsa, no-policy-found): successful
and failed sessions, failures by RFC 8460 result type, and what became of
the day's report.`, stderr)
	cfgPath := configFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	var list []tlsrpt.DomainInfo
	if err := controlCall(*cfgPath, "GET", "/tlsrpt", &list); err != nil {
		return fail(stderr, "tlsrpt list: %v", err)
	}
	if *asJSON {
		return printJSON(stdout, stderr, list)
	}
	if len(list) == 0 {
		fmt.Fprintln(stdout, "no TLS session results gathered yet")
		return 0
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DAY\tDOMAIN\tPOLICY\tOK\tFAILED\tREPORT")
	for _, d := range list {
		report := reportState(d.Reports)
		for i, p := range d.Policies {
			failed := fmt.Sprint(p.Failed)
			if len(p.Failures) > 0 {
				var kinds []string
				for k, n := range p.Failures {
					kinds = append(kinds, fmt.Sprintf("%s=%d", k, n))
				}
				sort.Strings(kinds)
				failed += " (" + strings.Join(kinds, " ") + ")"
			}
			if i > 0 {
				report = ""
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", d.Day, d.Domain, p.Type, p.Successful, failed, report)
		}
	}
	tw.Flush()
	return 0
}

// reportState says in a few words what became of a day's report.
func reportState(reports []tlsrpt.ReportInfo) string {
	for _, r := range reports {
		if r.Partial {
			continue
		}
		switch r.State {
		case "sent":
			return "sent " + r.Sent.UTC().Format(time.RFC3339) + " to " + strings.Join(r.SentTo, ",")
		case "pending":
			return fmt.Sprintf("pending, next attempt %s: %s", r.Next.UTC().Format(time.RFC3339), printable(r.LastError))
		case "no-record":
			return "none: the domain publishes no TLSRPT record"
		default:
			return r.State + ": " + printable(r.LastError)
		}
	}
	return "-"
}

func runTLSRPTSend(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("tlsrpt send", "tlsrpt send [-config file] [-day YYYY-MM-DD] [-force] [-json]", `
Send makes the reports of a UTC day and sends them now, instead of at the
daily time: one per domain that had sessions and publishes a TLSRPT record.
A report already sent is not sent again unless -force is given; it then
goes again as it was, with the same report-id.

The running day is sent only with -force, as a partial report that ends
now (the full report still follows after midnight): use it to test the
reporting setup end to end.`, stderr)
	cfgPath := configFlag(fs)
	day := fs.String("day", "", "the UTC `day` to report (default: the last closed day)")
	force := fs.Bool("force", false, "send again what was sent; allow the running day")
	asJSON := fs.Bool("json", false, "print JSON")
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	if *day != "" {
		if _, err := time.Parse("2006-01-02", *day); err != nil {
			return fail(stderr, "tlsrpt send: -day %q is not YYYY-MM-DD", *day)
		}
	}
	c, err := controlClient(*cfgPath)
	if err != nil {
		return fail(stderr, "tlsrpt send: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), controlTimeout)
	defer cancel()
	var res []tlsrpt.SendResult
	if err := c.Call(ctx, "POST", "/tlsrpt/send", tlsrpt.SendRequest{Day: *day, Force: *force}, &res); err != nil {
		return fail(stderr, "tlsrpt send: %v", err)
	}
	if *asJSON {
		return printJSON(stdout, stderr, res)
	}
	if len(res) == 0 {
		fmt.Fprintln(stdout, "no TLS session results for that day: nothing to report")
		return 0
	}
	code := 0
	for _, r := range res {
		switch {
		case r.Skipped:
			fmt.Fprintf(stdout, "%s: already %s (use -force to send again)\n", r.Domain, r.State)
		case r.State == "sent":
			fmt.Fprintf(stdout, "%s: sent to %s (report-id %s)\n", r.Domain, strings.Join(r.SentTo, ", "), r.ReportID)
		case r.State == "no-record":
			say(stdout, "%s: not sent: %s\n", r.Domain, r.Error)
		case r.State == "pending":
			say(stdout, "%s: not delivered yet, will retry: %s\n", r.Domain, r.Error)
			code = 1
		default:
			say(stdout, "%s: %s: %s\n", r.Domain, r.State, r.Error)
			code = 1
		}
	}
	return code
}
