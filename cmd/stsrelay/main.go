// Command stsrelay is an outbound SMTP relay that enforces MTA-STS
// (RFC 8461) and DANE (RFC 7672) and sends TLS reports (RFC 8460). This
// package only wires: flags, configuration and the packages that do the
// work.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"time"
	"unicode/utf16"
	"unicode/utf8"

	"github.com/stsrelay/stsrelay/admin"
	"github.com/stsrelay/stsrelay/config"
	"github.com/stsrelay/stsrelay/smtpin"
	"github.com/stsrelay/stsrelay/sts"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = ""

const defaultConfigPath = "/etc/stsrelay/config.toml"

type command struct {
	name  string
	short string // one line for the command list
	run   func(args []string, stdin io.Reader, stdout, stderr io.Writer) int
}

func commands() []command {
	return []command{
		{"serve", "run the relay", func(a []string, _ io.Reader, o, e io.Writer) int { return runServe(a, o, e) }},
		{"check", "explain how mail to a domain would be protected", func(a []string, _ io.Reader, o, e io.Writer) int { return runCheck(a, o, e) }},
		{"queue", "list and manage the queue of the running relay", func(a []string, _ io.Reader, o, e io.Writer) int { return runQueue(a, o, e) }},
		{"sts", "list and manage the MTA-STS policy cache", func(a []string, _ io.Reader, o, e io.Writer) int { return runSTS(a, o, e) }},
		{"tlsrpt", "show and send TLS reports (RFC 8460)", func(a []string, _ io.Reader, o, e io.Writer) int { return runTLSRPT(a, o, e) }},
		{"hash-password", "make a bcrypt hash for [[submission.users]]", runHashPassword},
		{"version", "print the version", func(a []string, _ io.Reader, o, e io.Writer) int { return runVersion(a, o, e) }},
	}
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		usage(stderr)
		return 2
	}
	name := args[0]
	if name == "help" || name == "-h" || name == "-help" || name == "--help" {
		if len(args) > 1 {
			// "stsrelay help queue" is "stsrelay queue -help".
			return run([]string{args[1], "-help"}, stdin, stdout, stdout)
		}
		usage(stdout)
		return 0
	}
	for _, c := range commands() {
		if c.name == name {
			return c.run(args[1:], stdin, stdout, stderr)
		}
	}
	fmt.Fprintf(stderr, "stsrelay %s: unknown command\nRun 'stsrelay help' for usage.\n", name)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprint(w, "stsrelay is an outbound SMTP relay that enforces MTA-STS and DANE and sends TLS reports.\n\nUsage:\n\n\tstsrelay <command> [arguments]\n\nThe commands are:\n\n")
	for _, c := range commands() {
		fmt.Fprintf(w, "\t%-14s %s\n", c.name, c.short)
	}
	fmt.Fprint(w, "\nUse \"stsrelay help <command>\" for more information about a command.\n")
}

// newFlagSet returns a flag set that prints go-tool style help: the usage
// line, the description, then the flags.
func newFlagSet(name, usageLine, description string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: stsrelay %s\n\n%s\n", usageLine, strings.TrimSpace(description))
		hasFlags := false
		fs.VisitAll(func(*flag.Flag) { hasFlags = true })
		if hasFlags {
			fmt.Fprint(fs.Output(), "\nFlags:\n")
			fs.PrintDefaults()
		}
	}
	return fs
}

// parseFlags parses args and returns the exit code to use when the command
// must stop: 0 after -help, 2 after a usage error, -1 to go on.
func parseFlags(fs *flag.FlagSet, args []string) int {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	return -1
}

// flagSet reports whether the command line set the flag name, which tells
// an unset flag from one set to its default.
func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// configFlag adds -config to fs.
func configFlag(fs *flag.FlagSet) *string {
	return fs.String("config", defaultConfigPath, "configuration `file`")
}

// loadConfig loads the configuration file at path.
func loadConfig(path string) (*config.Config, error) {
	cfg, err := config.Load(path)
	if errors.Is(err, fs.ErrPermission) {
		// The file is root:stsrelay 0640 in the documented install.
		return nil, fmt.Errorf("%w (run as root or the stsrelay user)", err)
	}
	return cfg, err
}

// controlClient returns a client for the control socket of the daemon that
// runs with the configuration at configPath.
func controlClient(configPath string) (*admin.Client, error) {
	cfg, err := loadConfig(configPath)
	if err != nil {
		return nil, err
	}
	return admin.Dial(admin.SocketPath(cfg.StateDir)), nil
}

// controlTimeout bounds one call to the daemon; an sts refresh includes a
// policy fetch, which may take sts.fetch_timeout (at most
// sts.MaxFetchTimeout), and the daemon gives it 10 seconds more.
const controlTimeout = sts.MaxFetchTimeout + 30*time.Second

// controlCall makes one call to the daemon of the configuration at
// configPath and decodes its reply into out.
func controlCall(configPath, method, path string, out any) error {
	return controlSend(configPath, method, path, nil, out)
}

// controlSend is controlCall with a request body, in (nil for none).
func controlSend(configPath, method, path string, in, out any) error {
	c, err := controlClient(configPath)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), controlTimeout)
	defer cancel()
	return c.Call(ctx, method, path, in, out)
}

// runGroup runs one command of a group such as "stsrelay queue", so that
// help, a missing command and an unknown one read the same in every group.
func runGroup(group, help string, args []string, stderr io.Writer, commands map[string]func(args []string) int) int {
	usage := func() { fmt.Fprintf(stderr, "usage: stsrelay %s <command> [arguments]\n%s\n", group, help) }
	if len(args) == 0 {
		fmt.Fprintf(stderr, "stsrelay %s: no command given\n", group)
		usage()
		return 2
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		usage()
		return 0
	}
	if run, ok := commands[args[0]]; ok {
		return run(args[1:])
	}
	fmt.Fprintf(stderr, "stsrelay %s %s: unknown command\nRun 'stsrelay %s -help' for usage.\n", group, args[0], group)
	return 2
}

// printJSON prints v as indented JSON.
func printJSON(stdout, stderr io.Writer, v any) int {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return fail(stderr, "%v", err)
	}
	if _, err := stdout.Write(escapeUnprintable(buf.Bytes())); err != nil {
		return fail(stderr, "%v", err)
	}
	return 0
}

// escapeUnprintable writes the runes of encoded JSON that are not
// printable as \u escapes. encoding/json escapes C0 controls but lets DEL,
// C1 and others a terminal may act on through, and much of what is
// printed (replies, certificate names) comes from the network. Escaped, a
// string decodes to the same text; outside strings the encoder writes
// ASCII. Most output needs nothing, and is returned as it is.
func escapeUnprintable(js []byte) []byte {
	var out []byte
	done := 0 // js[:done] is in out
	for i := 0; i < len(js); {
		r, n := utf8.DecodeRune(js[i:])
		if r >= 0x7f && !strconv.IsPrint(r) {
			out = append(out, js[done:i]...)
			if r1, r2 := utf16.EncodeRune(r); r1 != utf8.RuneError {
				out = fmt.Appendf(out, `\u%04x\u%04x`, r1, r2)
			} else {
				out = fmt.Appendf(out, `\u%04x`, r)
			}
			done = i + n
		}
		i += n
	}
	if out == nil {
		return js
	}
	return append(out, js[done:]...)
}

// fail prints one line for the user and returns the exit code 1. Its
// arguments are escaped as say does: an error can carry text from the
// network (a TLSRPT endpoint's reply, a certificate name) or a line break
// that would split the one line in two.
func fail(stderr io.Writer, format string, args ...any) int {
	say(stderr, "stsrelay: "+format+"\n", args...)
	return 1
}

func runVersion(args []string, stdout, stderr io.Writer) int {
	fs := newFlagSet("version", "version", "Version prints the version of stsrelay and of Go it was built with.", stderr)
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	fmt.Fprintln(stdout, versionLine())
	return 0
}

// versionLine is "stsrelay VERSION GOVERSION".
func versionLine() string {
	v, goVersion := version, "unknown"
	bi, ok := debug.ReadBuildInfo()
	if ok {
		goVersion = bi.GoVersion
	}
	if v == "" {
		v = "(devel)"
		if ok && bi.Main.Version != "" {
			v = bi.Main.Version
		}
	}
	return fmt.Sprintf("stsrelay %s %s", v, goVersion)
}

func runHashPassword(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := newFlagSet("hash-password", "hash-password < password", fmt.Sprintf(`
Hash-password prints the bcrypt hash (cost %d) of a password, for
password_hash in [[submission.users]]. On a terminal it asks for the
password twice without showing it; otherwise it reads the first line of
standard input:

	stsrelay hash-password <<< 'correct horse battery staple'

The password itself never goes into the configuration.`, smtpin.PasswordCost), stderr)
	if code := parseFlags(fs, args); code >= 0 {
		return code
	}
	if fs.NArg() > 0 {
		// A password on the command line would land in shell history and ps.
		return fail(stderr, "hash-password: give the password on standard input, not as an argument")
	}
	password, err := readPassword(stdin, stderr)
	if err != nil {
		return fail(stderr, "hash-password: %v", err)
	}
	if password == "" {
		return fail(stderr, "hash-password: no password given")
	}
	hash, err := smtpin.HashPassword([]byte(password))
	if err != nil {
		return fail(stderr, "hash-password: %v", err)
	}
	fmt.Fprintln(stdout, hash)
	return 0
}
