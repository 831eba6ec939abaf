package sts

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/stsrelay/stsrelay/resolve"
)

// Record is a parsed _mta-sts TXT record (RFC 8461 §3.1).
type Record struct {
	Version string // always "STSv1"
	ID      string // 1 to 32 letters and digits
	// Extensions are the fields other than v and id, in order; they are
	// ignored (RFC 8461 §3.1) but kept for display.
	Extensions []Extension
}

// Extension is one unknown key=value field of a TXT record.
type Extension struct{ Key, Value string }

// RecordError is a v=STSv1 TXT record that does not follow the syntax of
// RFC 8461 §3.1. Such a record means no policy is available; it does not
// make the lookup fail.
type RecordError struct {
	Text string // the record, truncated
	Msg  string
}

func (e *RecordError) Error() string {
	return fmt.Sprintf("invalid MTA-STS TXT record %q: %s", e.Text, e.Msg)
}

// IsRecord reports whether txt is an MTA-STS record at all. RFC 8461 §3.1:
// records that do not begin with "v=STSv1" are discarded, so other v=
// records at the same name are not errors. "v=STSv1" must be followed by the
// end, a blank or the ";" separator, so that "v=STSv10" is not one.
func IsRecord(txt string) bool {
	rest, ok := strings.CutPrefix(txt, "v=STSv1")
	return ok && (rest == "" || rest[0] == ';' || rest[0] == ' ' || rest[0] == '\t')
}

// ParseRecord parses one TXT record (its strings already concatenated
// without spaces, RFC 8461 §3.1):
//
//	sts-text-record = sts-version 1*(sts-sep sts-field) [sts-sep]
//	sts-sep         = *WSP %x3B *WSP
func ParseRecord(txt string) (*Record, error) {
	bad := func(format string, args ...any) error {
		return &RecordError{Text: truncate(txt), Msg: fmt.Sprintf(format, args...)}
	}
	fields := strings.Split(txt, ";")
	// RFC 8461 §3.1: a trailing separator is allowed.
	if len(fields) > 1 && strings.Trim(fields[len(fields)-1], " \t") == "" {
		fields = fields[:len(fields)-1]
	}
	// RFC 8461 §3.1: v=STSv1 comes first and is case-sensitive.
	if strings.TrimRight(fields[0], " \t") != "v=STSv1" {
		return nil, bad("does not begin with v=STSv1")
	}
	r := &Record{Version: "STSv1"}
	for _, f := range fields[1:] {
		f = strings.Trim(f, " \t")
		key, value, ok := strings.Cut(f, "=")
		if !ok || !validFieldName(key) {
			return nil, bad("field %q is not key=value", truncate(f))
		}
		if key == "id" {
			if r.ID != "" {
				// The RFC does not allow it; two ids would let two
				// senders disagree about which policy is current.
				return nil, bad("more than one id field")
			}
			// RFC 8461 §3.1: sts-id = %s"id=" 1*32(ALPHA / DIGIT).
			if len(value) == 0 || len(value) > 32 || !allAlnum(value) {
				return nil, bad("id %q is not 1 to 32 letters and digits", truncate(value))
			}
			r.ID = value
			continue
		}
		// RFC 8461 §3.1: sts-ext-value = 1*(%x21-3A / %x3C / %x3E-7E).
		if !validExtValue(value) {
			return nil, bad("field %s has an invalid value %q", key, truncate(value))
		}
		r.Extensions = append(r.Extensions, Extension{key, value})
	}
	if r.ID == "" {
		return nil, bad("no id field")
	}
	return r, nil
}

// String renders the record as it would be published.
func (r *Record) String() string {
	var b strings.Builder
	b.WriteString("v=" + r.Version + "; id=" + r.ID)
	for _, e := range r.Extensions {
		b.WriteString("; " + e.Key + "=" + e.Value)
	}
	return b.String()
}

func allAlnum(s string) bool {
	for i := 0; i < len(s); i++ {
		if !isAlnum(s[i]) {
			return false
		}
	}
	return true
}

func validExtValue(v string) bool {
	if v == "" {
		return false
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < 0x21 || c > 0x7e || c == ';' || c == '=' {
			return false
		}
	}
	return true
}

// Discovery is the outcome of a TXT lookup at _mta-sts.<domain>.
type Discovery struct {
	Name string // the name asked for, "_mta-sts.example.com."
	// CNAMEs are the aliases followed (hosted MTA-STS services point
	// _mta-sts at their own zone); empty when there were none.
	CNAMEs []string
	// STS are the v=STSv1 records found, unparsed; Others the rest.
	STS, Others []string
}

// LookupRecord finds and parses the domain's MTA-STS TXT record, following
// CNAMEs. It returns ErrNoRecord when there is none (including NXDOMAIN),
// ErrMultipleRecords when there is more than one, a *RecordError when the
// one record is invalid, and a *resolve.Error for a temporary DNS failure.
// The Discovery is returned whenever DNS answered.
func LookupRecord(ctx context.Context, r *resolve.Resolver, domain string) (*Record, *Discovery, error) {
	name := recordName(domain)
	txts, res, err := r.TXT(ctx, name)
	if err != nil {
		if resolve.IsNotFound(err) {
			return nil, &Discovery{Name: name}, ErrNoRecord
		}
		return nil, nil, err
	}
	d := &Discovery{Name: res.Name, CNAMEs: res.CNAMEs}
	for _, t := range txts {
		// RFC 8461 §3.1: records not beginning with v=STSv1 are discarded.
		if IsRecord(t) {
			d.STS = append(d.STS, t)
		} else {
			d.Others = append(d.Others, t)
		}
	}
	switch len(d.STS) {
	case 0:
		return nil, d, ErrNoRecord
	case 1:
	default:
		// RFC 8461 §3.1: more than one record means no policy.
		return nil, d, ErrMultipleRecords
	}
	rec, err := ParseRecord(d.STS[0])
	if err != nil {
		return nil, d, err
	}
	return rec, d, nil
}

// recordName is where domain's MTA-STS TXT record is (RFC 8461 §3.1).
func recordName(domain string) string {
	return "_mta-sts." + strings.TrimSuffix(domain, ".") + "."
}

// lookupRecordText is LookupRecord without the Discovery and the parsing:
// the one v=STSv1 record's text, or the error LookupRecord would return
// before parsing. Delivery asks on every attempt, and the answer rarely
// changes, so parsing is left to the caller's cache (Manager.record).
func lookupRecordText(ctx context.Context, r *resolve.Resolver, domain string) (string, error) {
	txts, _, err := r.TXT(ctx, recordName(domain))
	if err != nil {
		if resolve.IsNotFound(err) {
			return "", ErrNoRecord
		}
		return "", err
	}
	found, n := "", 0
	for _, t := range txts {
		// RFC 8461 §3.1: records not beginning with v=STSv1 are discarded.
		if IsRecord(t) {
			found = t
			n++
		}
	}
	switch n {
	case 0:
		return "", ErrNoRecord
	case 1:
		return found, nil
	}
	// RFC 8461 §3.1: more than one record means no policy.
	return "", ErrMultipleRecords
}

// isRecordError reports whether err says the DNS answered but gave no
// usable record, as opposed to a DNS failure.
func isRecordError(err error) bool {
	if errors.Is(err, ErrNoRecord) || errors.Is(err, ErrMultipleRecords) {
		return true
	}
	var re *RecordError
	return errors.As(err, &re)
}
