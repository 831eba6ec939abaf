package tlsrpt

import (
	"net/http"
	"slices"
	"strings"
	"time"

	"go.etcd.io/bbolt"

	"github.com/stsrelay/stsrelay/admin"
)

// DomainInfo is what `stsrelay tlsrpt list` shows of one domain on one day.
type DomainInfo struct {
	Day      string       `json:"day"`
	Domain   string       `json:"domain"`
	Policies []PolicyInfo `json:"policies"`
	// Reports are the reports made of these results: the day's, and any
	// partial ones sent on request.
	Reports []ReportInfo `json:"reports,omitempty"`
}

// PolicyInfo counts the sessions under one policy.
type PolicyInfo struct {
	Type       string           `json:"policy_type"`
	Successful int64            `json:"successful"`
	Failed     int64            `json:"failed"`
	Failures   map[string]int64 `json:"failures,omitempty"` // by result type
}

// ReportInfo is the state of one report.
type ReportInfo struct {
	ReportID  string    `json:"report_id,omitempty"`
	Partial   bool      `json:"partial,omitempty"`
	End       time.Time `json:"end"`
	State     string    `json:"state"`
	Attempts  int       `json:"attempts,omitempty"`
	Next      time.Time `json:"next_attempt,omitzero"`
	Sent      time.Time `json:"sent,omitzero"`
	SentTo    []string  `json:"sent_to,omitempty"`
	LastError string    `json:"last_error,omitempty"`
}

// List returns the results kept so far, by day and domain, with the state
// of their reports.
func (t *Reporter) List() ([]DomainInfo, error) {
	t.Flush()
	var out []DomainInfo
	err := t.opts.DB.View(func(tx *bbolt.Tx) error {
		reports := map[string][]ReportInfo{}
		for _, r := range allReports(tx) {
			k := r.Day + "\x00" + r.Domain
			reports[k] = append(reports[k], ReportInfo{ReportID: r.ReportID, Partial: r.Partial, End: r.End,
				State: r.State, Attempts: r.Attempts, Next: r.Next, Sent: r.Sent, SentTo: r.SentTo, LastError: r.LastError})
		}
		for _, day := range days(tx) {
			byDomain := dayResults(tx, day)
			for _, dom := range sortedKeys(byDomain) {
				di := DomainInfo{Day: day, Domain: dom, Reports: reports[day+"\x00"+dom]}
				for _, a := range byDomain[dom] {
					pi := PolicyInfo{Type: a.Type, Successful: a.Success, Failed: a.failed()}
					for _, g := range a.Failures {
						if pi.Failures == nil {
							pi.Failures = map[string]int64{}
						}
						pi.Failures[g.Result] += g.Count
					}
					di.Policies = append(di.Policies, pi)
				}
				slices.SortFunc(di.Policies, func(a, b PolicyInfo) int { return strings.Compare(a.Type, b.Type) })
				out = append(out, di)
			}
		}
		return nil
	})
	return out, err
}

// SendRequest is the body of POST /tlsrpt/send.
type SendRequest struct {
	Day   string `json:"day"` // YYYY-MM-DD; "" is the last closed UTC day
	Force bool   `json:"force"`
}

// RegisterAdmin adds the control socket routes:
//
//	GET  /tlsrpt       list (DomainInfo)
//	POST /tlsrpt/send  send a day's reports now (SendRequest → []SendResult)
func (t *Reporter) RegisterAdmin(mux *http.ServeMux) {
	mux.HandleFunc("GET /tlsrpt", func(w http.ResponseWriter, r *http.Request) {
		list, err := t.List()
		if err != nil {
			admin.WriteError(w, http.StatusInternalServerError, "reading TLS report data: "+err.Error())
			return
		}
		if list == nil {
			list = []DomainInfo{}
		}
		admin.WriteJSON(w, http.StatusOK, list)
	})
	mux.HandleFunc("POST /tlsrpt/send", func(w http.ResponseWriter, r *http.Request) {
		var req SendRequest
		if err := admin.ReadJSON(r, &req); err != nil {
			admin.WriteError(w, http.StatusBadRequest, err.Error())
			return
		}
		if req.Day == "" {
			req.Day = t.opts.Now().UTC().AddDate(0, 0, -1).Format(dayFormat)
		}
		res, err := t.Send(r.Context(), req.Day, req.Force)
		if err != nil {
			admin.WriteError(w, http.StatusBadRequest, err.Error())
			return
		}
		if res == nil {
			res = []SendResult{}
		}
		admin.WriteJSON(w, http.StatusOK, res)
	})
}

// RegisterDisabled answers the routes of RegisterAdmin with one line that
// says TLS reporting is off, for a daemon running without it.
func RegisterDisabled(mux *http.ServeMux) {
	off := func(w http.ResponseWriter, _ *http.Request) {
		admin.WriteError(w, http.StatusConflict, "TLS reporting is off in the running relay (tlsrpt.enabled = false)")
	}
	mux.HandleFunc("GET /tlsrpt", off)
	mux.HandleFunc("POST /tlsrpt/send", off)
}
