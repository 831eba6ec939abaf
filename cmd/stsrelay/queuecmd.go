package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/stsrelay/stsrelay/admin"
	"github.com/stsrelay/stsrelay/config"
	"github.com/stsrelay/stsrelay/queue"
)

const queueHelp = `
Queue lists and manages the queue. While the relay runs, every command goes
through its control socket; when it does not, list, show and summary read
the database on disk (read-only), and the commands that change the queue
need the relay.

The commands are:

	list     list the queued messages and their recipients (postqueue -p)
	show     show one message: envelope, recipients, headers; -body prints it (postcat)
	summary  waiting recipients by domain and age, and the commonest deferrals (qshape)
	retry    try queued and deferred recipients now
	hold     stop delivering until released
	release  deliver held recipients again
	delete   remove recipients without notifying anyone
	bounce   fail recipients and send the sender a bounce

The changing commands take one queue id, or a selection: -all, -domain D,
-sender ADDR, -status active|deferred|held, alone or combined. Deleting or
bouncing more than one message asks for -yes.

Use "stsrelay queue <command> -help" for more information about a command.`

func runQueue(args []string, stdout, stderr io.Writer) int {
	return runGroup("queue", queueHelp, args, stderr, map[string]func([]string) int{
		"list":    func(a []string) int { return runQueueList(a, stdout, stderr) },
		"show":    func(a []string) int { return runQueueShow(a, stdout, stderr) },
		"summary": func(a []string) int { return runQueueSummary(a, stdout, stderr) },
		"retry": func(a []string) int {
			return runQueueAction("retry", a, stdout, stderr, `
Retry makes queued and deferred recipients due now. Held recipients stay
held. If the attempt fails, the next one follows the retry schedule as if
this retry had not happened.`)
		},
		"hold": func(a []string) int {
			return runQueueAction("hold", a, stdout, stderr, `
Hold stops delivery of queued and deferred recipients until "stsrelay queue
release". A held message still counts towards its time in the queue: it
expires on its next attempt after delivery.max_queue_time.`)
		},
		"release": func(a []string) int {
			return runQueueAction("release", a, stdout, stderr, `
Release makes held recipients due for delivery now.`)
		},
		"delete": func(a []string) int {
			return runQueueAction("delete", a, stdout, stderr, `
Delete removes recipients from the queue, and a message with its last
waiting recipient. Nobody is notified: the sender gets no bounce. Use
"stsrelay queue bounce" to tell the sender. With a queue id, the whole
message goes (also a damaged record the other commands cannot read).`)
		},
		"bounce": func(a []string) int {
			return runQueueAction("bounce", a, stdout, stderr, `
Bounce fails recipients that are not yet delivered, with "554 5.0.0 bounced
by the mail system administrator", and sends the sender a delivery status
notification (unless the sender is <> or NOTIFY forbids it).`)
		},
	})
}

// usageError prints one line saying what is wrong, then the usage, and
// returns the exit code for a usage error.
func usageError(fs *flag.FlagSet, stderr io.Writer, format string, args ...any) int {
	fmt.Fprintf(stderr, "stsrelay %s: %s\n", fs.Name(), fmt.Sprintf(format, args...))
	fs.Usage()
	return 2
}

// queueSource is where list, show and summary read: the running daemon,
// or the database on disk.
type queueSource interface {
	List(after string, limit int) (*queue.Page, error)
	Show(id string) (*queue.MessageInfo, error)
	// Message opens the stored message, or only its header section.
	Message(id string, headers bool) (io.ReadCloser, error)
	Summary() (*queue.Summary, error)
}

// openQueue returns the running daemon's queue or, when none runs, the
// database on disk, saying so on stderr.
func openQueue(cfgPath string, stderr io.Writer) (queueSource, error) {
	cfg, err := loadConfig(cfgPath)
	if err != nil {
		return nil, err
	}
	path := admin.SocketPath(cfg.StateDir)
	c, err := net.DialTimeout("unix", path, 5*time.Second)
	if err == nil {
		c.Close()
		return &daemonQueue{c: admin.Dial(path)}, nil
	}
	switch {
	case errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM):
		return nil, fmt.Errorf("control socket %s: %w", path, admin.ErrPermission)
	case !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ECONNREFUSED):
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	fmt.Fprintln(stderr, "stsrelay: daemon not running, showing the queue on disk")
	return &diskQueue{cfg: cfg}, nil
}

// daemonQueue reads through the control socket.
type daemonQueue struct{ c *admin.Client }

func (d *daemonQueue) call(path string, out any) error {
	ctx, cancel := context.WithTimeout(context.Background(), controlTimeout)
	defer cancel()
	return d.c.Call(ctx, "GET", path, nil, out)
}

func (d *daemonQueue) List(after string, limit int) (*queue.Page, error) {
	var p queue.Page
	q := url.Values{"limit": {strconv.Itoa(limit)}}
	if after != "" {
		q.Set("after", after)
	}
	return &p, d.call("/queue?"+q.Encode(), &p)
}

func (d *daemonQueue) Show(id string) (*queue.MessageInfo, error) {
	var m queue.MessageInfo
	return &m, d.call("/queue/"+url.PathEscape(id), &m)
}

func (d *daemonQueue) Message(id string, headers bool) (io.ReadCloser, error) {
	path := "/queue/" + url.PathEscape(id) + "/message"
	if headers {
		path += "?headers=1"
	}
	// No timeout: a large message streams for as long as it takes.
	return d.c.Open(context.Background(), path)
}

func (d *daemonQueue) Summary() (*queue.Summary, error) {
	var s queue.Summary
	return &s, d.call("/queue/summary", &s)
}

// diskQueue reads the database of a stopped daemon. Each call opens it
// read-only and closes it again, so that a daemon starting meanwhile
// waits at most for one page.
type diskQueue struct{ cfg *config.Config }

func (d *diskQueue) with(fn func(r *queue.Reader) error) error {
	path := filepath.Join(d.cfg.StateDir, "stsrelay.db")
	db, err := queue.OpenReadOnly(path)
	switch {
	case errors.Is(err, queue.ErrNoDatabase):
		return fn(nil)
	case errors.Is(err, queue.ErrLocked):
		return fmt.Errorf("%s is locked by a running stsrelay daemon, but no control socket answers at %s (is it starting?)", path, admin.SocketPath(d.cfg.StateDir))
	case errors.Is(err, fs.ErrPermission):
		return fmt.Errorf("cannot read %s: %w", path, admin.ErrPermission)
	case err != nil:
		return err
	}
	defer db.Close()
	return fn(queue.NewReader(db, ""))
}

func (d *diskQueue) List(after string, limit int) (p *queue.Page, err error) {
	err = d.with(func(r *queue.Reader) error {
		if r == nil {
			p = &queue.Page{}
			return nil
		}
		p, err = r.List(after, limit)
		return err
	})
	return p, err
}

func (d *diskQueue) Show(id string) (m *queue.MessageInfo, err error) {
	err = d.with(func(r *queue.Reader) error {
		if r == nil {
			return fmt.Errorf("%s: %w", id, queue.ErrNotFound)
		}
		m, err = r.Show(id)
		return err
	})
	return m, err
}

func (d *diskQueue) Message(id string, headers bool) (rc io.ReadCloser, err error) {
	err = d.with(func(r *queue.Reader) error {
		if r == nil {
			return fmt.Errorf("%s: %w", id, queue.ErrNotFound)
		}
		// The open file outlives the database handle: no daemon runs to
		// remove it meanwhile.
		rc, err = r.Message(id)
		return err
	})
	if err == nil && headers {
		rc = headerOnly(rc)
	}
	return rc, err
}

func (d *diskQueue) Summary() (s *queue.Summary, err error) {
	err = d.with(func(r *queue.Reader) error {
		if r == nil {
			s = &queue.Summary{Domains: []queue.DomainCount{}, Reasons: []queue.ReasonCount{}}
			s.Total.Ages = make([]int, len(queue.AgeBuckets)+1)
			return nil
		}
		s, err = r.Summary()
		return err
	})
	return s, err
}

// headerOnly reads rc up to the empty line that ends the header section.
func headerOnly(rc io.ReadCloser) io.ReadCloser {
	var out bytes.Buffer
	br := bufio.NewReader(io.LimitReader(rc, 1<<20))
	for {
		line, err := br.ReadBytes('\n')
		out.Write(line)
		if err != nil || len(bytes.TrimRight(line, "\r\n")) == 0 {
			break
		}
	}
	rc.Close()
	return io.NopCloser(&out)
}

func runQueueList(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("queue list", "queue list [-config file] [-json]", `
List prints the messages in the queue, oldest first: one line per message
(id, size, arrival time, sender, Message-ID), then one indented line per
recipient with its state and the last reply, like postqueue -p. It reads the
queue a page at a time, so it starts printing at once on a large queue.`, stderr)
	cfgPath := configFlag(fs)
	asJSON := fs.Bool("json", false, "print a JSON array: per message id, from, size, created, message_id and recipients")
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if fs.NArg() != 0 {
		return usageError(fs, stderr, "unexpected argument %q (list takes no queue id; use show)", fs.Arg(0))
	}
	src, err := openQueue(*cfgPath, stderr)
	if err != nil {
		return fail(stderr, "queue list: %v", err)
	}
	var count int
	var total int64
	out := bufio.NewWriter(stdout)
	defer out.Flush()
	if *asJSON {
		fmt.Fprint(out, "[")
	}
	for after := ""; ; {
		p, err := src.List(after, queue.DefaultPageSize)
		if err != nil {
			out.Flush()
			return fail(stderr, "queue list: %v", err)
		}
		for _, m := range p.Messages {
			count++
			total += m.Size
			if *asJSON {
				if count > 1 {
					fmt.Fprint(out, ",")
				}
				b, _ := json.MarshalIndent(m, "  ", "  ")
				fmt.Fprintf(out, "\n  %s", escapeUnprintable(b))
				continue
			}
			// Addresses and Message-IDs are what clients sent: printed
			// escaped, as everything from outside is.
			say(out, "%-20s %9d  %s  %s", m.ID, m.Size, m.Created.Local().Format(time.DateTime), sender(m.From))
			if m.MessageID != "" {
				say(out, "  %s", m.MessageID)
			}
			fmt.Fprintln(out)
			for _, r := range m.Recipients {
				fmt.Fprintf(out, "    %s\n", recipientLine(r))
			}
		}
		out.Flush()
		if p.Next == "" {
			break
		}
		after = p.Next
	}
	switch {
	case *asJSON && count == 0:
		fmt.Fprintln(out, "]")
	case *asJSON:
		fmt.Fprintln(out, "\n]")
	case count == 0:
		fmt.Fprintln(out, "The queue is empty.")
	default:
		fmt.Fprintf(out, "-- %d message(s), %d bytes.\n", count, total)
	}
	return 0
}

func runQueueShow(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("queue show", "queue show [-config file] [-json | -body | -headers] ID", `
Show prints one message of the queue: its envelope, the state of each
recipient with the last reply and MX host, and the message's headers.
-body prints the stored message itself, headers and body, as postcat -bh
does; -headers only its header section.`, stderr)
	cfgPath := configFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	body := fs.Bool("body", false, "print the stored message (headers and body)")
	headers := fs.Bool("headers", false, "print the stored message's header section")
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if fs.NArg() != 1 {
		return usageError(fs, stderr, "want exactly one queue id, got %d arguments", fs.NArg())
	}
	if n := btoi(*asJSON) + btoi(*body) + btoi(*headers); n > 1 {
		return usageError(fs, stderr, "-json, -body and -headers go one at a time")
	}
	id := fs.Arg(0)
	src, err := openQueue(*cfgPath, stderr)
	if err != nil {
		return fail(stderr, "queue show: %v", err)
	}
	if *body || *headers {
		rc, err := src.Message(id, *headers)
		if err != nil {
			return fail(stderr, "queue show: %v", err)
		}
		defer rc.Close()
		// Line ends as a terminal and grep expect them, as postcat does.
		out := bufio.NewWriter(stdout)
		defer out.Flush()
		sc := bufio.NewReader(rc)
		for {
			line, err := sc.ReadString('\n')
			if strings.HasSuffix(line, "\r\n") {
				line = line[:len(line)-2] + "\n"
			}
			out.WriteString(line)
			if err == io.EOF {
				return 0
			}
			if err != nil {
				out.Flush()
				return fail(stderr, "queue show: reading the message: %v", err)
			}
		}
	}
	m, err := src.Show(id)
	if err != nil {
		return fail(stderr, "queue show: %v", err)
	}
	if *asJSON {
		return printJSON(stdout, stderr, m)
	}
	say(stdout, "id:         %s\nfrom:       %s\nsize:       %d bytes\ncreated:    %s\n",
		m.ID, sender(m.From), m.Size, m.Created.Local().Format(time.RFC1123Z))
	if m.MessageID != "" {
		say(stdout, "message-id: %s\n", m.MessageID)
	}
	if m.User != "" {
		say(stdout, "user:       %s\n", m.User)
	}
	if m.ClientAddr != "" {
		say(stdout, "client:     %s\n", m.ClientAddr)
	}
	if m.Ret != "" || m.EnvID != "" {
		say(stdout, "dsn:        RET=%s ENVID=%s\n", m.Ret, m.EnvID)
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
			// A folded line's tab reads as the space it means; the rest
			// of what the client wrote is escaped.
			say(stdout, "    %s\n", strings.ReplaceAll(strings.TrimRight(l, "\r"), "\t", " "))
		}
	}
	return 0
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func runQueueSummary(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("queue summary", "queue summary [-config file] [-json]", `
Summary shows the shape of the queue, as qshape does Postfix's: the waiting
recipients per destination domain, how many are due now (active), waiting
for a retry (deferred) or held, by time in the queue (columns up to 5, 10,
20 … 1280 minutes, then older), and the most common last replies of deferred
recipients.`, stderr)
	cfgPath := configFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if fs.NArg() != 0 {
		return usageError(fs, stderr, "unexpected argument %q", fs.Arg(0))
	}
	src, err := openQueue(*cfgPath, stderr)
	if err != nil {
		return fail(stderr, "queue summary: %v", err)
	}
	s, err := src.Summary()
	if err != nil {
		return fail(stderr, "queue summary: %v", err)
	}
	if *asJSON {
		return printJSON(stdout, stderr, s)
	}
	if s.Total.Total == 0 {
		fmt.Fprintln(stdout, "The queue is empty.")
		return 0
	}
	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprint(tw, "DOMAIN\tTOTAL\tACTIVE\tDEFERRED\tHELD\t")
	for _, b := range queue.AgeBuckets {
		fmt.Fprintf(tw, "%dm\t", int(b.Minutes()))
	}
	fmt.Fprintf(tw, "%dm+\t\n", int(queue.AgeBuckets[len(queue.AgeBuckets)-1].Minutes()))
	row := func(d queue.DomainCount, name string) {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%d\t%d\t", name, d.Total, d.Active, d.Deferred, d.Held)
		for _, n := range d.Ages {
			fmt.Fprintf(tw, "%d\t", n)
		}
		fmt.Fprintln(tw)
	}
	row(s.Total, "TOTAL")
	for _, d := range s.Domains {
		row(d, d.Domain)
	}
	tw.Flush()
	if len(s.Reasons) > 0 {
		fmt.Fprintln(stdout, "\nMost common deferrals:")
		for _, r := range s.Reasons {
			fmt.Fprintf(stdout, "  %s: %s deferred, %s\n", r.Domain, thousands(r.Count), r.Status)
		}
	}
	fmt.Fprintf(stdout, "\n%s message(s), %s recipient(s) waiting.\n", thousands(s.Messages), thousands(s.Total.Total))
	return 0
}

// thousands writes n with commas: 3,214.
func thousands(n int) string {
	s := strconv.Itoa(n)
	for i := len(s) - 3; i > 0 && s[i-1] != '-'; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// pastTense is what the summary line says an action did.
var pastTense = map[string]string{
	"retry": "retrying now", "hold": "held", "release": "released", "delete": "deleted", "bounce": "bounced",
}

// runQueueAction runs a changing command: on one queue id, or on a
// selection.
func runQueueAction(name string, args []string, stdout, stderr io.Writer, help string) int {
	fs := newFlagSet("queue "+name, "queue "+name+" [-config file] [-json] ID | -all | [-domain D] [-sender ADDR] [-status S] [-yes]", help, stderr)
	cfgPath := configFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	var sel queue.Selector
	fs.BoolVar(&sel.All, "all", false, "every message in the queue")
	fs.StringVar(&sel.Domain, "domain", "", "recipients at this destination `domain`")
	fs.StringVar(&sel.Sender, "sender", "", "messages from this envelope sender `address` (<> for bounces)")
	fs.StringVar(&sel.Status, "status", "", "recipients in this `status`: active (due now), deferred (waiting for a retry) or held")
	yes := fs.Bool("yes", false, "confirm deleting or bouncing more than one message")
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	selecting := sel.All || sel.Domain != "" || sel.Sender != "" || sel.Status != ""
	switch {
	case fs.NArg() > 1:
		return usageError(fs, stderr, "want one queue id, got %d", fs.NArg())
	case fs.NArg() == 1 && selecting:
		return usageError(fs, stderr, "give a queue id or a selection (-all, -domain, -sender, -status), not both")
	case fs.NArg() == 0 && !selecting:
		return usageError(fs, stderr, "give a queue id or a selection (-all, -domain, -sender, -status)")
	}
	if fs.NArg() == 1 {
		id := fs.Arg(0)
		method, path := "POST", "/queue/"+url.PathEscape(id)+"/"+name
		if name == "delete" {
			method, path = "DELETE", "/queue/"+url.PathEscape(id)
		}
		var res queue.ActionResult
		if err := controlSend(*cfgPath, method, path, nil, &res); err != nil {
			return fail(stderr, "queue %s: %v", name, changeErr(err))
		}
		if *asJSON {
			return printJSON(stdout, stderr, res)
		}
		switch {
		case name == "delete":
			fmt.Fprintf(stdout, "%s: deleted\n", id)
		case res.Changed == 0:
			fmt.Fprintf(stdout, "%s: nothing to %s: no recipient is %s\n", id, name, map[string]string{
				"retry": "queued or deferred", "hold": "queued or deferred", "release": "held", "bounce": "waiting"}[name])
		default:
			fmt.Fprintf(stdout, "%s: %s %d recipient(s)\n", id, pastTense[name], res.Changed)
		}
		return 0
	}
	var res queue.BulkResult
	if err := controlSend(*cfgPath, "POST", "/queue/"+name, queue.BulkRequest{Selector: sel, Yes: *yes}, &res); err != nil {
		return fail(stderr, "queue %s: %v", name, changeErr(err))
	}
	if *asJSON {
		return printJSON(stdout, stderr, res)
	}
	fmt.Fprintf(stdout, "%s %d recipient(s) of %d message(s)\n", pastTense[name], res.Recipients, res.Messages)
	return 0
}

// changeErr says that changing the queue needs the daemon.
func changeErr(err error) error {
	if errors.Is(err, admin.ErrNotRunning) {
		return fmt.Errorf("%w; changing the queue needs the daemon (list, show and summary work without it)", err)
	}
	return err
}

func sender(from string) string { return "<" + from + ">" }

// recipientLine is one recipient as list and show print it.
func recipientLine(r queue.RecipientInfo) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s  %s", printable(r.Address), r.State)
	if r.Attempts > 0 {
		fmt.Fprintf(&b, ", %d attempt(s)", r.Attempts)
	}
	if r.NextAttempt != nil {
		fmt.Fprintf(&b, ", next %s", r.NextAttempt.Local().Format(time.DateTime))
	}
	if r.NoticeOwed != "" {
		fmt.Fprintf(&b, ", %s DSN not yet queued", r.NoticeOwed)
	}
	if r.LastCode != 0 {
		fmt.Fprintf(&b, "\n        %d", r.LastCode)
		if r.LastEnhanced != "" {
			fmt.Fprintf(&b, " %s", r.LastEnhanced)
		}
		fmt.Fprintf(&b, " %s", printable(r.LastText))
	}
	if r.LastMX != "" {
		fmt.Fprintf(&b, " (last MX %s)", printable(r.LastMX))
	}
	return b.String()
}
