package dane

import (
	"encoding/hex"
	"fmt"

	"github.com/miekg/dns"
)

// TLSA usages, selectors and matching types (RFC 6698 §2.1, RFC 7218).
const (
	UsagePKIXTA = 0
	UsagePKIXEE = 1
	UsageDANETA = 2
	UsageDANEEE = 3

	SelectorCert = 0
	SelectorSPKI = 1

	MatchFull   = 0
	MatchSHA256 = 1
	MatchSHA512 = 2
)

// Record is one TLSA record and whether this client can use it.
type Record struct {
	Usage, Selector, Matching uint8
	Data                      []byte // the certificate association data
	// Usable says the record takes part in authentication; Why says why
	// not when it does not.
	Usable bool
	Why    string
}

// String is the record as RFC 8460 §4.4's policy-string carries it:
// "usage selector matching-type data", data in hex.
func (r Record) String() string {
	return fmt.Sprintf("%d %d %d %s", r.Usage, r.Selector, r.Matching, hex.EncodeToString(r.Data))
}

// Records checks a TLSA RRset: which records are usable for SMTP, and why
// the others are not.
func Records(rrs []*dns.TLSA) []Record {
	out := make([]Record, 0, len(rrs))
	for _, rr := range rrs {
		r := Record{Usage: rr.Usage, Selector: rr.Selector, Matching: rr.MatchingType}
		data, err := hex.DecodeString(rr.Certificate)
		switch {
		case err != nil:
			r.Why = "malformed data (not hex)"
		default:
			r.Data = data
			r.Why = unusable(r)
		}
		r.Usable = r.Why == ""
		out = append(out, r)
	}
	digestAgility(out)
	return out
}

// unusable says why r cannot be used, "" when it can.
func unusable(r Record) string {
	switch r.Usage {
	case UsageDANETA, UsageDANEEE:
	case UsagePKIXTA, UsagePKIXEE:
		// RFC 7672 §3.1.3: SMTP has no agreed set of trust anchors.
		return fmt.Sprintf("usage %s(%d) is not used for SMTP (RFC 7672 §3.1.3)", usageName(r.Usage), r.Usage)
	default:
		return fmt.Sprintf("unknown usage %d", r.Usage)
	}
	switch r.Selector {
	case SelectorCert, SelectorSPKI:
	default:
		return fmt.Sprintf("unknown selector %d", r.Selector)
	}
	want := 0
	switch r.Matching {
	case MatchFull:
		if len(r.Data) == 0 {
			return "malformed data (empty)"
		}
	case MatchSHA256:
		want = 32
	case MatchSHA512:
		want = 64
	default:
		return fmt.Sprintf("unknown matching type %d", r.Matching)
	}
	if want != 0 && len(r.Data) != want {
		return fmt.Sprintf("malformed data (%d bytes, %s needs %d)", len(r.Data), matchingName(r.Matching), want)
	}
	return ""
}

// digestAgility keeps, per usage and selector, only the records of the
// strongest digest present, plus any Full(0) records (RFC 7671 §9): a
// weaker digest left in the RRset during a change of algorithm must not
// be what an attacker needs to break.
func digestAgility(recs []Record) {
	type us struct{ usage, selector uint8 }
	strongest := map[us]uint8{}
	for _, r := range recs {
		if r.Usable && r.Matching != MatchFull {
			k := us{r.Usage, r.Selector}
			strongest[k] = max(strongest[k], r.Matching)
		}
	}
	for i, r := range recs {
		if s := strongest[us{r.Usage, r.Selector}]; r.Usable && r.Matching != MatchFull && r.Matching < s {
			recs[i].Usable = false
			recs[i].Why = fmt.Sprintf("%s ignored: %s present for %d %d (RFC 7671 §9)",
				matchingName(r.Matching), matchingName(s), r.Usage, r.Selector)
		}
	}
}

func usageName(u uint8) string {
	switch u {
	case UsagePKIXTA:
		return "PKIX-TA"
	case UsagePKIXEE:
		return "PKIX-EE"
	case UsageDANETA:
		return "DANE-TA"
	case UsageDANEEE:
		return "DANE-EE"
	}
	return "unknown"
}

func matchingName(m uint8) string {
	switch m {
	case MatchFull:
		return "Full"
	case MatchSHA256:
		return "SHA2-256"
	case MatchSHA512:
		return "SHA2-512"
	}
	return "unknown"
}
