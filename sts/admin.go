package sts

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/stsrelay/stsrelay/admin"
	"github.com/stsrelay/stsrelay/policy"
)

// PolicyInfo is a cached policy as the control socket and the CLI show it,
// or, in the list, a domain without one whose last fetch failed: then
// NotCached is set, and only Domain, LastError and LastFailure are, the
// only fields of its JSON (a cached policy always has the fields left out
// of its JSON when zero).
type PolicyInfo struct {
	Domain   string    `json:"domain"`
	ID       string    `json:"id,omitzero"`
	Mode     Mode      `json:"mode,omitzero"`
	MX       []string  `json:"mx,omitzero"`
	MaxAge   int64     `json:"max_age"` // seconds
	Fetched  time.Time `json:"fetched,omitzero"`
	Expires  time.Time `json:"expires,omitzero"`
	Expired  bool      `json:"expired"`
	LastUsed time.Time `json:"last_used,omitzero"`
	// LastError is the last failed fetch, until one begun after it
	// succeeds: when, and the error in one line.
	LastError string `json:"last_error,omitempty"`
	// Policy is the policy file as cached.
	Policy string `json:"policy,omitzero"`
	// NotCached marks a domain listed only for its failed fetch.
	NotCached bool `json:"not_cached,omitempty"`
	// LastFailure is LastError in parts.
	LastFailure *FetchFailure `json:"last_failure,omitempty"`
}

// MarshalJSON leaves expired and max_age out of a domain without a cached
// policy, as the other fields of a policy are: a reader that does not know
// not_cached would take "expired": false for a policy in force.
func (p PolicyInfo) MarshalJSON() ([]byte, error) {
	type plain PolicyInfo
	if !p.NotCached {
		return json.Marshal(plain(p))
	}
	return json.Marshal(struct {
		Domain      string        `json:"domain"`
		LastError   string        `json:"last_error,omitempty"`
		NotCached   bool          `json:"not_cached"`
		LastFailure *FetchFailure `json:"last_failure,omitempty"`
	}{p.Domain, p.LastError, p.NotCached, p.LastFailure})
}

// FetchFailure is a failed policy fetch as the control socket shows it.
type FetchFailure struct {
	ID     string            `json:"id"` // the policy id whose fetch failed
	At     time.Time         `json:"at"`
	Result policy.ResultType `json:"result"` // as TLS reports name it (RFC 8460 §4.3.2)
	// Reason is the error in one line, without the policy URL that
	// comes before an error of the connection: it is the domain's.
	Reason string `json:"reason"`
}

func (f failure) info() *FetchFailure {
	err := f.err
	var ue *url.Error
	if errors.As(err, &ue) {
		err = ue.Err
	}
	return &FetchFailure{ID: f.id, At: f.at.UTC(), Result: classify(f.err), Reason: oneLine(err.Error())}
}

func (f failure) lastError() string {
	return f.at.UTC().Format(time.RFC3339) + ": " + oneLine(f.err.Error())
}

// Info returns what the cache knows about domain, or ErrNotCached, which
// then says how the last fetch failed, if one did: during an outage of a
// policy host, that is why its domain's mail goes without MTA-STS.
func (m *Manager) Info(domain string) (*PolicyInfo, error) {
	d, err := policyDomain(domain)
	if err != nil {
		return nil, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	e := m.entries[d]
	if e == nil {
		if f, ok := m.failures[d]; ok {
			return nil, fmt.Errorf("%w; the fetch of policy id %s failed at %s: %s", ErrNotCached, f.id,
				f.at.UTC().Format(time.RFC3339), oneLine(f.err.Error()))
		}
		return nil, ErrNotCached
	}
	return m.infoLocked(e), nil
}

// Infos returns every cached policy, and every domain without one whose
// last fetch failed (NotCached), sorted by domain: during an outage of
// policy hosts, the domains whose mail goes without MTA-STS.
func (m *Manager) Infos() []*PolicyInfo {
	m.mu.Lock()
	out := make([]*PolicyInfo, 0, len(m.entries)+len(m.failures))
	for _, e := range m.entries {
		out = append(out, m.infoLocked(e))
	}
	for d, f := range m.failures {
		if m.entries[d] == nil {
			out = append(out, &PolicyInfo{Domain: d, NotCached: true, LastError: f.lastError(), LastFailure: f.info()})
		}
	}
	m.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Domain < out[j].Domain })
	return out
}

func (m *Manager) infoLocked(e *entry) *PolicyInfo {
	cp := e.policy
	now := m.now()
	info := &PolicyInfo{
		Domain: cp.Domain, ID: cp.ID, Mode: cp.Policy.Mode, MX: cp.Policy.MX,
		MaxAge:  int64(cp.Policy.MaxAge / time.Second),
		Fetched: cp.Fetched, Expires: cp.Expires, Expired: cp.Expired(now),
		LastUsed: e.lastUsed, Policy: cp.Policy.String(),
	}
	if info.MX == nil {
		info.MX = []string{}
	}
	if f, ok := m.failures[cp.Domain]; ok {
		info.LastError, info.LastFailure = f.lastError(), f.info()
	}
	return info
}

// RegisterAdmin adds the MTA-STS routes to the control socket's mux:
//
//	GET    /sts                  every cached policy ([]PolicyInfo); with
//	                             ?not_cached=1 also every domain whose
//	                             fetch failed without one (NotCached)
//	GET    /sts/{domain}         one cached policy (PolicyInfo)
//	POST   /sts/{domain}/refresh fetch the policy now, ignoring the backoff
//	DELETE /sts/{domain}         forget the cached policy
func (m *Manager) RegisterAdmin(mux *http.ServeMux) {
	mux.HandleFunc("GET /sts", func(w http.ResponseWriter, r *http.Request) {
		list := m.Infos()
		if r.URL.Query().Get("not_cached") == "" {
			// Only to a client that asks: one older than NotCached
			// would list such a domain as a policy in force.
			list = slices.DeleteFunc(list, func(p *PolicyInfo) bool { return p.NotCached })
		}
		admin.WriteJSON(w, http.StatusOK, list)
	})
	mux.HandleFunc("GET /sts/{domain}", func(w http.ResponseWriter, r *http.Request) {
		info, err := m.Info(r.PathValue("domain"))
		if err != nil {
			writeError(w, r.PathValue("domain"), err)
			return
		}
		admin.WriteJSON(w, http.StatusOK, info)
	})
	mux.HandleFunc("POST /sts/{domain}/refresh", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), m.fetchTimeout+10*time.Second)
		defer cancel()
		domain := r.PathValue("domain")
		caller := admin.CallerAttrs(r.Context())
		cp, err := m.Refresh(ctx, domain)
		if err != nil {
			m.log.Warn("sts: refresh by the administrator failed", append([]any{"domain", domain, "err", oneLine(err.Error())}, caller...)...)
			writeError(w, domain, err)
			return
		}
		m.log.Info("sts: refresh by the administrator", append([]any{"domain", cp.Domain, "policy_id", cp.ID, "mode", cp.Policy.Mode}, caller...)...)
		info, err := m.Info(domain)
		if err != nil {
			writeError(w, domain, err)
			return
		}
		admin.WriteJSON(w, http.StatusOK, info)
	})
	mux.HandleFunc("DELETE /sts/{domain}", func(w http.ResponseWriter, r *http.Request) {
		domain := r.PathValue("domain")
		if err := m.Purge(domain); err != nil {
			writeError(w, domain, err)
			return
		}
		m.log.Info("sts: purge by the administrator", append([]any{"domain", domain}, admin.CallerAttrs(r.Context())...)...)
		admin.WriteJSON(w, http.StatusOK, map[string]string{"purged": domain})
	})
}

func writeError(w http.ResponseWriter, domain string, err error) {
	var fe *FetchError
	var re *RecordError
	switch {
	case errors.Is(err, ErrNotCached):
		msg := "no cached MTA-STS policy for " + domain
		if _, why, ok := strings.Cut(err.Error(), "; "); ok {
			msg += "; " + why
		}
		admin.WriteError(w, http.StatusNotFound, msg)
	case errors.Is(err, ErrNoRecord), errors.Is(err, ErrMultipleRecords), errors.As(err, &re):
		admin.WriteError(w, http.StatusNotFound, domain+": "+err.Error())
	case errors.As(err, &fe):
		admin.WriteError(w, http.StatusBadGateway, oneLine(err.Error()))
	default:
		admin.WriteError(w, http.StatusBadRequest, oneLine(err.Error()))
	}
}

// RegisterDisabled answers the routes of RegisterAdmin with one line that
// says MTA-STS is off, for a daemon running without it.
func RegisterDisabled(mux *http.ServeMux) {
	off := func(w http.ResponseWriter, _ *http.Request) {
		admin.WriteError(w, http.StatusConflict, "MTA-STS is off in the running relay (sts.enabled = false)")
	}
	mux.HandleFunc("GET /sts", off)
	mux.HandleFunc("GET /sts/{domain}", off)
	mux.HandleFunc("POST /sts/{domain}/refresh", off)
	mux.HandleFunc("DELETE /sts/{domain}", off)
}
