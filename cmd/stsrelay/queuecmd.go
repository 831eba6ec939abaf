package main

import (
	"fmt"
	"io"
	"net/url"
	"strings"
	"time"

	"github.com/stsrelay/stsrelay/queue"
)

const queueHelp = `
Queue lists and manages the queue of the running relay, through its control
socket. It never opens the database itself.

The commands are:

	list     list the queued messages and their recipients
	show     show one message: envelope, recipients, headers
	retry    try the deferred recipients of a message (or of all) now
	hold     stop delivering a message until it is released
	release  deliver a held message again
	delete   remove a message without notifying anyone
	bounce   fail a message and send its sender a bounce

Use "stsrelay queue <command> -help" for more information about a command.`

func runQueue(args []string, stdout, stderr io.Writer) int {
	return runGroup("queue", queueHelp, args, stderr, map[string]func([]string) int{
		"list":  func(a []string) int { return runQueueList(a, stdout, stderr) },
		"show":  func(a []string) int { return runQueueShow(a, stdout, stderr) },
		"retry": func(a []string) int { return runQueueRetry(a, stdout, stderr) },
		"hold": func(a []string) int {
			return runQueueAction("hold", "POST", "/hold", a, stdout, stderr, `
Hold stops delivery of the queued and deferred recipients of a message until
"stsrelay queue release". A held message still counts towards its time in
the queue: it expires on its next attempt after delivery.max_queue_time.`,
				"held %d recipient(s)", "nothing to hold: no recipient is queued or deferred")
		},
		"release": func(a []string) int {
			return runQueueAction("release", "POST", "/release", a, stdout, stderr, `
Release makes the held recipients of a message due for delivery now.`,
				"released %d recipient(s)", "nothing to release: no recipient is held")
		},
		"delete": func(a []string) int {
			return runQueueAction("delete", "DELETE", "", a, stdout, stderr, `
Delete removes a message from the queue. Nobody is notified: the sender gets
no bounce. Use "stsrelay queue bounce" to tell the sender.`,
				"deleted", "deleted")
		},
		"bounce": func(a []string) int {
			return runQueueAction("bounce", "POST", "/bounce", a, stdout, stderr, `
Bounce fails every recipient of a message that is not yet delivered, with
"554 5.0.0 bounced by the mail system administrator", and sends the sender a
delivery status notification (unless the sender is <> or NOTIFY forbids it).`,
				"bounced %d recipient(s)", "nothing to bounce: every recipient is delivered or failed")
		},
	})
}

func runQueueList(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("queue list", "queue list [-config file] [-json]", `
List prints the messages in the queue of the running relay, oldest first:
one line per message (id, size, arrival time, sender), then one indented
line per recipient with its state and the last reply, like postqueue -p.`, stderr)
	cfgPath := configFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON: per message id, from, size, created and recipients")
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if fs.NArg() != 0 {
		fs.Usage()
		return 2
	}
	var list []queue.MessageInfo
	if err := controlCall(*cfgPath, "GET", "/queue", &list); err != nil {
		return fail(stderr, "queue list: %v", err)
	}
	if *asJSON {
		return printJSON(stdout, stderr, list)
	}
	if len(list) == 0 {
		fmt.Fprintln(stdout, "The queue is empty.")
		return 0
	}
	var total int64
	for _, m := range list {
		total += m.Size
		fmt.Fprintf(stdout, "%-20s %9d  %s  %s\n", m.ID, m.Size, m.Created.Local().Format(time.DateTime), sender(m.From))
		for _, r := range m.Recipients {
			fmt.Fprintf(stdout, "    %s\n", recipientLine(r))
		}
	}
	fmt.Fprintf(stdout, "-- %d message(s), %d bytes.\n", len(list), total)
	return 0
}

func runQueueShow(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("queue show", "queue show [-config file] [-json] ID", `
Show prints one message of the queue: its envelope, the state of each
recipient with the last reply and MX host, and the message's headers.`, stderr)
	cfgPath := configFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	var m queue.MessageInfo
	if err := controlCall(*cfgPath, "GET", "/queue/"+url.PathEscape(fs.Arg(0)), &m); err != nil {
		return fail(stderr, "queue show: %v", err)
	}
	if *asJSON {
		return printJSON(stdout, stderr, m)
	}
	fmt.Fprintf(stdout, "id:       %s\nfrom:     %s\nsize:     %d bytes\ncreated:  %s\n",
		m.ID, sender(m.From), m.Size, m.Created.Local().Format(time.RFC1123Z))
	if m.User != "" {
		fmt.Fprintf(stdout, "user:     %s\n", m.User)
	}
	if m.ClientAddr != "" {
		fmt.Fprintf(stdout, "client:   %s\n", m.ClientAddr)
	}
	if m.Ret != "" || m.EnvID != "" {
		fmt.Fprintf(stdout, "dsn:      RET=%s ENVID=%s\n", m.Ret, m.EnvID)
	}
	if m.RequireTLS {
		fmt.Fprintln(stdout, "requiretls: yes")
	}
	fmt.Fprintln(stdout, "recipients:")
	for _, r := range m.Recipients {
		fmt.Fprintf(stdout, "    %s\n", recipientLine(r))
	}
	if m.Headers != "" {
		fmt.Fprintln(stdout, "headers:")
		for _, l := range strings.Split(strings.TrimRight(m.Headers, "\r\n"), "\n") {
			fmt.Fprintf(stdout, "    %s\n", strings.TrimRight(l, "\r"))
		}
	}
	return 0
}

func runQueueRetry(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("queue retry", "queue retry [-config file] ID | -all", `
Retry makes the queued and deferred recipients of a message due now, or of
every message with -all. Held recipients stay held.`, stderr)
	cfgPath := configFlag(fs)
	allFlag := fs.Bool("all", false, "retry every message in the queue")
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if *allFlag == (fs.NArg() == 1) || fs.NArg() > 1 {
		fs.Usage()
		return 2
	}
	var res queue.ActionResult
	if *allFlag {
		if err := controlCall(*cfgPath, "POST", "/queue/retry-all", &res); err != nil {
			return fail(stderr, "queue retry: %v", err)
		}
		fmt.Fprintf(stdout, "retrying %d message(s) now\n", res.Changed)
		return 0
	}
	id := fs.Arg(0)
	if err := controlCall(*cfgPath, "POST", "/queue/"+url.PathEscape(id)+"/retry", &res); err != nil {
		return fail(stderr, "queue retry: %v", err)
	}
	if res.Changed == 0 {
		fmt.Fprintf(stdout, "%s: nothing to retry: no recipient is queued or deferred\n", id)
		return 0
	}
	fmt.Fprintf(stdout, "%s: retrying %d recipient(s) now\n", id, res.Changed)
	return 0
}

// runQueueAction runs a command that takes one queue id.
func runQueueAction(name, method, suffix string, args []string, stdout, stderr io.Writer, help, done, none string) int {
	fs := newFlagSet("queue "+name, "queue "+name+" [-config file] ID", help, stderr)
	cfgPath := configFlag(fs)
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return 2
	}
	id := fs.Arg(0)
	var res queue.ActionResult
	if err := controlCall(*cfgPath, method, "/queue/"+url.PathEscape(id)+suffix, &res); err != nil {
		return fail(stderr, "queue %s: %v", name, err)
	}
	msg := none
	if res.Changed > 0 || name == "delete" {
		msg = done
		if strings.Contains(done, "%d") {
			msg = fmt.Sprintf(done, res.Changed)
		}
	}
	fmt.Fprintf(stdout, "%s: %s\n", id, msg)
	return 0
}

func sender(from string) string { return "<" + from + ">" }

// recipientLine is one recipient as list and show print it.
func recipientLine(r queue.RecipientInfo) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s  %s", r.Address, r.State)
	if r.Attempts > 0 {
		fmt.Fprintf(&b, ", %d attempt(s)", r.Attempts)
	}
	if r.NextAttempt != nil {
		fmt.Fprintf(&b, ", next %s", r.NextAttempt.Local().Format(time.DateTime))
	}
	if r.LastCode != 0 {
		fmt.Fprintf(&b, "\n        %d", r.LastCode)
		if r.LastEnhanced != "" {
			fmt.Fprintf(&b, " %s", r.LastEnhanced)
		}
		fmt.Fprintf(&b, " %s", r.LastText)
	}
	if r.LastMX != "" {
		fmt.Fprintf(&b, " (last MX %s)", r.LastMX)
	}
	return b.String()
}
