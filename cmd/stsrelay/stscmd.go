package main

import (
	"fmt"
	"io"
	"net/url"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/stsrelay/stsrelay/sts"
)

const stsHelp = `
Sts lists and manages the MTA-STS policy cache of the running relay, through
its control socket. It never opens the database itself.

The commands are:

	list     list the cached policies and the domains whose fetch failed
	show     show the cached policy of a domain
	refresh  fetch the policy of a domain now, ignoring the cache
	purge    forget the cached policy of a domain

Use "stsrelay sts <command> -help" for more information about a command.`

func runSTS(args []string, stdout, stderr io.Writer) int {
	return runGroup("sts", stsHelp, args, stderr, map[string]func([]string) int{
		"list": func(a []string) int { return runSTSList(a, stdout, stderr) },
		"show": func(a []string) int {
			return runSTSDomain("show", "GET", "", a, stdout, stderr, `
Show prints the relay's cached MTA-STS policy of a domain: its id, mode, mx
patterns, when it was fetched and when it expires.`)
		},
		"refresh": func(a []string) int {
			return runSTSDomain("refresh", "POST", "/refresh", a, stdout, stderr, `
Refresh makes the relay look up the domain's _mta-sts TXT record and fetch
its policy now, even when the cached policy is current or a fetch failed
less than 5 minutes ago, and prints the result.`)
		},
		"purge": func(a []string) int {
			return runSTSDomain("purge", "DELETE", "", a, stdout, stderr, `
Purge makes the relay forget the cached MTA-STS policy of a domain, in memory
and on disk. The next delivery to the domain discovers its policy afresh.
Purging an enforce policy drops its protection until then.`)
		},
	})
}

func runSTSList(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("sts list", "sts list [-config file] [-json]", `
List prints the MTA-STS policies cached by the running relay, one per line,
and the domains without one whose last policy fetch failed: their mail goes
as without MTA-STS. When a fetch has failed, a last column says which policy
id, when and why; a cached policy on the same line stays in force until it
expires.`, stderr)
	cfgPath := configFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if fs.NArg() != 0 {
		return usageError(fs, stderr, "unexpected argument %q (list takes no domain; use show)", fs.Arg(0))
	}
	var list []sts.PolicyInfo
	// A relay that predates not_cached ignores the parameter and lists
	// its cached policies only.
	if err := controlCall(*cfgPath, "GET", "/sts?not_cached=1", &list); err != nil {
		return fail(stderr, "sts list: %s", printable(err.Error()))
	}
	if *asJSON {
		return printJSON(stdout, stderr, list)
	}
	if len(list) == 0 {
		fmt.Fprintln(stdout, "no cached MTA-STS policies")
		return 0
	}
	// The column of failures only when there is one: the list of a relay
	// whose fetches all worked reads as it always has.
	failed := slices.ContainsFunc(list, func(p sts.PolicyInfo) bool { return p.LastError != "" })
	var table strings.Builder
	tw := tabwriter.NewWriter(&table, 0, 4, 2, ' ', 0)
	header := "DOMAIN\tMODE\tID\tEXPIRES\tMX"
	if failed {
		header += "\tLAST FETCH FAILED"
	}
	fmt.Fprintln(tw, header)
	for _, p := range list {
		mode, id, expires, mx := "-", "-", "-", "-"
		if !p.NotCached {
			mode, id, mx = string(p.Mode), p.ID, strings.Join(p.MX, " ")
			expires = p.Expires.UTC().Format(time.RFC3339)
			if p.Expired {
				expires += " (expired)"
			}
		}
		say(tw, "%s\t%s\t%s\t%s\t%s", p.Domain, mode, id, expires, mx)
		if failed {
			say(tw, "\t%s", lastFailure(&p))
		}
		fmt.Fprintln(tw)
	}
	tw.Flush()
	// A row without a failure ends in an empty column, and tabwriter pads
	// the one before it.
	for line := range strings.Lines(table.String()) {
		fmt.Fprintln(stdout, strings.TrimRight(line, " \n"))
	}
	return 0
}

// lastFailure says in a line which policy id of p's domain failed to be
// fetched, when and why; "" when none did.
func lastFailure(p *sts.PolicyInfo) string {
	if f := p.LastFailure; f != nil {
		return f.ID + " at " + f.At.UTC().Format(time.RFC3339) + ": " + f.Reason
	}
	return p.LastError // from a relay that says no more
}

// runSTSDomain runs show, refresh and purge: one call about one domain.
func runSTSDomain(name, method, suffix string, args []string, stdout, stderr io.Writer, help string) int {
	fs := newFlagSet("sts "+name, "sts "+name+" [-config file] [-json] domain", help, stderr)
	cfgPath := configFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if fs.NArg() != 1 || fs.Arg(0) == "" {
		return usageError(fs, stderr, "want exactly one domain")
	}
	domain := fs.Arg(0)
	path := "/sts/" + url.PathEscape(domain) + suffix
	if method == "DELETE" {
		var out map[string]string
		if err := controlCall(*cfgPath, method, path, &out); err != nil {
			return fail(stderr, "sts %s: %s", name, printable(err.Error()))
		}
		if *asJSON {
			return printJSON(stdout, stderr, out)
		}
		fmt.Fprintf(stdout, "purged the cached MTA-STS policy of %s\n", domain)
		return 0
	}
	var info sts.PolicyInfo
	// The error may say how the last fetch failed, in the policy host's
	// words.
	if err := controlCall(*cfgPath, method, path, &info); err != nil {
		return fail(stderr, "sts %s: %s", name, printable(err.Error()))
	}
	if *asJSON {
		return printJSON(stdout, stderr, info)
	}
	printPolicyInfo(stdout, &info)
	return 0
}

func printPolicyInfo(w io.Writer, p *sts.PolicyInfo) {
	state := "in force"
	if p.Expired {
		state = "expired"
	}
	fmt.Fprintf(w, "domain:    %s\n", p.Domain)
	fmt.Fprintf(w, "id:        %s\n", p.ID)
	fmt.Fprintf(w, "mode:      %s\n", p.Mode)
	fmt.Fprintf(w, "mx:        %s\n", strings.Join(p.MX, " "))
	fmt.Fprintf(w, "max_age:   %ds\n", p.MaxAge)
	fmt.Fprintf(w, "fetched:   %s\n", p.Fetched.UTC().Format(time.RFC3339))
	fmt.Fprintf(w, "expires:   %s (%s)\n", p.Expires.UTC().Format(time.RFC3339), state)
	if !p.LastUsed.IsZero() {
		fmt.Fprintf(w, "last used: %s\n", p.LastUsed.UTC().Format(time.RFC3339))
	}
	if f := lastFailure(p); f != "" {
		// The id that failed may be newer than the cached one.
		say(w, "last fetch failed: %s\n", f)
	}
}
