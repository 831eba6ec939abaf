package tlsrpt

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/stsrelay/stsrelay/policy"
)

// Report is an RFC 8460 §4.4 aggregate report, with the RFC's field names.
type Report struct {
	OrganizationName string         `json:"organization-name"`
	DateRange        DateRange      `json:"date-range"`
	ContactInfo      string         `json:"contact-info"`
	ReportID         string         `json:"report-id"`
	Policies         []PolicyReport `json:"policies"`
}

// DateRange holds RFC 3339 date-times (§4.4), in UTC.
type DateRange struct {
	Start time.Time `json:"start-datetime"`
	End   time.Time `json:"end-datetime"`
}

// PolicyReport is the results under one policy.
type PolicyReport struct {
	Policy  PolicyDescription `json:"policy"`
	Summary Summary           `json:"summary"`
	// FailureDetails is always an array, empty when nothing failed.
	FailureDetails []FailureDetail `json:"failure-details"`
}

// PolicyDescription is the "policy" object of §4.4.
type PolicyDescription struct {
	Type   string   `json:"policy-type"` // sts, tlsa or no-policy-found
	String []string `json:"policy-string,omitempty"`
	Domain string   `json:"policy-domain"`
	// MXHost lists the MTA-STS mx patterns (see the package comment).
	MXHost []string `json:"mx-host,omitempty"`
}

// Summary counts sessions (§4.4).
type Summary struct {
	Successful int64 `json:"total-successful-session-count"`
	Failed     int64 `json:"total-failure-session-count"`
}

// FailureDetail is one group of failed sessions that share every field
// (§4.4).
type FailureDetail struct {
	ResultType          string `json:"result-type"`
	SendingMTAIP        string `json:"sending-mta-ip,omitempty"`
	ReceivingMXHostname string `json:"receiving-mx-hostname,omitempty"`
	ReceivingMXHELO     string `json:"receiving-mx-helo,omitempty"`
	ReceivingIP         string `json:"receiving-ip,omitempty"`
	FailedSessionCount  int64  `json:"failed-session-count"`
	// AdditionalInformation must be a URI (§4.4); stsrelay has none.
	AdditionalInformation string `json:"additional-information,omitempty"`
	FailureReasonCode     string `json:"failure-reason-code,omitempty"`
}

// maxReportSize caps a compressed report; §5.2 notes receivers commonly
// refuse more than ten megabytes.
const maxReportSize = 10 << 20

// aggregate is what was recorded for one policy of one domain on one day.
type aggregate struct {
	Domain   string         `json:"d"`
	Type     string         `json:"t"` // policy-type
	Strings  []string       `json:"s,omitempty"`
	MXHosts  []string       `json:"mx,omitempty"`
	Success  int64          `json:"ok,omitempty"`
	Failures []failureGroup `json:"f,omitempty"`
}

// failureGroup is one failure-details entry in the making.
type failureGroup struct {
	Result      string `json:"r"`
	SendingIP   string `json:"s,omitempty"`
	MX          string `json:"mx,omitempty"`
	HELO        string `json:"h,omitempty"`
	ReceivingIP string `json:"ip,omitempty"`
	Reason      string `json:"why,omitempty"`
	Count       int64  `json:"n"`
}

// maxFailureGroups bounds the failure details kept per policy and day;
// past it, failures are counted under their result type alone, so a
// flood of distinct reasons cannot grow a report without bound.
const maxFailureGroups = 200

// maxReason bounds one failure-reason-code.
const maxReason = 200

func (g failureGroup) sameAs(o failureGroup) bool {
	g.Count, o.Count = 0, 0
	return g == o
}

// add merges the counts of o (same domain and policy) into a.
func (a *aggregate) add(o *aggregate) {
	a.Success += o.Success
	for _, g := range o.Failures {
		a.addFailure(g)
	}
}

func (a *aggregate) addFailure(g failureGroup) {
	for i := range a.Failures {
		if a.Failures[i].sameAs(g) {
			a.Failures[i].Count += g.Count
			return
		}
	}
	if len(a.Failures) >= maxFailureGroups {
		g = failureGroup{Result: g.Result, Count: g.Count}
		for i := range a.Failures {
			if a.Failures[i].sameAs(g) {
				a.Failures[i].Count += g.Count
				return
			}
		}
	}
	a.Failures = append(a.Failures, g)
}

func (a *aggregate) failed() int64 {
	var n int64
	for _, g := range a.Failures {
		n += g.Count
	}
	return n
}

// aggregateOf starts the aggregate a result belongs to, with its count.
func aggregateOf(r policy.SessionResult) *aggregate {
	a := &aggregate{Domain: r.PolicyDomain, Type: string(policy.TypeNone)}
	if r.Policy != nil && r.Policy.Type != policy.TypeNone {
		a.Type = string(r.Policy.Type)
		a.Strings = r.Policy.Strings
		if r.Policy.Type == policy.TypeSTS {
			a.MXHosts = r.Policy.MXHosts
		}
	}
	if r.Result == policy.ResultSuccess {
		a.Success = 1
		return a
	}
	a.Failures = []failureGroup{{
		Result: string(r.Result), SendingIP: r.SendingIP, MX: strings.TrimSuffix(r.MX, "."),
		HELO: truncate(r.HELO, 255), ReceivingIP: r.ReceivingIP, Reason: truncate(r.Detail, maxReason), Count: 1,
	}}
	return a
}

// build makes the report of one domain from its aggregates.
func build(meta Report, aggs []*aggregate) *Report {
	rep := meta
	rep.Policies = []PolicyReport{}
	sorted := slices.Clone(aggs)
	slices.SortStableFunc(sorted, func(a, b *aggregate) int {
		return strings.Compare(a.Type+strings.Join(a.Strings, "\n"), b.Type+strings.Join(b.Strings, "\n"))
	})
	for _, a := range sorted {
		pr := PolicyReport{
			Policy:         PolicyDescription{Type: a.Type, String: a.Strings, Domain: a.Domain, MXHost: a.MXHosts},
			Summary:        Summary{Successful: a.Success, Failed: a.failed()},
			FailureDetails: []FailureDetail{},
		}
		for _, g := range a.Failures {
			pr.FailureDetails = append(pr.FailureDetails, FailureDetail{
				ResultType: g.Result, SendingMTAIP: g.SendingIP, ReceivingMXHostname: g.MX,
				ReceivingMXHELO: g.HELO, ReceivingIP: g.ReceivingIP, FailedSessionCount: g.Count,
				FailureReasonCode: g.Reason,
			})
		}
		rep.Policies = append(rep.Policies, pr)
	}
	return &rep
}

// compress renders the report as gzip-compressed JSON (§5.2).
func compress(rep *Report) ([]byte, error) {
	js, err := json.Marshal(rep)
	if err != nil {
		return nil, err
	}
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	zw.Write(js)
	if err := zw.Close(); err != nil {
		return nil, err
	}
	if b.Len() > maxReportSize {
		return nil, fmt.Errorf("report is %d bytes compressed, over the %d that receivers accept", b.Len(), maxReportSize)
	}
	return b.Bytes(), nil
}

// Filename is the report's name (RFC 8460 §5.1):
// sender!policy-domain!begin-timestamp!end-timestamp!unique-id.json.gz.
func Filename(submitter, domain string, start, end time.Time, uid string) string {
	return fmt.Sprintf("%s!%s!%d!%d!%s.json.gz", submitter, domain, start.Unix(), end.Unix(), uid)
}
