package delivery

import (
	"strconv"
	"strings"
)

// limits are what a remote's LIMITS keyword (RFC 9422) asks of us, read
// once per session from the EHLO reply that counts (after STARTTLS);
// 0 is no limit.
type limits struct {
	mailMax int // transactions per session (§4.1)
	rcptMax int // recipients per transaction (§4.2)
}

// parseLimits reads the parameters of a LIMITS keyword. Limits it does
// not know, and known ones whose value is malformed, are ignored (§3.7);
// of one named twice, the first well-formed one counts.
func parseLimits(params string) limits {
	var l limits
	for _, p := range strings.Fields(params) {
		name, value, _ := strings.Cut(p, "=")
		n, ok := limitValue(value)
		if !ok {
			continue
		}
		switch {
		case strings.EqualFold(name, "MAILMAX") && l.mailMax == 0:
			l.mailMax = n
		case strings.EqualFold(name, "RCPTMAX") && l.rcptMax == 0:
			l.rcptMax = n
		}
	}
	return l
}

// limitValue is a limit's value: a positive number of at most 6 digits.
func limitValue(v string) (int, bool) {
	if v == "" || len(v) > 6 || strings.Trim(v, "0123456789") != "" {
		return 0, false
	}
	n, err := strconv.Atoi(v)
	return n, err == nil && n > 0
}
