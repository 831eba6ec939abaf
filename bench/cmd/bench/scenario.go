//go:build linux

package main

import (
	"fmt"
	"slices"
	"strings"

	"github.com/stsrelay/stsrelay/bench/internal/world"
)

// The systems under test. The stsrelay variants are stsrelay under a
// changed load, interleaved with the others so that their ratio to
// stsrelay is measured under the same noise.
const (
	sysStsrelay         = "stsrelay"
	sysStsrelayNoPolicy = "stsrelay-nopolicy"   // the same messages to domains without MTA-STS
	sysStsrelayEmpty    = "stsrelay-emptyqueue" // without the deferred messages queued first
	sysStsrelayBaseline = "stsrelay-baseline"   // the -baseline binary under the same load
	sysPostfix          = "postfix"             // smtp_tls_connection_reuse = no, its default
	sysPostfixReuse     = "postfix-reuse"       // smtp_tls_connection_reuse = yes
)

var systemTitles = map[string]string{
	sysStsrelay:         "stsrelay",
	sysStsrelayNoPolicy: "stsrelay no policy",
	sysStsrelayEmpty:    "stsrelay empty queue",
	sysStsrelayBaseline: "stsrelay baseline",
	sysPostfix:          "Postfix",
	sysPostfixReuse:     "Postfix reuse",
}

// isStsrelay reports whether a system runs stsrelay.
func isStsrelay(sys string) bool { return strings.HasPrefix(sys, sysStsrelay) }

// runOrder is the order of the systems in repetition rep. The stsrelay
// variants run back to back, first one then the other, because the
// figures between them (the cost of MTA-STS, of a full queue, of a
// lever against its baseline) are ratios of a few percent, and a 2-core
// machine drifts by more than that over the minute or more a Postfix run
// takes: a variant run after Postfix and another run before it do not
// see the same machine. The block and the Postfix systems take turns,
// each repetition starting one further on (A B C, B C A, C A B), and the
// variants within the block too, so that no system always follows the
// same one.
func runOrder(systems []string, rep int) []string {
	var units [][]string
	var block []string
	blockAt := -1
	for _, sys := range systems {
		if !isStsrelay(sys) {
			units = append(units, []string{sys})
			continue
		}
		if blockAt < 0 {
			blockAt = len(units)
			units = append(units, nil)
		}
		block = append(block, sys)
	}
	if blockAt >= 0 {
		units[blockAt] = rotate(block, rep)
	}
	var order []string
	for _, u := range rotate(units, rep) {
		order = append(order, u...)
	}
	return order
}

// rotate returns s starting at its (n mod len(s))th element.
func rotate[T any](s []T, n int) []T {
	if len(s) == 0 {
		return nil
	}
	n %= len(s)
	return append(slices.Clone(s[n:]), s[:n]...)
}

// scenario is one load, run against each of its systems in turn.
type scenario struct {
	name     string
	messages int
	size     int
	rcpts    int
	domains  int // recipient domains per message
	sessions int
	kind     world.Kind
	// auth: submission over STARTTLS with AUTH PLAIN, and the relays
	// require it (no trusted networks).
	auth           bool
	connPerMessage bool
	deferred       int // messages to a dead MX queued before the run
	systems        []string
	profile        bool // take pprof profiles of stsrelay in an extra run
	profileAll     bool // and of the scenario's other stsrelay systems
}

func (s *scenario) title() string {
	t := fmt.Sprintf("%s × %s, %d recipient", thousands(s.messages), sizeString(s.size), s.rcpts)
	if s.rcpts > 1 {
		t += fmt.Sprintf("s at %d domains", s.domains)
	}
	t += fmt.Sprintf(", %d sessions", s.sessions)
	if s.kind == world.Enforce {
		t += ", MTA-STS enforce"
	} else {
		t += ", no MTA-STS policy"
	}
	if s.auth {
		t += ", STARTTLS + AUTH"
	}
	if s.connPerMessage {
		t += ", one connection per message"
	}
	if s.deferred > 0 {
		t += fmt.Sprintf(", %s deferred messages queued", thousands(s.deferred))
	}
	return t
}

// scenarios returns the scenarios of the issue; quick shrinks them so that
// the whole run takes a few minutes.
func scenarios(quick bool) []*scenario {
	n := func(full, small int) int {
		if quick {
			return small
		}
		return full
	}
	all := []string{sysStsrelay, sysPostfix, sysPostfixReuse}
	two := []string{sysStsrelay, sysPostfixReuse}
	return []*scenario{
		{name: "4k-enforce", messages: n(20000, 3000), size: 4 << 10, rcpts: 1, domains: 1, sessions: 20, kind: world.Enforce,
			systems: []string{sysStsrelay, sysStsrelayNoPolicy, sysPostfix, sysPostfixReuse}, profile: true},
		{name: "4k-nopolicy", messages: n(20000, 3000), size: 4 << 10, rcpts: 1, domains: 1, sessions: 20, kind: world.Plain, systems: all},
		{name: "100k-enforce", messages: n(2000, 300), size: 100 << 10, rcpts: 5, domains: 3, sessions: 20, kind: world.Enforce, systems: all},
		{name: "100k-nopolicy", messages: n(2000, 300), size: 100 << 10, rcpts: 5, domains: 3, sessions: 20, kind: world.Plain, systems: all},
		{name: "4k-auth", messages: n(20000, 3000), size: 4 << 10, rcpts: 1, domains: 1, sessions: 20, kind: world.Enforce, auth: true, systems: two},
		{name: "4k-auth-conn-per-msg", messages: n(1000, 200), size: 4 << 10, rcpts: 1, domains: 1, sessions: 20, kind: world.Enforce, auth: true, connPerMessage: true, systems: two},
		{name: "4k-enforce-deferred", messages: n(20000, 3000), size: 4 << 10, rcpts: 1, domains: 1, sessions: 20, kind: world.Enforce, deferred: n(100000, 10000),
			systems: []string{sysStsrelay, sysStsrelayEmpty, sysPostfixReuse}},
	}
}

// withBaseline adds the baseline right after stsrelay in every scenario
// that runs stsrelay, so that both see the same load, interleaved, and the
// table gets a "stsrelay / stsrelay baseline" column.
func withBaseline(all []*scenario) {
	for _, sc := range all {
		if i := slices.Index(sc.systems, sysStsrelay); i >= 0 && !slices.Contains(sc.systems, sysStsrelayBaseline) {
			sc.systems = slices.Insert(slices.Clone(sc.systems), i+1, sysStsrelayBaseline)
		}
	}
}

func sizeString(n int) string {
	if n%(1<<10) == 0 {
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d B", n)
}

// thousands prints n with comma separators: 20,000.
func thousands(n int) string {
	s := fmt.Sprint(n)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}
