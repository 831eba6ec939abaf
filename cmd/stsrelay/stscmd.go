package main

import (
	"fmt"
	"io"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/stsrelay/stsrelay/sts"
)

const stsHelp = `
Sts lists and manages the MTA-STS policy cache of the running relay, through
its control socket. It never opens the database itself.

The commands are:

	list     list the cached policies
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
List prints the MTA-STS policies cached by the running relay, one per line.`, stderr)
	cfgPath := configFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if fs.NArg() != 0 {
		return usageError(fs, stderr, "unexpected argument %q (list takes no domain; use show)", fs.Arg(0))
	}
	var list []sts.PolicyInfo
	if err := controlCall(*cfgPath, "GET", "/sts", &list); err != nil {
		return fail(stderr, "sts list: %s", printable(err.Error()))
	}
	if *asJSON {
		return printJSON(stdout, stderr, list)
	}
	if len(list) == 0 {
		fmt.Fprintln(stdout, "no cached MTA-STS policies")
		return 0
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DOMAIN\tMODE\tID\tEXPIRES\tMX")
	for _, p := range list {
		expires := p.Expires.UTC().Format(time.RFC3339)
		if p.Expired {
			expires += " (expired)"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", p.Domain, p.Mode, p.ID, expires, strings.Join(p.MX, " "))
	}
	tw.Flush()
	return 0
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
	if p.LastError != "" {
		say(w, "last fetch failed: %s\n", p.LastError)
	}
}
